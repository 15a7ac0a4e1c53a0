"""Open-ended answers that share a first token are scored by their whole answer."""

import json

import pytest
import torch

import icl_probe as ip
from icl_probe.hooks import answer_logprobs, predictions

# float64 tiny model; the cache path and the full forward differ only by summation order
F64_TOL = 1e-10


@pytest.fixture(scope="module")
def tiny():
    return ip.tiny_model(dtype=torch.float64, n_layers=3, n_heads=6, n_key_value_heads=2,
                         d_model=48, d_head=8, d_mlp=80, seed=4)


@pytest.fixture()
def paris_task(tmp_path):
    items = [("France", "Paris"), ("someone from Paris", "Parisian"), ("Spain", "Madrid"),
             ("someone from Madrid", "Madrileno"), ("Italy", "Rome"), ("Peru", "Lima")]
    p = tmp_path / "cities.jsonl"
    p.write_text("\n".join([json.dumps({"task": "cities", "labels": None})] +
                           [json.dumps({"x": x, "y": y}) for x, y in items]) + "\n")
    return ip.load_task(str(p))


def _reference(model, ids, cand):
    """log p(cand | ids) from one plain transformers forward over ids + cand (no cache)."""
    full = torch.cat([ids, torch.tensor(cand)])
    with torch.no_grad():
        logits = model.original_model(full[None]).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(ids) - 1 + t, c]) for t, c in enumerate(cand))


def test_answers_sharing_a_first_token_stay_apart_and_are_scored_whole(tiny, paris_task):
    pair = ip.build_prompt(tiny, paris_task, query=0, k=2, seed=1)
    assert pair.scoring == "full_answer"
    assert set(pair.labels) == {"Paris", "Parisian", "Madrid", "Madrileno", "Rome", "Lima"}
    assert len(pair.candidates) == len(pair.labels) == len(pair.label_ids)  # none merged
    assert pair.labels[pair.target] == "Paris"
    for kind in ("zs", "icl"):
        lp = answer_logprobs(tiny, [pair], kind)[0]
        for j, cand in enumerate(pair.candidates):
            ref = _reference(tiny, pair.ids(kind), cand)
            assert abs(float(lp[j]) - ref) < F64_TOL, (kind, pair.labels[j])
        logits = ip.trace(tiny, [pair], kind=kind, what=("attn_out",), layers=[0]).logits
        assert int(predictions(tiny, [pair], kind, logits)[0]) == int(lp.argmax())
    # 'Paris' and 'Parisian' share their first token but not their score
    i, j = pair.labels.index("Paris"), pair.labels.index("Parisian")
    assert pair.candidates[i][0] == pair.candidates[j][0]
    assert float(lp[i]) != float(lp[j])


@pytest.mark.embedded
def test_shipped_open_ended_tasks_keep_every_answer(embedded):
    for name, n_answers in (("capital", 150), ("en_fr", None)):
        task = ip.load_task(name)
        pair = ip.build_prompt(embedded, task, query=0, k=2)
        assert len(pair.labels) == len(task.answers)  # before: 132 of 150 for capital
        if n_answers is not None:
            assert len(pair.labels) == n_answers
    assert ip.build_prompt(embedded, "sentiment", query=0, k=2).scoring == "first_token"


def test_compare_reports_the_scoring_it_used(tiny, paris_task):
    t = ip.compare(tiny, paris_task, k=2, queries=[0, 2], gd=ip.FineTuneConfig(lr=1e-2),
                   baselines=(), progress=False, dev_queries=[4])
    assert set(t.per_query.scoring) == {"full_answer"}
