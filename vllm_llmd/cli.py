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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-llmd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-test-model", help="write a small random-weight model with a local tokenizer")
    p.add_argument("dir", help="output directory")
    p.add_argument("--shape", default="tiny", choices=["tiny", "small", "wide"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_test_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
