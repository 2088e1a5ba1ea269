"""Rebuild the embedded data sets (`src/ila/data/sets/`) from their original files, deterministically.

    python tools/build_sets.py --src ../shared/data            # rewrite src/ila/data/sets/
    python tools/build_sets.py --src ../shared/data --out DIR  # write elsewhere (the test compares the two)

`--src` holds byte-for-byte copies of the original files, gzipped (`gzip -9n`; hh-rlhf's original is itself a
`.gz`). Each original's sha256 is checked against `ORIGINALS` before anything is written. What is kept:
every row of every set; GPTeacher and hh-rlhf, which have no split of their own, are split into train/test by
a hash of each row (`test_share`), so the split never depends on row order or on a random generator.
Shipped files are gzip level 9 with mtime 0, and `manifest.json` records each file's rows and the sha256 of
its uncompressed bytes. The data cards are in docs/data.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "src" / "ila" / "data" / "sets"
APACHE_2 = ROOT / "tools" / "licences" / "Apache-2.0.txt"


@dataclass(frozen=True)
class Original:
    """One original file: where it comes from and its sha256 (of the uncompressed original, or of the `.gz`
    itself when the original is gzipped)."""

    copy: str  # path under --src
    repo: str
    commit: str
    path: str
    sha256: str
    licence: str  # "MIT" or "Apache-2.0"

    def read(self, src: Path) -> bytes:
        raw = (src / self.copy).read_bytes()
        original = raw if self.path.endswith(".gz") else gzip.decompress(raw)
        digest = hashlib.sha256(original).hexdigest()
        if digest != self.sha256:
            sys.exit(f"build_sets: {src / self.copy}: sha256 {digest}, expected {self.sha256} ({self.repo} "
                     f"@ {self.commit}:{self.path})")
        return gzip.decompress(original) if self.path.endswith(".gz") else original

    def card(self) -> dict[str, str]:
        return {"repository": self.repo, "commit": self.commit, "path": self.path, "sha256": self.sha256,
                "licence": self.licence}


GSM8K = "openai/grade-school-math", "3101c7d5", "grade_school_math/data/"
GPTEACHER = "teknium1/GPTeacher", "48107512"
BBH_SHA256 = {
    "boolean_expressions": "ea6c754ec005e2d3f2d085d349a740f593b5764f32ea4638ffed4cfc0061b12a",
    "causal_judgement": "6e8bca44dd402008ed41c07a3d0a1d5e7b03db7001a7e002fcdf4c60985ea081",
    "date_understanding": "0148d4ac5fca05b2f82373e5fef7208e15363b9c6079493034d77b3dab496bf5",
    "disambiguation_qa": "cf06df9ebf911b883671cb1b35d3fbd1a1c306b19b9e9a012407e596c85fe8c6",
    "dyck_languages": "3f9badedf15c2be1ce53d94fdf016299bb30ba231ef087ab9f51a7ed6d0bdc25",
    "formal_fallacies": "4c1adb664821157faade1d4153685403afcc02648f3c180a608a18f17f589629",
    "geometric_shapes": "07be68a124420caa2ebc0b2c858ad79fc55c5c8806170e496e1e17ebfb11f31c",
    "hyperbaton": "b6d7f55c75f5d02f2987a4f3123802dfa093872089a56a334144aae8a7264fdc",
    "logical_deduction_five_objects": "d2df31394b903b7f0e085d42a69572a092987856eac076799017d70ef266fa8f",
    "logical_deduction_seven_objects": "2896c7e3482eea318dd37bcc370d24ec3cc91e8374c1784287b5dbd38a529e33",
    "logical_deduction_three_objects": "e590fae72e3a6041fbd23bd8ff6b74baf44ca563f6ba40a041c55e7b867c1681",
    "movie_recommendation": "a8b53a87ee21a865b7248e694f388a9b8f7cf6b839b11d44796a2dd3fc088983",
    "multistep_arithmetic_two": "c9d5a6433c9b78256422a15c78463949c8bec8d85607aa28b52d7234ad4a8595",
    "navigate": "b7944dfd3c81da5c4815bd75b00d6fa3c64140823498e78ed496f4c3d36f7f0d",
    "object_counting": "8acef14dbbdd40d2326ef7755750b6b5fe919fef06276af1bab3f1c297f022ff",
    "penguins_in_a_table": "bb87ee449698eee51215e025a453b1bcb2f5e6589c2063b2c79e68b8f0655228",
    "reasoning_about_colored_objects": "0a8850cf95166020fce7a78244026ceedd7ea839302471512b4f8744e85a6a49",
    "ruin_names": "b6f723aef2bafdd4c7bfc3c7e0329c7e8a8279391a609969c8ed76c9319f5f7f",
    "salient_translation_error_detection": "becf3eb8dd53c821a555ecd5c1334ecd93eb25f980e63be963c518e7138de5da",
    "snarks": "54a0661fe2de06167645a4965e6bcf963c4ba307e76262a7c750998b0e3d0d0e",
    "sports_understanding": "63ca262858f6176864515cd8cf53cdaa40839ebecc155b726d77930855d167bf",
    "temporal_sequences": "92a1189faaa84aacc4c405aaa13f13f48c2992eb884772eedb622505252baef5",
    "tracking_shuffled_objects_five_objects": "2063a46a4fb484236ed4310523606543a3e1dd4a4dc34eda65d407910ece25a5",
    "tracking_shuffled_objects_seven_objects": "b59fd05b850c37cf57cb514ae1e6975c00b1638ade2291722056b2af3c54084d",
    "tracking_shuffled_objects_three_objects": "546cc7bf10c6a01a6a4c17ae28a4966485f21f29fd5d111f37858ec78e354f6b",
    "web_of_lies": "3e60323f8514a107fdb4edf35f8832a9171c5a09c0eaa47823559de905e8ab8b",
    "word_sorting": "2a6132d2c99f00d0d2eb1113ac6b4a918bd969d863c48749210d969713db8d43",
}

BBH_TASKS = sorted(BBH_SHA256)

ORIGINALS: dict[str, Original] = {
    "gsm8k-train": Original("gsm8k/train.jsonl.gz", *GSM8K[:2], GSM8K[2] + "train.jsonl",
                            "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", "MIT"),
    "gsm8k-test": Original("gsm8k/test.jsonl.gz", *GSM8K[:2], GSM8K[2] + "test.jsonl",
                           "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", "MIT"),
    "codegen": Original("gpteacher/codegen-instruct.json.gz", *GPTEACHER, "Codegen/codegen-instruct.json",
                        "8b0be81f22b86bccab30f573351b62efb3391da229d2ee817a65ce0abb08b29d", "MIT"),
    "roleplay": Original("gpteacher/roleplay-instruct.json.gz", *GPTEACHER,
                         "Roleplay/roleplay-simple-deduped-roleplay-instruct.json",
                         "b5d57a0d92162fd0b78988fe352e8512b435363919caf63efc3759d5a1555023", "MIT"),
    "harmless": Original("hh-rlhf/harmless-base-test.jsonl.gz", "anthropics/hh-rlhf", "354e5c3c",
                         "harmless-base/test.jsonl.gz",
                         "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03", "MIT"),
    "truthfulqa": Original("truthfulqa/TruthfulQA.csv.gz", "benedictflorance/truthfulqa_experiments", "6fdfd382",
                           "datasets/TruthfulQA.csv",
                           "99d6ae7755e3b435eade956068c9de7c0c474770344237aeb66b56519ba4b697", "Apache-2.0"),
    **{f"bbh-{task}": Original(f"bbh/{task}.json.gz", "suzgunmirac/BIG-Bench-Hard", "9ee07bd4",
                               f"bbh/{task}.json", BBH_SHA256[task], "MIT") for task in BBH_TASKS},
}

LICENCE_FOLDER = {"gsm8k": "gsm8k", "codegen": "gpteacher", "roleplay": "gpteacher", "harmless": "hh-rlhf",
                  "bbh": "bbh"}
"""Where each shipped set's MIT licence lies under --src; truthfulqa's Apache-2.0 text is tools/licences/."""

TEST_SHARE = {"codegen": 10, "roleplay": 10, "harmless": 5}
"""1/N of the rows go to the test split: those whose sha256 (of the JSON line) is 0 modulo N."""


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _jsonl(rows: list[bytes]) -> bytes:
    return b"".join(row + b"\n" for row in rows)


def _is_test(line: bytes, share: int) -> bool:
    return int(hashlib.sha256(line).hexdigest()[:8], 16) % share == 0


def build(src: Path, out: Path) -> dict:
    """Write every set under OUT from the originals under SRC; returns the manifest (also written)."""
    files: dict[str, bytes] = {}  # path under OUT -> uncompressed bytes
    origins: dict[str, list[str]] = {}
    for split in ("train", "test"):
        key = f"gsm8k-{split}"
        files[f"gsm8k/{split}.jsonl"] = _jsonl(ORIGINALS[key].read(src).splitlines())
        origins.setdefault("gsm8k", []).append(key)
    for name in ("codegen", "roleplay", "harmless"):
        original = ORIGINALS[name].read(src)
        if name == "harmless":  # JSON lines already: keep each line's bytes
            lines = [line for line in original.splitlines() if line.strip()]
        else:  # a JSON list: one compact JSON object per line, fields in their original order
            lines = [json.dumps(row, ensure_ascii=False).encode() for row in json.loads(original)]
        test = [line for line in lines if _is_test(line, TEST_SHARE[name])]
        train = [line for line in lines if not _is_test(line, TEST_SHARE[name])]
        files[f"{name}/train.jsonl"], files[f"{name}/test.jsonl"] = _jsonl(train), _jsonl(test)
        origins[name] = [name]
    for task in BBH_TASKS:
        files[f"bbh/{task}.json"] = ORIGINALS[f"bbh-{task}"].read(src)  # keeps the canary string
        origins.setdefault("bbh", []).append(f"bbh-{task}")
    files["truthfulqa/TruthfulQA.csv"] = ORIGINALS["truthfulqa"].read(src)
    origins["truthfulqa"] = ["truthfulqa"]

    licences = {f"{name}/LICENSE": (src / folder / "LICENSE").read_bytes() for name, folder in LICENCE_FOLDER.items()}
    licences["truthfulqa/LICENSE"] = (b"TruthfulQA (Stephanie Lin, Jacob Hilton, Owain Evans; "
                                      b"https://github.com/sylinrl/TruthfulQA) is released under the Apache "
                                      b"License 2.0:\n\n" + APACHE_2.read_bytes())
    manifest = {"sets": {name: {"origin": [ORIGINALS[k].card() for k in keys], "files": {}}
                         for name, keys in origins.items()}}
    for rel, data in sorted(files.items()):
        name = rel.split("/")[0]
        rows = _count_rows(rel, data)
        manifest["sets"][name]["files"][rel.split("/", 1)[1] + ".gz"] = {
            "rows": rows, "sha256": hashlib.sha256(data).hexdigest()}
        _write(out / (rel + ".gz"), _gzip(data))
    for rel, data in licences.items():
        _write(out / rel, data)
    _write(out / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def _count_rows(rel: str, data: bytes) -> int:
    if rel.endswith(".jsonl"):
        return len(data.splitlines())
    if rel.endswith(".csv"):
        import csv
        import io

        return len(list(csv.DictReader(io.StringIO(data.decode("utf-8")))))
    return len(json.loads(data)["examples"])


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder of the gzipped originals (default: ../shared/data)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (default: %(default)s)")
    args = parser.parse_args()
    if not args.src.is_dir():
        sys.exit(f"build_sets: --src {args.src}: not a folder, expected the gzipped original files")
    manifest = build(args.src, args.out)
    for name, entry in manifest["sets"].items():
        rows = ", ".join(f"{f} {v['rows']}" for f, v in entry["files"].items())
        print(f"{name}: {rows}")


if __name__ == "__main__":
    main()
