"""Group-aware scoring: k samples of one prompt, shared prefix against unshared, side by side.

    python -m bench groups --kind small --prompts 256,1024 --ks 1,8,16 --clients 32

Two servers with the same GPT-2-shaped reward and reference models: the default one (prefix
sharing on) and one started with ``--no-prefix-sharing``. Every request is one or more whole
groups: a prompt of P tokens and k completions of 16..64 tokens (``--completion``); a Score item
is (prompt, completion) text, a ReferenceLogProbs sequence is prompt + completion token ids with
``response_start = P``. 32 closed-loop clients (``--clients``) share ``--rounds`` x clients
requests, each sent once; the two servers are measured one after the other on the same requests
and throughput is taken over the makespan (a window would be biased here: one request of 16
samples of a 1024-token prompt takes seconds on a CPU).

Useful throughput is the tokens the unshared path would process per second: sum(P + c_i) over
the answered requests, whichever server answered. The ideal ratio is what the token counts alone
allow: ``sum(P + c_i) / (P + sum(c_i))`` per group. The in-process columns time the runner's
forward on one group per call (shared path, then the plain one) without gRPC or batching: the
limit of the shared computation on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bench import machine
from bench.models import DEFAULT_DIR, REFERENCE_VOCAB, SHAPES
from bench.servers import start_reward_server
from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.client.messages import score_items
from reward_server.tiny import WORDS

METHODS = {
    "score": "/rlhf.v1.RewardService/Score",
    "ref": "/rlhf.v1.RewardService/ReferenceLogProbs",
}
POSITIONS = 1152
"""Longest input of the models built here: a 1024-token prompt and a 64-token completion fit
(bench/models.py's shapes stop at 1024)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="small", choices=sorted(SHAPES))
    p.add_argument("--prompts", default="128,256,1024", help="prompt lengths (tokens)")
    p.add_argument("--ks", default="1,4,8,16", help="samples per prompt")
    p.add_argument("--completion", default="16..64", help="completion tokens, uniform LO..HI")
    p.add_argument("--rpcs", default="score,ref", help="score, ref or both")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--groups-per-request", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="requests per client, each measured run")
    p.add_argument(
        "--repeats", type=int, default=1, help="measured runs per server (order alternates)"
    )
    p.add_argument("--inprocess-repeats", type=int, default=5, help="0 skips the in-process rows")
    p.add_argument("--serve-arg", action="append", default=[], help="extra server flag (both)")
    p.add_argument(
        "--rm-family",
        default="gpt2",
        choices=("gpt2", "bert"),
        help="reward model: GPT-2-shaped (decoder) or BERT-shaped (encoder: Score rows only; "
        "nothing to share, the no-slowdown check)",
    )
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def build_encoder(kind: str, out_dir: Path) -> Path:
    """Write (once) a BERT-shaped reward model with `kind`'s layers and width (text-pair input,
    as cross-encoder reward models read a prompt and a completion)."""
    from reward_server.tiny import build_tiny_bert_rm

    shape = SHAPES[kind]
    path = Path(out_dir) / f"{kind}-bert-reward-pos{2 * POSITIONS}"
    marker = path / "bench_model.json"
    meta = {"kind": kind, "family": "bert", "positions": 2 * POSITIONS}
    if marker.exists() and json.loads(marker.read_text()) == meta:
        return path
    build_tiny_bert_rm(
        path,
        hidden=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        max_positions=2 * POSITIONS,  # its tokenizer splits some benchmark words
    )
    marker.write_text(json.dumps(meta))
    return path


def build_model(kind: str, role: str, out_dir: Path) -> Path:
    """Write (once) a GPT-2-shaped `role` checkpoint of `kind` with POSITIONS positions."""
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    from reward_server.tiny import gpt2_config, train_tokenizer

    shape = SHAPES[kind]
    vocab = shape.vocab_size if role == "reward" else REFERENCE_VOCAB
    path = Path(out_dir) / f"{kind}-{role}-pos{POSITIONS}"
    marker = path / "bench_model.json"
    meta = {"kind": kind, "role": role, "positions": POSITIONS, "vocab_size": vocab}
    if marker.exists() and json.loads(marker.read_text()) == meta:
        return path
    tok = train_tokenizer(vocab_size=512, model_max_length=POSITIONS)
    cfg = gpt2_config(
        vocab_size=vocab,
        n_layer=shape.n_layer,
        n_embd=shape.n_embd,
        n_head=shape.n_head,
        n_positions=POSITIONS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **({"num_labels": 1} if role == "reward" else {}),
    )
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(cfg) if role == "reward" else GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    marker.write_text(json.dumps(meta))
    return path


@dataclass
class Group:
    """One prompt and its k completions, as text (Score) and as token ids (ReferenceLogProbs)."""

    prompt: str
    completions: list[str]
    prompt_ids: list[int]
    completion_ids: list[list[int]]

    @property
    def unshared_tokens(self) -> int:
        return sum(len(self.prompt_ids) + len(c) for c in self.completion_ids)

    @property
    def shared_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(c) for c in self.completion_ids)


