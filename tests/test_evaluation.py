"""ila.evaluation on tiny random models and real components: lm-eval, the embedded benchmarks (real shipped data),
a BIG-bench archive built in tmp_path, a local HTTP judge; smollm2 for the real-model checks."""

from __future__ import annotations

import io
import json
import logging
import math
import socket
import sys
import tarfile
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
from ila.evaluation.exact_match import bigbench_extract, extract_answer, first_line
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
        multiple_choice(model, tok, ["truthfulqa"], limit=0)
    # A registry task whose data lives on the (unreachable) hub fails with one clear line.
    with pytest.raises(IlaError, match=r"task 'hellaswag': lm-eval could not load it .*Hugging Face hub"):
        multiple_choice(model, tok, ["hellaswag"], limit=2)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(IlaError, match=r"pip install 'ila\[eval\]'"):
        multiple_choice(model, tok, ["truthfulqa"])


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


def test_extract_answer_reads_the_last_number_or_bigbench_regex() -> None:
    gsm = {"extract": "last_number"}
    assert extract_answer("3 apples cost $1,200. So the answer is 1,218.", gsm) == "1218"
    assert extract_answer("She has 7.0 left", gsm) == "7"
    assert extract_answer("no digits here", gsm) == ""
    regex = {"extract": "regex", "output_regex": r"[-+]?\d+", "stop_string": None}
    assert extract_answer("The sum is 154, I think", regex) == "154"
    assert extract_answer("True. Because ...", {"extract": "regex"}) == "True"


# --------------------------------------------------------------------------------------------- embedded benchmarks


def test_truthfulqa_docs_put_the_best_answer_among_the_incorrect_ones() -> None:
    from ila.data import embedded
    from ila.evaluation.benchmarks import TRUTHFULQA_PRIMER

    rows = embedded.truthfulqa_rows()
    docs = mc_docs("truthfulqa")
    assert len(docs) == len(rows) == 817
    for doc in docs:
        row = rows[doc["row"]]
        assert doc["choices"][doc["gold"][0]] == row["best"] == doc["answer"] and len(doc["gold"]) == 1
        assert set(doc["choices"]) == {row["best"], *row["incorrect"]}
        assert len(doc["choices"]) == len(set(doc["choices"])) >= 2
        assert doc["query"] == f"{TRUTHFULQA_PRIMER}\n\nQ: {row['question']}\nA:"
    # The order is shuffled: the best answer is not always first (nor anywhere in particular).
    first = sum(d["gold"][0] == 0 for d in docs) / len(docs)
    assert 0.05 < first < 0.5
    assert mc_docs("truthfulqa", seed=0) == docs
    assert [d["choices"] for d in mc_docs("truthfulqa", seed=1)] != [d["choices"] for d in docs]
    subset, whole = mc_docs("truthfulqa", limit=20, seed=4), mc_docs("truthfulqa", seed=4)
    assert len(subset) == 20 and all(d in whole for d in subset)  # a row's choice order does not depend on limit
    assert subset == mc_docs("truthfulqa", limit=20, seed=4) != mc_docs("truthfulqa", limit=20, seed=5)


def test_harmless_docs_share_the_dialogue_prefix_and_come_from_the_held_out_test_split(
        caplog: pytest.LogCaptureFixture) -> None:
    from ila.data import embedded

    rows = embedded.rows("harmless", "test")
    train = embedded.rows("harmless", "train")
    assert not {r["chosen"] for r in rows} & {r["chosen"] for r in train}
    assert not {r["rejected"] for r in rows} & {r["rejected"] for r in train}
    with caplog.at_level(logging.INFO, logger="ila.evaluation.benchmarks"):
        docs = mc_docs("harmless")
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    skipped = len(rows) - len(docs)
    assert 0 < len(docs) <= len(rows) and skipped < len(rows) // 20
    assert (len(skips) == 1 and f"skipped {skipped} of {len(rows)}" in skips[0]) if skipped else not skips
    for doc in docs:
        row = rows[doc["row"]]
        prefix, _, chosen_last = row["chosen"].rpartition("\n\nAssistant:")
        rejected_prefix, _, rejected_last = row["rejected"].rpartition("\n\nAssistant:")
        assert prefix == rejected_prefix  # the two answers continue the same dialogue
        assert doc["choices"][doc["gold"][0]] == chosen_last.strip() == doc["answer"]
        assert doc["choices"][1 - doc["gold"][0]] == rejected_last.strip() != chosen_last.strip()
        assert doc["query"].startswith("Human: ") and doc["query"].endswith("\n\nAssistant:")
        assert doc["query"].split() == (prefix + "\n\nAssistant:").split()  # the shared dialogue, as plain text
    assert {d["gold"][0] for d in docs} == {0, 1}


