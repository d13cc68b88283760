"""Compile a Hugging Face causal LM for Rebellions NPUs with optimum-rbln: the step an operator runs
before serving it on vllm-rbln's default (optimum) model path.

NOT RUN BY THIS PROJECT. optimum-rbln needs Rebellions' compiler (rebel-compiler, from Rebellions'
own package index), which does not exist on this project's CI machines, so this script has never
been executed here; CI only checks that it parses and answers ``--help``. It is written from
optimum-rbln 0.12.0's documented API: ``RBLNAutoModelForCausalLM.from_pretrained(model_id,
export=True, rbln_config={...})`` compiles, ``save_pretrained`` writes the compiled artifact; the
``rbln_config`` keys are those of ``RBLNDecoderOnlyModelForCausalLMConfig`` (``batch_size``,
``max_seq_len``, ``attn_impl``, ``kvcache_partition_len``, ``kvcache_block_size``) and of
``RBLNModelConfig`` (``num_devices``, ``npu``, ``create_runtimes``).

Where the artifact is used: point vllm-rbln's ``--model`` at the output directory and it takes the
optimum model path (vllm-rbln's ``config.py`` detects a compiled artifact). That path runs the model
inside a compiled runtime and has **no KV connector**: such pods serve whole requests (the router
routes to them, KV events flow) but take no part in prefill/decode hand-offs. NPU pods that decode
hand-offs run ``--model-impl vllm`` on the original checkpoint (see ../README.md).

    python compile_model.py --model /models/my-model --out /compiled/my-model-rbln \\
        --batch-size 8 --max-seq-len 8192 --block-size 1024 --num-devices 1 --npu RBLN-CA25
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (or hub id)")
    p.add_argument("--out", required=True, help="where the compiled artifact is written")
    p.add_argument("--batch-size", type=int, default=8, help="decode batch size compiled in (vLLM --max-num-seqs)")
    p.add_argument("--max-seq-len", type=int, default=8192, help="longest sequence (vLLM --max-model-len)")
    p.add_argument(
        "--block-size",
        type=int,
        default=1024,
        help="KV cache block = flash-attention partition, in tokens (vLLM --block-size)",
    )
    p.add_argument("--num-devices", type=int, default=1, help="NPUs the model is split over (an RSD group)")
    p.add_argument(
        "--npu",
        default="RBLN-CA25",
        help="target NPU: RBLN-CA25 = ATOM, RBLN-CR13 = REBEL (needed on a host without an NPU)",
    )
    args = p.parse_args(argv)
    # optimum-rbln's flash-attention constraints (RBLNDecoderOnlyModelForCausalLMConfig), checked
    # before a compile that takes an hour fails on them
    if args.max_seq_len % args.block_size or args.max_seq_len < 2 * args.block_size:
        p.error(f"--max-seq-len {args.max_seq_len} must be a multiple of --block-size and at least twice it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from optimum.rbln import RBLNAutoModelForCausalLM  # needs rebel-compiler (Rebellions' index)

    model = RBLNAutoModelForCausalLM.from_pretrained(
        args.model,
        export=True,
        rbln_config={
            "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len,
            "attn_impl": "flash_attn",
            "kvcache_partition_len": args.block_size,
            "kvcache_block_size": args.block_size,
            "num_devices": args.num_devices,
            "npu": args.npu,
            # compile only: a compile host need not have an NPU
            "create_runtimes": False,
        },
    )
    model.save_pretrained(args.out)
    print(f"compiled {args.model} for {args.npu} x{args.num_devices} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
