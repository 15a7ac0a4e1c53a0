"""ICL prompts and their zero-shot twins, built token piece by token piece (docs/science.md,
Notation).

Each demonstration is three pieces, tokenized separately and concatenated:

    "Input: {x}\\nOutput:"   " {y}"   "\\n\\n"
     └─ demo input ──────┘  └label┘  └ sep ┘

and the query is ``"Input: {x_q}\\nOutput:"``. Because pieces are tokenized on their own, the
zero-shot prompt's ids are exactly the suffix of the ICL prompt's ids (after BOS, where the
model uses one), and every span is exact.

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> pair = ip.build_prompt(model, ip.load_task("capital"), query=0, k=2, seed=0)
>>> bool((pair.icl_ids[-len(pair.zs_ids) + 1:] == pair.zs_ids[1:]).all())   # BOS, then suffix
True
>>> pair.spans.pred == len(pair.icl_ids) - 1
True
"""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import PromptError
from .models import model_info
from .tasks import Task, load_task


@dataclass(frozen=True)
class Span:
    """Half-open token range ``[start, stop)``."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    def indices(self) -> torch.Tensor:
        return torch.arange(self.start, self.stop)

    def shift(self, offset: int) -> "Span":
        return Span(self.start + offset, self.stop + offset)


@dataclass(frozen=True)
class DemoSpan:
    """One demonstration: its rendered input (``"Input: x\\nOutput:"``), its label tokens,
    and the separator after it. ``whole`` covers all three."""

    input: Span
    label: Span
    sep: Span

    @property
    def whole(self) -> Span:
        return Span(self.input.start, self.sep.stop)


@dataclass(frozen=True)
class Spans:
    """Token spans of one prompt. ``query`` is the query's rendered input; ``pred`` the
    prediction position (the last token). Demonstration tokens ``D`` are the union of
    ``demos[i].whole``; query tokens ``Q`` are BOS plus ``query`` (docs/science.md, Notation)."""

    bos: Span | None
    demos: tuple[DemoSpan, ...]
    query: Span
    pred: int

    def demo_indices(self) -> torch.Tensor:
        """Positions of every demonstration token (``D``), in order."""
        if not self.demos:
            return torch.zeros(0, dtype=torch.long)
        return torch.arange(self.demos[0].whole.start, self.demos[-1].whole.stop)

    def query_indices(self) -> torch.Tensor:
        """Positions of the query tokens ``Q`` (BOS counts with ``Q``)."""
        q = self.query.indices()
        return torch.cat([self.bos.indices(), q]) if self.bos is not None else q


@dataclass(frozen=True)
class PromptPair:
    """An ICL prompt and its zero-shot (ZS) twin.

    ``zs_ids`` equals ``icl_ids[-len(zs_ids):]`` except for a leading BOS, which both carry.
    ``labels`` are the candidate answers, ``label_ids`` their first-token ids, ``candidates``
    their full token ids and ``target`` the gold one's index; ``scoring`` says how a
    prediction is read: ``"first_token"`` (argmax over ``label_ids``; classification, and
    open-ended tasks whose answers' first tokens all differ) or ``"full_answer"`` (argmax of
    each answer's whole log-probability: :func:`icl_probe.scoring.answer_logprobs`).
    ``spans`` index ``icl_ids`` and ``zs_spans`` index ``zs_ids``.
    """

    icl_ids: torch.Tensor
    zs_ids: torch.Tensor
    label_ids: torch.Tensor
    target: int
    spans: Spans
    zs_spans: Spans
    text: str
    zs_text: str
    labels: tuple[str, ...]
    task: str
    query: int
    demos: tuple[int, ...]
    demo_labels: tuple[str, ...]
    candidates: tuple[tuple[int, ...], ...] = ()
    scoring: str = "first_token"
    meta: dict = field(default_factory=dict)

    @property
    def target_id(self) -> int:
        return int(self.label_ids[self.target])

    @property
    def k(self) -> int:
        return len(self.demos)

    def ids(self, kind: str) -> torch.Tensor:
        """``"icl"`` or ``"zs"`` ids."""
        return self._pick(kind, self.icl_ids, self.zs_ids)

    def spans_of(self, kind: str) -> Spans:
        return self._pick(kind, self.spans, self.zs_spans)

    @staticmethod
    def _pick(kind: str, icl: Any, zs: Any) -> Any:
        if kind == "icl":
            return icl
        if kind == "zs":
            return zs
        raise PromptError(f"prompt kind must be 'icl' or 'zs', got {kind!r}")


def split_template(template: str) -> tuple[str, str, str]:
    """``"Input: {x}\\nOutput: {y}\\n\\n"`` -> (input ``"Input: {x}\\nOutput:"``,
    label prefix ``" "``, separator ``"\\n\\n"``). Whitespace before ``{y}`` moves into the
    label piece, where BPE tokenizers attach it to the label's first token."""
    head, sep = template.split("{y}")
    stripped = head.rstrip(" ")
    return stripped, head[len(stripped):], sep


def label_first_tokens(tokenizer: Any, answers: Sequence[str], template: str) -> list[int]:
    """First token id of each answer as it appears after the template's label prefix."""
    _, prefix, _ = split_template(template)
    out = []
    for a in answers:
        ids = tokenizer(prefix + a, add_special_tokens=False).input_ids
        if not ids:
            raise PromptError(f"label {a!r} tokenizes to nothing")
        out.append(ids[0])
    return out


SCORINGS = ("first_token", "full_answer")


def _candidates(tokenizer: Any, task: Task, gold: str
                ) -> tuple[torch.Tensor, int, tuple[str, ...], tuple[tuple[int, ...], ...], str]:
    """Candidate answers: their first-token ids, the gold one's index, their names, every
    candidate's full token ids (label prefix included) and the scoring they need.

    Classification: the verbalizers, whose first tokens must differ; scored by the first
    token (the anchors' label accuracy). Open-ended: every distinct answer is a candidate of
    its own; where two share a first token ("Paris" / "Parisian") the first token cannot tell
    them apart, so the task is scored by each answer's whole log-probability
    (``"full_answer"``); where all first tokens differ, by the first token."""
    answers = task.answers
    first = label_first_tokens(tokenizer, answers, task.template)
    _, prefix, _ = split_template(task.template)
    full = tuple(tuple(tokenizer(prefix + a, add_special_tokens=False).input_ids)
                 for a in answers)
    if task.is_classification:
        owners: dict[int, str] = {}
        for a, t in zip(answers, first):
            if t in owners:
                raise PromptError(
                    f"task {task.name!r}: labels {owners[t]!r} and {a!r} share their first token "
                    f"{tokenizer.decode([t])!r} (id {t}), so label accuracy cannot tell them apart. "
                    "Fix: choose verbalizers whose first tokens differ"
                )
            owners[t] = a
        return torch.tensor(first), answers.index(gold), answers, full, "first_token"
    scoring = "first_token" if len(set(first)) == len(first) else "full_answer"
    return torch.tensor(first), answers.index(gold), answers, full, scoring


def _sample_demos(task: Task, query: int, k: int, rng: random.Random, balanced: bool,
                  pool: Sequence[int] | None) -> list[int]:
    candidates = [i for i in (range(len(task)) if pool is None else pool) if i != query]
    if k > len(candidates):
        raise PromptError(
            f"build_prompt(k={k}): task {task.name!r} has only {len(candidates)} items besides "
            "the query to draw demonstrations from; use a smaller k"
        )
    if not balanced or not task.is_classification:
        return rng.sample(candidates, k)
    by_label: dict[str, list[int]] = {lab: [] for lab in task.labels}
    for i in candidates:
        by_label[task.items[i].y].append(i)
    per, extra = divmod(k, len(by_label))
    extra_labels = set(rng.sample(list(by_label), extra))
    chosen: list[int] = []
    for lab, idx in by_label.items():
        n = per + (lab in extra_labels)
        if n > len(idx):
            raise PromptError(
                f"build_prompt(balanced=True, k={k}): label {lab!r} has only {len(idx)} items"
            )
        chosen += rng.sample(idx, n)
    rng.shuffle(chosen)
    return chosen


def build_prompt(
    model: Any,
    task: Task | str,
    query: int = 0,
    k: int = 8,
    seed: int = 0,
    *,
    order: Sequence[int] | None = None,
    shuffle_labels: bool = False,
    balanced: bool = False,
    demos: Sequence[int] | None = None,
    pool: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> PromptPair:
    """Build the ICL prompt for item ``query`` with ``k`` demonstrations, and its ZS twin.

    Demonstrations are sampled with ``seed`` from the task's other items (or ``pool``), never
    the query itself; ``demos`` gives them explicitly instead. ``order`` permutes them
    (``order[i]`` is the index, into the sampled list, of the demonstration placed i-th);
    ``shuffle_labels`` permutes the demonstrations' labels among them (the shuffled-label
    baseline); ``balanced`` draws the same number per label. ``prepend_bos`` defaults to
    ``model.icl_probe_info.prepend_bos``: BOS first whenever the tokenizer has one.
    """
    task = load_task(task)
    tokenizer = model.tokenizer
    if not isinstance(query, numbers.Integral) or isinstance(query, bool):
        raise PromptError(f"build_prompt(query={query!r}): query must be an item index (int)")
    if not 0 <= query < len(task):
        raise PromptError(f"build_prompt(query={query}): task {task.name!r} has items 0..{len(task) - 1}")
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
        raise PromptError(f"build_prompt(k={k!r}): k must be an integer >= 0 (the number of "
                          "demonstrations)")
    demo_idx, demo_labels = _choose_demos(task, query, k, random.Random(seed), demos=demos,
                                          order=order, shuffle_labels=shuffle_labels,
                                          balanced=balanced, pool=pool)
    if prepend_bos is None:
        prepend_bos = model_info(model).prepend_bos
    t = _tokenize(tokenizer, task, query, demo_idx, demo_labels, prepend_bos)
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and len(t["ids"]) > n_ctx:
        raise PromptError(
            f"build_prompt(task={task.name!r}, k={len(demo_idx)}): the ICL prompt has "
            f"{len(t['ids'])} tokens but the model's context holds {n_ctx}. Fix: use fewer "
            "demonstrations (smaller k)"
        )
    label_ids, target, labels, candidates, scoring = _candidates(tokenizer, task,
                                                                 task.items[query].y)
    ids, q_ids, bos = t["ids"], t["q_ids"], t["bos"]
    zs_ids = ([tokenizer.bos_token_id] if prepend_bos else []) + q_ids
    off = 1 if prepend_bos else 0
    zs_spans = Spans(bos, (), Span(off, off + len(q_ids)), len(zs_ids) - 1)
    return PromptPair(
        icl_ids=torch.tensor(ids), zs_ids=torch.tensor(zs_ids), label_ids=label_ids,
        target=target, spans=Spans(bos, tuple(t["demo_spans"]), t["query_span"], len(ids) - 1),
        zs_spans=zs_spans, text=t["text"], zs_text=t["q_text"], labels=labels, task=task.name,
        query=query, demos=tuple(demo_idx), demo_labels=tuple(demo_labels),
        candidates=candidates, scoring=scoring,
        meta={"seed": seed, "shuffle_labels": shuffle_labels, "balanced": balanced,
              "order": None if order is None else tuple(order)},
    )


def _choose_demos(task: Task, query: int, k: int, rng: random.Random, *,
                  demos: Sequence[int] | None, order: Sequence[int] | None,
                  shuffle_labels: bool, balanced: bool, pool: Sequence[int] | None
                  ) -> tuple[list[int], list[str]]:
    """The demonstrations (item indices, prompt order) and the labels they are shown with:
    sampled with ``rng`` (or given), reordered by ``order``, labels permuted with the same
    ``rng`` where ``shuffle_labels``."""
    if demos is None:
        demo_idx = _sample_demos(task, query, k, rng, balanced, pool)
    else:
        demo_idx = list(demos)
        if query in demo_idx:
            raise PromptError(f"build_prompt(demos=...): the query {query} is among its own demos")
        if any(not 0 <= i < len(task) for i in demo_idx):
            raise PromptError(f"build_prompt(demos=...): indices must lie in 0..{len(task) - 1}")
    if order is not None:
        if sorted(order) != list(range(len(demo_idx))):
            raise PromptError(
                f"build_prompt(order={list(order)}): expected a permutation of 0..{len(demo_idx) - 1}"
            )
        demo_idx = [demo_idx[i] for i in order]
    demo_labels = [task.items[i].y for i in demo_idx]
    if shuffle_labels:
        perm = list(range(len(demo_labels)))
        rng.shuffle(perm)
        demo_labels = [demo_labels[i] for i in perm]
    return demo_idx, demo_labels


def _tokenize(tokenizer: Any, task: Task, query: int, demo_idx: list[int],
              demo_labels: list[str], prepend_bos: bool) -> dict[str, Any]:
    """The ICL prompt's tokens piece by piece (BOS, each demonstration's input, label and
    separator, the query), with the span each piece covers, and its text."""
    head, label_prefix, sep = split_template(task.template)

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    ids: list[int] = []
    bos = None
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise PromptError("build_prompt(prepend_bos=True): the tokenizer has no BOS token")
        ids.append(tokenizer.bos_token_id)
        bos = Span(0, 1)
    texts: list[str] = []
    demo_spans = []
    for i, y in zip(demo_idx, demo_labels):
        pieces = [head.format(x=task.items[i].x), label_prefix + y, sep]
        spans = []
        for piece in pieces:
            t = tok(piece)
            spans.append(Span(len(ids), len(ids) + len(t)))
            ids += t
        if len(spans[1]) == 0:
            raise PromptError(f"demonstration label {y!r} tokenizes to nothing")
        demo_spans.append(DemoSpan(*spans))
        texts.append("".join(pieces))
    q_text = head.format(x=task.items[query].x)
    q_ids = tok(q_text)
    query_span = Span(len(ids), len(ids) + len(q_ids))
    ids += q_ids
    return {"ids": ids, "q_ids": q_ids, "bos": bos, "demo_spans": demo_spans,
            "query_span": query_span, "text": "".join(texts) + q_text, "q_text": q_text}


def build_prompts(model: Any, task: Task | str, queries: Sequence[int], k: int = 8,
                  seed: int = 0, **kwargs: Any) -> list[PromptPair]:
    """:func:`build_prompt` for several queries; query ``q`` uses seed ``seed + q`` so each
    query gets its own demonstrations, reproducibly."""
    task = load_task(task)
    return [build_prompt(model, task, q, k, seed + q, **kwargs) for q in queries]
