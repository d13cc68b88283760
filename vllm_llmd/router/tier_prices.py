"""Each pod's load-back speed per KV tier, learned from its ``/metrics``, as the prices of
:func:`vllm_llmd.pd.load.prefill_equivalent`.

Per scrape the counters' growth since the last update gives three speeds, in seconds per token
(each an exponentially weighted mean over the windows in which it moved, ``alpha`` per window):

    prefill(p) = d vllm:request_prefill_time_seconds_sum / d vllm:request_prefill_kv_computed_tokens_sum
    dram(p)    = d llmd:kv_tier_load_seconds_sum{tier="dram"} / d sum_t llmd:kv_tier_loaded_tokens_total{tier=t}
    disk(p)    = d llmd:kv_tier_load_seconds_sum{tier="disk"} / d llmd:kv_tier_loaded_tokens_total{tier="disk"}

(every load-back, a disk hit's too, ends with a DRAM -> engine copy: the DRAM job time is shared by
all loaded tokens) and the prices, a prefill token being 1:

    price(CPU)     = clamp01(dram(p) / prefill(p))
    price(STORAGE) = clamp01((disk(p) + dram(p)) / prefill(p))

A peer load (docs/peer-loading.md) is priced per holder ``X`` the same way, from the reader's own
counters (``p`` loaded from ``X``; ``block_size`` from ``vllm:cache_config_info``):

    peer(p, X)    = d llmd:kv_peer_load_seconds_total{peer=X}
                    / (block_size * d llmd:kv_peer_load_blocks_total{peer=X})
    price(peer:X) = clamp01(peer(p, X) / prefill(p))      (vllm_llmd.pd.peer; key "peer:<X's engine id>")

A price stays at its documented default (:data:`vllm_llmd.pd.load.DEFAULT_TIER_PRICES`) until both
of its speeds have been seen. The prefill time is vLLM's per request (scheduled to first token), so
under load it includes the batch the prefill shares: the price is relative to what a miss costs a
request's TTFT on that pod now, which is what the cost compares. A counter that goes down (the
engine restarted) starts the window again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_llmd.pd.load import DEFAULT_PRICES, DEFAULT_TIER_PRICES, TokenPrices, tier_price
from vllm_llmd.pd.peer import peer_key, peer_price
from vllm_llmd.router.pod_metrics import PodMetrics
from vllm_llmd.wire.tier_metrics import TIER_DISK, TIER_DRAM, TIER_MEDIUM

#: weight of the newest window in each mean
ALPHA = 0.3


@dataclass(slots=True)
class _Rate:
    """Seconds per token from two cumulative counters, averaged over the windows where both moved."""

    seconds: float = -1.0
    tokens: float = -1.0
    #: the mean, ``None`` until the first window
    value: float | None = None

    def update(self, seconds: float, tokens: float) -> None:
        if self.tokens < 0 or seconds < self.seconds or tokens < self.tokens:  # first look, or a restart
            self.seconds, self.tokens = seconds, tokens
            return
        ds, dt = seconds - self.seconds, tokens - self.tokens
        if ds <= 0 or dt <= 0:
            return  # not both moved yet: keep the window open
        self.seconds, self.tokens = seconds, tokens
        x = ds / dt
        self.value = x if self.value is None else self.value + ALPHA * (x - self.value)


@dataclass(slots=True)
class TierPriceLearner:
    """One pod's speeds and the :class:`~vllm_llmd.pd.load.TokenPrices` they give."""

    prefill: _Rate = field(default_factory=_Rate)
    dram: _Rate = field(default_factory=_Rate)
    disk: _Rate = field(default_factory=_Rate)
    #: per holder engine id: this pod's peer loads from it
    peers: dict[str, _Rate] = field(default_factory=dict)
    prices: TokenPrices = DEFAULT_PRICES

    def observe(self, m: PodMetrics) -> TokenPrices:
        """Take one scrape; return the pod's prices (a new object only when they changed)."""
        self.prefill.update(m.prefill_seconds, m.prefill_tokens)
        tok, sec = m.tier_tokens, m.tier_seconds  # a series not there yet (nothing loaded) is 0
        self.dram.update(sec.get(TIER_DRAM, 0.0), sum(tok.values()))
        self.disk.update(sec.get(TIER_DISK, 0.0), tok.get(TIER_DISK, 0.0))
        bs = m.block_size or 0
        for peer, seconds in m.peer_seconds.items():
            if bs and (peer in self.peers or len(self.peers) < 64):
                self.peers.setdefault(peer, _Rate()).update(seconds, m.peer_blocks.get(peer, 0.0) * bs)
        prices = self.compute()
        if prices.tiers != self.prices.tiers:
            self.prices = prices
        return self.prices

    def compute(self) -> TokenPrices:
        pre, dram, disk = self.prefill.value, self.dram.value, self.disk.value
        cpu, storage = TIER_MEDIUM[TIER_DRAM], TIER_MEDIUM[TIER_DISK]
        disk_then_dram = None if disk is None or dram is None else disk + dram
        tiers = {
            cpu: tier_price(dram, pre, DEFAULT_TIER_PRICES[cpu]),
            storage: tier_price(disk_then_dram, pre, DEFAULT_TIER_PRICES[storage]),
        }
        for peer, rate in self.peers.items():
            if rate.value is not None:
                tiers[peer_key(peer)] = peer_price(rate.value, pre)
        return TokenPrices(tiers=tiers)

    def speeds(self) -> dict[str, float | None]:
        """Seconds per token as learned (``None``: not yet), for logs and tests."""
        return {"prefill": self.prefill.value, TIER_DRAM: self.dram.value, TIER_DISK: self.disk.value}
