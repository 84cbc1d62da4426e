"""`reward-server` command line: serve, score, health, info, train, export-onnx."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from reward_server.config import ConfigError, ServerConfig, parse_named


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve reward and reference models over gRPC")
    p.add_argument(
        "--config",
        help="YAML file with the same keys as these flags (underscored); flags override it",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument(
        "--reward-model",
        action="append",
        metavar="[NAME=]PATH",
        help="reward model directory or hub id (repeatable)",
    )
    p.add_argument(
        "--reference-model",
        action="append",
        metavar="[NAME=]PATH",
        help="reference (causal LM) model (repeatable)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=PATH",
        help="PEFT adapter for a model, merged at load",
    )
    p.add_argument(
        "--combination",
        action="append",
        metavar="NAME=RULE",
        help="combine reward models, e.g. overall=weighted:helpful=1,safe=0.5",
    )
    p.add_argument(
        "--head-combine",
        action="append",
        metavar="NAME=RULE",
        help="how a multi-head model's score comes from its heads, e.g. rm=min",
    )
    p.add_argument(
        "--default-reward-model", help="model for Score requests with an empty model name"
    )
    p.add_argument(
        "--default-reference-model",
        help="model for ReferenceLogProbs requests with an empty model name",
    )
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", help="auto (default), float32, bfloat16 or float16")
    p.add_argument("--quantization", help="none (default), 8bit or 4bit (bitsandbytes)")
    p.add_argument("--backend", help="torch (default) or onnx")
    _bool_flag(
        p, "--trust-remote-code", "run model code shipped with a checkpoint (off by default)"
    )
    p.add_argument(
        "--max-batch-tokens", type=int, help="padded-token budget per batch (0 = device default)"
    )
    p.add_argument("--max-batch-items", type=int, help="most items per forward")
    p.add_argument("--max-wait-ms", type=float, help="longest wait for a fuller batch")
    _bool_flag(
        p,
        "--skip-wait-when-idle",
        "no max-wait while nearly every recent request found the model idle (default on)",
    )
    p.add_argument(
        "--forward-streams", type=int, help="forwards run at once per device (default 1)"
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        help="torch/onnxruntime threads per forward (0 = default: cores / streams on CPU)",
    )
    p.add_argument(
        "--batch-overhead-tokens",
        type=float,
        help="a forward's fixed cost in tokens (-1 = measured at warm-up; 1e9 = fill the budget)",
    )
    p.add_argument(
        "--max-queue-items", type=int, help="queued items per model before RESOURCE_EXHAUSTED"
    )
    p.add_argument("--max-items-per-request", type=int, help="most items per request")
    p.add_argument(
        "--max-input-tokens", type=int, help="longest input in tokens (0 = the model's maximum)"
    )
    p.add_argument(
        "--truncation", help="default for over-long inputs: error (default), left or right"
    )
    p.add_argument(
        "--logprob-slice-mb",
        type=float,
        help="memory budget of one logits slice in ReferenceLogProbs",
    )
    p.add_argument("--tokenizer-threads", type=int, help="tokenisation threads")
    p.add_argument(
        "--inline-tokenize-chars",
        type=int,
        help="tokenise Score requests up to this many characters on the event loop (0 = never)",
    )
    _bool_flag(p, "--warmup", "run a largest-batch forward per model before SERVING (default on)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (0 = off)")
    p.add_argument("--grace-seconds", type=float, help="drain time on SIGTERM")
    p.add_argument("--max-message-mb", type=int, help="largest gRPC message in MiB")
    p.add_argument(
        "--max-connection-age-s",
        type=float,
        help="close connections after this age so clients re-resolve DNS",
    )
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA for client certificates: requires them (mutual TLS)")
    p.add_argument(
        "--auth-token-file",
        help="accepted bearer tokens, one per line (env RLHF_AUTH_TOKENS adds more)",
    )
    _bool_flag(p, "--open-health", "health service answers without credentials (for probes)")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")
    p.add_argument("--log-format", help="text (default) or json")
    p.set_defaults(func=cmd_serve)


def _named_pairs(values: list[str] | None, flag: str) -> dict[str, str] | None:
    if not values:
        return None
    out = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"{flag}: expected NAME=VALUE, got {v!r}")
        out[name] = rest
    return out


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """ServerConfig from --config and flags (flags win)."""
    skip = {
        "config",
        "func",
        "command",
        "reward_model",
        "reference_model",
        "adapter",
        "combination",
        "head_combine",
    }
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    overrides["reward_models"] = parse_named(args.reward_model, "--reward-model", "reward")
    overrides["reference_models"] = parse_named(
        args.reference_model, "--reference-model", "reference"
    )
    overrides["adapters"] = _named_pairs(args.adapter, "--adapter")
    overrides["combinations"] = _named_pairs(args.combination, "--combination")
    overrides["head_combine"] = _named_pairs(args.head_combine, "--head-combine")
    return ServerConfig.from_sources(args.config, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from reward_server.logging_setup import setup_logging
    from reward_server.models.loading import ModelLoadError
    from reward_server.server import serve

    cfg = config_from_args(args)
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        return asyncio.run(serve(cfg))
    except (ModelLoadError, ValueError, OSError) as exc:
        logging.getLogger("reward_server").error("cannot start: %s", exc)
        return 2


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default="127.0.0.1:50051",
        help="address(es): host:port[,host:port] or dns:///name:port",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="deadline per call in seconds (retries included)",
    )
    p.add_argument("--tls-ca", help="CA bundle to verify the server (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate for mutual TLS")
    p.add_argument("--tls-key", help="client key for mutual TLS")
    p.add_argument("--token", help="bearer token (default: env RLHF_AUTH_TOKEN)")


def _client(args: argparse.Namespace) -> Any:
    from reward_server.client import RewardClient

    return RewardClient(
        args.server,
        timeout=args.timeout,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=args.token,
    )


def add_client_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "score", help="score a JSONL file of prompt/completion (or messages) over RPC"
    )
    _add_client_flags(p)
    p.add_argument(
        "--input", required=True, help='JSONL: {"prompt","completion"} or {"messages"} per line'
    )
    p.add_argument("--output", required=True, help="JSONL written in input order")
    p.add_argument("--model", default="", help="reward model name (default: the server's default)")
    p.add_argument("--batch-size", type=int, default=64, help="items per request")
    p.set_defaults(func=cmd_score)
    h = sub.add_parser("health", help="exit 0 when the server's gRPC health service says SERVING")
    _add_client_flags(h)
    h.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    h.set_defaults(func=cmd_health)
    i = sub.add_parser("info", help="print GetServerInfo as JSON")
    _add_client_flags(i)
    i.set_defaults(func=cmd_info)


def cmd_score(args: argparse.Namespace) -> int:
    from reward_server.scoring_file import score_file

    with _client(args) as client:
        n = score_file(
            client, args.input, args.output, model=args.model, batch_size=args.batch_size
        )
    print(f"scored {n} items -> {args.output}", file=sys.stderr)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        print(json.dumps(MessageToDict(client.server_info()), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (tests check deploy manifests against it)."""
    parser = argparse.ArgumentParser(prog="reward-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_client_parsers(sub)
    try:
        from reward_server.training.cli import add_train_parser
    except ImportError:  # pragma: no cover - training extras missing
        pass
    else:
        add_train_parser(sub)
    try:
        from reward_server.onnx_export import add_export_parser
    except ImportError:
        pass
    else:
        add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `reward-server` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"reward-server {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from reward_server.client import RewardServiceError

        if isinstance(exc, RewardServiceError):
            print(f"reward-server {args.command}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
