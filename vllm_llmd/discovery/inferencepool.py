"""The ``InferencePool`` object of the Gateway API Inference Extension: which pods, which ports.

Written from the extension's API types (kubernetes-sigs/gateway-api-inference-extension,
``api/v1/inferencepool_types.go`` and ``api/v1/shared_types.go``, 2026-08; and for the older API
``apix/v1alpha2/inferencepool_types.go`` before its removal in #2796):

* ``inference.networking.k8s.io/v1`` (the current, served and stored version):
  ``spec.selector.matchLabels`` (a map; the selector is deliberately only ``matchLabels``, so it can
  become a Service selector), ``spec.targetPorts`` (1 to 8 ``{number}``, unique; every port is a
  distinct endpoint ``podIP:number``), ``spec.appProtocol`` (``http`` or ``kubernetes.io/h2c``),
  optional ``spec.endpointPickerRef`` (``group``, ``kind``, ``name``, ``port.number``,
  ``failureMode`` ``FailOpen``/``FailClose``).
* ``inference.networking.x-k8s.io/v1alpha2`` (deprecated, removed upstream; still read so older
  clusters work): ``spec.selector`` (a plain map), ``spec.targetPortNumber``, ``spec.extensionRef``.

The models are strict (unknown spec keys are errors) so that the CI manifest check
(tests/unit/test_k8s_manifests.py) catches typos with the same code discovery uses to read a pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GROUP_V1 = "inference.networking.k8s.io"
GROUP_V1ALPHA2 = "inference.networking.x-k8s.io"
PLURAL = "inferencepools"
API_VERSIONS = (f"{GROUP_V1}/v1", f"{GROUP_V1ALPHA2}/v1alpha2")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class PortNumber(_Strict):
    number: int = Field(ge=1, le=65535)


class LabelSelector(_Strict):
    match_labels: dict[str, str] = Field(alias="matchLabels", min_length=1, max_length=64)


class EndpointPickerRef(_Strict):
    group: str | None = None
    kind: str = "Service"
    name: str = Field(min_length=1, max_length=253)
    port: PortNumber | None = None
    failure_mode: Literal["FailOpen", "FailClose"] = Field(default="FailClose", alias="failureMode")

    @model_validator(mode="after")
    def _service_port(self) -> EndpointPickerRef:
        if self.kind == "Service" and self.port is None:
            raise ValueError("port is required when kind is 'Service' or unspecified (defaults to 'Service')")
        return self


class SpecV1(_Strict):
    selector: LabelSelector
    target_ports: list[PortNumber] = Field(alias="targetPorts", min_length=1, max_length=8)
    app_protocol: Literal["http", "kubernetes.io/h2c"] = Field(default="http", alias="appProtocol")
    endpoint_picker_ref: EndpointPickerRef | None = Field(default=None, alias="endpointPickerRef")

    @field_validator("target_ports")
    @classmethod
    def _unique(cls, v: list[PortNumber]) -> list[PortNumber]:
        numbers = [p.number for p in v]
        if len(set(numbers)) != len(numbers):
            raise ValueError("port number must be unique")
        return v


class ExtensionRefV1alpha2(_Strict):
    group: str | None = None
    kind: str | None = None
    name: str = Field(min_length=1)
    port_number: int | None = Field(default=None, alias="portNumber", ge=1, le=65535)
    failure_mode: Literal["FailOpen", "FailClose"] | None = Field(default=None, alias="failureMode")


class SpecV1alpha2(_Strict):
    selector: dict[str, str] = Field(min_length=1, max_length=64)
    target_port_number: int = Field(alias="targetPortNumber", ge=1, le=65535)
    extension_ref: ExtensionRefV1alpha2 | None = Field(default=None, alias="extensionRef")


class Metadata(_Open):
    name: str = Field(min_length=1)


class InferencePoolV1(_Open):
    api_version: Literal["inference.networking.k8s.io/v1"] = Field(alias="apiVersion")
    kind: Literal["InferencePool"]
    metadata: Metadata
    spec: SpecV1


class InferencePoolV1alpha2(_Open):
    api_version: Literal["inference.networking.x-k8s.io/v1alpha2"] = Field(alias="apiVersion")
    kind: Literal["InferencePool"]
    metadata: Metadata
    spec: SpecV1alpha2


class BadPool(ValueError):
    """An InferencePool discovery cannot use; the message names the field."""


@dataclass(frozen=True)
class PoolTarget:
    """What discovery takes from a pool: the pods' labels and the serving ports."""

    match_labels: tuple[tuple[str, str], ...]
    ports: tuple[int, ...]

    @property
    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.match_labels)


def parse_pool(obj: dict[str, Any]) -> PoolTarget:
    """Selector and ports of an InferencePool (v1 or v1alpha2 JSON). Raises :class:`BadPool`.
    A watch sends objects without ``apiVersion`` only in lists, so the caller fills it in."""
    api = obj.get("apiVersion")
    try:
        if api == API_VERSIONS[0]:
            v1 = InferencePoolV1.model_validate(obj)
            labels = v1.spec.selector.match_labels
            ports = tuple(p.number for p in v1.spec.target_ports)
        elif api == API_VERSIONS[1]:
            old = InferencePoolV1alpha2.model_validate(obj)
            labels = old.spec.selector
            ports = (old.spec.target_port_number,)
        else:
            raise BadPool(f"InferencePool apiVersion {api!r}; expected one of {list(API_VERSIONS)}")
    except ValidationError as e:
        name = (obj.get("metadata") or {}).get("name", "?")
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise BadPool(f"InferencePool {name}: {problems}") from None
    return PoolTarget(tuple(sorted(labels.items())), ports)
