"""`reward-server` command line: serve, score, health, info, reload, train, export-onnx."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from reward_server.config import ServerConfig, parse_named
from reward_server.config_base import (
    PRECEDENCE_NOTE,
    ConfigError,
    add_config_file_flag,
    add_config_flags,
    flag_overrides,
    load_config,
)

NAMED_FLAGS: dict[str, tuple[str, str | None, str, str]] = {
    "reward_models": (
        "--reward-model",
        "reward",
        "[NAME=]PATH",
        "reward model directory or hub id",
    ),
    "reference_models": (
        "--reference-model",
        "reference",
        "[NAME=]PATH",
        "reference (causal LM) model directory or hub id",
    ),
    "adapters": ("--adapter", None, "NAME=PATH", "PEFT adapter for a model, merged at load"),
    "combinations": (
        "--combination",
        None,
        "NAME=RULE",
        "combine reward models, e.g. overall=weighted:helpful=1,safe=0.5",
    ),
    "head_combine": (
        "--head-combine",
        None,
        "NAME=RULE",
        "how a multi-head model's score comes from its heads, e.g. rm=min",
    ),
    "input_formats": (
        "--input-format",
        None,
        "NAME=FORMAT",
        "how a reward model reads a prompt/completion pair: auto, text, pair or chat",
    ),
    "tenant_shares": (
        "--tenant-share",
        None,
        "NAME=WEIGHT",
        "a tenant's share of the batcher (fair scheduling; unlisted tenants weigh 1)",
    ),
    "tenant_quotas": (
        "--tenant-quota",
        None,
        "NAME=N",
        "a tenant's queued-item quota per model (overrides --tenant-max-queued-items)",
    ),
}
"""The mapping fields of ServerConfig, set by repeated hand-written flags:
key -> (flag, name of a bare value or None when NAME= is required, metavar, help)."""


def add_serve_parser(sub: Any) -> None:
    """Add ``serve``: ``--config``, the repeated model flags, then one flag per ServerConfig key."""
    p = sub.add_parser(
        "serve",
        help="serve reward and reference models over gRPC",
        description="Serve reward and reference models over gRPC. " + PRECEDENCE_NOTE,
    )
    add_config_file_flag(p)
    for flag, _, metavar, text in NAMED_FLAGS.values():
        p.add_argument(flag, action="append", metavar=metavar, help=f"{text} (repeatable)")
    add_config_flags(p, ServerConfig, skip=tuple(NAMED_FLAGS))
    p.set_defaults(func=cmd_serve)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """ServerConfig from --config and flags (defaults < file < flags)."""
    overrides = flag_overrides(args)
    for key, (flag, bare_name, _, _) in NAMED_FLAGS.items():
        named = parse_named(getattr(args, flag[2:].replace("-", "_")), flag, bare_name)
        if named:
            overrides[key] = named
    return load_config(ServerConfig, args.config, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from reward_server.models.loading import ModelLoadError
    from reward_server.serve.logging_setup import setup_logging
    from reward_server.serve.server import serve

    cfg = config_from_args(args)
    setup_logging(cfg.log_level, cfg.log_format)
    from reward_server.engine.calibration import configure_malloc

    configure_malloc()  # before the event loop, gRPC and the worker threads start
    # SIGHUP re-reads the --config file (and the same flags) to reload changed models
    reread = (lambda: config_from_args(args)) if args.config else None
    try:
        return asyncio.run(serve(cfg, reread))
    except (ModelLoadError, ValueError, OSError) as exc:
        logging.getLogger("reward_server").error("cannot start: %s", exc)
        return 2


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default="127.0.0.1:50051",
        help="address(es): host:port[,host:port] or dns:///name:port (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="deadline per call in seconds, retries included (default: %(default)s)",
    )
    p.add_argument("--tls-ca", help="CA bundle to verify the server (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate for mutual TLS")
    p.add_argument("--tls-key", help="client key for mutual TLS")
    p.add_argument("--token", help="bearer token (default: env RLHF_AUTH_TOKEN)")


def _client(args: argparse.Namespace) -> Any:
    from reward_server.client import RewardClient

    options = ("timeout", "tls_ca", "tls_cert", "tls_key", "token")  # flags named as its kwargs
    return RewardClient(args.server, **{key: getattr(args, key) for key in options})


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
    p.add_argument(
        "--batch-size", type=int, default=64, help="items per request (default: %(default)s)"
    )
    p.set_defaults(func=cmd_score)
    h = sub.add_parser("health", help="exit 0 when the server's gRPC health service says SERVING")
    _add_client_flags(h)
    h.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    h.set_defaults(func=cmd_health)
    i = sub.add_parser(
        "info", help="print GetServerInfo as JSON, or with --stats the reward-hacking telemetry"
    )
    _add_client_flags(i)
    i.add_argument(
        "--stats",
        action="store_true",
        help="print GetStats (per model and tenant: score mean/std, drift from the first "
        "window, score-length correlation, member rank correlation) as a table",
    )
    i.add_argument("--json", action="store_true", help="with --stats: print JSON, not a table")
    i.add_argument("--model", default="", help="with --stats: only this model's windows")
    i.add_argument("--tenant", default="", help="with --stats: only this tenant's windows")
    i.set_defaults(func=cmd_info)
    r = sub.add_parser(
        "reload",
        help="AdminService.ReloadModel: load a new version of a served model without downtime",
    )
    _add_client_flags(r)
    r.set_defaults(timeout=600.0)
    r.add_argument("--model", required=True, help="the served reward or reference model")
    r.add_argument(
        "--source", default="", help="new directory or hub id (default: its current source)"
    )
    r.add_argument(
        "--admin-token-file",
        help="file holding the admin token (default: --token, else env RLHF_ADMIN_TOKEN)",
    )
    r.set_defaults(func=cmd_reload)


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
        if not args.stats:
            print(json.dumps(MessageToDict(client.server_info()), indent=2))
            return 0
        resp = client.stats(model=args.model, tenant=args.tenant)
    if args.json:
        print(json.dumps(MessageToDict(resp, always_print_fields_with_no_presence=True), indent=2))
    else:
        print(stats_table(resp))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Call AdminService.ReloadModel and print its answer as JSON (exit 1 on an error)."""
    import os
    from pathlib import Path

    import grpc
    from google.protobuf.json_format import MessageToDict

    from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
    from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
    from reward_server.client.channels import credentials

    token = args.token or os.environ.get("RLHF_ADMIN_TOKEN", "")
    if args.admin_token_file:
        token = Path(args.admin_token_file).read_text().strip().splitlines()[0].strip()
    creds = credentials(args.tls_ca, args.tls_cert, args.tls_key)
    target = args.server.split(",")[0]
    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    with channel:
        try:
            resp = pb_grpc.AdminServiceStub(channel).ReloadModel(
                pb.ReloadModelRequest(model=args.model, source=args.source),
                metadata=[("authorization", f"Bearer {token}")] if token else None,
                timeout=args.timeout,
            )
        except grpc.RpcError as exc:
            print(f"reward-server reload: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(MessageToDict(resp, always_print_fields_with_no_presence=True), indent=2))
    return 0


STATS_COLUMNS = (
    ("model", "model", "s"),
    ("tenant", "tenant", "s"),
    ("items", "window_items", "d"),
    ("total", "total_items", "d"),
    ("mean", "score_mean", ".3f"),
    ("std", "score_std", ".3f"),
    ("drift_sigma", "drift_sigma", "+.2f"),
    ("len_mean", "length_mean", ".1f"),
    ("len_corr", "length_correlation", "+.3f"),
    ("member_rho", "", ".3f"),
)
"""The columns of `stats_table`: (header, ScoreWindowStats field, format)."""


def stats_table(resp: Any) -> str:
    """GetStatsResponse as a text table, one row per (model, tenant) window; member_rho is the
    lowest Spearman correlation between two members of a combination; '-' = undefined."""
    import math

    if not resp.enabled:
        return "telemetry is off on this server (--no-telemetry)"
    rows = [[h for h, _, _ in STATS_COLUMNS]]
    for w in resp.windows:
        row = []
        for _, key, fmt in STATS_COLUMNS:
            if key:
                value = getattr(w, key)
            else:
                rhos = [m.spearman for m in w.member_rank_correlations]
                value = min(rhos) if rhos else math.nan
            bad = isinstance(value, float) and not math.isfinite(value)
            row.append("-" if bad else format(value, fmt))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(STATS_COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i > 1 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    window = f"window: last {resp.window_max_items} items"
    if resp.window_max_seconds:
        window += f" within {resp.window_max_seconds:g} s"
    return "\n".join([*lines, window + f"; tenants tracked: {resp.max_tenants}"])


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
