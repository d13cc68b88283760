"""The ``accelerator`` filter (latency-sensitive traffic to GPUs, batch to NPUs), the traffic-class
header, the pod label, and KV capacity across block sizes."""

from __future__ import annotations

import pytest

from vllm_llmd.router.candidates import CandidateViews
from vllm_llmd.router.config import ConfigError, PodConfig, ProfileConfig, RouterConfig, parse_config
from vllm_llmd.router.errors import HTTPError
from vllm_llmd.router.inflight import InflightTracker
from vllm_llmd.router.pod_metrics import PodMetrics, parse_metrics
from vllm_llmd.router.pool import Pod
from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.request import COMPLETIONS, RequestParser
from vllm_llmd.router.scheduling import Candidate, PluginError, SchedRequest, SchedulingContext, build_scheduler

PARAMS = {
    "classes": {"latency": ["gpu"], "batch": ["npu"], "any-fast": ["gpu", "h100"]},
    "models": {"summarizer": "batch"},
    "default_class": None,
}


def _ctx() -> SchedulingContext:
    return SchedulingContext(
        index=None, memory=PrefixMemory(), inflight=InflightTracker(), block_size=64, speculative_ttl_s=10
    )


def _pods(ctx: SchedulingContext, kinds: list[str | None]) -> list[Candidate]:
    return [
        Candidate(f"p{i}", 1.0, False, "both", ctx.inflight.load(f"p{i}"), PodMetrics(), accelerator=k)
        for i, k in enumerate(kinds)
    ]


def _sched(ctx: SchedulingContext, **params):
    prof = ProfileConfig.model_validate({"filters": [{"type": "accelerator", "params": {**PARAMS, **params}}]})
    return build_scheduler(prof, ctx)


def _req(model: str = "m", tclass: str | None = None) -> SchedRequest:
    return SchedRequest(model, [1] * 100, "", 100, 8, [], traffic_class=tclass)


def _allowed(sched, req: SchedRequest, pods: list[Candidate]) -> set[str | None]:
    return {p.accelerator for p in sched.filters[0].filter(req, pods)}


def test_header_then_model_then_default() -> None:
    ctx = _ctx()
    pods = _pods(ctx, ["gpu", "npu", "npu", "h100", None])
    s = _sched(ctx)
    assert _allowed(s, _req(tclass="latency"), pods) == {"gpu"}
    assert _allowed(s, _req(tclass="any-fast"), pods) == {"gpu", "h100"}
    assert _allowed(s, _req("summarizer"), pods) == {"npu"}  # by model
    assert _allowed(s, _req("summarizer", "latency"), pods) == {"gpu"}  # the header wins
    assert _allowed(s, _req(), pods) == {"gpu", "npu", "h100", None}  # no class: every pod
    assert _allowed(s, _req(tclass="unknown"), pods) == {"gpu", "npu", "h100", None}
    d = _sched(ctx, default_class="batch")
    assert _allowed(d, _req(tclass="unknown"), pods) == {"npu"}
    # and through the whole scheduler: the chosen pod is an NPU
    assert d.schedule(_req(), pods).chosen.accelerator == "npu"


def test_no_pod_of_the_kind_fails_open_or_closed() -> None:
    ctx = _ctx()
    gpus = _pods(ctx, ["gpu", "gpu"])
    assert _allowed(_sched(ctx), _req(tclass="batch"), gpus) == {"gpu"}  # fail open
    closed = _sched(ctx, when_none="none")
    assert closed.filters[0].filter(_req(tclass="batch"), gpus) == []
    with pytest.raises(Exception, match="filter accelerator left no pod"):
        closed.schedule(_req(tclass="batch"), gpus)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"classes": {}}, "at least one traffic class"),
        ({"classes": {"latency": []}}, "no accelerator kind"),
        ({"classes": {"latency": ["GPU"]}}, "not lowercase label values"),
        ({"models": {"x": "bulk"}}, r"traffic class\(es\) \['bulk'\]"),
        ({"default_class": "bulk"}, r"\['bulk'\]"),
        ({"header": "x"}, "unknown parameter 'header'"),
    ],
)
def test_bad_parameters_are_named(params: dict, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        _sched(_ctx(), **params)


def test_traffic_class_header_and_pod_label() -> None:
    parser = RequestParser(RouterConfig(), None)
    body = b'{"model": "m", "prompt": "hi"}'
    assert parser.build(COMPLETIONS, body, None, " Latency ").traffic_class == "latency"
    assert parser.build(COMPLETIONS, body, None).traffic_class is None
    for bad in ("", "a b", "x" * 64, "\u00e9"):
        with pytest.raises(HTTPError, match="header x-llmd-traffic-class: expected a class name") as e:
            parser.build(COMPLETIONS, body, None, bad)
        assert e.value.status == 400
    assert PodConfig(url="http://h:1", accelerator="npu").accelerator == "npu"
    with pytest.raises(ConfigError, match=r"pods\.0\.accelerator"):
        parse_config({"pods": [{"url": "http://h:1", "accelerator": "N P U"}]})


def test_kv_capacity_is_compared_in_tokens_across_block_sizes() -> None:
    """A pod with 129 blocks of 128 tokens holds 16,512 tokens: 258 of the router's 64-token blocks
    (it was taken for 129)."""
    views = CandidateViews(block_size=64)
    pod = Pod(PodConfig(url="http://h:1"))
    pod.metrics = parse_metrics('vllm:cache_config_info{block_size="128",num_gpu_blocks="129"} 1.0\n')
    fast = Pod(PodConfig(url="http://h:2", capacity_blocks=3073))
    fast.metrics = parse_metrics('vllm:cache_config_info{block_size="16",num_gpu_blocks="9"} 1.0\n')
    unknown = Pod(PodConfig(url="http://h:3", capacity_blocks=100))
    a, b, c = views.of([pod, fast, unknown])
    assert a.capacity_blocks == 258 and b.capacity_blocks == 3073 * 16 // 64 and c.capacity_blocks == 100
