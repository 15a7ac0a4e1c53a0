"""Small local copies of Shen et al.'s four datasets, written by the tests in the forms
docs/datasets.md accepts (AG News as the Kaggle CSV's columns; CB, SST-2 and RTE as JSON Lines
with the datasets' own field names and label conventions). The sentences are generated: they
exercise the loaders, the splits and the config, not the science."""

from __future__ import annotations

import csv
import json
from pathlib import Path

SUBJECTS = ["the council", "a striker", "the bank", "a new chip", "the minister", "the coach",
            "an airline", "the lab", "a court", "the league", "a startup", "the satellite"]
VERBS = ["announced", "rejected", "celebrated", "delayed", "questioned", "praised"]


def _sentence(i: int) -> str:
    return f"{SUBJECTS[i % 12]} {VERBS[(i // 12) % 6]} plan number {i}"


def write_shen_copies(root: str | Path, n: int = 1300) -> dict[str, Path]:
    """``{name: path}`` of the four copies under ``root`` (``n`` rows each)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"agnews": root / "ag_news.csv", "cb": root / "cb.jsonl",
             "sst2": root / "sst2.jsonl", "rte": root / "rte.jsonl"}
    with open(paths["agnews"], "w", newline="") as f:  # the Kaggle copy: 1-based Class Index
        w = csv.writer(f)
        w.writerow(["Class Index", "Title", "Description"])
        for i in range(n):
            w.writerow([i % 4 + 1, f"Headline {i}", _sentence(i)])
    cb = ["entailment", "contradiction", "neutral"]
    _jsonl(paths["cb"], ({"premise": _sentence(i), "hypothesis": f"it happened {i} times",
                          "label": cb[i % 3]} for i in range(n)))
    _jsonl(paths["sst2"], ({"sentence": f"{_sentence(i)} and it was "
                                        f"{'wonderful' if i % 2 else 'dreadful'}",
                            "label": i % 2} for i in range(n)))
    _jsonl(paths["rte"], ({"premise": _sentence(i), "hypothesis": f"plan {i} exists",
                           "label": i % 2} for i in range(n)))
    return paths


def _jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":  # python tests/anchor_copies.py DIR: for a run on a machine without them
    import sys

    print(write_shen_copies(sys.argv[1] if len(sys.argv) > 1 else "data/shen"))
