"""Cost of `ila analyze` as a multiple of one forward pass of both models over the same data.

Measured side by side in one process, repeated (order rotated): (a) the forward passes alone (both models,
`output_hidden_states=True`, every batch), (b) the representation metrics (`ila.analysis.stream.Stream` without
the probe: the same passes plus every sample- and dataset-level metric), (c) the same with the logit lens, and
(d) layer swapping (2 × segments held-out passes). Target (issue 9): (b)/(a) ≤ 1.5; probe and swap reported apart.

Memory: the peak RSS increase during (b) over the RSS before it (models loaded), beside that of (a), against the
stated bound: one batch's hidden states of both models (2 · (L+1) · batch · tokens · width · 4 bytes) plus the
pooled vectors (2 · (L+1) · examples · width · 8 bytes), plus the forward pass's own transient buffers.

    python benchmarks/analysis_cost.py                                  # smollm2-135m vs itself, gsm8k
    python benchmarks/analysis_cost.py --tuned runs/tuned --max-examples 256
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--tuned", default=None, help="default: the base model itself (the cost does not depend on "
                        "the weights' values)")
    parser.add_argument("--data", default="gsm8k")
    parser.add_argument("--max-examples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from ila.analysis.job import load_pair
    from ila.analysis.stream import Stream
    from ila.analysis.weights import swap_rows
    from ila.config import AnalyzeConfig
    from ila.data import build_dataset, collate, load_examples
    from ila.evaluation.heldout import heldout_loss
    from ila.layers import find_blocks
    from ila.training.cost import peak_rss_bytes, reset_peak_rss

    config = AnalyzeConfig(base=args.base, tuned=args.tuned or args.base, data=args.data,
                           max_examples=args.max_examples, max_length=args.max_length, batch_size=args.batch_size)
    base, tuned, tokenizer, _ = load_pair(config)
    dataset = build_dataset(load_examples(args.data, max_examples=args.max_examples), tokenizer,
                            max_length=args.max_length)
    collator = collate(tokenizer)
    batches = [collator([dataset[i] for i in range(s, min(s + args.batch_size, len(dataset)))])
               for s in range(0, len(dataset), args.batch_size)]
    n_layers = len(find_blocks(base)[1]) + 1
    models = {"base": base, "tuned": tuned}
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    width = base.config.get_text_config().hidden_size
    longest = max(b["input_ids"].shape[1] for b in batches)
    print(f"base {args.base}, tuned {args.tuned or args.base}; {len(dataset)} examples ({tokens} tokens, batches of "
          f"{args.batch_size}, ≤{args.max_length} tokens); {n_layers} hidden states of width {width}; "
          f"{torch.get_num_threads()} threads; {args.repeats} repeats, order rotated")

    def forward_only() -> None:
        with torch.no_grad():
            for b in batches:
                for m in models.values():
                    m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                      use_cache=False)

    def stream(probe: bool) -> None:
        s = Stream(n_layers, alpha=1.0, threshold=0.01, probe=probe)
        for b in batches:
            s.add(models, b)
        s.rows()

    def swap() -> None:
        swap_rows(base, tuned, args.segments,
                  lambda m: heldout_loss(m, dataset, collator, batch_size=args.batch_size)["perplexity"])

    jobs = {"forward": forward_only, "representations": lambda: stream(False),
            "representations + probe": lambda: stream(True), "swap": swap}
    seconds: dict[str, list[float]] = {k: [] for k in jobs}
    names = list(jobs)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            t0 = time.perf_counter()
            jobs[name]()
            seconds[name].append(time.perf_counter() - t0)
    forward = statistics.median(seconds["forward"])
    print(f"\n{'job':<26} {'median s':>9} {'× forward':>10}")
    for name in names:
        t = statistics.median(seconds[name])
        print(f"{name:<26} {t:>9.2f} {t / forward:>10.2f}")
    probe_only = statistics.median(seconds["representations + probe"]) - statistics.median(seconds["representations"])
    print(f"{'probe alone (difference)':<26} {probe_only:>9.2f} {probe_only / forward:>10.2f}")

    import psutil

    def peak_increase(job) -> float:
        before = psutil.Process().memory_info().rss
        reset_peak_rss()
        job()
        return (peak_rss_bytes() - before) / 2**20

    plain = peak_increase(forward_only)
    representations = peak_increase(lambda: stream(False))
    hidden = 2 * n_layers * args.batch_size * longest * width * 4
    pooled = 2 * n_layers * len(dataset) * width * 8
    print(f"\npeak RSS increase: representation pass {representations:.0f} MiB; plain forward passes of both models "
          f"(hidden states and full logits) {plain:.0f} MiB. Stated bound: hidden states {hidden / 2**20:.0f} MiB "
          f"+ pooled vectors {pooled / 2**20:.0f} MiB = {(hidden + pooled) / 2**20:.0f} MiB, plus the forward "
          "pass's transient buffers")


if __name__ == "__main__":
    main()
