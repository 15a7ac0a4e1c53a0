"""A task: items, a label set (verbalizers) and a template, read from a JSON Lines file.

A task file is JSON Lines. Line 1 is a header, every later line one item::

    {"task": "capital", "description": "...", "source": "...", "labels": null,
     "template": "Input: {x}\\nOutput: {y}\\n\\n"}
    {"x": "France", "y": "Paris"}

``labels`` lists the verbalizers of a classification task (every ``y`` must be one of them);
``null`` marks an open-ended task, whose answer set is the items' ``y`` values. ``template``
is optional (default :data:`DEFAULT_TEMPLATE`) and must contain ``{x}`` before ``{y}``.

>>> import icl_probe as ip
>>> task = ip.load_task("capital")
>>> task.name, len(task) >= 100, task.is_classification
('capital', True, False)
>>> ip.load_task("sentiment").labels
('negative', 'positive')
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import TaskFileError

DEFAULT_TEMPLATE = "Input: {x}\nOutput: {y}\n\n"
DATA_DIR = Path(__file__).parent / "data"
_HEADER_KEYS = {"task", "description", "source", "labels", "template", "split"}
SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.4, 0.2)  # train, dev; test gets the rest


@dataclass(frozen=True)
class Item:
    x: str
    y: str


@dataclass(frozen=True)
class Task:
    """A task: ``items``, ``labels`` (verbalizers; ``None`` for open-ended tasks) and the
    demonstration ``template``."""

    name: str
    items: tuple[Item, ...]
    labels: tuple[str, ...] | None = None
    template: str = DEFAULT_TEMPLATE
    description: str = ""
    source: str = ""
    path: str | None = None
    explicit_split: dict | None = None

    def __post_init__(self) -> None:
        where = self.path or f"task {self.name!r}"
        check_template(self.template, where)
        if not self.items:
            raise TaskFileError(f"{where}: the task has no items")
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise TaskFileError(f"{where}: duplicate labels in {list(self.labels)}")
            bad = [it.y for it in self.items if it.y not in self.labels]
            if bad:
                raise TaskFileError(
                    f"{where}: answer {bad[0]!r} is not one of the labels {list(self.labels)}"
                )
        if self.explicit_split is not None:
            sp = self.explicit_split
            ok = set(sp) == set(SPLITS) and all(
                isinstance(v, (list, tuple)) and all(isinstance(i, int) and 0 <= i < len(self.items)
                                                     for i in v) for v in sp.values())
            flat = [i for v in sp.values() for i in v] if ok else []
            if not ok or len(flat) != len(set(flat)):
                raise TaskFileError(
                    f"{where}: 'split' must map each of {list(SPLITS)} to disjoint lists of item "
                    f"indices in 0..{len(self.items) - 1}")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def is_classification(self) -> bool:
        return self.labels is not None

    def split(self, name: str) -> tuple[int, ...]:
        """Item indices of the task's fixed split ``"train"`` (the demonstration pool),
        ``"dev"`` (held-out queries that choose a learning rate) or ``"test"`` (evaluation
        queries). The three are disjoint and cover every item.

        The rule, the same for every task and documented in ``docs/protocol.md``: items are
        grouped by answer label (classification) or kept as one group (open-ended), each
        group is shuffled with ``random.Random("icl-probe-split:" + task name)``, and its
        first 40 % go to train, the next 20 % to dev, the rest to test; each split keeps
        file order. A task file may instead name its split explicitly in the header:
        ``"split": {"train": [...], "dev": [...], "test": [...]}`` (item indices)."""
        if name not in SPLITS:
            raise TaskFileError(f"task {self.name!r}: split {name!r} is not one of {SPLITS}")
        return self.splits[name]

    @property
    def splits(self) -> dict[str, tuple[int, ...]]:
        if self.explicit_split is not None:
            return {k: tuple(v) for k, v in self.explicit_split.items()}
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(self.items):
            groups.setdefault(it.y if self.is_classification else "", []).append(i)
        rng = random.Random(f"icl-probe-split:{self.name}")
        out: dict[str, list[int]] = {s: [] for s in SPLITS}
        for idx in groups.values():
            idx = list(idx)
            rng.shuffle(idx)
            n_train = round(len(idx) * SPLIT_FRACTIONS[0])
            n_dev = round(len(idx) * SPLIT_FRACTIONS[1])
            out["train"] += idx[:n_train]
            out["dev"] += idx[n_train:n_train + n_dev]
            out["test"] += idx[n_train + n_dev:]
        return {k: tuple(sorted(v)) for k, v in out.items()}

    @property
    def answers(self) -> tuple[str, ...]:
        """The candidate answers: the labels, or every distinct ``y`` of an open-ended task
        (in order of first appearance)."""
        if self.labels is not None:
            return self.labels
        return tuple(dict.fromkeys(it.y for it in self.items))


def check_template(template: str, where: str) -> None:
    """A template holds exactly one ``{x}`` and one ``{y}``, in that order, and no other
    placeholder; a literal brace is written doubled (``{{`` / ``}}``)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise TaskFileError(f"{where}: template {template!r}: {e}; write a literal brace as "
                            "'{{' or '}}'") from None
    other = [f for f in fields if f not in ("x", "y")]
    if other:
        raise TaskFileError(f"{where}: template {template!r} has the placeholder {{{other[0]}}}; "
                            "only {x} and {y} are filled in (write a literal brace as '{{')")
    if fields.count("x") != 1 or fields.count("y") != 1:
        raise TaskFileError(
            f"{where}: template {template!r} must contain '{{x}}' and '{{y}}' exactly once, "
            "e.g. 'Input: {x}\\nOutput: {y}\\n\\n'"
        )
    if template.index("{x}") > template.index("{y}"):
        raise TaskFileError(f"{where}: template {template!r} must put '{{x}}' before '{{y}}'")


