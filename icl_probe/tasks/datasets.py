"""Load the anchors' datasets (docs/science.md, Datasets) from a local copy into a ``Task``.

These datasets live on a hub that icl-probe never contacts at run or test time. Point the
loader at a local copy instead: a JSONL/CSV/TSV file, a directory written by
``datasets.Dataset.save_to_disk``, or (``path=None``) the local ``datasets`` cache, read
with ``HF_DATASETS_OFFLINE=1``. The accepted file forms, the label names of each dataset and
how labels map to Dai et al.'s verbalizers are documented in ``docs/datasets.md``; every form
that is not accepted is refused with a :class:`~icl_probe.errors.TaskFileError` that names the
file, what was wrong and the expected format. Nothing is guessed silently: files are read as
UTF-8 only, TSV without quote processing, and an integer label's index base (0 or 1) is read
off the data by one rule (:func:`_index_base`).

The templates follow Dai et al. (2023, Appendix, "Templates") as reproduced by later work;
*unverified* against their code: keep them easy to change (:data:`ANCHOR_DATASETS`).

>>> from icl_probe.tasks import load_anchor_dataset
>>> task = load_anchor_dataset("sst2", path="sst2_train.jsonl")     # doctest: +SKIP
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import datasets

from ..errors import TaskFileError
from .task import Item, Task

DOC = "docs/datasets.md"


@dataclass(frozen=True)
class AnchorSpec:
    hub_id: str  # the dataset's hub id (config after a colon), for the local datasets cache
    text_fields: tuple[str, ...]  # one field, or (premise, hypothesis) for the NLI sets
    labels: tuple[str, ...]  # verbalizers, indexed by the integer label
    template: str
    pair_format: str | None = None  # how premise/hypothesis become one x
    # The dataset's own label names (lower case) -> verbalizer index; the verbalizers
    # themselves are accepted too. Matching is case-insensitive.
    label_names: Mapping[str, int] = field(default_factory=dict, hash=False)
    # Fields joined with one space into the text when ``text_fields`` are absent
    # (AG News distributed as class index, title, description).
    alt_text_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, i in self.label_names.items():
            if name != name.lower() or not 0 <= i < len(self.labels):
                raise ValueError(f"{self.hub_id}: bad label name entry {name!r} -> {i}")
        for i, verbalizer in enumerate(self.labels):
            if self.label_names.get(verbalizer.lower(), i) != i:
                raise ValueError(f"{self.hub_id}: label name {verbalizer!r} maps to two indices")

    def label_index(self, name: str) -> int | None:
        """The verbalizer index of a label name or verbalizer (case-insensitive), or None."""
        key = name.strip().lower()
        if key in self.label_names:
            return self.label_names[key]
        lowered = [v.lower() for v in self.labels]
        return lowered.index(key) if key in lowered else None

    def accepted_names(self) -> list[str]:
        return list(dict.fromkeys([*self.label_names, *(v.lower() for v in self.labels)]))


ANCHOR_DATASETS: dict[str, AnchorSpec] = {
    "sst2": AnchorSpec("glue:sst2", ("sentence",), ("negative", "positive"),
                       "Sentence: {x}\nLabel: {y}\n\n",
                       label_names={"negative": 0, "positive": 1, "neg": 0, "pos": 1}),
    "sst5": AnchorSpec("SetFit/sst5", ("text",),
                       ("terrible", "bad", "neutral", "good", "great"),
                       "Sentence: {x}\nLabel: {y}\n\n",
                       label_names={"very negative": 0, "negative": 1, "neutral": 2,
                                    "positive": 3, "very positive": 4}),
    "mr": AnchorSpec("rotten_tomatoes", ("text",), ("negative", "positive"),
                     "Review: {x}\nSentiment: {y}\n\n",
                     label_names={"negative": 0, "positive": 1, "neg": 0, "pos": 1}),
    "subj": AnchorSpec("SetFit/subj", ("text",), ("objective", "subjective"),
                       "Input: {x}\nType: {y}\n\n",
                       label_names={"objective": 0, "subjective": 1}),
    "agnews": AnchorSpec("ag_news", ("text",), ("World", "Sports", "Business", "Technology"),
                         "Article: {x}\nAnswer: {y}\n\n",
                         label_names={"world": 0, "sports": 1, "business": 2, "sci/tech": 3},
                         alt_text_fields=("title", "description")),
    "cb": AnchorSpec("super_glue:cb", ("premise", "hypothesis"), ("true", "false", "neither"),
                     "{x}\nAnswer: {y}\n\n",
                     "{premise}\nQuestion: {hypothesis} true, false, or neither?",
                     label_names={"entailment": 0, "contradiction": 1, "neutral": 2}),
    "rte": AnchorSpec("super_glue:rte", ("premise", "hypothesis"), ("true", "false"),
                      "{x}\nAnswer: {y}\n\n", "{premise}\nQuestion: {hypothesis} true or false?",
                      label_names={"entailment": 0, "not_entailment": 1}),
}

LABEL_COLUMNS = ("label", "class index")  # "Class Index": AG News as distributed on Kaggle
# A first CSV/TSV row holding one of these names (case-insensitive) is a header.
KNOWN_COLUMNS = frozenset({*LABEL_COLUMNS, "sentence", "text", "premise", "hypothesis", "title",
                           "description", "idx", "index", "label_text", "sentence1",
                           "sentence2"})


@dataclass(frozen=True)
class _Row:
    loc: str  # "file:line" or "source row i", for messages
    texts: tuple[str, ...]  # one per spec.text_fields
    label: int | str  # an integer class index (base not yet known) or a label name


# ---------------------------------------------------------------- reading local files

def _decode(path: Path) -> str:
    """The file's text as UTF-8, a leading byte-order mark removed; never a guessed encoding."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        line = raw.count(b"\n", 0, offset) + 1
        raise TaskFileError(
            f"{path}: not UTF-8: byte {raw[offset]:#04x} at byte offset {offset} (line {line}) "
            "is not valid UTF-8. Anchor datasets are read as UTF-8 only (a BOM is allowed) and "
            "the encoding is never guessed; convert the file to UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}` for a Latin-1 file"
        ) from None


