"""Real gradient descent: hand-computed steps, finite differences, order (in)variance,
layer-causal GD, the fine-tuned view, divergence and determinism."""

import pytest
import torch
import torch.nn.functional as F

import icl_probe as ip
from icl_probe.gd import EpochFineTune, finetune_epochs, trainable_parameters
from icl_probe.gd.losses import _examples

F64_TOL = 1e-12


@pytest.fixture(scope="module")
def tiny():
    return ip.tiny_model(dtype=torch.float64, n_heads=4, n_key_value_heads=2, d_model=40,
                         d_head=10, seed=7)


@pytest.fixture(scope="module")
def pair(tiny):
    return ip.build_prompt(tiny, "capital", query=3, k=3, seed=2)


def _demo_loss(model, pair, i, layer_lens=None):
    """Reference loss of demonstration i: plain transformers forward, mean CE over its tokens."""
    ids, mask = _examples(pair)[i]
    t = mask.nonzero()[:, 0]
    logits = model.original_model(ids[None]).logits[0]
    return F.cross_entropy(logits[t - 1], ids[t])


def test_one_sgd_step_is_minus_lr_times_the_gradient(tiny, pair):
    lr = 0.037
    one = ip.build_prompt(tiny, "capital", query=3, k=1, seed=2)
    ft = ip.finetune(tiny, one, method="dai", params="kv", lr=lr)
    params = trainable_parameters(tiny, "kv")
    for p in params.values():
        p.requires_grad_(True)
    loss = _demo_loss(tiny, one, 0)
    grads = torch.autograd.grad(loss, list(params.values()))
    for p in params.values():
        p.requires_grad_(False)
    assert set(ft.deltas) == set(params)  # kv only: nothing else stored
    for (name, _), g in zip(params.items(), grads):
        assert (ft.deltas[name] + lr * g).abs().max() < F64_TOL, name
    assert abs(ft.losses[0] - loss.item()) < F64_TOL


def test_gradient_matches_finite_differences(tiny, pair):
    one = ip.build_prompt(tiny, "capital", query=3, k=1, seed=2)
    lr = 1e-3
    ft = ip.finetune(tiny, one, method="dai", params="v:1", lr=lr)
    (name, delta), = ft.deltas.items()
    p = trainable_parameters(tiny, "v:1")[name]
    # The bridge takes attention softmaxes (and transformers the rotary phases) in float32
    # even in a float64 model, so the loss carries float32-level noise: a small eps drowns in
    # it. eps = 1e-3 leaves a truncation error of ~1e-4 relative, hence the tolerance.
    eps = 1e-3
    for idx in [(0, 0), (3, 7), (p.shape[0] - 1, p.shape[1] - 1)]:
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + eps
            up = float(_demo_loss(tiny, one, 0))
            p[idx] = orig - eps
            down = float(_demo_loss(tiny, one, 0))
            p[idx] = orig
        fd = (up - down) / (2 * eps)
        grad = -delta[idx].item() / lr
        assert abs(grad - fd) < 1e-3 * abs(fd) + 1e-9, (idx, grad, fd)


def test_full_batch_gd_is_order_invariant_and_sgd_is_not(tiny):
    a = ip.build_prompt(tiny, "capital", query=3, k=3, seed=2)
    b = ip.build_prompt(tiny, "capital", query=3, k=3, seed=2, order=[2, 0, 1])
    assert a.demos != b.demos and sorted(a.demos) == sorted(b.demos)
    for method, invariant in (("batch", True), ("dai", False)):
        da = ip.finetune(tiny, a, method=method, lr=0.05, steps=2).deltas
        db = ip.finetune(tiny, b, method=method, lr=0.05, steps=2).deltas
        same = all(torch.equal(da[n], db[n]) for n in da)
        assert same == invariant, method


