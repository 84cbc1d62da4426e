"""Shared-prefix forwards: the k samples of one prompt run their common prefix once.

RLOO, GRPO and best-of-n send k completions of one prompt; the prompt is usually much longer than
a completion. For a decoder (causal attention), the hidden states of a prefix do not depend on
what follows it, so the prefix can run once with a key/value cache and each continuation runs
against that cache: the same numbers as the whole sequences up to float rounding (tested within
1e-4 in float32: tests/integration/test_prefix_sharing.py).

The shared prefix is what the tokenised sequences actually share (the longest common run of
leading token ids), never the text prompt: a tokenizer that merges tokens across the
prompt/completion boundary simply gives a shorter shared prefix.

Two passes per batch:
1. prefix pass: the unique prefixes, right-padded, ``use_cache=True``;
2. continuation pass, packed (`pack_rows`, `run_packed`): the members of a group side by side in
   rows (no padding between them) against a copy of their group's cache per row, under a
   block-diagonal causal 4D mask, ``position_ids = prefix_len + offset``. A model whose attention
   does not take a custom 4D mask (it fails the runners' load-time check) runs the padded form
   instead (`chunk_members`, `run_continuations`): every member right-padded to the longest,
   against its own copy of the cache, the prefix's mask followed by the continuation's.

Memory: the gathered cache of one continuation chunk holds
``2 x layers x rows x (longest_prefix + longest_row) x kv_width`` elements (packed; per member
instead of per row when padded); chunks are sized so that this stays under the runner's cache
budget (``prefix_cache_mb``), so a large group is split into several continuation chunks, never
failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MIN_SHARED_TOKENS = 16
"""Shortest shared prefix worth a second pass: below it the extra forward's fixed cost outweighs
the tokens saved (measured in docs/BENCHMARKS.md, "Prefix sharing")."""
MIN_SAVED_TOKENS = 32
"""Fewest tokens a group must save (``(members - 1) x prefix``): two samples sharing 16 tokens
ran slower shared than plain in the same measurement."""


SharingObserver = Callable[[str, Sequence["Group"]], None]
"""Told the model name and the shared groups of each batch that took the shared path."""


@dataclass
class Group:
    """Batch indices that share their first `prefix_len` tokens (prefix_len 0: not shared)."""

    members: list[int]
    prefix_len: int


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common leading run of two id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_groups(
    seqs: Sequence[Sequence[int]],
    limits: Sequence[int] | None = None,
    min_shared: int = MIN_SHARED_TOKENS,
    min_saved: int = MIN_SAVED_TOKENS,
) -> list[Group]:
    """Partition the items into groups with a shared prefix (every item in exactly one group).

    Pure function (unit-tested). Items are sorted by their ids, so items sharing leading tokens
    are adjacent, and the sorted run is cut into contiguous groups that save the most prefix
    tokens (``(members - 1) x prefix_len`` per group; dynamic programming over the cut points,
    O(n^2) for n items of a batch). A group's prefix is the shortest common prefix of adjacent
    members, at most each member's `limits[i]` (default ``len - 1``: every member keeps at least
    one token of its own, so its last position runs in the continuation pass), and at least
    `min_shared` tokens; a group saves at least `min_saved` tokens, else its items stay alone.
    """
    n = len(seqs)
    if n == 0:
        return []
    if limits is None:
        limits = [len(s) - 1 for s in seqs]
    order = sorted(range(n), key=lambda i: (list(seqs[i]), i))
    # adjacent[k]: tokens order[k-1] and order[k] may share
    adjacent = [0] + [
        min(
            limits[order[k - 1]],
            limits[order[k]],
            common_prefix_len(seqs[order[k - 1]], seqs[order[k]]),
        )
        for k in range(1, n)
    ]
    best = [0] * (n + 1)  # best[j]: most tokens saved by the first j items of the order
    cut = [0] * (n + 1)  # where the last group of that best partition starts
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], j - 1  # item j-1 alone
        shared = limits[order[j - 1]]
        for i in range(j - 2, -1, -1):  # group order[i:j]
            shared = min(shared, adjacent[i + 1])
            if shared < min_shared:
                break
            saved = (j - i - 1) * shared
            if saved >= min_saved and best[i] + saved > best[j]:
                best[j], cut[j] = best[i] + saved, i
    groups: list[Group] = []
    j = n
    while j > 0:
        i = cut[j]
        members = order[i:j]
        prefix = min(adjacent[k] for k in range(i + 1, j)) if len(members) > 1 else 0
        groups.append(Group(members, prefix))
        j = i
    groups.reverse()
    return groups


def batch_lengths(seqs: Sequence[Sequence[int]], limits: Sequence[int] | None = None) -> list[int]:
    """The token cost of each item for the batcher's budget: its length, or for a member of a
    group of k with prefix p and longest continuation c, ``c + ceil(p / k)`` (the group's prefix
    counted once: k such members cost ``k x c + p``, what the shared forward runs). Members of a
    group get equal costs, so the batcher's length order keeps them together."""
    lengths = [len(s) for s in seqs]
    for g in plan_groups(seqs, limits):
        if len(g.members) > 1:
            longest = max(lengths[i] for i in g.members) - g.prefix_len
            cost = longest + -(-g.prefix_len // len(g.members))
            for i in g.members:
                lengths[i] = cost
    return lengths


def split_groups(groups: Sequence[Group]) -> tuple[list[Group], list[int]]:
    """(groups of two or more members, indices of the items in no group)."""
    shared = [g for g in groups if len(g.members) > 1]
    single = [g.members[0] for g in groups if len(g.members) == 1]
    return shared, single


def forward_grouped(
    batch: Sequence[Any],
    groups: Sequence[Group],
    plain: Callable[[Sequence[Any]], list[Any]],
    shared: Callable[[list[Group], list[Any]], bool],
    report: Callable[[list[Group]], None] | None,
) -> list[Any]:
    """One batch's results through the shared path where items group (`plan_groups`), the plain
    forward for the rest; the reward and the reference runners both take it. `shared(groups,
    out)` fills `out` for the groups' members, or returns False (the model's cache cannot be
    shared) and they run plain too; `report(groups)` is told of the groups that shared."""
    multi, single = split_groups(groups)
    if not multi:
        return plain(batch)
    out: list[Any] = [None] * len(batch)

    def run_plain(indices: list[int]) -> None:
        for i, v in zip(indices, plain([batch[i] for i in indices]), strict=True):
            out[i] = v

    if single:
        run_plain(single)
    if not shared(multi, out):
        run_plain([i for g in multi for i in g.members])
    elif report is not None:
        report(multi)
    return out


def probe_ids(vocab: int, pad_id: int, n: int = 24) -> list[int]:
    """`n` token ids of the vocabulary other than the pad id, for the load-time check."""
    ids = [t for t in range(min(vocab, 64)) if t != pad_id]
    return [ids[(i * 7) % len(ids)] for i in range(n)]


def distinct_heads(n: int, vocab: int, avoid: int) -> list[list[int]]:
    """`n` different two-token starts from the first 64 ids of the vocabulary other than
    `avoid` (the pad id): warm-up items that share no prefix, so warm-up and the fixed-cost
    measurement run the plain forward."""
    ids = [t for t in range(min(vocab, 65)) if t != avoid] or [0]
    m = len(ids)
    return [[ids[r % m], ids[(r // m) % m]] for r in range(n)]


def sharing_agrees(
    plain: Callable[[list[Any]], list[Any]],
    shared: Callable[[list[Any]], list[Any]],
    items: list[Any],
    dtype: str,
) -> bool:
    """Whether the shared path gives the plain path's numbers on `items` (which share a
    prefix): the load-time check that catches a model the signature test let through (a
    bidirectional one, a cache it fills differently). Any error counts as disagreement."""
    import numpy as np

    tol = 1e-3 if dtype == "float32" else 5e-2
    try:
        a, b = plain(items), shared(items)
        return all(
            np.allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)
            for x, y in zip(a, b, strict=True)
        )
    except Exception as exc:  # noqa: BLE001 - any failure: take the normal path
        log.info("shared-prefix path failed its check: %s", exc)
        return False


def tokens_saved(groups: Sequence[Group]) -> int:
    """Prefix tokens not recomputed: ``(members - 1) x prefix_len`` summed over the groups."""
    return sum((len(g.members) - 1) * g.prefix_len for g in groups)


def cache_argument(model: Any) -> str | None:
    """The name under which `model`'s forward takes a key/value cache (``cache`` in
    transformers 5, ``past_key_values`` before), or None when the model may not take the shared
    path: bidirectional encoders (BERT, DeBERTa, ...) and encoder-decoders take the normal path;
    the runners then confirm the shared path on real numbers at load (`equivalent`)."""
    import inspect

    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return None
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        if cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # bidirectional encoders
            return None
    except ImportError:  # pragma: no cover - other transformers layouts
        pass
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def output_cache(out: Any) -> Any:
    """The cache a forward returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    if "cache" in out:
        return out["cache"]
    return out.get("past_key_values")


def plain_layers(cache: Any) -> list[tuple[Any, Any]] | None:
    """Per-layer (keys, values) [G, heads, P, d] of a cache made only of full-attention dynamic
    layers; None for any other cache (sliding windows, linear attention, quantized), which then
    takes the normal path."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache:
        return None
    out = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            return None
        out.append((layer.keys, layer.values))
    return out or None


@dataclass
class PrefixPass:
    """What the prefix pass leaves for the continuations."""

    layers: list[tuple[Any, Any]]  # per layer (keys, values) [G, heads, P, d]
    mask: Any  # [G, P] int64: 1 on each prefix's real tokens
    output: Any  # the model's output of the prefix pass (hidden states or logits)


def run_prefix(
    call: Callable[..., Any],
    groups: Sequence[Group],
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    device: str,
) -> PrefixPass | None:
    """Run the unique prefixes of `groups` (right-padded) with a cache; None when the model's
    cache is not one the shared path can gather (the caller then runs the normal path)."""
    import torch

    width = max(g.prefix_len for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)  # [G, P]
    mask = torch.zeros((len(groups), width), dtype=torch.long)  # [G, P]
    for r, g in enumerate(groups):
        p = g.prefix_len
        ids[r, :p] = torch.tensor(list(seqs[g.members[0]][:p]))
        mask[r, :p] = 1
    pos = torch.arange(width).expand(len(groups), width)  # [G, P]
    out = call(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=pos.to(device),
        use_cache=True,
    )
    layers = plain_layers(output_cache(out))
    if layers is None:
        return None
    return PrefixPass(layers, mask.to(device), out)


def chunk_members(
    groups: Sequence[Group], pre: PrefixPass, cache_bytes: int
) -> list[list[tuple[int, int]]]:
    """(group row, batch index) of every member, in chunks whose gathered cache stays within
    `cache_bytes` (at least one member per chunk)."""
    per_item = sum(k[0].numel() * k.element_size() * 2 for k, _ in pre.layers)
    size = max(1, int(cache_bytes // max(1, per_item)))
    members = [(r, i) for r, g in enumerate(groups) for i in g.members]
    return [members[a : a + size] for a in range(0, len(members), size)]


def run_continuations(
    call: Callable[..., Any],
    chunk: Sequence[tuple[int, int]],
    groups: Sequence[Group],
    pre: PrefixPass,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    device: str,
    cache_arg: str = "cache",
) -> tuple[Any, Any]:
    """Run one chunk of continuations against the gathered prefix cache; returns the model's
    output and the continuation ids [B, C] (right-padded with `pad_id`)."""
    import torch
    from transformers.cache_utils import DynamicCache

    conts = [list(seqs[i][groups[r].prefix_len :]) for r, i in chunk]
    width = max(len(c) for c in conts)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, C]
    cmask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, C]
    pos = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, C]
    for b, ((r, _), c) in enumerate(zip(chunk, conts, strict=True)):
        ids[b, : len(c)] = torch.tensor(c)
        cmask[b, : len(c)] = 1
        # positions continue the prefix; padding repeats the last one (masked anyway)
        pos[b] = (groups[r].prefix_len + torch.arange(width)).clamp(
            max=groups[r].prefix_len + len(c) - 1
        )
    rows = torch.tensor([r for r, _ in chunk], device=pre.mask.device)  # [B]
    cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in pre.layers])
    mask = torch.cat([pre.mask[rows], cmask.to(device)], dim=1)  # [B, P + C]
    ids = ids.to(device)
    out = call(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos.to(device),
        use_cache=True,
        **{cache_arg: cache},
    )
    return out, ids


PACK_ROW_TOKENS = 256
"""Most continuation tokens packed into one row of the packed continuation pass (a larger group
is spread over several rows of about equal length). Packing removes the padding of continuations
to the longest and the per-member copies of the prefix cache; the price is attention computed over
the whole row and masked (block-diagonal), which grows with the row's length squared, so rows stay
short next to a forward's matrix work (measured in docs/BENCHMARKS.md, "Prefix sharing")."""


@dataclass
class PackedRow:
    """Members of one group whose continuations run side by side in one row of the packed pass."""

    group: int  # the group's row in the prefix pass
    members: list[int]  # batch indices
    starts: list[int]  # each member's first offset in the row
    lengths: list[int]  # each member's continuation length

    @property
    def width(self) -> int:
        return self.starts[-1] + self.lengths[-1]


def pack_rows(
    groups: Sequence[Group], seqs: Sequence[Sequence[int]], max_tokens: int = PACK_ROW_TOKENS
) -> list[PackedRow]:
    """Rows of the packed continuation pass: each group's members in order, a row closed before
    a member that would take it past `max_tokens` (a member is never split: one longer than
    `max_tokens` has a row of its own)."""
    rows: list[PackedRow] = []
    for r, g in enumerate(groups):
        row = PackedRow(r, [], [], [])
        for i in g.members:
            c = len(seqs[i]) - g.prefix_len
            if row.members and row.width + c > max_tokens:
                rows.append(row)
                row = PackedRow(r, [], [], [])
            row.starts.append(row.width if row.members else 0)
            row.members.append(i)
            row.lengths.append(c)
        rows.append(row)
    return rows


def chunk_rows(
    rows: Sequence[PackedRow], pre: PrefixPass, cache_bytes: int
) -> list[list[PackedRow]]:
    """Rows in chunks whose key/value cache (the prefix gathered per row, grown by the row)
    stays within `cache_bytes` (at least one row per chunk)."""
    per_token = sum(k[0, :, :1].numel() * k.element_size() * 2 for k, _ in pre.layers)
    width = pre.mask.shape[1]
    chunks: list[list[PackedRow]] = []
    cur: list[PackedRow] = []
    longest = 0
    for row in rows:
        longest2 = max(longest, row.width)
        if cur and (len(cur) + 1) * (width + longest2) * per_token > cache_bytes:
            chunks.append(cur)
            cur, longest2 = [], row.width
        cur.append(row)
        longest = longest2
    if cur:
        chunks.append(cur)
    return chunks


def run_packed(
    call: Callable[..., Any],
    rows: Sequence[PackedRow],
    groups: Sequence[Group],
    pre: PrefixPass,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    device: str,
    cache_arg: str = "cache",
) -> Any:
    """Run the continuations of `rows` against their groups' prefix caches, the members of a row
    packed one after another (no padding between them) under a block-diagonal causal mask: each
    token attends to its group's prefix and to the earlier tokens of its own continuation only,
    at positions ``prefix_len + offset`` (a custom 4D additive mask, which transformers passes to
    the attention as given: masking_utils, "If the mask is already 4D, simply return as-is").
    Returns the model's output; row b's member m is at ``[b, starts[m]:starts[m]+lengths[m]]``."""
    import torch
    from transformers.cache_utils import DynamicCache

    width = max(r.width for r in rows)
    n, p_all = len(rows), pre.mask.shape[1]
    ids = torch.full((n, width), pad_id, dtype=torch.long)  # [R, L]
    pos = torch.zeros((n, width), dtype=torch.long)  # [R, L]
    allowed = torch.zeros((n, 1, width, p_all + width), dtype=torch.bool)  # [R, 1, L, P + L]
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # [L, L]
    group_rows = torch.tensor([r.group for r in rows], device=pre.mask.device)  # [R]
    allowed[:, 0, :, :p_all] = pre.mask[group_rows].bool().cpu()[:, None, :]
    for b, row in enumerate(rows):
        p = groups[row.group].prefix_len
        for i, s, c in zip(row.members, row.starts, row.lengths, strict=True):
            ids[b, s : s + c] = torch.tensor(list(seqs[i][p:]))
            pos[b, s : s + c] = torch.arange(p, p + c)
            allowed[b, 0, s : s + c, p_all + s : p_all + s + c] = causal[:c, :c]
    dtype = pre.layers[0][0].dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    cache = DynamicCache(ddp_cache_data=[(k[group_rows], v[group_rows]) for k, v in pre.layers])
    return call(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=pos.to(device),
        use_cache=True,
        **{cache_arg: cache},
    )


def packed_head(model: Any) -> Any:
    """The classification head of a decoder sequence classifier that maps each position's hidden
    state on its own (a linear ``score``, as GPT-2's, Llama's and the generic
    ``*ForSequenceClassification`` are: ``logits = score(hidden)``, then pooled at the last
    non-pad token), which the packed pass applies to the picked positions; None otherwise (the
    padded continuation pass runs the whole model instead)."""
    import torch

    head = getattr(model, "score", None)
    return head if isinstance(head, torch.nn.Linear) else None
