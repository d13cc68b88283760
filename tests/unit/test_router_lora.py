"""The lora-affinity scorer and the vllm:lora_requests_info parsing it reads (issue 14)."""

from __future__ import annotations

from vllm_llmd.router.inflight import InflightTracker, PodLoad
from vllm_llmd.router.pod_metrics import PodMetrics, parse_metrics
from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.scheduling import Candidate, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.registry import create


def _info(running: str, waiting: str, max_lora: int, at: float) -> str:
    # as vLLM's metrics logger renders the gauge (labels sorted by prometheus_client)
    return (
        f'vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="{running}",'
        f'waiting_lora_adapters="{waiting}"}} {at}\n'
    )


def test_the_newest_lora_info_line_counts() -> None:
    text = _info("a,b", "", 4, 1700000002.5) + _info("c", "d", 4, 1700000001.0) + _info("", "", 4, 1.0)
    m = parse_metrics(text)
    assert m.lora_running == {"a", "b"} and m.lora_waiting == set() and m.max_lora == 4
    assert parse_metrics("vllm:num_requests_waiting 1\n").max_lora is None
    bad = parse_metrics('vllm:lora_requests_info{max_lora="99999999999",running_lora_adapters=""} 5\n')
    assert bad.max_lora is None


def _pod(pid: str, metrics: PodMetrics) -> Candidate:
    return Candidate(id=pid, prefill_speed=1.0, has_events=False, role="both", load=PodLoad(), metrics=metrics)


def test_lora_affinity_scores() -> None:
    ctx = SchedulingContext(None, PrefixMemory(10), InflightTracker(), 64, 0.0, metrics_stale_s=60.0)
    scorer = create("scorer", "lora-affinity", {}, ctx, "test")
    assert scorer.needs_metrics
    pods = [
        _pod("active", parse_metrics(_info("x,y", "", 2, 5.0))),
        _pod("waiting", parse_metrics(_info("y", "x", 2, 5.0))),
        _pod("free", parse_metrics(_info("y", "", 2, 5.0))),
        _pod("full", parse_metrics(_info("y", "z", 2, 5.0))),
        _pod("nolora", parse_metrics("vllm:num_requests_waiting 0\n")),
    ]
    req = SchedRequest("x", None, "t", 1, 1, [], lora="x")
    assert scorer.score(req, pods) == {"active": 1.0, "waiting": 0.6, "free": 0.8, "full": 0.0, "nolora": 0.5}
    base = SchedRequest("m", None, "t", 1, 1, [])
    assert set(scorer.score(base, pods).values()) == {1.0}
    stale = PodMetrics(lora_running=frozenset({"x"}), max_lora=2)  # never scraped
    assert scorer.score(req, [_pod("s", stale)]) == {"s": 0.5}
