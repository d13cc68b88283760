"""The ``tiers:`` block of ``LLMDConnector``'s ``kv_connector_extra_config``, parsed and checked once.

::

    "tiers": {
      "dram":   {"capacity": "8GiB", "eviction": "lru"},
      "disk":   {"path": "/var/cache/llmd-kv", "capacity": "200GiB"},
      "tenant": {"source": "cache_salt", "top_k": 20}
    }

Every problem is a :class:`~vllm_llmd.connectors.config.ConnectorConfigError` naming the key, raised
while the connector is built, so a bad block stops the engine at start-up instead of failing (or
silently not caching) at run time:

- a capacity of 0, or one that is not a size (``"4GiB"``, ``"512MiB"``, an integer of bytes);
- a disk ``store_threshold`` or ``max_tracker_size`` that is not a whole number in range;
- a DRAM capacity larger than the machine's RAM or than ``/dev/shm`` (the DRAM tier is a shared
  memory region there, created by vLLM's ``SharedOffloadRegion``);
- a disk path that cannot be created or written (probed by writing, reading back and removing a
  small file), a disk capacity larger than its filesystem, or a filesystem already full;
- unknown keys at any level.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError
from vllm_llmd.connectors.config import ConnectorConfigError

#: where vLLM's SharedOffloadRegion puts the DRAM tier (vllm/v1/kv_offload/cpu/shared_offload_region.py)
SHM_DIR = "/dev/shm"
PREFIX = "kv_connector_extra_config.tiers"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DramTier(_Strict):
    #: bytes of host memory for the DRAM tier (``"8GiB"`` or an integer)
    capacity: ByteSize
    #: vLLM's cache policy for the DRAM tier: ``lru`` or ``arc`` (vllm/v1/kv_offload/cpu/policies)
    eviction: Literal["lru", "arc"] = "lru"


class DiskTier(_Strict):
    #: directory for block files; created if missing; one engine per directory (locked)
    path: str
    #: bytes of block files kept; least recently used files are deleted beyond it
    capacity: ByteSize
    #: threads reading files back (promotions to DRAM)
    read_threads: int = Field(default=1, ge=1, le=16)
    #: blocks queued for the writer at most; a store beyond it is dropped (each queued block pins its
    #: DRAM chunk until written, so a disk slower than the stores must not fill DRAM with pins)
    write_queue_blocks: int = Field(default=512, ge=1, le=1 << 20)
    #: threads writing files (one keeps deletes and writes of the same file in order; see disk.py)
    write_threads: Literal[1] = 1
    #: vLLM's ``store_threshold`` (vllm/v1/kv_offload/cpu/spec.py), for the disk: a block is written
    #: only once it has been offered this many times (each request that computes, hits or loads it
    #: offers it once; store_threshold.py); 1 writes every block. Default 2: a block never reused is
    #: pure I/O on the slow tier (~12% throughput with no reuse on this project's VM, bench/RESULTS.md),
    #: while a prefix used twice (a system prompt) is on disk before it can be evicted from DRAM
    store_threshold: int = Field(default=2, ge=1, le=1024, strict=True)
    #: vLLM's ``max_tracker_size``: blocks whose offers are counted at most (least recently offered
    #: forgotten first; ~100 bytes each)
    max_tracker_size: int = Field(default=64_000, ge=1, le=10_000_000, strict=True)


class TenantConfig(_Strict):
    #: where the tenant of a request comes from: its ``cache_salt`` (hashed before it becomes a label,
    #: it may be a secret), a key of ``vllm_xargs`` (``SamplingParams.extra_args``), or nowhere
    source: Literal["cache_salt", "xarg", "none"] = "cache_salt"
    #: the ``vllm_xargs`` key when ``source`` is ``xarg``
    xarg: str = "llmd_tenant"
    #: tenants that get their own label; the rest are counted as ``other``
    top_k: int = Field(default=10, ge=1, le=200)


class TiersConfig(_Strict):
    dram: DramTier
    disk: DiskTier | None = None
    tenant: TenantConfig = TenantConfig()

    @classmethod
    def parse(cls, raw: Any) -> TiersConfig:
        """Parse the ``tiers`` value (a mapping) and check it against this machine."""
        if not isinstance(raw, dict):
            raise ConnectorConfigError(f"LLMDConnector: {PREFIX} must be a mapping, got {type(raw).__name__}")
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join([PREFIX, *map(str, e['loc'])])}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise ConnectorConfigError(f"LLMDConnector: bad tiers config: {problems}") from None
        cfg.check_environment()
        return cfg

    # ---- checks against the machine --------------------------------------------------------
    def check_environment(self) -> None:
        self._check_vllm()
        self._check_dram()
        if self.disk is not None:
            self._check_disk(self.disk)

    @staticmethod
    def _check_vllm() -> None:
        """The tiers run on vLLM 0.32's offloading framework (``vllm/v1/kv_offload/tiering/``, the
        ``CacheHitSource`` labels): older releases have neither (``vllm_llmd.vllm_compat``)."""
        from vllm_llmd.vllm_compat import installed_vllm_version, parse_version

        version = installed_vllm_version()
        mm = parse_version(version)
        if mm is not None and mm < (0, 32):
            raise ConnectorConfigError(
                f"LLMDConnector: {PREFIX} needs vLLM 0.32 or newer (its KV offloading tier framework); "
                f"this is vLLM {version}"
            )

    def _check_dram(self) -> None:
        cap = int(self.dram.capacity)
        key = f"{PREFIX}.dram.capacity"
        if cap <= 0:
            raise ConnectorConfigError(f"LLMDConnector: {key} must be positive, got {cap}")
        ram = physical_memory_bytes()
        if cap > ram:
            raise ConnectorConfigError(
                f"LLMDConnector: {key} = {cap} bytes is larger than this machine's RAM ({ram} bytes)"
            )
        shm = filesystem_size(SHM_DIR)
        if shm is not None and cap > shm:
            raise ConnectorConfigError(
                f"LLMDConnector: {key} = {cap} bytes is larger than {SHM_DIR} ({shm} bytes), where the DRAM tier lives"
            )

    @staticmethod
    def _check_disk(disk: DiskTier) -> None:
        cap = int(disk.capacity)
        if cap <= 0:
            raise ConnectorConfigError(f"LLMDConnector: {PREFIX}.disk.capacity must be positive, got {cap}")
        key = f"{PREFIX}.disk.path"
        try:
            probe_writable(disk.path)
        except OSError as exc:
            full = " (the filesystem is full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise ConnectorConfigError(
                f"LLMDConnector: {key} {disk.path!r} is not a writable directory{full}: {exc}"
            ) from None
        size = filesystem_size(disk.path)
        if size is not None and cap > size:
            raise ConnectorConfigError(
                f"LLMDConnector: {PREFIX}.disk.capacity = {cap} bytes is larger than the filesystem of "
                f"{disk.path!r} ({size} bytes)"
            )

    # ---- what vLLM's OffloadingConnector is given ---------------------------------------------
    def offloading_extra_config(self) -> dict[str, Any]:
        """``kv_connector_extra_config`` of the OffloadingConnector this block turns into (see spec.py)."""
        extra: dict[str, Any] = {
            "spec_name": "LLMDTieringSpec",
            "spec_module_path": "vllm_llmd.connectors.tiers.spec",
            "cpu_bytes_to_use": int(self.dram.capacity),
            "eviction_policy": self.dram.eviction,
            # BlockStored for the CPU/STORAGE tiers with tokens and parent (the router's index needs them;
            # vLLM's default placeholder events carry block_size 0 and no tokens)
            "self_describing_kv_events": True,
            "secondary_tiers": [],
        }
        if self.disk is not None:
            extra["secondary_tiers"].append(
                {
                    "type": "ChecksummedDiskTier",
                    "module_path": "vllm_llmd.connectors.tiers.disk",
                    "root_dir": os.path.abspath(self.disk.path),
                    "capacity_bytes": int(self.disk.capacity),
                    "read_threads": self.disk.read_threads,
                    "write_queue_blocks": self.disk.write_queue_blocks,
                    "store_threshold": self.disk.store_threshold,
                    "max_tracker_size": self.disk.max_tracker_size,
                }
            )
        return extra


def physical_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def filesystem_size(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return int(st.f_blocks) * int(st.f_frsize)


def probe_writable(path: str) -> None:
    """Create ``path`` if needed, then write, read back and remove a probe file (raises ``OSError``)."""
    os.makedirs(path, exist_ok=True)
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
    probe = os.path.join(path, f".llmd-probe-{os.getpid()}")
    data = os.urandom(4096)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write", probe)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(probe, "rb") as f:
            if f.read() != data:
                raise OSError(errno.EIO, "read back different bytes", probe)
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
