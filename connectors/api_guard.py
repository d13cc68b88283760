"""API-server guard: ``kv_transfer_params`` that are not a JSON object get HTTP 400, not a 500.

vLLM 0.32 lets a client put any string, number or list into ``vllm_xargs`` and copies
``vllm_xargs["kv_transfer_params"]`` into ``SamplingParams.extra_args`` unchecked
(vllm/entrypoints/openai/completion/protocol.py, ``to_sampling_params``). Its own output processor
(vllm/v1/engine/output_processor.py, ``RequestState.from_new_request``) and scheduler
(vllm/v1/core/sched/scheduler.py, ``add_request``) then call ``.get`` on it: measured on a real
engine, ``{"vllm_xargs": {"kv_transfer_params": "anything"}}`` answered HTTP 500
(``AttributeError: 'str' object has no attribute 'get'``, tests/engine/test_kv_params_hostile.py).

The plugin wraps ``InputProcessor._validate_params`` (vllm/v1/engine/input_processor.py), the check
vLLM runs on every request's sampling parameters before either of those, so that such a value is
refused as a ``VLLMValidationError`` (vLLM answers 400 naming the parameter). No connector can
use anything but an object; objects go on to the connector's own checks
(:mod:`vllm_llmd.connectors.scheduler`: refused ones are served locally).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger("vllm.vllm_llmd.connectors")

_MARK = "_llmd_kv_params_guard"


def check_extra_args(params: Any) -> None:
    """Raise vLLM's ``VLLMValidationError`` when ``params.extra_args["kv_transfer_params"]`` is set
    to anything but an object."""
    extra = getattr(params, "extra_args", None)
    if not isinstance(extra, dict):
        return
    value = extra.get("kv_transfer_params")
    if value is None or isinstance(value, dict):
        return
    from vllm.exceptions import VLLMValidationError

    raise VLLMValidationError(
        f"kv_transfer_params must be a JSON object, not {type(value).__name__}", parameter="kv_transfer_params"
    )


def install() -> bool:
    """Wrap ``InputProcessor._validate_params`` once; ``False`` if already done or not found."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = getattr(InputProcessor, "_validate_params", None)
    if original is None or getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        check_extra_args(params)
        return original(self, params, *args, **kwargs)

    setattr(_validate_params, _MARK, True)
    InputProcessor._validate_params = _validate_params  # type: ignore[method-assign]
    return True
