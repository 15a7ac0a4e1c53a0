"""Every architecture family against references that do not go through the bridge: a plain
``transformers`` copy of the same weights (logits, ``output_attentions`` per layer, its own
projection modules) and explicit float64 rotary written out per frequency. Model identities
on every family, padding equivalence, Dai-FT on fused-QKV models, booting and its errors,
and bfloat16 on the embedded model.

Tiny models use distinct sizes (3 layers; Llama-style: d_model 42, 6 query heads over 2
key/value groups of d_head 12; fused/parallel families: d_model 48, 6 heads of d_head 8), so
a swapped axis cannot pass.
"""

import copy
import json

import pytest
import torch

import icl_probe as ip
from conftest import assert_row_equals_alone
from icl_probe import models
from icl_probe.models import attention_spec
from icl_probe.gd import named_parameters, split_projections
from icl_probe.gd.losses import _examples
from icl_probe.hooks import query_capture_hooks

F64_TOL = 1e-10  # float64 end to end: only summation order differs
# HF GPT-J computes q·k and the softmax in float32 whatever the model's dtype (its _attn
# casts q and k), so recomputing its scores in another summation order differs at float32
# rounding (measured 1e-7 relative).
GPTJ_F32_TOL = 1e-5
# HF's eager GPT-NeoX attention takes the softmax in float32; the bridge's NeoX path takes it
# in the model's dtype. Comparisons with the *plain* HF NeoX differ at float32 rounding
# (measured 5e-8 on patterns, 1e-8 on logits).
HF_NEOX_F32_TOL = 1e-6
# bfloat16 keeps 8 significant bits: every stored activation carries a relative rounding of
# up to 2^-8 = 4e-3, and the model rounds again after each op. Recomputed quantities agree
# to a few 1e-3; the model-space form multiplies the rounded q by ΔW_ICL, whose product
# partly cancels, and reaches 3e-2 (measured over all 30 layers of the embedded model).
BF16_TOL = 5e-2
F32_TOL = 1e-5  # float32 algebra on float32 records
# Dropping the rotary rotation R_p from the model-space form is an O(1) error (measured 0.79
# relative): any threshold orders of magnitude above float64 noise and below that detects it.
MISSING_ROTATION_MIN_ERR = 1e-2

LLAMA_SIZES = dict(n_layers=3, d_model=42, n_heads=6, n_key_value_heads=2, d_head=12, d_mlp=56)
FUSED_SIZES = dict(n_layers=3, d_model=48, n_heads=6, d_head=8, d_mlp=56)
WINDOW = 7  # far shorter than the prompts (50-140 byte tokens): the window bites
FAMILIES = {
    "llama": ("llama", LLAMA_SIZES, {}),
    "llama_yarn": ("llama", LLAMA_SIZES, dict(rope_parameters=dict(  # rope scaling
        rope_type="yarn", factor=4.0, rope_theta=10000.0, original_max_position_embeddings=128))),
    "mistral": ("mistral", LLAMA_SIZES, dict(sliding_window=WINDOW)),
    "qwen2": ("qwen2", LLAMA_SIZES, {}),  # q/k/v biases
    "qwen3": ("qwen3", LLAMA_SIZES, {}),  # QK-norm per head
    "olmo2": ("olmo2", LLAMA_SIZES, {}),  # QK-norm over all heads at once
    "gemma2": ("gemma2", LLAMA_SIZES, dict(sliding_window=WINDOW, query_pre_attn_scalar=20,
                                           attn_logit_softcapping=3.0)),
    "gemma3": ("gemma3", LLAMA_SIZES, dict(sliding_window=WINDOW, query_pre_attn_scalar=20)),
    "gpt2": ("gpt2", FUSED_SIZES, dict(scale_attn_by_inverse_layer_idx=True)),
    "neox": ("neox", FUSED_SIZES, dict(rotary_pct=0.25)),  # Pythia: parallel residual
    "neox_full_seq": ("neox", FUSED_SIZES, dict(rotary_pct=1.0, use_parallel_residual=False)),
    "gptj": ("gptj", FUSED_SIZES, {}),  # rotary_dim = d_head / 2, interleaved pairs
    "phi": ("phi", FUSED_SIZES, {}),  # partial_rotary_factor 0.5
}
_BUILT: dict[str, tuple] = {}


