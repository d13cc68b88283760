"""P/D request logic (vllm_llmd.pd): the two legs and the selective decision."""

from __future__ import annotations

import pytest

from vllm_llmd.pd import (
    PDError,
    build_decode_request,
    build_prefill_request,
    should_disaggregate,
    strip_client_kv_params,
)

PREFILL_RESPONSE = {
    "choices": [{"text": "x"}],
    "kv_transfer_params": {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "eng-p",
        "remote_request_id": "cmpl-1",
        "remote_block_ids": [[1, 2, 3]],
        "remote_host": "10.0.0.7",
        "remote_port": 5600,
        "remote_num_tokens": 90,
        "remote_block_size": 32,
    },
}


def test_client_kv_params_are_stripped_everywhere_and_input_untouched():
    body = {
        "prompt": "p",
        "kv_transfer_params": {"remote_host": "evil.example"},
        "extra_body": {"kv_transfer_params": {"remote_host": "evil.example"}, "keep": 1},
    }
    out = strip_client_kv_params(body)
    assert "kv_transfer_params" not in out and out["extra_body"] == {"keep": 1}
    assert body["kv_transfer_params"] == {"remote_host": "evil.example"}  # not mutated


def test_prefill_leg_computes_one_token_unstreamed_and_asks_for_remote_decode():
    body = {"model": "m", "prompt": "p", "max_tokens": 64, "stream": True, "stream_options": {}, "n": 1}
    leg = build_prefill_request(body)
    assert leg["max_tokens"] == 1 and leg["stream"] is False
    assert "stream_options" not in leg and "n" not in leg and "max_completion_tokens" not in leg
    assert leg["kv_transfer_params"]["do_remote_decode"] is True
    assert leg["kv_transfer_params"]["remote_host"] is None
    chat = build_prefill_request({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9})
    assert chat["max_completion_tokens"] == 1 and chat["max_tokens"] == 1


def test_decode_leg_carries_only_the_prefill_engines_params():
    body = {"prompt": "p", "max_tokens": 64, "stream": True, "kv_transfer_params": {"remote_host": "evil"}}
    leg = build_decode_request(body, PREFILL_RESPONSE)
    assert leg["kv_transfer_params"]["remote_host"] == "10.0.0.7"
    assert leg["max_tokens"] == 64 and leg["stream"] is True


@pytest.mark.parametrize(
    "response",
    [
        {},
        {"kv_transfer_params": "nope"},
        {"kv_transfer_params": {"do_remote_prefill": False}},
        {"kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "e"}},
        # what the decode engine's connector would refuse, the router refuses too (one check)
        {"kv_transfer_params": {**PREFILL_RESPONSE["kv_transfer_params"], "remote_block_ids": [[-1]]}},
        {"kv_transfer_params": {**PREFILL_RESPONSE["kv_transfer_params"], "remote_host": "tcp://h:1/x"}},
        {"kv_transfer_params": {**PREFILL_RESPONSE["kv_transfer_params"], "remote_port": "5600"}},
    ],
)
def test_unusable_prefill_response_is_a_clear_error(response):
    with pytest.raises(PDError):
        build_decode_request({"prompt": "p"}, response)


def test_selective_disaggregation():
    assert should_disaggregate(4096, 0, 256)
    assert not should_disaggregate(4096, 4000, 256)  # decode pod holds the prefix
    assert not should_disaggregate(100, 0, 256)  # short prompt
    assert not should_disaggregate(100, 500, 0)  # cached beyond the prompt counts as all cached
    with pytest.raises(ValueError):
        should_disaggregate(-1, 0, 0)
