"""``icl-probe doctor``: does this installation compute the right numbers?

A release of torch, transformers or TransformerLens can change an internal the toolkit relies
on and make numbers wrong without an error. The doctor prints the versions and runs, on the
embedded model and on tiny models of two more families built in memory (Gemma 2 with a
sliding window, GPT-J), every check that would catch it:

- every **model identity** of :func:`icl_probe.verify_identities` (scores, pattern, z,
  attention output, model-space form against independently captured hooks) and the rank-1
  MLP identity, against :data:`IDENTITY_TOLERANCE`;
- the **fast paths against the slow exact path** on every prompt: the shared-prefix trace
  against full-prompt traces (logits, scores, attention output at p) and answer scoring on the
  key/value cache against whole forwards, against :data:`icl_probe.selfcheck.TOLERANCE`.

The verdict is kept beside the model cache, keyed by the versions, and every experiment
records it in its provenance (:func:`last_verdict`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch

from .errors import IclProbeError
from .hooks import answer_logprobs, trace, trace_shared_prefix
from .hooks.selfcheck import relative_error, stack_versions, tolerance
from .models import attention_spec, cache_dir, load_model, tiny_model
from .probes import verify_identities
from .prompts import build_prompt

# worst relative error a model identity may show, per dtype (measured: float32 3.4e-6 on the
# embedded model, float64 below 1e-10 on every tiny family)
IDENTITY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
VERDICT_FILE = "doctor.json"
ANSWERS_CHECKED = 6  # multi-token candidate answers per prompt scored both ways

# (label, how to build it, task, number of prompts, demonstrations per prompt). The tiny
# models read bytes, so every capital is a multi-token answer, as some are on the embedded
# model: answer scoring runs continuations on the cache everywhere.
TINY_FAMILIES = (
    ("tiny llama (GQA, float64)",
     lambda: tiny_model("llama", dtype=torch.float64, n_layers=3), "capital", 4, 4),
    ("tiny gemma2 (sliding window 24, float64)",
     lambda: tiny_model("gemma2", dtype=torch.float64, n_layers=3, sliding_window=24),
     "capital", 4, 4),
    ("tiny gptj (interleaved rotary, float64)",
     lambda: tiny_model("gptj", dtype=torch.float64, n_layers=3), "capital", 4, 4),
)
EMBEDDED = ("embedded SmolLM2-135M (float32)", load_model, "capital", 4, 8)


@dataclass
class DoctorReport:
    """Every check the doctor ran (``checks``: model, check, error, tolerance, ok), the
    versions, and the verdict."""

    versions: dict[str, str]
    checks: pd.DataFrame
    seconds: float
    failures: list[str] = field(default_factory=list)
    embedded: bool = True  # False: tiny models only (--tiny-only)

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.checks.ok.all())

    @property
    def verdict(self) -> str:
        return ("passed" if self.ok else "FAILED") + \
            ("" if self.embedded else " (tiny models only)")

    def to_json(self) -> dict:
        return {"versions": self.versions, "verdict": self.verdict,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(self.seconds, 1),
                "failures": self.failures,
                "checks": self.checks.to_dict(orient="records")}


def _rows_identities(label: str, model: Any, pairs: list) -> list[dict]:
    dtype = next(model.parameters()).dtype
    if attention_spec(model).score_dtype == torch.float32:  # GPT-J scores in float32
        dtype = torch.float32
    tol = IDENTITY_TOLERANCE.get(dtype, 1e-2)
    ident = verify_identities(model, pairs)
    worst = ident[ident.kind == "model identity"].groupby("identity").max_rel_err.max()
    return [{"model": label, "check": f"identity: {name}", "error": float(err),
             "tolerance": tol, "ok": bool(err <= tol)} for name, err in worst.items()]


def _rows_fast_paths(label: str, model: Any, pairs: list) -> list[dict]:
    dtype = next(model.parameters()).dtype
    tol = tolerance(dtype)
    what = ("scores", "attn_out")
    fast = trace_shared_prefix(model, pairs, what=what, min_prefix=1)
    slow = trace(model, pairs, what=what, positions="pred")
    rows = [("shared-prefix trace: logits at p", relative_error(fast.logits, slow.logits))]
    for q in what:
        f, s = fast[q], slow[q]
        if q == "scores":  # fast keeps every key; the slow record its own key positions
            n = min(f.shape[-1], s.shape[-1])
            f, s = f[..., :n], s[..., :n]
        rows.append((f"shared-prefix trace: {q} at p", relative_error(f, s)))
    # the slow path runs each candidate's whole prompt: a few multi-token candidates suffice
    few = [dataclasses.replace(p, candidates=tuple(
        c for c in p.candidates if len(c) > 1)[:ANSWERS_CHECKED]) for p in pairs]
    for kind in ("icl", "zs"):
        a = answer_logprobs(model, few, kind, fast=True)
        b = answer_logprobs(model, few, kind, fast=False)
        rows.append((f"answer scoring on the cache ({kind})", relative_error(a, b)))
    return [{"model": label, "check": name, "error": err, "tolerance": tol,
             "ok": bool(err <= tol)} for name, err in rows]


def _prompts(model: Any, task: str, n: int, k: int) -> list:
    return [build_prompt(model, task, query=q, demos=list(range(20, 20 + k)))
            for q in range(n)]


def run_doctor(*, embedded: bool = True, progress: Callable[[str], None] = print
               ) -> DoctorReport:
    """Run every check (see the module docstring); ``embedded=False`` skips the embedded
    model (tiny models only). Never raises for a failed check: the report says which."""
    t0 = time.perf_counter()
    rows: list[dict] = []
    failures: list[str] = []
    builders: list[tuple[str, Callable[[], Any], str, int, int]] = list(TINY_FAMILIES)
    if embedded:
        builders.insert(0, EMBEDDED)
    for label, build, task, n, k in builders:
        progress(f"  {label} ...")
        try:
            model = build()
            pairs = _prompts(model, task, n, k)
            rows += _rows_identities(label, model, pairs)
            rows += _rows_fast_paths(label, model, pairs)
        except IclProbeError as e:  # a fast path's own self-check, or a refused identity
            failures.append(f"{label}: {type(e).__name__}: {e}")
    checks = pd.DataFrame(rows, columns=["model", "check", "error", "tolerance", "ok"])
    report = DoctorReport(stack_versions(), checks, time.perf_counter() - t0, failures,
                          embedded)
    save_verdict(report)
    return report


def save_verdict(report: DoctorReport) -> None:
    path = cache_dir() / VERDICT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=1, default=float))
    tmp.replace(path)


def last_verdict() -> dict:
    """The last doctor verdict on this exact stack: ``{"verdict", "date"}``, or verdict
    ``"not run on this stack"`` when the doctor last ran on other versions (or never)."""
    path = cache_dir() / VERDICT_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    if saved.get("versions") != stack_versions():
        return {"verdict": "not run on this stack", "date": ""}
    return {"verdict": saved.get("verdict", "?"), "date": saved.get("date", "")}


def format_report(report: DoctorReport) -> str:
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()), ""]
    c = report.checks.copy()
    c["error"] = c.error.map(lambda e: f"{e:.2g}")
    c["tolerance"] = c.tolerance.map(lambda e: f"{e:g}")
    c["ok"] = c.ok.map({True: "ok", False: "MISMATCH"})
    lines.append(c.to_string(index=False))
    lines += ["", *report.failures]
    lines.append(f"doctor: {report.verdict} ({len(c)} checks, {report.seconds:.0f} s)")
    return "\n".join(lines)


__all__ = ["DoctorReport", "format_report", "last_verdict", "run_doctor"]
