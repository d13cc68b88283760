"""Which pods the KV event index saw drop everything (cache cleared, engine restarted) since the
last look: what a plugin keeping per-pod history (the KV footprint) forgets. (The learned speeds
do not: a cleared cache is not a slower pod, vllm_llmd.router.speed.)"""

from __future__ import annotations

from collections.abc import Iterable

from vllm_llmd.router.scheduling.framework import PrefixIndex


class EpochWatch:
    def __init__(self) -> None:
        self._epochs: dict[str, int] = {}
        self._total = 0

    def dropped(self, index: PrefixIndex | None, known: Iterable[str]) -> list[str]:
        """Pods (of the index's and ``known``) whose epoch changed since the last call. One integer
        compare per call unless something was dropped."""
        if index is None:
            return []
        total = index.epochs_total()
        if total == self._total:
            return []
        self._total = total
        out = []
        for pod in {*index.pods(), *known}:
            e = index.epoch(pod)
            if self._epochs.get(pod, 0) != e:
                self._epochs[pod] = e
                out.append(pod)
        return out
