"""The prefix floor of benchmarks/bench_compare.py (plain transformers, the demonstration prefix
once on its KV cache) computes what full prompts compute: its ICL logits against the traced
full-prompt logits of the TransformerLens bridge, an independent path (eager attention, no
cache), and its timed work leaves the weights as it found them."""

import sys
from pathlib import Path

import torch

import icl_probe as ip
from icl_probe.compare import demonstrations

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_compare import _prefix_floor  # noqa: E402


def test_the_prefix_floor_equals_full_prompt_forwards_and_restores_its_weights(embedded):
    task = ip.load_task("sentiment")
    demos = demonstrations(task, 4, 0)
    pairs = [ip.build_prompt(embedded, task, q, demos=demos) for q in task.split("test")[:5]]
    run, icl_logits = _prefix_floor(pairs, 1e-2)
    full = ip.trace(embedded, pairs, what=("attn_out",), layers=[0]).logits
    floor = icl_logits()
    err = float((floor - full).abs().max() / full.abs().max())
    assert err < 1e-4, err  # float32 through another attention kernel (sdpa against eager)
    run()  # trains k/v and restores them
    assert torch.equal(icl_logits(), floor)
