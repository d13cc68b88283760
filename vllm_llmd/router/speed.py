"""Each pod's prefill and decode speed, learned online from what the router sees of its answers
(issue 13: a slow pod gets less work without anyone configuring vendor weights; the configured
``prefill_speed`` is only the prior).

What the router observes of one try (:class:`~vllm_llmd.router.attempt.Attempt`; a streamed answer
with status 200 that ran to its end): the request's own uncached prompt tokens, the work already
queued on the pod when it was sent (the router's in-flight record, :mod:`vllm_llmd.pd.load`), when
the first chunk arrived, and how many SSE events arrived after it and over how long. Per try:

    own         = the request's uncached prompt tokens
    work        = own + queued_prefill_ahead + decode_token_weight * queued_decode_ahead   (tokens)
    prefill     r = work / ttft                         (tokens/s; only if own >= min_work_tokens)
    decode      d = events_after_first / (t_last - t_first)    (tokens/s; only with >= 4 such events)

Counting the work queued ahead in ``work`` separates queue wait from service time as far as the
router can see it: a request that waited behind 10,000 queued tokens and took 2 s says the pod
does ~5,000 tokens/s, not that it is slow. Only a request with a long prompt of its own is a sample:
a short one queued behind long prefills does not wait for all of them (vLLM's chunked prefill runs
it in the same step as the tail of the one before, and the router counts a half-done prefill in
full until its first token), so ``work / ttft`` would overstate a busy pod's rate. On the simulated
3-class fleet in virtual time (tests/unit/test_router_speed_fleet.py; truth 2 / 1 / 0.5, prior
weight 0) counting such samples learned the slow class at 0.52-0.56, this rule at 0.49-0.51.
(Work the router cannot see - another router's - is not separated; neither is the engine's fixed
per-request overhead, which is why cheap requests, under ``min_work_tokens``, teach nothing.) The
decode rate includes the batch the pod runs, i.e. what a new request would get there. ``[DONE]``
and a usage chunk count as events: a small bias shared by all pods.

Per pod the last ``window`` samples of each kind younger than ``max_age_s`` are kept (bounded
memory: 2 x ``window`` samples per pod in the pool). Its rate is the work-weighted median of its
prefill samples (the median of its decode samples): samples spoiled by a pause, a network hiccup or
invisible work move a median little. Speeds are relative, on the scale of the priors ``π`` (the
pods' configured ``prefill_speed``, 1.0 by default), and shrunk toward the prior by as much as the
samples' own scatter says the pods' differences could be chance (empirical Bayes on log speeds):

    R          = median over pods with >= MIN_SAMPLES samples of  rate(q) / π(q)     (>= 2 such pods)
    x(p)       = ln(rate(p) / π(p) / R)                       the pod's log speed relative to its prior
    sigma      = median over consecutive samples i-1, i of one pod of |ln r_i - ln r_(i-1)| / (0.6745 √2)
                                                              one sample's log scatter, pooled over pods
    s²(p)      = (π/2) sigma² / n(p)                              the variance of a median of n(p) samples
    τ²         = max(0, mean over those pods of (x(q)² - 2 s²(q)))   how far apart the pods really are
    n0         = max(prior_samples, (π/2) sigma² / τ²)            (∞ when τ² = 0)
    speed(p)   = π(p) · exp(x(p) · n(p) / (n0 + n(p))),   clamped to [π(p) / max_ratio, π(p) * max_ratio]

with ``n(p)`` the pod's sample count; a pod without samples keeps ``π(p)``. ``n(p) / (n0 + n(p))`` is
``τ² / (τ² + s²(p))`` (the posterior weight of a normal prior of variance τ² around ``π``) until
``prior_samples`` caps it. Why: two identical CPU engines behind the README's workload learned
prefill speeds 0.87 / 1.13 from their first handfuls of samples (bench/RESULTS.md, "The 7/9 split"),
and the footprint's fair shares followed, splitting 16 prefixes 7/9 where the static partition splits
them 8/8; when the pods' medians lie no further apart than their samples scatter, ``τ²`` is 0 and
they keep their priors. Pods that really differ (the simulated 3-class fleet, 4x apart) give a
``τ²`` far above ``s²`` and ``n0`` falls to its floor ``prior_samples``.

The factor 2 on ``s²`` (``CHANCE_MARGIN``) asks the pods' spread to exceed twice what chance alone
gives. With 1, one real-engine run of eight (bench/RESULTS.md, "Learned speeds that stay at the
prior") learned 1.24 / 0.76 from 4 and 3 samples (τ 0.29, sigma 0.23) just before its last four
prefixes were placed, and split them 7/9. On two identical pods with log-normal noise 0.3 and 4
samples each (the first seconds of a run, when new prefixes are placed; 200 seeds) the factor 2 left
them more than 10% apart in 10% of seeds against 16% with 1 (6% with 3), while pods 2x apart were
learned at a median ratio of 1.53 against 1.63 (1.27 with 3); on the 3-class fleet it changes nothing
(τ is 10x sigma there).
Few long prompts reach each pod (on the benchmark's fleet, 48 cold prefixes per 30 s over 20 pods),
so the prior's weight decides how far the speeds get: with ``n0 = 8`` the same virtual-time fleet
learned 1.32 / 1.01 / 0.72, with the floor ``n0 = 1`` 1.79-1.87 / 1.02-1.03 / 0.55-0.58.
The decode speed is the same formula over decode samples. The two reference rates also give
``decode_price = R_prefill / R_decode`` (:meth:`SpeedEstimator.decode_price`: prefill tokens per decode
token of one request on a speed-1 pod), the exchange rate of the experimental ``estimated-ttft``
``decode_time_weight`` (bench/RESULTS.md, "Pricing a request's own decode time"). A pod is forgotten
(back to its prior) when it turns unhealthy (an engine restart fails the health checks for the tens of
seconds vLLM takes to start) or when it leaves the pool; a pod that got no work for ``max_age_s`` is
learned again (its decode samples after ``decode_max_age_s``, the same by default). A cleared prefix
cache (``/reset_prefix_cache``, the KV events' ``AllBlocksCleared``) is not a new engine and keeps what
was learned: forgetting it there threw the speeds away at the start of every step of
``bench/sim_fleet.py`` (which resets the caches), just when each step's cold prefixes were being placed.

The speeds are recomputed at most every ``refresh_s`` (the candidates read the published values:
:class:`~vllm_llmd.router.candidates.CandidateViews`); ``bench/sim_fleet.py`` measured the effect
(bench/RESULTS.md, "capacity- and speed-aware routing").
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vllm_llmd.router.config import SpeedConfig
from vllm_llmd.router.scheduling.framework import SchedRequest

log = logging.getLogger(__name__)

#: samples a pod needs before it takes part in the reference rate ``R``
MIN_SAMPLES = 2
#: SSE events after the first a decode sample needs
MIN_DECODE_EVENTS = 4
#: the published speeds are recomputed at least this often (samples age out)
AGE_REFRESH_S = 5.0
#: the variance of the median of n normal samples is about (π/2) σ² / n
HALF_PI = math.pi / 2
#: the median of |X_i - X_j| for two normal samples is 0.6745 * sqrt(2) sigma
STEP_TO_SIGMA = 1 / (0.6745 * math.sqrt(2))
#: how many times the spread chance alone gives the pods' log speeds must show before they differ
#: (the module docstring: measured on synthetic pairs and the simulated fleet)
CHANCE_MARGIN = 2.0


@dataclass(frozen=True, slots=True)
class AttemptTiming:
    """What one try observed; the :class:`~vllm_llmd.router.attempt.Attempt` puts it in the request's
    outputs before the ``PostResponse`` hooks run."""

    pod: str
    #: tokens of work the pod had before this request's first token (its own uncached prompt included)
    work_tokens: float
    #: send -> first streamed chunk (seconds); ``None``: not streamed
    ttft_s: float | None
    #: SSE events after the first chunk, and the seconds from the first chunk to the last
    decode_events: int = 0
    decode_s: float = 0.0
    #: the request's own uncached prompt tokens (part of ``work_tokens``); ``None``: all of it
    own_tokens: float | None = None


def weighted_median(pairs: Iterable[tuple[float, float]]) -> float:
    """The value at half the total weight of ``(value, weight)`` pairs (at least one)."""
    items = sorted(pairs)
    half = sum(w for _, w in items) / 2
    acc = 0.0
    for v, w in items:
        acc += w
        if acc >= half:
            return v
    return items[-1][0]


@dataclass(frozen=True, slots=True)
class Shrink:
    """How far the last refresh shrank the speeds toward the priors (for logs and tests)."""

    #: one sample's log scatter, pooled over the pods
    sigma: float = 0.0
    #: the spread of the pods' true log speeds the samples show
    tau: float = 0.0
    #: the prior's weight in samples (``inf``: every pod at its prior)
    n0: float = math.inf


def _steps(rates: Iterable[float]) -> list[float]:
    """|ln r_i - ln r_(i-1)| of consecutive samples: their median estimates one sample's log scatter
    without the bias a deviation from a median of two or three samples has (and ignores slow drift)."""
    logs = [math.log(r) for r in rates]
    return [abs(b - a) for a, b in itertools.pairwise(logs)]


class _Samples:
    __slots__ = ("decode", "decode_rate", "decode_steps", "prefill", "prefill_rate", "prefill_steps", "stale")

    def __init__(self, window: int) -> None:
        #: (monotonic time, tokens/s, work tokens)
        self.prefill: deque[tuple[float, float, float]] = deque(maxlen=window)
        #: (monotonic time, tokens/s)
        self.decode: deque[tuple[float, float]] = deque(maxlen=window)
        #: the medians, recomputed only when the samples changed
        self.prefill_rate = self.decode_rate = 0.0
        #: |ln r_i - ln r_(i-1)| of consecutive samples, for the pooled scatter
        self.prefill_steps: list[float] = []
        self.decode_steps: list[float] = []
        self.stale = True

    def rates(self, cut: float, decode_cut: float) -> tuple[float | None, float | None]:
        """(prefill, decode) rate over the samples younger than ``cut`` (decode: ``decode_cut``;
        ``None``: no samples)."""
        while self.prefill and self.prefill[0][0] < cut:
            self.prefill.popleft()
            self.stale = True
        while self.decode and self.decode[0][0] < decode_cut:
            self.decode.popleft()
            self.stale = True
        if self.stale:
            self.stale = False
            if self.prefill:
                self.prefill_rate = weighted_median((r, w) for _, r, w in self.prefill)
                self.prefill_steps = _steps(r for _, r, _ in self.prefill)
            if self.decode:
                self.decode_rate = statistics.median(d for _, d in self.decode)
                self.decode_steps = _steps(d for _, d in self.decode)
        return (self.prefill_rate if self.prefill else None, self.decode_rate if self.decode else None)


class SpeedEstimator:
    """A ``PostResponse`` hook built into every scheduler (the shared context's ``speeds``)."""

    name = "speed-estimator"

    def __init__(self, cfg: SpeedConfig) -> None:
        self.cfg = cfg
        self._pods: dict[str, _Samples] = {}
        self._priors: dict[str, float] = {}
        #: published speeds (pods with samples only); ``version`` changes when they do
        self.prefill: dict[str, float] = {}
        self.decode: dict[str, float] = {}
        self.version = 0
        self.prefill_shrink = self.decode_shrink = Shrink()
        #: the fleet's reference rates ``R`` (prefill tokens/s; decode tokens/s of one request), on the
        #: priors' scale; ``None`` until two pods have samples of that kind
        self.prefill_ref: float | None = None
        self.decode_ref: float | None = None
        self._dirty = False
        self._refreshed = -math.inf

    # ---- input -------------------------------------------------------------------------------
    def post_response(self, req: SchedRequest, pod: str) -> None:
        t = req.outputs.get(AttemptTiming)
        if t is not None and t.pod == pod:
            self.observe(t)

    def observe(self, t: AttemptTiming, now: float | None = None) -> None:
        if not self.cfg.learn:
            return
        if self._priors and t.pod not in self._priors:
            return  # not (or no longer) in the pool: nothing to keep
        now = time.monotonic() if now is None else now
        s = self._pods.get(t.pod)
        if s is None:
            s = self._pods[t.pod] = _Samples(self.cfg.window)
        own = t.work_tokens if t.own_tokens is None else t.own_tokens
        if t.ttft_s is not None and t.ttft_s > 0 and own >= max(1.0, self.cfg.min_work_tokens):
            s.prefill.append((now, t.work_tokens / t.ttft_s, t.work_tokens))
            s.stale = self._dirty = True
        if t.decode_events >= MIN_DECODE_EVENTS and t.decode_s > 0:
            s.decode.append((now, t.decode_events / t.decode_s))
            s.stale = self._dirty = True

    def set_pods(self, priors: Mapping[str, float]) -> None:
        """The pool's pods and their configured speeds; samples of other pods are dropped."""
        if priors == self._priors:
            return
        self._priors = dict(priors)
        for pod in [p for p in self._pods if p not in priors]:
            del self._pods[pod]
        self._dirty = True

    def forget(self, pod: str) -> None:
        if self._pods.pop(pod, None) is not None:
            self._dirty = True

    # ---- output ------------------------------------------------------------------------------
    def refresh(self, now: float | None = None) -> int:
        """Recompute the published speeds if due; returns :attr:`version`."""
        now = time.monotonic() if now is None else now
        since = now - self._refreshed
        if not (self._dirty and since >= self.cfg.refresh_s) and since < AGE_REFRESH_S:
            return self.version
        self._dirty = False
        self._refreshed = now
        cut = now - self.cfg.max_age_s
        dage = self.cfg.decode_max_age_s
        dcut = cut if dage is None else now - dage
        rates: dict[str, tuple[float, int]] = {}
        drates: dict[str, tuple[float, int]] = {}
        steps: list[float] = []
        dsteps: list[float] = []
        for pod, s in self._pods.items():
            pr, dr = s.rates(cut, dcut)
            if pr is not None:
                rates[pod] = (pr, len(s.prefill))
                if len(s.prefill) >= MIN_SAMPLES:
                    steps += s.prefill_steps
            if dr is not None:
                drates[pod] = (dr, len(s.decode))
                if len(s.decode) >= MIN_SAMPLES:
                    dsteps += s.decode_steps
        prefill, self.prefill_shrink, self.prefill_ref = self._relative(rates, steps)
        decode, self.decode_shrink, self.decode_ref = self._relative(drates, dsteps)
        if prefill != self.prefill or decode != self.decode:
            self.prefill, self.decode = prefill, decode
            self.version += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "speeds prefill n=%s %s decode n=%s %s",
                    {p: n for p, (_, n) in rates.items()},
                    self.prefill_shrink,
                    {p: n for p, (_, n) in drates.items()},
                    self.decode_shrink,
                )
        return self.version

    def _relative(
        self, rates: dict[str, tuple[float, int]], steps: list[float]
    ) -> tuple[dict[str, float], Shrink, float | None]:
        """``rates``: pod -> (rate, samples); ``steps``: the log steps between consecutive samples of
        each pod with >= MIN_SAMPLES samples. The formula is the module docstring's; also returns
        ``R``."""
        prior = self._priors
        comp = [p for p, (_, n) in rates.items() if n >= MIN_SAMPLES]
        if len(comp) < 2:
            return {}, Shrink(), None  # nothing to compare with: every pod keeps its prior
        big_r = statistics.median(rates[p][0] / prior.get(p, 1.0) for p in comp)
        x = {p: math.log(r / prior.get(p, 1.0) / big_r) for p, (r, _) in rates.items()}
        sigma = STEP_TO_SIGMA * statistics.median(steps)
        var1 = HALF_PI * sigma * sigma  # n times the variance of a median of n samples
        tau2 = max(0.0, sum(x[p] ** 2 - CHANCE_MARGIN * var1 / rates[p][1] for p in comp) / len(comp))
        n0 = max(self.cfg.prior_samples, var1 / tau2 if tau2 > 0 else math.inf)
        k = self.cfg.max_ratio
        out = {}
        for p, (_, n) in rates.items():
            pi = prior.get(p, 1.0)
            speed = pi * math.exp(x[p] * n / (n0 + n)) if math.isfinite(n0) else pi
            out[p] = min(pi * k, max(pi / k, speed))
        return out, Shrink(sigma, math.sqrt(tau2), n0), big_r

    def prefill_speed(self, pod: str, prior: float) -> float:
        return self.prefill.get(pod, prior)

    def decode_speed(self, pod: str, prior: float) -> float:
        return self.decode.get(pod, prior)

    def decode_price(self) -> float | None:
        """What one decode token of one request costs a speed-1 pod, in its prefill tokens:
        ``R_prefill / R_decode`` (the seconds a request's token takes to decode, at the batch the pods
        ran, over the seconds a prompt token takes to prefill); ``None`` until both are known."""
        if not self.prefill_ref or not self.decode_ref:
            return None
        return self.prefill_ref / self.decode_ref