def make_groups(
    n: int, prompt_len: int, k: int, lo: int, hi: int, seed: int, vocab: int
) -> list[Group]:
    """`n` groups; every benchmark word is one token, so a text of n words is n tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_len))
        lens = [rng.randint(lo, hi) for _ in range(k)]
        comps = [" " + " ".join(rng.choice(WORDS) for _ in range(c)) for c in lens]
        out.append(
            Group(
                prompt,
                comps,
                [rng.randrange(3, vocab) for _ in range(prompt_len)],
                [[rng.randrange(3, vocab) for _ in range(c)] for c in lens],
            )
        )
    return out


def requests_of(groups: list[Group], rpc: str, per_request: int) -> list[tuple[bytes, int, int]]:
    """(serialised request, items, unshared tokens) of `per_request` whole groups each."""
    out = []
    for a in range(0, len(groups), per_request):
        part = groups[a : a + per_request]
        if rpc == "score":
            pairs = [(g.prompt, c) for g in part for c in g.completions]
            msg = pb.ScoreRequest(items=score_items(pairs))
        else:
            seqs = [
                pb.TokenSequence(token_ids=g.prompt_ids + c, response_start=len(g.prompt_ids))
                for g in part
                for c in g.completion_ids
            ]
            msg = pb.ReferenceLogProbsRequest(sequences=seqs)
        items = sum(len(g.completions) for g in part)
        out.append((msg.SerializeToString(), items, sum(g.unshared_tokens for g in part)))
    return out


def wire_cost(groups: list[Group], rpc: str, per_request: int, repeats: int = 20) -> dict:
    """What sending each group's prompt once would save on the wire: bytes per request and the
    server's parse time (protobuf `FromString`, microseconds per request) of the requests as
    sent (the prompt in every item) against the same requests with the prompt left out of all
    but each group's first item (the size of an explicit grouped form)."""
    sent = [r for r, _, _ in requests_of(groups, rpc, per_request)]
    once = []
    for a in range(0, len(groups), per_request):
        part = groups[a : a + per_request]
        if rpc == "score":
            pairs = [
                (g.prompt if i == 0 else "", c) for g in part for i, c in enumerate(g.completions)
            ]
            msg = pb.ScoreRequest(items=score_items(pairs))
        else:
            msg = pb.ReferenceLogProbsRequest(
                sequences=[
                    pb.TokenSequence(token_ids=(g.prompt_ids if i == 0 else []) + c)
                    for g in part
                    for i, c in enumerate(g.completion_ids)
                ]
            )
        once.append(msg.SerializeToString())
    cls = pb.ScoreRequest if rpc == "score" else pb.ReferenceLogProbsRequest

    def parse_us(reqs: list[bytes]) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for r in reqs:
                cls.FromString(r)
            best = min(best, time.perf_counter() - t)
        return 1e6 * best / len(reqs)

    return {
        "wire_bytes": round(statistics.mean(len(r) for r in sent)),
        "wire_bytes_prompt_once": round(statistics.mean(len(r) for r in once)),
        "parse_us": round(parse_us(sent), 1),
        "parse_us_prompt_once": round(parse_us(once), 1),
    }


@dataclass
class Load:
    """Fixed work: every request answered once; throughput over the makespan."""

    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


async def _run_load(
    address: str, method: str, reqs: list[tuple[bytes, int, int]], clients: int
) -> Load:
    """`clients` closed-loop clients share the requests `reqs` (each sent once) and the makespan
    is measured: unbiased when a request takes as long as a fixed window would last."""
    import grpc

    opts = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=opts) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.unary_unary(method)
        res = Load()
        todo = list(reqs)

        async def client() -> None:
            while todo:
                data, _, toks = todo.pop()
                t0 = time.perf_counter()
                try:
                    await call(data, timeout=900)
                except grpc.aio.AioRpcError:
                    res.errors += 1
                    continue
                res.requests += 1
                res.tokens += toks
                res.latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        res.seconds = time.perf_counter() - t0
    return res


def inprocess(runner, rpc: str, groups: list[Group], repeats: int) -> dict:
    """Unshared tokens per second of the runner's shared and plain forwards, one group a call."""
    from reward_server.models.reference import RefSequence
    from reward_server.models.reward import ScoreInput

    batches = []
    for g in groups[:2]:
        if rpc == "score":
            batches.append(runner.encode([ScoreInput(g.prompt, c) for c in g.completions], "error"))
        else:
            p = len(g.prompt_ids)
            batches.append([RefSequence(g.prompt_ids + c, p) for c in g.completion_ids])
    toks = sum(g.unshared_tokens for g in groups[:2])
    out = {}
    for label, fn in (("shared", runner._forward), ("plain", runner._forward_plain)):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            best = min(best, time.perf_counter() - t0)
        out[label] = toks / best
    return out


