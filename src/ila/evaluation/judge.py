"""LLM-as-a-judge (off by default): MT-Bench / Vicuna single-answer grading, 1-10, through any endpoint that
speaks the OpenAI `/chat/completions` API. Uses only the standard library (urllib).

The prompt lives in `prompts/judge_single.json` (FastChat's `single-v1`); pass `prompt_file` to use another.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ila.errors import IlaError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_PROMPT_FILE = Path(__file__).parent / "prompts" / "judge_single.json"
"""FastChat's MT-Bench `single-v1` judge prompt (system prompt, template, 1-10 scale)."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
"""System prompt used with a plain-text prompt file (the one `single-v1` uses)."""

RATING_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
"""FastChat's verdict patterns: `[[N]]` first, else `[N]`."""

_PLACEHOLDER = re.compile(r"\{(question|answer)\}")
_RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class JudgePrompt:
    """A single-answer grading prompt: `{question}` and `{answer}` in `template` are filled in."""

    name: str
    system_prompt: str
    template: str
    rating_range: tuple[float, float] = (1.0, 10.0)

    def render(self, question: str, answer: str) -> str:
        """The user message: the template with `{question}` and `{answer}` replaced (other braces kept)."""
        values = {"question": question, "answer": answer}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)


def load_judge_prompt(path: str | os.PathLike[str] | None = None) -> JudgePrompt:
    """Read a judge prompt file (default `DEFAULT_PROMPT_FILE`).

    A `.json` file holds `prompt_template` and optionally `system_prompt`, `name`, `rating_range` ([lo, hi]);
    any other file is the template itself (system prompt `DEFAULT_SYSTEM_PROMPT`, range 1-10). The template
    must contain `{question}` and `{answer}`.
    """
    file = Path(path).expanduser() if path is not None else DEFAULT_PROMPT_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IlaError(f"{file}: cannot read the judge prompt file ({e})") from None
    name, system, rating_range = file.stem, DEFAULT_SYSTEM_PROMPT, (1.0, 10.0)
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IlaError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt_template"), str):
            raise IlaError(f"{file}: field 'prompt_template' missing or not a string")
        template = data["prompt_template"]
        system = data.get("system_prompt", system)
        if not isinstance(system, str):
            raise IlaError(f"{file}: field 'system_prompt' is {type(system).__name__}, expected a string")
        name = str(data.get("name", name))
        if "rating_range" in data:
            rr = data["rating_range"]
            if not (isinstance(rr, list) and len(rr) == 2 and all(isinstance(v, (int, float)) for v in rr)
                    and rr[0] < rr[1]):
                raise IlaError(f"{file}: field 'rating_range' is {rr!r}, expected [low, high] with low < high")
            rating_range = (float(rr[0]), float(rr[1]))
    else:
        template = text
    missing = [p for p in ("{question}", "{answer}") if p not in template]
    if missing:
        raise IlaError(f"{file}: the prompt template has no {' or '.join(missing)} placeholder")
    return JudgePrompt(name=name, system_prompt=system, template=template, rating_range=rating_range)


def parse_rating(reply: str, rating_range: tuple[float, float] = (1.0, 10.0)) -> float | None:
    """The rating in a judge REPLY (`[[N]]`, else `[N]`, as FastChat parses it); None when there is none
    or it lies outside RATING_RANGE."""
    match = RATING_PATTERN.search(reply) or RATING_PATTERN_BACKUP.search(reply)
    if match is None:
        return None
    value = float(match.group(1))
    lo, hi = rating_range
    return value if lo <= value <= hi and math.isfinite(value) else None