def test_bbh_options_parse_lettered_and_dash_lists() -> None:
    from ila.evaluation.benchmarks import bbh_doc, bbh_options

    lettered = "Which one?\nOptions:\n(A) a red ball\n(B) a blue box\n(C) none"
    assert bbh_options(lettered) == [("(A)", "a red ball"), ("(B)", "a blue box"), ("(C)", "none")]
    assert bbh_options("Is it?\nOptions:\n- Yes\n- No") == [(None, "Yes"), (None, "No")]
    assert bbh_options("not ( True ) and ( True ) is") is None
    doc = bbh_doc("t", {"input": lettered, "target": "(B)"})
    assert doc == {"query": f"Q: {lettered}\nA:", "choices": ["(A)", "(B)", "(C)"], "gold": [1], "answer": "(B)",
                   "subtask": "t"}
    assert bbh_doc("t", {"input": "Is it?\nOptions:\n- valid \n- invalid", "target": "invalid"})["choices"] == [
        "valid", "invalid"]
    assert bbh_doc("t", {"input": lettered, "target": "a red ball, a blue box"}) is None  # target not a choice


def test_bbh_splits_into_multiple_choice_and_exact_match_per_example() -> None:
    from ila.data import embedded
    from ila.evaluation import exact_match_items

    tasks = embedded.bbh_tasks()
    docs = mc_docs("bbh")
    items = exact_match_items("bbh", limit=None)
    mc_tasks, exact_tasks = {d["subtask"] for d in docs}, {x["subtask"] for x in items}
    assert mc_tasks | exact_tasks == set(tasks) and not mc_tasks & exact_tasks
    assert {"word_sorting", "dyck_languages", "object_counting", "multistep_arithmetic_two",
            "boolean_expressions"} <= exact_tasks and {"navigate", "date_understanding", "snarks"} <= mc_tasks
    # Every example is in exactly one of the two, except those listing options that do not contain the target.
    assert len(docs) + len(items) <= sum(len(v) for v in tasks.values()) <= len(docs) + len(items) + 10
    for doc in docs:
        assert doc["choices"][doc["gold"][0]] == doc["answer"]
        text = doc["query"].split("\nOptions:\n")[1]
        if doc["answer"].startswith("("):
            assert doc["choices"] == [f"({chr(65 + i)})" for i in range(len(doc["choices"]))]
            assert all(f"{c} " in text for c in doc["choices"])
        else:
            assert all(f"- {c}" in text for c in doc["choices"])
    by_input = {ex["input"]: ex["target"] for exs in tasks.values() for ex in exs}
    for item in items:
        assert "Options:" not in item["messages"][0]["content"]
        assert item["targets"] == [by_input[item["messages"][0]["content"]].strip()]

    navigate = mc_docs("bbh:navigate")
    assert len(navigate) == len(tasks["navigate"]) and all(d["choices"] == ["Yes", "No"] for d in navigate)
    assert {d["subtask"] for d in mc_docs("bbh:logical_deduction,snarks")} == {
        "logical_deduction_three_objects", "logical_deduction_five_objects", "logical_deduction_seven_objects",
        "snarks"}
    with pytest.raises(IlaError, match=r"task 'bbh:navigat': no BBH task 'navigat'; close names: navigate"):
        mc_docs("bbh:navigat")
    with pytest.raises(IlaError, match=r"'bbh:word_sorting': .*use --exact"):
        mc_docs("bbh:word_sorting")
    with pytest.raises(IlaError, match=r"'bbh:navigate': .*use --mc"):
        exact_match_items("bbh:navigate")


def test_limit_is_a_seeded_subset_spread_over_bbh_tasks() -> None:
    from collections import Counter

    from ila.evaluation import exact_match_items

    docs = mc_docs("bbh", limit=40, seed=3)
    counts = Counter(d["subtask"] for d in docs)
    assert len(docs) == 40 and len(counts) == 20 and set(counts.values()) == {2}
    assert docs == mc_docs("bbh", limit=40, seed=3) != mc_docs("bbh", limit=40, seed=4)
    items = exact_match_items("bbh", limit=14, seed=3)
    assert set(Counter(x["subtask"] for x in items).values()) == {2} and len(items) == 14


