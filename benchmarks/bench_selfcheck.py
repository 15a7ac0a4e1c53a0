"""What the fast paths' self-checks cost (icl_probe.hooks.selfcheck), measured on the embedded model.

Each call of the shared-prefix trace runs its shortest prompt whole in the forward that builds
the prefix's cache (instead of the prefix alone), captures one layer's scores there and in the
suffix pass, and compares. Each call of answer scoring on the cache runs one prompt with one
candidate's tokens appended (instead of the prompt alone) and compares that candidate. The
checks' cost is what those forwards cost beyond the forwards they replace, plus the
comparison itself; both are timed here beside the whole call, in the same run:

- ``call``: the library call as users make it (self-check included);
- ``whole``: the forward the check runs (prompt whole, scores hooked, cache kept);
- ``alone``: the forward it replaces (the prefix, or the prompt, alone with its cache);
- ``compare``: the relative-error comparisons (timed inside the call).

overhead = (whole - alone) + compare, as a share of ``call``. Target: at most 5 %.

Run: ``python benchmarks/bench_selfcheck.py [--queries 24 --k 16 --repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import icl_probe as ip
from _timing import interleaved
from icl_probe.compare import ICL_WHAT, demonstrations
from icl_probe.hooks import (answer_logprobs, logits_to_keep, selfcheck, shared_prefix_length,
                             trace_shared_prefix)


def timed_checks() -> list[float]:
    """Wrap selfcheck.check so every comparison's time is kept."""
    spent: list[float] = []
    real = selfcheck.check

    def check(path, pairs, dtype):
        t = time.perf_counter()
        try:
            return real(path, pairs, dtype)
        finally:
            spent.append(time.perf_counter() - t)

    selfcheck.check = check
    return spent


def forward(model, ids, hook=None):
    keep, kw = logits_to_keep(model, torch.tensor([len(ids) - 1]))
    kept = []
    hooks = [(hook, lambda x, hook=None: kept.append(x[0, :, -1]))] if hook else []
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        return model(ids[None], return_type="logits_and_cache", **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = ip.load_model(device="cpu")
    spent = timed_checks()
    last = f"blocks.{model.cfg.n_layers - 1}.attn.hook_attn_scores"

    # the shared-prefix trace, as compare() calls it
    task = ip.load_task("sentiment")
    demos = demonstrations(task, args.k, 0)
    pairs = [ip.build_prompt(model, task, q, demos=demos)
             for q in task.split("test")[: args.queries]]
    P = shared_prefix_length(pairs)
    shortest = min(pairs, key=lambda p: len(p.icl_ids)).icl_ids
    # answer scoring: open-ended capital prompts (multi-token answers run on the cache)
    cap = [ip.build_prompt(model, "capital", query=q, k=8, seed=0) for q in range(8)]
    longer = [c for c in cap[0].candidates if len(c) > 1]
    with_answer = torch.cat([cap[0].icl_ids, torch.tensor(longer[0][:-1])])

    runs = {
        "prefix: call": lambda: trace_shared_prefix(model, pairs, what=ICL_WHAT),
        "prefix: whole": lambda: forward(model, shortest, last),
        "prefix: alone": lambda: forward(model, shortest[:P]),
        "scoring: call": lambda: answer_logprobs(model, cap, "icl"),
        "scoring: whole": lambda: forward(model, with_answer, last),
        "scoring: alone": lambda: forward(model, cap[0].icl_ids),
    }
    spent.clear()
    times = interleaved(runs, args.repeats)
    per_call = statistics.median(spent) if spent else 0.0
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"embedded SmolLM2-135M, float32, {torch.get_num_threads()} threads; "
          f"{args.queries} sentiment queries at k = {args.k} (shared prefix {P} tokens, "
          f"shortest prompt {len(shortest)}); 8 capital prompts at k = 8 "
          f"({len(longer)} multi-token answers each); medians of {args.repeats}")
    print(f"{'':10}{'call':>10}{'whole':>10}{'alone':>10}{'compare':>10}{'overhead':>10}")
    for path in ("prefix", "scoring"):
        call, whole, alone = (med[f"{path}: {x}"] for x in ("call", "whole", "alone"))
        over = max(whole - alone, 0.0) + per_call
        print(f"{path:10}{call * 1e3:9.0f}ms{whole * 1e3:8.0f}ms{alone * 1e3:8.0f}ms"
              f"{per_call * 1e3:8.1f}ms{100 * over / call:9.1f}%")


if __name__ == "__main__":
    main()
