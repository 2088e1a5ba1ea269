"""The `ila` command line end to end on tiny saved models, and its one-line errors for bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ila.cli import main

FAST = ["--max-steps", "6", "--stage2-steps", "3", "--max-length", "32"]


def run_cli(*args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished_run(model_dirs, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "llama"
    assert main(["identify", "--model", str(model_dirs("llama")), "--data", str(data_file), "--out", str(out),
                 *FAST]) == 0
    return out


def test_identify_writes_a_complete_run_folder(finished_run):
    data = json.loads((finished_run / "ranking.json").read_text())
    assert len(data["layers"]) == 14
    assert set(data["layers"][0]) == {"name", "block", "role", "score", "gate", "tiebreak"}
    meta = data["metadata"]
    for key in ("model", "data", "seed", "method", "method_config", "epsilon", "stability_step", "stage1_steps",
                "stage2_steps", "stage2_settled_step", "near_ties", "timings",
                "versions"):
        assert key in meta, key
    assert meta["stage1_steps"] == 6 and meta["stage2_steps"] == 3
    assert meta["versions"]["transformers"]
    assert (finished_run / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (finished_run / "adapter" / "adapter_model.safetensors").is_file()


def test_same_seed_same_ranking_from_the_cli(finished_run, model_dirs, data_file, tmp_path, capsys):
    code, out, _ = run_cli("identify", "--model", model_dirs("llama"), "--data", data_file, "--out", tmp_path / "b",
                           *FAST, capsys=capsys)
    assert code == 0 and "ila: ranked 14 linear layers" in out
    assert "stage 1: 6 steps, step cap before ε-stability; stage 2: 3 steps, step cap reached" in out
    first = json.loads((finished_run / "ranking.json").read_text())["layers"]
    again = json.loads((tmp_path / "b" / "ranking.json").read_text())["layers"]
    assert [x["score"] for x in first] == [x["score"] for x in again]


def test_stage2_alone_on_an_adapter_and_compare(finished_run, model_dirs, data_file, tmp_path, capsys):
    code, _, err = run_cli("identify", "--model", model_dirs("llama"), "--data", data_file, "--out",
                           tmp_path / "s2", "--adapter", finished_run / "adapter", "--stage2-steps", "3",
                           "--max-length", "32", capsys=capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "s2" / "ranking.json").read_text())
    meta = data["metadata"]
    assert meta["method"] == "ila" and meta["adapter"] and meta["stage1_steps"] == 0
    # same adapter, data, seed and steps as the full run: stage 2 alone reproduces its scores exactly
    first = json.loads((finished_run / "ranking.json").read_text())["layers"]
    assert [x["score"] for x in data["layers"]] == [x["score"] for x in first]
    assert (tmp_path / "s2" / "adapter" / "adapter_model.safetensors").is_file()
    code, out, _ = run_cli("compare", finished_run / "ranking.json", tmp_path / "s2" / "ranking.json",
                           capsys=capsys)
    assert code == 0
    assert out.splitlines()[0].startswith("jaccard@0.75 = ")
    value = float(out.splitlines()[0].split("=")[1])
    assert 0 <= value <= 1


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_identify_on_other_architectures(arch, model_dirs, data_file, tmp_path, capsys):
    code, _, err = run_cli("identify", "--model", model_dirs(arch), "--data", data_file, "--out", tmp_path / arch,
                           *FAST, capsys=capsys)
    assert code == 0, err
    assert (tmp_path / arch / "ranking.json").is_file()


def test_milestones_leave_the_final_ranking_unchanged(finished_run, model_dirs, data_file, tmp_path, capsys):
    code, _, err = run_cli("identify", "--model", model_dirs("llama"), "--data", data_file, "--out", tmp_path / "m",
                           "--milestones", "0.5", *FAST, capsys=capsys)
    assert code == 0, err
    final = json.loads((tmp_path / "m" / "ranking.json").read_text())["layers"]
    plain = json.loads((finished_run / "ranking.json").read_text())["layers"]
    assert [x["score"] for x in final] == [x["score"] for x in plain]  # the stage-1 weights were restored
    milestone = json.loads((tmp_path / "m" / "milestones" / "ranking_0.5.json").read_text())["layers"]
    assert [x["score"] for x in milestone] != [x["score"] for x in plain]


def test_another_seed_gives_another_ranking(finished_run, model_dirs, data_file, tmp_path, capsys):
    code, _, _ = run_cli("identify", "--model", model_dirs("llama"), "--data", data_file, "--out", tmp_path / "s",
                         "--seed", "1", *FAST, capsys=capsys)
    assert code == 0
    other = json.loads((tmp_path / "s" / "ranking.json").read_text())["layers"]
    plain = json.loads((finished_run / "ranking.json").read_text())["layers"]
    assert [x["score"] for x in other] != [x["score"] for x in plain]


def test_full_method_and_milestones(model_dirs, data_file, tmp_path, capsys):
    out = tmp_path / "full"
    code, _, err = run_cli("identify", "--model", model_dirs("qwen2"), "--data", data_file, "--out", out,
                           "--update", "full", "--milestones", "0.5", *FAST, capsys=capsys)
    assert code == 0, err
    assert (out / "delta.safetensors").is_file() and not (out / "adapter").exists()
    milestone = json.loads((out / "milestones" / "ranking_0.5.json").read_text())
    assert milestone["metadata"]["milestone_step"] == 3


def test_config_file_with_cli_override(model_dirs, data_file, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_length: 32\nlora: {r: 2, target_roles: [q_proj, v_proj]}\nstage1: {max_steps: 50}\n"
                   "ila: {max_steps: 2}\n")
    code, _, err = run_cli("identify", "--model", model_dirs("llama"), "--data", data_file, "--out",
                           tmp_path / "o", "--config", cfg, "--max-steps", "4", capsys=capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "o" / "ranking.json").read_text())
    assert {x["role"] for x in data["layers"]} == {"q_proj", "v_proj"}
    assert data["metadata"]["stage1_steps"] == 4  # the CLI option beat the file
    assert data["metadata"]["stage2_steps"] == 2 and data["metadata"]["method_config"]["max_steps"] == 2


def bad_inputs(tmp_path, model_dir, data_file, finished_run):
    def write(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    broken = write("broken.jsonl", '{"instruction": "w1", "output": "w2"}\n{oops\n')
    missing_field = write("nofield.jsonl", json.dumps({"instruction": "w1 w2"}) + "\n")
    empty = write("empty.jsonl", "")
    corrupt = write("corrupt.json", '{"layers": [{"name": 1}]}')
    bad_cfg = write("bad.yaml", "stage1: {max_stepz: 3}\n")
    old_cfg = write("old.yaml", "stage2: {steps: 3}\n")
    no_roles = write("roles.yaml", "lora: {target_roles: [nothing_like_this]}\n")
    other = tmp_path / "other_adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text(
        (finished_run / "adapter" / "adapter_config.json").read_text().replace("model.layers.0", "model.layers.7"))
    (other / "adapter_model.safetensors").write_bytes(
        (finished_run / "adapter" / "adapter_model.safetensors").read_bytes())
    bad_regex = write("regex.yaml", "lora: {target_roles: ['q_proj(']}\n")
    untrained = tmp_path / "untrained"
    shutil.copytree(finished_run / "adapter", untrained)
    weights = load_file(untrained / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              untrained / "adapter_model.safetensors")
    dora = tmp_path / "dora"
    shutil.copytree(finished_run / "adapter", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    common = ["--model", model_dir, "--data", data_file]
    return [
        (["identify", "--model", model_dir, "--data", tmp_path / "nope.jsonl"], "nope.jsonl"),
        (["identify", "--model", model_dir, "--data", broken], "line 2"),
        (["identify", "--model", model_dir, "--data", missing_field], "output"),
        (["identify", "--model", model_dir, "--data", empty], "empty.jsonl"),
        (["identify", "--model", "no-such-model-anywhere", "--data", data_file], "no-such-model-anywhere"),
        (["identify", *common, "--config", no_roles], "nothing_like_this"),
        (["identify", *common, "--adapter", tmp_path], "adapter_config.json"),
        (["identify", *common, "--adapter", other], "other_adapter"),
        (["identify", *common, "--max-steps", "-3"], "stage1.max_steps"),
        (["identify", *common, "--budget", "1.5"], "ila.budget"),
        (["identify", *common, "--method", "no-such-method"], "not a known importance method (known: "),
        (["identify", *common, "--method", "update-norm", "--stage2-steps", "5"], "options for method 'ila'"),
        (["identify", *common, "--stage2-tolerance", "0"], "ila.tolerance"),
        (["identify", *common, "--stage2-tolerance=-1e-3"], "ila.tolerance"),
        (["identify", *common, "--stage2-steps", "0"], "ila.max_steps"),
        (["identify", *common, "--config", old_cfg], "has moved to 'ila"),
        (["identify", *common, "--milestones", "0,2"], "stage1.milestones"),
        (["identify", *common, "--config", bad_cfg], "max_stepz"),
        (["identify", *common, "--seed", "-1"], "seed"),
        (["identify", *common, "--config", bad_regex], "target_roles"),
        (["identify", *common, "--out", data_file], "is not a folder"),
        (["identify", *common, "--adapter", untrained], "untrained"),
        (["identify", *common, "--adapter", dora], "DoRA"),
        (["identify", *common, "--adapter", finished_run / "adapter", "--update", "full"], "--update full"),
        (["identify", *common, "--max-steps", "many"], "invalid int value"),
        (["frobnicate"], "invalid choice"),
        (["identify", *common, "--out", finished_run], "already holds a finished run"),
        (["compare", corrupt, finished_run / "ranking.json"], "corrupt.json"),
        (["compare", finished_run / "ranking.json", finished_run / "ranking.json", "--top", "0"], "--top"),
    ]


def test_bad_input_gives_one_line_errors(model_dirs, data_file, finished_run, tmp_path, capsys):
    for args, needle in bad_inputs(tmp_path, model_dirs("llama"), data_file, finished_run):
        out_dir = tmp_path / "never"
        if args[0] == "identify" and "--out" not in args:
            args = [args[0], *FAST, "--out", out_dir, *args[1:]]  # the case's own options come last and win
        code, _, err = run_cli(*args, capsys=capsys)
        errors = [line for line in err.splitlines() if line.startswith("ila: error: ")]
        assert code == 2, (args, err)
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]), (args, err)  # progress bars may precede
        assert needle in errors[0], (needle, errors[0])
        assert "Traceback" not in err
        assert not (out_dir / "ranking.json").exists()


def test_errors_are_one_line_without_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ila.cli", "compare", str(tmp_path / "a.json"),
                           str(tmp_path / "b.json")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ila: error: ranking {tmp_path / 'a.json'}: file not found"


def test_help_explains_every_option():
    from ila.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.option_strings)
    proc = subprocess.run([sys.executable, "-m", "ila.cli", "identify", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "ε-stable" in proc.stdout


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    from ila.errors import IlaError

    with pytest.raises(IlaError, match="file not found"):
        main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--debug"])


