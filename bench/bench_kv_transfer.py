"""KV transfer bandwidth of LLMDConnector's NIXL transport between two processes, against memcpy.

Two child processes play the two engines' workers and use exactly the connector worker's path
(connectors/worker.py): the *prefill* child registers host memory with
:class:`~vllm_llmd.connectors.transports.nixl.NixlTransport` and serves its
:class:`~vllm_llmd.connectors.handshake.EngineInfo` on the ZMQ side channel
(:class:`~vllm_llmd.connectors.handshake.HandshakeServer`); the *decode* child registers its own
memory, fetches that info (``fetch_engine_info``), checks it (``check_compatible``), adds the peer
(``add_peer``) and times ``read_blocks`` → ``poll`` until DONE → ``release``. Memory is host DRAM, NIXL's UCX backend.
Each case is timed twice: bare reads ("read"), and reads carrying the completion notification
the connector sends to release the prefill side's lease ("read+notify", the connector's pull).

Cases:

- ``contig``: one descriptor of 1, 2, 4, ... 64 MiB (one region with one block per size);
- ``blocks``: the hand-off the connector makes for the "small" test model (6 layers, 2 KV heads,
  head dim 64, bf16, 64-token blocks → 32 KiB per layer per block, 320 blocks per layer as the
  benchmark engines have): a prompt of T tokens moves 6 x T/64 descriptors, block ids scattered.

The memcpy baseline is ``numpy.copyto`` of a buffer of the same size in the decode child (fresh
destination pages touched beforehand, as the transport's are), best of N. "ours" is wall time
from ``read_blocks`` to a DONE ``poll``, best and median of N (after one warm-up read per case,
which also sets up the UCX endpoint). The bytes of the last read of every case are checked.

The UCX transports are chosen by UCX (default) or by ``UCX_TLS``, set in both children's
environment (``--tls default,tcp`` runs both).

Command and results (2026-11-22 13:44 UTC, 2-core EPYC VM; see bench/RESULTS.md "KV transfer bandwidth")::

    .venv/bin/python bench/bench_kv_transfer.py --reps 10

    # load average 30-39 on the 2 cores during this run (others' engines): medians and the tcp
    # table measure waiting for a core more than the transport; re-run on an idle machine.
    **UCX_TLS=default  (GB/s; best / median of 10 reads; memcpy best of 10)**

    | case | MiB | descs | memcpy | read best | read median | best/memcpy | +notify best | +notify median |
    |---|---|---|---|---|---|---|---|---|
    | contig 1 MiB | 1.0 | 1 | 49.60 | 11.57 | 8.43 | 23% | 0.64 | 0.01 |
    | contig 2 MiB | 2.0 | 1 | 38.81 | 11.95 | 8.30 | 31% | 8.01 | 0.03 |
    | contig 4 MiB | 4.0 | 1 | 48.22 | 17.84 | 10.65 | 37% | 13.35 | 0.06 |
    | contig 8 MiB | 8.0 | 1 | 44.57 | 16.27 | 13.94 | 37% | 14.67 | 0.19 |
    | contig 16 MiB | 16.0 | 1 | 20.34 | 16.04 | 12.00 | 79% | 0.95 | 0.31 |
    | contig 32 MiB | 32.0 | 1 | 19.89 | 13.59 | 0.61 | 68% | 13.30 | 0.40 |
    | contig 64 MiB | 64.0 | 1 | 18.44 | 1.65 | 0.76 | 9% | 1.92 | 0.68 |
    | blocks 6x8 (512 tok) | 1.5 | 48 | 43.43 | 9.10 | 7.01 | 21% | 6.51 | 0.04 |
    | blocks 6x32 (2048 tok) | 6.0 | 192 | 58.61 | 7.60 | 6.04 | 13% | 6.41 | 0.14 |
    | blocks 6x128 (8192 tok) | 24.0 | 768 | 21.53 | 1.08 | 0.46 | 5% | 0.68 | 0.34 |
    | blocks 6x320 (20480 tok) | 60.0 | 1920 | 1.71 | 2.00 | 0.66 | 117% | 1.01 | 0.49 |

    **UCX_TLS=tcp  (GB/s; best / median of 10 reads; memcpy best of 10)**

    | case | MiB | descs | memcpy | read best | read median | best/memcpy | +notify best | +notify median |
    |---|---|---|---|---|---|---|---|---|
    | contig 1 MiB | 1.0 | 1 | 51.70 | 0.13 | 0.04 | 0% | 0.08 | 0.02 |
    | contig 2 MiB | 2.0 | 1 | 58.41 | 0.10 | 0.06 | 0% | 0.15 | 0.08 |
    | contig 4 MiB | 4.0 | 1 | 58.95 | 0.18 | 0.07 | 0% | 0.31 | 0.10 |
    | contig 8 MiB | 8.0 | 1 | 38.66 | 0.15 | 0.10 | 0% | 0.16 | 0.07 |
    | contig 16 MiB | 16.0 | 1 | 22.70 | 0.23 | 0.10 | 1% | 0.15 | 0.12 |
    | contig 32 MiB | 32.0 | 1 | 20.06 | 0.16 | 0.11 | 1% | 0.16 | 0.14 |
    | contig 64 MiB | 64.0 | 1 | 4.68 | 0.12 | 0.09 | 3% | 0.11 | 0.07 |
    | blocks 6x8 (512 tok) | 1.5 | 48 | 51.21 | 0.06 | 0.02 | 0% | 0.07 | 0.02 |
    | blocks 6x32 (2048 tok) | 6.0 | 192 | 61.06 | 0.09 | 0.04 | 0% | 0.15 | 0.06 |
    | blocks 6x128 (8192 tok) | 24.0 | 768 | 23.31 | 0.17 | 0.13 | 1% | 0.12 | 0.11 |
    | blocks 6x320 (20480 tok) | 60.0 | 1920 | 19.59 | 0.17 | 0.10 | 1% | 0.10 | 0.04 |
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

MiB = 1024 * 1024
CONTIG_MIB = (1, 2, 4, 8, 16, 32, 64)
# "small" test model: 6 layers x (K,V) x 2 KV heads x 64 tokens x 64 head dim x 2 bytes (bf16)
SMALL_LAYERS = 6
SMALL_BLOCK_LEN = 2 * 2 * 64 * 64 * 2
SMALL_BLOCKS_PER_LAYER = 320
SMALL_BLOCK_TOKENS = 64
BLOCK_PROMPTS = (512, 2048, 8192, 20480)  # tokens → 8, 32, 128, 320 blocks per layer
SEED = 1234


def _layout() -> list[tuple[str, int, int]]:
    """(case, num_blocks, block_len) per region, identical on both sides."""
    regions = [(f"contig {m} MiB", 1, m * MiB) for m in CONTIG_MIB]
    regions += [(f"layer {i}", SMALL_BLOCKS_PER_LAYER, SMALL_BLOCK_LEN) for i in range(SMALL_LAYERS)]
    return regions


def _buffers() -> tuple[list[np.ndarray], list[Any]]:
    from vllm_llmd.connectors.transports import Region

    bufs, regions = [], []
    for _, n, blen in _layout():
        buf = np.zeros(n * blen, dtype=np.uint8)  # zeros + touch: pages are really there
        buf[::4096] = 0
        bufs.append(buf)
        regions.append(Region(base_addr=buf.ctypes.data, num_blocks=n, block_len=blen))
    return bufs, regions


def _info(engine_id: str, transport: Any, regions: list[Any]) -> Any:
    from vllm_llmd.connectors.handshake import PROTOCOL_VERSION, EngineInfo

    return EngineInfo(
        protocol=PROTOCOL_VERSION,
        engine_id=engine_id,
        tp_rank=0,
        model="bench",
        kv_dtype="auto/torch.bfloat16",
        block_size=SMALL_BLOCK_TOKENS,
        num_layers=SMALL_LAYERS,
        layout="blocks_first",
        block_len=SMALL_BLOCK_LEN,
        transport=transport.name,
        memory=transport.memory.value,
        agent_metadata=transport.local_metadata(),
        regions=regions,
    )


def serve() -> None:
    """Prefill child: register random data, serve the side channel until stdin closes."""
    from vllm_llmd.connectors.handshake import HandshakeServer
    from vllm_llmd.connectors.transports import MemoryKind, make_transport

    bufs, regions = _buffers()
    rng = np.random.default_rng(SEED)
    for buf in bufs:
        buf[:] = rng.integers(0, 256, size=buf.size, dtype=np.uint8)
    transport = make_transport("nixl", MemoryKind.DRAM, backends=("UCX",))
    transport.register(regions)
    server = HandshakeServer(_info("bench-prefill", transport, regions), "127.0.0.1", 0)
    print(json.dumps({"endpoint": server.endpoint}), flush=True)
    sys.stdin.read()  # the parent closes stdin when the reader is done
    notifs = transport.get_notifs()
    server.close()
    transport.close()
    print(json.dumps({"notifs": len(notifs)}), flush=True)


def _time_read(transport: Any, peer: Any, pairs: list[tuple[int, int]], notif: bytes) -> float:
    from vllm_llmd.connectors.transports import XferState

    t0 = time.perf_counter()
    handle = transport.read_blocks(peer, pairs, pairs, notif)
    while (state := transport.poll(handle)) == XferState.PENDING:
        pass
    dt = time.perf_counter() - t0
    transport.release(handle)
    if state != XferState.DONE:
        raise RuntimeError(f"read failed: {state}")
    return dt


def _memcpy(nbytes: int, reps: int) -> float:
    src = np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    dst[::4096] = 1
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def read(host: str, port: int, reps: int) -> None:
    """Decode child: handshake, then time reads of every case."""
    from vllm_llmd.connectors.handshake import check_compatible, fetch_engine_info
    from vllm_llmd.connectors.transports import MemoryKind, make_transport

    bufs, regions = _buffers()
    transport = make_transport("nixl", MemoryKind.DRAM, backends=("UCX",))
    transport.register(regions)
    local = _info("bench-decode", transport, regions)
    remote = fetch_engine_info(host, port, 0, timeout_s=10)
    check_compatible(local, remote, expected_engine_id="bench-prefill")
    peer = transport.add_peer(remote.agent_metadata, remote.regions)

    cases: list[tuple[str, list[tuple[int, int]], int]] = []
    for r, (name, _, blen) in enumerate(_layout()[: len(CONTIG_MIB)]):
        cases.append((name, [(r, 0)], blen))
    rng = np.random.default_rng(7)
    first_layer = len(CONTIG_MIB)
    for tokens in BLOCK_PROMPTS:
        n = tokens // SMALL_BLOCK_TOKENS
        ids = sorted(rng.choice(SMALL_BLOCKS_PER_LAYER, size=n, replace=False).tolist())
        pairs = [(first_layer + layer, b) for layer in range(SMALL_LAYERS) for b in ids]
        cases.append((f"blocks {SMALL_LAYERS}x{n} ({tokens} tok)", pairs, len(pairs) * SMALL_BLOCK_LEN))

    rows = []
    for i, (name, pairs, nbytes) in enumerate(cases):
        _time_read(transport, peer, pairs, b"")
        times = [_time_read(transport, peer, pairs, b"") for _ in range(reps)]
        with_notif = [_time_read(transport, peer, pairs, b"llmd:done:%d-%d" % (i, k)) for k in range(reps)]
        rows.append(
            {
                "case": name,
                "bytes": nbytes,
                "descs": len(pairs),
                "memcpy_gbs": _memcpy(nbytes, reps),
                "best_gbs": nbytes / min(times) / 1e9,
                "median_gbs": nbytes / statistics.median(times) / 1e9,
                "notif_best_gbs": nbytes / min(with_notif) / 1e9,
                "notif_median_gbs": nbytes / statistics.median(with_notif) / 1e9,
            }
        )

    expect_rng = np.random.default_rng(SEED)
    expected = [expect_rng.integers(0, 256, size=b.size, dtype=np.uint8) for b in bufs]
    for name, pairs, _ in cases:
        for r, b in pairs:
            blen = regions[r].block_len
            got = bufs[r][b * blen : (b + 1) * blen]
            if not np.array_equal(got, expected[r][b * blen : (b + 1) * blen]):
                raise RuntimeError(f"{name}: region {r} block {b}: bytes differ from the prefill side's")
    transport.remove_peer(peer)
    transport.close()
    print(json.dumps({"rows": rows}), flush=True)


def _json_line(stream: Any) -> dict[str, Any]:
    """Next line of ours on a child's stdout (NIXL and UCX may log there too)."""
    for line in stream:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("child exited without reporting")


