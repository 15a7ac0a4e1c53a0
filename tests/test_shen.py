"""Shen et al.'s curves (icl_probe.compare.shen) against hand computations on a tiny float64
model: the reference reorders the same demonstrations, every epoch's values are those of a run
stopped there, and full-batch GD's order sensitivity is exactly 0 at every epoch."""

import math

import pytest
import torch

import icl_probe as ip
from icl_probe.compare import order_curves, shen_curves
from icl_probe.compare.shen import _prompt_sets
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
