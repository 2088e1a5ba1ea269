import json

import pytest

from ila.comparison import compare, format_comparison
from ila.errors import IlaError
from ila.layers import LayerId
from ila.ranking import Ranking, jaccard, spearman

LAYERS = [LayerId(f"model.layers.{b}.{r}", b, r) for b in range(2) for r in ("q_proj", "v_proj")]


def test_top_bottom_and_order():
    r = Ranking.from_scores(LAYERS, [0.5, 3.0, -1.0, 2.0])
    assert [x.name for x in r.ordered()] == [LAYERS[i].name for i in (1, 3, 0, 2)]
    assert r.top(0.75) == [LAYERS[1], LAYERS[3], LAYERS[0]]
    assert r.top(0.5) == [LAYERS[1], LAYERS[3]]
    assert r.bottom(0.25) == [LAYERS[2]]
    with pytest.raises(IlaError):
        r.top(1.5)
    with pytest.raises(IlaError):
        r.top(0)


def test_jaccard_and_spearman_known_values():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert jaccard(set(), set()) == 1.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ρ = 1 − 6Σd²/(n(n²−1)) = 1 − 6·2/120 = 0.9
    assert spearman([1, 2, 3, 4, 5], [2, 1, 3, 4, 5]) == pytest.approx(0.9)
    a = Ranking.from_scores(LAYERS, [4, 3, 2, 1])
    b = Ranking.from_scores(LAYERS, [1, 3, 2, 4])
    # top-3: {0,1,2} vs {3,1,2} -> 2/4
    assert a.jaccard(b, 0.75) == pytest.approx(0.5)
    assert a.spearman(b) == pytest.approx(spearman([4, 3, 2, 1], [1, 3, 2, 4]))


def test_save_load_roundtrip(tmp_path):
    r = Ranking.from_scores(LAYERS, [0.5, 3.0, -1.0, 2.0], {"model": "m", "seed": 3}, gates=True,
                            tiebreak=[0.0, 1.0, 2.0, 3.0])
    path = r.save(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["layers"][1] == {"name": LAYERS[1].name, "block": 0, "role": "v_proj", "score": 3.0,
                                 "gate": pytest.approx(0.9526, abs=1e-4), "tiebreak": 1.0}
    back = Ranking.load(path)
    assert back.layers == r.layers and back.scores() == r.scores() and back.metadata["seed"] == 3
    assert back.gates and [e.tiebreak for e in back.entries] == [0.0, 1.0, 2.0, 3.0]
    plain = Ranking.from_scores(LAYERS, [0.5, 3.0, -1.0, 2.0]).save(tmp_path / "plain.json")
    assert set(json.loads(plain.read_text())["layers"][0]) == {"name", "block", "role", "score"}  # no gate
    assert not list(tmp_path.glob(".r.json.*"))  # no temporary left behind


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"layers": 3}', "'layers' list"),
    ('{"layers": []}', "empty"),
    ('{"layers": [{"name": "a", "block": 0, "role": "q"}]}', r"layers\[0\].score"),
    ('{"layers": [{"name": "a", "block": "x", "role": "q", "score": 1}]}', r"layers\[0\].block"),
])
def test_corrupt_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(IlaError, match=message) as info:
        Ranking.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_compare_two_and_many():
    a = Ranking.from_scores(LAYERS, [4, 3, 2, 1])
    b = Ranking.from_scores(LAYERS, [1, 3, 2, 4])
    text = format_comparison(compare([a, b]))
    assert text.splitlines()[0] == "jaccard@0.75 = 0.500"
    c = compare([a, b, a], top=0.5)
    assert c.jaccard[0][2] == 1.0 and c.jaccard[0][1] == pytest.approx(1 / 3)
    assert "spearman" in format_comparison(c)
