"""Write a small random-weight Llama-style checkpoint with a locally trained tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on text generated here from a
seeded word list, the weights are seeded random numbers. The same seed and shape give the same
files byte for byte, so tests, examples and benchmarks share one model without a hub.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

_SYLLABLES = (
    "ka ri to ne mu sa lo vi de pa su ko ra fe ti no ma gu le bi zo ha yu we xi "
    "qua pre stra ion ent ver tal lum dor ix ar el om un cy"
).split()


@dataclass(frozen=True)
class ModelShape:
    """The shape of the generated model. Defaults make a ~10 MB model that starts fast."""

    num_layers: int = 2
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 4096
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(),
    # The two shapes the router benchmark uses (prefill dominates more on the wider one).
    "small": ModelShape(num_layers=6, hidden_size=384, num_heads=6, num_kv_heads=2, intermediate_size=1024),
    "wide": ModelShape(num_layers=8, hidden_size=768, num_heads=12, num_kv_heads=4, intermediate_size=2048),
}


def _corpus(seed: int, words: int = 60_000) -> list[str]:
    rng = random.Random(seed)
    vocab = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(3000)})
    lines: list[str] = []
    line: list[str] = []
    for _ in range(words):
        w = rng.choice(vocab)
        line.append(w.capitalize() if not line else w)
        if rng.random() < 0.08:
            lines.append(" ".join(line) + rng.choice([".", "?", "!", ","]))
            line = []
    lines.append(" ".join(line) + ".")
    lines.append("0123456789 +-*/=()[]{}<>:;'\"@#$%^&_|~`\\ \n\t")
    return lines


def _train_tokenizer(out: Path, vocab_size: int, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": False,
                "model_max_length": 1_000_000,
            },
            indent=1,
        )
    )
    # the chat template in its own file, as transformers >= 4.47 saves it (and loads it first)
    (out / "chat_template.jinja").write_text(chat_template)
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    )


def _weights(shape: ModelShape, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, hd = shape.hidden_size, shape.head_dim

    def w(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)

    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": w(shape.vocab_size, h),
        "model.norm.weight": np.ones(h, dtype=np.float16),
        "lm_head.weight": w(shape.vocab_size, h),
    }
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = np.ones(h, dtype=np.float16)
        out[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np.float16)
        out[p + "self_attn.q_proj.weight"] = w(shape.num_heads * hd, h)
        out[p + "self_attn.k_proj.weight"] = w(shape.num_kv_heads * hd, h)
        out[p + "self_attn.v_proj.weight"] = w(shape.num_kv_heads * hd, h)
        out[p + "self_attn.o_proj.weight"] = w(h, shape.num_heads * hd)
        out[p + "mlp.gate_proj.weight"] = w(shape.intermediate_size, h)
        out[p + "mlp.up_proj.weight"] = w(shape.intermediate_size, h)
        out[p + "mlp.down_proj.weight"] = w(h, shape.intermediate_size)
    return out


def make_test_model(out_dir: str | Path, shape: ModelShape | str = "tiny", seed: int = 0) -> Path:
    """Write the model to ``out_dir`` (created if needed) and return its path.

    Idempotent: when ``out_dir`` already holds a model made with the same shape and seed, nothing
    is rewritten.
    """
    from safetensors.numpy import save_file

    if isinstance(shape, str):
        shape = SHAPES[shape]
    out = Path(out_dir)
    stamp = {"generator": "vllm_llmd.testing.model", "format": 2, "seed": seed, "shape": asdict(shape)}
    stamp_file = out / "llmd_test_model.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out, shape.vocab_size, seed)
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    if vocab_size != shape.vocab_size:
        raise RuntimeError(f"tokenizer trained to {vocab_size} tokens, expected {shape.vocab_size}")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": shape.vocab_size,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 3,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}))
    save_file(_weights(shape, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    stamp_file.write_text(json.dumps(stamp))
    return out
