"""Gateway mode: Envoy carries the bytes, the router picks the pod over Envoy's ``ext_proc`` protocol
(as the Gateway API Inference Extension's endpoint picker does). Needs the ``gateway`` extra.

* :mod:`~vllm_llmd.gateway.picker`: the seam (``Picker``, ``Pick``, ``Reject``);
* :mod:`~vllm_llmd.gateway.router_picker`: a picker over today's router objects;
* :mod:`~vllm_llmd.gateway.extproc`: the ext_proc gRPC servicer;
* :mod:`~vllm_llmd.gateway.server`: ``vllm-llmd router --ext-proc`` (gRPC + the router's HTTP side);
* :mod:`~vllm_llmd.gateway.envoy_config`: the Envoy bootstrap (``vllm-llmd envoy-config``).
"""
