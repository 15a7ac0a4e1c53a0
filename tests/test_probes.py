"""Probes against slow explicit references (float64, tiny models with 2 key/value groups and
rotary), every identity on the embedded model in float32, batching, and bad input."""

import dataclasses
import math

import pytest
import torch

import icl_probe as ip
from conftest import TINY_FUSED, TINY_LLAMA
from icl_probe.hooks import group_mapping
from icl_probe.probes import mlp_first_layers
from icl_probe.probes.updates import _linear_attention

F64_TOL = 1e-10  # float64 on tiny models
F32_TOL = 1e-5  # float32 on the embedded model (docs/science.md, Rank-1 MLP update)


def _pairs(model, n=5, k=2, task="capital"):
    return [ip.build_prompt(model, task, query=q, k=k + q, seed=q) for q in range(n)]


def test_dual_form_identity_on_random_tensors():
    """W_0 x + LinearAttn(E, X', x) = (W_0 + Σ_i e_i ⊗ x'_i) x
    (docs/science.md, Linear-attention dual form)."""
    g = torch.Generator().manual_seed(0)
    L, B, N, G, R, d_k, d_v = 2, 3, 7, 2, 3, 5, 4  # distinct sizes; R query heads per group
    X = torch.randn(L, B, N, G, d_k, generator=g, dtype=torch.float64)  # keys x'_i
    E = torch.randn(L, B, N, G, d_v, generator=g, dtype=torch.float64)  # values e_i
    x = torch.randn(L, B, G * R, d_k, generator=g, dtype=torch.float64)  # queries
    W0 = torch.randn(d_v, d_k, generator=g, dtype=torch.float64)
    keys = torch.ones(B, N, dtype=torch.float64)
    keys[1, 5:] = 0  # a shorter prompt
    lin = _linear_attention(X, E, x, keys, group_mapping(G * R, G))
    for l in range(L):
        for b in range(B):
            for h in range(G * R):
                grp = h // R
                dW = torch.zeros(d_v, d_k, dtype=torch.float64)
                la = torch.zeros(d_v, dtype=torch.float64)
                for i in range(N):
                    if keys[b, i]:
                        dW += torch.outer(E[l, b, i, grp], X[l, b, i, grp])
                        la += E[l, b, i, grp] * (X[l, b, i, grp] @ x[l, b, h])
                lhs = W0 @ x[l, b, h] + lin[l, b, h]
                assert (lhs - (W0 + dW) @ x[l, b, h]).abs().max() < F64_TOL
                assert (lin[l, b, h] - la).abs().max() < F64_TOL


def test_updates_against_python_loops(tiny64):
    pairs = _pairs(tiny64)
    up = ip.implied_updates(tiny64, pairs, per_demo=True)
    rec = ip.trace(tiny64, pairs, positions="all")
    H, G = rec.n_heads, rec.n_kv_heads
    for li in range(len(rec.layers)):
        for b, p in enumerate(pairs):
            pred = p.spans.pred
            for h in range(H):
                g = h // (H // G)
                kk, vv = rec.data["k"][li, b, :, g], rec.data["v"][li, b, :, g]
                dW = sum(torch.outer(vv[j], kk[j]) for j in p.spans.demo_indices().tolist())
                Wzs = sum(torch.outer(vv[j], kk[j]) for j in p.spans.query_indices().tolist())
                assert (up.dW_icl[li, b, h] - dW).abs().max() < F64_TOL
                assert (up.W_zs[li, b, h] - Wzs).abs().max() < F64_TOL
                for i, d in enumerate(p.spans.demos):
                    term = sum(torch.outer(vv[j], kk[j]) for j in range(d.whole.start,
                                                                        d.whole.stop))
                    assert (up.demo_terms[li, b, i, h] - term).abs().max() < F64_TOL
                    assert abs(up.demo_norms[li, b, i, h] - term.norm()) < F64_TOL
                a = rec.pattern[li, b, pred, h]
                lam = sum(a[j] for j in p.spans.demo_indices().tolist())
                assert abs(up.lam[li, b, h] - lam) < F64_TOL
                # fidelity: explicit best scalar c for this head
                q = rec.q[li, b, pred, h]
                z = rec.z[li, b, pred, h]
                z_lin = sum(vv[j] * (kk[j] @ q) for j in range(pred + 1))
                hh, hl = z @ rec.W_O[li, h], z_lin @ rec.W_O[li, h]
                c = (hh @ hl) / (hl @ hl)
                assert abs(up.fidelity_err[li, b, h] - (hh - c * hl).norm() / hh.norm()) < F64_TOL
            assert torch.equal(up.demo_mask[b], torch.arange(up.demo_mask.shape[1]) < p.k)
    # norms without the per-demo matrices (Gram-matrix route) agree
    lean = ip.implied_updates(tiny64, pairs)
    assert lean.demo_terms is None
    assert (lean.demo_norms - up.demo_norms).abs().max() < 1e-9


