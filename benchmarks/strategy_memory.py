"""Peak memory and step time of the training strategies side by side: LoRA, full fine-tuning, LISA (γ = 1, 2, 4),
IST and Mid-Block on the same model, data and batches.

Every configuration is one `ila train` (`ila.train`, the code users run) in a fresh process, so its peak is its
own; configurations are interleaved within each repeat. Peak memory: CUDA max allocated on GPU, peak RSS during
training on CPU; both include the model's weights. On CPU the RSS also holds the runtime (Python, torch,
transformers) and what reading the data left in the heap (small for the embedded sets), so the CPU ratios
are printed as measured and as the training's own increase: peak − the memory held when training starts (run.json
`start_memory_mb`: model weights, data, runtime), i.e. gradients, optimizer state and activations. For LISA the
run's own record gives the AdamW state after each switch against what the active parameters need (2 moments ×
their bytes).

Targets (issue 8): LISA γ = 2 peak ≤ 0.5 × full fine-tuning on smollm2-135m, and ≤ LoRA's on a shape where the
embeddings are a small share of the parameters; optimizer state after each switch within 5 % of the active set's.

    python benchmarks/strategy_memory.py                          # smollm2-135m (embeddings: 21 % of parameters)
    python benchmarks/strategy_memory.py --shape small-embeddings # random-init 12 × 768, 4k vocabulary (7 %)
    python benchmarks/strategy_memory.py --shape llama2-7b --shape-dir /tmp/l7b --scratch /dev/shm   # GPU

`--shape` builds a random-init model (memory and time do not depend on the weight values) with `--model`'s
tokenizer: `random` is `--model`'s own config, for a machine that has its config and tokenizer but not its
weights. A configuration that runs out of GPU memory is reported as such; the others go on.
"""

from __future__ import annotations

import argparse
import json
import math
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

    options = {**spec["options"], "model": spec["model"], "data": spec["data"], "max_steps": spec["steps"],
               "batch_size": spec["batch_size"], "max_length": spec["max_length"], "save_steps": 0,
               "max_examples": spec["batch_size"] * (spec["steps"] + 2) * 2}
    if options.get("strategy") == "lisa":
        options["lisa_interval"] = spec["interval"]
    with tempfile.TemporaryDirectory(prefix="strategy_memory_", dir=spec["scratch"]) as out:
        try:
            run = ila.train(Path(out) / "run", **options)
        except torch.cuda.OutOfMemoryError:
            return {"oom": True, "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
        record = json.loads((Path(out) / "run" / "run.json").read_text()).get("strategy_record", {})
    params = sum(p.numel() for p in run.model.parameters())
    return {"step_ms": run.cost["median_step_ms"], "peak_mb": run.cost["peak_memory_mb"],
            "start_mb": run.cost["start_memory_mb"], "runtime_mb": runtime / 2**20,
            "trainable": run.cost["trainable_params"], "params": params,
            "schedule": record.get("lisa_schedule", [])}


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    from ila.models import model_folder

    return AutoTokenizer.from_pretrained(model_folder(model))


def small_embeddings_config(model: str, data: str):
    """A Llama shape whose embeddings are a small share of its parameters: 12 blocks of width 768 and a
    4,096-token BPE vocabulary trained on the benchmark's data from `model`'s tokenizer."""
    from transformers import LlamaConfig

    from ila.data import load_examples

    texts = [m["content"] for e in load_examples(data, max_examples=2000) for m in e["messages"]]
    tokenizer = _tokenizer(model).train_new_from_iterator(texts, vocab_size=4096)
    return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=len(tokenizer), tie_word_embeddings=False,
                       max_position_embeddings=2048), tokenizer


def llama2_7b_config(model: str, data: str):
    """Llama-2-7B's shape (32 blocks of width 4096, MLP 11008, 32 heads) with `model`'s tokenizer and vocabulary."""
    from transformers import LlamaConfig

    tokenizer = _tokenizer(model)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=len(tokenizer), tie_word_embeddings=False,
                       max_position_embeddings=4096), tokenizer


def own_config(model: str, data: str):
    """`model`'s own config (its weights are not read)."""
    from transformers import AutoConfig

    from ila.models import model_folder

    return AutoConfig.from_pretrained(model_folder(model)), _tokenizer(model)


SHAPES = {"small-embeddings": small_embeddings_config, "llama2-7b": llama2_7b_config, "random": own_config}


