"""Seeded workload generators for the serving benchmark: the request shapes a real fleet sees.

Each generator returns a :class:`Workload`: a list of :class:`Turn` in the order they are offered,
each tagged with a *session*. The client (``bench/workload_client.py``) sends them in that order with
a bounded number in flight, and a turn waits until the previous turn of its session has finished
(a conversation or an agent cannot send turn k+1 before it has turn k's answer). The assistant
replies and tool results placed in the histories are generated here, not the engines' outputs, so a
workload is the same bytes for every router (the engines' KV for turn k's prompt is a prefix of turn
k+1's prompt either way).

Text is random words of a seeded vocabulary, cut to an exact token count with the test model's own
tokenizer (``tokenizer.json``), so lengths below are in the model's tokens. One seed, one workload,
byte for byte.

Shapes (defaults; every number is a keyword argument of the generator):

* ``multiturn`` -- 32 interleaved conversations of 6 turns: a 512-token opening (one of 4 shared
  system prompts of 192 tokens + a 320-token first user message), then per turn a 64-192-token
  user message; every turn resends the whole history with 96-token assistant replies. Turns of
  different conversations are interleaved at random (a conversation's own turns stay in order).
  The last turns are ~1.7k tokens; the 32 histories (~55k tokens) outgrow two 20k-token caches.
* ``zipf`` -- 64 system prompts of 1,024 tokens (65k tokens: more than the two engines' caches
  hold), drawn with Zipf popularity (s = 1.1), + a 96-token user message; 256 requests.
* ``rag`` -- a 128-token instruction shared by all, one of 24 documents of 1,536 tokens drawn with
  Zipf popularity (s = 0.9), then a 64-token question; 192 requests.
* ``agentic`` -- 16 agents, 8 steps each: one of 2 tool manifests (768 tokens) + a 192-token task,
  then per step a 48-token tool call and a 128-384-token tool result appended; 24 output tokens.
* ``hotprefix`` -- 16 prefixes of 2,048 tokens; one takes half the traffic, the other 15 share the
  rest uniformly; a 64-token suffix; 192 requests.
* ``hotlong`` -- ``hotprefix`` with 1,024-token suffixes and 128 requests: the hot prefix's pod is
  prefill-bound (its own requests' suffixes), so a placement that keeps the hot prefix on one pod
  leaves that pod most of the prefill work (the static oracle sent 89 of 128 requests there on the
  wide model, bench/RESULTS.md "Issue 12: when spreading a hot prefix pays"), where with 64-token suffixes
  the pods' work is mostly decode steps, which batch at nearly no cost per request.
* ``longrag`` -- long-context RAG where peer KV loads should pay (docs/peer-loading.md "When a load
  pays"): 24 documents of 2,560 tokens (61k tokens, ~480 MiB of the wide model's KV: more than one
  pod's engine cache and DRAM tier hold when run with ``alternating.py --num-gpu-blocks 320 --dram
  320MiB``, less than two), drawn with Zipf popularity (s = 1.0), each request the document first
  (so the static oracle's text prefix names it), then a 32-token question; 16 output tokens; 480
  requests. Prefill dominates (2.5k uncached tokens against 16 decode steps), so a second pod must
  serve a popular document and either prefill it again or load it.

Output tokens per request are ``max_tokens`` with ``ignore_eos`` (32 unless the shape says otherwise).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SYLLABLES = "ba lo mi nu sek tar vin po qua rel dis ent ho ga fu zi ke mo ra tu wen ly ob ip".split()


@dataclass(frozen=True, slots=True)
class Turn:
    session: str
    prompt: str
    max_tokens: int


@dataclass
class Workload:
    name: str
    seed: int
    turns: list[Turn]
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self, count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "seed": self.seed,
            "requests": len(self.turns),
            "sessions": len({t.session for t in self.turns}),
            "params": self.params,
        }
        if count_tokens is not None:
            lens = sorted(count_tokens(t.prompt) for t in self.turns)
            out["prompt_tokens"] = {"min": lens[0], "p50": lens[len(lens) // 2], "max": lens[-1], "sum": sum(lens)}
        return out


class TextMaker:
    """Random text of an exact token count for one tokenizer (seeded by the caller's rng)."""

    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_json))
        vrng = random.Random(1234)
        self.vocab = sorted({"".join(vrng.choice(_SYLLABLES) for _ in range(vrng.randint(1, 3))) for _ in range(4000)})

    def text(self, rng: random.Random, n_tokens: int) -> str:
        words: list[str] = []
        ids: list[int] = []
        while len(ids) < n_tokens:
            words += [rng.choice(self.vocab) for _ in range(max(16, n_tokens))]
            ids = self.tok.encode(" ".join(words), add_special_tokens=False).ids
        return str(self.tok.decode(ids[:n_tokens])).strip()

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