def _lines(text: str) -> Iterable[tuple[int, str]]:
    """(line number, line) for each non-blank line; lines end at '\\n' only."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield lineno, line


def _jsonl_rows(path: Path, text: str, spec: AnchorSpec, key: str) -> list[_Row]:
    rows = []
    for lineno, line in _lines(text):
        loc = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{loc}: not valid JSON ({e.msg}); expected one JSON object "
                                "per line (JSON Lines)") from e
        if not isinstance(obj, dict):
            raise TaskFileError(f"{loc}: expected a JSON object per line, got "
                                f"{type(obj).__name__}")
        rows.append(_row_from_mapping(loc, obj, spec, key))
    return rows


def _tsv_records(text: str) -> list[tuple[int, list[str]]]:
    """TSV without quote processing: one line is one row, fields split on tabs."""
    return [(lineno, line.split("\t")) for lineno, line in _lines(text)]


def _csv_records(path: Path, text: str) -> list[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records = []
    start = 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as e:
        raise TaskFileError(f"{path}:{start}: malformed CSV ({e}); fields holding commas, "
                            "quotes or newlines must be quoted with '\"' (a quote inside "
                            "one doubled)") from None
    return records


def _table_rows(path: Path, records: list[tuple[int, list[str]]], spec: AnchorSpec, key: str,
                kind: str) -> tuple[list[_Row], int | None]:
    """Rows of a CSV/TSV (with a header, or one of the headerless forms), and the index base
    the format fixes (None: read it off the data)."""
    if not records:
        raise TaskFileError(f"{path}: no rows")
    lineno, first = records[0]
    if any(c.strip().lower() in KNOWN_COLUMNS for c in first):
        header = [c.strip().lower() for c in first]
        rows = []
        for lineno, cells in records[1:]:
            _check_width(path, lineno, cells, len(header), f"the header's columns {header}",
                         kind)
            rows.append(_row_from_mapping(f"{path}:{lineno}", dict(zip(header, cells)), spec,
                                          key))
        return rows, None
    if kind == "TSV":
        return _headerless_tsv(path, records, spec, key), None
    if key == "agnews":
        return _headerless_agnews_csv(path, records), 1
    raise TaskFileError(
        f"{path}:{lineno}: the first line is not a header (no column named "
        f"{' / '.join(spec.text_fields)} / label) and a headerless CSV is only read for agnews "
        "(the original AG News csv: class index 1-4, title, description). Expected: a CSV/TSV "
        f"whose header names {list(spec.text_fields) + ['label']}, a headerless TSV "
        f"{'<TAB>'.join(spec.text_fields)}<TAB>label, or JSONL; see {DOC}")


def _check_width(path: Path, lineno: int, cells: list[str], width: int, what: str,
                 kind: str) -> None:
    if len(cells) != width:
        note = (" (a TSV is read without quote processing: one line is one row and a field "
                "cannot hold a tab)" if kind == "TSV" else "")
        raise TaskFileError(f"{path}:{lineno}: {len(cells)} fields, expected {width} "
                            f"({what}){note}")


def _headerless_tsv(path: Path, records: list[tuple[int, list[str]]], spec: AnchorSpec,
                    key: str) -> list[_Row]:
    columns = [*spec.text_fields, "label"]
    rows = []
    for lineno, cells in records:
        _check_width(path, lineno, cells, len(columns),
                     f"a headerless {key} TSV is {'<TAB>'.join(columns)}", "TSV")
        loc = f"{path}:{lineno}"
        rows.append(_Row(loc, tuple(cells[:-1]), _parse_label(cells[-1], loc, spec, key)))
    return rows


def _headerless_agnews_csv(path: Path, records: list[tuple[int, list[str]]]) -> list[_Row]:
    """The original AG News distribution: class index 1-4, title, description; no header."""
    expected = ("a headerless AG News CSV is the original distribution: class index (1-4), "
                "title, description; otherwise give a header naming the columns, e.g. "
                f"label,text (see {DOC})")
    rows = []
    for lineno, cells in records:
        _check_width(path, lineno, cells, 3, expected, "CSV")
        if not _is_int(cells[0]):
            raise TaskFileError(f"{path}:{lineno}: first field {cells[0]!r} is not an integer "
                                f"class index; {expected}")
        text = " ".join(c.strip() for c in cells[1:])
        rows.append(_Row(f"{path}:{lineno}", (text,), int(cells[0])))
    return rows


def _rows_from_file(path: Path, spec: AnchorSpec, key: str) -> tuple[list[_Row], int | None]:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise TaskFileError(f"{path}: expected a .jsonl, .csv or .tsv file (or a "
                            f"save_to_disk directory); see {DOC}")
    text = _decode(path)
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path, text, spec, key), None
    if suffix == ".tsv":
        return _table_rows(path, _tsv_records(text), spec, key, "TSV")
    return _table_rows(path, _csv_records(path, text), spec, key, "CSV")


# ------------------------------------------------------------------- fields and labels

def _is_int(value: str) -> bool:
    s = value.strip()
    return s.removeprefix("-").isdigit() and s.isascii()


def _parse_label(value: Any, loc: str, spec: AnchorSpec, key: str) -> int | str:
    """An integer class index (digit strings included) or a stripped label name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return int(value) if _is_int(value) else value.strip()
    raise TaskFileError(f"{loc}: label {value!r} is neither an integer class index nor a label "
                        f"name of {key} ({spec.accepted_names()})")


