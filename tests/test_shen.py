"""Shen et al.'s curves (icl_probe.compare.shen) against hand computations on a tiny float64
model: the reference reorders the same demonstrations, every epoch's values are those of a run
stopped there, and full-batch GD's order sensitivity is exactly 0 at every epoch."""

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch

import icl_probe as ip
from icl_probe import run_experiment
from icl_probe.compare import (checkpoint_table, demonstrations, many_demos_table, order_curves,
                               resolve_queries, shen_curves)
from icl_probe.compare import shen as shen_module
from icl_probe.compare.shen import _prompt_sets
from icl_probe.experiments import EXPERIMENTS_DIR, Config, check_inputs, load_config, model_specs
from icl_probe.experiments.plan import plan
from transformers import LlamaConfig

from anchor_copies import write_shen_copies
from icl_probe.gd import EpochFineTune, finetune_epochs
from icl_probe.tasks import load_anchor_dataset, load_task

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


def _sst2_copy(path, n=60):
    """A small local copy of SST-2 in the JSON Lines form docs/datasets.md accepts."""
    words = ["bright", "dull", "warm", "cold", "sharp", "flat", "rich", "thin", "bold", "weak"]
    with open(path, "w") as f:
        for i in range(n):
            good = i % 2 == 0
            f.write(json.dumps({"sentence": f"the {words[i % 10]} film number {i} was "
                                            f"{'wonderful' if good else 'terrible'}",
                                "label": int(good)}) + "\n")
    return str(path)


def test_table1_gd_on_icl_demonstrations_by_hand_and_nested_sets(embedded, tmp_path, monkeypatch):
    task = load_anchor_dataset("sst2", _sst2_copy(tmp_path / "sst2.jsonl"))
    cfg = EpochFineTune(params="v:mid", epochs=2)
    seen = []

    def spy(model, pairs, run_cfg, **kw):
        seen.append([d for p in pairs for d in p.demos])
        assert all(len(p.demos) <= 2 for p in pairs)  # prompts of icl_n demonstrations
        return finetune_epochs(model, pairs, run_cfg, **kw)

    monkeypatch.setattr(shen_module, "finetune_epochs", spy)
    t = many_demos_table(embedded, task, n_train=[2, 6], icl_n=2, queries=3, seed=1,
                         method=cfg, lrs=[1e-2])
    queries = resolve_queries(task, 3, "test")
    order = demonstrations(task, 6, 1, exclude=queries)
    assert seen == [order[:2], order]  # nested: GD with N = icl_n trains on ICL's own set
    pairs = [ip.build_prompt(embedded, task, q, demos=order[:2], seed=1) for q in queries]
    p_icl = [_icl_probs(embedded, p) for p in pairs]
    hits = [int(p.argmax()) == pr.target_id for p, pr in zip(p_icl, pairs)]
    icl = t[t.method == "icl"]
    assert list(icl.n_train) == [2] and abs(icl.value.iloc[0] - sum(hits) / 3) < 1e-12
    # N = 2 by hand: one run on the first query's ICL prompt, read on the zero-shot prompts
    got = {}
    finetune_epochs(embedded, pairs[0], dataclasses.replace(cfg, lr=1e-2), eval_every=2,
                    seed=1, checkpoint=lambda e, m: got.update(
                        p=[_zs_probs(m, p) for p in pairs]))
    row = t[(t.n_train == 2) & (t.method != "icl")].set_index("metric").value
    assert abs(row["accuracy"] - sum(int(p.argmax()) == pr.target_id
                                     for p, pr in zip(got["p"], pairs)) / 3) < 1e-12
    overlap = sum(len(_top10(a) & _top10(b)) / 10 for a, b in zip(p_icl, got["p"])) / 3
    assert abs(row["token_overlap"] - overlap) < 1e-12
    assert set(t[t.n_train == 6].metric) == {"accuracy", "token_overlap", "overlap_cosine"}
    assert set(t[t.method != "icl"].epoch) == {2}


def test_table1_runs_in_the_shen_section_from_a_local_file(embedded, tmp_path):
    path = _sst2_copy(tmp_path / "sst2.jsonl")
    cfg = Config.from_dict({"experiment": {"name": "s", "sections": ["shen"]},
                            "shen": {"tasks": ["sentiment"], "n_demos": [1], "queries": 2,
                                     "sparsity_thresholds": [1e-2], "order_methods": [],
                                     "methods": [dict(name="gd", params="v:mid", epochs=1,
                                                      lrs=[1e-2])],
                                     "many_demos_tasks": [f"sst2:{path}"],
                                     "many_demos_n": [2, 4],
                                     "many_demos_icl_n": 2, "many_demos_queries": 2,
                                     "many_demos_methods": [dict(
                                         name="gd_many", params="v:mid", batch_size=2,
                                         epochs=1, lrs=[1e-2])]}}, "s")
    out = run_experiment(cfg, model=embedded, out=tmp_path / "o", progress=False)
    table = pd.read_csv(out / "shen_many_demos.csv")
    assert set(table.task) == {"sst2"} and set(table.method) == {"icl", "gd_many"}
    assert sorted(set(table[table.method == "gd_many"].n_train)) == [2, 4]
    page = (out / "report.html").read_text()
    assert "Table 1 (sst2)" in page and "was skipped" not in page


def test_shen_full_parses_with_local_copies_and_plans_under_80_gb_at_llama_7b(tmp_path,
                                                                            monkeypatch):
    """experiments/gpu/shen_full.toml against local copies of its four datasets (written
    here), planned for LLaMA-7B's shape in bf16: one process fits one 80 GB GPU."""
    write_shen_copies(tmp_path / "data" / "shen")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(EXPERIMENTS_DIR / "gpu" / "shen_full.toml")
    s = cfg.settings("shen")
    assert s.tasks == s.many_demos_tasks and len(s.tasks) == 4
    assert {m["epochs"] for m in s.methods + s.order_methods} == {200}
    assert [m["epochs"] for m in s.many_demos_methods] == [20]
    llama = tmp_path / "llama-7b"
    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
                ).save_pretrained(llama)
    check_inputs(cfg, model_specs(cfg, str(llama)))  # sizes, splits and v:mid/v:deep layers
    p = plan(cfg, model_name=str(llama))
    (row,) = p.models
    assert p.dtype == "bfloat16" and 6.7e9 < row["n_params"] < 6.8e9
    assert row["process_gb"] < 80, row
    assert "adam_b1" in row["finetune_note"]  # Adam's two states: the largest fine-tune
    units = p.units["shen"]
    assert units == 1 + 4 * 4 + 4 + 4  # sparsity; curves per (task, N); order; Table 1