def _family(name):
    """(bridged model, plain transformers copy of the same weights), built once per session."""
    if name not in _BUILT:
        arch, sizes, extra = FAMILIES[name]
        hf, tok = models.tiny_hf_model(arch, seed=3, **sizes, **extra)
        assert not hf.config.architectures  # an in-memory model: the bridge must be helped
        plain = copy.deepcopy(hf).double().eval()
        model = ip.load_model(hf, tokenizer=tok, device="cpu", dtype=torch.float64)
        _BUILT[name] = (model, plain)
    return _BUILT[name]


def _pairs(model, n=2, k=1):
    return [ip.build_prompt(model, "capital", query=q, k=k + q, seed=q) for q in range(n)]


# ------------------------------------------------------------------------------ references


def _hf_qk(plain, family, layer, x):
    """q and k of ``layer`` computed by the plain transformers model's own modules from the
    attention input ``x`` (pos d_model): after QK-norm, before rotary (pos head d_head,
    pos kv_head d_head). Each family's layout, written out."""
    cfg = plain.config
    base = plain.base_model
    block = base.h[layer] if family in ("gpt2", "gptj") else base.layers[layer]
    n, H = x.shape[0], cfg.num_attention_heads
    with torch.no_grad():
        if family == "gpt2":  # Conv1D c_attn: [q | k | v] over the whole width
            q, k, _ = block.attn.c_attn(x).split(cfg.n_embd, dim=-1)
            return q.view(n, H, -1), k.view(n, H, -1)
        if family.startswith("neox"):  # query_key_value: per head [q | k | v]
            qkv = block.attention.query_key_value(x).view(n, H, 3, -1)
            return qkv[:, :, 0], qkv[:, :, 1]
        attn = block.attn if family == "gptj" else block.self_attn
        q, k = attn.q_proj(x), attn.k_proj(x)
        if family == "olmo2":  # one norm over all heads, before the head split
            q, k = attn.q_norm(q), attn.k_norm(k)
        d_head = q.shape[-1] // H
        q, k = q.view(n, H, d_head), k.view(n, -1, d_head)
        if family == "qwen3":  # per-head norm on (pos, head, d_head)
            q, k = attn.q_norm(q), attn.k_norm(k)
        if family == "gemma3":  # per-head norm on (head, pos, d_head)
            q = attn.q_norm(q.transpose(0, 1)).transpose(0, 1)
            k = attn.k_norm(k.transpose(0, 1)).transpose(0, 1)
        return q, k


