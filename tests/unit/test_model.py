"""The locally generated test model."""

from __future__ import annotations

import hashlib
import json

from tokenizers import Tokenizer

from vllm_llmd.testing.model import make_test_model


def _digest(d) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        h.update((d / name).read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a = make_test_model(tmp_path / "a", seed=7)
    b = make_test_model(tmp_path / "b", seed=7)
    c = make_test_model(tmp_path / "c", seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_tokenizer_round_trips_and_config_matches(tmp_path):
    d = make_test_model(tmp_path / "m")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    text = "Kari tone musa, 42 + unseen wörds!"
    assert tok.decode(tok.encode(text).ids) == text
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == tok.get_vocab_size()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
