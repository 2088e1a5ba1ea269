"""Peak memory and step time of the training strategies side by side: LoRA, full fine-tuning, LISA (γ = 1, 2, 4),
IST and Mid-Block on the same model, data and batches.

Every configuration is one `ila train` (`ila.train`, the code users run) in a fresh process, so its peak is its
own; configurations are interleaved within each repeat. Peak memory: CUDA max allocated on GPU, peak RSS during
training on CPU; both include the model's weights. On CPU the RSS also holds the runtime (Python, torch,
transformers) and what reading the data left in the heap (the BIG-bench archive: several GB), so the CPU ratios
are printed as measured and as the training's own increase: peak − the memory held when training starts (run.json
`start_memory_mb`: model weights, data, runtime), i.e. gradients, optimizer state and activations. For LISA the
run's own record gives the AdamW state after each switch against what the active parameters need (2 moments ×
their bytes).

Targets (issue 8): LISA γ = 2 peak ≤ 0.5 × full fine-tuning on smollm2-135m, and ≤ LoRA's on a shape where the
embeddings are a small share of the parameters; optimizer state after each switch within 5 % of the active set's.

    python benchmarks/strategy_memory.py                          # smollm2-135m (embeddings: 21 % of parameters)
    python benchmarks/strategy_memory.py --shape small-embeddings # random-init 12 × 768, 4k vocabulary (7 %)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {  # label -> ila.train options
    "LoRA": {"method": "lora"},
    "full": {"method": "full", "learning_rate": 1e-5},
    "LISA γ=1": {"method": "full", "strategy": "lisa", "lisa_layers": 1},
    "LISA γ=2": {"method": "full", "strategy": "lisa", "lisa_layers": 2},
    "LISA γ=4": {"method": "full", "strategy": "lisa", "lisa_layers": 4},
    "IST": {"method": "lora", "strategy": "ist", "ist_interval": 2},
    "Mid-Block 01100": {"method": "lora", "strategy": "midblock", "segments": "01100"},
}


def worker(spec: dict) -> dict:
    """One configuration in this process; prints what it measured as one JSON line."""
    import psutil
    import torch

    runtime = 0 if torch.cuda.is_available() else psutil.Process().memory_info().rss
    import ila

    out = Path(tempfile.mkdtemp(prefix="strategy_memory_"))
    options = {**spec["options"], "model": spec["model"], "data": spec["data"], "max_steps": spec["steps"],
               "batch_size": spec["batch_size"], "max_length": spec["max_length"],
               "max_examples": spec["batch_size"] * (spec["steps"] + 2) * 2}
    if options.get("strategy") == "lisa":
        options["lisa_interval"] = spec["interval"]
    run = ila.train(out / "run", **options)
    record = json.loads((out / "run" / "run.json").read_text()).get("strategy_record", {})
    params = sum(p.numel() for p in run.model.parameters())
    return {"step_ms": run.cost["median_step_ms"], "peak_mb": run.cost["peak_memory_mb"],
            "start_mb": run.cost["start_memory_mb"], "runtime_mb": runtime / 2**20,
            "trainable": run.cost["trainable_params"], "params": params,
            "schedule": record.get("lisa_schedule", [])}


def make_small_embeddings_model(folder: Path, data: str) -> float:
    """A random-init Llama shape whose embeddings are a small share of its parameters: 12 blocks of width 768 and
    a 4,096-token BPE vocabulary trained on the benchmark's data. Returns the embeddings' share."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ila
    from ila.data import load_examples

    _, tokenizer = ila.load_model("smollm2-135m")
    texts = [m["content"] for e in load_examples(data, max_examples=2000) for m in e["messages"]]
    tokenizer = tokenizer.train_new_from_iterator(texts, vocab_size=4096)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=len(tokenizer), tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    outside = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
    return outside / sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", choices=["small-embeddings"], help="a random-init shape instead of --model")
    parser.add_argument("--data", default="bigbench:natural_instructions/*qasc*")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (LISA switches every 2)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="every configuration recomputes "
                        "activations in the backward pass (what remains is weights, gradients and optimizer state)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    model, share = args.model, None
    if args.shape:
        model = tempfile.mkdtemp(prefix="shape_")
        share = make_small_embeddings_model(Path(model), args.data)
    print(f"model: {args.shape or model}" + (f" (embeddings + LM head: {share:.1%} of the parameters)" if share else "")
          + f"; data {args.data}; batch {args.batch_size} × ≤{args.max_length} tokens; {args.steps} steps "
          "(median step time over all; LISA switches and IST updates its scores every 2 steps); "
          f"{args.repeats} repeats, each configuration in a fresh process; "
          + ("gradient checkpointing; " if args.gradient_checkpointing else "") +
          f"device {'cuda' if _cuda() else 'cpu'}, {os.cpu_count()} cores", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in args.configs}
    for repeat in range(args.repeats):
        for label in args.configs:
            options = {**CONFIGS[label], **({"gradient_checkpointing": True} if args.gradient_checkpointing else {})}
            spec = {"model": model, "data": args.data, "options": options, "steps": args.steps,
                    "batch_size": args.batch_size, "max_length": args.max_length, "interval": 2}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{label}: the run failed:\n{done.stderr[-2000:]}")
            results[label].append(json.loads(line[7:]))
            print(f"  repeat {repeat + 1} {label}: {results[label][-1]['peak_mb']:.0f} MiB peak, "
                  f"{results[label][-1]['step_ms']:.0f} ms/step", flush=True)
    report(results)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def report(results: dict[str, list[dict]]) -> None:
    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    full = "full" if "full" in results else next(iter(results))

    def grown(label: str) -> float:  # the training's own memory: peak − memory held at the start of training
        return statistics.median(r["peak_mb"] - r["start_mb"] for r in results[label])

    print(f"\n{'configuration':<17} {'trainable':>12} {'peak MiB':>9} {'× full':>7} {'+MiB*':>7} {'× full*':>8} "
          f"{'× LoRA*':>8} {'ms/step':>8} {'× full':>7}")
    for label in results:
        peak, step = med(label, "peak_mb"), med(label, "step_ms")
        vs_lora = grown(label) / grown("LoRA") if "LoRA" in results else float("nan")
        print(f"{label:<17} {int(med(label, 'trainable')):>12,} {peak:>9.0f} {peak / med(full, 'peak_mb'):>7.2f} "
              f"{grown(label):>7.0f} {grown(label) / grown(full):>8.2f} {vs_lora:>8.2f} {step:>8.0f} "
              f"{step / med(full, 'step_ms'):>7.2f}")
    start = statistics.median(r["start_mb"] for rs in results.values() for r in rs)
    runtime = statistics.median(r["runtime_mb"] for rs in results.values() for r in rs)
    print(f"* the training's own memory: peak − memory when training starts (median {start:.0f} MiB: runtime "
          f"{runtime:.0f} MiB after the imports, then the model and the data)")
    for label in results:
        switches = [s for r in results[label] for s in r["schedule"]]
        if switches:
            ratios = [s["optimizer_state_bytes"] / (2 * s["active_param_bytes"]) for s in switches]
            print(f"{label}: AdamW state after each of {len(switches)} switches / 2 × active parameter bytes: "
                  f"{min(ratios):.4f}–{max(ratios):.4f}")


if __name__ == "__main__":
    main()
