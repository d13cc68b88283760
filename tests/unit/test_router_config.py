"""Router configuration: YAML and flags, unknown keys named, the CLI's --check."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_llmd.cli import main
from vllm_llmd.router.config import ConfigError, load_config, parse_config, parse_worker_flag


def test_worker_flag_forms() -> None:
    p = parse_worker_flag("http://127.0.0.1:8001")
    assert (p.pod_id, p.events, p.replay) == ("127.0.0.1:8001", None, None)
    p = parse_worker_flag("http://127.0.0.1:8001=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558")
    assert (p.events, p.replay) == ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558")
    p = parse_worker_flag("http://10.0.0.1:8001/=tcp://10.0.0.1:5557")
    assert p.url == "http://10.0.0.1:8001" and p.replay is None
    with pytest.raises(ConfigError, match="http://host:port"):
        parse_worker_flag("127.0.0.1:8001")
    with pytest.raises(ConfigError, match="tcp://"):
        parse_worker_flag("http://127.0.0.1:8001=127.0.0.1:5557")


def test_yaml_profile_and_unknown_keys(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(
        """
pods:
  - url: http://127.0.0.1:8001
    events: tcp://127.0.0.1:5557
    prefill_speed: 2.5
profile:
  scorers:
    - type: estimated-ttft
      params: {decode_token_weight: 0.1}
    - type: queue-depth
      weight: 0.5
"""
    )
    cfg = load_config(f)
    assert cfg.pods[0].prefill_speed == 2.5
    assert [s.type for s in cfg.profile.scorers] == ["estimated-ttft", "queue-depth"]
    f.write_text("pods:\n  - url: http://127.0.0.1:8001\n    evnets: tcp://x:1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'pods.0.evnets'"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"unknown key 'profle'"):
        parse_config({"profle": {}})
    with pytest.raises(ConfigError, match="not valid YAML"):
        f.write_text("pods: [\n")
        load_config(f)


def test_cli_check_reports_plugin_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("profile:\n  scorers:\n    - type: estimated-ttft\n      params: {bogus: 1}\n")
    rc = main(["router", "--config", str(f), "--worker", "http://127.0.0.1:9", "--check"])
    assert rc == 2
    assert "unknown parameter 'bogus'" in capsys.readouterr().err
    rc = main(["router", "--worker", "http://127.0.0.1:9", "--worker", "http://127.0.0.1:9", "--check"])
    assert rc == 2 and "duplicate pods" in capsys.readouterr().err
    rc = main(["router", "--worker", "http://127.0.0.1:9=tcp://127.0.0.1:10", "--check"])
    assert rc == 0 and "config OK: 1 pods" in capsys.readouterr().out


def test_shipped_example_config_builds() -> None:
    from importlib.resources import files

    from vllm_llmd.router.server import build_router

    cfg = load_config(str(files("vllm_llmd.router") / "scheduling.example.yaml"))
    assert [p.pod_id for p in cfg.pods] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    router = build_router(cfg)  # no tokenizer: the approximate path, events ignored
    assert [s.scorer.name for s in router.scheduler.scorers] == ["estimated-ttft"]