@pytest.mark.parametrize("arch, sizes", [("llama", TINY_LLAMA), ("gpt2", TINY_FUSED)])
def test_every_identity_holds_in_float64(arch, sizes):
    model = ip.tiny_model(arch, dtype=torch.float64, seed=4, **sizes)
    df = ip.verify_identities(model, _pairs(model))
    kinds = df.groupby("identity").kind.first().to_dict()
    assert kinds == {
        **dict.fromkeys(("scores", "pattern", "z", "attn_out", "mlp_rank1", "model_space"),
                        "model identity"),
        **dict.fromkeys(("dual_form", "demo_terms_sum", "softmax_split", "mlp_pre_rank1",
                         "mlp_delta_rank1"), "consistency check")}
    worst = df.groupby("identity").max_rel_err.max()
    assert (worst < F64_TOL).all(), worst.to_dict()
    assert set(df[df.identity == "mlp_rank1"].layer) == set(range(model.cfg.n_layers))


def test_every_identity_holds_on_the_embedded_model(embedded):
    pairs = [ip.build_prompt(embedded, "capital", query=q, k=4, seed=q) for q in range(2)]
    df = ip.verify_identities(embedded, pairs)
    worst = df.groupby("identity").max_rel_err.max()
    assert (worst < F32_TOL).all(), worst.to_dict()
    # the patched MLP reproduces the ICL output in every one of the 30 layers
    assert sorted(df[df.identity == "mlp_rank1"].layer) == list(range(30))
    up = ip.implied_updates(embedded, pairs, layers=[5])
    dW = up.mlp_delta("gate", 5, 0)
    s = torch.linalg.svdvals(dW.double())
    assert s[1] / s[0] < 1e-6  # rank 1
    assert set(up.mlp_a) == {"gate", "in"}  # both first-layer matrices of the gated MLP


def test_batched_equals_unbatched(tiny64):
    pairs = _pairs(tiny64)
    batched = ip.implied_updates(tiny64, pairs, batch_size=3)
    for b, p in enumerate(pairs):
        alone = ip.implied_updates(tiny64, [p])
        for name in ("dW_icl", "W_zs", "lam", "z_Q", "z_D", "fidelity_err", "u_ctx", "u_0",
                     "mlp_b"):
            x, y = getattr(alone, name)[:, 0], getattr(batched, name)[:, b]
            assert (x - y).abs().max() < F64_TOL, name
        demo_norms = alone.demo_norms[:, 0, : p.k] - batched.demo_norms[:, b, : p.k]
        assert demo_norms.abs().max() < F64_TOL


def test_table_is_tidy(tiny64):
    pairs = _pairs(tiny64)
    up = ip.implied_updates(tiny64, pairs)
    df = up.table()
    assert list(df.columns) == ["task", "prompt", "layer", "head", "demo", "quantity", "value"]
    per_head = df[df.quantity == "lambda"]
    assert len(per_head) == len(pairs) * tiny64.cfg.n_layers * tiny64.cfg.n_heads
    demo_rows = df[df.quantity == "dW_icl_demo_norm"]
    assert len(demo_rows) == sum(p.k for p in pairs) * tiny64.cfg.n_layers * tiny64.cfg.n_heads
    assert df[df.quantity == "mlp_dW_gate_norm"]["head"].eq(-1).all()
    assert torch.isfinite(torch.tensor(df.value.values)).all()


# table() stores float32: a float64 value rounded to float32 moves by at most 2^-24 of itself;
# a second 2^-24 covers the float64 reference's own (summation-order) rounding
TABLE_REL_TOL = 2 ** -23


def _close_in_table(value, ref):
    return abs(value - ref) <= TABLE_REL_TOL * abs(ref)


