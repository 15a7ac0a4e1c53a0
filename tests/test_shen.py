"""Shen et al.'s curves (icl_probe.compare.shen) against hand computations on a tiny float64
model: the reference reorders the same demonstrations, every epoch's values are those of a run
stopped there, and full-batch GD's order sensitivity is exactly 0 at every epoch."""

import math

import pandas as pd
import pytest
import torch

import icl_probe as ip
from icl_probe import run_experiment
from icl_probe.compare import checkpoint_table, order_curves, shen_curves
from icl_probe.compare.shen import _prompt_sets
from icl_probe.experiments import Config
from icl_probe.gd import EpochFineTune, finetune_epochs
from icl_probe.tasks import load_task

TOL = 1e-12  # float64, the same computation in another arrangement


@pytest.fixture(scope="module")
def model():
    return ip.tiny_model(dtype=torch.float64, seed=7, n_layers=4, n_heads=6,
                         n_key_value_heads=2, d_head=10, d_model=42, d_mlp=72)


def _zs_probs(m, pair):
    logits = ip.trace(m, [pair], kind="zs", what=("attn_out",), layers=[0]).logits[0]
    return torch.softmax(logits.double(), -1)


def _icl_probs(m, pair):
    logits = ip.trace(m, [pair], what=("attn_out",), layers=[0]).logits[0]
    return torch.softmax(logits.double(), -1)


def _top10(p):
    return set(torch.argsort(p, descending=True)[:10].tolist())


def test_the_reference_reorders_the_same_demonstrations(model):
    pairs, reordered = _prompt_sets(model, load_task("capital"), 4, 3, seed=1)
    for a, b in zip(pairs, reordered):
        assert a.query == b.query and sorted(a.demos) == sorted(b.demos)
        assert a.demos != b.demos  # another order
    assert len({p.demos for p in pairs}) == 1  # one demonstration set for every query


def test_each_epoch_is_a_run_stopped_there_with_hand_computed_metrics(model):
    cfg = EpochFineTune(params="all", optimizer="sgd", batch_size=2, epochs=3)
    t = shen_curves(model, "capital", n_demos=4, queries=3, seed=1, lrs=[2e-2], methods=[cfg],
                    eval_every=1)
    pairs, reordered = _prompt_sets(model, load_task("capital"), 4, 3, seed=1)
    p_icl = [_icl_probs(model, p) for p in pairs]
    for epoch in (1, 3):
        stopped = EpochFineTune(params="all", optimizer="sgd", batch_size=2, epochs=epoch,
                                lr=2e-2)
        got = {}
        finetune_epochs(model, pairs[0], stopped, eval_every=epoch, seed=1,
                        checkpoint=lambda e, m: got.__setitem__(
                            "p", [_zs_probs(m, p) for p in pairs]))
        acc = sum(int(p.argmax()) == pair.target_id for p, pair in zip(got["p"], pairs)) / 3
        overlap = sum(len(_top10(a) & _top10(b)) / 10 for a, b in zip(p_icl, got["p"])) / 3
        row = t[(t.method == cfg.name) & (t.epoch == epoch)].set_index("metric").value
        assert abs(row["accuracy"] - acc) < TOL and abs(row["token_overlap"] - overlap) < TOL
    # the reference: ICL reordered against ICL, by hand
    p_re = [_icl_probs(model, p) for p in reordered]
    ref = t[t.method == "icl_reordered"].set_index("metric").value
    assert abs(ref["token_overlap"] - sum(len(_top10(a) & _top10(b)) / 10
                                          for a, b in zip(p_icl, p_re)) / 3) < TOL
    cos = []
    for a, b in zip(p_icl, p_re):
        common = sorted(_top10(a) & _top10(b))
        x, y = a[common], b[common]
        cos.append(float(x @ y / (x.norm() * y.norm())))
    assert abs(ref["overlap_cosine"] - sum(cos) / 3) < TOL


def test_full_batch_order_sensitivity_is_zero_at_every_epoch_and_sgd_b1_is_not(model):
    methods = [EpochFineTune(params="all", batch_size=None, epochs=3),
               EpochFineTune(params="all", batch_size=1, epochs=3)]
    t = order_curves(model, "capital", n_demos=4, orderings=4, queries=2, lrs=[5e-2],
                     methods=methods, seed=3)
    full = t[t.method == methods[0].name]
    sgd = t[t.method == methods[1].name]
    assert list(full.epoch) == [1, 2, 3] and (full.value == 0).all()
    assert list(sgd.epoch) == [1, 2, 3] and (sgd.value > 1e-8).all()
    icl = t[t.method == "icl"].value.iloc[0]
    assert icl > 0 and math.isfinite(icl)


def test_bad_orderings_are_named(model):
    with pytest.raises(ip.CompareError, match="orderings"):
        order_curves(model, "capital", n_demos=2, orderings=1, lrs=[1e-2], methods=[])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of one tiny model: the second moves one matrix by a known amount."""
    root = tmp_path_factory.mktemp("ckpt")
    hf, tok = ip.models.tiny_hf_model(seed=4, n_layers=3)
    out = []
    for step in range(2):
        if step:
            with torch.no_grad():
                hf.model.layers[1].mlp.up_proj.weight.add_(0.25)
        hf.save_pretrained(root / f"step{step}")
        tok.save_pretrained(root / f"step{step}")
        out.append(str(root / f"step{step}"))
    return out, hf.model.layers[1].mlp.up_proj.weight.numel(), sum(
        p.numel() for p in hf.parameters())


def test_fig3_weight_change_and_icl_accuracy_by_hand(checkpoints):
    paths, moved, total = checkpoints
    t = checkpoint_table(paths, "capital", n_demos=2, queries=3)
    change = t[t.metric == "weight_change"].set_index("step").value
    assert change[0] == 0
    assert abs(change[1] - 0.25 * moved / total) < 1e-9  # float32 weights: 0.25 is exact
    for step, path in enumerate(paths):
        model = ip.load_model(path)
        pairs, _ = _prompt_sets(model, load_task("capital"), 2, 3, seed=0)
        hits = [int(_icl_probs(model, p).argmax()) == p.target_id for p in pairs]
        acc = t[(t.metric == "icl_accuracy") & (t.step == step)].value.iloc[0]
        assert abs(acc - sum(hits) / 3) < TOL


def test_fig3_runs_in_the_shen_section(checkpoints, tmp_path):
    paths, _, _ = checkpoints
    cfg = Config.from_dict({"experiment": {"name": "s", "sections": ["shen"]},
                            "shen": {"tasks": ["capital"], "n_demos": [1], "queries": 2,
                                     "sparsity_thresholds": [1e-2], "order_methods": [],
                                     "methods": [dict(name="gd", epochs=1, lrs=[1e-2])],
                                     "checkpoints": paths, "checkpoint_n_demos": 2}}, "s")
    out = run_experiment(cfg, model=ip.tiny_model(seed=2), out=tmp_path / "o", progress=False)
    table = pd.read_csv(out / "shen_checkpoints.csv")
    assert list(table[table.metric == "weight_change"].step) == [0, 1]
    assert "Fig. 3" in (out / "report.html").read_text()
