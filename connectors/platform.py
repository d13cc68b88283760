"""Which accelerator an engine runs on, and which transport moves its KV (``transport: auto``).

Detection reads two facts vLLM already has, in this order:

1. the device of the KV cache tensors handed to ``register_kv_caches`` (``cuda``, ``cpu``, ``rbln``
   once torch-rbln renamed PrivateUse1, ``xpu``, ...);
2. vLLM's ``current_platform``: vllm-rbln's ``RblnPlatform`` (``vllm_rbln/platform/__init__.py``) is
   recognised by its class name or its class-level facts (``ray_device_key = "RBLN"``,
   ``device_control_env_var = "RBLN_VISIBLE_DEVICES"``), which hold on both of its model paths.

On RBLN the KV cache must be device tensors (``--model-impl vllm`` and
``VLLM_RBLN_USE_DEVICE_TENSOR=1``, as vllm-rbln's own connector requires): on the optimum path it
lives inside a compiled runtime and no connector can reach it, so :func:`detect` says so.

:func:`choose` maps the result and the connector config to a :class:`TransportChoice`:

| platform | ``transport: auto`` | memory peers read |
|---|---|---|
| cpu | ``nixl`` | DRAM (the cache itself) |
| cuda (and ROCm, which torch calls ``cuda``) | ``nixl`` | VRAM (the cache itself) |
| rbln | ``rbln``, path ``host`` (``rbln_path``) | DRAM staging; ``d2d``: RBLN device memory |

Backends: ``UCX`` everywhere; an RBLN engine adds NIXL's ``RBLN`` backend when ``nixl_rbln`` imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RBLN = "rbln"
KINDS = ("cpu", "cuda", RBLN)
TRANSPORTS = ("auto", "nixl", "rbln")


class PlatformError(RuntimeError):
    """The KV cache cannot be moved on this platform as configured (the message says how to fix it)."""


@dataclass(frozen=True)
class Platform:
    kind: str  # "cpu" | "cuda" | "rbln" | another device type
    device_type: str  # of the KV tensors
    detail: str  # for the start-up log line


@dataclass(frozen=True)
class TransportChoice:
    transport: str  # "nixl" | "rbln"
    rbln_path: str | None  # "host" | "d2d" on RBLN
    backends: tuple[str, ...]
    reason: str


def is_rbln_platform(platform: Any) -> bool:
    """vllm-rbln's ``RblnPlatform`` (the class or an instance), without importing vllm_rbln."""
    cls = platform if isinstance(platform, type) else type(platform)
    if cls.__name__ == "RblnPlatform":
        return True
    return (
        getattr(platform, "ray_device_key", None) == "RBLN"
        and getattr(platform, "device_control_env_var", None) == "RBLN_VISIBLE_DEVICES"
    )


def current_vllm_platform() -> Any | None:
    try:
        from vllm.platforms import current_platform
    except Exception:  # vLLM missing or its platform plugin broken: decide from the tensors alone
        return None
    return current_platform


def detect(kv_device_type: str | None, platform: Any | None = None) -> Platform:
    """The platform of an engine whose KV tensors are on ``kv_device_type`` under ``platform``."""
    rbln = platform is not None and is_rbln_platform(platform)
    name = type(platform).__name__ if platform is not None and not isinstance(platform, type) else str(platform)
    if kv_device_type == RBLN:
        return Platform(RBLN, RBLN, f"RBLN device tensors ({name})")
    if rbln:
        raise PlatformError(
            f"LLMDConnector on vllm-rbln needs the KV cache as RBLN device tensors, found {kv_device_type!r}: "
            "serve with --model-impl vllm and VLLM_RBLN_USE_DEVICE_TENSOR=1 (the optimum path keeps the KV "
            "cache inside the compiled runtime, where no connector can reach it)"
        )
    kind = kv_device_type or getattr(platform, "device_type", None) or "cpu"
    return Platform(kind, kind, f"{kind} KV tensors ({name})")


def choose(
    requested: str,
    platform: Platform,
    *,
    rbln_path: str = "host",
    backends: tuple[str, ...] = (),
    nixl_rbln_available: bool = False,
) -> TransportChoice:
    """The transport for ``platform`` given the config's ``transport``, ``rbln_path`` and
    ``backends`` (empty: the platform's default). ``PlatformError`` on a combination that cannot
    work (the NIXL transport cannot register RBLN device memory; the RBLN one needs RBLN tensors)."""
    if requested not in TRANSPORTS:
        raise PlatformError(f"unknown transport {requested!r} (known: {TRANSPORTS})")
    on_rbln = platform.kind == RBLN
    if requested == "nixl" and on_rbln:
        raise PlatformError(
            "transport 'nixl' cannot register KV memory on an RBLN device; use 'auto' or 'rbln' (host staging)"
        )
    if requested == "rbln" and not on_rbln:
        raise PlatformError(f"transport 'rbln' needs an RBLN engine; this one is {platform.kind} ({platform.detail})")
    if not on_rbln:
        why = "auto: KV in host memory" if platform.kind == "cpu" else f"auto: KV on {platform.kind}"
        return TransportChoice("nixl", None, backends or ("UCX",), why if requested == "auto" else "configured")
    if rbln_path == "d2d" and not nixl_rbln_available:
        raise PlatformError("rbln_path 'd2d' needs the nixl-rbln adapter (not importable); use rbln_path 'host'")
    default = ("RBLN", "UCX") if nixl_rbln_available else ("UCX",)
    why = f"{'auto' if requested == 'auto' else 'configured'}: RBLN, {rbln_path} path" + (
        ", RBLN backend from nixl_rbln" if nixl_rbln_available else ", UCX (nixl_rbln not installed)"
    )
    return TransportChoice("rbln", rbln_path, backends or default, why)
