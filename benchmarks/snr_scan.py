"""Spectrum-style weight SNR (`ila identify --method snr`): seconds and peak memory, side by side with the same
scan over the whole model loaded in memory (what Spectrum's own script does).

Each measurement runs in a child process of its own, so its peak RSS (the kernel's VmHWM) is its own; the
child also reports its RSS after importing torch and transformers (the floor every run pays). "streamed" is
the product's scan: weights read one tensor at a time from the safetensors files, layers found on a
meta-device model. "loaded" loads the model (fp32) and scans its modules.

    python benchmarks/snr_scan.py                              # smollm2-135m and gemma3-270m, 2 repeats each
    python benchmarks/snr_scan.py --shape llama2-7b --blocks 2 # random-init Llama-2-7B shape, bf16 safetensors

With --shape, the benchmark writes the full random-init checkpoint (all blocks, every tensor; ~13.5 GB for
Llama-2-7B) and scans the linear layers of its first --blocks blocks through the same functions as the method
(`WeightFiles`, `empty_model`, `weight_snr`): the peak memory of a scan is set by its largest weight, which
every block has, while the time grows with the number of layers (the full-scan time printed is extrapolated
per layer and says so). The loaded scan is not run there: the model alone needs more memory than the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # random-init shapes: the scan's cost does not depend on the weight values
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}
GIB = 2 ** 30


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(mode: str, model: str, blocks: int | None) -> dict:
    """One measurement in this (fresh) process; returns seconds, peak RSS and the RSS after imports."""
    import torch  # noqa: F401 - the import floor is part of the baseline
    import transformers  # noqa: F401

    from ila.training.cost import reset_peak_rss

    floor = rss("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    if mode == "streamed" and blocks is None:
        from ila.cli import main

        out = Path(tempfile.mkdtemp(prefix="snr_bench_"))
        try:
            code = main(["identify", "--method", "snr", "--model", model, "--out", str(out / "run")])
            if code != 0:
                raise SystemExit(code)
            layers = len(json.loads((out / "run" / "ranking.json").read_text())["layers"])
        finally:
            shutil.rmtree(out, ignore_errors=True)
    elif mode == "streamed":  # the method's functions, on the layers of the first `blocks` blocks
        from ila.importance.snr import weight_snr
        from ila.layers import discover_layers
        from ila.models import empty_model, model_folder
        from ila.weights import WeightFiles

        weights = WeightFiles(model_folder(model))
        chosen = [x for x in discover_layers(empty_model(weights.folder)) if x.block < blocks]
        for layer in chosen:
            weight_snr(weights.weight(layer.name))
        layers = len(chosen)
    else:
        from ila.importance.snr import weight_snr
        from ila.layers import base_model_of, discover_layers
        from ila.models import load_model

        loaded = load_model(model)[0]
        chosen = discover_layers(loaded)
        for layer in chosen:
            weight_snr(base_model_of(loaded).get_submodule(layer.name).weight.detach())
        layers = len(chosen)
    return {"seconds": time.perf_counter() - started, "peak": rss("VmHWM"), "floor": floor, "layers": layers}


def measure(mode: str, model: str, blocks: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", model]
    if blocks is not None:
        cmd += ["--blocks", str(blocks)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} scan of {model} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_shape(name: str, folder: Path) -> None:
    """A random-init checkpoint of SHAPES[name] in bf16 safetensors, one shard per block (never all in memory)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(**SHAPES[name], torch_dtype="bfloat16")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for key, p in model.state_dict().items():
        part = key.split(".")
        group = f"block{int(part[2]):03d}" if part[1:2] == ["layers"] else "other"
        groups.setdefault(group, []).append((key, p.shape))
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for i, (_group, items) in enumerate(sorted(groups.items())):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for k, shape in items}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    config.save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def folder_bytes(model: str) -> int:
    from ila.models import model_folder

    return sum(f.stat().st_size for f in model_folder(model).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="scan a random-init checkpoint of this shape")
    parser.add_argument("--blocks", type=int, help="with --shape: scan the first N blocks' layers (default 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="with --shape: write the checkpoint here and keep it")
    parser.add_argument("--child", choices=["streamed", "loaded"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.blocks)))
        return

    import torch

    print(f"setup: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.repeats} repeats, each measurement a fresh process")
    if args.shape:
        blocks = args.blocks or 2
        folder = args.keep or Path(tempfile.mkdtemp(prefix=f"{args.shape}_"))
        try:
            if not (folder / "model.safetensors.index.json").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                t = time.perf_counter()
                write_shape(args.shape, folder)
                print(f"wrote {args.shape} random-init bf16 checkpoint to {folder} in {time.perf_counter() - t:.0f} s")
            size = folder_bytes(str(folder))
            total_layers = 7 * SHAPES[args.shape]["num_hidden_layers"]
            runs = [measure("streamed", str(folder), blocks) for _ in range(args.repeats)]
            for k, r in enumerate(runs):
                per_layer = r["seconds"] / r["layers"]
                print(f"[{args.shape}] repeat {k + 1}: streamed scan of {r['layers']} layers ({blocks} blocks) "
                      f"{r['seconds']:.1f} s ({per_layer:.2f} s/layer; all {total_layers} layers extrapolated: "
                      f"{per_layer * total_layers / 60:.0f} min), peak RSS {r['peak'] / GIB:.2f} GiB "
                      f"(after imports {r['floor'] / GIB:.2f} GiB)")
            peak = statistics.median(r["peak"] for r in runs)
            print(f"[{args.shape}] checkpoint {size / GIB:.1f} GiB on disk (bf16), {2 * size / GIB:.1f} GiB as fp32 "
                  f"in memory; median peak RSS of the scan / checkpoint size = {peak / size:.3f}")
        finally:
            if args.keep is None:
                shutil.rmtree(folder, ignore_errors=True)
        return
    for model in args.models:
        size = folder_bytes(model)
        for k in range(args.repeats):
            streamed, loaded = measure("streamed", model, None), measure("loaded", model, None)
            above = (streamed["peak"] - streamed["floor"]) / (loaded["peak"] - loaded["floor"])
            print(f"[{model}] repeat {k + 1}: streamed {streamed['seconds']:.1f} s, peak RSS "
                  f"{streamed['peak'] / GIB:.2f} GiB | loaded {loaded['seconds']:.1f} s, peak RSS "
                  f"{loaded['peak'] / GIB:.2f} GiB | ratios streamed/loaded: time "
                  f"{streamed['seconds'] / loaded['seconds']:.2f}, peak {streamed['peak'] / loaded['peak']:.2f}, "
                  f"peak above imports {above:.2f}"
                  f" ({streamed['layers']} layers; fp32 checkpoint {size / GIB:.2f} GiB)")


if __name__ == "__main__":
    main()
