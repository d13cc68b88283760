"""The disk tier's block file: a small header, the block's offload key, then the block's bytes.

::

    offset  size  field
    0       8     magic b"LLMDKV01"
    8       2     format version (1), little endian
    10      2     key length (vLLM's OffloadKey: block hash + 4-byte group index)
    12      4     reserved (0)
    16      8     payload length
    24      16    xxh3-128 of (key | payload)
    40      k     key
    40 + k  n     payload (one DRAM-tier chunk: every worker's pages of one block)

A file is served only if every field matches what the reader expects (magic, version, the key it
looked up, the block length) and the checksum of what it read matches the header; anything else
(a missing, truncated, padded, bit-flipped or misplaced file) raises :class:`BlockFileError` and the
block is treated as a miss, so the engine recomputes it. The checksum detects corruption, not
tampering: the directory must be private to the engine (docs/tiers.md).

A file is written in place under its final name, with no temporary file and rename (one journaled
metadata operation less per block): no reader opens it before the write has finished, because the
disk tier lists a block only once its write completed (disk.py), a failed write removes what it
wrote, and the files of an earlier run (a crash mid-write) are deleted at start-up. Files are not
fsync'ed: a torn file after a power loss fails its checksum.
"""

from __future__ import annotations

import errno
import os
import struct

import xxhash

MAGIC = b"LLMDKV01"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQ16s")


class BlockFileError(OSError):
    """A block file that must not be served. ``kind``: ``missing``, ``corrupt`` or ``io``."""

    def __init__(self, kind: str, path: str, detail: str) -> None:
        super().__init__(errno.EIO, f"{kind} block file {path}: {detail}")
        self.kind = kind


def header_size(key_len: int) -> int:
    return _HEADER.size + key_len


def _digest(key: bytes, payload: memoryview) -> bytes:
    h = xxhash.xxh3_128()
    h.update(key)
    h.update(payload)
    return h.digest()


def _as_bytes(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def write_block(path: str, key: bytes, payload: memoryview) -> int:
    """Write one block file (nothing may read ``path`` until this returns; on an error nothing is left
    at ``path``); returns the file's size. Raises ``OSError`` (e.g. ENOSPC)."""
    data = _as_bytes(payload)
    head = _HEADER.pack(MAGIC, VERSION, len(key), 0, len(data), _digest(key, data)) + key
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        try:
            # one writev for header and payload (each system call is a round trip for the GIL, which the
            # engine's scheduler thread shares with the writer); a short write continues where it stopped
            n = os.writev(fd, [head, data])
            rest = memoryview(head + data)[n:] if n < len(head) else data[n - len(head) :]
            while rest:
                n = os.write(fd, rest)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short write", path)
                rest = rest[n:]
        finally:
            os.close(fd)
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return len(head) + len(data)


def read_block(path: str, key: bytes, out: memoryview) -> None:
    """Read the block file at ``path`` into ``out`` (exactly ``len(out)`` bytes), checking every header
    field and the checksum. On any mismatch ``out`` may hold garbage: the caller must not use it."""
    dst = _as_bytes(out)
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise BlockFileError("missing", path, "no such file") from None
    except OSError as exc:
        raise BlockFileError("io", path, str(exc)) from None
    try:
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise BlockFileError("corrupt", path, "short header")
        magic, version, key_len, _, length, digest = _HEADER.unpack(head)
        if magic != MAGIC or version != VERSION:
            raise BlockFileError("corrupt", path, "bad magic or version")
        if key_len != len(key) or f.read(key_len) != key:
            raise BlockFileError("corrupt", path, "holds another block")
        if length != len(dst):
            raise BlockFileError("corrupt", path, f"block length {length}, expected {len(dst)}")
        got = 0
        while got < len(dst):
            n = f.readinto(dst[got:])
            if not n:
                raise BlockFileError("corrupt", path, f"truncated at {got} of {len(dst)} bytes")
            got += n
        if f.read(1):
            raise BlockFileError("corrupt", path, "trailing bytes")
    except BlockFileError:
        raise
    except OSError as exc:
        raise BlockFileError("io", path, str(exc)) from None
    finally:
        f.close()
    if _digest(key, dst) != digest:
        raise BlockFileError("corrupt", path, "checksum mismatch")
