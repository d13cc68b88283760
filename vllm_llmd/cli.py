"""The ``vllm-llmd`` console script."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _make_test_model(args: argparse.Namespace) -> int:
    try:
        from vllm_llmd.testing.model import make_test_model
    except ImportError as e:
        need = "vllm-llmd make-test-model needs the testing extra (pip install 'vllm-llmd[testing]')"
        print(f"{need}: {e}", file=sys.stderr)
        return 2

    path = make_test_model(args.dir, shape=args.shape, seed=args.seed)
    print(path)
    return 0


def _router(args: argparse.Namespace) -> int:
    from vllm_llmd.router.config import ConfigError, RouterConfig, load_config, parse_worker_flag
    from vllm_llmd.router.scheduling import PluginError
    from vllm_llmd.router.server import build_router, configure_logging, run

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
        if args.chat_template:
            tok = tok.model_copy(update={"chat_template": args.chat_template})
        api_key = args.api_key or os.environ.get("VLLM_LLMD_API_KEY")
        if api_key:  # as vLLM's --api-key / VLLM_API_KEY
            cfg = cfg.model_copy(
                update={"server": cfg.server.model_copy(update={"api_keys": [*cfg.server.api_keys, api_key]})}
            )
        if args.otlp_traces_endpoint:
            server = cfg.server.model_copy(update={"otlp_traces_endpoint": args.otlp_traces_endpoint})
            cfg = cfg.model_copy(update={"server": server})
        index = cfg.index.model_copy(update={"block_size": args.block_size}) if args.block_size else cfg.index
        cfg = RouterConfig.model_validate(
            {**cfg.model_dump(), "tokenizer": tok.model_dump(), "index": index.model_dump()}
        )
        ids = [p.pod_id for p in cfg.pods]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate pods: {ids}")
        configure_logging(cfg)
        # built here so a configuration it rejects (e.g. discovery without the k8s extra) is a
        # clear error, not a traceback
        router = build_router(cfg)
        if args.check:
            print(f"config OK: {len(cfg.pods)} pods, scorers {[s.type for s in cfg.profile.scorers]}")
            return 0
    except (ConfigError, PluginError) as e:
        print(f"vllm-llmd router: {e}", file=sys.stderr)
        return 2
    if args.ext_proc:
        try:
            from vllm_llmd.gateway.server import GatewayOptions
            from vllm_llmd.gateway.server import run as run_gateway
        except ImportError as e:
            print(
                f"vllm-llmd router --ext-proc needs the gateway extra (pip install 'vllm-llmd[gateway]'): {e}",
                file=sys.stderr,
            )
            return 2
        return run_gateway(cfg, GatewayOptions(args.ext_proc, args.ext_proc_fallbacks, args.watch_streams), router)
    try:
        return run(cfg, router)
    except ConfigError as e:  # found while starting
        print(f"vllm-llmd router: {e}", file=sys.stderr)
        return 2


def _envoy_config(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from vllm_llmd.gateway.envoy_config import EnvoyOptions, render
    from vllm_llmd.router.config import ConfigError, RouterConfig, load_config, parse_worker_flag

    try:
        cfg = load_config(args.config) if args.config else RouterConfig()
        if args.worker:
            cfg = cfg.model_copy(update={"pods": [*cfg.pods, *(parse_worker_flag(w) for w in args.worker)]})
        pods = [f"{urlsplit(p.url).hostname}:{urlsplit(p.url).port}" for p in cfg.pods if p.role != "prefill"]
        lhost, _, lport = args.listen.rpartition(":")
        ahost, _, aport = args.admin.rpartition(":")
        opts = EnvoyOptions(
            pods=pods,
            picker=args.ext_proc,
            listen_host=lhost or "0.0.0.0",
            listen_port=int(lport),
            admin_host=ahost or "127.0.0.1",
            admin_port=int(aport),
            cluster=args.cluster,
            failure_mode_allow=args.failure_mode_allow,
            message_timeout_s=args.message_timeout,
            max_body_bytes=cfg.max_body_bytes,
            retries=cfg.pool.max_retries if args.cluster == "override-host" else 0,
            connect_timeout_s=cfg.pool.connect_timeout_s,
        )
        text = render(opts)
    except (ConfigError, ValueError) as e:
        print(f"vllm-llmd envoy-config: {e}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


DESCRIPTION = (
    "vllm-llmd: KV-cache-aware routing and prefill/decode disaggregation for vLLM fleets. "
    "The vLLM plugin needs no command (vLLM loads it); these commands run the router (and its Envoy "
    "gateway mode), print an Envoy configuration for it, run simulated vLLM engines for fleet-scale tests "
    "and make a local test model."
)
ROUTER_DESCRIPTION = (
    "Run the OpenAI-compatible router in front of vLLM pods: --worker flags and/or a YAML --config "
    "(pods, scheduling profile, limits; see docs/router.md). Flags override the file."
)


def _sim(args: argparse.Namespace) -> int:
    from vllm_llmd.sim.fleet import layout, run_fleet
    from vllm_llmd.sim.profile import FleetProfile, ProfileError, load_profile

    try:
        prof = load_profile(args.profile) if args.profile else FleetProfile()
        pods = prof.pods(args.pods)
        tokenizer = args.tokenizer or prof.tokenizer
        if not tokenizer:
            raise ProfileError("no tokenizer: give --tokenizer DIR (a directory with tokenizer.json) or `tokenizer:`")
        specs = layout(pods, host=args.host, base_port=args.base_port)
    except (ProfileError, ValueError) as e:
        print(f"vllm-llmd sim: {e}", file=sys.stderr)
        return 2
    model = args.model or prof.model
    return run_fleet(specs, model, tokenizer, args.processes, args.router_config, args.endpoints)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-llmd", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "make-test-model",
        help="write a small random-weight model with a local tokenizer",
        description="Write a small random-weight Llama-style model with a locally trained tokenizer (for tests).",
    )
    p.add_argument("dir", help="output directory")
    p.add_argument("--shape", default="tiny", choices=["tiny", "small", "wide"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_test_model)

    r = sub.add_parser(
        "router", help="run the KV-cache- and load-aware OpenAI-compatible router", description=ROUTER_DESCRIPTION
    )
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
    r.add_argument(
        "--api-key", default=None, help="require this Bearer key (also VLLM_LLMD_API_KEY); see server.api_keys"
    )
    r.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        help="send OpenTelemetry traces to this OTLP collector, as vLLM's flag (needs the otel extra); "
        "see server.otlp_traces_endpoint",
    )
    r.add_argument(
        "--chat-template",
        default=None,
        help="chat template file (or the template itself), as vLLM's --chat-template; default: the model's",
    )
    r.add_argument("--block-size", type=int, default=None, help="router block size in tokens (default 64)")
    r.add_argument("--max-body-bytes", type=int, default=None, help="largest accepted request body")
    r.add_argument("--log-level", default=None, type=str.lower, choices=["debug", "info", "warning", "error"])
    r.add_argument("--check", action="store_true", help="validate the configuration and exit")
    r.add_argument(
        "--ext-proc",
        default=None,
        metavar="HOST:PORT",
        help="gateway mode: also serve Envoy's ext_proc gRPC protocol on this address (docs/gateway.md)",
    )
    r.add_argument(
        "--ext-proc-fallbacks",
        type=int,
        default=None,
        metavar="N",
        help="fallback pods named after the best one (default: pool.max_retries; 0 for an ORIGINAL_DST cluster)",
    )
    r.add_argument(
        "--watch-streams",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gateway mode: see SSE answers' chunks to time the first token (one ext_proc message per chunk)",
    )
    r.set_defaults(func=_router)

    e = sub.add_parser("envoy-config", help="print an Envoy bootstrap for gateway mode (docs/gateway.md)")
    e.add_argument("--config", default=None, help="the router's YAML (its pods, limits and retry budget)")
    e.add_argument("--worker", action="append", default=[], metavar="URL", help="a vLLM pod (repeatable)")
    e.add_argument("--ext-proc", default="127.0.0.1:9002", metavar="HOST:PORT", help="the picker's gRPC address")
    e.add_argument("--listen", default="0.0.0.0:8080", metavar="HOST:PORT", help="Envoy's client listener")
    e.add_argument("--admin", default="127.0.0.1:9901", metavar="HOST:PORT", help="Envoy's admin listener")
    e.add_argument("--cluster", default="override-host", choices=["override-host", "original-dst"])
    e.add_argument(
        "--failure-mode-allow", action="store_true", help="fail open: forward without a pick when the picker fails"
    )
    e.add_argument("--message-timeout", type=float, default=5.0, help="seconds per ext_proc message")
    e.add_argument("-o", "--output", default=None, help="write here instead of stdout")
    e.set_defaults(func=_envoy_config)

    s = sub.add_parser("sim", help="run simulated vLLM engines (HTTP API, /metrics, KV events) for fleet-scale tests")
    s.add_argument("--profile", default=None, help="fleet profile YAML (pod classes, capacities, cost model)")
    s.add_argument("--pods", type=int, default=None, help="number of pods (default: the profile's class counts)")
    s.add_argument("--tokenizer", default=None, help="model directory holding tokenizer.json (default: the profile's)")
    s.add_argument("--model", default=None, help="served model name (default: the profile's)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--base-port", type=int, default=0, help="pod i: HTTP P+3i, events P+3i+1, replay P+3i+2 (0: free)")
    s.add_argument("--processes", type=int, default=1, help="simulator processes (pods are dealt round-robin)")
    s.add_argument("--router-config", default=None, metavar="FILE", help="write a `vllm-llmd router --config` file")
    s.add_argument("--endpoints", default=None, metavar="FILE", help="write the pods' endpoints as JSON")
    s.set_defaults(func=_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
