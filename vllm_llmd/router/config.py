"""Router configuration: pods and the scheduling profile, from a YAML file and/or CLI flags.

Every model forbids unknown keys, so a typo is an error that names the key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_llmd.events.engine_config import DEFAULT_PORT as DEFAULT_EVENTS_PORT
from vllm_llmd.events.engine_config import DEFAULT_REPLAY_PORT
from vllm_llmd.pd import SelectiveParams

#: the P/D deciders' defaults have one owner: vllm_llmd.pd.SelectiveParams
_PD_DEFAULTS = SelectiveParams()
_M = TypeVar("_M", bound=BaseModel)

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message says what and where."""


#: an accelerator kind: a lowercase Kubernetes label value
ACCELERATOR_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PodConfig(_Strict):
    """One vLLM pod (aggregated, or one side of a P/D pair)."""

    url: str
    #: ZMQ endpoint of the pod's KV event publisher (``tcp://host:port``); ``None``: no events
    events: str | None = None
    #: ZMQ ROUTER endpoint of the pod's event replay service
    replay: str | None = None
    role: Literal["both", "prefill", "decode"] = "both"
    #: relative prefill speed (tokens/s over a reference pod): the prior of the speed the router
    #: learns from the pod's answers (``speed``, vllm_llmd.router.speed); the cost model divides by it
    prefill_speed: float = Field(default=1.0, gt=0, le=1e6)
    #: KV cache capacity in the pod's own blocks if known (otherwise scraped from
    #: ``vllm:cache_config_info``, with the block size)
    capacity_blocks: int | None = Field(default=None, gt=0, le=1 << 40)
    #: accelerator kind (``gpu``, ``npu``, ``h100``, ...): a label the ``accelerator`` filter reads
    accelerator: str | None = Field(default=None, pattern=ACCELERATOR_PATTERN)
    #: the models and LoRA adapters the pod serves; ``None``: read from its ``/v1/models``
    models: list[str] | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"worker URL must look like http://host:port, got {v!r}")
        return v.rstrip("/")

    @property
    def pod_id(self) -> str:
        """``host:port``, the same id the KV event topic ``kv@host:port@model`` carries."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}"


class PluginRef(_Strict):
    """A plugin in a profile: its registered type, an optional weight (scorers) and parameters."""

    type: str
    weight: float = Field(default=1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


def _default_scorers() -> list[PluginRef]:
    return [PluginRef(type="estimated-ttft")]


class ProfileConfig(_Strict):
    """Filters (in order) -> scorers (weighted sum of [0, 1] scores) -> picker."""

    filters: list[PluginRef] = Field(default_factory=list)
    scorers: list[PluginRef] = Field(default_factory=_default_scorers)
    picker: PluginRef = Field(default_factory=lambda: PluginRef(type="max-score"))


class PoolConfig(_Strict):
    health_interval_s: float = Field(default=1.0, gt=0)
    health_timeout_s: float = Field(default=2.0, gt=0)
    #: consecutive failures (health checks or proxied connections) before a pod is ejected
    failure_threshold: int = Field(default=3, ge=1)
    #: first ejection time; doubles on each re-ejection up to ``max_ejection_s``
    ejection_s: float = Field(default=2.0, gt=0)
    max_ejection_s: float = Field(default=30.0, gt=0)
    #: circuit breaker: a pod with this many router requests in flight takes no more
    max_inflight_per_pod: int = Field(default=4096, ge=1)
    connect_timeout_s: float = Field(default=3.0, gt=0)
    #: until a pod's answer starts (a stream's first chunk; a whole non-streamed answer, so the
    #: longest generation): the OpenAI SDK's default read timeout; then the next pod is tried
    first_byte_timeout_s: float = Field(default=600.0, gt=0)
    #: longest gap between two chunks of a streamed answer; then the client's stream is aborted
    stream_idle_timeout_s: float = Field(default=600.0, gt=0)
    #: other pods tried when one fails before the first byte
    max_retries: int = Field(default=2, ge=0)
    metrics_interval_s: float = Field(default=0.05, gt=0)
    metrics_stale_s: float = Field(default=1.0, gt=0)
    #: when no plugin needs the fast ``/metrics`` scrape but the profile prices KV tiers
    #: (``estimated-ttft``, ``precise-prefix-cache``), each pod's ``/metrics`` is read this often
    #: (with its health check) to learn its load-back speeds (vllm_llmd.router.tier_prices)
    tier_prices_interval_s: float = Field(default=5.0, gt=0)
    #: how often each healthy pod's ``/v1/models`` (models and LoRA adapters) is read again
    models_interval_s: float = Field(default=10.0, gt=0)


class TokenizerConfig(_Strict):
    path: str | None = None
    #: chat template for chat requests, as vLLM's ``--chat-template``: a file, or the template itself;
    #: default: the model directory's (``chat_template.jinja``, else ``tokenizer_config.json``)
    chat_template: str | None = None
    #: prompt-prefix tokenization cache budget in bytes (0 disables)
    prefix_cache_bytes: int = Field(default=64 << 20, ge=0)
    prefix_cache_chunk_chars: int = Field(default=256, ge=128)
    #: for a request body longer than this (bytes), the prompt's rendering, tokens and keys are made on
    #: worker threads, off the event loop
    inline_chars: int = Field(default=32768, ge=0)
    workers: int = Field(default=2, ge=1)
    #: such jobs running or queued on the workers; beyond this a request is scored approximately
    max_pending: int = Field(default=32, ge=1)
    #: longest text handed to the tokenizer in one piece (bounds its per-token memory)
    max_segment_chars: int = Field(default=1 << 20, ge=8192)


class IndexConfig(_Strict):
    #: canonical block size (tokens) of the router's own block keys
    block_size: int = Field(default=64, ge=1)
    capacity_blocks: int = Field(default=10_000_000, ge=1)
    #: per-pod capacity of the approximate (routing-decision) memory, in blocks
    memory_blocks_per_pod: int = Field(default=100_000, ge=1)
    #: how long a speculative entry (routed, events not yet seen) counts in precise mode
    speculative_ttl_s: float = Field(default=10.0, ge=0)
    #: only a prompt's first this many blocks take part in routing (bounds the work one request costs:
    #: 4096 blocks of 64 tokens are 262,144 tokens, more than common context lengths)
    max_prompt_blocks: int = Field(default=4096, ge=1)


class PDConfig(_Strict):
    """Prefill/decode disaggregation, active when the pool has ``role: prefill`` pods (or, with
    ``peers``, between ``role: both`` pods)."""

    #: the P/D decider by name (``vllm_llmd.router.scheduling.deciders``): ``prefix-threshold``, or
    #: ``selective-peers``; default: ``selective-peers`` with ``peers: true``, else ``prefix-threshold``
    decider: str | None = None
    #: parameters for a decider beyond the ones below (which every built-in decider takes from here)
    decider_params: dict[str, Any] = Field(default_factory=dict)
    #: disaggregate when the chosen decode pod would compute more than this many prompt tokens itself
    threshold_tokens: int = Field(default=_PD_DEFAULTS.threshold_tokens, ge=0)
    #: profile that picks the prefill pod (default: the main profile)
    prefill_profile: ProfileConfig | None = None
    #: selective P/D among ``role: both`` pods (no dedicated prefill pods): after the decode pod is
    #: chosen, pull the prompt's KV from a peer that holds more of the prefix and can produce it sooner
    #: (``vllm_llmd.pd.selective``; needs a KV connector with ``kv_both`` on every pod); the same as
    #: ``decider: selective-peers``
    peers: bool = False
    #: cost of moving one prompt token's KV, relative to computing it (peers mode)
    transfer_token_weight: float = Field(default=_PD_DEFAULTS.transfer_token_weight, ge=0)
    #: fixed cost (tokens) of the extra prefill leg (peers mode)
    leg_overhead_tokens: float = Field(default=_PD_DEFAULTS.leg_overhead_tokens, ge=0)

    @model_validator(mode="after")
    def _one_decider(self) -> PDConfig:
        if self.peers and self.decider not in (None, "selective-peers"):
            raise ValueError(f"peers: true means decider selective-peers, not {self.decider!r}")
        return self

    @property
    def decider_name(self) -> str:
        return self.decider or ("selective-peers" if self.peers else "prefix-threshold")


class DiscoveryConfig(_Strict):
    """Kubernetes pod discovery (``vllm_llmd.discovery``, needs the ``k8s`` extra): the pods matching
    ``selector``, or the members of the ``InferencePool`` named ``inference_pool``, in ``namespace``.
    Per-pod labels/annotations override the defaults below (docs/kubernetes.md)."""

    #: default: the router's own namespace (service account), else ``default``
    namespace: str | None = None
    #: label selector (``app=vllm,tier!=canary``) or a mapping of labels that must all match
    selector: str | dict[str, str] | None = None
    #: name of an InferencePool (Gateway API Inference Extension) whose selector and target ports are used
    inference_pool: str | None = None
    inference_pool_api: Literal["inference.networking.k8s.io/v1", "inference.networking.x-k8s.io/v1alpha2"] = (
        "inference.networking.k8s.io/v1"
    )
    #: serving port when neither an InferencePool nor the pod's annotation gives one
    port: int = Field(default=8000, ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    #: KV event PUB / replay ports (the plugin's ``LLMD_KV_EVENTS_PORT`` / ``_REPLAY_PORT`` defaults); 0: none
    events_port: int = Field(default=DEFAULT_EVENTS_PORT, ge=0, le=65535)
    replay_port: int = Field(default=DEFAULT_REPLAY_PORT, ge=0, le=65535)
    #: kubeconfig file; default: in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``
    kubeconfig: str | None = None
    #: plain-HTTP API URL without credentials (``kubectl proxy``, tests); overrides ``kubeconfig``
    api_server: str | None = None
    #: server-side timeout of one watch request; the watch resumes from its resourceVersion after it
    watch_timeout_s: int = Field(default=300, ge=1)
    #: retry delay after an API error, doubling up to ``backoff_max_s``
    backoff_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> DiscoveryConfig:
        if (self.selector is None) == (self.inference_pool is None):
            raise ValueError("discovery needs exactly one of 'selector' or 'inference_pool'")
        if self.selector is not None and not self.selector:
            raise ValueError("discovery.selector is empty: it would select every pod in the namespace")
        return self


class SpeedConfig(_Strict):
    """Each pod's prefill and decode speed learned from its answers (``vllm_llmd.router.speed``;
    docs/router.md, "Learned pod speeds")."""

    #: learn speeds (off: every pod's speed is its configured ``prefill_speed``)
    learn: bool = True
    #: samples kept per pod and kind (prefill, decode)
    window: int = Field(default=64, ge=4, le=4096)
    #: least weight of the configured ``prefill_speed``, in samples (1: a pod's first sample moves it
    #: at most halfway; 8 compressed the simulated fleet's speeds, few cold prompts reach each pod);
    #: more when the pods' differences are within their samples' scatter (vllm_llmd.router.speed)
    prior_samples: float = Field(default=1.0, ge=0)
    #: a TTFT sample counts only when the request's own uncached prompt is at least this many
    #: tokens: a cheap request's TTFT is its fixed overhead, not its speed
    min_work_tokens: float = Field(default=256.0, ge=0)
    #: samples older than this are dropped (a pod that got no work for that long is learned again)
    max_age_s: float = Field(default=300.0, gt=0)
    #: decode samples older than this are dropped (``None``: ``max_age_s``). Experimental: with
    #: ``estimated-ttft``'s ``decode_time_weight`` a pod learned slow at decode gets no work, so no
    #: decode samples that would correct it; a short age ends that without forgetting prefill speeds
    decode_max_age_s: float | None = Field(default=None, gt=0)
    #: a learned speed stays within this factor of the prior
    max_ratio: float = Field(default=32.0, ge=1)
    #: the published speeds are recomputed at most this often
    refresh_s: float = Field(default=0.25, ge=0)


class ServerConfig(_Strict):
    """Limits of the HTTP front (``vllm_llmd.router.front``)."""

    #: time a client has to send a request's headers (from connecting, or from the previous answer
    #: on a kept-alive connection); also how long an idle kept-alive connection stays open
    header_timeout_s: float = Field(default=30.0, gt=0)
    #: time a client has to send a request's body once its headers are in
    body_timeout_s: float = Field(default=60.0, gt=0)
    #: client connections at once (default: half the open-file limit); beyond it the oldest
    #: connection without a complete request is closed
    max_connections: int | None = Field(default=None, ge=1)
    #: longest request line or header field (aiohttp's default)
    max_header_bytes: int = Field(default=8190, ge=1024)
    #: request bodies held at once, in bytes (a body counts its Content-Length, or max_body_bytes when
    #: that is unknown or compressed); beyond it new requests get 503
    max_body_bytes_in_flight: int = Field(default=512 << 20, ge=1024)
    #: one line per request on the ``vllm_llmd.router.access`` logger (``vllm_llmd.router.observe``)
    access_log: Literal["off", "text", "json"] = "off"
    #: accepted ``Authorization: Bearer`` keys (empty: no key needed; ``vllm_llmd.router.auth``)
    api_keys: list[str] = Field(default_factory=list)
    #: PEM certificate chain and key: the listener speaks HTTPS
    tls_cert: str | None = None
    tls_key: str | None = None
    #: OTLP collector to send OpenTelemetry traces to, as vLLM's ``--otlp-traces-endpoint``
    #: (``vllm_llmd.router.tracing``; needs the ``otel`` extra); ``None``: no tracing
    otlp_traces_endpoint: str | None = None

    #: readiness (``/readyz``) waits at most this long after start-up for the available pods' KV
    #: event streams to sync from their replay endpoints (``vllm_llmd.router.probes``)
    index_sync_timeout_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("server.tls_cert and server.tls_key go together")
        if any(not k for k in self.api_keys):
            raise ValueError("server.api_keys: an empty key would accept a missing one")
        return self


class AdmissionConfig(_Strict):
    """Admission control (``vllm_llmd.router.admission``): off unless ``max_requests_per_pod`` is set."""

    #: router requests in flight on a pod at which it counts as saturated (``None``: no admission control)
    max_requests_per_pod: int | None = Field(default=None, ge=1)
    #: requests waiting for a slot when every pod is saturated; beyond it 429 at once
    queue_size: int = Field(default=256, ge=0)
    #: longest wait in the queue, then 429
    queue_timeout_s: float = Field(default=30.0, gt=0)
    #: the 429's ``Retry-After`` (seconds)
    retry_after_s: int = Field(default=1, ge=1)


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: served model name(s), besides those the pods report on ``/v1/models``; a request naming a
    #: model neither lists gets 404 (``vllm_llmd.router.models``)
    models: list[str] = Field(default_factory=list)
    pods: list[PodConfig] = Field(default_factory=list)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    pd: PDConfig = Field(default_factory=PDConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    #: Kubernetes pod discovery; discovered pods are added to ``pods``
    discovery: DiscoveryConfig | None = None
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    #: request header that carries a session id (session-affinity scorer)
    session_header: str = "x-session-id"
    #: request header that names the request's traffic class (the ``accelerator`` filter)
    traffic_class_header: str = "x-llmd-traffic-class"
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    log_level: str = "info"

    @model_validator(mode="after")
    def _one_body_fits(self) -> RouterConfig:
        if self.server.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError("server.max_body_bytes_in_flight must be at least max_body_bytes")
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {loc!r}")
        else:
            lines.append(f"{source}: {loc}: {e['msg']}")
    return "\n".join(lines)


def validated(model: type[_M], data: Any, source: str, error: type[Exception]) -> _M:
    """A YAML document (``None`` or a mapping) as ``model``; anything else raises ``error`` naming
    ``source`` and each bad key (the router's config and the simulator's fleet profile)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(format_validation_error(e, source)) from None