def _row_from_mapping(loc: str, mapping: Mapping[str, Any], spec: AnchorSpec,
                      key: str) -> _Row:
    row = {str(k).strip().lower(): v for k, v in mapping.items()}
    label_column = next((c for c in LABEL_COLUMNS if c in row), None)
    if all(f in row for f in spec.text_fields):
        fields = spec.text_fields
    elif spec.alt_text_fields and all(f in row for f in spec.alt_text_fields):
        fields = spec.alt_text_fields
    else:
        fields = None
    if fields is None or label_column is None:
        needs = list(spec.text_fields) + ["label"]
        alt = f" (or {' + '.join(spec.alt_text_fields)})" if spec.alt_text_fields else ""
        missing = [f for f in needs if f not in row] if fields is None else ["label"]
        raise TaskFileError(f"{loc}: missing field(s) {missing}; a {key} row needs {needs}"
                            f"{alt}, got {sorted(row)}; see {DOC}")
    bad = [f for f in fields if not isinstance(row[f], str)]
    if bad:
        raise TaskFileError(f"{loc}: field {bad[0]!r} is {row[bad[0]]!r}, expected a string")
    texts = tuple(row[f] for f in fields)
    if fields == spec.alt_text_fields:
        texts = (" ".join(t.strip() for t in texts),)
    return _Row(loc, texts, _parse_label(row[label_column], loc, spec, key))


