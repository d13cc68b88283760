"""The connector's worker half across layouts, in one process: two workers (real NIXL over UCX, real
ZMQ side channels) with different block sizes and KV layouts hand a request's KV off through the
handshake's plan, the receive pool and the re-layout; an RBLN prefill worker (fakes) stages its
blocks in ``wait_for_save`` before they are read; an unmappable peer is refused naming the fields and
the request is reported failed (vLLM then prefills it locally).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from kv_helpers import HEAD_SIZE, HEADS, LAYERS, Pair, fill, make_cache, token_values
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm_llmd.connectors.config import LLMDConnectorConfig
from vllm_llmd.connectors.handshake import HandshakeServer
from vllm_llmd.connectors.metadata import LLMDConnectorMetadata, RecvJob, RemotePrefill
from vllm_llmd.connectors.worker import LLMDConnectorWorker

from vllm_llmd.testing.fakes import rbln as fakes
from vllm_llmd.testing.wait import wait_until

pytestmark = pytest.mark.nixl


def make_worker(kind: str, num_blocks: int, block_size: int, **extra: object) -> tuple[LLMDConnectorWorker, list]:
    caches = make_cache(kind, num_blocks, block_size)
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16)
    kv_cache_config = SimpleNamespace(
        num_blocks=num_blocks, kv_cache_groups=[SimpleNamespace(layer_names=list(caches), kv_cache_spec=spec)]
    )
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(engine_id=f"{kind}-{block_size}"),
        cache_config=SimpleNamespace(block_size=block_size, cache_dtype="auto"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(served_model_name="m", model="/m", dtype=torch.bfloat16),
    )
    cfg = LLMDConnectorConfig.from_extra({"relayout_buffer_mb": 4, **extra})
    w = LLMDConnectorWorker(vllm_config, cfg, kv_cache_config)  # type: ignore[arg-type]
    if kind.startswith("rbln"):
        with fakes.installed():
            import vllm_llmd.connectors.kv_setup as setup_mod

            real = setup_mod.current_vllm_platform
            setup_mod.current_vllm_platform = lambda: fakes.RblnPlatform  # vllm-rbln's platform, faked
            try:
                w.register_kv_caches(caches)
            finally:
                setup_mod.current_vllm_platform = real
    else:
        w.register_kv_caches(caches)
    assert w.setup is not None and w.setup.local_views is not None
    return w, [Pair(v) for v in w.setup.local_views]  # as the worker sees them (probed CPU packing)


def remote_params(p: LLMDConnectorWorker, rid: str, block_ids: list[int], num_tokens: int) -> RemotePrefill:
    md = p.handshake_metadata()
    assert md is not None
    return RemotePrefill(
        do_remote_prefill=True,
        remote_engine_id=p.engine_id,
        remote_request_id=rid,
        remote_block_ids=[block_ids],
        remote_host=md.host,
        remote_port=md.port,
        remote_num_tokens=num_tokens,
        remote_block_size=p.block_size,
    )


def pull(d: LLMDConnectorWorker, job: RecvJob, p: LLMDConnectorWorker | None = None) -> tuple[set, set]:
    d.start_load_kv(LLMDConnectorMetadata(recv=[job]))
    done: set[str] = set()
    failed: set[str] = set()

    def finished() -> bool:
        r = d.transfer_results()
        done.update(r.finished_recving or ())
        failed.update(r.failed_recving or ())
        if p is not None:
            p.transfer_results()  # the prefill side drains its notifications
        return job.request_id in done

    wait_until(finished, 30, "the pull to finish", interval=0.02)
    return done - failed, failed


def check(views: list[torch.Tensor], blocks: list[int], first: int, end: int) -> None:
    s = views[0].shape[3]
    for layer, v in enumerate(views):
        for i, b in enumerate(blocks):
            lo = first + i * s
            cnt = min(s, end - lo)
            if cnt <= 0:
                break
            assert torch.equal(v[b, :, :, :cnt], token_values(layer, np.arange(lo, lo + cnt))), (layer, b)


def test_block_32_prefill_to_block_128_decode_is_re_laid_out() -> None:
    p, pv = make_worker("cpu", 16, 32)
    d, dv = make_worker("cpu", 8, 128)
    try:
        remote_ids = [9, 3, 12, 0, 5, 7, 1]  # 200 tokens in 7 blocks of 32
        fill(pv, remote_ids, 200)
        job = RecvJob("r1", remote_params(p, "r1", remote_ids, 200), [[6, 2]], [[]], first_token=0, end_token=200)
        ok, failed = pull(d, job, p)
        assert ok == {"r1"} and not failed
        check(dv, [6, 2], 0, 200)
        stats = d.get_stats()
        assert stats is not None
        assert stats.data["relayout_transfers"] == 1 and stats.data["transfers_ok"] == 1
        assert stats.data["bytes_read"] == 7 * LAYERS * 2 * HEADS * 32 * HEAD_SIZE * 2
        assert stats.data["relayout_bytes"] == 200 * LAYERS * 2 * HEADS * HEAD_SIZE * 2
        assert d._puller is not None and d._puller.pool.free_bytes == d._puller.pool.nbytes
        # the prefill side got the completion notice and released the lease it held
        p.start_load_kv(LLMDConnectorMetadata(send={"r1": 30.0}))
        assert "r1" in (p.transfer_results().finished_sending or set())
    finally:
        p.shutdown()
        d.shutdown()


def test_rbln_prefill_stages_in_wait_for_save_then_a_cpu_engine_pulls() -> None:
    p, pv = make_worker("rbln-blocks-first", 6, 64)
    d, dv = make_worker("cpu", 12, 32)
    try:
        assert p.info is not None and p.info.platform == "rbln" and p.info.kv_layout is not None
        fill(pv, [4, 1], 100)
        p.stage_out({"r2": [4, 1]})  # what LLMDConnector.wait_for_save does with meta.stage
        job = RecvJob("r2", remote_params(p, "r2", [4, 1], 100), [[3, 8, 11, 0]], [[]], first_token=0, end_token=100)
        ok, _ = pull(d, job, p)
        assert ok == {"r2"}
        check(dv, [3, 8, 11, 0], 0, 100)
        stats = p.get_stats()
        assert stats is not None and stats.data["staged_out_bytes"] == 2 * LAYERS * 2 * HEADS * 64 * HEAD_SIZE * 2
    finally:
        p.shutdown()
        d.shutdown()


def test_rbln_to_rbln_pulls_directly_and_stages_onto_the_device() -> None:
    p, pv = make_worker("rbln-kv-first", 5, 64)
    d, dv = make_worker("rbln-kv-first", 5, 64)
    try:
        fill(pv, [2, 0], 120)
        p.stage_out({"r3": [2, 0]})
        job = RecvJob("r3", remote_params(p, "r3", [2, 0], 120), [[4, 1]], [[2, 0]], first_token=0, end_token=120)
        ok, _ = pull(d, job, p)
        assert ok == {"r3"}
        check(dv, [4, 1], 0, 120)  # on the (fake) device, not only in staging
        stats = d.get_stats()
        assert stats is not None and stats.data.get("relayout_transfers", 0) == 0 and stats.data["staged_in_bytes"]
    finally:
        p.shutdown()
        d.shutdown()


def test_an_unmappable_peer_is_refused_with_the_fields_named_and_the_pull_fails() -> None:
    import msgspec

    p, _ = make_worker("cpu", 8, 32)
    d, _ = make_worker("cpu", 8, 64)
    assert p.info is not None and p.info.kv_layout is not None
    liar = HandshakeServer(
        msgspec.structs.replace(p.info, kv_layout=msgspec.structs.replace(p.info.kv_layout, num_kv_heads=4)),
        "127.0.0.1",
        0,
    )
    try:
        params = msgspec.structs.replace(
            remote_params(p, "r4", [1, 2], 60), remote_port=int(liar.endpoint.rsplit(":", 1)[1])
        )
        job = RecvJob("r4", params, [[3]], [[]], first_token=0, end_token=60)
        ok, failed = pull(d, job)
        assert failed == {"r4"} and not ok
        stats = d.get_stats()
        assert stats is not None and stats.data["handshakes_failed"] == 1 and stats.data["transfers_failed"] == 1
    finally:
        liar.close()
        p.shutdown()
        d.shutdown()


def test_relayout_off_refuses_peers_laid_out_differently(caplog: pytest.LogCaptureFixture) -> None:
    p, _ = make_worker("cpu", 8, 32)
    d, _ = make_worker("cpu", 8, 64, relayout_buffer_mb=0)
    try:
        job = RecvJob("r5", remote_params(p, "r5", [1, 2], 60), [[3]], [[]], first_token=0, end_token=60)
        _, failed = pull(d, job)
        assert failed == {"r5"}
        assert "block_size: local=64 remote=32" in caplog.text and "relayout_buffer_mb" in caplog.text
    finally:
        p.shutdown()
        d.shutdown()


def test_the_scheduler_stages_a_prefill_the_step_its_prompt_completes_on_rbln(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked prefill over three steps: the block ids vLLM hands out accumulate, and only the step
    that completes the prompt carries them to the worker (whose wait_for_save copies them out)."""
    from vllm_llmd.connectors import platform as platform_mod
    from vllm_llmd.connectors.scheduler import LLMDConnectorScheduler

    monkeypatch.setattr(platform_mod, "current_vllm_platform", lambda: fakes.RblnPlatform)
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(engine_id="npu", is_kv_producer=True, is_kv_consumer=False),
        cache_config=SimpleNamespace(block_size=64),
    )
    s = LLMDConnectorScheduler(vllm_config, LLMDConnectorConfig())  # type: ignore[arg-type]
    assert s.stages
    req = SimpleNamespace(
        request_id="p1",
        kv_transfer_params={"do_remote_decode": True},
        num_computed_tokens=0,
        num_prompt_tokens=300,
        is_finished=lambda: False,
    )
    other = SimpleNamespace(request_id="x", kv_transfer_params=None, num_computed_tokens=0, num_prompt_tokens=10)
    s.update_state_after_alloc(req, None, 0)  # type: ignore[arg-type]
    s.update_state_after_alloc(other, None, 0)  # type: ignore[arg-type]

    def step(new, cached, scheduled):
        return SimpleNamespace(
            scheduled_new_reqs=new,
            scheduled_cached_reqs=SimpleNamespace(
                req_ids=[c[0] for c in cached], new_block_ids=[c[1] for c in cached], resumed_req_ids=set()
            ),
            num_scheduled_tokens=scheduled,
        )

    m1 = s.build_connector_meta(step([SimpleNamespace(req_id="p1", block_ids=([7, 2],))], [], {"p1": 128}))
    req.num_computed_tokens = 128
    m2 = s.build_connector_meta(step([], [("p1", ([5, 9],))], {"p1": 128}))
    req.num_computed_tokens = 256
    m3 = s.build_connector_meta(step([], [("p1", ([3],))], {"p1": 44}))
    assert m1.stage == {} and m2.stage == {} and m3.stage == {"p1": [2, 3, 5, 7, 9]}
    assert s.build_connector_meta(step([], [], {})).stage == {}  # staged once
    # elsewhere (CPU, CUDA) nothing is tracked
    monkeypatch.setattr(platform_mod, "current_vllm_platform", lambda: None)
    assert not LLMDConnectorScheduler(vllm_config, LLMDConnectorConfig()).stages  # type: ignore[arg-type]


