"""The connector's scheduler half with real vLLM requests: hostile ``kv_transfer_params`` (issue 9,
case 2) are refused with one log line and the request is served locally; nothing raises."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from connector_parts import BLOCK, blocks, finish, remote_params, request, scheduler

from vllm_llmd.wire import RemotePrefill

HOSTILE: dict[str, Any] = {
    "a string (vllm_xargs)": "anything",
    "a number (vllm_xargs)": 7,
    "a float (vllm_xargs)": 1.5,
    "a list (vllm_xargs)": ["do_remote_prefill", 1],
    "flag not a bool": {"do_remote_prefill": "yes"},
    "both flags": {"do_remote_prefill": True, "do_remote_decode": True},
    "missing fields": {"do_remote_prefill": True},
    "block ids not lists": remote_params(remote_block_ids=[1, 2, 3]),
    "negative block id": remote_params(remote_block_ids=[[-1, 2]]),
    "block id beyond 2^31": remote_params(remote_block_ids=[[1 << 40]]),
    "huge block list": remote_params(remote_block_ids=[list(range(100_000))]),
    "too many groups": remote_params(remote_block_ids=[[1]] * 5),
    "port as a string": remote_params(remote_port="5600"),
    "port out of range": remote_params(remote_port=70_000),
    "host injection": remote_params(remote_host="127.0.0.1:1/x"),
    "unspecified host": remote_params(remote_host="0.0.0.0"),
    "multicast host": remote_params(remote_host="224.0.0.1"),
    "more blocks than their block size needs": remote_params(remote_block_size=BLOCK * 2),
    "tokens beyond max model len": remote_params(remote_num_tokens=10**9),
    "negative tokens": remote_params(remote_num_tokens=-5),
    "tp size 2": remote_params(tp_size=2),
    "infinite lease": remote_params(lease_expires_at=float("inf")),
    "too many keys": {f"k{i}": i for i in range(100)} | {"do_remote_prefill": True},
    "nested junk": remote_params(remote_engine_id={"$ne": 1}),
}


@pytest.mark.parametrize("params", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_params_are_refused_at_every_entry_point(params: Any, caplog: pytest.LogCaptureFixture) -> None:
    s = scheduler()
    req = request(params, xargs=True)
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_llmd.connectors"):
        assert s.admit(req) is None  # what vLLM's on_new_request hook runs
        assert req.kv_transfer_params is None  # vLLM's own scheduler then reads None, not the junk
        assert s.get_num_new_matched_tokens(req, 0) == (0, False)
        s.update_state_after_alloc(req, blocks([1, 2]), 0)
        assert s.request_finished(finish(req, 200), ([1, 2],)) == (False, None)
    refusals = [r for r in caplog.records if "refused kv_transfer_params" in r.getMessage()]
    assert len(refusals) == 1, caplog.text  # one clear line per request
    assert "serving it locally" in refusals[0].getMessage()
    assert s.build_connector_meta().recv == []  # nothing to pull, nothing to dial
    assert s.get_stats().data["kv_params_refused"] == 1


def test_entry_points_called_without_admit_refuse_too() -> None:
    """An engine whose vLLM does not call on_new_request (older versions) is protected as well."""
    s = scheduler()
    req = request("anything")
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert req.kv_transfer_params is None
    req = request(7)
    assert s.request_finished(finish(req, 200), ([1],)) == (False, None)


def test_a_flood_of_bad_requests_logs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    s = scheduler()
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_llmd.connectors"):
        for i in range(500):
            s.admit(request("x", rid=f"r{i}"))
    assert len([r for r in caplog.records if r.name == "vllm.vllm_llmd.connectors"]) == 10
    assert s.get_stats().data["kv_params_refused"] == 500


def test_allowed_peers_limits_where_a_decode_engine_dials() -> None:
    s = scheduler(allowed_peers=["10.1.0.0/16", "prefill-0.svc"])
    assert isinstance(s.admit(request(remote_params(remote_host="10.1.2.3"))), RemotePrefill)
    assert isinstance(s.admit(request(remote_params(remote_host="prefill-0.svc"))), RemotePrefill)
    req = request(remote_params(remote_host="10.2.0.1"))
    assert s.admit(req) is None and req.kv_transfer_params is None
    assert s.admit(request(remote_params(remote_host="evil.example"))) is None


def test_well_formed_params_still_pull() -> None:
    s = scheduler()
    req = request(remote_params(), tokens=200)
    assert isinstance(s.admit(req), RemotePrefill)
    assert s.get_num_new_matched_tokens(req, 64) == (136, True)
    s.update_state_after_alloc(req, blocks([5, 6, 7, 8, 9, 10, 11], cached=2), 136)
    [job] = s.build_connector_meta().recv
    assert job.refused is None and job.local_block_ids == [[7, 8, 9, 10, 11]]
    assert job.remote_block_ids == [[12, 13, 14, 15, 16]]  # the remote blocks after the 2 cached ones
    assert req.kv_transfer_params["do_remote_prefill"] is False  # one pull per request


def test_another_block_size_is_refused_only_when_no_re_layout_can_bridge_it() -> None:
    """``relayout_buffer_mb: 0``: a prefill engine of another block size is refused up front; with a
    receive pool the request is admitted and the worker gets the token range to map (whether this
    peer can be re-laid out is the handshake's call)."""
    params = remote_params(remote_block_size=BLOCK * 4, remote_block_ids=[[40, 41]], remote_num_tokens=200)
    s = scheduler(relayout_buffer_mb=0)
    req = request(dict(params))
    assert s.admit(req) is None and req.kv_transfer_params is None
    s = scheduler()
    req = request(dict(params), tokens=200)
    assert isinstance(s.admit(req), RemotePrefill)
    assert s.get_num_new_matched_tokens(req, BLOCK) == (200 - BLOCK, True)
    s.update_state_after_alloc(req, blocks([5, 6, 7, 8, 9, 10, 11], cached=1), 200 - BLOCK)
    [job] = s.build_connector_meta().recv
    assert job.refused is None and job.local_block_ids == [[6, 7, 8, 9, 10, 11]]
    assert job.remote_block_ids == [[]]  # mapped by the worker, over remote.remote_block_ids
    assert (job.first_token, job.end_token) == (BLOCK, 200)


def test_another_block_size_with_too_few_remote_blocks_is_reported_failed() -> None:
    s = scheduler()
    req = request(remote_params(remote_block_size=BLOCK * 4, remote_block_ids=[[40]], remote_num_tokens=200))
    assert s.get_num_new_matched_tokens(req, 0) == (200, True)
    s.update_state_after_alloc(req, blocks([1, 2, 3, 4, 5, 6, 7]), 200)
    [job] = s.build_connector_meta().recv
    assert job.refused and "too few blocks" in job.refused


def test_too_few_remote_blocks_for_what_vllm_allocated_is_reported_failed_not_left_waiting() -> None:
    s = scheduler()
    req = request(remote_params(remote_block_ids=[[10, 11]], remote_num_tokens=200))
    assert s.get_num_new_matched_tokens(req, 0) == (200, True)
    s.update_state_after_alloc(req, blocks([1, 2, 3, 4, 5, 6, 7]), 200)
    [job] = s.build_connector_meta().recv
    assert job.refused and "too few blocks" in job.refused  # the worker reports it failed: local prefill


def test_the_producer_answers_with_the_shared_wire_type() -> None:
    s = scheduler(role="kv_producer")
    req = finish(request({"do_remote_decode": True, "do_remote_prefill": False, "remote_host": None}), 200)
    delay, params = s.request_finished(req, ([3, 4, 5, 6, 7, 8, 9],))
    assert delay is True and params is not None
    remote = RemotePrefill(**{k: v for k, v in params.items()})
    assert remote.remote_block_ids == [[3, 4, 5, 6, 7, 8, 9]] and remote.remote_num_tokens == 200
    assert remote.misfit(block_size=BLOCK, num_groups=1, max_tokens=8192) is None
    assert remote.misfit(block_size=BLOCK * 2, num_groups=1, max_tokens=8192)  # a block size must match
    assert remote.misfit(num_groups=1, max_tokens=8192) is None  # ... unless a re-layout can bridge it


def test_a_prefill_for_a_remote_decode_keeps_the_workers_progress_awake_until_its_lease_starts() -> None:
    """``meta.producing`` from vLLM's ``on_new_request`` until the request finishes: its params (and
    a decode engine's read) may leave before the lease in ``meta.send`` reaches the worker."""
    s = scheduler(role="kv_producer")
    plain = request(None, rid="plain")
    s.on_new_request(plain)
    assert s.build_connector_meta().producing is False  # a plain request: the thread may park
    req = request({"do_remote_decode": True, "do_remote_prefill": False, "remote_host": None})
    s.on_new_request(req)
    assert s.build_connector_meta().producing is True
    assert s.build_connector_meta().producing is True  # every step until it finishes
    delay, _ = s.request_finished(finish(req, 200), ([3, 4, 5, 6, 7, 8, 9],))
    meta = s.build_connector_meta()
    assert delay and meta.producing is False and "r1" in meta.send  # the lease takes over
    aborted = request({"do_remote_decode": True, "do_remote_prefill": False}, rid="r2")
    s.on_new_request(aborted)
    s.request_finished(aborted, ([],))  # finished before any block was computed: no lease
    assert s.build_connector_meta().producing is False
    consumer = scheduler(role="kv_consumer")  # a decode-only engine is never read from
    consumer.on_new_request(request({"do_remote_decode": True, "do_remote_prefill": False}, rid="r3"))
    assert consumer.build_connector_meta().producing is False