def test_table_rows_are_labelled_with_their_own_prompt_layer_head_and_demo(tiny64):
    """Each row's value is the quantity of the prompt, layer, head and demonstration it is
    labelled with, recomputed from a separate trace by Python loops. Two of the model's three
    layers are traced ([0, 2]), so a row labelled with its index among the traced layers (1)
    instead of the layer (2) fails; 4 prompts with 2..5 demonstrations and 6 heads keep the
    prompt, demo and head axes distinct."""
    pairs = _pairs(tiny64, n=4)  # k = 2, 3, 4, 5
    layers = [0, 2]
    up = ip.implied_updates(tiny64, pairs, layers=layers)
    df = up.table()
    assert sorted(df.layer.unique()) == layers
    rec = ip.trace(tiny64, pairs, what=("k", "v", "pattern", "mlp_in"), layers=layers)
    zs = ip.trace(tiny64, pairs, kind="zs", what=("mlp_in",), layers=layers)
    H, G = tiny64.cfg.n_heads, tiny64.cfg.n_key_value_heads

    def one(quantity, b, layer, head=-1, demo=-1):
        sel = df[(df.quantity == quantity) & (df.prompt == b) & (df.layer == layer)
                 & (df["head"] == head) & (df.demo == demo)]
        assert len(sel) == 1, (quantity, b, layer, head, demo, len(sel))
        return float(sel.value.iloc[0])

    def frobenius(positions, li, b, g):
        k, v = rec.data["k"][li, b, :, g], rec.data["v"][li, b, :, g]
        M = sum(torch.outer(v[j], k[j]) for j in positions)
        return math.sqrt(sum(x * x for x in M.flatten().tolist()))

    for b, layer, h in [(0, 0, 5), (3, 2, 1), (2, 2, 4), (1, 0, 2)]:
        li, g, p = layers.index(layer), h // (H // G), pairs[b]
        D, Q = p.spans.demo_indices().tolist(), p.spans.query_indices().tolist()
        pattern = rec.at_pred("pattern")[li, b, h]  # key_pos: the token position itself
        assert _close_in_table(one("lambda", b, layer, h), sum(float(pattern[j]) for j in D))
        assert _close_in_table(one("dW_icl_norm", b, layer, h), frobenius(D, li, b, g))
        assert _close_in_table(one("W_zs_norm", b, layer, h), frobenius(Q, li, b, g))
        # the label only (the value is checked against loops in
        # test_updates_against_python_loops)
        assert _close_in_table(one("fidelity_err", b, layer, h),
                               float(up.fidelity_err[li, b, h]))
        for d in {0, p.k - 1}:  # the first and the last demonstration of this prompt
            span = range(p.spans.demos[d].whole.start, p.spans.demos[d].whole.stop)
            assert _close_in_table(one("dW_icl_demo_norm", b, layer, h, d),
                                   frobenius(span, li, b, g))
        # per prompt and layer (head -1): ‖W_gate (u_ctx − u_0)‖ / ‖u_0‖ and the input shift
        u_ctx, u_0 = rec.at_pred("mlp_in")[li, b], zs.at_pred("mlp_in")[li, b]
        W = ip.gd.named_parameters(tiny64)[f"model.layers.{layer}.mlp.gate_proj.weight"].detach()
        dW_norm = float((W @ (u_ctx - u_0)).norm() / u_0.norm())
        assert _close_in_table(one("mlp_dW_gate_norm", b, layer), dW_norm)
        assert _close_in_table(one("u_shift_rel", b, layer),
                               float((u_ctx - u_0).norm() / u_0.norm()))
    # every prompt has exactly its own demonstrations' rows, per traced layer and head
    demo_rows = df[df.quantity == "dW_icl_demo_norm"]
    for b, p in enumerate(pairs):
        mine = demo_rows[demo_rows.prompt == b]
        assert sorted(mine.demo.unique()) == list(range(p.k))
        assert len(mine) == p.k * len(layers) * H


def test_trajectory_adds_demonstrations_one_at_a_time(tiny64):
    traj = ip.update_trajectory(tiny64, "capital", query=0, k=3, seed=1)
    assert sorted(traj.n_demos.unique()) == [1, 2, 3]
    full = ip.implied_updates(tiny64, [ip.build_prompt(tiny64, "capital", query=0, k=3, seed=1)])
    got = traj[(traj.n_demos == 3) & (traj.quantity == "mlp_dW_gate_norm")].sort_values("layer")
    assert torch.allclose(torch.tensor(got.value.values, dtype=torch.float64),
                          full.mlp_delta_norm("gate")[:, 0], rtol=1e-6)
    step1 = traj[(traj.n_demos == 1) & (traj.quantity == "mlp_dW_gate_step")].value.values
    norm1 = traj[(traj.n_demos == 1) & (traj.quantity == "mlp_dW_gate_norm")].value.values
    assert torch.allclose(torch.tensor(step1), torch.tensor(norm1))  # ΔW(0) = 0


def test_prompts_without_demonstrations_are_refused(tiny64):
    pair = ip.build_prompt(tiny64, "capital", query=0, k=0)
    with pytest.raises(ip.ProbeError, match="no demonstrations"):
        ip.implied_updates(tiny64, [pair])


def test_spans_that_do_not_match_the_tokens_are_refused(tiny64):
    pair = ip.build_prompt(tiny64, "capital", query=0, k=2)
    broken = dataclasses.replace(pair, icl_ids=pair.icl_ids[:-1])
    with pytest.raises(ip.ProbeError, match="spans do not match the tokens"):
        ip.implied_updates(tiny64, [broken])
    other = ip.build_prompt(tiny64, "capital", query=1, k=2)
    swapped = dataclasses.replace(pair, zs_ids=other.zs_ids)
    with pytest.raises(ip.ProbeError, match="ZS ids"):
        ip.implied_updates(tiny64, [swapped])


def test_mlp_without_a_linear_first_layer_is_refused():
    model = ip.tiny_model(seed=5)
    mlp = model.blocks[1].mlp
    mlp._modules["in"].set_original_component(torch.nn.Identity())  # a non-linear input map
    with pytest.raises(ip.ProbeError, match="layer 1: the MLP's 'in' input map is a Identity"):
        mlp_first_layers(model, 1)
    pair = ip.build_prompt(model, "capital", query=0, k=2)
    with pytest.raises(ip.ProbeError, match="not a linear layer"):
        ip.implied_updates(model, [pair])