@pytest.mark.parametrize("loss_tokens", ["demo", "label"])
def test_lcgd_sends_no_gradient_to_earlier_layers(tiny, pair, loss_tokens):
    """Also checks that unembedding only the positions the loss reads changes nothing: the
    reference decodes every position."""
    lr = 0.02
    one = ip.build_prompt(tiny, "capital", query=3, k=1, seed=2)
    ft = ip.finetune(tiny, one, method="lcgd", params="kv", lr=lr, loss_tokens=loss_tokens)
    # reference: layer 0's parameters see only layer 0's logit-lens loss
    ids, mask = _examples(one, loss_tokens)[0]
    t = mask.nonzero()[:, 0]
    params = {n: p for n, p in trainable_parameters(tiny, "kv").items() if ".layers.0." in n}
    for p in params.values():
        p.requires_grad_(True)
    out = []
    with tiny.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook=None: out.append(x))]):
        tiny(ids[None])
    logits0 = tiny.unembed(tiny.ln_final(out[0]))[0]
    grads = torch.autograd.grad(F.cross_entropy(logits0[t - 1], ids[t]), list(params.values()))
    for p in params.values():
        p.requires_grad_(False)
    for (name, _), g in zip(params.items(), grads):
        assert (ft.deltas[name] + lr * g).abs().max() < F64_TOL, name
    # and it is not plain GD on the last layer's loss
    dai = ip.finetune(tiny, one, method="dai", params="kv", lr=lr)
    assert not torch.allclose(dai.deltas[name], ft.deltas[name])


def test_finetuned_view_sees_the_finetuned_weights(tiny, pair):
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    ft = ip.finetune(tiny, pair, method="adam", params="kv", lr=1e-2)
    assert all(torch.equal(before[n], p) for n, p in tiny.named_parameters())  # restored
    rec = ip.trace(ft.model, [pair], kind="zs", what=("attn_in", "v"), positions="all")
    base = ip.trace(tiny, [pair], kind="zs", what=("attn_in", "v"), positions="all")
    name = "model.layers.1.self_attn.v_proj.weight"
    W_V = tiny.W_V[1] + ft.deltas[name].T.reshape(tiny.cfg.d_model, 2, 10).permute(1, 0, 2)
    assert (rec.weights["W_V"][1] - W_V).abs().max() < F64_TOL  # record's weights are FT's
    v = torch.einsum("pm,gmd->pgd", rec.attn_in[1, 0], W_V)
    assert (rec.data["v"][1, 0] - v).abs().max() < F64_TOL  # and so are its activations
    assert (rec.data["v"][1, 0] - base.data["v"][1, 0]).abs().max() > 1e-6


def test_divergence_is_recorded_not_raised(tiny, pair):
    runs = ip.gd.finetune_sweep(tiny, pair, [1e-2, 1e300], method="dai", params="all")
    assert [r.diverged for r in runs] == [False, True]
    assert any(not torch.isfinite(d).all() for d in runs[1].deltas.values()) or \
        not all(map(lambda x: x == x and abs(x) != float("inf"), runs[1].losses))


def test_the_finiteness_check_sees_one_bad_element_and_survives_overflowing_sums():
    from icl_probe.gd.training import all_finite
    big = torch.full((1000,), 3e38)  # finite, but its sum overflows float32
    assert all_finite([big, torch.zeros(3)]) and all_finite([-big, big])
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.ones(500)
        t[317] = bad
        assert not all_finite([torch.zeros(4), t]), bad
        assert not all_finite([big, t.to(torch.bfloat16)]), bad
    inf_pair = torch.tensor([float("inf"), float("-inf")])  # sums to NaN
    assert not all_finite([inf_pair])


def test_finetune_leaves_the_model_in_eval_mode(tiny, pair):
    tiny.train()
    try:
        ip.finetune(tiny, pair, method="dai", params="kv", lr=1e-2)
        assert not any(m.training for m in tiny.modules())
        assert not any(m.training for m in tiny.original_model.modules())
    finally:
        tiny.eval()


def test_deterministic_and_parameter_sets(tiny, pair):
    a = ip.finetune(tiny, pair, method="adam", params="qkvo", lr=1e-3, seed=3)
    b = ip.finetune(tiny, pair, method="adam", params="qkvo", lr=1e-3, seed=3)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)
    assert {n.split(".")[-2] for n in a.deltas} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = ip.finetune(tiny, pair, params="mlp", lr=1e-3).deltas
    assert {n.split(".")[-2] for n in mlp} == {"gate_proj", "up_proj", "down_proj"}
    assert len(ip.finetune(tiny, pair, params="all", lr=1e-3).deltas) == \
        len({id(p) for p in tiny.parameters()})
    with pytest.raises(ip.FineTuneError, match="'v:L'"):
        ip.finetune(tiny, pair, params="kvx")
    with pytest.raises(ip.FineTuneError, match=r"layers 0\.\.2"):  # tiny_model(): 3 layers
        ip.finetune(tiny, pair, params="v:9")
    with pytest.raises(ip.FineTuneError, match="method"):
        ip.finetune(tiny, pair, method="sgd2")
    with pytest.raises(ip.FineTuneError, match="no demonstrations"):
        ip.finetune(tiny, ip.build_prompt(tiny, "capital", query=0, k=0))