def _interleave(rng: random.Random, sessions: list[list[Turn]]) -> list[Turn]:
    """Merge the sessions' turn lists at random (weighted by turns left), each list's order kept."""
    idx = [0] * len(sessions)
    out: list[Turn] = []
    left = [len(s) for s in sessions]
    while any(left):
        i = rng.choices(range(len(sessions)), weights=left, k=1)[0]
        out.append(sessions[i][idx[i]])
        idx[i] += 1
        left[i] -= 1
    return out


def multiturn(
    tm: TextMaker,
    seed: int = 0,
    conversations: int = 32,
    turns: int = 6,
    system_prompts: int = 4,
    system_tokens: int = 192,
    opening_tokens: int = 320,
    user_tokens: tuple[int, int] = (64, 192),
    reply_tokens: int = 96,
    output_tokens: int = 32,
) -> Workload:
    rng = random.Random(seed)
    systems = [tm.text(rng, system_tokens) for _ in range(system_prompts)]
    sessions = []
    for c in range(conversations):
        history = f"System: {systems[c % system_prompts]}\nUser: {tm.text(rng, opening_tokens)}\nAssistant:"
        conv = []
        for _turn in range(turns):
            conv.append(Turn(f"conv{c}", history, output_tokens))
            history += f" {tm.text(rng, reply_tokens)}\nUser: {tm.text(rng, rng.randint(*user_tokens))}\nAssistant:"
        sessions.append(conv)
    return Workload("multiturn", seed, _interleave(rng, sessions), _params(locals()))


def zipf(
    tm: TextMaker,
    seed: int = 0,
    prompts: int = 64,
    prompt_tokens: int = 1024,
    s: float = 1.1,
    user_tokens: int = 96,
    requests: int = 256,
    output_tokens: int = 32,
) -> Workload:
    rng = random.Random(seed)
    systems = [tm.text(rng, prompt_tokens) for _ in range(prompts)]
    order = list(range(prompts))
    rng.shuffle(order)  # popularity rank is not creation order
    w = _zipf_weights(prompts, s)
    out = []
    for i in range(requests):
        k = order[rng.choices(range(prompts), weights=w, k=1)[0]]
        out.append(Turn(f"r{i}", f"System: {systems[k]}\nUser: {tm.text(rng, user_tokens)}\nAssistant:", output_tokens))
    return Workload("zipf", seed, out, _params(locals()))


def rag(
    tm: TextMaker,
    seed: int = 0,
    documents: int = 24,
    document_tokens: int = 1536,
    instruction_tokens: int = 128,
    question_tokens: int = 64,
    s: float = 0.9,
    requests: int = 192,
    output_tokens: int = 32,
) -> Workload:
    rng = random.Random(seed)
    instruction = tm.text(rng, instruction_tokens)
    docs = [tm.text(rng, document_tokens) for _ in range(documents)]
    w = _zipf_weights(documents, s)
    out = []
    for i in range(requests):
        d = rng.choices(range(documents), weights=w, k=1)[0]
        q = tm.text(rng, question_tokens)
        out.append(Turn(f"r{i}", f"{instruction}\nDocument: {docs[d]}\nQuestion: {q}\nAnswer:", output_tokens))
    return Workload("rag", seed, out, _params(locals()))