def _url(endpoint: str) -> str:
    url = endpoint.strip().rstrip("/")
    if not re.match(r"^https?://[^/]+", url):
        raise IlaError(f"judge endpoint {endpoint!r}: expected an http(s) URL such as "
                       "https://api.openai.com/v1")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def chat_completion(url: str, model: str, messages: Sequence[Mapping[str, str]], *, api_key: str | None,
                    timeout: float = 60, max_tokens: int | None = 2048, temperature: float = 0.0,
                    retries: int = 2, api_key_env: str = "OPENAI_API_KEY") -> str:
    """POST one OpenAI-style chat completion request to URL and return the reply text.

    HTTP 429/5xx are retried RETRIES times (after 1 s, 2 s, ...); other failures raise IlaError naming URL.
    """
    body: dict[str, Any] = {"model": model, "messages": list(messages), "temperature": temperature}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode("utf-8")
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
            break
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
            if e.code in _RETRY_STATUS and attempt < retries:
                time.sleep(2 ** attempt)
                continue
            hint = f"; set {api_key_env} to a valid key" if e.code in (401, 403) else ""
            raise IlaError(f"judge endpoint {url}: HTTP {e.code} {e.reason}{hint} ({detail[:200]})") from None
        except TimeoutError:
            raise IlaError(f"judge endpoint {url}: no reply within {timeout} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise IlaError(f"judge endpoint {url}: no reply within {timeout} s") from None
            raise IlaError(f"judge endpoint {url}: cannot connect ({e.reason})") from None
        except OSError as e:
            raise IlaError(f"judge endpoint {url}: connection failed ({e})") from None
    try:
        reply = json.loads(raw)
        content = reply["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise IlaError(f"judge endpoint {url}: reply is not an OpenAI chat completion "
                       f"({raw[:120].decode('utf-8', 'replace')!r})") from None
    return content if isinstance(content, str) else ""


def judge(answers: Sequence[Mapping[str, str]], *, endpoint: str, model: str, api_key_env: str = "OPENAI_API_KEY",
          prompt_file: str | os.PathLike[str] | None = None, timeout: float = 60,
          max_tokens: int | None = 2048, retries: int = 2) -> dict[str, Any]:
    """Grade each `{question, answer}` in ANSWERS 1-10 with judge MODEL at ENDPOINT (OpenAI-compatible).

    ENDPOINT is the API base (`https://api.openai.com/v1`, `http://localhost:8000/v1`) or the full
    `.../chat/completions` URL; the key is read from the environment variable API_KEY_ENV (no Authorization
    header when it is unset, for local servers). Temperature 0, one request per answer.

    Returns `mean_score` (mean of the parsed ratings; None if none parsed), `n`, `rated`, `unparseable`
    (replies without a rating in range), `ratings` (None where unparseable), `judgements` (question, answer,
    rating, reply), `judge_model`, `endpoint`, `prompt`.
    """
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
        raise IlaError(f"answers is {type(answers).__name__}, expected a list of {{question, answer}} objects")
    for i, item in enumerate(answers):
        if not isinstance(item, Mapping):
            raise IlaError(f"answers[{i}] is {type(item).__name__}, expected a {{question, answer}} object")
        for key in ("question", "answer"):
            if not isinstance(item.get(key), str):
                raise IlaError(f"answers[{i}].{key} is {type(item.get(key)).__name__}, expected a string")
    if not isinstance(model, str) or not model.strip():
        raise IlaError(f"judge model is {model!r}, expected a model name such as 'gpt-4o'")
    url = _url(endpoint)
    prompt = load_judge_prompt(prompt_file)
    api_key = os.environ.get(api_key_env) or None
    if api_key is None:
        log.info("%s is not set: calling %s without an API key", api_key_env, url)
    ratings: list[float | None] = []
    judgements = []
    for item in answers:
        messages = [{"role": "user", "content": prompt.render(item["question"], item["answer"])}]
        if prompt.system_prompt:
            messages.insert(0, {"role": "system", "content": prompt.system_prompt})
        reply = chat_completion(url, model, messages, api_key=api_key, timeout=timeout, max_tokens=max_tokens,
                                retries=retries, api_key_env=api_key_env)
        rating = parse_rating(reply, prompt.rating_range)
        ratings.append(rating)
        judgements.append({"question": item["question"], "answer": item["answer"], "rating": rating,
                           "reply": reply})
    parsed = [r for r in ratings if r is not None]
    return {"mean_score": sum(parsed) / len(parsed) if parsed else None, "n": len(answers), "rated": len(parsed),
            "unparseable": len(answers) - len(parsed), "ratings": ratings, "judgements": judgements,
            "judge_model": model, "endpoint": url, "prompt": prompt.name}


def generate_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str],
                     max_new_tokens: int = 512, *, batch_size: int = 4) -> list[dict[str, str]]:
    """Greedy answers of MODEL to QUESTIONS (single user turns, rendered with `ila.data.render_prompt`),
    as the `{question, answer}` list `judge` takes."""
    from ila.data import render_prompt
    from ila.evaluation.exact_match import generate

    if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
        raise IlaError("questions must be a list of strings")
    prompts = [render_prompt([{"role": "user", "content": q}], tokenizer) for q in questions]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [{"question": q, "answer": a.strip()} for q, a in zip(questions, outputs)]
