"""A tiny LoRA adapter for the local test model, written in PEFT's format (no hub, no peft needed).

``adapter_config.json`` holds the fields vLLM's ``PEFTHelper.from_dict`` requires
(``vllm/lora/peft_helper.py``: ``r``, ``lora_alpha``, ``target_modules``) and
``adapter_model.safetensors`` the ``lora_A`` / ``lora_B`` weights under PEFT's names
(``base_model.model.<module>.lora_A.weight``: ``[r, in]``; ``lora_B``: ``[out, r]``), which vLLM's
``LoRAModel.from_local_checkpoint`` loads (``vllm/lora/lora_model.py``). Random weights, so the
adapter changes the model's outputs (and vLLM hashes its blocks apart from the base model's).
"""

from __future__ import annotations

import json
from pathlib import Path


def make_test_lora(model_dir: str | Path, out_dir: str | Path, rank: int = 8, seed: int = 1) -> Path:
    """Write a rank-``rank`` adapter on ``q_proj`` / ``v_proj`` of every layer of the model in
    ``model_dir`` (a :func:`~vllm_llmd.testing.model.make_test_model` model) to ``out_dir``."""
    import numpy as np
    from safetensors.numpy import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    outs = {"q_proj": cfg["num_attention_heads"] * hd, "v_proj": cfg["num_key_value_heads"] * hd}
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for mod, out in outs.items():
            name = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{name}.lora_A.weight"] = (rng.standard_normal((rank, h)) * 0.05).astype(np.float16)
            tensors[f"{name}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.05).astype(np.float16)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(outs),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (out_path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out_path
