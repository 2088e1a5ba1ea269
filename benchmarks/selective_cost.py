"""Step time and peak memory of training all linear layers vs only the top 30 % (seeds/000 Table 11).

Pairs, each measured side by side in every repeat: LoRA-all vs LoRA-top-30 %, full vs full-top-30 %,
QLoRA vs QLoRA-top-30 %. Every configuration runs in a fresh process (peak memory is a per-process figure:
CUDA max allocated on GPU, sampled peak RSS on CPU, both including the model's weights), through
`ila.training.methods.apply_method` + the HF Trainer on the same batches; the first step is a warm-up.
On CPU the RSS also holds the runtime (Python, torch, transformers: ~0.5 GB before any model is loaded), which
CUDA's allocator figure never includes; the CPU memory ratio is therefore printed twice, as measured and with
that runtime baseline (RSS after the imports, before the model) subtracted from both sides.

Paper (Llama 2-7B, GPU, batch 2 × 1024): LoRA 0.89 time / 0.87 memory; full 0.77 / 0.41; QLoRA 0.81 / 0.68.
Targets: LoRA-30 % ≤ 0.75 time and ≤ 0.80 memory; full-30 % ≤ 0.45 memory.

    python benchmarks/selective_cost.py                       # smollm2-135m, CPU-sized (batch 2 × 256)
    python benchmarks/selective_cost.py --ranking runs/demo/gsm8k/ranking.json
    python benchmarks/selective_cost.py --shape llama2-7b --max-length 1024 --methods lora full   # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import warnings

PAIRS = {"lora": "LoRA", "full": "full", "qlora": "QLoRA"}


def measure(args) -> dict:
    """One configuration, in this process: returns median step ms and peak memory MiB."""
    import psutil
    import torch
    import transformers
    from datasets import Dataset
    from transformers import default_data_collator

    from ila.config import TrainConfig
    from ila.data import build_dataset, collate, load_examples
    from ila.layers import discover_layers
    from ila.models import load_model
    from ila.ranking import Ranking
    from ila.selection import select_layers
    from ila.training.cost import CostCallback
    from ila.training.methods import apply_method, quantization_config
    from ila.training.trainer import ResponseLossTrainer, training_arguments

    runtime = 0 if torch.cuda.is_available() else psutil.Process().memory_info().rss  # before any model exists
    n = args.batch_size * (args.steps + 1)
    if args.shape:
        shapes = {"llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)}
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # bf16: full FT of 7B must fit
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shapes[args.shape])).to(torch.bfloat16)
        ids = torch.randint(10, 32000, (n, args.max_length), generator=torch.Generator().manual_seed(0))
        labels = ids.clone()
        labels[:, : args.max_length // 2] = -100
        dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                     "labels": labels.tolist()})
        collator = default_data_collator
    else:
        quant = quantization_config(torch.float32) if args.method == "qlora" else None
        model, tokenizer = load_model(args.model, quantization_config=quant)
        dataset = build_dataset(load_examples(args.data, max_examples=n * 2, seed=0), tokenizer,
                                max_length=args.max_length).select(range(n))
        collator = collate(tokenizer)
    layers = discover_layers(model)
    if args.ranking:
        rankings = [Ranking.load(args.ranking)]
    else:  # a seeded stand-in ranking: how many layers train sets most of the cost, but not all of it (with
        # LoRA, backward stops below the lowest trained block), so pass --ranking for the real figure
        g = torch.Generator().manual_seed(0)
        rankings = [Ranking.from_scores(layers, torch.randn(len(layers), generator=g).tolist())]
    selection = select_layers(args.select, layers, rankings)
    config = TrainConfig(method=args.method, select=args.select, max_steps=args.steps + 1,
                         batch_size=args.batch_size)
    model = apply_method(model, [x.name for x in selection.trained], config)
    cost = CostCallback()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ResponseLossTrainer(
            model=model, args=training_arguments(tmp, max_steps=args.steps + 1, batch_size=args.batch_size,
                                                 learning_rate=1e-5, seed=0),
            train_dataset=dataset, data_collator=collator, callbacks=[cost])
        trainer.train()
    return {"ms": statistics.median(cost.step_ms[1:]), "mib": cost.peak_bytes / 2**20,
            "net_mib": (cost.peak_bytes - runtime) / 2**20,
            "trained": len(selection.trained), "layers": len(layers),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", choices=["llama2-7b"], help="random-init model of this shape (no QLoRA)")
    p.add_argument("--data", default="gsm8k")
    p.add_argument("--ranking", help="ranking.json for the top 30 %% (default: a seeded stand-in)")
    p.add_argument("--methods", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--steps", type=int, default=4, help="measured steps per configuration (+1 warm-up)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--one", nargs=2, metavar=("METHOD", "SELECT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.shape and "qlora" in args.methods:
        p.error("--shape builds an unquantised random-init model: pass --methods lora full")
    if args.one:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        args.method, args.select = args.one
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return 0

    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"setup: {args.shape or args.model}; batch {args.batch_size} x ≤{args.max_length} tokens; "
          f"{args.steps} measured steps (+1 warm-up) per configuration, each in a fresh process; {args.repeats} "
          f"repeats; top 30 % from {args.ranking or 'a seeded stand-in ranking'}; {device}; torch {torch.__version__}")
    base = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    base += ["--shape", args.shape] if args.shape else []
    base += ["--ranking", args.ranking] if args.ranking else []
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in args.methods}
    for repeat in range(args.repeats):
        for method in args.methods:
            runs = {}
            for select in ("all", "top:0.3"):
                proc = subprocess.run([*base, "--one", method, select], capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{method} {select}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                    break
                runs[select] = json.loads(line[7:])
            if len(runs) < 2:
                continue
            a, b = runs["all"], runs["top:0.3"]
            results[method].append((b["ms"] / a["ms"], b["mib"] / a["mib"], b["net_mib"] / a["net_mib"]))
            net = "" if cuda else f" ({b['net_mib'] / a['net_mib']:.3f} above the runtime)"
            print(f"repeat {repeat + 1} {PAIRS[method]:6s}: all {a['ms']:7.0f} ms {a['mib']:7.0f} MiB "
                  f"({a['trainable']:,} trainable) | top 30 % ({b['trained']}/{b['layers']} layers) {b['ms']:7.0f} ms "
                  f"{b['mib']:7.0f} MiB ({b['trainable']:,}) | ratio time {b['ms'] / a['ms']:.3f} "
                  f"memory {b['mib'] / a['mib']:.3f}{net}", flush=True)
    paper = {"lora": (0.89, 0.87), "full": (0.77, 0.41), "qlora": (0.81, 0.68)}
    for method, pairs in results.items():
        if pairs:
            t, m, net = (statistics.median(x[i] for x in pairs) for i in range(3))
            above = "" if cuda else f" ({net:.3f} above the runtime)"
            print(f"{PAIRS[method]:6s} top-30 % / all: time {t:.3f}, memory {m:.3f}{above} (median of {len(pairs)}; "
                  f"paper {paper[method][0]:.2f} / {paper[method][1]:.2f})")
    print("targets: LoRA-30 % <= 0.75 time and <= 0.80 memory; full-30 % <= 0.45 memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
