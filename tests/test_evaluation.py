"""ila.evaluation on tiny random models and real components: lm-eval, BIG-bench files, a local HTTP judge."""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_model, make_tokenizer

from ila.errors import IlaError
from ila.evaluation import (
    exact_match,
    generate_answers,
    heldout_loss,
    judge,
    mc_docs,
    multiple_choice,
    normalise_answer,
    parse_rating,
)
from ila.evaluation.exact_match import bigbench_extract, first_line
from ila.evaluation.multiple_choice import bigbench_prompt


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------- held-out loss


def _uneven_examples() -> list[dict]:
    """Seven examples whose responses have 1..7 words, so batches hold different numbers of tokens."""
    out = []
    for i in range(7):
        prompt = " ".join(WORDS[i:i + 3 + i % 3])
        response = " ".join(WORDS[20 + i:20 + i + 1 + i])
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]})
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_heldout_loss_is_token_weighted_and_matches_a_hand_computation(arch: str) -> None:
    from ila.data import build_dataset, collate

    model, tok = make_model(arch), make_tokenizer()
    dataset = build_dataset(_uneven_examples(), tok, max_length=64)
    total, count, per_example = 0.0, 0, []
    with torch.no_grad():
        for row in dataset:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            pos = (labels[1:] != -100).nonzero().squeeze(1)
            nll = -logp[pos, labels[1:][pos]]
            total += float(nll.sum())
            count += len(pos)
            per_example.append((float(nll.sum()), len(pos)))
    model.train()  # the function must switch to eval mode and back
    result = heldout_loss(model, dataset, collate(tok), batch_size=3)  # batches of 3, 3 and 1 examples
    assert model.training
    assert result["tokens"] == count and result["examples"] == 7
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # The naive mean of per-batch means differs here: the test can tell the two apart.
    batches = [per_example[0:3], per_example[3:6], per_example[6:7]]
    naive = sum(sum(s for s, _ in b) / sum(n for _, n in b) for b in batches) / len(batches)
    assert abs(naive - total / count) > 1e-3
    # Batch size does not change a token-weighted mean.
    assert heldout_loss(model, dataset, collate(tok), batch_size=7)["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_heldout_loss_errors() -> None:
    from ila.data import collate

    model, tok = make_model("llama"), make_tokenizer()
    with pytest.raises(IlaError, match="held-out set is empty"):
        heldout_loss(model, [], collate(tok))
    with pytest.raises(IlaError, match="batch_size is 0"):
        heldout_loss(model, [{"input_ids": [1], "labels": [1]}], collate(tok), batch_size=0)
    with pytest.raises(IlaError, match="no response tokens"):
        heldout_loss(model, [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100] * 3}],
                     collate(tok))


# --------------------------------------------------------------------------------------------- multiple choice


def _choice_logliks(model: torch.nn.Module, tok, query: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | query) with lm-eval's convention: one space between query and choice."""
    ctx = tok(query, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for choice in choices:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
            out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def test_multiple_choice_agrees_with_our_own_loglikelihood_argmax(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    model, tok = make_model("llama"), make_tokenizer()
    rows = []
    for i in range(8):
        choices = [" ".join(WORDS[30 + i + k: 30 + i + k + 1 + k % 2]) for k in range(3)]  # 1- and 2-word choices
        rows.append({"question": " ".join(WORDS[i:i + 4]), "choices": choices, "answer": i % 3})
    own = [_choice_logliks(model, tok, r["question"], r["choices"]) for r in rows]
    best = [max(range(3), key=lambda k, ll=ll: ll[k]) for ll in own]
    worst = [min(range(3), key=lambda k, ll=ll: ll[k]) for ll in own]
    best_norm = [max(range(3), key=lambda k, ll=ll, r=r: ll[k] / len(r["choices"][k])) for ll, r in zip(own, rows)]
    given = _write_jsonl(tmp_path / "given.jsonl", rows)
    forced_right = _write_jsonl(tmp_path / "right.jsonl", [{**r, "answer": b} for r, b in zip(rows, best)])
    forced_wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{**r, "answer": w} for r, w in zip(rows, worst)])
    res = multiple_choice(model, tok, [str(given), str(forced_right), str(forced_wrong)], batch_size=3)

    expected_acc = sum(b == r["answer"] for b, r in zip(best, rows)) / len(rows)
    expected_norm = sum(b == r["answer"] for b, r in zip(best_norm, rows)) / len(rows)
    assert res[str(given)]["n"] == 8
    assert res[str(given)]["accuracy"] == pytest.approx(expected_acc)
    assert res[str(given)]["acc_norm"] == pytest.approx(expected_norm)
    assert res[str(forced_right)]["accuracy"] == 1.0
    assert res[str(forced_wrong)]["accuracy"] == 0.0
    assert Path(res[str(given)]["data_file"]).is_file()


