"""Evaluation of a base model, an adapter or a trained run (see docs/evaluation.md).

* `heldout_loss`: token-weighted cross-entropy and perplexity on response tokens of held-out data;
* `multiple_choice`: accuracy through lm-evaluation-harness on the embedded benchmarks (`MC_BENCHMARKS`:
  `truthfulqa` MC1, `harmless` hh-rlhf preference accuracy, `bbh` BIG-Bench-Hard with listed options), on
  `bigbench:` tasks read from an archive `$ILA_BIGBENCH` points to, local files and lm-eval registry tasks;
* `exact_match`: greedy generation scored against reference answers (`EXACT_BENCHMARKS`: `gsm8k` final number,
  `bbh` tasks without listed options; `bigbench:` tasks, local files);
* `judge`: optional MT-Bench/Vicuna-style 1-10 grading by an OpenAI-compatible endpoint.

The embedded benchmarks ship with ila (`ila.data.embedded`) and are turned into lm-eval docs and exact-match
items by `ila.evaluation.benchmarks`; nothing there touches the network. Importing this package is cheap: torch,
transformers, datasets and lm-eval are imported inside the functions.
"""

from ila.evaluation.benchmarks import EXACT_BENCHMARKS, MC_BENCHMARKS
from ila.evaluation.exact_match import exact_match, exact_match_items, generate, normalise_answer
from ila.evaluation.heldout import heldout_loss
from ila.evaluation.judge import DEFAULT_PROMPT_FILE, generate_answers, judge, load_judge_prompt, parse_rating
from ila.evaluation.multiple_choice import mc_docs, multiple_choice

__all__ = [
    "DEFAULT_PROMPT_FILE",
    "EXACT_BENCHMARKS",
    "MC_BENCHMARKS",
    "exact_match",
    "exact_match_items",
    "generate",
    "generate_answers",
    "heldout_loss",
    "judge",
    "load_judge_prompt",
    "mc_docs",
    "multiple_choice",
    "normalise_answer",
    "parse_rating",
]
