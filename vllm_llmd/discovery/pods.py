"""What the router reads from one Kubernetes pod: whether to route to it, where it serves and
publishes KV events, and its per-pod settings.

Pure functions over the pod's JSON (``v1.Pod`` as the API server sends it); no client, no I/O.

* **Routable**: condition ``Ready`` is ``"True"`` (it already folds in readiness gates), no
  ``metadata.deletionTimestamp`` (the Inference Extension's test, ``pkg/lwepp/util/pod/pod.go``
  ``IsPodReady``), and, as llm-d's pod discovery also requires, phase ``Running`` and a pod IP.
* **Gone** (its KV index entries are dropped): phase ``Succeeded``/``Failed`` or being deleted.
  A pod that is merely not ready stays subscribed to, so its index is warm when it comes back.
* **Address**: ``status.podIP``; each serving port is one endpoint ``podIP:port`` (the same
  ``host:port`` id the plugin's KV topic ``kv@$POD_IP:<port>@<model>`` carries).
* **Serving ports**: an InferencePool's target ports, else the annotation ``llmd.ai/port``, else the
  discovery config's ``port``.
* **KV events**: ``tcp://podIP:<events port>`` and ``tcp://podIP:<replay port>``, from the annotations
  ``llmd.ai/events-port`` / ``llmd.ai/replay-port`` (a number, or ``off``) or the config defaults
  (the plugin's ``LLMD_KV_EVENTS_PORT`` / ``LLMD_KV_EVENTS_REPLAY_PORT`` defaults, 5557 / 5558).
  With several serving ports only the first gets events (one engine publishes per port pair).
* **Role**: label ``llmd.ai/role`` (``prefill``/``decode``/``both``); without it llm-d's label
  ``llm-d.ai/role`` (``prefill``/``decode``/``prefill-decode``) is read; default ``both``.
* **Accelerator kind**: label ``llmd.ai/accelerator`` (``gpu``, ``npu``, ``h100``, ...: a lowercase
  label value), the ``accelerator`` filter's key; none: the pod has no kind.
* **Other PodConfig fields**: annotations ``llmd.ai/prefill-speed`` (float > 0; the prior of the
  speed the router learns) and ``llmd.ai/capacity-blocks`` (int > 0).

A pod with a bad value, or an annotation under ``llmd.ai/`` that is not one of these (a typo), is
refused as a whole with a :class:`BadPod` naming the key: routing a pod half-configured (say a
prefill pod taken for ``both``) is worse than not routing it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from vllm_llmd.router.config import PodConfig

ANNOTATION_PREFIX = "llmd.ai/"
ROLE_LABEL = "llmd.ai/role"
ACCELERATOR_LABEL = "llmd.ai/accelerator"
#: llm-d's role label (its decode-filter / prefill-filter read it)
LLMD_ROLE_LABEL = "llm-d.ai/role"
PORT_ANNOTATION = "llmd.ai/port"
EVENTS_PORT_ANNOTATION = "llmd.ai/events-port"
REPLAY_PORT_ANNOTATION = "llmd.ai/replay-port"
PREFILL_SPEED_ANNOTATION = "llmd.ai/prefill-speed"
CAPACITY_ANNOTATION = "llmd.ai/capacity-blocks"
KNOWN_ANNOTATIONS = frozenset(
    {PORT_ANNOTATION, EVENTS_PORT_ANNOTATION, REPLAY_PORT_ANNOTATION, PREFILL_SPEED_ANNOTATION, CAPACITY_ANNOTATION}
)
_ROLES = {"prefill": "prefill", "decode": "decode", "both": "both"}
_LLMD_ROLES = {"prefill": "prefill", "decode": "decode", "prefill-decode": "both", "both": "both"}
_OFF = {"off", "none", "0", "false", "no"}


class BadPod(ValueError):
    """A pod that cannot be routed to as configured; the message names the pod and the key."""


@dataclass(frozen=True)
class PodDefaults:
    """Discovery-wide defaults (from ``DiscoveryConfig``)."""

    scheme: str = "http"
    port: int = 8000
    #: ``None``: no events unless the pod's annotation names a port
    events_port: int | None = 5557
    replay_port: int | None = 5558


@dataclass(frozen=True)
class DiscoveredPod:
    name: str
    ip: str | None
    routable: bool
    gone: bool
    #: one per serving port; empty while the pod has no IP
    endpoints: tuple[PodConfig, ...]


def _ready(status: Mapping[str, Any]) -> bool:
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _port(name: str, key: str, raw: str, allow_off: bool) -> int | None:
    value = raw.strip().lower()
    if allow_off and value in _OFF:
        return None
    try:
        port = int(value)
    except ValueError:
        raise BadPod(f"pod {name}: {key}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise BadPod(f"pod {name}: {key}={raw!r} is not a port number (1-65535)")
    return port


def _role(name: str, labels: Mapping[str, str]) -> str:
    if ROLE_LABEL in labels:
        role = _ROLES.get(str(labels[ROLE_LABEL]).strip().lower())
        if role is None:
            raise BadPod(f"pod {name}: label {ROLE_LABEL}={labels[ROLE_LABEL]!r}; expected one of {sorted(_ROLES)}")
        return role
    if LLMD_ROLE_LABEL in labels:
        role = _LLMD_ROLES.get(str(labels[LLMD_ROLE_LABEL]).strip().lower())
        if role is None:
            raise BadPod(
                f"pod {name}: label {LLMD_ROLE_LABEL}={labels[LLMD_ROLE_LABEL]!r}; "
                f"expected one of {sorted(_LLMD_ROLES)}"
            )
        return role
    return "both"


def _settings(name: str, annotations: Mapping[str, str]) -> dict[str, Any]:
    unknown = sorted(k for k in annotations if k.startswith(ANNOTATION_PREFIX) and k not in KNOWN_ANNOTATIONS)
    if unknown:
        raise BadPod(f"pod {name}: unknown annotation(s) {unknown}; known: {sorted(KNOWN_ANNOTATIONS)}")
    out: dict[str, Any] = {}
    numbers: tuple[tuple[str, str, type[float] | type[int], str], ...] = (
        ("prefill_speed", PREFILL_SPEED_ANNOTATION, float, "a number"),
        ("capacity_blocks", CAPACITY_ANNOTATION, int, "an integer"),
    )
    for key, annotation, kind, what in numbers:
        raw = annotations.get(annotation)
        if raw is not None:
            try:
                out[key] = kind(raw)
            except ValueError:
                raise BadPod(f"pod {name}: {annotation}={raw!r} is not {what}") from None
    return out


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def read_pod(obj: Mapping[str, Any], defaults: PodDefaults, target_ports: Sequence[int] | None = None) -> DiscoveredPod:
    """The endpoints of one pod (JSON as the API sends it). ``target_ports``: an InferencePool's
    ports (they win over the ``llmd.ai/port`` annotation). Raises :class:`BadPod`."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name"):
        raise BadPod(f"object without metadata.name: {str(obj)[:200]}")
    name = str(meta["name"])
    status = obj.get("status") or {}
    if not isinstance(status, Mapping):
        raise BadPod(f"pod {name}: status is not an object")
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if not isinstance(labels, Mapping) or not isinstance(annotations, Mapping):
        raise BadPod(f"pod {name}: labels/annotations are not maps")
    phase = status.get("phase")
    gone = bool(meta.get("deletionTimestamp")) or phase in ("Succeeded", "Failed")
    ip = status.get("podIP") or None
    routable = not gone and phase == "Running" and _ready(status) and ip is not None

    role = _role(name, labels)
    extra = _settings(name, annotations)
    if ACCELERATOR_LABEL in labels:
        extra["accelerator"] = str(labels[ACCELERATOR_LABEL]).strip().lower()
    if target_ports:
        ports = list(target_ports)
    elif PORT_ANNOTATION in annotations:
        ports = [_port(name, PORT_ANNOTATION, str(annotations[PORT_ANNOTATION]), allow_off=False) or defaults.port]
    else:
        ports = [defaults.port]
    events_port = defaults.events_port
    if EVENTS_PORT_ANNOTATION in annotations:
        events_port = _port(name, EVENTS_PORT_ANNOTATION, str(annotations[EVENTS_PORT_ANNOTATION]), allow_off=True)
    replay_port = defaults.replay_port
    if REPLAY_PORT_ANNOTATION in annotations:
        replay_port = _port(name, REPLAY_PORT_ANNOTATION, str(annotations[REPLAY_PORT_ANNOTATION]), allow_off=True)
    if ip is None:
        return DiscoveredPod(name, None, False, gone, ())
    if not isinstance(ip, str):
        raise BadPod(f"pod {name}: status.podIP is not a string")
    host = _host(ip)
    endpoints = []
    for i, port in enumerate(ports):
        with_events = i == 0 and events_port is not None
        try:
            endpoints.append(
                PodConfig(
                    url=f"{defaults.scheme}://{host}:{port}",
                    events=f"tcp://{host}:{events_port}" if with_events else None,
                    replay=f"tcp://{host}:{replay_port}" if with_events and replay_port is not None else None,
                    role=role,  # type: ignore[arg-type]
                    **extra,
                )
            )
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise BadPod(f"pod {name}: {problems}") from None
    return DiscoveredPod(name, ip, routable, gone, tuple(endpoints))
