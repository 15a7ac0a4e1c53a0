"""Replayed implied updates (icl_probe.causal.patches / replay) on tiny float64 models: the exact
construction as real rank-1 and norm-scale weight patches, zero updates, the last-layer sanity
bound, the baselines and transfer."""

import json

import pytest
import torch

import icl_probe as ip
from icl_probe.causal import replay, transfer
from icl_probe.causal.patches import Factors, at_pred, icl_targets, mean_factors, replay_logits
from icl_probe.causal.vectors import patched_logits
from icl_probe.errors import CausalError

TOL = 1e-12
# Two float64 paths that differ by rounding (W + a bᵀ against W plus a hook adding a (b·u)) meet
# transformers' eager attention, whose softmax runs in float32 even for a float64 model: the
# difference grows to ~1e-6 there. A wrong patch (Gemma's (1 + w) scale missed, a factor on
# the wrong side) is off by O(1).
ACROSS_SOFTMAX = 1e-5


@pytest.fixture(scope="module")
def yes_no(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks") / "parity.jsonl"
    # no space before the answer: its first byte tells the two answers apart
    rows = [{"task": "parity", "labels": None, "template": "Input: {x}\nOutput:{y}\n\n"}]
    rows += [{"x": str(n), "y": "even" if n % 2 == 0 else "odd"} for n in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return ip.load_task(str(path))


def _model(arch):
    return ip.tiny_model(arch, dtype=torch.float64, seed=3, n_layers=4)


def _pairs(model, task, n=4, k=4):
    return [ip.build_prompt(model, task, q, k=k, seed=q) for q in task.split("test")[:n]]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_the_exact_replay_is_rank_one_weight_patches_and_reproduces_icl_block_outputs(arch,
                                                                                     yes_no):
    """Layers 0-2 of 4 patched (not the last, which would force the logits by itself): the
    factors, written into a copy of the real weights (W += a bᵀ on gate and up; Gemma: the
    post-MLP norm's scale times r; Llama: W_out += e cᵀ), give the hooked replay's logits; each
    patched block outputs, at p, what the ICL forward's block outputs there."""
    model = _model(arch)
    pair = _pairs(model, yes_no, n=1)
    patched = (0, 1, 2)
    seen = {}
    handles = [model.hook_dict[f"blocks.{l}.hook_resid_post"].register_forward_hook(
        lambda m, i, out, l=l: seen.__setitem__(l, out[0, -1].detach().clone()))
        for l in patched]  # plain torch hooks: the replay's own hooks never see them
    try:
        logits, fs = replay_logits(model, pair, patched, "exact",
                                   targets=icl_targets(model, pair, patched, "exact"))
        during = torch.stack([seen[l] for l in patched])
        with torch.inference_mode():
            model(pair[0].icl_ids[None])  # the ICL forward, alone
        icl_out = torch.stack([seen[l] for l in patched])
    finally:
        for h in handles:
            h.remove()
    assert _rel(during, icl_out) < TOL  # the construction, to float64 precision
    icl = patched_logits(model, pair, None, "icl")
    assert _rel(logits, icl) > 1e-3  # the last block sees no demonstrations: not ICL yet
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            for l in patched:
                mlp, f = model.blocks[l].mlp, fs[l]
                for name in ("gate", "in"):
                    w = mlp._modules[name].original_component.weight
                    w += torch.outer(f.a[name][0, 0], f.b[0, 0])
                if arch == "gemma3":  # Gemma's RMSNorm multiplies by (1 + weight)
                    assert f.e is None and f.r is not None
                    w = model.blocks[l].ln2_post.original_component.weight
                    w.copy_((1 + w) * f.r[0, 0] - 1)
                else:
                    assert f.r is None and f.e is not None
                    mlp.out.original_component.weight += torch.outer(f.e[0, 0], f.c[0, 0])
            by_weights = patched_logits(model, pair, None, "zs")
            blocks = at_pred(model, pair, patched, "blocks.{l}.hook_resid_post", "zs")
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
    assert _rel(by_weights, logits) < ACROSS_SOFTMAX
    icl_blocks = at_pred(model, pair, patched, "blocks.{l}.hook_resid_post", "icl")
    assert _rel(blocks, icl_blocks) < ACROSS_SOFTMAX


def test_zero_updates_replay_the_zero_shot_forward_exactly(yes_no):
    model = _model("llama")
    pairs = _pairs(model, yes_no)
    every = tuple(range(4))
    _, fs = replay_logits(model, pairs, every, "exact",
                          targets=icl_targets(model, pairs, every, "exact"))
    zero = {l: Factors({k: torch.zeros_like(v) for k, v in f.a.items()}, f.b, f.c,
                       torch.zeros_like(f.e)) for l, f in fs.items()}
    logits, _ = replay_logits(model, pairs, every, "exact", factors=zero)
    assert torch.equal(logits, patched_logits(model, pairs, None, "zs"))
    # the zero-shot forward's own values as the targets: updates zero up to rounding
    own = icl_targets(model, pairs, every, "exact")
    own.u_c = at_pred(model, pairs, every, "blocks.{l}.mlp.hook_in", "zs")
    own.y_c = at_pred(model, pairs, every, "blocks.{l}.hook_resid_post", "zs")
    logits, _ = replay_logits(model, pairs, every, "exact", targets=own)
    assert _rel(logits, patched_logits(model, pairs, None, "zs")) < TOL


@pytest.mark.parametrize("arch", ["gemma3", "llama", "gpt2"])
def test_the_full_residual_difference_at_the_last_layer_gives_icl(arch, yes_no):
    model = ip.tiny_model(arch, dtype=torch.float64, seed=3, n_layers=3)
    pairs = _pairs(model, yes_no)
    logits, _ = replay_logits(model, pairs, (2,), "exact",
                              targets=icl_targets(model, pairs, (2,), "exact"))
    assert _rel(logits, patched_logits(model, pairs, None, "icl")) < TOL


def test_own_factors_given_back_replay_the_same_and_random_ones_keep_the_norms(yes_no):
    model = _model("llama")
    pairs = _pairs(model, yes_no)
    every = tuple(range(4))
    tg = icl_targets(model, pairs, every, "exact")
    logits, fs = replay_logits(model, pairs, every, "exact", targets=tg)
    again, _ = replay_logits(model, pairs, every, "exact",
                             factors={l: mean_factors(f, [[i] for i in range(len(pairs))])
                                      for l, f in fs.items()})
    assert _rel(again, logits) < TOL
    _, rnd = replay_logits(model, pairs, every, "exact", targets=tg,
                           randomize=torch.Generator().manual_seed(0))
    for l in every:
        assert not torch.allclose(rnd[l].e, fs[l].e)
    # norms match the update the real replay computes on the (randomly patched) stream: at
    # layer 0 the stream is the same, so the norms are the real ones
    for name, a in fs[0].a.items():
        assert torch.allclose(rnd[0].a[name].norm(dim=-1), a.norm(dim=-1), rtol=1e-12)
    d = mean_factors(fs[0], [[0, 1]] * len(pairs))
    assert torch.allclose(d.e[:, 1], fs[0].e[1, 0].expand_as(d.e[:, 1]))


def test_replay_table_sanity_and_errors(yes_no):
    model = _model("llama")
    pairs = _pairs(model, yes_no, n=6)
    res = replay(model, pairs, updates=("exact", "mlp"), layers={"all": range(4), "low": [0]},
                 task=yes_no, progress=False)
    s = res.summary.set_index(["hypothesis", "subset", "baseline", "metric"]).value
    assert s[("icl", "", "", "share")] == 1 and s[("zero_shot", "", "", "share")] == 0
    assert abs(s[("replay:exact", "all", "", "share")] - 1) < 1e-9
    assert s[("replay:exact", "all", "", "top1")] == 1
    assert s[("replay:exact", "all", "", "accuracy")] == s[("icl", "", "", "accuracy")]
    assert {"vs_random", "vs_shuffled_labels"} <= set(res.summary.columns)
    assert len(res.per_query) == 2 * 2 * 3 * 6
    with pytest.raises(CausalError, match="updates='sgd'"):
        replay(model, pairs, updates="sgd")
    with pytest.raises(CausalError, match="layer subset"):
        replay(model, pairs, layers=[7])
    with pytest.raises(CausalError, match="baselines"):
        replay(model, pairs, baselines=("noise",))
    with pytest.raises(CausalError, match="in parallel"):
        replay(ip.tiny_model("neox"), pairs)


def test_transfer_reports_other_mean_and_finetune(yes_no):
    model = _model("llama")
    res = transfer(model, yes_no, k=4, queries=4, dev_queries=3)
    hyps = set(res.summary.hypothesis)
    assert {"icl", "zero_shot", "transfer:other", "transfer:mean", "finetune"} <= hyps
    acc = res.summary[res.summary.metric == "accuracy"]
    assert acc.value.between(0, 1).all() and (acc.n == 4).all()
    with pytest.raises(CausalError, match="queries=1"):
        transfer(model, yes_no, queries=1)


@pytest.mark.embedded
def test_the_exact_replay_on_the_embedded_model(embedded):
    """Blocks 0-28 of 30 patched on real sentiment prompts: each patched block outputs, at p,
    what the ICL forward's block outputs there (a separate ICL forward, read by plain torch
    hooks on the hook points); the last block is left alone, so the logits are not ICL's."""
    pairs = [ip.build_prompt(embedded, "sentiment", q, k=4, seed=q) for q in (0, 1)]
    patched = tuple(range(29))
    targets = icl_targets(embedded, pairs, patched, "exact")
    seen = {}
    handles = [embedded.hook_dict[f"blocks.{l}.hook_resid_post"].register_forward_hook(
        lambda m, i, out, l=l: seen.__setitem__(l, out.detach().clone())) for l in patched]
    try:
        logits, _ = replay_logits(embedded, pairs, patched, "exact", targets=targets)
        last = torch.tensor([len(p.zs_ids) - 1 for p in pairs])
        during = torch.stack([seen[l][torch.arange(2), last] for l in patched])
        seen.clear()
        with torch.inference_mode():
            for b, p in enumerate(pairs):  # one ICL prompt at a time: no padding involved
                embedded(p.icl_ids[None])
                if b == 0:
                    first = torch.stack([seen[l][0, -1] for l in patched])
        icl_blocks = torch.stack([first, torch.stack([seen[l][0, -1] for l in patched])], 1)
    finally:
        for h in handles:
            h.remove()
    err = ((during - icl_blocks).norm(dim=-1) / icl_blocks.norm(dim=-1)).max()
    assert err < 1e-4, float(err)  # float32, 29 blocks
    zs = patched_logits(embedded, pairs, None, "zs")
    icl = patched_logits(embedded, pairs, None, "icl")
    assert _rel(logits, icl) > 1e-3 and _rel(logits, zs) > 1e-3