def make_shape(shape: str, model: str, data: str, folder: Path) -> float:
    """Write a random-init model of `shape` (bfloat16 on disk; the runs load it in float32) and its tokenizer to
    `folder`, unless it is there already. Returns the share of the parameters outside the decoder blocks."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    marker = folder / "shape.json"  # written last: the folder holds a complete model of this shape
    if not marker.is_file() or json.loads(marker.read_text()) != {"shape": shape, "model": model}:
        config, tokenizer = SHAPES[shape](model, data)
        config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 7B init takes seconds on a GPU
            built = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        built.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del built
        marker.write_text(json.dumps({"shape": shape, "model": model}))
    sizes: dict[str, int] = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                sizes[name] = math.prod(f.get_slice(name).get_shape())
    return sum(n for name, n in sizes.items() if ".layers." not in name) / sum(sizes.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", choices=list(SHAPES), help="a random-init shape with --model's tokenizer "
                        "instead of --model's weights (small-embeddings: 12 × 768, 4k vocabulary; llama2-7b; "
                        "random: --model's own config)")
    parser.add_argument("--shape-dir", type=Path, help="folder for the --shape model: built there once, reused")
    parser.add_argument("--scratch", help="folder for the runs' output (removed after each run; default: the "
                        "system's temporary folder)")
    parser.add_argument("--data", default="gsm8k")
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

    with tempfile.TemporaryDirectory(prefix="shape_") as temporary:
        model, share = args.model, None
        if args.shape:
            model = str(args.shape_dir or temporary)
            share = make_shape(args.shape, args.model, args.data, Path(model))
        report(measure(args, model, share))


def measure(args: argparse.Namespace, model: str, share: float | None) -> dict[str, list[dict]]:
    """Run every configuration `args.repeats` times, interleaved, each in a fresh process."""
    print(f"model: {args.model if args.shape in (None, 'random') else args.shape}"
          + (" (random init)" if args.shape else "")
          + (f" (outside the blocks: {share:.1%} of the parameters)" if share else "")
          + f"; data {args.data}; batch {args.batch_size} × ≤{args.max_length} tokens; {args.steps} steps "
          "(median step time over all; LISA switches and IST updates its scores every 2 steps); "
          f"{args.repeats} repeats, each configuration in a fresh process; "
          + ("gradient checkpointing; " if args.gradient_checkpointing else "") +
          f"device {_device()}, {os.cpu_count()} cores", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in args.configs}
    for repeat in range(args.repeats):
        for label in args.configs:
            options = {**CONFIGS[label], **({"gradient_checkpointing": True} if args.gradient_checkpointing else {})}
            spec = {"model": model, "data": args.data, "options": options, "steps": args.steps,
                    "batch_size": args.batch_size, "max_length": args.max_length, "interval": 2,
                    "scratch": args.scratch}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{label}: the run failed:\n{done.stderr[-2000:]}")
            result = json.loads(line[7:])
            results[label].append(result)
            print(f"  repeat {repeat + 1} {label}: " + (f"out of GPU memory (at {result['peak_mb']:.0f} MiB)"
                  if result.get("oom") else f"{result['peak_mb']:.0f} MiB peak, {result['step_ms']:.0f} ms/step"),
                  flush=True)
    return results


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def report(results: dict[str, list[dict]]) -> None:
    fitted = {label: rs for label, rs in results.items() if not any(r.get("oom") for r in rs)}

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in fitted[label]) if label in fitted else float("nan")

    def grown(label: str) -> float:  # the training's own memory: peak − memory held at the start of training
        return statistics.median(r["peak_mb"] - r["start_mb"] for r in fitted[label]) if label in fitted \
            else float("nan")

    print(f"\n{'configuration':<17} {'trainable':>12} {'peak MiB':>9} {'× full':>7} {'× LoRA':>7} {'+MiB*':>7} "
          f"{'× full*':>8} {'× LoRA*':>8} {'ms/step':>8} {'× full':>7}")
    for label in results:
        if label not in fitted:
            at = max(r["peak_mb"] for r in results[label] if r.get("oom"))
            print(f"{label:<17} out of GPU memory (at {at:.0f} MiB)")
            continue
        peak, step = med(label, "peak_mb"), med(label, "step_ms")
        print(f"{label:<17} {int(med(label, 'trainable')):>12,} {peak:>9.0f} {peak / med('full', 'peak_mb'):>7.2f} "
              f"{peak / med('LoRA', 'peak_mb'):>7.2f} {grown(label):>7.0f} {grown(label) / grown('full'):>8.2f} "
              f"{grown(label) / grown('LoRA'):>8.2f} {step:>8.0f} {step / med('full', 'step_ms'):>7.2f}")
    if not fitted:
        return
    start = statistics.median(r["start_mb"] for rs in fitted.values() for r in rs)
    runtime = statistics.median(r["runtime_mb"] for rs in fitted.values() for r in rs)
    held = (f"runtime {runtime:.0f} MiB after the imports, then the model and the data" if runtime else
            "the model's weights on the GPU")
    print(f"* the training's own memory: peak − memory when training starts (median {start:.0f} MiB: {held})")
    for label, rs in fitted.items():
        switches = [s for r in rs for s in r["schedule"]]
        if switches:
            ratios = [s["optimizer_state_bytes"] / (2 * s["active_param_bytes"]) for s in switches]
            print(f"{label}: AdamW state after each of {len(switches)} switches / 2 × active parameter bytes: "
                  f"{min(ratios):.4f}–{max(ratios):.4f}")


if __name__ == "__main__":
    main()
