"""The activation-patching helper (icl_probe.hooks.patching) against hand-computed patches."""

import pytest
import torch

import icl_probe as ip
from conftest import TINY_LLAMA
from icl_probe.hooks.patching import Patch, patching


@pytest.fixture(scope="module")
def model():
    return ip.tiny_model(dtype=torch.float64, seed=4, **TINY_LLAMA)


IDS = torch.tensor([[1, 5, 9, 4, 8], [1, 7, 3, 2, 6]])


def _capture(model, ids, name):
    seen = []
    with torch.inference_mode(), model.hooks(fwd_hooks=[(name, lambda x, hook=None:
                                                         seen.append(x.clone()))]):
        logits = model(ids)
    return logits, seen[0]


def test_replacing_the_residual_stream_with_another_prompts_reproduces_its_logits(model):
    # row 0's residual stream at layer 1 replaced, at every position, by row 1's: from there on
    # row 0 computes exactly what row 1 computes (the model sees no token of its own again)
    clean, resid = _capture(model, IDS, "blocks.1.hook_resid_pre")
    with torch.inference_mode(), patching(model, {"blocks.1.hook_resid_pre": Patch(resid[1],
                                                                                   rows=[0])}):
        patched = model(IDS)
    # (float64: a row's result depends on its place in the batch only at rounding level)
    assert torch.allclose(patched[0], clean[1], rtol=0, atol=1e-12)
    assert torch.equal(patched[1], clean[1])
    assert (clean[0] - clean[1]).abs().max() > 1e-3


def test_adding_at_one_position_moves_only_that_row_from_that_position_on(model):
    clean = model(IDS)
    with torch.inference_mode(), patching(model, {"blocks.0.hook_resid_pre": Patch(
            torch.zeros(model.cfg.d_model), mode="add")}):
        assert torch.equal(model(IDS), clean)  # adding zero changes nothing, bit for bit
    push = Patch(torch.full((model.cfg.d_model,), 0.5, dtype=torch.float64), rows=[1],
                 positions=[2], mode="add")
    with torch.inference_mode(), patching(model, {"blocks.2.hook_resid_pre": push}):
        out = model(IDS)
    assert torch.equal(out[0], clean[0]) and torch.equal(out[1, :2], clean[1, :2])  # causal
    assert (out[1, 2:] - clean[1, 2:]).abs().amax(-1).min() > 1e-6


def test_zeroing_one_heads_output_removes_exactly_its_share_of_the_attention_output(model):
    # attn_out = Σ_h z_h W_O[h] (+ b_O): with head 4's z zeroed at position 3 of row 1, the
    # attention output there drops by z_4 W_O[4], and nowhere else changes
    _, z = _capture(model, IDS, "blocks.1.attn.hook_z")
    _, out = _capture(model, IDS, "blocks.1.hook_attn_out")
    seen = []
    with torch.inference_mode(), patching(model, {"blocks.1.attn.hook_z": Patch(
            0.0, rows=[1], positions=[3], heads=[4])}), model.hooks(fwd_hooks=[(
            "blocks.1.hook_attn_out", lambda x, hook=None: seen.append(x.clone()))]):
        model(IDS)
    expected = out.clone()
    expected[1, 3] -= z[1, 3, 4] @ model.W_O[1, 4].detach()
    assert torch.allclose(seen[0], expected, rtol=0, atol=1e-12)
    assert torch.equal(seen[0][0], out[0])


def test_patching_names_the_problem_before_any_forward(model):
    cases = [({"blocks.1.hook_resid_prex": Patch(0.0)}, "has no hook 'blocks.1.hook_resid_prex'"),
             ({"blocks.1.hook_resid_pre": Patch(0.0, mode="set")}, "mode='set'"),
             ({"blocks.1.hook_resid_pre": Patch(0.0, positions=3)},
              r"positions=3.*positions=\[3\]"),
             ({"blocks.1.hook_resid_pre": "zero"}, "expected Patch")]
    for patches, match in cases:
        with pytest.raises(ip.TraceError, match=match):
            with patching(model, patches):
                raise AssertionError("the block ran")
    with pytest.raises(ip.TraceError, match="no head axis"):
        with torch.inference_mode(), patching(model, {"blocks.1.hook_resid_pre": Patch(
                0.0, heads=[0])}):
            model(IDS)
    with pytest.raises(ip.TraceError, match="position 9 is out of range"):
        with torch.inference_mode(), patching(model, {"blocks.1.hook_resid_pre": Patch(
                0.0, positions=[9])}):
            model(IDS)


def test_a_hook_that_never_fires_raises_on_exit_and_a_refused_one_at_once(model):
    # a rotary model adds no positional embedding: hook_pos_embed exists and never fires
    with pytest.raises(ip.TraceError, match=r"\['hook_pos_embed'\] never fired"):
        with torch.inference_mode(), patching(model, {"hook_pos_embed": Patch(0.0)}):
            model(IDS)
    # TransformerLens refuses hook_mlp_in until it is switched on
    with pytest.raises(ip.TraceError, match="refuses a hook: Cannot add hook blocks.0.hook_mlp_in"):
        with patching(model, {"blocks.0.hook_mlp_in": Patch(0.0)}):
            raise AssertionError("the block ran")