def test_a_d2d_worker_publishes_only_after_vllm_rbln_finalizes_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """rbln_path d2d: nothing is registered or served until the runner calls
    finalize_kv_cache_registration after warm-up (as vllm-rbln's own connector defers it)."""
    import nixl._api

    monkeypatch.setattr(nixl._api, "nixl_agent", fakes.FakeNixlAgent)
    adapter = fakes.FakeNixlRbln(areas=2, alias_ucx=True)
    with fakes.installed(nixl_rbln=adapter):
        w, _ = make_worker("rbln-blocks-first", 4, 64, rbln_path="d2d")
        try:
            assert w.info is None and w.server is None and not adapter.register_calls
            w.finalize_registration()
            assert w.info is not None and w.server is not None and len(adapter.register_calls) == 1
            assert w.info.memory == "VRAM" and w.info.backends[0] == "RBLN"
            assert w.info.kv_layout is None  # areas split the blocks: NPU peers of the same geometry only
            assert len(w.info.regions) == LAYERS * 2 and w.region_groups == [0] * (LAYERS * 2)
        finally:
            w.shutdown()


def test_the_runners_copy_op_reaches_the_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    w, views = make_worker("rbln-blocks-first", 4, 64)
    calls = []

    def op(src, dst, src_ids, dst_ids, direction):  # type: ignore[no-untyped-def]
        calls.append(direction)
        fakes.copy_host_device_kv_blocks(src, dst, src_ids, dst_ids, direction, block_axes=dict.fromkeys(src, 0))

    try:
        w.set_copy_op(op)
        fill(views, [1], 64)
        w.stage_out({"r": [1]})
        assert calls == ["d2h"]
    finally:
        w.shutdown()


