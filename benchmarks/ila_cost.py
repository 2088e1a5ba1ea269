"""Cost of ILA's stage 2 relative to stage 1, measured side by side (seeds/000 Obs. 6: 5343 / 6671 ms = 0.80).

Step ratio (default): both stages run through the product's own code (`run_stage1`, `run_stage2` on the HF
Trainer) on the same model and the same batches (same data seed). Each repeat loads the model fresh, runs
`--steps` stage-1 steps (LoRA with dropout, AdamW; no ε-stop, no probe evaluation) and then `--steps` stage-2
steps on the result (no settle checks). It prints each repeat's median step
times and their ratio, then the median over repeats, and peak memory (CUDA max allocated on GPU, the kernel's
peak RSS on CPU).

Settle ratio (`--settle`): the demo recipe (`ila demo`'s config) end to end through `ila.identify`, stage 1
until ε-stable or its cap, stage 2 until its settle rule fires; prints stage-2 time / stage-1 time per repeat
(repeat k uses seed k) and their median. Target ≤ 0.5.

    python benchmarks/ila_cost.py                      # smollm2-135m, the embedded gsm8k set, CPU-sized
    python benchmarks/ila_cost.py --settle --repeats 2 # the demo recipe, time to settle
    python benchmarks/ila_cost.py --shape llama2-7b    # random-init Llama-2-7B shape (GPU)
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from transformers import default_data_collator

from ila.config import IdentifyConfig
from ila.data import build_dataset, collate, load_examples
from ila.importance.ila import IlaOptions
from ila.importance.stage1 import run_stage1
from ila.importance.stage2 import run_stage2
from ila.layers import discover_layers
from ila.models import load_model

SHAPES = {  # random-init shapes for speed/memory figures that do not depend on weight values
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
}


def build_model(args):
    if args.shape:
        config = transformers.LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = transformers.LlamaForCausalLM(config)
        return model.to(torch.bfloat16) if args.bf16_weights else model
    return load_model(args.model)[0]


def build_batches(args, n: int):
    """Real instruction data for --model; for --shape, random token ids (the step cost does not depend on them):
    every sequence `--max-length` long, the second half the response."""
    if args.shape:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, SHAPES[args.shape]["vocab_size"], (n, args.max_length), generator=g)
        labels = ids.clone()
        labels[:, : args.max_length // 2] = -100
        rows = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
        return Dataset.from_dict(rows), default_data_collator
    _, tokenizer = load_model(args.model)
    examples = load_examples(args.data, max_examples=n, seed=0)
    return build_dataset(examples, tokenizer, max_length=args.max_length), collate(tokenizer)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of this shape instead of --model")
    p.add_argument("--bf16-weights", action="store_true", help="with --shape: keep weights in bfloat16")
    p.add_argument("--data", default="gsm8k", help="ignored with --shape")
    p.add_argument("--steps", type=int, default=6, help="measured steps per stage per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in both stages")
    p.add_argument("--settle", action="store_true", help="time to settle on the demo recipe instead of step times")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.settle:
        return settle_ratio(args)

    config = IdentifyConfig()
    config.lora.r, config.lora.alpha, config.lora.dropout = args.lora_r, args.lora_r, 0.1
    config.stage1.max_steps = args.steps + 1  # +1: the first step warms up, not counted
    config.stage1.batch_size = args.batch_size
    options = IlaOptions(max_steps=args.steps + 1, min_steps=10**9, interval=10**9, batch_size=args.batch_size,
                         probe_examples=args.batch_size)  # no settle checks inside the measured steps
    config.stage1.epsilon, config.stage1.save_steps = 1e-12, 10**9
    config.dtype = "bfloat16" if args.bf16 else "float32"

    dataset, collator = build_batches(args, args.batch_size * (args.steps + 1) * 2)
    model = build_model(args)
    layers = discover_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    tokens = sum(len(x) for x in dataset[: args.batch_size * args.steps]["input_ids"]) / args.steps
    print(f"setup: model {args.shape or args.model} ({n_params / 1e6:.1f} M params, {len(layers)} linear layers), "
          f"LoRA r={args.lora_r} dropout 0.1 on all of them; batch {args.batch_size}, ≤{args.max_length} tokens "
          f"(~{tokens:.0f} tokens/step); {args.steps} measured steps per stage (+1 warm-up) x {args.repeats} repeats; "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; {device}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, python {platform.python_version()}")
    ratios, mem1, mem2, ms1, ms2 = [], [], [], [], []
    for repeat in range(args.repeats):
        if repeat:
            model = build_model(args)
        with tempfile.TemporaryDirectory() as tmp:
            s1 = run_stage1(model, layers, dataset, collator, config, Path(tmp) / "s1")
            probe = dataset.select(range(args.batch_size))
            s2 = run_stage2(s1.model, layers, dataset, probe, collator, options, Path(tmp) / "s2", seed=0,
                            bf16=args.bf16)
        t1 = statistics.median(s1.cost_steps_ms[1:])
        t2 = statistics.median(s2.cost_steps_ms[1:])
        ratios.append(t2 / t1)
        ms1.append(t1)
        ms2.append(t2)
        mem1.append(s1.cost["peak_memory_mb"])
        mem2.append(s2.cost["peak_memory_mb"])
        print(f"repeat {repeat + 1}: stage 1 {t1:8.1f} ms/step   stage 2 {t2:8.1f} ms/step   ratio {t2 / t1:.3f}   "
              f"peak memory {mem1[-1]:.0f} / {mem2[-1]:.0f} MiB", flush=True)
        del model, s1, s2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"stage-2 / stage-1 step time: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.repeats} repeats; "
          f"{statistics.median(ms2):.1f} / {statistics.median(ms1):.1f} ms")
    print(f"peak memory stage 2 / stage 1: {statistics.median(mem2) / statistics.median(mem1):.3f} "
          f"({statistics.median(mem2):.0f} / {statistics.median(mem1):.0f} MiB)")
    print("reference: paper 0.80 (5343 / 6671 ms, Llama 2-7B, GPU); target <= 0.70")
    return 0


def settle_ratio(args) -> int:
    """Stage-2 time to settle / stage-1 time on the demo recipe, `--repeats` seeds."""
    import ila
    from ila.demo import demo_config_path

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"setup: ila demo recipe ({demo_config_path()}) on {args.model} with {args.data}; stage 1 until ε-stable "
          f"or its cap, stage 2 until settled (its defaults); seeds 0..{args.repeats - 1}; {device}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    ratios = []
    for seed in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            meta = ila.identify(Path(tmp) / "run", config=demo_config_path(), model=args.model, data=args.data,
                                seed=seed).metadata
        t1, t2 = meta["timings"]["stage1_s"], meta["timings"]["score_s"]
        ratios.append(t2 / t1)
        print(f"seed {seed}: stage 1 {t1:6.1f} s ({meta['stage1_steps']} steps)   stage 2 {t2:6.1f} s "
              f"({meta['stage2_steps']} steps, settled at "
              f"{meta['stage2_settled_step']})   ratio {t2 / t1:.3f}", flush=True)
    print(f"stage-2 time to settle / stage-1 time: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}) over {args.repeats} seeds; target <= 0.5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