def run_pair(tls: str, reps: int) -> list[dict[str, Any]]:
    env = dict(os.environ)
    env.pop("UCX_TLS", None)
    if tls != "default":
        env["UCX_TLS"] = tls
    me = os.path.abspath(__file__)
    server = subprocess.Popen(
        [sys.executable, me, "--role", "serve"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        endpoint = _json_line(server.stdout)["endpoint"]
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        out = subprocess.run(
            [sys.executable, me, "--role", "read", "--host", host, "--port", port, "--reps", str(reps)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"reader failed ({tls}):\n{out.stderr[-3000:]}")
        rows = _json_line(out.stdout.splitlines())["rows"]
        server.stdin.close()
        notifs = _json_line(server.stdout)["notifs"]
        expected = len(rows) * reps
        if notifs != expected:
            print(f"warning: prefill side got {notifs} notifications, expected {expected}", file=sys.stderr)
        return rows
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def table(tls: str, rows: list[dict[str, Any]], reps: int) -> str:
    lines = [
        f"UCX_TLS={tls}  (GB/s; best / median of {reps} reads; memcpy best of {reps})",
        "",
        "| case | MiB | descs | memcpy | read best | read median | best/memcpy | +notify best | +notify median |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['bytes'] / MiB:.1f} | {r['descs']} | {r['memcpy_gbs']:.2f} | "
            f"{r['best_gbs']:.2f} | {r['median_gbs']:.2f} | {r['best_gbs'] / r['memcpy_gbs']:.0%} | "
            f"{r['notif_best_gbs']:.2f} | {r['notif_median_gbs']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=("main", "serve", "read"), default="main")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tls", default="default,tcp", help="comma-separated UCX_TLS values ('default' = unset)")
    args = ap.parse_args()
    if args.role == "serve":
        serve()
        return
    if args.role == "read":
        read(args.host, args.port, args.reps)
        return
    print(f"# KV transfer bandwidth, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()}")
    for tls in args.tls.split(","):
        rows = run_pair(tls, args.reps)
        print()
        print(table(tls, rows, args.reps))


if __name__ == "__main__":
    main()
