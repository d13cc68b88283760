"""The ``vllm-llmd`` console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _make_test_model(args: argparse.Namespace) -> int:
    from vllm_llmd.testing.model import make_test_model

    path = make_test_model(args.dir, shape=args.shape, seed=args.seed)
    print(path)
    return 0


def _router(args: argparse.Namespace) -> int:
    from vllm_llmd.router.config import ConfigError, RouterConfig, load_config, parse_worker_flag
    from vllm_llmd.router.scheduling import PluginError
    from vllm_llmd.router.server import build_router, run

    try:
        cfg = load_config(args.config) if args.config else RouterConfig()
        updates: dict[str, object] = {}
        if args.host is not None:
            updates["host"] = args.host
        if args.port is not None:
            updates["port"] = args.port
        if args.worker:
            updates["pods"] = [*cfg.pods, *(parse_worker_flag(w) for w in args.worker)]
        if args.model:
            updates["models"] = list(args.model)
        if args.log_level is not None:
            updates["log_level"] = args.log_level
        if args.max_body_bytes is not None:
            updates["max_body_bytes"] = args.max_body_bytes
        cfg = cfg.model_copy(update=updates)
        tok = cfg.tokenizer.model_copy(update={"path": args.tokenizer}) if args.tokenizer else cfg.tokenizer
        index = cfg.index.model_copy(update={"block_size": args.block_size}) if args.block_size else cfg.index
        cfg = RouterConfig.model_validate(
            {**cfg.model_dump(), "tokenizer": tok.model_dump(), "index": index.model_dump()}
        )
        ids = [p.pod_id for p in cfg.pods]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate pods: {ids}")
        if args.check:
            build_router(cfg)
            print(f"config OK: {len(cfg.pods)} pods, scorers {[s.type for s in cfg.profile.scorers]}")
            return 0
    except (ConfigError, PluginError) as e:
        print(f"vllm-llmd router: {e}", file=sys.stderr)
        return 2
    return run(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-llmd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-test-model", help="write a small random-weight model with a local tokenizer")
    p.add_argument("dir", help="output directory")
    p.add_argument("--shape", default="tiny", choices=["tiny", "small", "wide"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_test_model)

    r = sub.add_parser("router", help="run the KV-cache- and load-aware OpenAI-compatible router")
    r.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    r.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    r.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="URL[=EVENTS[,REPLAY]]",
        help="a vLLM pod, e.g. http://127.0.0.1:8001=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558 (repeatable)",
    )
    r.add_argument("--config", default=None, help="YAML file with pods and the scheduling profile")
    r.add_argument("--tokenizer", default=None, help="model directory holding tokenizer.json (precise scoring)")
    r.add_argument("--model", action="append", default=[], help="served model name (repeatable)")
    r.add_argument("--block-size", type=int, default=None, help="router block size in tokens (default 64)")
    r.add_argument("--max-body-bytes", type=int, default=None, help="largest accepted request body")
    r.add_argument("--log-level", default=None, type=str.lower, choices=["debug", "info", "warning", "error"])
    r.add_argument("--check", action="store_true", help="validate the configuration and exit")
    r.set_defaults(func=_router)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
