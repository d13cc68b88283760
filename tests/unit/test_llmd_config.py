"""llm-d compatibility (issue 14): llm-d's plugin names as aliases, and an EndpointPickerConfig
file read as the router's configuration (what maps is translated, what does not is named)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vllm_llmd.router.config import ConfigError, RouterConfig, load_config
from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.scheduling import SchedulingContext, build_scheduler
from vllm_llmd.router.scheduling.aliases import ALIASES
from vllm_llmd.router.scheduling.registry import registered

EPP = """\
apiVersion: llm-d.ai/v1
kind: EndpointPickerConfig
featureGates: [flowControl]
saturationDetector: {queueDepthThreshold: 5}
plugins:
- type: single-profile-handler
- type: queue-scorer
- type: kv-cache-utilization-scorer
- name: prefix
  type: prefix-cache-scorer
  parameters: {blockSize: 64, maxPrefixBlocksToMatch: 256}
- type: decode-filter
- type: max-score-picker
- type: some-custom-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix
    weight: 3
  - pluginRef: some-custom-scorer
  - pluginRef: max-score-picker
"""


def _ctx() -> SchedulingContext:
    from vllm_llmd.router.inflight import InflightTracker

    return SchedulingContext(None, PrefixMemory(10), InflightTracker(), 64, 0.0)


def test_every_alias_names_a_registered_plugin() -> None:
    for llmd, alias in ALIASES.items():
        assert alias.type in registered(), (llmd, alias.type)


def test_llmd_names_work_in_our_profiles() -> None:
    cfg = RouterConfig.model_validate(
        {
            "profile": {
                "filters": [{"type": "prefill-filter"}],
                "scorers": [{"type": "queue-scorer"}, {"type": "precise-prefix-cache-scorer", "weight": 2}],
                "picker": {"type": "max-score-picker"},
            }
        }
    )
    sched = build_scheduler(cfg.profile, _ctx())
    assert [(type(s.scorer).__name__, s.weight) for s in sched.scorers] == [
        ("QueueDepthScorer", 1.0),
        ("PrecisePrefixScorer", 2.0),
    ]
    assert sched.filters[0].params.role == "prefill" and type(sched.picker).__name__ == "MaxScorePicker"


def test_an_endpoint_picker_config_is_translated_and_the_rest_named(tmp_path: Path, caplog) -> None:
    f = tmp_path / "epp.yaml"
    f.write_text(EPP)
    caplog.set_level(logging.WARNING, logger="vllm_llmd.router.config")
    cfg = load_config(f)
    p = cfg.profile
    assert [(s.type, s.weight) for s in p.scorers] == [
        ("queue-depth", 2.0),
        ("kv-cache-usage", 1.0),
        ("approx-prefix-cache", 3.0),
    ]
    assert [(x.type, x.params) for x in p.filters] == [("role", {"role": "decode"})]
    assert p.picker.type == "max-score"
    build_scheduler(p, _ctx())  # and it builds
    text = caplog.text
    for named in ("featureGates not translated", "saturationDetector not translated", "some-custom-scorer",
                  "['blockSize', 'maxPrefixBlocksToMatch']"):  # fmt: skip
        assert named in text, named
    assert "single-profile-handler" not in text  # the router does its work: nothing to say


def test_pd_profiles_and_bad_files(tmp_path: Path) -> None:
    f = tmp_path / "pd.yaml"
    f.write_text(
        "kind: EndpointPickerConfig\nplugins:\n- {type: pd-profile-handler, parameters: {threshold: 100}}\n"
        "- {type: prefill-filter}\n- {type: decode-filter}\n- {type: queue-scorer}\n"
        "schedulingProfiles:\n- {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]}\n"
        "- {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]}\n"
    )
    cfg = load_config(f)
    assert cfg.pd.threshold_tokens == 100
    assert cfg.pd.prefill_profile is not None and cfg.pd.prefill_profile.filters[0].params == {"role": "prefill"}
    assert cfg.profile.filters[0].params == {"role": "decode"}
    f.write_text("kind: EndpointPickerConfig\nschedulingProfiles: [{name: a}, {name: b}]\n")
    with pytest.raises(ConfigError, match="one scheduling profile"):
        load_config(f)