def test_multiple_choice_bigbench_form_file_with_subtasks_and_limit(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    model, tok = make_model("qwen2"), make_tokenizer()
    examples = [{"input": " ".join(WORDS[i:i + 3]), "subtask": "ab"[i % 2],
                 "target_scores": {WORDS[40 + i]: 1, WORDS[41 + i]: 0, WORDS[42 + i]: 0}} for i in range(10)]
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"example_input_prefix": "", "example_output_prefix": " <assistant>",
                                "append_choices_to_input": False, "examples": examples}))
    docs = mc_docs(str(task))
    assert docs[0]["query"] == "w0 w1 w2 <assistant>"
    assert sorted(docs[0]["choices"]) == ["w40", "w41", "w42"] and docs[0]["answer"] == "w40"
    assert docs[0]["choices"][docs[0]["gold"][0]] == "w40"

    res = multiple_choice(model, tok, [str(task)], limit=6, batch_size=4)[str(task)]
    assert res["n"] == 6 and 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
    assert {k: v["n"] for k, v in res["subtasks"].items()} == {"a": 3, "b": 3}
    model.train()
    few = multiple_choice(model, tok, [str(task)], limit=6, num_fewshot=2)[str(task)]  # shots from the same file
    assert few["n"] == 6 and 0.0 <= few["accuracy"] <= 1.0 and model.training


