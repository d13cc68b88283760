"""A local HTTP server that speaks the Kubernetes API's list/watch protocol, for tests.

No cluster runs in tests, so this stands in for the API server (a fake: objects in memory, no
auth, no admission, no other verbs than GET). It serves namespaced collections of any resource
the test puts in it — pods at ``/api/v1/namespaces/{ns}/pods``, custom resources (InferencePool)
at ``/apis/{group}/{version}/namespaces/{ns}/{plural}`` — and implements the behaviour a client's
list/watch loop depends on, written from the Kubernetes API server's source:

* **list** (``limit``/``continue`` paging, ``labelSelector``, ``fieldSelector=metadata.name=X``):
  ``{"kind": "<Kind>List", "metadata": {"resourceVersion": RV, "continue": ...}, "items": [...]}``;
  items carry no ``kind``/``apiVersion`` (as the server's lists of built-in types; watch events
  carry both).
* **watch** (``watch=true&resourceVersion=RV``): every change after RV as a JSON line
  ``{"type": "ADDED"|"MODIFIED"|"DELETED", "object": ...}``, then live changes, until
  ``timeoutSeconds`` ends the stream. With a label selector an update that makes an object match
  arrives as ``ADDED`` and one that makes it stop matching as ``DELETED`` — as the watch cache
  converts them (``staging/src/k8s.io/apiserver/pkg/storage/cacher/cache_watcher.go``,
  ``convertToWatchEvent``). ``allowWatchBookmarks=true`` enables ``BOOKMARK`` events (sent when
  the test calls :meth:`bookmark`) whose object carries only ``metadata.resourceVersion``.
  Without ``resourceVersion`` (or ``0``) the watch starts with a synthetic ``ADDED`` per object.
* **410 Gone**: a watch from a resourceVersion older than the history kept (after
  :meth:`compact`) gets HTTP 200 and one ``ERROR`` event whose object is a ``Status`` with
  ``code: 410, reason: "Expired"`` ("too old resource version"), as
  ``cacher/watch_cache.go`` ``getAllEventsSinceLocked`` answers; with ``gone_as_http=True`` the
  answer is an HTTP 410 with that Status as body (what a server without a watch cache sends).
* **dropped connections**: :meth:`drop_watches` aborts every open watch's TCP connection.

Every request is recorded in :attr:`requests` (path and query) so tests can check what a client
asked for, e.g. that a resumed watch carried the last resourceVersion.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PODS = ("", "v1", "pods")


@dataclass
class _Change:
    rv: int
    coll: tuple[str, str, str, str]  # group, version, plural, namespace
    kind: str  # ADDED / MODIFIED / DELETED
    old: dict[str, Any] | None
    new: dict[str, Any]


@dataclass(eq=False)
class _Watch:
    coll: tuple[str, str, str, str]
    labels: list[tuple[str, str, str | None]]
    name: str | None
    bookmarks: bool
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    request: web.Request | None = None


def _parse_labels(selector: str) -> list[tuple[str, str, str | None]]:
    """``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k`` (comma separated; set-based forms unsupported)."""
    out: list[tuple[str, str, str | None]] = []
    for part in filter(None, (p.strip() for p in selector.split(","))):
        if " in " in part or " notin " in part or "(" in part:
            raise ValueError(f"set-based selector not supported by the fake: {part!r}")
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append(("!=", k.strip(), v.strip()))
        elif "==" in part:
            k, v = part.split("==", 1)
            out.append(("=", k.strip(), v.strip()))
        elif "=" in part:
            k, v = part.split("=", 1)
            out.append(("=", k.strip(), v.strip()))
        elif part.startswith("!"):
            out.append(("!", part[1:].strip(), None))
        else:
            out.append(("exists", part, None))
    return out


def _matches(obj: dict[str, Any] | None, labels: list[tuple[str, str, str | None]], name: str | None) -> bool:
    if obj is None:
        return False
    meta = obj.get("metadata") or {}
    if name is not None and meta.get("name") != name:
        return False
    have = meta.get("labels") or {}
    for op, k, v in labels:
        if (
            (op == "=" and have.get(k) != v)
            or (op == "!=" and have.get(k) == v)
            or (op == "exists" and k not in have)
            or (op == "!" and k in have)
        ):
            return False
    return True


#: what the API server's query decoding takes as true (Go's ``strconv.ParseBool``)
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}


def is_true(value: str | None) -> bool:
    return value in _TRUE


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKubeAPI:
    def __init__(self, *, gone_as_http: bool = False) -> None:
        self.gone_as_http = gone_as_http
        self.rv = 1000
        #: a watch from a resourceVersion below this gets 410 (history compacted)
        self.oldest_rv = 0
        self._objects: dict[tuple[str, str, str, str], dict[str, dict[str, Any]]] = {}
        self._kinds: dict[tuple[str, str, str], str] = {PODS: "Pod"}
        self._history: list[_Change] = []
        self._watches: set[_Watch] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.url = ""

    # ------------------------------------------------------------ server
    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/{plural}", self._custom)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, shutdown_timeout=5.0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        # a watch request still in flight registers after this: it sees ``_closing`` and ends at once
        # (otherwise the runner's clean-up waits for it up to the site's shutdown timeout)
        self._closing = True
        for w in list(self._watches):
            w.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ----------------------------------------------------------- objects
    def register_kind(self, group: str, version: str, plural: str, kind: str) -> None:
        self._kinds[(group, version, plural)] = kind

    def put(self, obj: dict[str, Any], namespace: str = "default", resource: tuple[str, str, str] = PODS) -> str:
        """Create or replace an object (JSON); its new resourceVersion."""
        obj = copy.deepcopy(obj)
        obj.pop("apiVersion", None)
        obj.pop("kind", None)
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = namespace
        name = meta["name"]
        coll = (*resource, namespace)
        store = self._objects.setdefault(coll, {})
        old = store.get(name)
        meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        store[name] = obj
        self._record(_Change(self.rv, coll, "MODIFIED" if old else "ADDED", old, obj))
        return meta["resourceVersion"]

    def delete(self, name: str, namespace: str = "default", resource: tuple[str, str, str] = PODS) -> None:
        coll = (*resource, namespace)
        old = self._objects.get(coll, {}).pop(name)
        self.rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._record(_Change(self.rv, coll, "DELETED", old, gone))

    def get(self, name: str, namespace: str = "default", resource: tuple[str, str, str] = PODS) -> dict[str, Any]:
        return copy.deepcopy(self._objects[(*resource, namespace)][name])

    def compact(self) -> None:
        """Forget the history: a watch from any resourceVersion before now gets 410 Gone."""
        self._history.clear()
        self.oldest_rv = self.rv

    def bookmark(self) -> None:
        for w in self._watches:
            if w.bookmarks:
                w.queue.put_nowait({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(self.rv)}}})

    def drop_watches(self) -> int:
        """Abort every open watch connection (as a load balancer or a crashed server would)."""
        n = 0
        for w in list(self._watches):
            if w.request is not None and w.request.transport is not None:
                w.request.transport.abort()
                n += 1
            w.queue.put_nowait(None)
        return n

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def _record(self, ch: _Change) -> None:
        self._history.append(ch)
        for w in self._watches:
            ev = self._event_for(w, ch)
            if ev is not None:
                w.queue.put_nowait(ev)

    def _event_for(self, w: _Watch, ch: _Change) -> dict[str, Any] | None:
        if ch.coll != w.coll:
            return None
        was = _matches(ch.old, w.labels, w.name)
        now = ch.kind != "DELETED" and _matches(ch.new, w.labels, w.name)
        if ch.kind == "DELETED":
            kind = "DELETED" if was else None
        elif now:
            kind = "MODIFIED" if was else "ADDED"
        else:
            kind = "DELETED" if was else None
        return None if kind is None else {"type": kind, "object": self._typed(ch.coll, ch.new)}

    def _typed(self, coll: tuple[str, str, str, str], obj: dict[str, Any]) -> dict[str, Any]:
        """A watch event's object carries ``apiVersion`` and ``kind`` (list items do not)."""
        api = f"{coll[0]}/{coll[1]}" if coll[0] else coll[1]
        return {"apiVersion": api, "kind": self._kinds.get(coll[:3], "Object"), **copy.deepcopy(obj)}

    # ---------------------------------------------------------- handlers
    async def _pods(self, request: web.Request) -> web.StreamResponse:
        return await self._collection(request, (*PODS, request.match_info["ns"]))

    async def _custom(self, request: web.Request) -> web.StreamResponse:
        m = request.match_info
        return await self._collection(request, (m["group"], m["version"], m["plural"], m["ns"]))

    async def _collection(self, request: web.Request, coll: tuple[str, str, str, str]) -> web.StreamResponse:
        q = dict(request.query)
        self.requests.append((request.path, q))
        try:
            labels = _parse_labels(q.get("labelSelector", ""))
        except ValueError as e:
            return web.json_response(_status(400, "BadRequest", str(e)), status=400)
        name = None
        fsel = q.get("fieldSelector", "")
        if fsel:
            if not fsel.startswith("metadata.name="):
                return web.json_response(_status(400, "BadRequest", f"field selector {fsel!r}"), status=400)
            name = fsel.split("=", 1)[1]
        if is_true(q.get("watch")):
            return await self._watch(request, coll, labels, name, q)
        items = sorted(
            (o for o in self._objects.get(coll, {}).values() if _matches(o, labels, name)),
            key=lambda o: o["metadata"]["name"],
        )
        start = 0
        snapshot = self.rv
        if q.get("continue"):
            snap, _, off = q["continue"].partition(":")
            start, snapshot = int(off), int(snap)
        limit = int(q.get("limit", 0) or 0)
        page = items[start : start + limit] if limit else items[start:]
        more = bool(limit) and start + limit < len(items)
        kind = self._kinds.get(coll[:3], "Object")
        meta = {"resourceVersion": str(snapshot)}
        if more:
            meta["continue"] = f"{snapshot}:{start + limit}"
        body = {
            "kind": f"{kind}List",
            "apiVersion": f"{coll[0]}/{coll[1]}" if coll[0] else coll[1],
            "metadata": meta,
            "items": page,
        }
        return web.json_response(body)

    async def _watch(
        self,
        request: web.Request,
        coll: tuple[str, str, str, str],
        labels: list[tuple[str, str, str | None]],
        name: str | None,
        q: dict[str, str],
    ) -> web.StreamResponse:
        raw_rv = q.get("resourceVersion", "")
        since = int(raw_rv) if raw_rv not in ("", "0") else None
        if since is not None and since < self.oldest_rv:
            st = _status(410, "Expired", f"too old resource version: {since} ({self.oldest_rv})")
            if self.gone_as_http:
                return web.json_response(st, status=410)
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(json.dumps({"type": "ERROR", "object": st}).encode() + b"\n")
            await resp.write_eof()
            return resp
        w = _Watch(coll, labels, name, is_true(q.get("allowWatchBookmarks")), request=request)
        if since is None:
            for o in sorted(self._objects.get(coll, {}).values(), key=lambda o: o["metadata"]["name"]):
                if _matches(o, labels, name):
                    w.queue.put_nowait({"type": "ADDED", "object": self._typed(coll, o)})
        else:
            for ch in self._history:
                if ch.rv > since:
                    ev = self._event_for(w, ch)
                    if ev is not None:
                        w.queue.put_nowait(ev)
        self._watches.add(w)
        if self._closing:
            w.queue.put_nowait(None)
        timeout = float(q.get("timeoutSeconds", 0) or 0) or None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await resp.prepare(request)
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    ev = await asyncio.wait_for(w.queue.get(), remaining)
                except TimeoutError:
                    break
                if ev is None:
                    break
                await resp.write(json.dumps(ev).encode() + b"\n")
            if request.transport is not None and not request.transport.is_closing():
                await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            self._watches.discard(w)
        return resp
