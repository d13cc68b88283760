"""Fleet profiles: which simulated pods to run and how each behaves (YAML or JSON).

```yaml
model: test-model               # served model name (the `model` requests must name)
tokenizer: /models/small        # directory holding tokenizer.json (and tokenizer_config.json)
defaults:                       # applied to every class, each class may override any key
  max_model_len: 4096
classes:
  - name: fast
    count: 4
    block_size: 16
    num_gpu_blocks: 8192
    cost: {step_s: 0.002, prefill_token_s: 2.0e-5, decode_seq_s: 1.0e-4, speed: 2.0}
  - name: slow
    count: 8
    block_size: 128
    num_gpu_blocks: 512
```

Every key is checked (unknown keys are errors that name the key). Defaults follow vLLM 0.32 on the
CPU backend (``max_num_batched_tokens`` 2048, ``max_num_seqs`` 128 for the API server, sha256 block
hashes, int hashes in events).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_llmd.router.config import format_validation_error, read_yaml, validated
from vllm_llmd.sim.cost import CostModel


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PodProfile(_Strict):
    """One simulated engine (what ``vllm serve`` flags and the hardware would decide)."""

    #: class label, shown in listings and written into the router config's comments
    name: str = "pod"
    #: accelerator kind label (e.g. ``gpu``, ``npu``, ``cpu``); informational
    accelerator: str = "cpu"
    block_size: int = Field(default=64, ge=1, le=65536)
    #: KV cache blocks incl. vLLM's null block (``--num-gpu-blocks-override``)
    num_gpu_blocks: int = Field(default=1024, ge=2)
    max_model_len: int = Field(default=4096, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    max_num_seqs: int = Field(default=128, ge=1)
    #: ``--prefix-caching-hash-algo``
    hash_algo: Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"] = "sha256"
    #: what ``PYTHONHASHSEED`` would be in the engine (``None``: the environment's, else vLLM's default)
    hash_seed: str | None = None
    #: ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` (1 = low 64 bits as int, 0 = raw digest bytes)
    int_block_hashes: bool = True
    #: ``--enable-prompt-tokens-details``: ``usage.prompt_tokens_details.cached_tokens`` in responses
    enable_prompt_tokens_details: bool = False
    #: publish KV events (ZMQ PUB) and serve replay (ZMQ ROUTER)
    kv_events: bool = True
    #: batches kept for replay (vLLM's ``KVEventsConfig.buffer_steps``)
    replay_buffer_steps: int = Field(default=10_000, ge=1)
    #: seed of the generated output tokens
    seed: int = 0
    cost: CostModel = Field(default_factory=CostModel)

    @model_validator(mode="after")
    def _check(self) -> PodProfile:
        if (self.num_gpu_blocks - 1) * self.block_size < self.max_model_len:
            raise ValueError(
                f"num_gpu_blocks {self.num_gpu_blocks} x block_size {self.block_size} cannot hold one "
                f"max_model_len ({self.max_model_len}) request (block 0 is the null block)"
            )
        return self


class PodClass(PodProfile):
    count: int = Field(default=1, ge=0)


class FleetProfile(_Strict):
    model: str = "test-model"
    tokenizer: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    classes: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "pod", "count": 1}])

    def resolved_classes(self) -> list[PodClass]:
        out = []
        for i, raw in enumerate(self.classes):
            merged = _deep_merge(self.defaults, raw)
            try:
                out.append(PodClass.model_validate(merged))
            except ValidationError as e:
                raise ProfileError(format_validation_error(e, f"classes[{i}]")) from None
        if not out:
            raise ProfileError("classes: at least one class is needed")
        return out

    def pods(self, n: int | None = None) -> list[PodProfile]:
        """The pods of the fleet in class order; ``n`` redistributes the class counts
        proportionally (largest remainder) over ``n`` pods."""
        classes = self.resolved_classes()
        counts = [c.count for c in classes]
        total = sum(counts)
        if n is not None:
            if n < 1:
                raise ProfileError("the number of pods must be at least 1")
            if total == 0:
                raise ProfileError("every class has count 0: cannot distribute pods")
            exact = [n * c / total for c in counts]
            counts = [int(x) for x in exact]
            rest = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
            for i in rest[: n - sum(counts)]:
                counts[i] += 1
        elif total == 0:
            raise ProfileError("every class has count 0")
        pods: list[PodProfile] = []
        for c, k in zip(classes, counts, strict=True):
            base = PodProfile.model_validate(c.model_dump(exclude={"count"}))
            pods.extend(base for _ in range(k))
        return pods


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_profile(data: Any, source: str = "profile") -> FleetProfile:
    prof = validated(FleetProfile, data, source, ProfileError)
    try:
        prof.resolved_classes()
    except ProfileError as e:
        raise ProfileError(f"{source}: {e}") from None
    return prof


def load_profile(path: str | Path) -> FleetProfile:
    p = Path(path)
    data = read_yaml(p, ProfileError)
    prof = parse_profile(data, str(p))
    if prof.tokenizer and not Path(prof.tokenizer).is_absolute():
        # a relative tokenizer path is relative to the profile file
        prof = prof.model_copy(update={"tokenizer": str((p.parent / prof.tokenizer).resolve())})
    return prof
