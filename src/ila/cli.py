"""`ila` command line: argument parsing only; every subcommand calls one API function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ila.api import EVAL_OPTIONS
from ila.config import DATA_HELP, MODEL_HELP, AnalyzeConfig
from ila.errors import IlaError
from ila.options import add_flags

EPILOG = "Docs: README.md and docs/. Add --debug to any command for a full traceback."


def _add_model_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--data", help=DATA_HELP)


def _add_identify_options(p: argparse.ArgumentParser) -> None:
    """Flags from the config declarations: shared fields, stage 1, and each registered method's options."""
    from ila.config import IdentifyConfig
    from ila.importance.base import methods
    from ila.options import add_flags

    p.add_argument("--config", type=Path, help="YAML config (see configs/); command-line options override it")
    add_flags(p, IdentifyConfig)
    for name, method in sorted(methods().items()):
        if method.options is not None:
            group = p.add_argument_group(f"options of method {name} (YAML section '{name}:')")
            add_flags(group, method.options, f"{name}.")


def _add_strategy_options(p: argparse.ArgumentParser) -> None:
    """Flags of each registered strategy's options, from their declarations."""
    from ila.options import add_flags
    from ila.training.strategies.base import strategies

    for name, strategy in sorted(strategies().items()):
        if strategy.options is not None:
            add_flags(p.add_argument_group(f"options of strategy {name} (YAML section '{name}:')"),
                      strategy.options, f"{name}.")


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error format: one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ila: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks and library logs")
    parser = _Parser(prog="ila", description="Identify the layers that matter for a fine-tune.", epilog=EPILOG,
                     parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[debug], **k)  # --debug also after the subcommand

    p = sub.add_parser("identify", help="rank the linear layers of a model for a dataset (ILA and other methods)",
                       description="Scores every linear layer with an importance method (--method, default ila: "
                       "stage 1 trains LoRA or full fine-tuning until the loss is ε-stable, stage 2 learns one "
                       "gate per layer until it settles). Writes ranking.json, heatmap.png and, for methods that "
                       "use one, the stage-1 update to --out. --method all runs every method on one shared "
                       "stage-1 update into --out/<method>/ and compares them.", epilog=EPILOG)
    p.add_argument("--out", type=Path, help="run folder to write (required)")
    p.add_argument("--list-methods", action="store_true", help="list the importance methods and exit")
    p.add_argument("--resume", action="store_true", help="resume stage 1 from the last checkpoint in --out")
    _add_identify_options(p)

    p = sub.add_parser("train", help="fine-tune under a training strategy (selection, LISA, IST, Mid-Block)",
                       description="Fine-tune --model on --data with --method (LoRA, QLoRA, full, AdaLoRA). The "
                       "strategy decides which layers train when: selection (default) trains the linear layers "
                       "--select chooses, lisa samples blocks, ist updates blocks by learned importance, midblock "
                       "adapts segments of blocks. Writes the adapter or full weights, selection.json and run.json "
                       "(cost, held-out loss) to --out. See docs/training.md and docs/strategies.md.",
                       epilog=EPILOG)
    p.add_argument("--out", type=Path, help="run folder to write (required)")
    p.add_argument("--list-strategies", action="store_true", help="list the training strategies and exit")
    p.add_argument("--strategy", help="selection (default) | lisa | ist | midblock (see --list-strategies)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in the backward pass (less memory, more time)")
    _add_model_data_options(p)
    p.add_argument("--config", type=Path, help="YAML config (keys of ila.config.TrainConfig); options override it")
    p.add_argument("--method", help="lora (default) | qlora | full | adalora")
    p.add_argument("--select", help="all | freeze-bottom:F | top:F | random:F | first:F | last:F | names:REGEX | "
                   "intersect:F (see docs/training.md)")
    p.add_argument("--ranking", dest="rankings", action="append", default=[], type=str,
                   help="ranking.json for the selection (repeat for intersect)")
    p.add_argument("--transfer", action="store_true", default=None,
                   help="map rankings from another architecture by relative depth and role")
    p.add_argument("--seed", type=int, help="seed of data order, initialisation and dropout (and of random:F "
                   "unless --select-seed)")
    p.add_argument("--select-seed", type=int, help="seed of the random:F draw (RL 1 / RL 2 at one training seed)")
    p.add_argument("--data-seed", type=int, help="seed of the example sample and the train/held-out split "
                   "(default --seed); fix it to compare training seeds on one held-out set")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--learning-rate", type=float, help="default 2e-4 for adapters, 1e-5 for full fine-tuning")
    p.add_argument("--batch-size", type=int, help="per-device batch size")
    p.add_argument("--train-other", action=argparse.BooleanOptionalAction,
                   help="full only: also train embeddings, norms and the LM head (default: yes, except with "
                   "--select top:F or names:REGEX, which train only the layers they name)")
    p.add_argument("--max-examples", type=int, help="cap on the examples read from --data")
    p.add_argument("--max-length", type=int, help="truncate examples to this many tokens")
    p.add_argument("--report-to", help="any TrainingArguments.report_to value: tensorboard (event files in "
                   "DIR/logs/), wandb, ... (default none)")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 50); 0: no checkpoints")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    _add_strategy_options(p)

    p = sub.add_parser("analyze", help="what fine-tuning changed, layer by layer: base vs tuned (seeds/004)",
                       description="Runs both models over --data once (streaming) and writes per-layer metrics "
                       "(entropies, effective rank, sparsity, curvature, CKA, cosine, mean shift, logit lens), the "
                       "weight change per block and layer swapping to --out: metrics.csv/.json and plots; with "
                       "--ranking, correlation.csv. See docs/analysis.md.", epilog=EPILOG)
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--config", type=Path, help="YAML config (keys of ila.config.AnalyzeConfig); options override it")
    add_flags(p, AnalyzeConfig)

    p = sub.add_parser("eval", help="score a base model, an adapter or a run: held-out loss, MC, exact match",
                       description="Held-out loss/perplexity on instruction data (a run's own held-out split by "
                       "default), multiple-choice accuracy through lm-eval, generative exact match, and an optional "
                       "judge. See docs/evaluation.md.", epilog=EPILOG)
    p.add_argument("--model", help="as for identify (default smollm2-135m; with --run, the run's model)")
    p.add_argument("--adapter", help="PEFT adapter folder to apply to --model")
    p.add_argument("--run", help="finished ila train / identify folder: its model, adapter and held-out split")
    p.add_argument("--data", help="instruction data to score held-out loss on (instead of a run's split)")
    p.add_argument("--max-examples", type=int, help="cap on the examples read from --data")
    p.add_argument("--max-length", type=int, help="truncate --data examples to this many tokens (default 512)")
    p.add_argument("--mc", nargs="+", help="multiple-choice tasks: embedded truthfulqa, harmless, bbh or "
                   "bbh:TASK[,TASK...]; bigbench:TASK (with ILA_BIGBENCH), an lm-eval task name, or a local file")
    p.add_argument("--exact", nargs="+", help="generative exact-match specs: embedded gsm8k, bbh or "
                   "bbh:TASK[,TASK...]; bigbench:TASK (with ILA_BIGBENCH) or a data file")
    p.add_argument("--limit", type=int, help="examples per MC / exact-match task (default 50)")
    p.add_argument("--seed", type=int, help="seed for sampling examples (default 0)")
    p.add_argument("--judge-endpoint", help="OpenAI-compatible base URL for judge grading (off by default)")
    p.add_argument("--judge-model", help="model name at the judge endpoint")
    p.add_argument("--questions", help="JSON/JSONL questions for the judge")
    p.add_argument("--out", help="write the results JSON here")

    p = sub.add_parser("experiment", help="run a YAML grid of fine-tunes and write a paper-style table",
                       description="Runs every cell (models x data x methods x selections x seeds) of the grid "
                       "that has no run.json yet, then writes OUT/<name>.md and .csv with mean ± std over seeds. "
                       "See configs/ and docs/training.md.", epilog=EPILOG)
    p.add_argument("config", type=Path, help="experiment YAML (see configs/table8_smollm2.yaml)")
    p.add_argument("--out", type=Path, required=True, help="folder for the cells and the table")

    p = sub.add_parser("compare", help="Jaccard of the top fraction and Spearman correlation between rankings",
                       description="Labels each ranking by method · data · seed and prints the Jaccard@top and "
                       "Spearman matrices (two rankings: the two numbers).", epilog=EPILOG)
    p.add_argument("rankings", nargs="+", type=Path, help="two or more ranking.json files")
    p.add_argument("--top", type=float, default=0.75, help="fraction of layers in each top set (default 0.75)")
    p.add_argument("--out", type=Path, help="folder to write the matrices to: jaccard.csv, spearman.csv, an "
                   "annotated heatmap agreement.png, comparison.json")
    p.add_argument("--level", choices=["layer", "block"], default="layer", help="compare layer orders (default) "
                   "or block orders: each block scores the mean rank of its layers")

    p = sub.add_parser("export", help="write a ranking's selected layers as a PEFT, axolotl, LLaMA-Factory or "
                       "Spectrum config", description="The layers --select picks from RANKING, as the config "
                       "another tool trains exactly them with (see docs/export.md).", epilog=EPILOG)
    p.add_argument("ranking", type=Path, help="ranking.json")
    p.add_argument("--select", default="top:0.3", help="which layers (as for `ila train`; default top:0.3)")
    p.add_argument("--format", required=True, help="peft, axolotl, llama-factory or spectrum")
    p.add_argument("--out", type=Path, help="file to write, or a folder for the format's usual file name")
    p.add_argument("--seed", type=int, default=0, help="seed of a random:F selection (default 0)")
    p.add_argument("--r", type=int, help="LoRA rank (peft, axolotl, llama-factory)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (the update is scaled by alpha / r)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout probability")

    p = sub.add_parser("report", help="one self-contained HTML page of runs and rankings",
                       description="Heatmaps, top/bottom layers, agreement across the rankings, stage-1/2 curves, "
                       "cost, train selections and analysis plots of the given run folders and ranking.json "
                       "files, in one offline HTML file (see docs/report.md).", epilog=EPILOG)
    p.add_argument("paths", nargs="+", type=Path, help="run folders (identify, train, analyze) or ranking.json files")
    p.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    p.add_argument("--title", help="page title (default: ila report)")

    sub.add_parser("datasets", help="list the data sets that ship inside ila (rows, licence, purpose)",
                   description="The embedded sets: SFT data for --data NAME (train split) and the benchmarks of "
                   "ila eval. Each card (origin, sha256, split) is in docs/data.md.", epilog=EPILOG)

    p = sub.add_parser("demo", help="rank smollm2-135m on three embedded SFT sets (gsm8k, roleplay, harmless) "
                       "and compare the rankings", epilog=EPILOG)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the runs (default runs/demo)")
    p.add_argument("--max-steps", type=int, help="stage-1 step cap of each run")
    p.add_argument("--stage2-steps", type=int, help="stage-2 steps of each run")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    debug = getattr(args, "debug", False)
    _configure_logging(debug)
    try:
        return _run(args)
    except IlaError as exc:
        if debug:
            raise
        sys.stderr.write(f"ila: error: {exc}\n")  # one write: lines of several processes do not interleave
        sys.stderr.flush()
        from ila.distributed import wait_to_stop

        wait_to_stop()  # in a multi-process launch, every process reports before torchrun stops them
        return 2
    except KeyboardInterrupt:
        print("ila: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    import ila
    from ila.distributed import is_main_process

    if args.command == "identify":
        if args.list_methods:
            print(ila.list_methods())
            return 0
        if args.out is None:
            raise IlaError("identify: --out is required (the run folder to write)")
        options = {name: getattr(args, name) for name in ila.identify_options() if getattr(args, name) is not None}
        result = ila.identify(args.out, config=args.config, resume=args.resume, **options)
        if not is_main_process():  # a multi-process launch: the main process reports
            return 0
        if isinstance(result, dict):  # --method all
            for ranking in result.values():
                print(identify_summary(ranking).split("\n")[0])
            print()
            print(ila.format_comparison(ila.compare(list(result.values()), labels=list(result))))
            print(f"wrote {args.out}/<method>/ranking.json for {len(result)} methods and their comparison: "
                  f"{args.out / 'agreement.png'}, jaccard.csv, spearman.csv")
            return 0
        print(identify_summary(result))
        print(f"wrote {args.out / 'ranking.json'} and {args.out / 'heatmap.png'}")
        return 0
    if args.command == "train":
        if args.list_strategies:
            print(ila.list_strategies())
            return 0
        if args.out is None:
            raise IlaError("train: --out is required (the run folder to write)")
        run = ila.train(args.out, config=args.config, resume=args.resume,
                        **{name: getattr(args, name) for name in ila.train_options()})
        if not is_main_process():
            return 0
        c = run.cost
        print(f"trained {c['trained_layers']} linear layers ({c['trained_layer_fraction']:.0%}), "
              f"{c['trainable_params']:,} trainable parameters, {c['steps']} steps, median {c['median_step_ms']:.0f} "
              f"ms/step, {c['tokens_per_s']:.0f} tokens/s, peak memory {c['peak_memory_mb']:.0f} MiB"
              + (f", held-out loss {run.heldout_loss:.4f}" if run.heldout_loss is not None else ""))
        print(f"wrote {args.out / 'run.json'}")
        return 0
    if args.command == "analyze":
        rows = ila.analyze(args.out, config=args.config,
                           **{name: getattr(args, name) for name in ila.analyze_options()})
        if not is_main_process():
            return 0
        print(analyze_summary(rows))
        print(f"wrote {args.out / 'metrics.csv'}, metrics.json and plots" +
              (f", {args.out / 'correlation.csv'}" if (args.out / "correlation.csv").exists() else ""))
        return 0
    if args.command == "eval":
        results = ila.evaluate(**{name: getattr(args, name) for name in EVAL_OPTIONS})
        print(format_eval(results))
        if args.out:
            print(f"wrote {args.out}")
        return 0
    if args.command == "experiment":
        table = ila.experiment(args.config, args.out)
        print(table.read_text())
        print(f"wrote {table} and {table.with_suffix('.csv')}")
        return 0
    if args.command == "compare":
        comparison = ila.compare(args.rankings, top=args.top, level=args.level)
        print(ila.format_comparison(comparison))
        if args.out is not None:
            ila.write_comparison(comparison, args.out)
            print(f"wrote {args.out / 'jaccard.csv'}, {args.out / 'spearman.csv'}, {args.out / 'agreement.png'} "
                  f"and {args.out / 'comparison.json'}")
        return 0
    if args.command == "export":
        written = ila.export(args.ranking, args.select, args.format, args.out, seed=args.seed, r=args.r,
                             lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
        print(f"wrote {written}")
        return 0
    if args.command == "report":
        print(f"wrote {ila.write_report(args.paths, args.out, title=args.title)}")
        return 0
    if args.command == "datasets":
        print(format_datasets(ila.list_datasets()))
        return 0
    if args.command == "demo":
        from ila.demo import run_demo

        run_demo(args.out, max_steps=args.max_steps, stage2_steps=args.stage2_steps, seed=args.seed)
        return 0
    raise AssertionError(args.command)


def identify_summary(ranking) -> str:
    """What an identify run did, in one or two lines: method, layers, stage-1 stop, stage-2 stop, near-ties."""
    meta = ranking.metadata
    line = f"{meta['method']}: ranked {len(ranking.entries)} linear layers of {meta['model']}"
    if "stage1_steps" in meta:
        stable = meta.get("stability_step")
        line += (f"; stage 1: {meta['stage1_steps']} steps, " +
                 (f"ε-stable at step {stable}" if stable else "step cap before ε-stability")
                 if meta["stage1_steps"] else "; stage 1: the given adapter")
    if "stage2_steps" in meta:
        settled = meta.get("stage2_settled_step")
        line += f"; stage 2: {meta['stage2_steps']} steps, " + (
            f"settled at step {settled}" if settled else "step cap reached before it settled")
    return line + f"\n{meta.get('near_ties', 0)} scores lie near the top-75 % cut (near-ties)"


def analyze_summary(rows: list[dict]) -> str:
    """Per-layer CKA and cosine between the models, and where the weights moved most."""
    def series(metric: str) -> list[dict]:
        return sorted((r for r in rows if r["metric"] == metric), key=lambda r: r["layer"])

    cka, cosine, change = series("cka"), series("cosine"), series("weight_change_all")
    lines = ["layer  " + " ".join(f"{r['layer']:>5}" for r in cka),
             "cka    " + " ".join(f"{r['value']:5.3f}" for r in cka),
             "cosine " + " ".join(f"{r['value']:5.3f}" for r in cosine)]
    if change:
        top = max(change, key=lambda r: r["value"])
        lines.append(f"largest weight change: block {top['layer'] - 1} (‖ΔW‖_F = {top['value']:.4g})")
    return "\n".join(lines)


def format_eval(results: dict) -> str:
    """One line per metric."""
    lines = [f"source: {results['source']}"]
    if "heldout" in results:
        h = results["heldout"]
        lines.append(f"held-out loss {h['loss']:.4f}, perplexity {h['perplexity']:.3f} ({h['tokens']} response tokens)")
    for task, r in results.get("multiple_choice", {}).items():
        lines.append(f"{task}: accuracy {r['accuracy']:.3f}, acc_norm {r['acc_norm']:.3f} (n={r['n']})")
    for spec, r in results.get("exact_match", {}).items():
        lines.append(f"{spec}: exact match {r['exact_match']:.3f}, extracted match {r['extracted_match']:.3f} "
                     f"(n={r['n']})")
    if "judge" in results:
        j = results["judge"]
        lines.append(f"judge: mean score {j['mean_score']} over {j['rated']} rated of {j['n']}")
    return "\n".join(lines)


def format_datasets(table: list[dict]) -> str:
    """One block per embedded set: name, kind, rows, licence; then its purpose and hub name."""
    lines = []
    for row in table:
        rows = ", ".join(f"{k} {v}" for k, v in row["rows"].items())
        kind = "SFT data (--data)" if row["kind"] == "sft" else "benchmark (ila eval)"
        lines += [f"{row['name']:<11} {kind:<21} {rows:<24} {row['licence']}",
                  f"{'':<11} {row['purpose']}", f"{'':<11} online: {row['hub']}"]
    return "\n".join(lines)


def _configure_logging(debug: bool) -> None:
    from ila.distributed import is_main_process

    quiet = not (debug or is_main_process())  # other processes of a launch: errors only, the main one reports
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR if quiet else logging.INFO,
                        format="%(message)s")
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        noisy_libraries = ("transformers", "peft", "accelerate", "datasets", "bitsandbytes", "lm_eval", "httpx",
                           "urllib3", "filelock")
        for noisy in noisy_libraries:
            logging.getLogger(noisy).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
