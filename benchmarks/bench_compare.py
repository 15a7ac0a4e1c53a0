"""Comparator benchmark: :func:`icl_probe.compare` (shared protocol, one seed, Dai-FT on kv, no
baseline runs) against the floor it cannot avoid, measured in the same run: one bare forward
of every ICL prompt and every ZS prompt, k forward + backward steps of the fine-tune (one per
demonstration, kv parameters), and one bare forward of every ZS prompt through the fine-tuned
model, each in right-padded batches (16 ICL prompts, 32 ZS prompts: the sizes ``compare``
uses). ``compare`` also computes every metric, the intervals and the tables; it runs the
demonstrations' shared prefix once, which the floor does not.

Run: ``python benchmarks/bench_compare.py [--queries 24 --k 16 --repeats 3]``. Medians over
interleaved repeats; the ratio is the median of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import icl_probe as ip
from _timing import interleaved, ratio
from icl_probe.compare import demonstrations
from icl_probe.gd import trainable_parameters
from icl_probe.gd.losses import _examples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = ip.load_model(device="cpu")
    task = ip.load_task("sentiment")
    demos = demonstrations(task, args.k, 0)
    pairs = [ip.build_prompt(model, task, q, demos=demos)
             for q in task.split("test")[: args.queries]]
    kv = list(trainable_parameters(model, "kv").values())
    cfg = ip.FineTuneConfig(method="dai", params="kv", lr=1e-2)

    def batches(kind, size):
        """Right-padded batches of the prompts, as a plain script would run them."""
        ids = [p.ids(kind) for p in pairs]
        for i in range(0, len(ids), size):
            chunk = ids[i: i + size]
            out = torch.zeros(len(chunk), max(len(x) for x in chunk), dtype=torch.long)
            for r, x in enumerate(chunk):
                out[r, : len(x)] = x
            yield out

    def bare(**kw):
        for x in model.parameters():
            x.requires_grad_(False)
        with torch.inference_mode():
            for b in batches("icl", 16):  # full ICL prompts: no prefix reuse in the floor
                model(b, **kw)
            for b in batches("zs", 32):
                model(b, **kw)
        for x in kv:
            x.requires_grad_(True)
        for ids, mask in _examples(pairs[0], "demo"):
            t = mask.nonzero()[:, 0]
            F.cross_entropy(model(ids[None])[0, t - 1], ids[t]).backward()
        for x in kv:
            x.grad = None
            x.requires_grad_(False)
        with torch.inference_mode():  # the fine-tuned model's forwards: same cost as the base
            for b in batches("zs", 32):
                model(b, **kw)

    def ours():
        ip.compare(model, task, k=args.k, queries=args.queries, gd=cfg, baselines=(),
                   progress=False)

    # "lean": the same forwards unembedding only the last position (logits_to_keep=1), the
    # strictest floor: what remains is the transformer itself and the fine-tune
    times = interleaved({"floor": bare, "lean": lambda: bare(logits_to_keep=1),
                         "compare": ours}, args.repeats)
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; sentiment, "
          f"{len(pairs)} queries, k={args.k}, shared protocol, Dai-FT on kv, no baseline runs")
    for name, ts in times.items():
        print(f"{name:>8}: {statistics.median(ts):7.2f} s (median of {len(ts)})")
    print(f"ratio compare / floor: {ratio(times, 'compare', 'floor'):.3f}")
    print(f"ratio compare / lean floor: {ratio(times, 'compare', 'lean'):.3f}")


if __name__ == "__main__":
    main()
