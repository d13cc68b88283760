"""The plugin entry point, without an engine."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from importlib.metadata import entry_points

from vllm_llmd import plugin


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("vllm_llmd") == "vllm_llmd.plugin:register"


def test_import_is_light():
    # vLLM imports every plugin module in every process: ours must not drag vLLM or torch in.
    code = "import sys, vllm_llmd.plugin, vllm_llmd.connectors; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", "import json;" + code], capture_output=True, text=True, check=True)
    mods = set(json.loads(out.stdout))
    assert not {m for m in mods if m.split(".")[0] in {"vllm", "torch", "transformers", "aiohttp"}}


def test_register_is_idempotent_and_registers_connector(tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(plugin.TRACE_ENV, str(trace))
    mod = importlib.reload(plugin)
    mod.register()
    mod.register()
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    assert "LLMDConnector" in KVConnectorFactory._registry
    cls = KVConnectorFactory.get_connector_class_by_name("LLMDConnector")
    assert cls.__module__ == "vllm_llmd.connectors.llmd_connector"
    lines = trace.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["role"] == "api_server"


def test_register_survives_a_broken_step(tmp_path, monkeypatch, caplog):
    mod = importlib.reload(plugin)

    def boom() -> list[str]:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(mod, "_register_connectors", boom)
    mod.register()  # must not raise: vLLM's start-up goes on
    assert "failed to register" in caplog.text


def test_kv_params_guard_refuses_what_only_vllm_xargs_can_carry():
    """A non-object kv_transfer_params (vllm_xargs allows strings, numbers, lists) is a client error
    (vLLM answers 400) instead of an AttributeError inside vLLM (500)."""
    import pytest
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm_llmd.connectors.api_guard import check_extra_args

    for bad in ("anything", 7, 1.5, ["do_remote_prefill", 1]):
        with pytest.raises(VLLMValidationError, match="kv_transfer_params must be a JSON object"):
            check_extra_args(SamplingParams(extra_args={"kv_transfer_params": bad}))
    for fine in (None, {}, {"do_remote_decode": True}, {"do_remote_prefill": "junk"}):  # objects: the connector's
        check_extra_args(SamplingParams(extra_args={"kv_transfer_params": fine}))
    check_extra_args(SamplingParams())
