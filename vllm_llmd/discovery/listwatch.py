"""List, then watch from the list's resourceVersion; resume a dropped watch; relist on 410 Gone.

The protocol (Kubernetes API concepts, "Efficient detection of changes"; client-go's
``tools/cache/reflector.go`` ``ListAndWatch`` does the same):

1. ``GET <collection>?limit=N[&continue=T]`` until ``metadata.continue`` is empty; the list's
   ``metadata.resourceVersion`` is the snapshot the items are at.
2. ``GET <collection>?watch=true&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=S``: a
   stream of JSON lines ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``. Every
   object carries a newer ``metadata.resourceVersion``; a BOOKMARK carries only that.
3. The server ends the stream after ``timeoutSeconds``, or the connection drops: watch again from
   the last resourceVersion seen (nothing is missed, nothing relisted).
4. An ``ERROR`` event with a ``Status`` of code 410 (reason ``Expired``/``Gone``: the resourceVersion
   left the server's watch cache, ``apiserver/pkg/storage/cacher/watch_cache.go``
   ``getAllEventsSinceLocked``), or an HTTP 410 answer, means the history is gone: list again.

Other errors back off (``backoff_s`` doubling to ``backoff_max_s``) and retry from the last
resourceVersion. The loop calls ``on_list(items)`` after each (re)list and ``on_event(type, obj)``
for every change; an exception in a callback is logged and the loop goes on.

The request itself is made by a kubernetes-asyncio API method (``CoreV1Api.list_namespaced_pod``,
``CustomObjectsApi.list_namespaced_custom_object``) with ``_preload_content=False``, so the body
is read here, line by line, each line bounded by ``max_line_bytes`` (etcd refuses objects over
1.5 MiB; the default is 8 MiB).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

#: page size of a list request
LIST_LIMIT = 500
MAX_LINE_BYTES = 8 * 1024 * 1024


class Expired(Exception):
    """410 Gone: the resourceVersion is too old; relist."""


class WatchError(Exception):
    """An API answer the loop cannot use (non-2xx, an ERROR event other than 410, bad JSON)."""


@dataclass
class WatchStats:
    lists: int = 0
    #: watch requests made (the first after a list, and every resume)
    watches: int = 0
    #: 410 Gone seen (each is followed by a relist)
    expired: int = 0
    errors: int = 0
    events: int = 0
    bookmarks: int = 0
    resource_version: str | None = None
    last_error: str | None = None


def _resource_version(obj: Any) -> str | None:
    if isinstance(obj, dict):
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            rv = meta.get("resourceVersion")
            if isinstance(rv, str) and rv:
                return rv
    return None


class ListWatch:
    def __init__(
        self,
        call: Callable[..., Awaitable[Any]],
        what: str,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        *,
        watch_timeout_s: int = 300,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.call = call
        self.what = what
        self.on_list = on_list
        self.on_event = on_event
        self.watch_timeout_s = watch_timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.max_line_bytes = max_line_bytes
        self.stats = WatchStats()
        self._rv: str | None = None

    async def run(self) -> None:
        #: the last resourceVersion seen (list, event or bookmark); None: list first
        self._rv: str | None = None
        delay = self.backoff_s
        while True:
            try:
                if self._rv is None:
                    self._rv = await self._list()
                    delay = self.backoff_s
                started = time.monotonic()
                got = await self._watch()
                if got or time.monotonic() - started >= 1.0:
                    delay = self.backoff_s
                    continue
                # a watch that ends at once with nothing in it: do not spin
                await asyncio.sleep(delay)
                delay = min(self.backoff_max_s, delay * 2)
            except Expired as e:
                self.stats.expired += 1
                log.info("%s: resourceVersion %s expired (%s); relisting", self.what, self._rv, e)
                self._rv = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # API down, connection dropped, bad answer: retry from the last rv
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                log.warning(
                    "%s: %s: %s; retrying in %.1fs from resourceVersion %s",
                    self.what,
                    "list" if self._rv is None else "watch",
                    self.stats.last_error,
                    delay,
                    self._rv,
                )
                await asyncio.sleep(delay)
                delay = min(self.backoff_max_s, delay * 2)

    # ------------------------------------------------------------------ list
    async def _list(self) -> str:
        items: list[dict[str, Any]] = []
        token: str | None = None
        rv: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_LIMIT}
            if token:
                kwargs["_continue"] = token
            resp = await self.call(
                **kwargs,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=self.connect_timeout_s + 60),
            )
            try:
                body = await resp.read()
                if resp.status == 410:
                    raise Expired("continue token expired")
                if resp.status != 200:
                    raise WatchError(f"list answered {resp.status}: {body[:300]!r}")
            finally:
                resp.release()
            try:
                data = json.loads(body)
                page = data.get("items") or []
                meta = data.get("metadata") or {}
            except (ValueError, AttributeError):
                raise WatchError(f"list answer is not a JSON list object: {body[:200]!r}") from None
            if not isinstance(page, list):
                raise WatchError("list answer: items is not a list")
            items.extend(x for x in page if isinstance(x, dict))
            rv = meta.get("resourceVersion") or rv
            token = meta.get("continue") or None
            if not token:
                break
        if not rv:
            raise WatchError("list answer has no metadata.resourceVersion")
        self.stats.lists += 1
        self.stats.resource_version = rv
        try:
            self.on_list(items)
        except Exception:
            log.exception("%s: applying the list failed", self.what)
        return rv

    # ----------------------------------------------------------------- watch
    async def _watch(self) -> bool:
        """Stream events from ``self._rv`` until the server ends the watch, advancing ``self._rv``
        with every event; whether anything arrived. Raises :class:`Expired` on 410."""
        self.stats.watches += 1
        resp = await self.call(
            watch=True,
            resource_version=self._rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_s,
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.connect_timeout_s, sock_read=self.watch_timeout_s + 30
            ),
        )
        got = False
        try:
            if resp.status == 410:
                raise Expired("watch answered 410")
            if resp.status != 200:
                body = await resp.content.read(300)
                raise WatchError(f"watch answered {resp.status}: {body!r}")
            buf = bytearray()
            async for chunk in resp.content.iter_any():
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if line.strip():
                        self._line(line)
                        got = True
                if len(buf) > self.max_line_bytes:
                    raise WatchError(f"watch event longer than {self.max_line_bytes} bytes")
            if buf.strip():
                self._line(bytes(buf))
                got = True
        finally:
            resp.release()
        return got

    def _line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
            obj = event["object"]
        except (ValueError, KeyError, TypeError):
            raise WatchError(f"bad watch line: {line[:200]!r}") from None
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            msg = obj.get("message") if isinstance(obj, dict) else obj
            if code == 410:
                raise Expired(str(msg))
            raise WatchError(f"watch ERROR event: {code} {msg}")
        self._rv = _resource_version(obj) or self._rv
        self.stats.resource_version = self._rv
        if kind == "BOOKMARK":
            self.stats.bookmarks += 1
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not isinstance(obj, dict):
            log.warning("%s: ignoring watch event of type %r", self.what, kind)
            return
        self.stats.events += 1
        try:
            self.on_event(kind, obj)
        except Exception:
            log.exception("%s: applying a %s event failed", self.what, kind)
