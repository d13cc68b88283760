"""``kv_connector_extra_config`` keys of ``LLMDConnector``, parsed and checked once."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_llmd.connectors.tiers.config import TiersConfig


class ConnectorConfigError(ValueError):
    pass


@dataclass(frozen=True)
class LLMDConnectorConfig:
    #: transport moving the bytes: "auto" (picked per platform, connectors/platform.py), "nixl" (the
    #: KV cache registered as it is: CPU, CUDA) or "rbln" (RBLN device tensors: host staging or d2d)
    transport: str = "auto"
    #: NIXL backends, in order of preference; empty = the platform's (UCX; RBLN engines put NIXL's
    #: RBLN backend first when nixl_rbln imports). The handshake uses the first both sides have
    backends: tuple[str, ...] = ()
    #: RBLN engines: "host" (page-aligned host staging, readable by any peer) or "d2d" (NPU memory
    #: registered by nixl_rbln; only peers with the RBLN backend and the same geometry read it)
    rbln_path: str = "host"
    #: receive pool for cross-layout pulls (peer blocks of another size or byte order), MiB of host
    #: memory, allocated at the first such peer; 0 refuses those peers (docs/rbln.md: sizing)
    relayout_buffer_mb: int = 256
    #: address the decode side dials for the handshake; advertised in kv_transfer_params
    side_channel_host: str = "127.0.0.1"
    #: port of the handshake side channel; 0 = any free port (the worker tells the scheduler)
    side_channel_port: int = 0
    #: seconds the prefill side holds a finished request's blocks for its consumer
    lease_seconds: float = 30.0
    #: seconds a decode-side read (or handshake) may take before it is given up (→ local prefill)
    transfer_timeout_seconds: float = 30.0
    handshake_timeout_seconds: float = 5.0
    #: what to do when a pull fails: "recompute" (prefill locally) or "fail" (error the request)
    load_failure_policy: str = "recompute"
    #: medium named in the KV events for blocks the connector holds under a lease
    events_medium: str = "CPU"
    #: largest side-channel message accepted, bytes
    max_message_bytes: int = 4 * 1024 * 1024
    #: run NIXL's progress thread. Off by default: NIXL starts it with no delay, so it spins on a
    #: core the engine needs (on 2 cores it cut colocated throughput by a third, bench/RESULTS.md);
    #: without it UCX progresses when the worker polls (every step) and CMA reads need no peer help
    progress_thread: bool = False
    #: hosts a decode engine may dial for a pull: IP networks ("10.0.0.0/8") or exact host names;
    #: empty = any (but never an unspecified or multicast address). kv_transfer_params naming any
    #: other host are refused and the request is prefilled locally
    allowed_peers: tuple[str, ...] = ()
    #: the DRAM / disk KV tiers (docs/tiers.md); ``None``: no tiers
    tiers: TiersConfig | None = None

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None, default_port: int | None = None) -> LLMDConnectorConfig:
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConnectorConfigError(
                f"LLMDConnector: unknown kv_connector_extra_config key(s) {unknown}; known: {sorted(known)}"
            )
        values: dict[str, Any] = {}
        if "side_channel_host" not in extra and os.environ.get("LLMD_SIDE_CHANNEL_HOST"):
            values["side_channel_host"] = os.environ["LLMD_SIDE_CHANNEL_HOST"]
        if "side_channel_port" not in extra and default_port is not None:
            values["side_channel_port"] = default_port
        for key, raw in extra.items():
            if key == "tiers":  # --- tiers (docs/tiers.md) ---
                from vllm_llmd.connectors.tiers.config import TiersConfig

                values[key] = TiersConfig.parse(raw)
                if "events_medium" not in extra:  # lease events would collide with the DRAM tier's "CPU"
                    values["events_medium"] = ""
                elif str(extra["events_medium"]).upper() in ("CPU", "STORAGE"):
                    raise ConnectorConfigError(
                        "LLMDConnector: events_medium must not be CPU or STORAGE when tiers are on (they name the "
                        "DRAM and disk tiers in KV events); leave it unset"
                    )
                continue
            default = getattr(cls, key) if key not in ("backends", "allowed_peers") else ()
            try:
                if isinstance(default, bool):
                    if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                        value: Any = raw.lower() in ("true", "1", "yes", "on")
                    elif isinstance(raw, bool | int):
                        value = bool(raw)
                    else:
                        raise ValueError(f"not a boolean: {raw!r}")
                elif isinstance(default, int):
                    value = int(raw)
                elif isinstance(default, float):
                    value = float(raw)
                elif isinstance(default, tuple):
                    if isinstance(raw, str) or not all(isinstance(x, str) for x in raw):
                        raise TypeError("expected a list of strings")
                    value = tuple(raw)
                else:
                    if not isinstance(raw, str):
                        raise TypeError("expected a string")
                    value = raw
            except (TypeError, ValueError) as exc:
                raise ConnectorConfigError(f"LLMDConnector: bad value {raw!r} for {key}: {exc}") from exc
            values[key] = value
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.lease_seconds <= 0 or self.transfer_timeout_seconds <= 0 or self.handshake_timeout_seconds <= 0:
            raise ConnectorConfigError("LLMDConnector: lease and timeouts must be positive")
        if not 0 <= self.side_channel_port < 65536:
            raise ConnectorConfigError(f"LLMDConnector: side_channel_port {self.side_channel_port} out of range")
        if self.load_failure_policy not in ("recompute", "fail"):
            raise ConnectorConfigError("LLMDConnector: load_failure_policy must be 'recompute' or 'fail'")
        for entry in self.allowed_peers:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                if not entry or any(c in entry for c in "/: "):
                    raise ConnectorConfigError(
                        f"LLMDConnector: allowed_peers entry {entry!r} is not a network or host"
                    ) from exc
        if self.transport not in ("auto", "nixl", "rbln"):
            raise ConnectorConfigError(f"LLMDConnector: transport {self.transport!r} is not auto, nixl or rbln")
        if self.rbln_path not in ("host", "d2d"):
            raise ConnectorConfigError(f"LLMDConnector: rbln_path {self.rbln_path!r} is not host or d2d")
        if not 0 <= self.relayout_buffer_mb <= 1 << 20:
            raise ConnectorConfigError("LLMDConnector: relayout_buffer_mb must be between 0 and 1048576")
        if self.max_message_bytes < 1024:
            raise ConnectorConfigError("LLMDConnector: max_message_bytes must be at least 1024")
