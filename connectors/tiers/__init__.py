"""DRAM and disk KV tiers behind ``LLMDConnector`` (a ``tiers`` block in ``kv_connector_extra_config``).

Built on vLLM's offloading framework (``OffloadingConnector``, ``TieringOffloadingManager``), with a
copy worker that runs on any platform and a checksummed disk tier. See docs/tiers.md.

- ``config``: the ``tiers`` block, checked at start-up;
- ``spec`` / ``host_copy``: the offloading spec and its worker (plain tensor copies);
- ``disk`` / ``diskio``: the disk tier and its block file format;
- ``stack``: the tiers inside ``LLMDConnector`` (who loads a request, metrics);
- ``stats`` / ``tenants``: ``llmd:kv_tier_*`` and ``llmd:kv_tenant_*`` metrics.

Nothing here is imported unless a ``tiers`` block is configured.
"""