def read_yaml(path: Path, error: type[Exception]) -> Any:
    """The YAML document in ``path``; a missing file or bad YAML raises ``error`` naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise error(f"{path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None


def parse_config(data: Any, source: str = "config") -> RouterConfig:
    return validated(RouterConfig, data, source, ConfigError)


def load_config(path: str | Path) -> RouterConfig:
    p = Path(path)
    data = read_yaml(p, ConfigError)
    from vllm_llmd.router.llmd_config import is_endpoint_picker_config, translate

    if is_endpoint_picker_config(data):  # an llm-d EPP configuration: what maps, and what does not
        try:
            data, notes = translate(data, str(p))
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
        for note in notes:
            log.warning("%s", note)
    return parse_config(data, str(p))


def parse_worker_flag(value: str) -> PodConfig:
    """``URL[=EVENTS_ENDPOINT[,REPLAY_ENDPOINT]]`` -> :class:`PodConfig`."""
    url, _, rest = value.partition("=")
    events = replay = None
    if rest:
        events, _, replay_part = rest.partition(",")
        replay = replay_part or None
        for ep in (events, replay):
            if ep is not None and not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(f"--worker {value}: event endpoints must be tcp://, ipc:// or inproc://, got {ep!r}")
    try:
        return PodConfig(url=url, events=events or None, replay=replay)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"--worker {value}")) from None
