"""Loaders for the anchors' datasets (docs/science.md, Datasets) from a local copy.

These datasets live on a hub that icl-probe never contacts at run or test time. Point the
loader at a local copy instead: a JSONL/CSV/TSV file, a directory written by
``datasets.Dataset.save_to_disk``, or (``path=None``) the local ``datasets`` cache, read
with ``HF_DATASETS_OFFLINE=1``.

The templates follow Dai et al. (2023, Appendix, "Templates") as reproduced by later work;
*unverified* against their code: keep them easy to change (:data:`ANCHOR_DATASETS`).

>>> from icl_probe.tasks import load_anchor_dataset
>>> task = load_anchor_dataset("sst2", path="sst2_train.jsonl")     # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import TaskFileError


@dataclass(frozen=True)
class AnchorSpec:
    hub_id: str  # the dataset's hub id (config after a colon), for the local datasets cache
    text_fields: tuple[str, ...]  # one field, or (premise, hypothesis) for the NLI sets
    labels: tuple[str, ...]  # verbalizers, indexed by the integer label
    template: str
    pair_format: str | None = None  # how premise/hypothesis become one x


ANCHOR_DATASETS: dict[str, AnchorSpec] = {
    "sst2": AnchorSpec("glue:sst2", ("sentence",), ("negative", "positive"),
                       "Sentence: {x}\nLabel: {y}\n\n"),
    "sst5": AnchorSpec("SetFit/sst5", ("text",),
                       ("terrible", "bad", "neutral", "good", "great"),
                       "Sentence: {x}\nLabel: {y}\n\n"),
    "mr": AnchorSpec("rotten_tomatoes", ("text",), ("negative", "positive"),
                     "Review: {x}\nSentiment: {y}\n\n"),
    "subj": AnchorSpec("SetFit/subj", ("text",), ("objective", "subjective"),
                       "Input: {x}\nType: {y}\n\n"),
    "agnews": AnchorSpec("ag_news", ("text",), ("World", "Sports", "Business", "Technology"),
                         "Article: {x}\nAnswer: {y}\n\n"),
    "cb": AnchorSpec("super_glue:cb", ("premise", "hypothesis"), ("true", "false", "neither"),
                     "{x}\nAnswer: {y}\n\n",
                     "{premise}\nQuestion: {hypothesis} true, false, or neither?"),
    "rte": AnchorSpec("super_glue:rte", ("premise", "hypothesis"), ("true", "false"),
                      "{x}\nAnswer: {y}\n\n", "{premise}\nQuestion: {hypothesis} true or false?"),
}


def _rows_from_file(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield lineno, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise TaskFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for i, row in enumerate(reader, start=2):  # line 1 is the header
                yield i, row
        else:
            raise TaskFileError(f"{path}: expected a .jsonl, .csv or .tsv file")


def _rows_from_datasets(name: str, spec: AnchorSpec, path: Path | None,
                        split: str) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets comes with transformer-lens
        raise TaskFileError("reading a datasets copy needs `pip install datasets`") from e
    if path is not None:
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise TaskFileError(f"{path}: no split {split!r}; it has {list(ds)}")
            ds = ds[split]
    else:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        hub, _, config = spec.hub_id.partition(":")
        try:
            ds = datasets.load_dataset(hub, config or None, split=split)
        except Exception as e:
            raise TaskFileError(
                f"load_anchor_dataset({name!r}): {spec.hub_id} split {split!r} is not in the "
                "local datasets cache and icl-probe never downloads at run time. Fix: download "
                "it on a machine with internet and pass path= a save_to_disk directory or a "
                f"JSONL/CSV file. ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from e
    for i, row in enumerate(ds):
        yield i, dict(row)


def load_anchor_dataset(name: str, path: str | Path | None = None, *, split: str = "train",
                        limit: int | None = None):
    """An anchor dataset (``sst2``, ``sst5``, ``mr``, ``subj``, ``agnews``, ``cb``, ``rte``)
    as a :class:`~icl_probe.tasks.Task` with Dai et al.'s template and verbalizers.

    Rows need the dataset's text field(s) (``sentence`` / ``text`` / ``premise`` +
    ``hypothesis``) and ``label``: an integer index into the verbalizers, or the verbalizer
    itself. Rows labelled -1 (unlabelled test splits) are skipped.
    """
    from . import Item, Task

    key = name.lower().replace("-", "").replace("_", "")
    if key not in ANCHOR_DATASETS:
        raise TaskFileError(
            f"load_anchor_dataset({name!r}): unknown dataset; expected one of "
            f"{sorted(ANCHOR_DATASETS)}"
        )
    spec = ANCHOR_DATASETS[key]
    p = Path(path).expanduser() if path is not None else None
    if p is not None and not p.exists():
        raise TaskFileError(f"load_anchor_dataset({name!r}): {p} does not exist")
    rows = _rows_from_file(p) if p is not None and p.is_file() else _rows_from_datasets(
        key, spec, p, split)
    where = str(p) if p is not None else spec.hub_id
    items: list[Item] = []
    seen: set[str] = set()
    for lineno, row in rows:
        missing = [f for f in (*spec.text_fields, "label") if f not in row]
        if missing:
            raise TaskFileError(
                f"{where}:{lineno}: missing field(s) {missing}; a {key} row needs "
                f"{list(spec.text_fields) + ['label']}, got {sorted(row)}"
            )
        label = row["label"]
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        if label == -1:
            continue
        if isinstance(label, int):
            if not 0 <= label < len(spec.labels):
                raise TaskFileError(
                    f"{where}:{lineno}: label {label} out of range for {key} "
                    f"(0..{len(spec.labels) - 1})"
                )
            y = spec.labels[label]
        elif isinstance(label, str) and label in spec.labels:
            y = label
        else:
            raise TaskFileError(
                f"{where}:{lineno}: label {label!r} is neither an index nor one of {spec.labels}"
            )
        if spec.pair_format is not None:
            x = spec.pair_format.format(**{f: str(row[f]).strip() for f in spec.text_fields})
        else:
            x = " ".join(str(row[spec.text_fields[0]]).split())
        if not x or x in seen:
            continue
        seen.add(x)
        items.append(Item(x, y))
        if limit is not None and len(items) >= limit:
            break
    return Task(name=key, items=tuple(items), labels=spec.labels, template=spec.template,
                description=f"{key} ({spec.hub_id}), Dai et al. template", source=where,
                path=str(p) if p is not None else None)
