"""Evaluation of a base model, an adapter or a trained run (see docs/evaluation.md).

* `heldout_loss`: token-weighted cross-entropy and perplexity on response tokens of held-out data;
* `multiple_choice`: accuracy through lm-evaluation-harness (BIG-bench `hhh_alignment`, `truthful_qa`, any
  BIG-bench task with `target_scores`, local files, lm-eval registry tasks);
* `exact_match`: greedy generation scored against reference answers (BIG-bench `arithmetic`, ...);
* `judge`: optional MT-Bench/Vicuna-style 1-10 grading by an OpenAI-compatible endpoint.

Importing this package is cheap: torch, transformers and lm-eval are imported inside the functions.
"""

from ila.evaluation.exact_match import exact_match, exact_match_items, generate, normalise_answer
from ila.evaluation.heldout import heldout_loss
from ila.evaluation.judge import DEFAULT_PROMPT_FILE, generate_answers, judge, load_judge_prompt, parse_rating
from ila.evaluation.multiple_choice import READY_TASKS, mc_docs, multiple_choice

__all__ = [
    "DEFAULT_PROMPT_FILE",
    "READY_TASKS",
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
