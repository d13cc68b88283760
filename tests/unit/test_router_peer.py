"""Peer loads in the router (docs/peer-loading.md): the holder's endpoint and each pair's speed from
the engines' /metrics, the third price in ``estimated-ttft`` (vllm_llmd.pd.peer) and the params the
router builds for the chosen pod. Stand-in pods (a KV-event index fed with real event batches)."""

from __future__ import annotations

import pytest
from router_fakes import store_blocks as _store
from test_tier_prices import BS, _ctx, _pods, _req, _tokens

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.pd import PDError
from vllm_llmd.pd.load import DEFAULT_PEER_PRICE, TokenPrices
from vllm_llmd.pd.peer import peer_key
from vllm_llmd.pd.requests import build_peer_load_request
from vllm_llmd.router.config import ProfileConfig
from vllm_llmd.router.pod_metrics import parse_metrics
from vllm_llmd.router.scheduling import build_scheduler
from vllm_llmd.router.scheduling.estimated_ttft import PeerPlans, TTFTCosts
from vllm_llmd.router.tier_prices import TierPriceLearner
from vllm_llmd.wire import PeerLoad, parse_kv_transfer_params

HOLDER = "9513ee1d-d6c1-493f-9354-06298263ca5f"


def _exposition(seconds: float, blocks: float, prefill_s: float = 1.0, prefill_tok: float = 1000) -> str:
    lbl = f'engine="0",model_name="m",peer="{HOLDER}"'
    return (
        f'vllm:cache_config_info{{block_size="{BS}",num_gpu_blocks="100"}} 1.0\n'
        f'vllm:request_prefill_time_seconds_sum{{engine="0",model_name="m"}} {prefill_s}\n'
        f'vllm:request_prefill_kv_computed_tokens_sum{{engine="0",model_name="m"}} {prefill_tok}\n'
        f"llmd:kv_peer_load_seconds_total{{{lbl}}} {seconds}\n"
        f"llmd:kv_peer_load_blocks_total{{{lbl}}} {blocks}\n"
        f'llmd:kv_endpoint_info{{engine="0",engine_id="{HOLDER}",model_name="m",side_channel="10.0.0.7:5600"}} 1.0\n'
    )


def test_parse_metrics_reads_the_endpoint_and_the_pair_series() -> None:
    m = parse_metrics(_exposition(0.03, 8))
    assert m.kv_endpoint == (HOLDER, "10.0.0.7", 5600)
    assert m.peer_seconds == {HOLDER: 0.03} and m.peer_blocks == {HOLDER: 8}
    hostile = 'llmd:kv_endpoint_info{engine_id="x",side_channel="a;b/c:5600"} 1\n'
    hostile += 'llmd:kv_endpoint_info{engine_id="x",side_channel="h:99999"} 1\n'
    hostile += "".join(f'llmd:kv_peer_load_seconds_total{{peer="p{i}"}} 1\n' for i in range(100))
    m = parse_metrics(hostile)
    assert m.kv_endpoint is None and len(m.peer_seconds) == 64


def test_the_learner_prices_a_pair_by_its_measured_speed() -> None:
    lr = TierPriceLearner()
    assert peer_key(HOLDER) not in lr.observe(parse_metrics(_exposition(0, 0, 0, 0))).tiers
    assert lr.prices.of(peer_key(HOLDER)) == DEFAULT_PEER_PRICE
    # prefill 1 ms/token; the pair: 0.032 s for 16 blocks of 64 tokens = 31.25 us/token
    p = lr.observe(parse_metrics(_exposition(0.032, 16)))
    assert p.of(peer_key(HOLDER)) == pytest.approx(0.03125)


def _schedule(peer_loads: bool):
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    ctx = _ctx(index)
    prof = {"scorers": [{"type": "estimated-ttft", "params": {"peer_loads": peer_loads}}]}
    sched = build_scheduler(ProfileConfig.model_validate(prof), ctx)
    pods = _pods(ctx, [TokenPrices()] * 2)
    pods[0].metrics = parse_metrics(_exposition(0, 0))  # p0 is a holder (tiers, endpoint reported)
    toks = _tokens(3, n=2048, tail=64)
    _store(index, "p0", toks, 1, "CPU")  # p0 holds the prefix in its DRAM tier
    ctx.inflight.start("p0", 6000, 0)  # and is busy; p1 is idle and holds nothing
    req = _req(index, toks)
    return sched.schedule(req, pods), req


