"""Envoy bootstrap for gateway mode: Envoy carries the bytes, ``vllm-llmd router --ext-proc`` picks.

One generator for tests, benchmarks and ``examples/envoy/`` (``vllm-llmd envoy-config`` prints it).

* Listener: an HTTP connection manager with the ``ext_proc`` filter, then the router filter. The
  routes of every endpoint the router routes by its prompt (completions, chat, embeddings, score,
  responses, tokenize ...: ``vllm_llmd.router.endpoints``) go through the picker; every other path
  (``/v1/models``, ``/health``, ...) has ``ext_proc`` disabled per route and is load balanced by
  Envoy alone.
* ``ext_proc`` processing mode (Envoy ``extensions/filters/http/ext_proc/v3/processing_mode.proto``):
  request headers SEND (the picker holds them until the body is in), request body BUFFERED (Envoy
  sends the whole body in one message, bounded by the route's buffer limit), response headers SEND
  (status and the endpoint that served, for load accounting), response body NONE (the picker turns it
  on per request with ``mode_override`` for SSE answers, to see the first chunk), trailers SKIP.
  ``metadata_options`` lets the picker write the ``envoy.lb`` namespace and have it forwarded back.
* Pods cluster, two ways (``cluster``):

  - ``override-host`` (default): a cluster of known pods (STATIC here; EDS or a Kubernetes Service in
    production) with Envoy's ``envoy.load_balancing_policies.override_host`` policy reading the
    Gateway API Inference Extension's ``envoy.lb`` / ``x-gateway-destination-endpoint`` metadata (then
    the header of the same name), an ordered ``ip:port,ip:port`` list: the first is tried, the rest
    are used by retries (``retry_on: connect-failure,reset``, i.e. before the pod sent response
    headers). It writes the host that served into ``x-gateway-destination-endpoint-served``. With no
    override (picker failed open) it round-robins.
  - ``original-dst``: an ``ORIGINAL_DST`` cluster that connects to whatever the
    ``x-gateway-destination-endpoint`` header names: no pod list in Envoy, but only one endpoint, so no
    fallback (run the picker with ``--ext-proc-fallbacks 0``).
* A client-sent ``x-gateway-destination-endpoint`` is removed before ``ext_proc`` (a header_mutation
  filter), so only the picker names pods.
* ``failure_mode_allow``: false (default) = fail closed: a picker error, timeout or crash becomes
  Envoy's 500 (``ext_proc_error_gRPC_error_N``) or 504 (message timeout). True = fail open: Envoy
  forwards the request without a destination (``override-host`` round-robins over the pods;
  ``original-dst`` answers 503 since there is no destination).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from vllm_llmd.router.endpoints import POST_ENDPOINTS

DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
#: the routes whose body the picker reads: every endpoint the router routes by its JSON body
#: (``vllm_llmd.router.endpoints``; multipart audio is load balanced by Envoy alone)
GENERATION_PATHS = tuple(p for p, e in POST_ENDPOINTS.items() if e.prompt != "raw")

_T = "type.googleapis.com/envoy."


@dataclass
class EnvoyOptions:
    #: pods as ``ip:port`` (override-host cluster; ignored by original-dst)
    pods: list[str]
    #: the picker's gRPC address ``host:port``
    picker: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    cluster: Literal["override-host", "original-dst"] = "override-host"
    failure_mode_allow: bool = False
    #: per ext_proc message (a decision; an SSE chunk when the picker watches it)
    message_timeout_s: float = 5.0
    #: largest request body Envoy buffers for the picker (413 above)
    max_body_bytes: int = 16 * 1024 * 1024
    #: retries on another pod (the picker's fallback endpoints) before response headers
    retries: int = 2
    connect_timeout_s: float = 3.0
    #: Envoy worker threads are set on the command line (``--concurrency``), not here
    extra_clusters: list[dict[str, Any]] = field(default_factory=list)


def _addr(hostport: str) -> dict[str, Any]:
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {hostport!r}")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _endpoints(name: str, addrs: list[str]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(a)}} for a in addrs]}],
    }


def _seconds(s: float) -> str:
    return f"{s:.3f}s"


#: Envoy's defaults (1024 requests, 3 concurrent retries per cluster) would cap a gateway's concurrency
_BREAKERS = {
    "thresholds": [
        {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000, "max_retries": 10000}
    ]
}


def _ext_proc_filter(o: EnvoyOptions) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "llmd_picker"}},
            "failure_mode_allow": o.failure_mode_allow,
            "message_timeout": _seconds(o.message_timeout_s),
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "response_header_mode": "SEND",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            # the picker switches SSE answers to STREAMED response bodies (first-token time)
            "allow_mode_override": True,
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [LB_NAMESPACE]},
                "receiving_namespaces": {"untyped": [LB_NAMESPACE]},
            },
        },
    }


def _routes(o: EnvoyOptions) -> list[dict[str, Any]]:
    generation = {
        "cluster": "llmd_pods",
        "timeout": "0s",  # generation may stream for minutes
        "retry_policy": {
            "retry_on": "connect-failure,reset",
            "num_retries": o.retries,
            "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.050s"},
        },
    }
    routes: list[dict[str, Any]] = [
        {"match": {"path": p}, "route": dict(generation), "name": p.strip("/").replace("/", "_")}
        for p in GENERATION_PATHS
    ]
    routes.append(
        {
            "name": "passthrough",
            "match": {"prefix": "/"},
            "route": {"cluster": "llmd_pods", "timeout": "60s"},
            "typed_per_filter_config": {
                "envoy.filters.http.ext_proc": {
                    "@type": _T + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "disabled": True,
                }
            },
        }
    )
    return routes


def _pods_cluster(o: EnvoyOptions) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "llmd_pods",
        "connect_timeout": _seconds(o.connect_timeout_s),
        "circuit_breakers": _BREAKERS,
    }
    if o.cluster == "original-dst":
        base.update(
            {
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION},
            }
        )
        return base
    lb_key = {"key": LB_NAMESPACE, "path": [{"key": DESTINATION}]}
    base.update(
        {
            "type": "STATIC",
            "load_assignment": _endpoints("llmd_pods", o.pods),
            "load_balancing_policy": {
                "policies": [
                    {
                        "typed_extension_config": {
                            "name": "envoy.load_balancing_policies.override_host",
                            "typed_config": {
                                "@type": _T + "extensions.load_balancing_policies.override_host.v3.OverrideHost",
                                "override_host_sources": [{"metadata": lb_key}, {"header": DESTINATION}],
                                "selected_host_key": {"key": LB_NAMESPACE, "path": [{"key": SERVED}]},
                                "fallback_policy": {
                                    "policies": [
                                        {
                                            "typed_extension_config": {
                                                "name": "envoy.load_balancing_policies.round_robin",
                                                "typed_config": {
                                                    "@type": _T
                                                    + "extensions.load_balancing_policies.round_robin.v3.RoundRobin"
                                                },
                                            }
                                        }
                                    ]
                                },
                            },
                        }
                    }
                ]
            },
        }
    )
    return base


def _strip_client_destination() -> dict[str, Any]:
    """A client must not name its own pod: drop its ``x-gateway-destination-endpoint`` (and the served
    key) before ext_proc runs, so a failing-open picker cannot leave a client's choice in place."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": _T + "extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": DESTINATION}, {"remove": SERVED}]},
        },
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check(o: EnvoyOptions) -> None:
    if o.cluster == "override-host":
        if not o.pods:
            raise ValueError("the override-host cluster needs the pods' ip:port list")
        for p in o.pods:
            if not _is_ip(p.rpartition(":")[0].strip("[]")):
                raise ValueError(
                    f"pod {p!r}: the override-host cluster needs IP addresses (Envoy matches the picker's "
                    "ip:port against its hosts); use EDS/a Service in production or --cluster original-dst"
                )
    elif o.failure_mode_allow:
        # measured with Envoy 1.40 (tests/unit/test_gateway.py): a request forwarded without the
        # destination header has no host in an ORIGINAL_DST cluster and gets 503; it does not loop
        raise ValueError(
            "original-dst with failure_mode_allow: without the picker there is no destination, so failing "
            "open answers 503 just as failing closed does; use --cluster override-host to fail open"
        )