def _index_base(rows: list[_Row], spec: AnchorSpec, source: str, key: str,
                known_base: int | None) -> int:
    """0 or 1: the base of the integer labels (-1, unlabelled, aside), read off the data.

    1-based if the labels lie in 1..n, include n and never 0; 0-based if they lie in
    0..n-1; anything else is refused. A format that fixes the base (``known_base``, the
    original AG News CSV) only checks the range."""
    n = len(spec.labels)
    found = sorted({r.label for r in rows if isinstance(r.label, int) and r.label != -1})
    if not found:
        return 0
    shown = found if len(found) <= 12 else [*found[:6], "...", *found[-6:]]
    if known_base is not None:
        if found[0] >= known_base and found[-1] <= known_base + n - 1:
            return known_base
        raise TaskFileError(
            f"{source}: integer labels {shown} found; this format's class indices are "
            f"{known_base}..{known_base + n - 1} ({key}: {list(spec.labels)})")
    if found[0] >= 1 and found[-1] == n:
        return 1
    if found[0] >= 0 and found[-1] <= n - 1:
        return 0
    raise TaskFileError(
        f"{source}: integer labels {shown} found; {key} has {n} classes "
        f"({list(spec.labels)}), so its integer labels must all lie in 0..{n - 1} (0-based) "
        f"or all in 1..{n} (1-based, with {n} present); -1 marks an unlabelled row. "
        f"See {DOC}")


def _verbalizer(row: _Row, spec: AnchorSpec, base: int, key: str) -> str:
    if isinstance(row.label, int):
        return spec.labels[row.label - base]
    index = spec.label_index(row.label)
    if index is None:
        raise TaskFileError(
            f"{row.loc}: unknown label name {row.label!r} for {key}; accepted names "
            f"(case-insensitive): {spec.accepted_names()}, or an integer class index")
    return spec.labels[index]


def _x(row: _Row, spec: AnchorSpec) -> str:
    if spec.pair_format is not None:
        return spec.pair_format.format(
            **{f: t.strip() for f, t in zip(spec.text_fields, row.texts)})
    return " ".join(row.texts[0].split())


# --------------------------------------------------------------- datasets copies/cache

def _check_saved_directory(path: Path) -> None:
    if not path.is_dir():
        raise TaskFileError(f"{path}: neither a regular file nor a directory; expected a "
                            f".jsonl/.csv/.tsv file or a save_to_disk directory; see {DOC}")
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if any((path / m).is_file() for m in markers):
        return
    entries = sorted(p.name for p in path.iterdir())
    data = [e for e in entries if Path(e).suffix.lower() in (".jsonl", ".json", ".csv", ".tsv")]
    hint = (f" It holds data file(s) {data[:8]}: pass one of them as path=." if data else "")
    raise TaskFileError(
        f"{path}: a directory is read as a `datasets` save_to_disk copy, but it has none of "
        "dataset_info.json / state.json (a saved Dataset, next to its .arrow files) or "
        "dataset_dict.json with one folder per split (a saved DatasetDict); it contains "
        f"{entries[:8]}.{hint} A single JSONL/CSV/TSV file also works; see {DOC}")


