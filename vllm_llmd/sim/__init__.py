"""A fleet simulator: many simulated vLLM engines in a few processes (``vllm-llmd sim``).

Each simulated engine speaks vLLM 0.32's HTTP API and ``/metrics``, and publishes real-format KV
events (with replay) from a faithful copy of vLLM's block allocator; its timing comes from a cost
model fitted to a real engine. See ``docs/simulator.md``.

Layers: ``hashing`` -> ``kv_cache`` -> ``engine`` (with ``cost``, ``metrics``, ``profile``) ->
``events``/``openai``/``server`` -> ``fleet``. Nothing here imports vLLM; the router is used only
for its tokenizer (``vllm_llmd.router.tokenize``).
"""
