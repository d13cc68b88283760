"""vllm-llmd: KV-cache-aware routing and prefill/decode disaggregation for vLLM fleets.

Importing this package is cheap and has no side effects: every vLLM process loads the engine
plugin (:mod:`vllm_llmd.plugin`), so nothing heavy may run at import time.
"""

__version__ = "0.1.0"
