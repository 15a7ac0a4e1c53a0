"""trace() against slow, explicit references on tiny float64 models (every layer), padding
equivalence, position selection and bad input."""

import math

import pytest
import torch

import icl_probe as ip
from conftest import TINY_FUSED, TINY_LLAMA, assert_row_equals_alone
from icl_probe.hooks import compact, expand_kv, grouped_einsum

F64_TOL = 1e-10  # float64 on tiny models: only summation-order rounding remains


def _pairs(model, n=5, k=3):
    task = ip.load_task("capital")
    # different k per prompt -> different lengths, so batching must pad
    return [ip.build_prompt(model, task, query=q, k=k + q, seed=q) for q in range(n)]


def _rotary(x, positions, theta):
    """Llama rotary (rotate-half convention), written out: x (pos, head, d_head).

    transformers computes the rotary phases in float32 whatever the model's dtype, so the
    reference does too; everything after the phases is float64."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    ang = positions.float()[:, None] * inv_freq[None, :]  # pos d/2
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :].to(x.dtype)
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


@pytest.mark.parametrize("kv_head_of", [
    pytest.param([0, 0, 0, 1, 1, 1], id="consecutive"),  # group_mapping's layout: split heads
    pytest.param([1, 0, 1, 0, 1, 0], id="interleaved"),  # any other: through expand_kv
])
def test_grouped_einsum_reads_each_query_heads_group(kv_head_of):
    """grouped_einsum (expand_kv fused into a contraction) against a loop over query heads."""
    g = torch.Generator().manual_seed(0)
    L, B, T, G, D = 3, 4, 7, 2, 5  # distinct sizes; 6 query heads
    k = torch.randn(L, B, T, G, D, generator=g, dtype=torch.float64)
    q = torch.randn(L, B, 6, D, generator=g, dtype=torch.float64)
    mapping = torch.tensor(kv_head_of)
    s = grouped_einsum(k, q, "layer batch key_pos kv_head d_head, layer batch head d_head -> "
                       "layer batch head key_pos", kv_head_of=mapping)
    assert s.shape == (L, B, 6, T)
    for h, grp in enumerate(kv_head_of):
        assert (s[:, :, h] - (k[:, :, :, grp] @ q[:, :, h, :, None])[..., 0]).abs().max() < F64_TOL
    z = grouped_einsum(s, k, "layer batch head key_pos, layer batch key_pos kv_head d_head -> "
                       "layer batch head d_head", kv_head_of=mapping)
    per_head = expand_kv(k, mapping, dim=3)
    for h in range(6):
        ref = (s[:, :, h, None, :] @ per_head[:, :, :, h])[:, :, 0]
        assert (z[:, :, h] - ref).abs().max() < F64_TOL


def test_llama_record_matches_explicit_reference_every_layer(tiny64):
    model = tiny64
    pairs = _pairs(model)
    rec = ip.trace(model, pairs, positions="all")
    theta = model.original_model.config.rope_parameters["rope_theta"]
    H, G, d = rec.n_heads, rec.n_kv_heads, rec.d_head
    assert (H, G) == (6, 2) and rec.kv_head_of.tolist() == [0, 0, 0, 1, 1, 1]
    for li, layer in enumerate(rec.layers):
        for b, pair in enumerate(pairs):
            n = len(pair.icl_ids)
            x = rec.attn_in[li, b, :n]  # pos d_model
            pos = torch.arange(n)
            q = _rotary(torch.einsum("pm,hmd->phd", x, rec.W_Q[li]), pos, theta)
            k_kv = _rotary(torch.einsum("pm,gmd->pgd", x, rec.weights["W_K"][li]), pos, theta)
            v_kv = torch.einsum("pm,gmd->pgd", x, rec.weights["W_V"][li])
            assert (rec.q[li, b, :n] - q).abs().max() < F64_TOL
            assert (rec.data["k"][li, b, :n] - k_kv).abs().max() < F64_TOL
            assert (rec.data["v"][li, b, :n] - v_kv).abs().max() < F64_TOL
            # GQA: query head h reads key/value group h // (H // G), checked by a plain loop
            for h in range(H):
                g = h // (H // G)
                assert torch.equal(rec.k[li, b, :n, h], rec.data["k"][li, b, :n, g])
                assert torch.equal(rec.W_V[li, h], rec.weights["W_V"][li, g])
            scores = torch.full((n, H, n), -math.inf, dtype=torch.float64)
            for i in range(n):
                for h in range(H):
                    g = h // (H // G)
                    scores[i, h, : i + 1] = (k_kv[: i + 1, g] @ q[i, h]) / math.sqrt(d)
            assert torch.equal(torch.isinf(rec.scores[li, b, :n, :, :n]), torch.isinf(scores))
            fin = torch.isfinite(scores)
            assert (rec.scores[li, b, :n, :, :n][fin] - scores[fin]).abs().max() < F64_TOL
            # Llama (HF and the bridge alike) takes the softmax in float32 whatever the dtype
            pattern = torch.softmax(scores.float(), -1).double()
            assert (rec.pattern[li, b, :n, :, :n] - pattern).abs().max() < F64_TOL
            z = torch.einsum("phk,khd->phd", pattern, v_kv[:, rec.kv_head_of])
            assert (rec.z[li, b, :n] - z).abs().max() < F64_TOL
            head_out = torch.einsum("phd,hdm->phm", z, rec.W_O[li])
            assert (rec.head_out[li, b, :n] - head_out).abs().max() < F64_TOL
            assert (rec.attn_out[li, b, :n] - head_out.sum(1)).abs().max() < F64_TOL
            assert (rec.resid_mid[li, b, :n] - rec.resid_pre[li, b, :n] - rec.attn_out[li, b, :n]
                    ).abs().max() < F64_TOL


def test_record_matches_plain_transformers_forward(tiny64):
    pairs = _pairs(tiny64)
    rec = ip.trace(tiny64, pairs, what=("mlp_in",))
    hf = tiny64.original_model
    for b, pair in enumerate(pairs):
        with torch.no_grad():
            out = hf(pair.icl_ids[None], output_hidden_states=True)
        assert (rec.logits[b] - out.logits[0, -1]).abs().max() < F64_TOL
        for li in rec.layers:
            layer = hf.model.layers[li]
            h_mid = None

            def grab(mod, inp, outp):
                nonlocal h_mid
                h_mid = outp
            handle = layer.post_attention_layernorm.register_forward_hook(grab)
            with torch.no_grad():
                hf(pair.icl_ids[None])
            handle.remove()
            assert (rec.mlp_in[li, b, 0] - h_mid[0, -1]).abs().max() < F64_TOL


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_other_architectures_exact_scores_and_outputs(arch):
    # neox: Pythia's layout, rotary on the first quarter of each head (rotary_pct = 0.25),
    # which the bridge's post-rotary hooks never see: trace rotates q and k itself
    model = ip.tiny_model(arch, dtype=torch.float64, seed=2, **TINY_FUSED)
    pairs = _pairs(model, n=2)
    rec = ip.trace(model, pairs, positions="all")
    assert rec.q_rotated
    for b, pair in enumerate(pairs):
        n = len(pair.icl_ids)
        with torch.no_grad():
            ref = model.original_model(pair.icl_ids[None]).logits[0, -1]
        assert (rec.logits[b] - ref).abs().max() < F64_TOL
        for li in rec.layers:
            x = rec.attn_in[li, b, :n]
            q = torch.einsum("pm,hmd->phd", x, rec.W_Q[li]) + rec.b_Q[li]
            k = torch.einsum("pm,hmd->phd", x, rec.W_K[li]) + rec.b_K[li]
            if arch == "neox":  # rotate-half over the first int(10 * 0.25) = 2 dims only
                theta = model.original_model.config.rope_parameters["rope_theta"]
                pos = torch.arange(n)
                q = torch.cat([_rotary(q[..., :2], pos, theta), q[..., 2:]], -1)
                k = torch.cat([_rotary(k[..., :2], pos, theta), k[..., 2:]], -1)
            assert (rec.q[li, b, :n] - q).abs().max() < F64_TOL
            assert (rec.k[li, b, :n] - k).abs().max() < F64_TOL
            s = torch.einsum("phd,khd->phk", q, k) / math.sqrt(rec.d_head)
            causal = torch.ones(n, n).tril().bool()[:, None, :].expand_as(s)
            assert (rec.scores[li, b, :n, :, :n][causal] - s[causal]).abs().max() < F64_TOL
            z = torch.einsum("phk,khd->phd", rec.pattern[li, b, :n, :, :n], rec.v[li, b, :n])
            assert (rec.z[li, b, :n] - z).abs().max() < F64_TOL
            out = rec.head_out[li, b, :n].sum(1) + rec.b_O[li]
            assert (rec.attn_out[li, b, :n] - out).abs().max() < F64_TOL


def test_batched_equals_unbatched(tiny64):
    pairs = _pairs(tiny64)
    assert len({len(p.icl_ids) for p in pairs}) == len(pairs)
    batched = ip.trace(tiny64, pairs, positions="demos", batch_size=3)
    for b, pair in enumerate(pairs):
        alone = ip.trace(tiny64, [pair], positions="demos")
        n_pos, n = int(alone.pos_mask.sum()), len(pair.icl_ids)
        assert torch.equal(batched.positions[b, :n_pos], alone.positions[0])
        assert batched.pred_slot[b] == alone.pred_slot[0]
        assert_row_equals_alone(batched, b, alone, n, F64_TOL)
        assert (batched.logits[b] - alone.logits[0]).abs().max() < F64_TOL


def test_positions_and_keys_are_selected(tiny64):
    pair = _pairs(tiny64, n=1)[0]
    rec = ip.trace(tiny64, [pair], what=("resid_pre", "k"), positions="labels",
                   key_positions="demos")
    labels = torch.cat([d.label.indices() for d in pair.spans.demos])
    expected = torch.cat([labels, torch.tensor([pair.spans.pred])])
    assert torch.equal(rec.positions[0], expected)
    assert rec.pred_slot[0] == len(expected) - 1
    assert torch.equal(rec.key_positions[0], pair.spans.demo_indices())
    full = ip.trace(tiny64, [pair], what=("resid_pre", "k"), positions="all")
    assert torch.equal(rec.resid_pre[:, 0], full.resid_pre[:, 0, expected])
    assert torch.equal(rec.data["k"][:, 0], full.data["k"][:, 0, pair.spans.demo_indices()])
    assert set(rec.data) == {"resid_pre", "k"}  # nothing else was kept
    # TransformerLens names index one layer
    assert torch.equal(rec["blocks.1.hook_resid_pre"], rec.resid_pre[1])
    with pytest.raises(KeyError, match="not in this record"):
        rec["blocks.1.attn.hook_pattern"]


def test_zero_shot_run_uses_the_suffix(tiny64):
    pair = _pairs(tiny64, n=1)[0]
    zs = ip.trace(tiny64, [pair], kind="zs", what=("pattern",))
    assert zs.lengths.tolist() == [len(pair.zs_ids)]
    with torch.no_grad():
        ref = tiny64.original_model(pair.zs_ids[None]).logits[0, -1]
    assert (zs.logits[0] - ref).abs().max() < F64_TOL


@pytest.mark.parametrize("kwargs, match", [
    (dict(what=("nonsense",)), "unknown"),
    (dict(layers=[5]), r"layer 5 is out of range; the model's layers are 0\.\.2"),
    (dict(positions=[[10_000]]), "positions"),
    (dict(positions="middle"), "expected 'pred'"),
    (dict(kind="few"), "'icl' or 'zs'"),
])
def test_bad_requests_name_the_problem(tiny64, kwargs, match):
    pair = _pairs(tiny64, n=1)[0]
    with pytest.raises(ip.IclProbeError, match=match):
        ip.trace(tiny64, [pair], **kwargs)


def test_empty_and_too_long_prompts(tiny64):
    with pytest.raises(ip.TraceError, match="no prompts"):
        ip.trace(tiny64, [])
    with pytest.raises(ip.TraceError, match="context holds"):
        ip.trace(tiny64, [torch.zeros(tiny64.cfg.n_ctx + 1, dtype=torch.long)])


def test_records_of_a_half_precision_model_share_one_stack_widened_on_access():
    model = ip.tiny_model(dtype=torch.bfloat16, seed=5)
    pairs = ip.build_prompts(model, "capital", range(2), k=2)
    a, b = ip.trace(model, pairs[:1]), ip.trace(model, pairs[1:])
    for name in ("W_Q", "W_K", "W_V", "W_O"):
        assert a.weights[name].dtype == torch.bfloat16  # stored in the model's dtype
        assert a.weights[name].data_ptr() == b.weights[name].data_ptr(), name  # one copy
        w = getattr(a, name)  # handed out in float32, exactly the model's values
        assert w.dtype == torch.float32
        stored = a.weights[name].float()
        if name in ("W_K", "W_V"):
            stored = stored[:, a.kv_head_of]
        assert torch.equal(w, stored)


def _assert_same_record(a, b):
    """Every field of two records equal, every tensor bit for bit and in the same dtype."""
    for f in ("layers", "n_heads", "n_kv_heads", "d_head", "hook_names", "kind", "q_rotated",
              "meta", "softcap", "window"):
        assert getattr(a, f) == getattr(b, f), f
    for group in ("data", "weights"):
        x, y = getattr(a, group), getattr(b, group)
        assert sorted(x) == sorted(y), group
        for name in x:
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name
    for f in ("kv_head_of", "lengths", "pred", "positions", "pos_mask", "pred_slot",
              "key_positions", "key_mask", "logits", "scale"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_saved_record_loads_back_bit_for_bit_without_the_model(tmp_path, dtype):
    model = ip.tiny_model(dtype=dtype, seed=5, **TINY_LLAMA)
    pairs = ip.build_prompts(model, "capital", range(3), k=2)
    rec = ip.trace(model, pairs, positions="all")  # every quantity, the weights, -inf scores
    rec.meta["note"] = {"k": 2, "tasks": ["capital"]}
    if dtype == torch.bfloat16:
        compact(rec, dtype)  # bf16 tensors beside float32 ones
        assert rec.data["scores"].dtype == torch.bfloat16
    path = rec.save(tmp_path / "rec" / "capital.safetensors")
    assert path.is_file() and (tmp_path / "rec" / "capital.safetensors.json").is_file()
    back = ip.load_record(path)
    _assert_same_record(rec, back)
    assert torch.equal(back.at_pred("scores"), rec.at_pred("scores"))  # analyses run on it
    assert torch.equal(back.W_K, rec.W_K)


def test_saving_and_loading_records_name_the_problem(tmp_path):
    model = ip.tiny_model(seed=5)
    rec = ip.trace(model, ip.build_prompts(model, "capital", range(2), k=2), what=("scores",))
    rec.meta["bad"] = torch.zeros(2)
    with pytest.raises(ip.TraceError, match="meta must hold JSON values"):
        rec.save(tmp_path / "r.safetensors")
    with pytest.raises(ip.TraceError, match=r"r.safetensors.json not found"):
        ip.load_record(tmp_path / "r.safetensors")
    del rec.meta["bad"]
    path = rec.save(tmp_path / "r.safetensors")
    (tmp_path / "r.safetensors.json").write_text('{"format": "something else"}')
    with pytest.raises(ip.TraceError, match="not an icl-probe record"):
        ip.load_record(path)