# ---- the receive pool under pressure, over the in-process fake transport (tests/unit/fake_transport.py):
# reads that stay pending, fail or outlive their deadline cannot be arranged with real UCX on one host

#: 7 prefill blocks of 32 tokens: 112 KiB read per pull (2 layers, K and V, 2 heads x 32 dims, bf16),
#: so a 160 KiB receive pool holds one such pull at a time
POOL_TOKENS, POOL_BYTES = 200, 160 << 10


@pytest.fixture
def fabric(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from fake_transport import Fabric, FakeTransport
    from vllm_llmd.connectors import worker as worker_mod

    fab = Fabric()
    monkeypatch.setattr(worker_mod, "make_transport", lambda name, memory, **kw: FakeTransport(fab, memory))
    return fab


def _small_pool_pair(**extra: object) -> tuple[LLMDConnectorWorker, list, LLMDConnectorWorker, list]:
    """P (block 32) and D (block 64) whose receive pool holds ``POOL_BYTES`` (``relayout_buffer_mb``
    counts whole MiB: the puller is built here with less, as the worker would on its first pull)."""
    from vllm_llmd.connectors.xpull import CrossLayoutPuller

    p, pv = make_worker("cpu", 16, 32)
    d, dv = make_worker("cpu", 12, 64, **extra)
    assert d.transport is not None and d.setup is not None and d.setup.local_views is not None
    d._puller = CrossLayoutPuller(d.transport, d.setup.local_views, POOL_BYTES)
    return p, pv, d, dv


def _pool_jobs(p: LLMDConnectorWorker, pv: list) -> list[RecvJob]:
    jobs = []
    for n, rid in enumerate(("ra", "rb")):
        remote = list(range(7 * n, 7 * n + 7))
        fill(pv, remote, POOL_TOKENS)
        local = [list(range(4 * n, 4 * n + 4))]  # 4 blocks of 64 tokens
        jobs.append(RecvJob(rid, remote_params(p, rid, remote, POOL_TOKENS), local, [[]], end_token=POOL_TOKENS))
    return jobs


def test_a_relayout_pull_waits_for_room_in_the_receive_pool_then_lands(fabric) -> None:  # type: ignore[no-untyped-def]
    p, pv, d, dv = _small_pool_pair()
    try:
        fabric.hold = True  # reads stay in flight until the test completes them
        d.start_load_kv(LLMDConnectorMetadata(recv=_pool_jobs(p, pv)))
        r = d.transfer_results()
        assert not r.finished_recving and not r.failed_recving
        assert len(fabric.pending()) == 1 and len(d._waiting) == 1  # the second pull waits for room
        done: set[str] = set()

        def landed() -> bool:
            fabric.complete()
            r = d.transfer_results()
            assert not r.failed_recving
            done.update(r.finished_recving or ())
            return done == {"ra", "rb"}

        wait_until(landed, 10, "both pulls to land", interval=0.01)
        check(dv, [0, 1, 2, 3], 0, POOL_TOKENS)
        check(dv, [4, 5, 6, 7], 0, POOL_TOKENS)
        assert d._puller is not None and d._puller.pool.free_bytes == d._puller.pool.nbytes
        stats = d.get_stats()
        assert stats is not None and stats.data["relayout_transfers"] == 2
    finally:
        p.shutdown()
        d.shutdown()


def test_a_failed_relayout_read_frees_its_slot_and_the_peer_is_handshaken_again(fabric) -> None:  # type: ignore[no-untyped-def]
    p, pv, d, dv = _small_pool_pair()
    try:
        first, second = _pool_jobs(p, pv)
        fabric.hold = True
        d.start_load_kv(LLMDConnectorMetadata(recv=[first]))
        fabric.fail()
        r = d.transfer_results()
        assert r.failed_recving == {"ra"}
        assert d._puller is not None and d._puller.pool.free_bytes == d._puller.pool.nbytes
        assert p.engine_id not in d._links
        fabric.hold = False
        ok, failed = pull(d, second, p)
        assert ok == {"rb"} and not failed
        check(dv, [4, 5, 6, 7], 0, POOL_TOKENS)
    finally:
        p.shutdown()
        d.shutdown()


def test_relayout_pulls_past_their_deadline_fail_and_never_outgrow_the_pool(fabric) -> None:  # type: ignore[no-untyped-def]
    """One pull in flight, one waiting for room: both are given up at the deadline (the one in flight
    cancelled, its slot freed); a pull larger than the whole pool is refused at once."""
    p, pv, d, _ = _small_pool_pair(transfer_timeout_seconds=0.3)
    try:
        fabric.hold = True
        d.start_load_kv(LLMDConnectorMetadata(recv=_pool_jobs(p, pv)))
        failed: set[str] = set()

        def given_up() -> bool:
            failed.update(d.transfer_results().failed_recving or ())
            return failed == {"ra", "rb"}

        wait_until(given_up, 5, "both pulls given up", interval=0.02)
        assert fabric.cancelled == 1 and not d._waiting
        assert d._puller is not None and d._puller.pool.free_bytes == d._puller.pool.nbytes
        huge = list(range(14))  # 224 KiB: more than the pool holds
        params = remote_params(p, "rc", huge, 2 * POOL_TOKENS)
        job = RecvJob("rc", params, [list(range(7))], [[]], end_token=2 * POOL_TOKENS)
        d.start_load_kv(LLMDConnectorMetadata(recv=[job]))
        assert d.transfer_results().failed_recving == {"rc"}
        assert len(fabric.pending()) == 0  # nothing was read
    finally:
        p.shutdown()
        d.shutdown()


def test_a_prefill_worker_parks_and_still_serves_reads_announced_by_its_side_channel_or_scheduler() -> None:
    """The idle connector: the prefill worker's UCX progress parks while nothing can need it, yet
    (1) a decode worker's first pull, which arrives with no lease and without the prefill worker
    stepping, lands (the handshake opened a read window), and (2) once that window has ended, a
    step computing a prefill for a remote decode wakes it before the lease is announced."""
    p, pv = make_worker("cpu", 16, 32, transfer_timeout_seconds=1.5)  # the link window: 1.5 s
    d, dv = make_worker("cpu", 16, 32)
    assert p.transport is not None
    progress = p.transport._progress  # type: ignore[attr-defined]
    try:
        p.transfer_results()  # a step with nothing held: parked
        assert not progress.awake()
        fill(pv, [9, 3], 64)
        first = RecvJob("r1", remote_params(p, "r1", [9, 3], 64), [[6, 2]], [[9, 3]], first_token=0, end_token=64)
        assert pull(d, first) == ({"r1"}, set())  # p never steps: the side channel's window serves it
        check(dv, [6, 2], 0, 64)
        wait_until(lambda: not progress.awake(), 10, "the link window to end", interval=0.02)
        p.start_load_kv(LLMDConnectorMetadata(producing=True))  # a remote decode's prefill this step
        p.transfer_results()
        assert progress.awake()
        fill(pv, [4], 32)
        second = RecvJob("r2", remote_params(p, "r2", [4], 32), [[5]], [[4]], first_token=0, end_token=32)
        assert pull(d, second) == ({"r2"}, set())
        check(dv, [5], 0, 32)
        p.start_load_kv(LLMDConnectorMetadata(send={"r1": 30.0, "r2": 30.0}))  # the leases, late
        released: set[str] = set()

        def both_released() -> bool:
            released.update(p.transfer_results().finished_sending or ())
            return {"r1", "r2"} <= released

        wait_until(both_released, 10, "both leases released by the decode side's notices", interval=0.02)
        assert not progress.awake()  # nothing held, nothing computed for a remote decode: parked again
    finally:
        p.shutdown()
        d.shutdown()
