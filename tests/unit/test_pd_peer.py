"""The peer-load price (vllm_llmd/pd/peer.py): the third option per candidate, stand-in pods."""

from __future__ import annotations

import pytest

from vllm_llmd.pd.load import DEFAULT_PEER_PRICE, HBM, TokenPrices, prefill_equivalent
from vllm_llmd.pd.peer import PEER_OVERHEAD_TOKENS, PeerPlan, peer_key, peer_plan, peer_price


def test_without_offers_the_cost_is_the_pods_own_prefill_equivalent() -> None:
    held = {HBM: 512, "CPU": 256}
    assert peer_plan(2048, held, {}) == PeerPlan(prefill_equivalent(2048, held))


def test_a_peer_holding_the_prefix_beats_a_prefill_at_the_default_price() -> None:
    plan = peer_plan(2048, {}, {"b": 1024, "c": 2048})
    assert plan.peer == "c" and plan.tokens == 2047  # never the prompt's last token
    assert plan.cost == pytest.approx(2048 - (1 - DEFAULT_PEER_PRICE) * 2047 + PEER_OVERHEAD_TOKENS)


def test_only_the_tokens_beyond_what_the_pod_holds_are_loaded() -> None:
    plan = peer_plan(1000, {HBM: 600}, {"b": 800})
    assert plan.peer == "b" and plan.tokens == 200


def test_a_peer_holding_little_more_than_the_pod_is_not_worth_its_overhead() -> None:
    assert peer_plan(1000, {HBM: 600}, {"b": 620}).peer is None
    assert peer_plan(1000, {HBM: 600}, {"b": 500}).peer is None


def test_a_measured_slow_pair_loses_to_a_fast_one() -> None:
    prices = TokenPrices(tiers={peer_key("slow"): 0.9, peer_key("fast"): 0.05})
    assert peer_plan(4096, {}, {"slow": 4096, "fast": 3072}, prices).peer == "fast"
    assert peer_plan(4096, {}, {"slow": 4096}, TokenPrices(tiers={peer_key("slow"): 1.0})).peer is None


def test_pair_price_is_clamped_and_defaults_until_measured() -> None:
    assert peer_price(None, 1e-3) == DEFAULT_PEER_PRICE
    assert peer_price(1e-5, 1e-3) == pytest.approx(0.01)
    assert peer_price(1.0, 1e-3) == 1.0
    assert TokenPrices().of(peer_key("x")) == DEFAULT_PEER_PRICE