def bootstrap(o: EnvoyOptions) -> dict[str, Any]:
    """The Envoy bootstrap (a dict in Envoy's v3 YAML/JSON shape)."""
    _check(o)
    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llmd_gateway",
        "codec_type": "AUTO",
        "request_timeout": "0s",
        "route_config": {
            "name": "llmd",
            "virtual_hosts": [
                {
                    "name": "llmd",
                    "domains": ["*"],
                    "routes": _routes(o),
                    # Envoy buffers the whole body for the picker (BUFFERED) and for retries
                    "request_body_buffer_limit": o.max_body_bytes,
                }
            ],
        },
        "http_filters": [
            _strip_client_destination(),
            _ext_proc_filter(o),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    picker_host = o.picker.rpartition(":")[0].strip("[]")
    picker = {
        "name": "llmd_picker",
        # a Service name (e.g. a headless Service over the router replicas) is resolved by DNS
        "type": "STATIC" if _is_ip(picker_host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "circuit_breakers": _BREAKERS,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": _endpoints("llmd_picker", [o.picker]),
    }
    return {
        "admin": {"address": _addr(f"{o.admin_host}:{o.admin_port}")},
        "static_resources": {
            "listeners": [
                {
                    "name": "llmd_gateway",
                    "address": _addr(f"{o.listen_host}:{o.listen_port}"),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [_pods_cluster(o), picker, *o.extra_clusters],
        },
    }


def render(o: EnvoyOptions) -> str:
    header = (
        "# Envoy bootstrap for vllm-llmd gateway mode, generated by `vllm-llmd envoy-config`\n"
        "# (vllm_llmd/gateway/envoy_config.py). Run: envoy -c THIS_FILE --concurrency 2\n"
    )
    return header + yaml.safe_dump(bootstrap(o), sort_keys=False, width=120)
