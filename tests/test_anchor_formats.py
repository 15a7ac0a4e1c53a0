"""The distribution forms of the anchor datasets that researchers hold (docs/datasets.md):
each loads with the right texts and labels, or is refused with a TaskFileError that names the
file and what was expected. Tiny files in tmp_path; no model, no network."""

from __future__ import annotations

import codecs
import json

import pytest

from icl_probe.errors import TaskFileError
from icl_probe.tasks import load_anchor_dataset


def _pairs(task):
    return [(it.x, it.y) for it in task.items]


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


# 1. TSV with quote characters: no quote processing, one line = one row ------------------

def test_tsv_with_quote_characters_reads_one_row_per_line(tmp_path):
    path = _write(tmp_path / "sst2.tsv", 'sentence\tlabel\n'
                  'it\'s a "great" film\t1\n'
                  '"not bad\t1\n'
                  'dull "plot\t0\n'
                  'a "so-so" "movie"\t0\n')
    task = load_anchor_dataset("sst2", path)
    assert len(task) == 4
    assert _pairs(task) == [('it\'s a "great" film', "positive"), ('"not bad', "positive"),
                            ('dull "plot', "negative"), ('a "so-so" "movie"', "negative")]


def test_tsv_row_with_wrong_number_of_fields_names_file_and_line(tmp_path):
    path = _write(tmp_path / "sst2.tsv", "sentence\tlabel\nfine\t1\ntab\tinside\t0\n")
    with pytest.raises(TaskFileError, match=r"sst2\.tsv:3: 3 fields, expected 2") as e:
        load_anchor_dataset("sst2", path)
    assert "without quote processing" in str(e.value)


# 2. AG News original distribution: headerless CSV, class index 1-4, title, description --

AG_ORIGINAL = ('"3","Wall St. Bears Claw Back","Reuters - Short-sellers are seeing green."\n'
               '"4","New chip, faster","A ""fast"" one"\n'
               '"1","Talks resume","Diplomats met on Monday."\n'
               '"2","Late goal","Home side wins."\n')


def test_agnews_original_headerless_csv(tmp_path):
    task = load_anchor_dataset("agnews", _write(tmp_path / "train.csv", AG_ORIGINAL))
    assert len(task) == 4
    assert _pairs(task) == [
        ("Wall St. Bears Claw Back Reuters - Short-sellers are seeing green.", "Business"),
        ('New chip, faster A "fast" one', "Technology"),
        ("Talks resume Diplomats met on Monday.", "World"),
        ("Late goal Home side wins.", "Sports"),
    ]


def test_agnews_original_csv_is_one_based_even_without_class_4(tmp_path):
    path = _write(tmp_path / "head.csv", '"3","A","b"\n"3","C","d"\n"1","E","f"\n')
    assert [it.y for it in load_anchor_dataset("agnews", path).items] == [
        "Business", "Business", "World"]


def test_agnews_original_csv_with_class_0_is_refused(tmp_path):
    path = _write(tmp_path / "bad.csv", '"0","A","b"\n"1","C","d"\n')
    with pytest.raises(TaskFileError, match=r"bad\.csv: integer labels \[0, 1\].*1\.\.4"):
        load_anchor_dataset("agnews", path)


def test_headerless_csv_without_integer_class_index_is_refused(tmp_path):
    path = _write(tmp_path / "ag.csv", '"World","A","b"\n')
    with pytest.raises(TaskFileError, match=r"ag\.csv:1: first field 'World' is not an "
                                            r"integer class index.*title, description"):
        load_anchor_dataset("agnews", path)
    path = _write(tmp_path / "sst2.csv", "a fine film,1\n")
    with pytest.raises(TaskFileError, match=r"sst2\.csv:1: the first line is not a header") as e:
        load_anchor_dataset("sst2", path)
    assert "headerless TSV" in str(e.value) and "JSONL" in str(e.value)


# 3. Header + integer labels: the index base is read off the data ------------------------

def test_agnews_with_header_and_one_based_labels(tmp_path):
    path = _write(tmp_path / "ag.csv", "label,text\n1,peace talks\n2,late goal\n"
                                       "3,stocks fall\n4,new chip\n")
    task = load_anchor_dataset("agnews", path)
    assert _pairs(task) == [("peace talks", "World"), ("late goal", "Sports"),
                            ("stocks fall", "Business"), ("new chip", "Technology")]


