"""Pod discovery for the router: Kubernetes pods by label selector or InferencePool.

* :mod:`vllm_llmd.discovery.pods` — what is read from one pod (pure functions);
* :mod:`vllm_llmd.discovery.inferencepool` — the InferencePool API types (v1, v1alpha2);
* :mod:`vllm_llmd.discovery.listwatch` — the list/watch loop (resume, 410 → relist);
* :mod:`vllm_llmd.discovery.source` — :class:`KubernetesDiscovery`, which feeds the router's pod
  pool and KV-event subscriber. It needs the ``k8s`` extra (``kubernetes-asyncio``); the other
  modules do not.

Layering: this package sits above ``vllm_llmd.router.config`` (it produces ``PodConfig``) and below
``vllm_llmd.router.server``, which imports it only when ``discovery:`` is configured.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KubernetesDiscovery"]


def __getattr__(name: str) -> Any:
    if name == "KubernetesDiscovery":
        from vllm_llmd.discovery.source import KubernetesDiscovery

        return KubernetesDiscovery
    raise AttributeError(name)
