"""End to end on the real embedded smollm2-135m (fetched once into the cache) and an embedded data set."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_identify_on_smollm2_with_a_handful_of_steps(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ila.cli", "identify", "--model", "smollm2-135m",
         "--data", "roleplay", "--out", str(out), "--max-steps", "2",
         "--stage2-steps", "2", "--max-examples", "24", "--max-length", "160"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "ranking.json").read_text())
    assert len(data["layers"]) == 30 * 7
    assert {x["role"] for x in data["layers"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    assert {x["block"] for x in data["layers"]} == set(range(30))
    assert len({x["score"] for x in data["layers"]}) > 1  # stage 2 moved the scores apart
    assert data["metadata"]["model"] == "smollm2-135m" and data["metadata"]["stage1_steps"] == 2
    assert (out / "heatmap.png").stat().st_size > 10_000
    assert (out / "adapter" / "adapter_config.json").is_file()