def test_agnews_with_header_and_zero_based_labels_is_unchanged(tmp_path):
    path = _write(tmp_path / "ag.csv", "text,label\npeace talks,0\nnew chip,3\nlate goal,1\n")
    assert _pairs(load_anchor_dataset("agnews", path)) == [
        ("peace talks", "World"), ("new chip", "Technology"), ("late goal", "Sports")]


def test_agnews_kaggle_header_class_index_title_description(tmp_path):
    path = _write(tmp_path / "kaggle.csv", '"Class Index","Title","Description"\n'
                                           '"3","Stocks","fall again"\n"4","Chip","is fast"\n')
    assert _pairs(load_anchor_dataset("agnews", path)) == [
        ("Stocks fall again", "Business"), ("Chip is fast", "Technology")]


def test_one_based_rule_applies_to_every_dataset(tmp_path):
    rows = [{"sentence": "a fine film", "label": 2}, {"sentence": "dull", "label": 1}]
    path = _write(tmp_path / "sst2.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert _pairs(load_anchor_dataset("sst2", path)) == [("a fine film", "positive"),
                                                         ("dull", "negative")]


@pytest.mark.parametrize("labels, shown", [("0,4", r"\[0, 4\]"), ("1,7", r"\[1, 7\]"),
                                           ("-2,1", r"\[-2, 1\]")])
def test_labels_fitting_neither_base_are_refused(tmp_path, labels, shown):
    a, b = labels.split(",")
    path = _write(tmp_path / "ag.csv", f"label,text\n{a},one\n{b},two\n")
    with pytest.raises(TaskFileError, match=rf"ag\.csv: integer labels {shown} found") as e:
        load_anchor_dataset("agnews", path)
    assert "0..3" in str(e.value) and "1..4" in str(e.value)


# 4. Label names: each dataset's own names map to Dai's verbalizers ----------------------

def test_headerless_tsv_with_agnews_label_names(tmp_path):
    path = _write(tmp_path / "ag.tsv", "peace talks\tWorld\nlate goal\tsports\n"
                                       "stocks fall\tBUSINESS\nnew chip\tSci/Tech\n"
                                       "faster chip\tTechnology\n")
    task = load_anchor_dataset("agnews", path)
    assert len(task) == 5
    assert _pairs(task) == [("peace talks", "World"), ("late goal", "Sports"),
                            ("stocks fall", "Business"), ("new chip", "Technology"),
                            ("faster chip", "Technology")]


def test_unknown_label_name_lists_the_accepted_names(tmp_path):
    path = _write(tmp_path / "ag.tsv", "peace talks\tWorld\nnew chip\tScience\n")
    with pytest.raises(TaskFileError, match=r"ag\.tsv:2: unknown label name 'Science'") as e:
        load_anchor_dataset("agnews", path)
    for name in ("world", "sports", "business", "sci/tech", "technology"):
        assert name in str(e.value)


def test_label_names_are_per_dataset(tmp_path):
    sst5 = _write(tmp_path / "sst5.tsv", "awful\tvery negative\nmeh\tnegative\nok\tneutral\n"
                                         "nice\tpositive\nsuperb\tVery Positive\n")
    assert [it.y for it in load_anchor_dataset("sst5", sst5).items] == [
        "terrible", "bad", "neutral", "good", "great"]
    cb = _write(tmp_path / "cb.tsv", "It rained.\tThe ground is wet.\tentailment\n"
                                     "It rained.\tIt was dry.\tcontradiction\n"
                                     "It rained.\tIt was Monday.\tneutral\n")
    task = load_anchor_dataset("cb", cb)
    assert [it.y for it in task.items] == ["true", "false", "neither"]
    assert task.items[1].x == "It rained.\nQuestion: It was dry. true, false, or neither?"
    mr = _write(tmp_path / "mr.jsonl", '{"text": "good", "label": "pos"}\n'
                                       '{"text": "bad", "label": "Negative"}\n')
    assert _pairs(load_anchor_dataset("mr", mr)) == [("good", "positive"), ("bad", "negative")]


# 5. SuperGLUE CB / RTE JSONL with string labels -----------------------------------------

def test_superglue_cb_jsonl_with_string_labels(tmp_path):
    rows = [{"premise": "P1", "hypothesis": "H1", "label": "contradiction", "idx": 0},
            {"premise": "P2", "hypothesis": "H2", "label": "entailment", "idx": 1},
            {"premise": "P3", "hypothesis": "H3", "label": "neutral", "idx": 2}]
    path = _write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_anchor_dataset("cb", path)
    assert _pairs(task) == [("P1\nQuestion: H1 true, false, or neither?", "false"),
                            ("P2\nQuestion: H2 true, false, or neither?", "true"),
                            ("P3\nQuestion: H3 true, false, or neither?", "neither")]