def agentic(
    tm: TextMaker,
    seed: int = 0,
    agents: int = 16,
    steps: int = 8,
    manifests: int = 2,
    manifest_tokens: int = 768,
    task_tokens: int = 192,
    call_tokens: int = 48,
    result_tokens: tuple[int, int] = (128, 384),
    output_tokens: int = 24,
) -> Workload:
    rng = random.Random(seed)
    tools = [tm.text(rng, manifest_tokens) for _ in range(manifests)]
    sessions = []
    for a in range(agents):
        ctx = f"Tools: {tools[a % manifests]}\nTask: {tm.text(rng, task_tokens)}\nCall:"
        loop = []
        for _step in range(steps):
            loop.append(Turn(f"agent{a}", ctx, output_tokens))
            ctx += f" {tm.text(rng, call_tokens)}\nResult: {tm.text(rng, rng.randint(*result_tokens))}\nCall:"
        sessions.append(loop)
    return Workload("agentic", seed, _interleave(rng, sessions), _params(locals()))


def hotprefix(
    tm: TextMaker,
    seed: int = 0,
    prefixes: int = 16,
    prefix_tokens: int = 2048,
    hot_share: float = 0.5,
    suffix_tokens: int = 64,
    requests: int = 192,
    output_tokens: int = 32,
) -> Workload:
    rng = random.Random(seed)
    pre = [tm.text(rng, prefix_tokens) for _ in range(prefixes)]
    out = []
    for i in range(requests):
        k = 0 if rng.random() < hot_share else rng.randrange(1, prefixes)
        out.append(Turn(f"r{i}", f"{pre[k]}\n{tm.text(rng, suffix_tokens)}", output_tokens))
    return Workload("hotprefix", seed, out, _params(locals()))


def hotlong(tm: TextMaker, seed: int = 0) -> Workload:
    wl = hotprefix(tm, seed, suffix_tokens=1024, requests=128)
    return Workload("hotlong", seed, wl.turns, wl.params)


def longrag(
    tm: TextMaker,
    seed: int = 0,
    documents: int = 24,
    document_tokens: int = 2560,
    s: float = 1.0,
    question_tokens: int = 32,
    requests: int = 480,
    output_tokens: int = 16,
) -> Workload:
    rng = random.Random(seed)
    docs = [tm.text(rng, document_tokens) for _ in range(documents)]
    order = list(range(documents))
    rng.shuffle(order)  # popularity rank is not creation order
    w = _zipf_weights(documents, s)
    out = []
    for i in range(requests):
        d = order[rng.choices(range(documents), weights=w, k=1)[0]]
        q = tm.text(rng, question_tokens)
        out.append(Turn(f"r{i}", f"Document: {docs[d]}\nQuestion: {q}\nAnswer:", output_tokens))
    return Workload("longrag", seed, out, _params(locals()))


def _params(local: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in local.items()
        if isinstance(v, int | float | tuple) and k not in ("i", "c", "a", "k", "d") and not k.startswith("_")
    }


GENERATORS: dict[str, Callable[..., Workload]] = {
    "multiturn": multiturn,
    "zipf": zipf,
    "rag": rag,
    "agentic": agentic,
    "hotprefix": hotprefix,
    "hotlong": hotlong,
    "longrag": longrag,
}


def build(name: str, model_dir: Path, seed: int = 0) -> tuple[Workload, TextMaker]:
    if name not in GENERATORS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(GENERATORS)}")
    tm = TextMaker(model_dir / "tokenizer.json")
    return GENERATORS[name](tm, seed=seed), tm


if __name__ == "__main__":  # print each workload's summary for the small test model
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vllm_llmd.testing.model import make_test_model

    md = make_test_model(Path(__file__).resolve().parent / "out" / "models" / "small", shape="small")
    for n in GENERATORS:
        wl, tm = build(n, md)
        print(json.dumps(wl.summary(tm.count)))