def test_gsm8k_items_target_the_number_after_the_hashes() -> None:
    from ila.data import embedded
    from ila.evaluation import exact_match_items

    rows = embedded.rows("gsm8k", "test")
    items = exact_match_items("gsm8k", limit=None)
    assert len(items) == len(rows) == 1319
    for row, item in zip(rows, items):
        written = row["answer"].split("####")[-1].strip().replace(",", "")
        assert item["targets"] == [written] and float(written) == float(item["targets"][0])
        assert item["messages"] == [{"role": "user", "content": row["question"]}]
        assert item["extract"] == "last_number"
        assert extract_answer(row["answer"], item) == written  # the reference solution reads as right
    subset = exact_match_items("gsm8k", limit=5, seed=2)
    assert len(subset) == 5 and all(x in items for x in subset)


def test_building_embedded_benchmark_docs_opens_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    from ila.evaluation import exact_match_items

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network use: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(AssertionError, match="network use"):  # the guard works
        socket.create_connection(("127.0.0.1", 9))
    for spec in ("truthfulqa", "harmless", "bbh", "bbh:navigate"):
        assert mc_docs(spec, limit=5)
    for spec in ("gsm8k", "bbh", "bbh:word_sorting"):
        assert exact_match_items(spec, limit=5)
    # lm-eval reads the written task file without the network too.
    pytest.importorskip("lm_eval")
    model, tok = make_model("llama"), make_tokenizer()
    assert multiple_choice(model, tok, ["truthfulqa"], limit=2)["truthfulqa"]["n"] == 2


def test_multiple_choice_on_embedded_benchmarks_with_a_tiny_model() -> None:
    pytest.importorskip("lm_eval")
    from ila.data import embedded

    model, tok = make_model("llama"), make_tokenizer()
    res = multiple_choice(model, tok, ["truthfulqa", "harmless", "bbh", "bbh:navigate,snarks"], limit=6,
                          batch_size=8, seed=2)
    for spec, r in res.items():
        assert r["n"] == 6 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0, spec
        assert r["source"] == "embedded" and r["lm_eval_task"].startswith("ila_")
        written = [json.loads(line) for line in Path(r["data_file"]).read_text().splitlines()]
        assert written == mc_docs(spec, limit=6, seed=2)  # lm-eval scored exactly the docs mc_docs builds
    assert "subtasks" not in res["truthfulqa"] and "subtasks" not in res["harmless"]
    bbh_mc = {t for t, exs in embedded.bbh_tasks().items() if any("\nOptions:\n" in e["input"] for e in exs)}
    assert set(res["bbh"]["subtasks"]) <= bbh_mc and len(res["bbh"]["subtasks"]) == 6
    assert {k: v["n"] for k, v in res["bbh:navigate,snarks"]["subtasks"].items()} == {"navigate": 3, "snarks": 3}
    sub = res["bbh:navigate,snarks"]["subtasks"]
    assert res["bbh:navigate,snarks"]["accuracy"] == pytest.approx(sum(v["accuracy"] * v["n"] for v in sub.values())
                                                                   / 6)


def test_exact_match_on_embedded_benchmarks_with_a_tiny_model() -> None:
    model, tok = make_model("llama"), make_tokenizer()
    res = exact_match(model, tok, "gsm8k", limit=3, max_new_tokens=4, show=2)
    assert res["n"] == 3 and set(res) >= {"exact_match", "first_line_match", "extracted_match", "extraction"}
    assert "last number" in res["extraction"] and "subtasks" not in res and len(res["examples"]) == 2
    for ex in res["examples"]:
        assert ex["extracted"] == extract_answer(ex["output"], {"extract": "last_number"})
        assert ex["extracted_match"] == (ex["extracted"] == ex["targets"][0])
    bbh = exact_match(model, tok, "bbh", limit=7, max_new_tokens=3)
    assert bbh["n"] == 7 and len(bbh["subtasks"]) == 7 and all(v["n"] == 1 for v in bbh["subtasks"].values())
    assert all(0.0 <= bbh[k] <= 1.0 for k in ("exact_match", "first_line_match", "extracted_match"))


