"""Tenants of requests, as bounded metric labels.

What reaches vLLM's engine ``Request`` (checked in vLLM 0.32): ``cache_salt`` (from the request body)
and ``sampling_params.extra_args`` (the body's ``vllm_xargs``, plus ``kv_transfer_params``). The
OpenAI ``user`` field and HTTP headers do *not* reach it: the OpenAI front end keeps ``user`` in its
request model and forwards only tracing headers (``traceparent``/``tracestate``,
vllm/entrypoints/serve/engine/serving.py ``_get_trace_headers``). So a tenant is read from the salt
or from one ``vllm_xargs`` key; a gateway or router that knows the tenant by a header or the ``user``
field puts it there (docs/tiers.md).

A salt may be a secret (it is what separates tenants' caches), so it never becomes a label as is:
``salt:`` + the first 12 hex digits of its SHA-256. An ``xarg`` value is used as given, cut to 64
characters.

Label cardinality is bounded: at most ``top_k`` tenants get their own label, every other tenant is
``other`` (requests without a tenant count as the tenant ``none``). The first ``top_k`` tenants seen
take the labels; volumes (prompt tokens) are estimated with the Space-Saving algorithm over
``4 * top_k`` counters (Metwally et al., 2005: every tenant with more than 1/(4k) of the volume is
tracked, with a guaranteed lower bound on its count; labelled tenants keep their counters), and
every ``reselect_every`` requests a tenant whose guaranteed count is more than twice the weakest
labelled tenant's takes that label over. The factor of two keeps labels from flapping between
tenants of similar volume (and a crowd of small one-off tenants from churning them). A tenant that
loses its label loses its series (the Prometheus side removes them): at most ``top_k + 1`` tenant
series exist at any time.
"""

from __future__ import annotations

import hashlib
from typing import Any

OTHER = "other"
NONE = "none"  # requests without a tenant


def tenant_of(request: Any, source: str, xarg: str) -> str:
    """The tenant of a vLLM ``Request`` (``none`` if it has none)."""
    if source == "cache_salt":
        salt = getattr(request, "cache_salt", None)
        if not salt:
            return NONE
        return "salt:" + hashlib.sha256(str(salt).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    if source == "xarg":
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        value = extra.get(xarg) if isinstance(extra, dict) else None
        if value is None or value == "":
            return NONE
        return str(value)[:64]
    return NONE


class TopTenants:
    """Which tenants get their own label (Space-Saving heavy hitters, sticky labels)."""

    def __init__(self, top_k: int, reselect_every: int = 200) -> None:
        self.top_k = top_k
        self.capacity = 4 * top_k
        self.reselect_every = reselect_every
        #: tenant -> [count, overestimate]; ``count - overestimate`` is a guaranteed lower bound
        self._counts: dict[str, list[int]] = {}
        self._since = 0
        self.labelled: frozenset[str] = frozenset()
        #: bumped when ``labelled`` changes (the stats carry the new set to the Prometheus side)
        self.version = 0

    def observe(self, tenant: str, weight: int) -> str:
        """Count ``weight`` for ``tenant``; returns the label to record it under."""
        counts = self._counts
        entry = counts.get(tenant)
        if entry is not None:
            entry[0] += weight
        elif len(counts) < self.capacity:
            counts[tenant] = [weight, 0]
        else:  # Space-Saving: the newcomer takes the smallest unlabelled counter over, as its overestimate
            smallest = min((t for t in counts if t not in self.labelled), key=lambda t: counts[t][0])
            floor = counts.pop(smallest)[0]
            counts[tenant] = [floor + weight, floor]
        if tenant not in self.labelled and len(self.labelled) < self.top_k:
            self._set(self.labelled | {tenant})
        self._since += 1
        if self._since >= self.reselect_every:
            self._reselect()
        return tenant if tenant in self.labelled else OTHER

    def _reselect(self) -> None:
        """Swap a labelled tenant for one whose guaranteed count is more than twice its own."""
        self._since = 0
        g = {t: c - e for t, (c, e) in self._counts.items()}
        labelled = set(self.labelled)
        for cand in sorted((t for t in g if t not in labelled), key=lambda t: -g[t]):
            weakest = min(labelled, key=lambda t: g.get(t, 0), default=None)
            if weakest is None or g[cand] <= 2 * g.get(weakest, 0):
                break
            labelled.discard(weakest)
            labelled.add(cand)
        self._set(frozenset(labelled))

    def _set(self, labelled: frozenset[str]) -> None:
        if labelled != self.labelled:
            self.labelled = labelled
            self.version += 1
