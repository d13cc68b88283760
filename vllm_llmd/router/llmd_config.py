"""Read an llm-d ``EndpointPickerConfig`` (the EPP's plugin graph) as the router's configuration,
translating what maps and naming what does not.

The schema (llm-d-inference-scheduler / Gateway API Inference Extension, ``apiVersion``
``llm-d.ai/v1`` or ``inference.networking.x-k8s.io/v1alpha1``, ``kind: EndpointPickerConfig``):
``plugins: [{name?, type, parameters?}]`` (``name`` defaults to ``type``) and
``schedulingProfiles: [{name, plugins: [{pluginRef, weight?}]}]``, besides ``featureGates``,
``saturationDetector``, ``dataLayer``, ``flowControl``, ``parser`` / ``requestHandler``.

* The profile used is the only one, or ``default``; with ``prefill`` and ``decode`` profiles (llm-d's
  P/D) the ``decode`` profile is the main one and ``prefill`` becomes ``pd.prefill_profile``.
* A referenced plugin whose type is ours or an llm-d alias (:mod:`.scheduling.aliases`) becomes a
  filter, scorer (with the reference's ``weight``, default 1 as in llm-d) or picker of ours.
  llm-d's ``parameters`` are not ours: they are named in the report, not translated, except
  ``pd-profile-handler``'s ``threshold`` (-> ``pd.threshold_tokens``).
* Profile handlers (``single-profile-handler``, ``pd-profile-handler``) and header handlers need no
  plugin here (the router does their work); every other type and top-level section is named as
  not translated.
"""

from __future__ import annotations

from typing import Any

from vllm_llmd.router.scheduling.aliases import ALIASES, resolve
from vllm_llmd.router.scheduling.registry import registered

KIND = "EndpointPickerConfig"
#: llm-d plugins whose work the router does itself (no plugin to configure)
BUILT_IN = {
    "single-profile-handler": "the router runs one profile (two with P/D) itself",
    "pd-profile-handler": "P/D: the router's prefix-threshold decider (pd.threshold_tokens)",
    "prefill-header-handler": "the router sends the prefill leg itself",
    "decode-header-handler": "the router sends the decode leg itself",
}
_KNOWN_TOP = {"apiVersion", "kind", "plugins", "schedulingProfiles"}


def is_endpoint_picker_config(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == KIND


def _kind_of(our_type: str) -> str | None:
    for kind in ("filter", "scorer", "picker"):
        if our_type in registered(kind):  # type: ignore[arg-type]
            return kind
    return None


def _profile(refs: list[Any], plugins: dict[str, dict[str, Any]], where: str, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"filters": [], "scorers": []}
    for ref in refs:
        name = ref.get("pluginRef") if isinstance(ref, dict) else None
        spec = plugins.get(name) if isinstance(name, str) else None
        if spec is None:
            notes.append(f"{where}: pluginRef {name!r} names no plugin: ignored")
            continue
        llmd_type = str(spec.get("type"))
        if llmd_type in BUILT_IN:
            continue
        ours, fixed = resolve(llmd_type)
        kind = _kind_of(ours)
        if kind is None:
            notes.append(f"{where}: plugin {name!r} (type {llmd_type}) has no counterpart here: not translated")
            continue
        params = spec.get("parameters") or {}
        if params:
            notes.append(
                f"{where}: parameters of {name!r} ({llmd_type}) not translated: {sorted(params)} (ours: docs/plugins/)"
            )
        alias = ALIASES.get(llmd_type)
        if alias is not None and alias.note:
            notes.append(f"{where}: {llmd_type} -> {ours}: {alias.note}")
        entry: dict[str, Any] = {"type": ours, "params": fixed}
        if kind == "scorer":
            entry["weight"] = float(ref.get("weight", 1))
            out["scorers"].append(entry)
        elif kind == "filter":
            out["filters"].append(entry)
        else:
            out["picker"] = entry
    if not out["scorers"]:
        del out["scorers"]  # ours: the default scorer
        notes.append(f"{where}: no scorer translated: the router's default (estimated-ttft) is used")
    return out


def translate(data: dict[str, Any], source: str = "config") -> tuple[dict[str, Any], list[str]]:
    """An ``EndpointPickerConfig`` -> (the router's configuration data, what was not translated)."""
    notes = [f"{source}: {k} not translated (no counterpart in the router)" for k in data if k not in _KNOWN_TOP]
    plugins: dict[str, dict[str, Any]] = {}
    for p in data.get("plugins") or []:
        if isinstance(p, dict) and isinstance(p.get("type"), str):
            plugins[str(p.get("name") or p["type"])] = p
    profiles = {str(p.get("name")): p for p in data.get("schedulingProfiles") or [] if isinstance(p, dict)}
    out: dict[str, Any] = {}
    if "decode" in profiles and "prefill" in profiles:
        main, prefill = profiles.pop("decode"), profiles.pop("prefill")
        out["pd"] = {
            "prefill_profile": _profile(prefill.get("plugins") or [], plugins, f"{source}: profile prefill", notes)
        }
        for p in plugins.values():
            if p.get("type") == "pd-profile-handler":
                params = dict(p.get("parameters") or {})
                if "threshold" in params:
                    out["pd"]["threshold_tokens"] = int(params.pop("threshold"))
                if params:
                    notes.append(f"{source}: pd-profile-handler parameters not translated: {sorted(params)}")
    elif len(profiles) == 1 or "default" in profiles:
        main = profiles.pop("default") if "default" in profiles else profiles.popitem()[1]
    else:
        raise ValueError(f"{source}: {KIND} needs one scheduling profile, 'default', or 'prefill' + 'decode'")
    for name in profiles:
        notes.append(f"{source}: scheduling profile {name!r} not translated (the router runs one, two with P/D)")
    out["profile"] = _profile(main.get("plugins") or [], plugins, f"{source}: profile {main.get('name')}", notes)
    return out, notes
