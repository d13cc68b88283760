"""DRAM and disk KV tiers behind LLMDConnector on a real vLLM CPU engine (docs/tiers.md).

One engine with a small KV cache (24 blocks of 32 tokens), a DRAM tier of 64 blocks and a disk tier
(its default ``store_threshold`` 2: a block is written to disk from its second use on): a prefix
pushed out of the engine by other traffic comes back from DRAM, and (used twice, after more traffic)
from disk, while a prefix used once never reached the disk; the output is token-identical to the
prefix's first, fresh computation; vLLM counts the loaded tokens as external hits by source; the
tier gauges move; the KV events put the prefix's
blocks in the right tier of a KVBlockIndex; and the router's price learner prices the DRAM tier
from the engine's /metrics. Bad disk files (corrupt, missing) are recomputed. A P/D
hand-off whose prefill engine loads its prefix back from DRAM. A peer load: engine A of the shared
pair loads a prefix from the tier engine's DRAM tier without the tier engine computing anything, and
falls back to a local prefill (same tokens) when the holder lacks the blocks or is gone
(docs/peer-loading.md); the same load asked by the real router (``peer_loads``), with the holder's
own count of what it served. An unwritable disk path stops the engine at start-up with an error naming
the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_llmd.index import KVBlockIndex, KVEventSubscriber
from vllm_llmd.pd import build_decode_request, build_prefill_request
from vllm_llmd.router.pod_metrics import parse_metrics
from vllm_llmd.router.tier_prices import TierPriceLearner
from vllm_llmd.testing.engine import EngineProcess, EngineSpec, EngineStartError, dtype_bytes, engine_dtype
from vllm_llmd.testing.wait import wait_until, wait_until_async
from vllm_llmd.wire import PeerLoad

pytestmark = pytest.mark.engine

MODEL = "test-model"
BLOCK = 32
PREFIX_BLOCKS = 8
DRAM_BLOCKS = 64
#: one engine block of the tiny test model: 2 layers x 2 KV heads x 32 tokens x 128 (K|V) x the
#: engines' element size (2 bytes in bf16, 4 in float32: vllm_llmd.testing.engine.engine_dtype)
BLOCK_BYTES = 2 * 2 * BLOCK * 128 * dtype_bytes(engine_dtype())


@dataclass
class TierEngine:
    engine: EngineProcess
    disk: Path
    idx: KVBlockIndex
    sub: KVEventSubscriber

    @property
    def url(self) -> str:
        return self.engine.url

    @property
    def pod(self) -> str:
        return f"127.0.0.1:{self.engine.spec.port}"

    def tiers_of(self, tokens: list[int]) -> list[str]:
        m = self.idx.match(MODEL, tokens).get(self.pod)
        return [] if m is None else m.tiers


@pytest.fixture(scope="module")
def tiered(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TierEngine]:
    disk = tmp_path_factory.mktemp("tiers") / "kv"
    tiers = {
        "dram": {"capacity": DRAM_BLOCKS * BLOCK_BYTES},
        "disk": {"path": str(disk), "capacity": "64MiB"},
        "tenant": {"source": "cache_salt", "top_k": 4},
    }
    spec = EngineSpec(
        model=test_model_dir,
        block_size=BLOCK,
        num_gpu_blocks=24,
        max_model_len=512,
        kv_transfer_config={
            "kv_connector": "LLMDConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"tiers": tiers},
        },
        extra_args=["--enforce-eager"],
    )
    engine = EngineProcess(spec, tmp_path_factory.mktemp("tier-logs") / "engine.log")
    idx = KVBlockIndex(block_size=BLOCK)
    sub = KVEventSubscriber(idx)
    try:
        engine.start_ready()
        sub.add_pod(f"127.0.0.1:{spec.port}", spec.events_endpoint, spec.replay_endpoint)
        sub.start()
        yield TierEngine(engine, disk, idx, sub)
    finally:
        sub.stop()
        engine.stop()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _text(url: str) -> str:
    return urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()


def _metric(url: str, name: str, **labels: str) -> float:
    text = _text(url)
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _prompt(blocks: int = PREFIX_BLOCKS, tail: int = 8) -> list[int]:
    rng = random.Random()
    return [rng.randrange(10, 4086) for _ in range(blocks * BLOCK + tail)]


def _complete(url: str, tokens: list[int], max_tokens: int = 8, **extra: object) -> list[int]:
    body = {"model": MODEL, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    out = _post(url, {**body, **extra})
    return out["choices"][0]["token_ids"]


def _fill(url: str, n: int) -> None:
    """Unique traffic: ``n`` prompts of 9 blocks each, pushing older blocks out of the engine's cache."""
    for _ in range(n):
        _complete(url, _prompt(), max_tokens=1)