def test_former_ready_names_give_one_line_errors() -> None:
    for name in ("hhh_alignment", "truthful_qa"):
        with pytest.raises(IlaError) as err:
            mc_docs(name)
        text = str(err.value)
        assert "\n" not in text and "truthfulqa, harmless, bbh" in text
        assert f"'bigbench:{name}'" in text and "ILA_BIGBENCH" in text
    pytest.importorskip("lm_eval")
    with pytest.raises(IlaError, match=r"task 'hhh_alignment': .*truthfulqa, harmless, bbh"):
        multiple_choice(make_model("llama"), make_tokenizer(), ["truthfulqa", "hhh_alignment"])


# --------------------------------------------------------------------------------------------- BIG-bench archive


def _bigbench_archive(path: Path) -> Path:
    """A tiny BIG-bench sdist: a multiple-choice task, a text-target task with two subtasks."""
    tasks = {
        "toy_choice/task.json": {"examples": [
            {"input": f"Pick {WORDS[i]}.", "target_scores": {WORDS[i]: 1, WORDS[i + 10]: 0}} for i in range(6)]},
        "toy_text/add/task.json": {"output_regex": r"[-+]?\d+", "examples": [
            {"input": f"What is {i} plus {i + 1}?", "target": str(2 * i + 1)} for i in range(4)]},
        "toy_text/sub/task.json": {"examples": [
            {"input": f"What is {i + 5} minus {i}?", "target": ["5", "five"]} for i in range(4)]},
    }
    with tarfile.open(path, "w:gz") as tf:
        for rel, data in tasks.items():
            payload = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def test_bigbench_specs_read_the_archive_ila_bigbench_points_to(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ila.evaluation import exact_match_items

    monkeypatch.setenv("ILA_BIGBENCH", str(_bigbench_archive(tmp_path / "bigbench-1.0.0.tar.gz")))
    monkeypatch.setenv("ILA_CACHE", str(tmp_path / "cache"))
    docs = mc_docs("bigbench:toy_choice")
    assert len(docs) == 6 and all(d["subtask"] == "toy_choice" for d in docs)
    assert [d["answer"] for d in docs] == WORDS[:6]
    assert all(sorted(d["choices"]) == sorted([d["answer"], WORDS[WORDS.index(d["answer"]) + 10]]) for d in docs)
    assert docs[0]["query"].startswith("Q: Pick w0.\n  choice: ") and docs[0]["query"].endswith("\nA:")
    items = exact_match_items("bigbench:toy_text", limit=None)
    assert [x["subtask"] for x in items] == ["add"] * 4 + ["sub"] * 4
    assert items[1]["messages"][0]["content"] == "What is 1 plus 2?" and items[1]["targets"] == ["3"]
    assert items[1]["output_regex"] == r"[-+]?\d+" and items[4]["targets"] == ["5", "five"]
    assert [x["subtask"] for x in exact_match_items("bigbench:toy_text/sub", limit=2)] == ["sub", "sub"]
    assert (tmp_path / "cache" / "bigbench" / "bigbench-1.0.0" / "index.json").is_file()
    with pytest.raises(IlaError, match="no examples with 'target_scores'"):
        mc_docs("bigbench:toy_text")


def test_bigbench_spec_without_ila_bigbench_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ila.evaluation import exact_match_items

    monkeypatch.delenv("ILA_BIGBENCH", raising=False)
    for build in (mc_docs, exact_match_items):
        with pytest.raises(IlaError) as err:
            build("bigbench:hhh_alignment")
        assert "ILA_BIGBENCH" in str(err.value) and "\n" not in str(err.value)


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
def test_multiple_choice_on_smollm2_truthfulqa_and_harmless() -> None:
    pytest.importorskip("lm_eval")
    from ila.models import load_model

    model, tok = load_model("smollm2-135m")
    res = multiple_choice(model, tok, ["truthfulqa", "harmless"], limit=4, batch_size=4)
    for spec, r in res.items():
        assert r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0, spec
        assert r["accuracy_stderr"] is not None and r["source"] == "embedded"
        docs = [json.loads(line) for line in Path(r["data_file"]).read_text().splitlines()]
        assert docs == mc_docs(spec, limit=4) and all(d["choices"][d["gold"][0]] == d["answer"] for d in docs)
    # Unknown names are looked up in lm-eval's full task index (several seconds), with suggestions.
    with pytest.raises(IlaError, match=r"task 'hellaswagg': not an embedded benchmark .* close lm-eval names: "
                                       r".*hellaswag"):
        multiple_choice(model, tok, ["hellaswagg"])