def _load_datasets_copy(name: str, spec: AnchorSpec, path: Path | None, split: str) -> Any:
    if path is not None:
        _check_saved_directory(path)
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise TaskFileError(f"{path}: not a readable save_to_disk copy "
                                f"({type(e).__name__}: {str(e)[:200]})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise TaskFileError(f"{path}: no split {split!r}; it has {list(ds)}")
            ds = ds[split]
        return ds
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    hub, _, config = spec.hub_id.partition(":")
    try:
        return datasets.load_dataset(hub, config or None, split=split)
    except Exception as e:
        raise TaskFileError(
            f"load_anchor_dataset({name!r}): {spec.hub_id} split {split!r} is not in the "
            "local datasets cache and icl-probe never downloads at run time. Fix: download "
            "it on a machine with internet and pass path= a save_to_disk directory or a "
            f"JSONL/CSV file. ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e


def _rows_from_datasets(name: str, spec: AnchorSpec, path: Path | None, split: str,
                        where: str) -> list[_Row]:
    ds = _load_datasets_copy(name, spec, path, split)
    return [_row_from_mapping(f"{where} row {i}", dict(row), spec, name)
            for i, row in enumerate(ds)]


# ------------------------------------------------------------------------ entry point

def _check_limit(name: str, limit: Any) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise TaskFileError(f"load_anchor_dataset({name!r}): limit={limit!r}; expected a "
                            "positive integer (the most items to keep) or None (all items)")


def load_anchor_dataset(name: str, path: str | Path | None = None, *, split: str = "train",
                        limit: int | None = None):
    """An anchor dataset (``sst2``, ``sst5``, ``mr``, ``subj``, ``agnews``, ``cb``, ``rte``)
    as a :class:`~icl_probe.tasks.Task` with Dai et al.'s template and verbalizers.

    Rows need the dataset's text field(s) (``sentence`` / ``text`` / ``premise`` +
    ``hypothesis``) and ``label``: an integer class index (0- or 1-based, read off the data)
    or a label name (the dataset's own, e.g. ``entailment``, or the verbalizer). Rows
    labelled -1 (unlabelled test splits) and repeated or empty texts are skipped; ``limit``
    keeps the first ``limit`` items. Accepted forms: ``docs/datasets.md``.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ANCHOR_DATASETS:
        raise TaskFileError(
            f"load_anchor_dataset({name!r}): unknown dataset; expected one of "
            f"{sorted(ANCHOR_DATASETS)}"
        )
    _check_limit(name, limit)
    spec = ANCHOR_DATASETS[key]
    p = Path(path).expanduser() if path is not None else None
    if p is not None and not p.exists():
        raise TaskFileError(f"load_anchor_dataset({name!r}): {p} does not exist")
    where = str(p) if p is not None else spec.hub_id
    if p is not None and p.is_file():
        rows, known_base = _rows_from_file(p, spec, key)
    else:
        rows, known_base = _rows_from_datasets(key, spec, p, split, where), None
    base = _index_base(rows, spec, where, key, known_base)
    items: list[Item] = []
    seen: set[str] = set()
    for row in rows:  # every row is checked, also past the limit
        if row.label == -1:
            continue
        y = _verbalizer(row, spec, base, key)
        x = _x(row, spec)
        if x and x not in seen and (limit is None or len(items) < limit):
            seen.add(x)
            items.append(Item(x, y))
    return Task(name=key, items=tuple(items), labels=spec.labels, template=spec.template,
                description=f"{key} ({spec.hub_id}), Dai et al. template", source=where,
                path=str(p) if p is not None else None)