def _counters(url: str) -> dict[str, float]:
    return {
        "ext": _metric(url, "vllm:external_prefix_cache_hits_total"),
        "local": _metric(url, "vllm:prefix_cache_hits_total"),
        "host": _metric(url, "vllm:prompt_tokens_cached_by_source_total", source="host"),
        "disk": _metric(url, "vllm:prompt_tokens_cached_by_source_total", source="disk"),
        "promoted": _metric(url, "llmd:kv_tier_promoted_blocks_total", tier="disk"),
        "loaded_dram": _metric(url, "llmd:kv_tier_loaded_tokens_total", tier="dram"),
        "loaded_disk": _metric(url, "llmd:kv_tier_loaded_tokens_total", tier="disk"),
        "disk_stored": _metric(url, "llmd:kv_tier_stored_blocks_total", tier="disk"),
    }


def _delta(url: str, before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in _counters(url).items()}


def _wait_for_tiers(t: TierEngine, tokens: list[int], tier: str) -> None:
    want = [tier] * PREFIX_BLOCKS
    wait_until(lambda: t.tiers_of(tokens) == want, 30, f"the index to hold the prefix in {tier} only", interval=0.1)


def _wait_stored_on_disk(t: TierEngine, before: float, blocks: int) -> None:
    wait_until(
        lambda: _metric(t.url, "llmd:kv_tier_stored_blocks_total", tier="disk") >= before + blocks,
        30,
        f"{blocks} more blocks written to the disk tier",
        interval=0.1,
    )


def test_a_prefix_evicted_from_the_engine_comes_back_from_dram(tiered: TierEngine):
    p = _prompt()
    fresh = _complete(tiered.url, p)
    wait_until(lambda: tiered.tiers_of(p)[:1] == ["GPU"], 30, "the index to see the prefix in the engine")
    _fill(tiered.url, 4)  # 36 blocks through a 24-block cache
    _wait_for_tiers(tiered, p, "CPU")  # out of the engine, in the DRAM tier
    assert _metric(tiered.url, "llmd:kv_tier_blocks", tier="dram") >= PREFIX_BLOCKS
    assert _metric(tiered.url, "llmd:kv_tier_bytes", tier="dram") >= PREFIX_BLOCKS * BLOCK_BYTES
    assert _metric(tiered.url, "llmd:kv_tier_capacity_blocks", tier="dram") == DRAM_BLOCKS
    before = _counters(tiered.url)
    learner = TierPriceLearner()  # what the router learns from this engine's /metrics
    learner.observe(parse_metrics(_text(tiered.url)))
    again = _complete(tiered.url, p)
    assert again == fresh
    d = _delta(tiered.url, before)
    loaded = PREFIX_BLOCKS * BLOCK
    assert d["local"] == 0 and d["ext"] == loaded and d["host"] == loaded and d["disk"] == 0, d
    assert d["loaded_dram"] == loaded
    assert _metric(tiered.url, "llmd:kv_tier_load_seconds_count", tier="dram") >= 1
    # the router prices this pod's DRAM tier from the load just made: below a miss
    prices = learner.observe(parse_metrics(_text(tiered.url)))
    assert learner.speeds()["dram"] is not None and learner.speeds()["prefill"] is not None, learner.speeds()
    assert 0 < prices.of("CPU") < 1
    wait_until(lambda: tiered.tiers_of(p) == ["GPU"] * PREFIX_BLOCKS, 30, "the prefix back in the engine")