def _rotary_reference(x, family, plain, layer):
    """Rotary written out one frequency at a time, float64 after the phases (which
    transformers computes in float32 whatever the dtype, so the reference does too)."""
    cfg = plain.config
    n, d = x.shape[0], x.shape[-1]
    pos = torch.arange(n).float()
    out = x.clone()
    if family == "gpt2":
        return out
    if family == "gptj":  # pairs (0,1), (2,3), ... over the first rotary_dim dims
        r = cfg.rotary_dim
        inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.int64) / r))
        for i in range(r // 2):
            c, s = (pos * inv[i]).cos().double()[:, None], (pos * inv[i]).sin().double()[:, None]
            a, b = x[..., 2 * i], x[..., 2 * i + 1]
            out[..., 2 * i], out[..., 2 * i + 1] = a * c - b * s, b * c + a * s
        return out
    rope = cfg.rope_parameters
    if "rope_theta" not in rope:  # Gemma 3: one base per layer type
        rope = rope[cfg.layer_types[layer]]
    r = int(d * rope.get("partial_rotary_factor", 1.0))
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    magnitude = 1.0
    if rope.get("rope_type", "default") != "default":  # YaRN: its frequencies and magnitude
        inv = plain.base_model.rotary_emb.inv_freq  # come from the plain model's rotary module
        magnitude = plain.base_model.rotary_emb.attention_scaling
    for i in range(r // 2):  # pairs (i, i + r/2) over the first r dims
        c = ((pos * inv[i]).cos() * magnitude).double()[:, None]
        s = ((pos * inv[i]).sin() * magnitude).double()[:, None]
        a, b = x[..., i], x[..., i + r // 2]
        out[..., i], out[..., i + r // 2] = a * c - b * s, b * c + a * s
    return out


# ------------------------------------------------------------------------------ booting


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_boots_from_a_config_without_architectures(family):
    model, plain = _family(family)
    assert model.original_model.config.architectures == [type(plain).__name__]
    spec = attention_spec(model)
    assert spec.family == type(plain).__name__
    ids = torch.arange(5, 60)
    with torch.no_grad():
        drift = (model(ids[None]) - plain(ids[None]).logits).abs().max().item()
    tol = HF_NEOX_F32_TOL if family.startswith("neox") else F64_TOL
    assert drift < tol, f"bridge vs plain transformers logits drift={drift:.2e}"


def test_a_directory_whose_config_lacks_architectures_boots(tmp_path):
    hf, tok = models.tiny_hf_model("gemma3", seed=1, **LLAMA_SIZES)
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("architectures")  # as a GGUF-converted config has it
    cfg_path.write_text(json.dumps(cfg))
    model = ip.load_model(str(tmp_path / "m"), device="cpu")
    assert model.original_model.config.architectures == ["Gemma3ForCausalLM"]


def test_an_unsupported_class_names_itself_and_the_nearest_families():
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    tok = models.byte_tokenizer()
    cfg = GPTNeoXJapaneseConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_multiple_size=2)
    with pytest.raises(ip.ModelLoadError) as err:
        ip.load_model(GPTNeoXJapaneseForCausalLM(cfg), tokenizer=tok, device="cpu")
    msg = str(err.value)
    assert "GPTNeoXJapaneseForCausalLM" in msg and "GPTNeoXForCausalLM" in msg
    assert "Traceback" not in msg


# ------------------------------------------------------------------------------ q, k, scores


@pytest.mark.parametrize("family", list(FAMILIES))
def test_q_and_k_are_what_the_model_multiplies(family):
    """Recorded q and k (every position, every layer) against the plain model's projections
    (and QK-norm) of the recorded attention input, rotated by the written-out reference."""
    model, plain = _family(family)
    pair = _pairs(model, n=1)[0]
    rec = ip.trace(model, [pair], what=("attn_in", "q", "k"), positions="all")
    n = len(pair.icl_ids)
    for li in range(3):
        q, k = _hf_qk(plain, family, li, rec.attn_in[li, 0, :n])
        q_ref = _rotary_reference(q, family, plain, li)
        k_ref = _rotary_reference(k, family, plain, li)
        assert (rec.q[li, 0, :n] - q_ref).abs().max() < F64_TOL, (family, li, "q")
        assert (rec.data["k"][li, 0, :n] - k_ref).abs().max() < F64_TOL, (family, li, "k")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patterns_and_logits_match_plain_transformers(family):
    """Every layer's attention pattern (all positions) against the plain model's
    output_attentions: the scale, soft-capping, sliding window and rotary all feed it."""
    model, plain = _family(family)
    pairs = [ip.build_prompt(model, "capital", query=1, k=2, seed=1)]
    rec = ip.trace(model, pairs, what=("pattern",), positions="all")
    tol = GPTJ_F32_TOL if family == "gptj" else HF_NEOX_F32_TOL if family.startswith("neox") \
        else F64_TOL
    for b, pair in enumerate(pairs):
        n = len(pair.icl_ids)
        with torch.no_grad():
            out = plain(pair.icl_ids[None], output_attentions=True)
        assert (rec.logits[b] - out.logits[0, -1]).abs().max() < max(tol, F64_TOL)
        for li in range(3):
            ref = out.attentions[li][0].permute(1, 0, 2)  # pos head key_pos
            drift = (rec.pattern[li, b, :n, :, :n] - ref).abs().max().item()
            assert drift < tol, f"{family} layer {li}: pattern vs HF eager drift={drift:.2e}"


def test_scale_softcap_and_windows_are_read_off_the_model():
    expect = {  # family: (scale per layer, softcap, window per layer)
        "llama": ([12 ** -0.5] * 3, None, [None] * 3),
        "mistral": ([12 ** -0.5] * 3, None, [WINDOW] * 3),
        "gemma2": ([20 ** -0.5] * 3, 3.0, [WINDOW, None, WINDOW]),
        "gemma3": ([20 ** -0.5] * 3, None, [WINDOW, None, WINDOW]),
        "gpt2": ([8 ** -0.5 / (l + 1) for l in range(3)], None, [None] * 3),
        "neox": ([8 ** -0.5] * 3, None, [None] * 3),
        "gptj": ([8 ** -0.5] * 3, None, [None] * 3),
    }
    for family, (scale, cap, window) in expect.items():
        model, _ = _family(family)
        rec = ip.trace(model, _pairs(model, n=1), what=("z",))
        assert torch.allclose(rec.scale, torch.tensor(scale, dtype=torch.float64), rtol=1e-15)
        assert rec.softcap == (cap,) * 3 and list(rec.window) == window, family


# ------------------------------------------------------------------------------ identities


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_model_identity_holds(family):
    model, _ = _family(family)
    df = ip.verify_identities(model, _pairs(model))
    identities = df[df.kind == "model identity"].groupby("identity").max_rel_err.max()
    checks = df[df.kind == "consistency check"].groupby("identity").max_rel_err.max()
    # GPT-J's bridge fires hook_attn_scores with the pattern: no independent scores hook
    expected = {"pattern", "z", "attn_out", "mlp_rank1", "model_space"} | \
        (set() if family == "gptj" else {"scores"})
    assert set(identities.index) == expected
    assert set(checks.index) == {"dual_form", "demo_terms_sum", "softmax_split",
                                 "mlp_pre_rank1", "mlp_delta_rank1"}
    tol = {"pattern": GPTJ_F32_TOL} if family == "gptj" else {}
    for name, err in identities.items():
        assert err < tol.get(name, F64_TOL), f"{family}: model identity {name} = {err:.1e}"
    assert (checks < F64_TOL).all(), checks.to_dict()
    assert set(df[df.identity == "model_space"].layer) == {0, 1, 2}


def test_model_space_identity_catches_a_missing_rotation():
    """The model-space identity is not tautological: dropping R_p breaks it."""
    model, _ = _family("neox_full_seq")
    pairs = _pairs(model)
    up = ip.implied_updates(model, pairs, model_space=[1])
    rec = up.records["icl"]
    r_p = rec.at_pred("attn_in")[1]
    dW = up.dW_icl[1]
    unrotated = torch.einsum("hvm,bhvk,hnk->bhmn", rec.W_O[1], dW, rec.W_Q[1])
    via_q = torch.einsum("bhvk,bhk,hvm->bhm", dW, up.q[1], rec.W_O[1])
    wrong = torch.einsum("bhmn,bn->bhm", unrotated, r_p)
    right = torch.einsum("bhmn,bn->bhm", up.model_space[0], r_p) + up.model_space_bias[0]
    assert ((right - via_q).norm() / via_q.norm()) < F64_TOL
    assert ((wrong - via_q).norm() / via_q.norm()) > MISSING_ROTATION_MIN_ERR


# ------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("family", ["gemma3", "neox", "gptj"])
def test_batched_equals_unbatched(family):
    """Right padding changes nothing, under sliding windows and rotation done here too."""
    model, _ = _family(family)
    pairs = _pairs(model, n=3)
    assert len({len(p.icl_ids) for p in pairs}) == 3
    what = ("q", "k", "v", "scores", "pattern", "z", "attn_out", "mlp_in", "mlp_out")
    batched = ip.trace(model, pairs, what=what, positions="labels", batch_size=3)
    for b, pair in enumerate(pairs):
        alone = ip.trace(model, [pair], what=what, positions="labels")
        assert_row_equals_alone(batched, b, alone, len(pair.icl_ids), F64_TOL, family)


# ------------------------------------------------------------------------------ fine-tuning


def _fused_delta(family, model, ft):
    """The deltas on the checkpoint's fused QKV parameter, assembled by hand from the per
    projection deltas: GPT-2's Conv1D c_attn is [q | k | v] over its columns; GPT-NeoX's
    query_key_value holds, per head h, rows [q_h | k_h | v_h]. Also the output projection's
    (c_proj: Conv1D (H·D, d_model); dense: Linear (d_model, H·D))."""
    pd = ft.projection_deltas()
    H, D = model.cfg.n_heads, model.cfg.d_head
    W, B, O = {}, {}, {}
    for l in sorted({int(key.split(".")[1]) for key in pd}):
        w_o = pd[f"blocks.{l}.attn.W_O"].reshape(H * D, -1)  # (H D, d_model)
        O[l] = (w_o if family == "gpt2" else w_o.T, pd[f"blocks.{l}.attn.b_O"])
        w = {p: pd[f"blocks.{l}.attn.W_{p}"] for p in "QKV"}  # head d_model d_head
        b = {p: pd[f"blocks.{l}.attn.b_{p}"] for p in "QKV"}  # head d_head
        if family == "gpt2":  # (d_model, 3 H D)
            W[l] = torch.cat([w[p].permute(1, 0, 2).reshape(-1, H * D) for p in "QKV"], 1)
            B[l] = torch.cat([b[p].reshape(-1) for p in "QKV"])
        else:  # (3 H D, d_model), head-major
            rows, bias = [], []
            for h in range(H):
                for p in "QKV":
                    rows.append(w[p][h].T)
                    bias.append(b[p][h])
            W[l], B[l] = torch.cat(rows, 0), torch.cat(bias)
    return W, B, O


@pytest.mark.parametrize("family, params", [
    ("gpt2", "kv"), ("neox", "kv"), ("llama", "kv"),  # Dai-FT's set on fused and separate QKV
    ("gpt2", "qkvo"), ("neox", "v:1"),  # the output projection's layout; one layer's W_V
])
def test_finetune_moves_exactly_the_selected_projections(family, params):
    model, plain = _family(family)
    pair = ip.build_prompt(model, "capital", query=1, k=2, seed=1)
    before = {n: p.detach().clone() for n, p in named_parameters(model).items()}
    ft = ip.finetune(model, pair, method="dai", params=params, lr=0.05, record_queries=False)
    after = named_parameters(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # restored bit for bit
    moved = {"kv": "KV", "qkvo": "QKVO", "v:1": "V"}[params]
    pd = ft.projection_deltas()
    for key, delta in pd.items():
        layer, proj = int(key.split(".")[1]), key[-1]
        should = proj in moved and (params != "v:1" or layer == 1)
        if not should:
            assert torch.equal(delta, torch.zeros_like(delta)), key  # exactly 0
        elif key.split(".")[-1].startswith("W"):
            assert delta.abs().max() > 1e-8, key
    # the fused view: the plain checkpoint with its fused matrix updated row by row must
    # compute what the fine-tuned model computes
    if family in ("gpt2", "neox"):
        W, B, O = _fused_delta(family, model, ft)
        patched = copy.deepcopy(plain)
        for l in W:  # the layers the fine-tune touched
            attn = patched.transformer.h[l].attn if family == "gpt2" else \
                patched.gpt_neox.layers[l].attention
            fused, out = (attn.c_attn, attn.c_proj) if family == "gpt2" else \
                (attn.query_key_value, attn.dense)
            with torch.no_grad():
                fused.weight += W[l]
                fused.bias += B[l]
                out.weight += O[l][0]
                out.bias += O[l][1]
        with torch.no_grad():
            got, want = ft.model(pair.zs_ids[None])[0, -1], patched(pair.zs_ids[None]).logits[0, -1]
            base = plain(pair.zs_ids[None]).logits[0, -1]
        tol = HF_NEOX_F32_TOL if family == "neox" else F64_TOL
        assert (got - want).abs().max() < tol
        assert (got - base).abs().max() > 100 * tol  # and the fine-tune did move the output


def test_projection_layout_is_the_bridges():
    """split_projections puts each parameter where the bridge's own W_Q ... b_O have it."""
    for family in ("gpt2", "neox", "qwen2", "gptj"):
        model, _ = _family(family)
        named = {n: p.detach() for n, p in named_parameters(model).items()}
        split = split_projections(model, named)
        for key, x in split.items():
            layer, name = int(key.split(".")[1]), key.split(".")[-1]
            assert torch.equal(x, getattr(model, name)[layer]), (family, key)


@pytest.mark.parametrize("family", ["neox", "gptj"])
def test_query_hooks_record_the_rotated_queries(family):
    model, _ = _family(family)
    pair = _pairs(model, n=1)[0]
    store = []
    with torch.no_grad(), model.hooks(fwd_hooks=query_capture_hooks(model, store)):
        model(pair.icl_ids[None])
    rec = ip.trace(model, [pair], what=("q",), positions="all")
    assert len(store) == 3
    for li in range(3):
        assert (store[li] - rec.q[li, 0]).abs().max() < F64_TOL


@pytest.mark.parametrize("family", ["neox", "gptj"])
def test_finetune_step_queries_are_post_rotary(family):
    """Kendall's FT side reads the queries each step used: after rotary on every family."""
    model, _ = _family(family)
    pair = ip.build_prompt(model, "capital", query=1, k=2, seed=1)
    ft = ip.finetune(model, pair, method="dai", params="kv", lr=0.05)
    ids, _ = _examples(pair)[0]
    rec = ip.trace(model, [ids], what=("q",), positions="all")  # step 0 ran the base model
    assert (ft.step_queries[0] - rec.q[:, 0]).abs().max() < F64_TOL


# ------------------------------------------------------------------------------ bfloat16


def test_half_precision_records_are_float32():
    model = ip.tiny_model("neox", dtype=torch.bfloat16, seed=1, **FUSED_SIZES)
    rec = ip.trace(model, _pairs(model), what=("q", "k", "scores", "pattern", "z"))
    assert {x.dtype for x in (*rec.data.values(), rec.logits, rec.W_Q, rec.W_K, rec.W_V,
                              rec.W_O)} == {torch.float32}
    assert {w.dtype for w in rec.weights.values()} == {torch.bfloat16}  # the stack: model dtype


def test_bf16_identities_hold_to_bf16_on_the_embedded_model():
    """The GPU path (bfloat16) on CPU: the embedded model in bf16, records in float32."""
    model = ip.load_model(device="cpu", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    pairs = [ip.build_prompt(model, "capital", query=q, k=2, seed=q) for q in range(2)]
    df = ip.verify_identities(model, pairs, layers=[0, 14, 29])
    identities = df[df.kind == "model identity"].groupby("identity").max_rel_err.max()
    assert set(identities.index) == {"scores", "pattern", "z", "attn_out", "mlp_rank1",
                                     "model_space"}
    assert (identities < BF16_TOL).all(), identities.to_dict()
    # the algebra runs on float32 records: float32-tight, except softmax_split, which
    # rebuilds the model's own bf16 z from its pattern and values
    checks = df[(df.kind == "consistency check") & (df.identity != "softmax_split")]
    assert (checks.max_rel_err < F32_TOL).all(), checks.to_dict()
    assert (df[df.identity == "softmax_split"].max_rel_err < BF16_TOL).all()
