"""Shipped task files and task-file / dataset-copy loaders."""

import collections
import csv
import json

import pytest

import icl_probe as ip
from icl_probe.tasks import load_anchor_dataset

MIN_ITEMS = {"sentiment": 200, "topic": 200, "subjectivity": 200}


@pytest.mark.parametrize("name", ["sentiment", "topic", "subjectivity", "antonym", "capital", "en_fr", "plural",
                                  "past_tense"])
def test_shipped_task_sizes_and_balance(name):
    task = ip.load_task(name)
    assert task.name == name
    assert len(task) >= MIN_ITEMS.get(name, 100)
    assert len({it.x for it in task.items}) == len(task)
    if task.is_classification:
        counts = collections.Counter(it.y for it in task.items)
        assert set(counts) == set(task.labels) and len(set(counts.values())) == 1, counts


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


HEADER = json.dumps({"task": "t", "labels": ["no", "yes"]})


@pytest.mark.parametrize("lines, match", [
    ([HEADER, '{"x": "a", "y": "yes"}', '{"x": "b", "y": '], r"t\.jsonl:3: not valid JSON"),
    ([HEADER, '{"x": "a", "y": "maybe"}'], r"t\.jsonl:2: answer 'maybe' is not one of"),
    ([HEADER, '{"x": "a", "y": "yes"}', '{"x": "a", "y": "no"}'], r":3: duplicate input 'a' \(first on line 2\)"),
    (['{"x": "a", "y": "yes"}'], r":1: the first line must be the header"),
    ([HEADER, '{"x": "a"}'], r":2: an item must be"),
    ([json.dumps({"task": "t", "labels": None, "template": "{y} {x}"}), '{"x": "a", "y": "b"}'],
     r"must put '\{x\}' before"),
])
def test_malformed_task_files_name_file_and_line(tmp_path, lines, match):
    path = _write(tmp_path / "t.jsonl", lines)
    with pytest.raises(ip.TaskFileError, match=match):
        ip.load_task(str(path))


def test_unknown_task_lists_the_shipped_ones():
    with pytest.raises(ip.TaskFileError, match="capital"):
        ip.load_task("no_such_task")


def test_anchor_dataset_from_jsonl_and_csv(tmp_path):
    rows = [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0},
            {"sentence": "unlabelled", "label": -1}]
    path = _write(tmp_path / "sst2.jsonl", [json.dumps(r) for r in rows])
    task = load_anchor_dataset("sst2", path)
    assert [(it.x, it.y) for it in task.items] == [("a fine film", "positive"), ("dull", "negative")]
    assert task.template.startswith("Sentence: {x}")
    with open(tmp_path / "cb.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["premise", "hypothesis", "label"])
        w.writeheader()
        w.writerow({"premise": "It rained.", "hypothesis": "The ground is wet.", "label": "0"})
    cb = load_anchor_dataset("CB", tmp_path / "cb.csv")
    assert cb.items[0].x == "It rained.\nQuestion: The ground is wet. true, false, or neither?"
    assert cb.items[0].y == "true"
    bad = _write(tmp_path / "bad.jsonl", ['{"text": "x", "label": 0}'])
    with pytest.raises(ip.TaskFileError, match=r"bad\.jsonl:1: missing field"):
        load_anchor_dataset("sst2", bad)
    with pytest.raises(ip.TaskFileError, match="unknown dataset"):
        load_anchor_dataset("imdb", bad)


def test_anchor_dataset_from_a_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"text": ["world news today", "goal scored late"], "label": [0, 1]})})
    ds.save_to_disk(str(tmp_path / "ag"))
    task = load_anchor_dataset("agnews", tmp_path / "ag")
    assert [it.y for it in task.items] == ["World", "Sports"]
    with pytest.raises(ip.TaskFileError, match="no split 'test'"):
        load_anchor_dataset("agnews", tmp_path / "ag", split="test")