def test_superglue_rte_jsonl_with_string_labels(tmp_path):
    rows = [{"premise": "P1", "hypothesis": "H1", "label": "not_entailment", "idx": 0},
            {"premise": "P2", "hypothesis": "H2", "label": "entailment", "idx": 1}]
    path = _write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert _pairs(load_anchor_dataset("rte", path)) == [
        ("P1\nQuestion: H1 true or false?", "false"), ("P2\nQuestion: H2 true or false?", "true")]
    bad = _write(tmp_path / "bad.jsonl", json.dumps({**rows[0], "label": "neutral"}))
    with pytest.raises(TaskFileError, match=r"bad\.jsonl:1: unknown label name 'neutral'.*"
                                            r"not_entailment"):
        load_anchor_dataset("rte", bad)


# 6. Encodings: a UTF-8 BOM is stripped; anything not UTF-8 is refused -------------------

def test_utf8_bom_is_stripped_csv_and_jsonl(tmp_path):
    bom = codecs.BOM_UTF8.decode("utf-8")
    csv_path = _write(tmp_path / "ag.csv", bom + "label,text\n0,café talks\n3,new chip\n")
    assert _pairs(load_anchor_dataset("agnews", csv_path)) == [("café talks", "World"),
                                                               ("new chip", "Technology")]
    jsonl = _write(tmp_path / "sst2.jsonl", bom + '{"sentence": "fine", "label": 1}\n')
    assert _pairs(load_anchor_dataset("sst2", jsonl)) == [("fine", "positive")]


def test_latin1_file_is_refused_with_offset_and_iconv_hint(tmp_path):
    path = _write(tmp_path / "mr.csv", "text,label\ncafé,1\n", encoding="latin-1")
    with pytest.raises(TaskFileError, match=r"mr\.csv: not UTF-8") as e:
        load_anchor_dataset("mr", path)
    message = str(e.value)
    assert "byte 0xe9 at byte offset 14 (line 2)" in message
    assert "iconv -f latin1 -t utf-8" in message


# 7. A directory that is not a save_to_disk copy ------------------------------------------

def test_directory_that_is_not_a_save_to_disk_copy(tmp_path):
    folder = tmp_path / "CB"
    folder.mkdir()
    _write(folder / "train.jsonl", '{"premise": "p", "hypothesis": "h", "label": "neutral"}\n')
    _write(folder / "README", "SuperGLUE CB\n")
    with pytest.raises(TaskFileError, match=r"CB: a directory is read as a `datasets` "
                                            r"save_to_disk copy") as e:
        load_anchor_dataset("cb", folder)
    message = str(e.value)
    for words in ("dataset_info.json", "state.json", "dataset_dict.json", "train.jsonl",
                  "JSONL/CSV/TSV file also works"):
        assert words in message


# 8. limit ---------------------------------------------------------------------------------

@pytest.fixture
def three_rows(tmp_path):
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(["a", "b", "c"])]
    return _write(tmp_path / "sst2.jsonl", "\n".join(json.dumps(r) for r in rows))


@pytest.mark.parametrize("limit", [0, -1, 1.5, "2", True])
def test_bad_limit_is_refused(three_rows, limit):
    with pytest.raises(TaskFileError, match=r"limit=.*expected a positive integer"):
        load_anchor_dataset("sst2", three_rows, limit=limit)


@pytest.mark.parametrize("limit, n", [(1, 1), (2, 2), (3, 3), (10, 3), (None, 3)])
def test_limit_keeps_exactly_min_of_limit_and_available(three_rows, limit, n):
    task = load_anchor_dataset("sst2", three_rows, limit=limit)
    assert _pairs(task) == [("a", "negative"), ("b", "positive"), ("c", "negative")][:n]


# Ambiguous files are refused with the expected formats ------------------------------------

def test_file_without_recognizable_columns_is_refused(tmp_path):
    path = _write(tmp_path / "rte.tsv", "index\tsentence1\tsentence2\tlabel\n"
                                        "0\tP\tH\tentailment\n")
    with pytest.raises(TaskFileError, match=r"rte\.tsv:2: missing field\(s\) "
                                            r"\['premise', 'hypothesis'\]"):
        load_anchor_dataset("rte", path)
    path = _write(tmp_path / "sst2.txt", "a fine film\t1\n")
    with pytest.raises(TaskFileError, match=r"sst2\.txt: expected a \.jsonl, \.csv or \.tsv"):
        load_anchor_dataset("sst2", path)