def shipped_tasks() -> list[str]:
    """Names of the task files shipped with icl-probe."""
    return sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))


def read_task_file(path: str | Path) -> Task:
    """Read and validate a task file; every error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist")
    header: dict | None = None
    items: list[Item] = []
    seen: dict[str, int] = {}
    raw_lines = path.read_bytes().splitlines()
    for lineno, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskFileError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise TaskFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if header is None:
            missing = {"task", "labels"} - obj.keys()
            unknown = obj.keys() - _HEADER_KEYS
            if missing or unknown:
                raise TaskFileError(
                    f"{where}: the first line must be the header with keys "
                    f"{sorted(_HEADER_KEYS)} ('task' and 'labels' required); "
                    f"missing {sorted(missing)}, unknown {sorted(unknown)}"
                )
            labels = obj["labels"]
            if labels is not None and (
                not isinstance(labels, list) or not all(isinstance(s, str) for s in labels)
            ):
                raise TaskFileError(f"{where}: 'labels' must be a list of strings or null")
            header = obj
            continue
        missing, unknown = sorted({"x", "y"} - set(obj)), sorted(set(obj) - {"x", "y"})
        if missing or unknown:
            raise TaskFileError(
                f"{where}: an item must be {{\"x\": str, \"y\": str}}, got keys {sorted(obj)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else ""))
        wrong = [k for k in ("x", "y") if not isinstance(obj[k], str)]
        if wrong:
            k = wrong[0]
            raise TaskFileError(
                f"{where}: {k!r} must be a string, got {type(obj[k]).__name__} {obj[k]!r}; quote "
                f"it: \"{k}\": \"{obj[k]}\"")
        if not obj["x"].strip() or not obj["y"].strip():
            raise TaskFileError(f"{where}: empty 'x' or 'y'")
        if obj["x"] in seen:
            raise TaskFileError(
                f"{where}: duplicate input {obj['x']!r} (first on line {seen[obj['x']]})"
            )
        if header["labels"] is not None and obj["y"] not in header["labels"]:
            raise TaskFileError(
                f"{where}: answer {obj['y']!r} is not one of the labels {header['labels']}"
            )
        seen[obj["x"]] = lineno
        items.append(Item(obj["x"], obj["y"]))
    if header is None:
        raise TaskFileError(f"{path}: empty file; expected a header line and items")
    return Task(
        name=header["task"],
        items=tuple(items),
        labels=tuple(header["labels"]) if header["labels"] is not None else None,
        template=header.get("template", DEFAULT_TEMPLATE),
        description=header.get("description", ""),
        source=header.get("source", ""),
        path=str(path),
        explicit_split=header.get("split"),
    )
