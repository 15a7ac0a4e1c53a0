"""Causal tests (icl_probe.causal) against hand-computed patches on tiny float64 models."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import icl_probe as ip
from conftest import TINY_LLAMA
from icl_probe.causal import patched_hits, patched_logits, task_vector

TOL = 1e-12


@pytest.fixture(scope="module")
def yes_no(tmp_path_factory):
    """A two-label task written here: two candidates per prompt keep scoring fast."""
    path = tmp_path_factory.mktemp("tasks") / "parity.jsonl"
    rows = [{"task": "parity", "labels": None,
             "template": "Input: {x}\nOutput: {y}\n\n"}]
    rows += [{"x": str(n), "y": "even" if n % 2 == 0 else "odd"} for n in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def model():
    return ip.tiny_model(dtype=torch.float64, seed=6, **TINY_LLAMA)


def _patched_whole(model, ids, at, layer, vec):
    """One sequence alone, its resid_pre at block ``layer`` replaced at position ``at`` by
    ``vec`` with a hook written here: the logits at every position."""
    def put(x, hook=None):
        x = x.clone()
        x[0, at] = vec
        return x

    with torch.inference_mode(), model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre",
                                                         put)]):
        return model(ids[None])[0]


def _hidden_at_last(model, ids, layer):
    """The hidden state leaving block ``layer`` at the last position of one prompt alone."""
    seen = []
    with torch.inference_mode(), model.hooks(fwd_hooks=[(
            f"blocks.{layer}.hook_resid_post", lambda x, hook=None: seen.append(x[0, -1]))]):
        model(ids[None])
    return seen[0]


def test_each_querys_task_vector_is_the_mean_hidden_state_of_its_dummy_prompts(model, yes_no):
    res = task_vector(model, yes_no, k=3, dummies=2, queries=3, dev_queries=2,
                      layers=[0, 2], progress=False)
    task = ip.load_task(yes_no)
    train = task.split("train")
    for b, q in enumerate(task.split("test")[:3]):
        pair = ip.build_prompt(model, task, q, 3, seed=q, pool=train)
        pool = [i for i in train if i not in pair.demos]  # the documented dummy-query rule
        dummies = np.random.default_rng([0, q]).choice(pool, size=2, replace=False).tolist()
        by_hand = torch.stack([_hidden_at_last(model, ip.build_prompt(
            model, task, d, demos=list(pair.demos)).icl_ids, res.layer) for d in dummies]).mean(0)
        assert torch.allclose(res.vectors[b].double(), by_hand, rtol=0, atol=1e-6)  # float32
    assert res.layers == (0, 2) and len(res.per_layer) == 4  # 2 splits x 2 layers
    dev = res.per_layer[res.per_layer.split == "dev"]
    assert res.layer == int(dev.layer[dev.accuracy == dev.accuracy.max()].iloc[0])
    s = res.summary.set_index("hypothesis")
    assert list(s.index) == ["zero_shot", "icl", "task_vector"] and (s.n == 3).all()
    test = res.per_layer[(res.per_layer.split == "test") & (res.per_layer.layer == res.layer)]
    assert s.loc["task_vector", "value"] == test.accuracy.iloc[0]
    assert (s.ci_low <= s.value).all() and (s.value <= s.ci_high).all()
    shared = task_vector(model, yes_no, k=3, dummies=2, queries=3, dev_queries=2,
                         layers=[res.layer], shared=True, progress=False)
    assert torch.allclose(shared.vectors, res.vectors.mean(0, keepdim=True).expand(3, -1),
                          rtol=0, atol=1e-6)


def test_patched_logits_equal_a_hand_written_patch_of_each_prompt_alone(model):
    pairs = ip.build_prompts(model, "capital", range(5), k=2)
    vec = torch.randn(model.cfg.d_model, dtype=torch.float64, generator=torch.Generator()
                      .manual_seed(0))
    got = patched_logits(model, pairs, ("blocks.1.hook_resid_pre", vec.expand(5, -1)))
    for b, p in enumerate(pairs):
        want = _patched_whole(model, p.zs_ids, len(p.zs_ids) - 1, 1, vec)[-1]
        assert torch.allclose(got[b].double(), want, rtol=0, atol=1e-5), b  # float32 out
    plain = patched_logits(model, pairs, None)
    assert (got - plain).abs().max() > 1e-3  # the patch did something


def test_answers_scored_whole_run_every_candidate_under_the_patch(model):
    # the capital task on the byte tokenizer is scored by whole answers: each candidate's
    # log-probability is summed over its tokens, the prompt patched at its last position
    pairs = [_few_candidates(p, 6) for p in ip.build_prompts(model, "capital", range(3), k=2)]
    assert {p.scoring for p in pairs} == {"full_answer"}
    vec = 3 * torch.randn(model.cfg.d_model, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))
    got = patched_hits(model, pairs, ("blocks.2.hook_resid_pre", vec.expand(3, -1)))
    for b, p in enumerate(pairs):
        scores = []
        for cand in p.candidates:
            ids = torch.cat([p.zs_ids, torch.tensor(cand)])
            n = len(p.zs_ids)
            logp = torch.log_softmax(_patched_whole(model, ids, n - 1, 2, vec), -1)
            scores.append(sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cand)))
        assert got[b] == float(max(range(len(scores)), key=scores.__getitem__) == p.target), b


def _few_candidates(pair, n):
    """``pair`` with its gold answer and n - 1 others as the only candidates (fewer forwards)."""
    keep = sorted({pair.target, *range(n - 1)})[:n]
    return dataclasses.replace(pair, candidates=tuple(pair.candidates[i] for i in keep),
                               labels=tuple(pair.labels[i] for i in keep),
                               label_ids=pair.label_ids[keep], target=keep.index(pair.target))


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), r"k=0: expected an integer >= 1"),
    (dict(dummies=10_000), r"train items; k=5 demonstrations and dummies=10000"),
    (dict(layers=[7]), r"layer 7 is out of range"),
])
def test_task_vector_names_a_bad_request(model, kwargs, match):
    with pytest.raises(ip.CausalError, match=match):
        task_vector(model, "capital", **kwargs)


# ------------------------------------------------------------------------- function vectors


@pytest.fixture(scope="module")
def first_byte(tmp_path_factory):
    """Parity without a space before the answer: the answers' first bytes differ, so the
    probability of the correct answer's first token is the probability of the answer."""
    path = tmp_path_factory.mktemp("tasks") / "parity_fb.jsonl"
    rows = [{"task": "parity_fb", "labels": None, "template": "Input: {x}\nOutput:{y}\n\n"}]
    rows += [{"x": str(n), "y": "even" if n % 2 == 0 else "odd"} for n in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_function_vector_against_hand_computed_heads_and_patch(model, first_byte):
    res = ip.function_vector(model, first_byte, k=3, prompts=4, heads=3, queries=5,
                             dev_queries=3, progress=False)
    task = ip.load_task(first_byte)
    train = task.split("train")
    L, d_head = model.cfg.n_layers, model.cfg.d_head
    clean = [ip.build_prompt(model, task, q, 3, seed=q, pool=train) for q in train[-4:]]

    def z_at_last(ids):  # every layer's z at the last position, one sequence alone
        got = {}
        hooks = [(f"blocks.{l}.attn.hook_z",
                  lambda x, hook=None, l=l: got.__setitem__(l, x[0, -1].clone()))
                 for l in range(L)]
        with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
            model(ids[None])
        return torch.stack([got[l] for l in range(L)])

    mean_z = torch.stack([z_at_last(p.icl_ids) for p in clean]).mean(0)  # layer head d_head
    chosen = res.heads[res.heads.chosen]
    assert len(chosen) == 3 and chosen.effect.min() >= res.heads[~res.heads.chosen].effect.max()
    fv = torch.zeros(model.cfg.d_model, dtype=torch.float64)
    for l, h in zip(chosen["layer"], chosen["head"]):  # W_O read off the o_proj weight
        W = model.blocks[l].attn.o.original_component.weight.detach()
        fv += W[:, h * d_head: (h + 1) * d_head] @ mean_z[l, h]
    assert float((res.vectors[0].double() - fv).abs().max() / fv.abs().max()) < 1e-6

    # one head's effect: its z replaced by hand in each corrupted prompt, alone
    l, h = int(chosen["layer"].iloc[0]), int(chosen["head"].iloc[0])
    rise = []
    for p in clean:
        bad = ip.build_prompt(model, task, p.query, demos=list(p.demos), seed=p.query,
                              shuffle_labels=True)
        gold = int(bad.label_ids[bad.target])

        def put(x, hook=None):
            x = x.clone()
            x[0, -1, h] = mean_z[l, h]
            return x

        with torch.inference_mode():
            before = model(bad.icl_ids[None])[0, -1].double().softmax(-1)[gold]
            with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_z", put)]):
                after = model(bad.icl_ids[None])[0, -1].double().softmax(-1)[gold]
        rise.append(float(after - before))
    assert abs(np.mean(rise) - chosen.effect.iloc[0]) < 1e-6

    # the patch at the chosen layer: fv added by hand at each zero-shot prompt's last position
    pairs = [ip.build_prompt(model, task, q, 3, seed=q, pool=train)
             for q in task.split("test")[:5]]
    hand = []
    for p in pairs:
        def add(x, hook=None):
            x = x.clone()
            x[0, -1] += fv
            return x

        with torch.inference_mode(), model.hooks(fwd_hooks=[
                (f"blocks.{res.layer}.hook_resid_post", add)]):
            logits = model(p.zs_ids[None])[0, -1]
        hand.append(int(logits[p.label_ids].argmax()) == p.target)
    got = res.summary.set_index("hypothesis").value["function_vector"]
    assert got == np.mean(hand)


def test_function_vector_heads_on_a_drifted_cache_raise(model, first_byte, drifted_cache):
    from icl_probe.errors import TraceError
    with pytest.raises(TraceError, match="cache"):
        ip.function_vector(model, first_byte, k=3, prompts=4, heads=3, queries=2,
                           dev_queries=2, progress=False)


def test_function_vector_effects_on_the_cache_equal_whole_prompts(model, first_byte):
    from icl_probe.causal.functions import Z, _whole_prompt_effects, indirect_effects
    from icl_probe.causal.patches import at_pred
    task = ip.load_task(first_byte)
    train = task.split("train")
    clean = [ip.build_prompt(model, task, q, 3, seed=q, pool=train) for q in train[-3:]]
    bad = [ip.build_prompt(model, task, p.query, demos=list(p.demos), seed=p.query,
                           shuffle_labels=True) for p in clean]
    mean_z = at_pred(model, clean, range(model.cfg.n_layers), Z, "icl").mean(1)
    fast = indirect_effects(model, bad, mean_z, progress=False)
    slow = _whole_prompt_effects(model, bad, mean_z, range(model.cfg.n_layers),
                                 range(model.cfg.n_heads))
    assert np.abs(fast - slow).max() <= 1e-9 + 1e-6 * np.abs(slow).max()
