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

Label cardinality is bounded: at most ``top_k`` tenants by prompt tokens get their own label, every
other tenant is ``other`` (requests without a tenant: ``none``). Volumes are estimated with the
Space-Saving algorithm over ``4 * top_k`` counters (Metwally et al., 2005: every tenant with more
than 1/(4k) of the volume is tracked, with a guaranteed lower bound on its count). Every
``reselect_every`` requests the labelled set is re-chosen among tenants whose guaranteed share is at
least 1/(4k) (kept down to half of it), so a crowd of small one-off tenants never gets labels and
labels do not flap. A tenant that loses its label loses its series (the Prometheus side removes
them), so at most ``top_k + 2`` tenant series exist at any time.
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
    """Which tenants get their own label (Space-Saving heavy hitters with a share threshold)."""

    def __init__(self, top_k: int, reselect_every: int = 200) -> None:
        self.top_k = top_k
        self.capacity = 4 * top_k
        self.reselect_every = reselect_every
        #: tenant -> [count, overestimate]; ``count - overestimate`` is a guaranteed lower bound
        self._counts: dict[str, list[int]] = {}
        self._total = 0
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
        else:  # Space-Saving: the newcomer takes the smallest counter over, as its overestimate
            smallest = min(counts, key=lambda t: counts[t][0])
            floor = counts.pop(smallest)[0]
            counts[tenant] = [floor + weight, floor]
        self._total += weight
        self._since += 1
        if self._since >= self.reselect_every:
            self._reselect()
        return tenant if tenant in self.labelled else OTHER

    def _reselect(self) -> None:
        """Label the ``top_k`` tenants whose guaranteed share of the volume is at least 1/(4k); a
        labelled tenant keeps its label down to half that share (no flapping at the threshold)."""
        self._since = 0
        enter = self._total / self.capacity
        guaranteed = {t: c - e for t, (c, e) in self._counts.items()}
        keep = {t for t in self.labelled if guaranteed.get(t, 0) >= enter / 2}
        ranked = sorted(
            (t for t, g in guaranteed.items() if g >= enter or t in keep), key=lambda t: (-guaranteed[t], t)
        )
        top = frozenset(ranked[: self.top_k])
        if top != self.labelled:
            self.labelled = top
            self.version += 1
