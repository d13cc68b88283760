"""The vllm-llmd router: an OpenAI-compatible proxy that picks a vLLM pod per request.

The request path, one module per stage (``proxy`` wires them, top-down): ``request`` (parse and
validate) -> ``prompt`` (tokens and block keys) -> ``scheduling`` (prefix view, filters, scorers,
picker; P/D deciders) -> ``pd_legs`` (the prefill leg) -> ``upstream`` (forward, retry, relay), each
try an ``attempt``. Around it: ``front`` (the HTTP server and its limits), ``errors`` (JSON error
answers), ``config`` (pydantic models of the YAML file and flags), ``pool`` (pods, health, outlier
detection, circuit breaking), ``pod_metrics`` (each pod's ``/metrics``), ``inflight`` (router-tracked
outstanding work), ``candidates`` (the scheduler's view of the pods), ``tokenize`` /
``prefix_cache`` / ``chat_template`` (the model's own tokenizer and chat template),
``prefix_memory`` (the routing memory), ``metrics`` (the router's own) and ``server`` (wiring and
the ``vllm-llmd router`` entry point).
"""