def run(a: argparse.Namespace) -> None:
    import torch

    from reward_server.models.reference import ReferenceRunner
    from reward_server.models.reward import RewardRunner

    lo, _, hi = a.completion.partition("..")
    lo_i, hi_i = int(lo), int(hi or lo)
    encoder = a.rm_family == "bert"
    if encoder and a.rpcs != "score":
        raise SystemExit("--rm-family bert measures Score only: pass --rpcs score")
    rm = (
        build_encoder(a.kind, a.models_dir)
        if encoder
        else build_model(a.kind, "reward", a.models_dir)
    )
    ref = build_model(a.kind, "reference", a.models_dir)
    log_dir = a.out / "groups-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    common = [f"--reward-model=rm={rm}", f"--reference-model=ref={ref}", *a.serve_arg]
    servers = {
        "unshared": start_reward_server("unshared", [*common, "--no-prefix-sharing"], log_dir),
        "shared": start_reward_server("shared", common, log_dir),
    }
    runners = {}
    if a.inprocess_repeats:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        runners = {
            "score": RewardRunner("rm", str(rm), device="cpu", dtype=torch.float32),
            "ref": ReferenceRunner("ref", str(ref), device="cpu", dtype=torch.float32),
        }
    configs = [
        (rpc, int(p), int(k))
        for rpc in a.rpcs.split(",")
        for p in a.prompts.split(",")
        for k in a.ks.split(",")
    ]
    rows = []
    try:
        for rpc, plen, k in tqdm(configs, desc="groups"):
            n_groups = a.rounds * a.clients * a.groups_per_request
            groups = make_groups(n_groups, plen, k, lo_i, hi_i, seed=plen * 100 + k, vocab=512)
            reqs = requests_of(groups, rpc, a.groups_per_request)
            ideal = sum(g.unshared_tokens for g in groups) / sum(g.shared_tokens for g in groups)
            ideal = 1.0 if encoder else ideal  # an encoder's prefix depends on what follows it
            row: dict = {"rpc": rpc, "prompt": plen, "k": k, "ideal_ratio": round(ideal, 2)}
            each: dict[str, list[dict]] = {"unshared": [], "shared": []}
            for rep in range(a.repeats):  # the two servers alternate which goes first
                order = ("unshared", "shared") if rep % 2 == 0 else ("shared", "unshared")
                for label in order:
                    meter = machine.LoadMeter([servers[label].proc.pid])
                    res = asyncio.run(
                        _run_load(servers[label].address, METHODS[rpc], reqs, a.clients)
                    )
                    each[label].append(
                        {
                            "tok_s": res.tokens / res.seconds,
                            "p50_ms": 1e3 * statistics.median(res.latencies)
                            if res.latencies
                            else float("nan"),
                            "errors": res.errors,
                            "others_cores": meter.stop().others_cores,
                        }
                    )
            for label, runs in each.items():
                row[f"{label}_tok_s"] = round(statistics.median(r["tok_s"] for r in runs), 1)
                row[f"{label}_p50_ms"] = round(statistics.median(r["p50_ms"] for r in runs), 1)
                row[f"{label}_errors"] = sum(r["errors"] for r in runs)
                row[f"{label}_others_cores"] = round(max(r["others_cores"] for r in runs), 2)
            ratios = [
                s["tok_s"] / max(1e-9, u["tok_s"])
                for s, u in zip(each["shared"], each["unshared"], strict=True)
            ]
            row["ratio"] = round(statistics.median(ratios), 2)
            row["ratio_each"] = [round(r, 2) for r in ratios]
            row.update(wire_cost(groups, rpc, a.groups_per_request))
            if runners:
                lim = inprocess(runners[rpc], rpc, groups, a.inprocess_repeats)
                row["inproc_shared_tok_s"] = round(lim["shared"], 1)
                row["inproc_plain_tok_s"] = round(lim["plain"], 1)
                row["inproc_ratio"] = round(lim["shared"] / lim["plain"], 2)
            rows.append(row)
            tqdm.write(json.dumps(row))
    finally:
        for s in servers.values():
            s.stop()
    result = {"command": "groups", "args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}
    result["machine"] = machine.describe()
    path = a.out / f"groups-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(_table(rows))
    print(f"wrote {path}")


def _table(rows: list[dict]) -> str:
    head = (
        "| RPC | prompt | k | unshared tok/s | shared tok/s | ratio | ideal | "
        "in-process shared / plain tok/s (ratio) |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        inproc = (
            f"{r['inproc_shared_tok_s']:.0f} / {r['inproc_plain_tok_s']:.0f} ({r['inproc_ratio']}x)"
            if "inproc_ratio" in r
            else "-"
        )
        lines.append(
            f"| {r['rpc']} | {r['prompt']} | {r['k']} | {r['unshared_tok_s']:.0f} | "
            f"{r['shared_tok_s']:.0f} | {r['ratio']}x {tuple(r['ratio_each'])} | "
            f"{r['ideal_ratio']}x | {inproc} |"
        )
    return "\n".join(lines)
