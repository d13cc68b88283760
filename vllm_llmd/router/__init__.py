"""The vllm-llmd router: an OpenAI-compatible proxy that picks a vLLM pod per request.

Layout: ``config`` (pydantic models of the YAML file and flags), ``pool`` (pods, health, outlier
detection, circuit breaking), ``pod_metrics`` (scraping each pod's ``/metrics``), ``inflight``
(router-tracked outstanding work), ``tokenize`` (the model's own tokenizer and chat template),
``prefix_memory`` (approximate / speculative prefix index built from routing decisions),
``scheduling`` (filters, scorers, pickers, profiles), ``proxy`` (the aiohttp application) and
``server`` (wiring and the ``vllm-llmd router`` entry point).
"""
