"""Time and memory of experiments/gpu/shen_full.toml's units at LLaMA-7B size on one GPU,
with random weights and generated copies of the four datasets (nothing is downloaded), at a
few epochs instead of 200: each unit's seconds, split into a fixed part and a per-epoch part
from runs at two epoch counts, then the 200-epoch time of the whole config from them (an
estimate from measured parts, said as such).

Run on a machine with a CUDA GPU:
``python benchmarks/bench_gpu_shen.py --tokenizer DIR [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pandas as pd
import torch

from icl_probe import run_experiment
from icl_probe.experiments import EXPERIMENTS_DIR, Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from anchor_copies import write_shen_copies  # noqa: E402
from bench_gpu_memory import build  # noqa: E402

GiB = 2**30


def reduced(body: dict, epochs: int, copies: dict[str, Path]) -> Config:
    """shen_full with ``epochs`` epochs, a checkpoint each, AG News only (the other datasets
    cost the same per token), N = 8 only (the largest) and Table 1 at 8 and 32."""
    body = json.loads(json.dumps(body))
    s = body["shen"]
    spec = f"agnews:{copies['agnews']}"
    s.update(tasks=[spec], many_demos_tasks=[spec], n_demos=[8], many_demos_n=[8, 32],
             eval_every=1)
    for key in ("methods", "order_methods", "many_demos_methods"):
        for m in s[key]:
            m["epochs"] = epochs
            m["lrs"] = m["lrs"][:1]
    return Config.from_dict(body, f"shen_full_{epochs}ep")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--epochs", type=int, nargs=2, default=[1, 3])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--small", action="store_true", help="a 2-layer smoke test of the script")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        raise SystemExit("needs a CUDA device (or --small for a smoke test on the CPU)")
    model, _, _ = build(args, "cuda" if cuda else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_shen_"))
    copies = write_shen_copies(tmp / "data", n=1300)
    body = tomllib.loads((EXPERIMENTS_DIR / "gpu" / "shen_full.toml").read_text())
    seconds, peaks = {}, {}
    for epochs in args.epochs:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = run_experiment(reduced(body, epochs, copies), model=model,
                             out=tmp / f"out{epochs}", progress=False)
        wall = time.perf_counter() - t0
        per_unit = {}
        for f in sorted((out / "units").glob("*/unit.json")):
            meta = json.loads(f.read_text())
            u = meta["unit"]
            name = u["part"] + (f"[n={u.get('n_demos')}]" if u["part"] == "curves" else "")
            per_unit[name] = per_unit.get(name, 0.0) + meta.get("seconds", float("nan"))
        seconds[epochs] = per_unit
        peaks[epochs] = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
        print(f"{epochs} epoch(s): {wall:.1f} s wall, peak {peaks[epochs]:.1f} GiB; per unit "
              + ", ".join(f"{k} {v:.1f} s" for k, v in per_unit.items()), flush=True)
    a, b = args.epochs
    rows = []
    for name in seconds[b]:
        per_epoch = (seconds[b][name] - seconds[a][name]) / (b - a)
        rows.append({"unit": name, f"seconds_{a}": seconds[a][name],
                     f"seconds_{b}": seconds[b][name], "per_epoch": per_epoch,
                     "fixed": seconds[a][name] - a * per_epoch})
    t = pd.DataFrame(rows)
    print(t.round(2).to_string(index=False))
    if args.json:
        device = torch.cuda.get_device_name() if cuda else "cpu"
        args.json.write_text(json.dumps({"per_unit": rows, "peak_gib": peaks,
                                         "device": device}, indent=2))


if __name__ == "__main__":
    main()