def test_an_idle_pod_is_chosen_to_load_the_prefix_from_the_busy_holder() -> None:
    d, req = _schedule(peer_loads=True)
    plans, costs = req.outputs.get(PeerPlans), req.outputs.get(TTFTCosts)
    assert d.chosen.id == "p1" and plans is not None and costs is not None
    plan = plans.plans["p1"]
    assert plan.peer == HOLDER and plan.tokens == 2048
    assert plans.holders[HOLDER] == ("10.0.0.7", 5600, BS, 2112)  # the whole prompt: the engine loads 2048
    # the holder itself is priced with what it holds (no peer but itself)
    assert plans.plans["p0"].peer is None
    body = build_peer_load_request(
        {"prompt": "x", "kv_transfer_params": {"evil": 1}}, plan.peer, *plans.holders[HOLDER]
    )
    parsed = parse_kv_transfer_params(body["kv_transfer_params"])
    assert isinstance(parsed, PeerLoad) and parsed.peer_num_tokens == 2112 and parsed.peer_port == 5600


def test_without_peer_loads_the_idle_pod_pays_the_prefill() -> None:
    _, req = _schedule(peer_loads=False)
    costs = req.outputs.get(TTFTCosts)
    assert req.outputs.get(PeerPlans) is None and costs is not None
    assert costs.costs["p1"] > _schedule(peer_loads=True)[1].outputs.get(TTFTCosts).costs["p1"]


def test_bad_holder_params_are_never_built() -> None:
    with pytest.raises(PDError):
        build_peer_load_request({"prompt": "x"}, HOLDER, "a;b", 5600, BS, 2048)


def test_a_pods_capacity_counts_its_dram_tier_when_larger() -> None:
    """A block the engine evicts stays in the DRAM tier (loaded back at the tier's price, or read by
    a peer), so the cost model's capacity is the larger of the two; a configured one wins."""
    from vllm_llmd.router.config import PodConfig
    from vllm_llmd.router.pool import Pod

    text = _exposition(0, 0)  # num_gpu_blocks 100
    text += 'llmd:kv_tier_capacity_blocks{engine="0",model_name="m",tier="dram"} 640.0\n'
    text += 'llmd:kv_tier_capacity_blocks{engine="0",model_name="m",tier="disk"} 9000.0\n'
    m = parse_metrics(text)
    assert m.num_gpu_blocks == 100 and m.dram_capacity_blocks == 640
    pod = Pod(PodConfig(url="http://h:1"), metrics=m)
    assert pod.capacity_blocks == 640 and pod.capacity_tokens(BS) == 640 * BS
    assert Pod(PodConfig(url="http://h:1"), metrics=parse_metrics(_exposition(0, 0))).capacity_blocks == 100
    small = parse_metrics(text.replace("} 640.0", "} 40.0"))
    assert Pod(PodConfig(url="http://h:1"), metrics=small).capacity_blocks == 100
    assert Pod(PodConfig(url="http://h:1", capacity_blocks=7), metrics=m).capacity_blocks == 7
    assert parse_metrics('llmd:kv_tier_capacity_blocks{tier="dram"} -3\n').dram_capacity_blocks is None


def test_a_loaded_request_is_queued_as_what_it_computes_plus_the_load() -> None:
    """The in-flight count (the pod's queue in every cost) holds a peer-loaded request as its tail
    plus the load at its price, not as its whole uncached prompt; the router hands the plan to the
    forwarder with the body that asks for the load."""
    import json
    import math
    from types import SimpleNamespace

    from vllm_llmd.pd.peer import peer_queued_tokens
    from vllm_llmd.router.pd_legs import peer_load_body

    d, req = _schedule(peer_loads=True)
    plans = req.outputs.get(PeerPlans)
    plan = plans.plans["p1"]
    # 2,048 of the 2,112 tokens loaded at the default pair price 0.15, plus 32 tokens for the load
    assert plan.saved == pytest.approx((1 - DEFAULT_PEER_PRICE) * 2048 - 32)
    # queued: the 64 tokens it computes, 0.15 x 2,048 for the load and its 32: 403.2, rounded up
    assert peer_queued_tokens(2112, plan) == math.ceil(64 + DEFAULT_PEER_PRICE * 2048 + 32) == 404
    assert peer_queued_tokens(2112, plans.plans["p0"]) == 2112 and peer_queued_tokens(2112, None) == 2112
    counter = SimpleNamespace(n=0)
    counter.labels = lambda pod: SimpleNamespace(inc=lambda: setattr(counter, "n", counter.n + 1))
    creq = SimpleNamespace(payload={"prompt": "x"}, encode=lambda p: json.dumps(p).encode())
    sent = peer_load_body(creq, req, d, counter)
    assert sent is not None and sent[1] is plan and counter.n == 1
    assert json.loads(sent[0])["kv_transfer_params"]["peer_num_tokens"] == 2112
