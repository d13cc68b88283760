"""NIXL transport: a thin layer over ``nixl._api.nixl_agent`` (UCX backend by default).

Memory kind follows where the KV cache lives: host DRAM for CPU engines, VRAM for CUDA engines.
Every (region, block) pair becomes one NIXL descriptor; both the local and each remote region
table are prepared once (``prep_xfer_dlist``) so a transfer is a single ``make_prepped_xfer``
(the descriptor arithmetic and its bounds checks: connectors/transports/descriptors.py).

What crosses the network from here is only NIXL's own agent-metadata blob (parsed by NIXL's C++
side) plus our msgspec region table; we never use ``get_serialized_descs`` (it pickles).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence

import numpy as np
from vllm_llmd.connectors.transports.base import (
    BlockPairs,
    KVTransport,
    MemoryKind,
    Peer,
    Region,
    TransportError,
    XferState,
    check_runs,
)
from vllm_llmd.connectors.transports.descriptors import block_descs, block_indices, block_offsets, locate_runs
from vllm_llmd.connectors.transports.progress import ProgressThread

_LOCAL = "NIXL_INIT_AGENT"  # NIXL's name for the local side of a prepped list


class _Read:
    """A posted READ whose completion notification is sent by :meth:`NixlTransport.poll` on DONE.

    NIXL can attach the notification to the transfer itself, but then the transfer only reports
    DONE once UCX has flushed the endpoint and delivered the message over its active-message lane
    (TCP on one host), which needs the *peer's* progress thread to run: on a busy 2-core machine
    that put 25-60 ms on every pull, against 0.04 ms for the read itself (bench/bench_kv_transfer.py).
    A READ's data is in our memory when it reports DONE, so telling the peer afterwards is just as
    safe and keeps the message off the decode side's critical path.
    """

    __slots__ = ("handle", "notif", "peer")

    def __init__(self, handle: object, peer: str, notif: bytes) -> None:
        self.handle, self.peer, self.notif = handle, peer, notif


class NixlTransport(KVTransport):
    name = "nixl"

    def __init__(
        self,
        memory: MemoryKind = MemoryKind.DRAM,
        backends: Sequence[str] = ("UCX",),
        agent_name: str | None = None,
        num_threads: int = 0,
        progress_thread: bool = False,
        progress_interval_s: float = 0.001,
    ) -> None:
        """``progress_thread``: NIXL's own progress thread, which NIXL's Python API starts with no
        delay, so it spins a core. Without it (the default) a daemon thread of ours drives UCX
        progress every ``progress_interval_s`` (it sleeps in between), because a READ from a peer
        only completes when the *peer* side progresses too (tests/unit/test_transport_nixl.py: a
        read from a parked peer stays PENDING until the peer wakes); it parks while nothing can need
        it (:meth:`set_active`, :meth:`hold_until`; progress.py)."""
        try:
            from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise TransportError("the NIXL transport needs the `nixl` package (pip install 'vllm-llmd[nixl]')") from exc
        self.memory = memory
        self.backends = list(backends)
        self.agent_name = agent_name or f"llmd-{uuid.uuid4().hex}"
        config = nixl_agent_config(
            enable_prog_thread=progress_thread,
            backends=self.backends,
            num_threads=num_threads,
            # our progress thread calls into the agent beside the worker: let NIXL serialise the calls
            sync_mode=None if progress_thread else nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        self._agent = nixl_agent(self.agent_name, config)
        self._notif_lock = threading.Lock()
        self._pending_notifs: list[tuple[str, bytes]] = []
        #: our UCX progress, parked while nothing can need it (progress.py); None with NIXL's own thread
        self._progress: ProgressThread | None = None
        if not progress_thread:
            self._progress = ProgressThread(self._progress_poll, progress_interval_s)
        self._regions: tuple[Region, ...] = ()
        self._offsets: list[int] = []
        self._reg_descs = None
        self._local_dlist = None
        self._peers: dict[str, tuple[Peer, object, list[int]]] = {}
        #: (base, nbytes, device, memory) of every local span ``read_runs`` may write into
        self._spans: list[tuple[int, int, int, MemoryKind]] = []
        self._scratch: list[object] = []

    @property
    def agent(self) -> object:
        """The NIXL agent (for adapters that add a backend to it, e.g. ``nixl_rbln``)."""
        return self._agent

    @property
    def backends_available(self) -> tuple[str, ...]:
        return tuple(b for b in self.backends if b in getattr(self._agent, "backends", {b: None}))

    def use_backend(self, name: str) -> bool:
        """Put ``name`` first among the backends if the agent has it (an adapter created it);
        ``False`` (and nothing changes) when it does not."""
        if name not in getattr(self._agent, "backends", {}):
            return False
        self.backends = [name, *(b for b in self.backends if b != name)]
        return True

    # ---- memory and metadata -------------------------------------------------------------
    def register(self, regions: Sequence[Region], registered: bool = False) -> None:
        """``registered``: an adapter already registered this memory with the agent (``nixl_rbln``
        does for RBLN device memory); only the descriptor lists are built here."""
        if self._regions:
            raise TransportError("memory is already registered")
        regions = tuple(regions)
        if not regions:
            raise TransportError("nothing to register")
        if not registered:
            reg = [(r.base_addr, r.nbytes, r.device_id, "") for r in regions]
            self._reg_descs = self._agent.get_reg_descs(reg, self.memory.value)
            self._agent.register_memory(self._reg_descs, backends=self.backends)
        xfer = self._agent.get_xfer_descs(block_descs(regions), self.memory.value)
        self._local_dlist = self._agent.prep_xfer_dlist(_LOCAL, xfer, backends=self.backends)
        self._regions = regions
        self._offsets = block_offsets(regions)
        self._spans.extend((r.base_addr, r.nbytes, r.device_id, self.memory) for r in regions)

    def register_scratch(self, base_addr: int, nbytes: int, memory: MemoryKind = MemoryKind.DRAM) -> None:
        try:
            descs = self._agent.get_reg_descs([(base_addr, nbytes, 0, "")], memory.value)
            self._agent.register_memory(descs, backends=self.backends)
        except Exception as exc:
            raise TransportError(f"NIXL could not register {nbytes} bytes of {memory.value}: {exc}") from exc
        self._scratch.append(descs)
        self._spans.append((base_addr, nbytes, 0, memory))

    @property
    def regions(self) -> tuple[Region, ...]:
        return self._regions

    def local_metadata(self) -> bytes:
        return bytes(self._agent.get_agent_metadata())

    def add_peer(
        self, metadata: bytes, regions: Sequence[Region], memory: MemoryKind | None = None, backends: Sequence[str] = ()
    ) -> Peer:
        if self._local_dlist is None:
            raise TransportError("register memory before adding peers")
        try:
            raw_name = self._agent.add_remote_agent(metadata)
        except Exception as exc:
            raise TransportError(f"NIXL rejected the peer's agent metadata: {exc}") from exc
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        regions = tuple(regions)
        if name in self._peers:
            return self._peers[name][0]
        memory = memory or self.memory
        use = [b for b in (backends or self.backends) if b in self.backends]
        if not use:
            raise TransportError(f"no NIXL backend in common with peer {name} (ours: {self.backends})")
        try:
            xfer = self._agent.get_xfer_descs(block_descs(regions), memory.value)
            dlist = self._agent.prep_xfer_dlist(name, xfer, backends=use)
        except Exception as exc:  # e.g. a region table beyond the memory the peer registered
            try:
                self._agent.remove_remote_agent(name)
            except Exception:
                pass
            raise TransportError(f"peer {name}'s region table does not match the memory it registered: {exc}") from exc
        peer = Peer(name=name, regions=regions, memory=memory, backends=tuple(use))
        self._peers[name] = (peer, dlist, block_offsets(regions))
        return peer

    def remove_peer(self, peer: Peer) -> None:
        entry = self._peers.pop(peer.name, None)
        if entry is None:
            return
        try:
            self._agent.release_dlist_handle(entry[1])
        except Exception:
            pass
        try:
            self._agent.remove_remote_agent(peer.name)
        except Exception:
            pass

    # ---- data movement -------------------------------------------------------------------
    def _xfer(self, op: str, peer: Peer, local: BlockPairs, remote: BlockPairs, notif: bytes) -> object:
        if len(local) != len(remote):
            raise TransportError(f"{op}: {len(local)} local blocks but {len(remote)} remote blocks")
        entry = self._peers.get(peer.name)
        if entry is None:
            raise TransportError(f"unknown peer {peer.name}")
        _, remote_dlist, remote_offsets = entry
        local_idx = block_indices(self._regions, self._offsets, local)
        remote_idx = block_indices(peer.regions, remote_offsets, remote)
        return self._start(
            f"{op} to {peer.name}",
            lambda: self._agent.make_prepped_xfer(
                op,
                self._local_dlist,
                local_idx,
                remote_dlist,
                remote_idx,
                notif_msg=notif,
                backends=list(peer.backends or self.backends),
            ),
        )

    def _start(self, what: str, make: Callable[[], object]) -> object:
        """Make a transfer (``make``) and post it; one that fails to start is released and raises."""
        try:
            handle = make()
            state = self._agent.transfer(handle)
        except Exception as exc:
            raise TransportError(f"NIXL {what} failed to start: {exc}") from exc
        if state == "ERR":
            self._agent.release_xfer_handle(handle)
            raise TransportError(f"NIXL {what} failed to start")
        return handle

    def read_blocks(self, peer, local, remote, notif: bytes = b"") -> object:  # type: ignore[override]
        return _Read(self._xfer("READ", peer, local, remote, b""), peer.name, notif)

    def read_runs(self, peer: Peer, local: np.ndarray, remote: np.ndarray, notif: bytes = b"") -> object:
        if peer.name not in self._peers:
            raise TransportError(f"unknown peer {peer.name}")
        check_runs(local, remote)
        mem_l, dev_l = locate_runs(self._spans, local, "local")
        own = [(r.base_addr, r.nbytes, r.device_id, peer.memory) for r in peer.regions]
        own += [(r.base_addr, r.nbytes, r.device_id, MemoryKind.DRAM) for r in peer.extra]
        mem_r, dev_r = locate_runs(own, remote, f"peer {peer.name}'s")
        ldesc = np.stack([local[:, 0], local[:, 1], dev_l], axis=1).astype(np.uint64)
        rdesc = np.stack([remote[:, 0], remote[:, 1], dev_r], axis=1).astype(np.uint64)
        handle = self._start(
            f"READ of {len(local)} runs from {peer.name}",
            lambda: self._agent.initialize_xfer(
                "READ",
                self._agent.get_xfer_descs(ldesc, mem_l.value),
                self._agent.get_xfer_descs(rdesc, mem_r.value),
                peer.name,
                b"",
                backends=list(peer.backends or self.backends),
            ),
        )
        return _Read(handle, peer.name, notif)

    def write_blocks(self, peer, local, remote, notif: bytes = b"") -> object:  # type: ignore[override]
        return self._xfer("WRITE", peer, local, remote, notif)

    def poll(self, handle: object) -> XferState:
        read = handle if isinstance(handle, _Read) else None
        try:
            state = self._agent.check_xfer_state(read.handle if read else handle)
        except Exception:
            return XferState.FAILED
        if state == "DONE":
            if read is not None and read.notif:
                notif, read.notif = read.notif, b""
                try:
                    self._agent.send_notif(read.peer, notif)
                except Exception:  # the data arrived; the peer's lease covers a lost notice
                    pass
            return XferState.DONE
        if state == "PROC":
            return XferState.PENDING
        return XferState.FAILED

    def release(self, handle: object) -> None:
        if isinstance(handle, _Read):
            handle = handle.handle
        try:
            self._agent.release_xfer_handle(handle)
        except Exception:
            pass

    def notify(self, peer: Peer, message: bytes) -> None:
        try:
            self._agent.send_notif(peer.name, message)
        except Exception as exc:
            raise TransportError(f"notification to {peer.name} failed: {exc}") from exc

    def _collect_notifs(self) -> None:
        """Progress UCX and move any new notifications into our buffer (caller holds the lock)."""
        for name, messages in self._agent.get_new_notifs().items():
            peer = name.decode() if isinstance(name, bytes) else str(name)
            self._pending_notifs.extend((peer, bytes(m)) for m in messages)

    def set_active(self, active: bool) -> None:
        if self._progress is not None:
            self._progress.set_active(active)

    def hold_until(self, deadline: float) -> None:
        if self._progress is not None:
            self._progress.hold_until(deadline)

    def _progress_poll(self) -> None:
        with self._notif_lock:
            self._collect_notifs()

    def get_notifs(self) -> list[tuple[str, bytes]]:
        with self._notif_lock:
            self._collect_notifs()
            out, self._pending_notifs = self._pending_notifs, []
        return out

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        for peer, _, _ in list(self._peers.values()):
            self.remove_peer(peer)
        if self._local_dlist is not None:
            try:
                self._agent.release_dlist_handle(self._local_dlist)
            except Exception:
                pass
            self._local_dlist = None
        for descs in [self._reg_descs, *self._scratch]:
            if descs is None:
                continue
            try:
                self._agent.deregister_memory(descs, backends=self.backends)
            except Exception:
                pass
        self._reg_descs = None
        self._scratch = []
