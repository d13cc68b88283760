"""The cost model: how long one engine step (one forward pass of a continuous batch) takes.

A step of vLLM's V1 engine runs every scheduled request's new tokens in one batch: prefill chunks
(up to ``max_num_batched_tokens`` tokens in all) and one token per decoding request. Its time is
modelled as

    t_step = ( step_s
             + prefill_token_s  * P                      P  = prefill tokens in the step
             + prefill_attn_s   * sum_i p_i * (c_i + p_i / 2)   p_i, c_i = chunk tokens, tokens before it
             + decode_seq_s     * D                      D  = decoding requests in the step
             + decode_ctx_s     * sum_j c_j )            c_j = context length of decoding request j
             / speed

the first two terms being the dense layers and the per-step overhead, the attention terms growing
with context (a prefill chunk of p tokens after c cached ones attends to c + p/2 tokens on
average). ``request_s`` is added once to each request's time to first token (HTTP, tokenization,
detokenization in the API server).

The coefficients are fitted to a real vLLM CPU engine by ``bench/sim_fit.py`` (the committed
profiles under ``bench/sim_profiles/`` and their fit report say how well).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class CostModel(BaseModel):
    """Coefficients of the step-time formula (seconds); ``speed`` divides every step's time."""

    model_config = ConfigDict(extra="forbid")

    step_s: float = Field(default=0.004, ge=0)
    prefill_token_s: float = Field(default=5e-5, ge=0)
    prefill_attn_s: float = Field(default=0.0, ge=0)
    decode_seq_s: float = Field(default=3e-4, ge=0)
    decode_ctx_s: float = Field(default=0.0, ge=0)
    request_s: float = Field(default=0.0, ge=0)
    speed: float = Field(default=1.0, gt=0)

    def step_time(self, work: StepWork) -> float:
        t = (
            self.step_s
            + self.prefill_token_s * work.prefill_tokens
            + self.prefill_attn_s * work.prefill_attn
            + self.decode_seq_s * work.decode_seqs
            + self.decode_ctx_s * work.decode_ctx
        )
        return t / self.speed

    def scaled(self, speed: float) -> CostModel:
        return self.model_copy(update={"speed": self.speed * speed})


@dataclass(slots=True)
class StepWork:
    """What one step computes (the cost model's inputs)."""

    prefill_tokens: int = 0
    prefill_attn: float = 0.0
    decode_seqs: int = 0
    decode_ctx: int = 0

    def add_prefill(self, tokens: int, context: int) -> None:
        self.prefill_tokens += tokens
        self.prefill_attn += tokens * (context + tokens / 2)

    def add_decode(self, context: int) -> None:
        self.decode_seqs += 1
        self.decode_ctx += context

    @property
    def empty(self) -> bool:
        return self.prefill_tokens == 0 and self.decode_seqs == 0

    def features(self) -> list[float]:
        """The regressors of the fit, in the order of :data:`FEATURES`."""
        return [1.0, float(self.prefill_tokens), self.prefill_attn, float(self.decode_seqs), float(self.decode_ctx)]


#: CostModel fields multiplied by :meth:`StepWork.features`
FEATURES = ("step_s", "prefill_token_s", "prefill_attn_s", "decode_seq_s", "decode_ctx_s")
