"""KVBlockIndex against a broken or hostile event stream (issue 9, cases 7 and 8): what used to wipe
a pod, grow the index without bound, or hold its lock for seconds."""

from __future__ import annotations

import os

from test_index import MODEL, Engine, pod_topic, prompt

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.wire import encode_batch, seq_to_bytes


# ---- case 8: only a well-formed batch moves the stream -----------------------------------------
def test_a_garbage_payload_with_a_lower_seq_does_not_wipe_the_pod() -> None:
    """No replay endpoint: before, one frame with the right topic, an old seq and a garbage payload
    was taken for an engine restart and dropped everything the pod held."""
    idx = KVBlockIndex(block_size=32)
    e = Engine(idx, "a:1", 32)
    toks = prompt(128, seed=3)
    e.store(toks[:64])
    e.store(toks)
    held = idx.match(MODEL, toks)["a:1"].tokens
    last = idx.last_seq("a:1")
    for seq in (0, 1, last, 2**63 + 5, 2**64 - 1):
        for payload in (b"\x00\xff junk", os.urandom(64), b"\x93\xa1x\xa1y\xc0", encode_batch([])[:-1]):
            idx.ingest("a:1", [pod_topic("a:1"), seq_to_bytes(seq) if seq < 2**63 else seq.to_bytes(8, "big"), payload])
    assert idx.match(MODEL, toks)["a:1"].tokens == held
    s = idx.stats()
    assert s.resets == 0 and s.decode_errors >= 20 and idx.last_seq("a:1") == last
    e.store(prompt(64, seed=4))  # and the real stream goes on without a gap or a reset
    s = idx.stats()
    assert s.resets == 0 and s.seq_gaps == 0 and idx.match(MODEL, toks)["a:1"].tokens == held


def test_a_well_formed_batch_with_a_lower_seq_still_means_a_restart() -> None:
    idx = KVBlockIndex(block_size=32)
    e = Engine(idx, "a:1", 32)
    old = prompt(64, seed=5)
    e.store(old)
    e.store(prompt(64, seed=6))
    e.seq = 0
    e.send([])  # an empty but well-formed batch from a new engine process
    assert idx.stats().resets == 1 and "a:1" not in idx.match(MODEL, old)