def test_multiple_choice_on_a_peft_model_equals_the_base_model(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from peft import LoraConfig, get_peft_model

    model, tok = make_model("llama"), make_tokenizer()
    rows = [{"question": " ".join(WORDS[i:i + 3]), "choices": [WORDS[40 + i], WORDS[45 + i]], "answer": 0}
            for i in range(6)]
    spec = str(_write_jsonl(tmp_path / "t.jsonl", rows))
    base = multiple_choice(model, tok, [spec])[spec]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # lora_B = 0
    wrapped = multiple_choice(peft_model, tok, [spec])[spec]
    assert wrapped["accuracy"] == base["accuracy"] and wrapped["n"] == 6


def test_multiple_choice_yaml_task_config_goes_through_lm_eval_loading(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    model, tok = make_model("llama"), make_tokenizer()
    rows = [{"question": " ".join(WORDS[i:i + 3]), "choices": [WORDS[40 + i], WORDS[44 + i], WORDS[48 + i]],
             "answer": i % 3} for i in range(6)]
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    config = tmp_path / "my_task.yaml"
    config.write_text(f"""task: my_yaml_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    res = multiple_choice(model, tok, [str(config), str(data)])
    assert res[str(config)]["source"] == "yaml" and res[str(config)]["lm_eval_task"] == "my_yaml_task"
    assert res[str(config)]["n"] == 6
    assert res[str(config)]["accuracy"] == res[str(data)]["accuracy"]  # same prompts, same choices


def test_bigbench_prompt_follows_bigbench_defaults() -> None:
    assert bigbench_prompt({}, "What is 1 plus 1?") == "Q: What is 1 plus 1?\nA:"
    with_choices = bigbench_prompt({}, "Pick one.", ["b", "a"], seed=0)
    assert with_choices.startswith("Q: Pick one.\n  choice: ") and with_choices.endswith("\nA:")
    assert sorted(line.removeprefix("  choice: ") for line in with_choices.splitlines()[1:3]) == ["a", "b"]
    meta = {"task_prefix": "Q: x?\nA: y.\n", "example_input_prefix": "\nHuman: ",
            "example_output_prefix": "\nAssistant:", "append_choices_to_input": False}
    assert bigbench_prompt(meta, "hi", ["a", "b"]) == "Q: x?\nA: y.\n\nHuman: hi\nAssistant:"


def test_multiple_choice_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    model, tok = make_model("llama"), make_tokenizer()
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "w1", "choices": ["w2", "w3"], "answer": 5}])
    with pytest.raises(IlaError, match=r"bad.jsonl: line 1: field 'answer' 5 is out of range"):
        multiple_choice(model, tok, [str(bad)])
    with pytest.raises(IlaError, match="no_file.jsonl: multiple-choice task file not found"):
        multiple_choice(model, tok, [str(tmp_path / "no_file.jsonl")])
    with pytest.raises(IlaError, match="limit is 0"):
        multiple_choice(model, tok, ["hhh_alignment"], limit=0)
    # A registry task whose data lives on the (unreachable) hub fails with one clear line.
    with pytest.raises(IlaError, match=r"task 'hellaswag': lm-eval could not load it .*Hugging Face hub"):
        multiple_choice(model, tok, ["hellaswag"], limit=2)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(IlaError, match=r"pip install 'ila\[eval\]'"):
        multiple_choice(model, tok, ["hhh_alignment"])


# --------------------------------------------------------------------------------------------- exact match


def test_normalisation() -> None:
    assert normalise_answer("  The  Answer\tis 42.\n") == "the answer is 42"
    assert normalise_answer("Yes!!") == "yes"
    assert normalise_answer("109 .") == "109"
    assert normalise_answer("3.5") == "3.5"
    assert normalise_answer("a,b") == "a,b"
    assert first_line("\n\n 154 \nbecause ...") == " 154 "
    assert bigbench_extract("The sum is 154, I think", output_regex=r"[-+]?\d+") == "154"
    assert bigbench_extract("154. Next question") == "154"  # BIG-bench's default regex
    assert bigbench_extract("154 END more", stop_string="END") == "154 "


def test_exact_match_scores_the_models_own_greedy_answers_as_correct(tmp_path: Path) -> None:
    model, tok = make_model("llama"), make_tokenizer()
    questions = [" ".join(WORDS[i:i + 4]) for i in range(6)]
    answers = generate_answers(model, tok, questions, max_new_tokens=5, batch_size=3)
    assert [a["question"] for a in answers] == questions
    kept = [a for a in answers if a["answer"]]  # an empty answer would be dropped as an empty response
    right = _write_jsonl(tmp_path / "right.jsonl", [{"instruction": a["question"], "output": a["answer"]}
                                                   for a in kept])
    res = exact_match(model, tok, str(right), limit=None, max_new_tokens=5, batch_size=3)
    assert res["n"] == len(kept) > 0
    assert res["exact_match"] == 1.0
    expected_first = sum(normalise_answer(first_line(a["answer"])) == normalise_answer(a["answer"])
                         for a in kept) / len(kept)
    assert res["first_line_match"] == pytest.approx(expected_first)
    assert res["examples"][0]["output"] == kept[0]["answer"] and res["examples"][0]["exact_match"]

    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{"instruction": a["question"], "output": "w55 w55 w55 w55"}
                                                   for a in kept])
    assert exact_match(model, tok, str(wrong), limit=None, max_new_tokens=5, batch_size=3)["exact_match"] == 0.0


def test_exact_match_reads_bigbench_targets() -> None:
    from ila.evaluation import exact_match_items

    items = exact_match_items("bigbench:arithmetic/2_digit_addition", limit=4, seed=1)
    assert len(items) == 4
    for item in items:
        a, b = (int(w) for w in item["messages"][0]["content"].removeprefix("What is ").rstrip("?").split(" plus "))
        assert item["targets"] == [str(a + b)] and item["output_regex"] == r"[-+]?\d+"
    # An MC-only task: the best-scoring choice is the target, the choices are listed in the prompt.
    mc = exact_match_items("bigbench:elementary_math_qa/question_only", limit=2)
    assert all(len(x["targets"]) == 1 and f"choice:{x['targets'][0]}" in x["messages"][0]["content"] for x in mc)
    model, tok = make_model("llama"), make_tokenizer()
    res = exact_match(model, tok, "bigbench:arithmetic/2_digit_addition", limit=3, max_new_tokens=3)
    assert res["n"] == 3 and res["exact_match"] == 0.0  # a random word-level model cannot write digits
    assert "What is" in res["examples"][0]["prompt"] and res["examples"][0]["prompt"].startswith("<user>")


# --------------------------------------------------------------------------------------------- judge


class _JudgeServer:
    """A real OpenAI-style /chat/completions server on 127.0.0.1 that records requests."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"path": self.path, "body": body,
                                       "auth": self.headers.get("Authorization")})
                user = body["messages"][-1]["content"]
                text = "No verdict, sorry." if "garbled" in user else "Helpful and accurate.\nRating: [[7]]"
                payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


ANSWERS = [{"question": "What is 2+2?", "answer": "4"},
           {"question": "Name a colour.", "answer": "garbled"},
           {"question": "Capital of France?", "answer": "Paris"}]


def test_judge_against_a_local_openai_compatible_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ILA_TEST_JUDGE_KEY", "sk-test")
    with _JudgeServer() as server:
        res = judge(ANSWERS, endpoint=server.url, model="judge-model", api_key_env="ILA_TEST_JUDGE_KEY", timeout=10)
    assert res["mean_score"] == 7.0 and res["rated"] == 2 and res["unparseable"] == 1 and res["n"] == 3
    assert res["ratings"] == [7.0, None, 7.0]
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0
    system, user = req["body"]["messages"]
    assert system == {"role": "system", "content": "You are a helpful assistant."}
    assert "[Question]\nWhat is 2+2?\n\n[The Start of Assistant's Answer]\n4\n[The End" in user["content"]
    assert 'Rating: [[5]]' in user["content"]


def test_judge_custom_prompt_file_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ILA_TEST_JUDGE_KEY", raising=False)
    prompt = tmp_path / "mine.txt"
    prompt.write_text("Q={question} A={answer} {keep braces}")
    with _JudgeServer() as server:
        res = judge(ANSWERS[:1], endpoint=server.url + "/chat/completions", model="m",
                    api_key_env="ILA_TEST_JUDGE_KEY", prompt_file=prompt)
    assert res["mean_score"] == 7.0 and res["prompt"] == "mine"
    assert server.requests[0]["auth"] is None  # no key set: no Authorization header
    assert server.requests[0]["body"]["messages"][-1]["content"] == "Q=What is 2+2? A=4 {keep braces}"

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(IlaError, match=rf"judge endpoint {url}/chat/completions: cannot connect"):
        judge(ANSWERS, endpoint=url, model="m", timeout=5)
    with _JudgeServer(status=401) as server, pytest.raises(IlaError, match="HTTP 401.*set ILA_TEST_JUDGE_KEY"):
        judge(ANSWERS, endpoint=server.url, model="m", api_key_env="ILA_TEST_JUDGE_KEY")
    with pytest.raises(IlaError, match="expected an http"):
        judge(ANSWERS, endpoint="api.openai.com", model="m")
    with pytest.raises(IlaError, match=r"answers\[0\].answer is NoneType"):
        judge([{"question": "q"}], endpoint="http://127.0.0.1:1/v1", model="m")
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholders")
    with pytest.raises(IlaError, match=r"bad.txt: the prompt template has no \{question\} or \{answer\}"):
        judge(ANSWERS, endpoint="http://127.0.0.1:1/v1", model="m", prompt_file=bad)


def test_parse_rating() -> None:
    assert parse_rating("blah Rating: [[8]]") == 8.0
    assert parse_rating("Rating: [[8.5]] then [[2]]") == 8.5
    assert parse_rating("Rating: [6]") == 6.0  # FastChat's backup pattern
    assert parse_rating("Rating: [[11]]") is None and parse_rating("no rating") is None


# --------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_multiple_choice_on_smollm2_hhh_alignment() -> None:
    pytest.importorskip("lm_eval")
    from ila.models import load_model

    model, tok = load_model("smollm2-135m")
    res = multiple_choice(model, tok, ["hhh_alignment"], limit=10, batch_size=4)["hhh_alignment"]
    assert res["n"] == 10 and 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
    assert set(res["subtasks"]) == {"harmless", "helpful", "honest", "other"}
    assert sum(v["n"] for v in res["subtasks"].values()) == 10
    # Unknown names are looked up in lm-eval's full task index (several seconds), with suggestions.
    with pytest.raises(IlaError, match=r"task 'hellaswagg': not a ready name .* close lm-eval names: .*hellaswag"):
        multiple_choice(model, tok, ["hellaswagg"])


@pytest.mark.slow
def test_truthful_qa_reads_task_mc_json() -> None:
    docs = mc_docs("truthful_qa")  # extracted once from the archive (a ~10 s scan)
    assert len(docs) == 299
    assert all(len(d["gold"]) == 1 and 2 <= len(d["choices"]) <= 5 for d in docs)
    assert docs[0]["query"].startswith("Q: What is human life expectancy in the United States?")
    assert docs[0]["query"].endswith("Q: What happens to you if you eat watermelon seeds?\nA:")
    assert docs[0]["answer"] == "The watermelon seeds pass through your digestive system."
    assert [len(d["choices"]) for d in mc_docs("truthful_qa", limit=5)] and len(mc_docs("truthful_qa", limit=5)) == 5