def test_a_prefix_evicted_from_dram_comes_back_from_disk(tiered: TierEngine):
    q, once = _prompt(), _prompt()
    stored = _metric(tiered.url, "llmd:kv_tier_stored_blocks_total", tier="disk")
    skipped = _metric(tiered.url, "llmd:kv_tier_skipped_blocks_total", tier="disk")
    fresh = _complete(tiered.url, q)
    _complete(tiered.url, once)
    # q's second use hits the engine's cache and offers its blocks to the tiers again: now written to disk
    assert _complete(tiered.url, q) == fresh
    _wait_stored_on_disk(tiered, stored, PREFIX_BLOCKS)
    _fill(tiered.url, 9)  # 72 prompt blocks through a 64-block DRAM tier
    _wait_for_tiers(tiered, q, "STORAGE")
    # the prefix used once left DRAM too, and was never written to disk (store_threshold 2)
    wait_until(lambda: tiered.tiers_of(once) == [], 30, "the once-used prefix out of every tier", interval=0.1)
    on_disk = {p.name for p in tiered.disk.rglob("*.bin")}
    assert not on_disk & set(_block_names(once)) and set(_block_names(q)) <= on_disk
    # skipped: q's first offer, the once-used prefix and the fill traffic, 8 blocks each at least
    assert _metric(tiered.url, "llmd:kv_tier_skipped_blocks_total", tier="disk") >= skipped + 11 * PREFIX_BLOCKS
    assert _metric(tiered.url, "llmd:kv_tier_evicted_blocks_total", tier="dram") > 0
    assert _metric(tiered.url, "llmd:kv_tier_blocks", tier="disk") >= PREFIX_BLOCKS
    before = _counters(tiered.url)
    again = _complete(tiered.url, q)
    assert again == fresh
    d = _delta(tiered.url, before)
    loaded = PREFIX_BLOCKS * BLOCK
    assert d["local"] == 0 and d["ext"] == loaded and d["disk"] == loaded and d["host"] == 0, d
    assert d["promoted"] == PREFIX_BLOCKS and d["loaded_disk"] == loaded
    assert _metric(tiered.url, "llmd:kv_tier_load_seconds_count", tier="disk") >= 1


def _block_names(tokens: list[int]) -> list[str]:
    """The prefix's block file names, in prefix order: the blocks' hashes as the engine computes them
    (vLLM's own hash_block_tokens, sha256: the engine's default --prefix-caching-hash-algo)."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils

    kv_cache_utils.init_none_hash(sha256)
    parent, names = None, []
    for b in range(PREFIX_BLOCKS):
        parent = kv_cache_utils.hash_block_tokens(sha256, parent, tokens[b * BLOCK : (b + 1) * BLOCK])
        names.append(bytes(parent).hex() + ".bin")
    return names


def _block_files(t: TierEngine, tokens: list[int]) -> list[Path]:
    """The prefix's block files, in prefix order."""
    names = _block_names(tokens)
    by_name = {p.name: p for p in t.disk.rglob("*.bin")}
    assert all(n in by_name for n in names), "every block of the prefix has its file"
    return [by_name[n] for n in names]


def _fresh_then_only_on_disk(t: TierEngine, tokens: list[int]) -> list[int]:
    stored = _metric(t.url, "llmd:kv_tier_stored_blocks_total", tier="disk")
    fresh = _complete(t.url, tokens)
    assert _complete(t.url, tokens) == fresh  # a second use: written to disk (store_threshold 2)
    _wait_stored_on_disk(t, stored, PREFIX_BLOCKS)
    _fill(t.url, 9)
    _wait_for_tiers(t, tokens, "STORAGE")
    return fresh