def test_kendall_needs_the_step_queries(tiny, pair):
    ft = ip.finetune(tiny, pair, method="dai", lr=1e-3)
    assert len(ft.step_queries) == pair.k and ft.step_demos == list(range(pair.k))
    # Dai's examples: BOS + input + label (the separator stripped)
    n_tok = [len(d.input) + len(d.label) + 1 for d in pair.spans.demos]
    # layer x token: tiny_model()'s 3 layers
    assert [q.shape[:2] for q in ft.step_queries] == [torch.Size([3, n]) for n in n_tok]
    with_sep = ip.finetune(tiny, pair, method="dai", lr=1e-3, loss_tokens="demo+sep")
    assert [q.shape[1] for q in with_sep.step_queries] == [len(d.whole) + 1
                                                           for d in pair.spans.demos]


@pytest.mark.parametrize("loss_tokens", ["demo", "demo+sep", "label"])
def test_loss_tokens_select_the_scored_positions(pair, loss_tokens):
    for d, (ids, mask) in zip(pair.spans.demos, _examples(pair, loss_tokens)):
        scored = ids[mask].tolist()
        label = pair.icl_ids[d.label.slice].tolist()
        sep = pair.icl_ids[d.sep.slice].tolist()
        body = pair.icl_ids[d.input.start + 1: d.label.stop].tolist()  # BOS predicts token 0
        expected = {"demo": pair.icl_ids[d.input.start: d.label.stop].tolist(),
                    "demo+sep": pair.icl_ids[d.whole.slice].tolist(), "label": label}[loss_tokens]
        assert scored == expected, (loss_tokens, scored, body, sep)


def test_a_rising_loss_counts_as_divergence(tiny, pair):
    ok = ip.finetune(tiny, pair, method="dai", params="all", lr=1e-3)
    assert not ok.diverged and ok.divergence is None
    bad = ip.finetune(tiny, pair, method="dai", params="all", lr=50.0)
    assert bad.diverged and bad.divergence is not None
    assert "non-finite" in bad.divergence or bad.losses[-1] > 3 * bad.losses[0]
    with pytest.raises(ip.FineTuneError, match="steps"):
        ip.finetune(tiny, pair, method="batch", steps=0)


def test_all_finetune_view_patches_one_module_at_a_time(tiny, pair):
    ft = ip.finetune(tiny, pair, method="dai", params="all", lr=1e-3)
    assert len(ft.deltas) == len({id(p) for p in tiny.parameters()})
    with torch.no_grad():
        out = ft.model(pair.zs_ids[None])
    # reference: every parameter patched at once
    with ft.model.applied(), torch.no_grad():
        ref = tiny(pair.zs_ids[None])
    assert (out - ref).abs().max() < F64_TOL
    # never more than one module's parameters patched at a time (weight + bias at most)
    assert 1 <= ft.model.max_patched <= 2
    with torch.no_grad():
        base = tiny(pair.zs_ids[None])
    assert (out - base).abs().max() > 1e-8  # the deltas do act


def test_finetune_takes_a_config_and_refuses_settings_beside_it(tiny, pair):
    model = tiny
    cfg = ip.FineTuneConfig(method="batch", lr=5e-3, steps=2)
    a = ip.finetune(model, pair, cfg)
    b = ip.finetune(model, pair, "batch", lr=5e-3, steps=2)
    assert a.deltas.keys() == b.deltas.keys()
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)
    with pytest.raises(ip.FineTuneError, match="give lr in the FineTuneConfig"):
        ip.finetune(model, pair, cfg, lr=1e-2)
    with pytest.raises(ip.FineTuneError, match="FineTuneConfig\\(method='sgd'\\)"):
        ip.FineTuneConfig(method="sgd")


def test_a_finished_finetune_leaves_no_gradient_on_the_model(tiny, pair):
    # at LLaMA-7B size a kv fine-tune's gradients are 2 GiB: left on the parameters they would
    # stay there for as long as the model lives (measured on an H200 before this was fixed)
    for method in ("dai", "adam"):
        ft = ip.finetune(tiny, pair, method=method, params="kv", lr=1e-2)
        assert ft.deltas
        assert all(p.grad is None for p in tiny.parameters()), method
    run = finetune_epochs(tiny, pair, EpochFineTune(params="all", epochs=2, lr=1e-3))
    assert run.losses
    assert all(p.grad is None for p in tiny.parameters())
