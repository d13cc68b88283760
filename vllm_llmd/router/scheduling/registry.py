"""Plugin registry: type name -> (kind, factory, parameter model). Parameters are validated with a
pydantic model that forbids unknown keys, so a typo names the key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from vllm_llmd.router.scheduling.framework import SchedulingContext

Kind = Literal["filter", "scorer", "picker", "decider"]
P = TypeVar("P")


class PluginError(ValueError):
    pass


class Params(BaseModel):
    """Base of every plugin's parameter model."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class PluginSpec:
    kind: Kind
    type: str
    params: type[Params]
    factory: Callable[[str, Any, SchedulingContext], Any]


_REGISTRY: dict[str, PluginSpec] = {}


def register(kind: Kind, type_name: str, params: type[Params]) -> Callable[[Any], Any]:
    """Class decorator: ``@register("scorer", "queue-depth", QueueParams)``; the class takes
    ``(name, params, ctx)``."""

    def deco(cls: Any) -> Any:
        if type_name in _REGISTRY:
            raise PluginError(f"plugin type {type_name!r} registered twice")
        _REGISTRY[type_name] = PluginSpec(kind, type_name, params, cls)
        cls.plugin_type = type_name
        return cls

    return deco


def registered_params(kind: Kind, type_name: str) -> type[Params] | None:
    """The parameter model of a registered plugin (``None`` if there is no such plugin)."""
    spec = _REGISTRY.get(type_name)
    return spec.params if spec is not None and spec.kind == kind else None


def registered(kind: Kind | None = None) -> list[str]:
    return sorted(k for k, s in _REGISTRY.items() if kind is None or s.kind == kind)


def create(kind: Kind, type_name: str, raw_params: dict[str, Any], ctx: SchedulingContext, where: str) -> Any:
    if type_name not in _REGISTRY:  # an llm-d name (vllm_llmd.router.scheduling.aliases)
        from vllm_llmd.router.scheduling.aliases import resolve

        type_name, fixed = resolve(type_name)
        raw_params = {**(raw_params or {}), **fixed}
    spec = _REGISTRY.get(type_name)
    if spec is None or spec.kind != kind:
        known = ", ".join(registered(kind))
        raise PluginError(f"{where}: unknown {kind} type {type_name!r} (known: {known})")
    try:
        params = spec.params.model_validate(raw_params or {})
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msgs.append(f"{where}: unknown parameter {loc!r} for {type_name}")
            else:
                msgs.append(f"{where}: {type_name} parameter {loc}: {err['msg']}")
        raise PluginError("\n".join(msgs)) from None
    return spec.factory(type_name, params, ctx)


def create_plugin(
    kind: Kind, type_name: str, raw_params: dict[str, Any], ctx: SchedulingContext, where: str, protocol: type[P]
) -> P:
    """:func:`create`, checked against the protocol the scheduler holds it as."""
    plugin = create(kind, type_name, raw_params, ctx, where)
    if not isinstance(plugin, protocol):
        raise PluginError(f"{where}: {type_name} does not implement the {kind} protocol ({protocol.__name__})")
    return plugin