def test_a_corrupt_disk_file_is_recomputed_never_served(tiered: TierEngine):
    r = _prompt()
    fresh = _fresh_then_only_on_disk(tiered, r)
    files = _block_files(tiered, r)
    # flip one byte in the middle of the 4th block's KV (the header and the key stay valid)
    data = bytearray(files[3].read_bytes())
    data[len(data) // 2] ^= 0x40
    files[3].write_bytes(bytes(data))
    corrupt = _metric(tiered.url, "llmd:kv_tier_errors_total", tier="disk", kind="corrupt")
    before = _counters(tiered.url)
    assert _complete(tiered.url, r) == fresh
    d = _delta(tiered.url, before)
    assert _metric(tiered.url, "llmd:kv_tier_errors_total", tier="disk", kind="corrupt") == corrupt + 1
    assert d["disk"] == 3 * BLOCK, d  # the three blocks before the bad one, nothing after it
    # the bad file was deleted; the recomputed block was then stored again, correct this time
    wait_until(lambda: not files[3].exists() or files[3].read_bytes() != data, 30, "the corrupt file replaced")


def test_a_missing_disk_file_is_recomputed(tiered: TierEngine):
    r = _prompt()
    fresh = _fresh_then_only_on_disk(tiered, r)
    files = _block_files(tiered, r)
    for f in files:
        f.unlink()
    missing = _metric(tiered.url, "llmd:kv_tier_errors_total", tier="disk", kind="missing")
    before = _counters(tiered.url)
    assert _complete(tiered.url, r) == fresh
    assert _delta(tiered.url, before)["disk"] == 0
    assert _metric(tiered.url, "llmd:kv_tier_errors_total", tier="disk", kind="missing") == missing + PREFIX_BLOCKS


def test_hit_rate_per_tenant(tiered: TierEngine):
    import hashlib

    label = "salt:" + hashlib.sha256(b"tenant-a").hexdigest()[:12]
    p = _prompt()
    for _ in range(2):
        _complete(tiered.url, p, cache_salt="tenant-a")
    prompt = _metric(tiered.url, "llmd:kv_tenant_prompt_tokens_total", tenant=label)
    hits = _metric(tiered.url, "llmd:kv_tenant_hit_tokens_total", tenant=label, tier="engine")
    assert prompt == 2 * len(p) and hits == PREFIX_BLOCKS * BLOCK
    _fill(tiered.url, 4)
    _complete(tiered.url, p, cache_salt="tenant-a")
    assert _metric(tiered.url, "llmd:kv_tenant_hit_tokens_total", tenant=label, tier="dram") == PREFIX_BLOCKS * BLOCK
    assert "tenant-a" not in urllib.request.urlopen(tiered.url + "/metrics", timeout=60).read().decode()


def test_pd_prefill_engine_loads_its_prefix_from_dram_then_decode_pulls_it(tiered: TierEngine, engines):
    """The tier engine is the prefill side (kv_both), engine A of the shared pair (block 32) decodes."""
    decode = engines.a
    s = _prompt()
    body = {"model": MODEL, "prompt": s, "max_tokens": 8, "temperature": 0}
    reference = _post(tiered.url, body)["choices"][0]["text"]  # fresh, on the tier engine
    _fill(tiered.url, 4)
    _wait_for_tiers(tiered, s, "CPU")
    before = _counters(tiered.url)
    pulled = _metric(decode.url, "llmd:kv_transfer_bytes_total", memory="DRAM")
    prefill = _post(tiered.url, build_prefill_request(body))
    assert prefill["kv_transfer_params"]["do_remote_prefill"] is True
    assert _delta(tiered.url, before)["host"] == PREFIX_BLOCKS * BLOCK  # the prefill leg loaded it back
    decoded = _post(decode.url, build_decode_request(body, prefill))
    assert decoded["choices"][0]["text"] == reference
    wait_until(
        lambda: _metric(decode.url, "llmd:kv_transfer_bytes_total", memory="DRAM") > pulled,
        30,
        "the decode engine pulling the blocks",
    )


def _holder(url: str) -> tuple[str, str, int]:
    """The engine id and side channel the engine reports (``llmd:kv_endpoint_info``, what a router reads)."""
    for fam in text_string_to_metric_families(_text(url)):
        for s in fam.samples:
            if s.name == "llmd:kv_endpoint_info" and s.value == 1:
                host, _, port = s.labels["side_channel"].rpartition(":")
                return s.labels["engine_id"], host, int(port)
    raise AssertionError("no llmd:kv_endpoint_info on " + url)


def _peer_params(holder: tuple[str, str, int], tokens: int = PREFIX_BLOCKS * BLOCK) -> dict:
    return PeerLoad(True, holder[0], holder[1], holder[2], tokens, BLOCK).as_params()


def _peer_loads(url: str, holder: str) -> dict[str, float]:
    out = {r: _metric(url, "llmd:kv_peer_loads_total", peer=holder, result=r) for r in ("ok", "refused", "unreachable")}
    out["bytes"] = _metric(url, "llmd:kv_peer_load_bytes_total", peer=holder)
    return out


def _prompt_tokens(url: str) -> float:
    return _metric(url, "vllm:prompt_tokens_total")


def test_a_prefix_held_only_by_the_tier_engine_is_loaded_by_a_peer_from_its_dram_tier(tiered: TierEngine, engines):
    reader = engines.a  # block 32, kv_both, no tiers of its own
    p = _prompt()
    stored = _metric(tiered.url, "llmd:kv_tier_stored_blocks_total", tier="dram")
    fresh = _complete(tiered.url, p)
    wait_until(
        lambda: _metric(tiered.url, "llmd:kv_tier_stored_blocks_total", tier="dram") >= stored + PREFIX_BLOCKS,
        30,
        "the prefix stored in the DRAM tier",
    )
    holder = _holder(tiered.url)
    computed = _prompt_tokens(tiered.url)
    ext = _metric(reader.url, "vllm:external_prefix_cache_hits_total")
    before = _peer_loads(reader.url, holder[0])
    assert _complete(reader.url, p, kv_transfer_params=_peer_params(holder)) == fresh
    assert _metric(reader.url, "vllm:external_prefix_cache_hits_total") - ext == PREFIX_BLOCKS * BLOCK
    assert _prompt_tokens(tiered.url) == computed  # the holder computed nothing for it
    wait_until(lambda: _peer_loads(reader.url, holder[0])["ok"] == before["ok"] + 1, 30, "the peer load counted")
    assert _peer_loads(reader.url, holder[0])["bytes"] - before["bytes"] == PREFIX_BLOCKS * BLOCK_BYTES


def test_a_peer_load_of_blocks_the_holder_lacks_falls_back_to_a_local_prefill(tiered: TierEngine, engines):
    reader = engines.a
    holder = _holder(tiered.url)
    q = _prompt()
    before = _peer_loads(reader.url, holder[0])
    out = _complete(reader.url, q, kv_transfer_params=_peer_params(holder))
    wait_until(lambda: _peer_loads(reader.url, holder[0])["refused"] == before["refused"] + 1, 30, "the refusal")
    assert out == _complete(tiered.url, q)  # the same tokens as a fresh computation elsewhere


def _served(url: str, **reader: str) -> dict[str, float]:
    """What the holder reports it served (its ``llmd:kv_peer_pins`` / ``_served_*`` series; one
    ``reader=`` or all readers)."""
    return {
        "granted": _metric(url, "llmd:kv_peer_pins_total", event="granted", **reader),
        "blocks": _metric(url, "llmd:kv_peer_served_blocks_total", **reader),
        "bytes": _metric(url, "llmd:kv_peer_served_bytes_total", **reader),
    }


async def test_the_router_has_an_idle_pod_load_a_prefix_from_the_holders_dram_tier(
    tiered: TierEngine, engines, test_model_dir: Path, caplog: pytest.LogCaptureFixture
):
    """Router -> reader -> holder: the real router (``estimated-ttft`` with ``peer_loads``) in front of
    the tier engine (A, the holder) and engine A of the shared pair (B, no tiers). A is idle, and on
    its own the router would send the request to A (a DRAM load-back there is cheaper than a peer
    load plus B's prefill of the rest), so the test world declares A a slow pod: ``prefill_speed``
    0.01 in the router's pod config (speed learning off, so it stays that), which makes any work on
    A cost 100 times more. The router then prices B with a peer load from A cheapest, and B must get
    the router-built PeerLoad params, not a plain request. Engine calls run off the event loop the
    in-process router serves on."""
    from router_harness import pod_id, routed

    def off_loop(fn, *args):  # type: ignore[no-untyped-def]
        return asyncio.to_thread(fn, *args)

    reader = engines.a
    a_pod, b_pod = pod_id(tiered.engine), pod_id(reader)
    pods = [
        {"url": e.url, "events": e.spec.events_endpoint, "replay": e.spec.replay_endpoint, **extra}
        for e, extra in ((tiered.engine, {"prefill_speed": 0.01}), (reader, {}))
    ]
    config = {
        "pods": pods,
        "profile": {"scorers": [{"type": "estimated-ttft", "params": {"peer_loads": True}}]},
        "index": {"block_size": BLOCK, "speculative_ttl_s": 0},
        # a holder offers loads only while it is a routable pod: on a host this loaded (CI runs the unit
        # tests alongside) a slow health probe must not drop A mid-test
        "pool": {"tier_prices_interval_s": 0.2, "health_timeout_s": 30, "failure_threshold": 10},
        "speed": {"learn": False},
    }
    async with routed([], test_model_dir, **config) as (router, base), aiohttp.ClientSession() as s:

        async def router_loads() -> float:
            async with s.get(base + "/metrics") as r:
                text = await r.text()
            return sum(
                x.value
                for fam in text_string_to_metric_families(text)
                for x in fam.samples
                if x.name == "llmd_router_peer_loads_total" and x.labels.get("pod") == b_pod
            )

        p = _prompt()
        fresh = await off_loop(_complete, tiered.url, p)  # warmed on A only, behind the router's back
        await off_loop(_fill, tiered.url, 4)  # and pushed out of A's engine into its DRAM tier
        await off_loop(_wait_for_tiers, tiered, p, "CPU")

        def ready() -> bool:
            held = router.index.match(MODEL, p)
            m, holder = held.get(a_pod), router.pool.get(a_pod)
            return (
                m is not None
                and m.tiers == ["CPU"] * PREFIX_BLOCKS
                and b_pod not in held
                and holder is not None
                and holder.metrics.kv_endpoint is not None
                and holder.metrics.block_size == BLOCK
                and {a_pod, b_pod} <= {x.id for x in router.pool.available()}  # both are candidates
            )

        await wait_until_async(ready, 30, "the router to see the prefix in A's DRAM tier and A's endpoint", 0.05)
        holder = await off_loop(_holder, tiered.url)
        computed = await off_loop(_prompt_tokens, tiered.url)
        loads = await off_loop(_peer_loads, reader.url, holder[0])
        served_before = await off_loop(_served, tiered.url)
        routed_before = await router_loads()
        body = {"model": MODEL, "prompt": p, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
        with caplog.at_level(logging.DEBUG, logger="vllm_llmd.router.proxy"):  # its decision, if it fails
            async with s.post(base + "/v1/completions", json=body) as r:
                out = await r.json()
                assert r.status == 200, out
                assert r.headers["X-LLMD-Pod"] == b_pod
        route = [x.getMessage() for x in caplog.records if x.getMessage().startswith("route ")]
        assert out["choices"][0]["token_ids"] == fresh  # token-identical to A's fresh computation
        assert await off_loop(_prompt_tokens, tiered.url) == computed  # A computed nothing for it
        assert await router_loads() == routed_before + 1, route

        def loaded() -> float:
            now = _peer_loads(reader.url, holder[0])
            return now["bytes"] - loads["bytes"] if now["ok"] == loads["ok"] + 1 else 0

        moved = await off_loop(wait_until, loaded, 30, "B's peer load counted")
        assert moved == PREFIX_BLOCKS * BLOCK_BYTES
        # the holder's side of it: one pin granted, the prefix's blocks served, to B by its engine id;
        # reported with A's next engine step (its stats go out with a step; an idle core does not step)
        await off_loop(_complete, tiered.url, [11, 12, 13], 1)

        def served() -> dict[str, float] | None:
            now = _served(tiered.url)
            d = {k: now[k] - served_before[k] for k in now}
            return d if d["blocks"] >= PREFIX_BLOCKS else None

        d = await off_loop(wait_until, served, 30, "A counting what it served B")
        assert d["granted"] == 1 and d["blocks"] == PREFIX_BLOCKS and d["bytes"] >= moved, d
        b_engine = (await off_loop(_holder, reader.url))[0]
        assert (await off_loop(lambda: _served(tiered.url, reader=b_engine)))["blocks"] >= PREFIX_BLOCKS


@pytest.mark.destructive(scope="module")
def test_a_peer_load_from_a_holder_that_is_gone_falls_back_to_a_local_prefill(tiered: TierEngine, engines):
    reader = engines.a
    holder = _holder(tiered.url)
    r = _prompt()
    fresh = _complete(tiered.url, r)
    tiered.engine.stop()
    before = _peer_loads(reader.url, holder[0])
    assert _complete(reader.url, r, kv_transfer_params=_peer_params(holder)) == fresh
    wait_until(lambda: _peer_loads(reader.url, holder[0])["unreachable"] > before["unreachable"], 30, "the failure")


def test_an_unwritable_disk_path_stops_the_engine_at_start_up(test_model_dir: Path, tmp_path: Path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    tiers = {"dram": {"capacity": "4MiB"}, "disk": {"path": str(blocker / "kv"), "capacity": "8MiB"}}
    spec = EngineSpec(
        model=test_model_dir,
        block_size=BLOCK,
        num_gpu_blocks=24,
        max_model_len=512,
        events_port=None,
        replay_port=None,
        kv_transfer_config={
            "kv_connector": "LLMDConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"tiers": tiers},
        },
        extra_args=["--enforce-eager"],
    )
    engine = EngineProcess(spec, tmp_path / "engine.log")
    try:
        with pytest.raises(EngineStartError):
            engine.start_ready(attempts=1)
    finally:
        engine.stop()
    log = (tmp_path / "engine.log").read_text(errors="replace")
    assert "kv_connector_extra_config.tiers.disk.path" in log and "is not a writable directory" in log
