"""One simulated engine: vLLM's V1 scheduler loop over the simulated KV cache, timed by the cost model.

Scheduling follows ``vllm/v1/core/sched/scheduler.py`` (``Scheduler.schedule`` /
``update_from_output``) without speculative decoding, connectors, LoRA or encoders:

1. RUNNING requests first, in order: each gets ``num_tokens - num_computed_tokens`` new tokens (one
   when decoding, the rest of its prompt when a chunked prefill continues) capped by the step's
   token budget (``max_num_batched_tokens``). When its slots cannot be allocated the last running
   request is preempted (blocks freed, back to the front of the waiting queue, recomputed later)
   until they can.
2. Then, if nothing was preempted, WAITING requests in FCFS order while budget and
   ``max_num_seqs`` allow: prefix-cache lookup (``get_computed_blocks``), the uncached rest chunked
   to the budget, ``allocate_slots(full_sequence_must_fit=True)`` (vLLM's default
   ``scheduler_reserve_full_isl``), and the prefix-cache stats recorded once admitted.
3. The step's time comes from :class:`~vllm_llmd.sim.cost.CostModel`; at its end every request
   whose known tokens are all computed samples one token; a request reaching ``max_tokens`` finishes
   and frees its blocks (tail first). The KV events of the step go out as one batch.

Time: the loop sleeps until each step's end on the event loop's clock. Steps are chained on their
planned end times, so a late wake-up (the process is busy) delays delivery but not the simulated
engine's throughput; a lag beyond ``MAX_LAG_S`` is dropped (the engine falls behind, as an
overloaded host would) and counted in ``lag_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm_llmd.sim.cost import StepWork
from vllm_llmd.sim.hashing import BlockHasher
from vllm_llmd.sim.kv_cache import BlockPool, Event, KVCacheManager
from vllm_llmd.sim.metrics import EngineMetrics
from vllm_llmd.sim.profile import PodProfile

#: a step may start at most this late against its planned time before the engine falls behind
MAX_LAG_S = 0.05


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(slots=True)
class Output:
    """What one step gave a request: new token ids, and the finish reason on the last one."""

    token_ids: list[int]
    finish_reason: str | None = None
    #: prompt tokens served from the prefix cache when first scheduled (``prompt_tokens_details``)
    cached_tokens: int | None = None
    created_cache_tokens: int | None = None


@dataclass(eq=False)
class SimRequest:
    req_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    cache_salt: str | None = None
    arrival: float = 0.0
    all_token_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    status: Status = Status.WAITING
    num_preemptions: int = 0
    cached_tokens: int | None = None
    created_cache_tokens: int | None = None
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    outputs: asyncio.Queue[Output] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


@dataclass(slots=True)
class Step:
    scheduled: list[tuple[SimRequest, int]]
    work: StepWork
    preempted: list[SimRequest]


class SimEngine:
    """One pod's engine core. ``publish(events)`` receives each step's KV events."""

    def __init__(
        self,
        profile: PodProfile,
        model_name: str,
        token_pool: Sequence[int],
        publish: Callable[[list[Event]], None] | None = None,
        seed: int | None = None,
        max_lag_s: float = MAX_LAG_S,
    ) -> None:
        if not token_pool:
            raise ValueError("token_pool (the ids generated output is drawn from) is empty")
        self.profile = profile
        self.cost = profile.cost
        self.hasher = BlockHasher(profile.block_size, profile.hash_algo, profile.hash_seed, profile.int_block_hashes)
        self.pool = BlockPool(profile.num_gpu_blocks, self.hasher, enable_events=profile.kv_events)
        self.kv = KVCacheManager(self.pool, profile.max_model_len)
        self.metrics = EngineMetrics(profile, model_name)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self._token_pool = list(token_pool)
        self._rng = random.Random(profile.seed if seed is None else seed)
        self._publish = publish
        self._max_lag = max_lag_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.busy_s = 0.0
        self.lag_s = 0.0
        self.max_lag_s = 0.0

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, req: SimRequest) -> None:
        req.arrival = asyncio.get_running_loop().time()
        self.hasher.extend(req.block_hashes, req.all_token_ids, req.cache_salt)
        self.waiting.append(req)
        self._update_gauges()
        self._wake.set()

    def abort(self, req: SimRequest) -> None:
        """The client went away: drop the request and free its blocks."""
        if req.status is Status.FINISHED:
            return
        if req in self.running:
            self.running.remove(req)
        with contextlib.suppress(ValueError):
            self.waiting.remove(req)
        self.kv.free(req.req_id)
        req.status = Status.FINISHED
        self.metrics.success["abort"] += 1
        self._update_gauges()

    def reset_prefix_cache(self) -> bool:
        ok = self.kv.reset_prefix_cache()
        if ok:
            self._flush_events()
            self.metrics.changed()
        return ok

    # ---- the loop -------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t = float("-inf")  # the planned end of the previous step
        idle = True
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
                idle = True
            if idle:
                # an idle engine starts its next step when the request arrived, not when we woke up
                t = max(t, self.waiting[0].arrival if self.waiting else loop.time())
                idle = False
            step = self.schedule()
            if not step.scheduled:
                # nothing fits now (e.g. waiting requests need blocks held by no one): wait for news
                self._wake.clear()
                await self._wake.wait()
                t = max(t, loop.time())
                continue
            dur = self.cost.step_time(step.work)
            end = t + dur
            delay = end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            lag = now - end
            if lag > 0:
                self.lag_s += lag
                self.max_lag_s = max(self.max_lag_s, lag)
            self.finish_step(step, end)
            self.steps += 1
            self.busy_s += dur
            t = max(end, now - self._max_lag)

    # ---- scheduling -----------------------------------------------------------------------------
    def schedule(self) -> Step:
        p = self.profile
        budget = p.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int]] = []
        preempted: list[SimRequest] = []
        work = StepWork()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget, p.max_model_len - req.num_computed_tokens - 1)
            if n <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(
                req.req_id, req.all_token_ids, req.block_hashes, req.num_computed_tokens, n, cache_salt=req.cache_salt
            ):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break
            scheduled.append((req, n))
            budget -= n
            i += 1
        if not preempted:
            while budget > 0 and self.waiting and len(self.running) < p.max_num_seqs:
                req = self.waiting[0]
                hit, hit_tokens = self.kv.get_computed_blocks(req.block_hashes, req.num_tokens)
                n = min(req.num_tokens - hit_tokens, budget)
                if not self.kv.allocate_slots(
                    req.req_id,
                    req.all_token_ids,
                    req.block_hashes,
                    0,
                    n,
                    new_computed_blocks=hit,
                    full_sequence_must_fit=True,
                    cache_salt=req.cache_salt,
                ):
                    break
                self.waiting.popleft()
                if req.num_preemptions == 0:
                    self.metrics.prefix_queries += req.num_tokens
                    self.metrics.prefix_hits += hit_tokens
                    req.cached_tokens = hit_tokens
                    req.scheduled_at = asyncio.get_running_loop().time()
                    self.metrics.observe("request_queue_time_seconds", req.scheduled_at - req.arrival)
                req.num_computed_tokens = hit_tokens
                req.status = Status.RUNNING
                self.running.append(req)
                scheduled.append((req, n))
                budget -= n
        for req, n in scheduled:
            if req.num_computed_tokens >= req.num_prompt_tokens and n == 1 and req.num_output_tokens > 0:
                work.add_decode(req.num_computed_tokens)
            else:
                work.add_prefill(n, req.num_computed_tokens)
        self._update_gauges()
        return Step(scheduled, work, preempted)

    def _preempt(self, req: SimRequest) -> None:
        self.kv.free(req.req_id)
        req.status = Status.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.metrics.preemptions += 1
        self.waiting.appendleft(req)

    # ---- end of step ------------------------------------------------------------------------------
    def finish_step(self, step: Step, now: float) -> None:
        m = self.metrics
        m.observe("iteration_tokens_total", step.work.prefill_tokens + step.work.decode_seqs)
        for req, n in step.scheduled:
            if req.status is not Status.RUNNING:
                continue  # aborted during the step
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.num_tokens:
                continue  # a prefill chunk: nothing sampled yet
            tok = self._token_pool[self._rng.randrange(len(self._token_pool))]
            req.all_token_ids.append(tok)
            req.num_output_tokens += 1
            self.hasher.extend(req.block_hashes, req.all_token_ids, req.cache_salt)
            m.generation_tokens += 1
            out = Output([tok])
            if req.first_token_at is None:
                req.first_token_at = now
                m.observe("time_to_first_token_seconds", now - req.arrival)
                m.prompt_tokens += req.num_prompt_tokens
                m.prompt_tokens_cached += req.cached_tokens or 0
                out.cached_tokens = req.cached_tokens
                hashed = min(self.kv.num_hashed_tokens(req.req_id), req.num_prompt_tokens)
                out.created_cache_tokens = req.created_cache_tokens = max(0, hashed - (req.cached_tokens or 0))
            elif req.last_token_at is not None:
                m.observe("inter_token_latency_seconds", now - req.last_token_at)
            req.last_token_at = now
            if req.num_output_tokens >= req.max_tokens:
                out.finish_reason = "length"
                self._finish(req, now)
            req.outputs.put_nowait(out)
        self._flush_events()
        self._update_gauges()

    def _finish(self, req: SimRequest, now: float) -> None:
        self.running.remove(req)
        self.kv.free(req.req_id)
        req.status = Status.FINISHED
        m = self.metrics
        m.success["length"] += 1
        m.observe("e2e_request_latency_seconds", now - req.arrival)
        m.observe("request_prompt_tokens", req.num_prompt_tokens)
        m.observe("request_generation_tokens", req.num_output_tokens)
        if req.scheduled_at is not None:
            m.observe("request_inference_time_seconds", now - req.scheduled_at)
            if req.first_token_at is not None:
                m.observe("request_prefill_time_seconds", req.first_token_at - req.scheduled_at)
                m.observe("request_decode_time_seconds", now - req.first_token_at)

    def _flush_events(self) -> None:
        events = self.pool.take_events()
        if events and self._publish is not None:
            self._publish(events)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.running = len(self.running)
        m.waiting = len(self.waiting)
        m.kv_usage = self.pool.usage()
        m.changed()

    def stats(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "busy_s": round(self.busy_s, 3),
            "lag_s": round(self.lag_s, 3),
            "max_lag_s": round(self.max_lag_s, 4),
        }
