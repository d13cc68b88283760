"""``/metrics`` of a simulated engine: vLLM 0.32's metric names, types, labels and buckets.

Names, help texts, label sets and buckets follow ``vllm/v1/metrics/loggers.py``
(``PrometheusStatLogger``) and ``vllm/v1/metrics/buckets.py``; every sample carries
``engine="0"`` and ``model_name``. Exported: the request gauges (running, waiting), KV cache usage,
prefix-cache queries/hits, prompt/generation token counters, preemptions, finished requests by
reason, ``cache_config_info`` (``block_size``, ``num_gpu_blocks``, ``prefix_caching_hash_algo`` ...),
and the latency histograms (TTFT, inter-token latency, e2e, queue, prefill, decode) plus the token
histograms. ``tests/unit/test_sim_http.py`` checks every family against a real engine's
``/metrics`` (types and label names).

The text is rendered by hand (no ``prometheus_client`` registry per pod) and cached until the
engine's state changes: a router scrapes every pod every 50 ms, and one simulator process serves
hundreds of pods. The ``_created`` series ``prometheus_client`` adds are left out (what
``PROMETHEUS_DISABLE_CREATED_SERIES`` does).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from vllm_llmd.sim.profile import PodProfile

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def request_token_buckets(max_model_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_model_len`` (vLLM's ``build_1_2_5_buckets``)."""
    out: list[float] = []
    exp = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_model_len:
                return tuple(out)
            out.append(float(v))
        exp += 1


def _fmt(v: float) -> str:
    return repr(float(v))


class Histogram:
    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.buckets, v)] += 1
        self.count += 1
        self.sum += v

    def render(self, name: str, labels: str, out: list[str]) -> None:
        acc = 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            out.append(f'{name}_bucket{{{labels},le="{_fmt(b)}"}} {_fmt(acc)}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {_fmt(self.count)}')
        out.append(f"{name}_count{{{labels}}} {_fmt(self.count)}")
        out.append(f"{name}_sum{{{labels}}} {_fmt(self.sum)}")


_HISTOGRAMS = (
    ("time_to_first_token_seconds", "Histogram of time to first token in seconds.", "ttft"),
    ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", "itl"),
    ("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", "latency"),
    ("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", "latency"),
    ("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", "latency"),
    ("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", "latency"),
    ("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", "latency"),
    ("request_prompt_tokens", "Number of prefill tokens processed.", "tokens"),
    ("request_generation_tokens", "Number of generation tokens processed.", "tokens"),
    ("iteration_tokens_total", "Histogram of number of tokens per engine_step.", "iteration"),
)


class EngineMetrics:
    """Counters, gauges and histograms of one simulated engine."""

    def __init__(self, profile: PodProfile, model_name: str) -> None:
        self.profile = profile
        self._model_label = f'model_name="{model_name}"'
        self.labels = f'engine="0",{self._model_label}'
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens = 0
        self.prompt_tokens_cached = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        token_buckets = request_token_buckets(profile.max_model_len)
        kinds = {
            "ttft": TTFT_BUCKETS,
            "itl": ITL_BUCKETS,
            "latency": LATENCY_BUCKETS,
            "tokens": token_buckets,
            "iteration": ITERATION_TOKEN_BUCKETS,
        }
        self.hist = {name: Histogram(kinds[kind]) for name, _, kind in _HISTOGRAMS}
        self._cache: bytes | None = None
        info = {
            "block_size": str(profile.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "engine": "0",
            "kv_cache_size_tokens": str(profile.num_gpu_blocks * profile.block_size),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(profile.num_gpu_blocks),
            "num_gpu_blocks_override": str(profile.num_gpu_blocks),
            "prefix_caching_hash_algo": profile.hash_algo,
            "sliding_window": "None",
        }
        self._info_labels = ",".join(f'{k}="{v}"' for k, v in info.items())

    def observe(self, name: str, value: float) -> None:
        self.hist[name].observe(value)

    def changed(self) -> None:
        self._cache = None

    def render(self) -> bytes:
        if self._cache is not None:
            return self._cache
        lb = self.labels
        out: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            out.append(f"# HELP vllm:{name} {doc}")
            out.append(f"# TYPE vllm:{name} {kind}")

        def sample(name: str, value: float, extra: str = "") -> None:
            out.append(f"vllm:{name}{{{lb}{extra}}} {_fmt(value)}")

        family("num_requests_running", "gauge", "Number of requests in model execution batches.")
        sample("num_requests_running", self.running)
        family("num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
        sample("num_requests_waiting", self.waiting)
        family("kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")
        sample("kv_cache_usage_perc", self.kv_usage)
        counters = (
            (
                "prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                self.prefix_queries,
            ),
            ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", self.prefix_hits),
            ("num_preemptions", "Cumulative number of preemption from the engine.", self.preemptions),
            ("prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
            ("prompt_tokens_cached", "Number of cached prompt tokens (local + external).", self.prompt_tokens_cached),
            ("generation_tokens", "Number of generation tokens processed.", self.generation_tokens),
        )
        for name, doc, value in counters:
            family(f"{name}_total", "counter", doc)
            sample(f"{name}_total", value)
        family("request_success_total", "counter", "Count of successfully processed requests.")
        for reason in FINISH_REASONS:
            labels = f'engine="0",finished_reason="{reason}",{self._model_label}'
            out.append(f"vllm:request_success_total{{{labels}}} {_fmt(self.success[reason])}")
        for name, doc, _ in _HISTOGRAMS:
            family(name, "histogram", doc)
            self.hist[name].render(f"vllm:{name}", lb, out)
        family("cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
        out.append(f"vllm:cache_config_info{{{self._info_labels}}} 1.0")
        self._cache = ("\n".join(out) + "\n").encode()
        return self._cache
