"""The fine-tune's fast path (steps on the unwrapped Hugging Face model, queries recorded by
plain PyTorch hooks) against the bridge's steps, its self-check, and where it applies."""

import contextlib

import pytest
import torch

import icl_probe as ip
from icl_probe.errors import FastPathError
from icl_probe.gd import training
from icl_probe.hooks import plain_attentions
from icl_probe.hooks.selfcheck import PASSED
from icl_probe.models import unwrapped

PATH = "fine-tune on the unwrapped model"


def _both(model, pair, method, **kw):
    before = PASSED.get(PATH, 0)
    fast = ip.finetune(model, pair, method, lr=1e-2, fast=True, **kw)
    checked = PASSED.get(PATH, 0) - before
    slow = ip.finetune(model, pair, method, lr=1e-2, fast=False, **kw)
    return fast, slow, checked


@pytest.mark.parametrize("method", ["dai", "batch", "adam"])
def test_fast_fine_tune_equals_the_bridge_bit_for_bit(embedded, method):
    """Losses, deltas and the recorded queries, on the embedded model (float32): the same
    modules run in the same order, so equal to the last bit, not to a tolerance."""
    pair = ip.build_prompt(embedded, "sentiment", query=0, k=3)
    fast, slow, checked = _both(embedded, pair, method)
    assert checked == 1  # the fast path ran, and checked itself once
    assert fast.losses == slow.losses
    assert fast.deltas.keys() == slow.deltas.keys()
    assert all(torch.equal(fast.deltas[n], slow.deltas[n]) for n in slow.deltas)
    assert len(fast.step_queries) == len(slow.step_queries) == (3 if method != "batch" else 0)
    for a, b in zip(fast.step_queries, slow.step_queries):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_fast_fine_tune_on_a_tiny_float64_model(tiny64):
    pair = ip.build_prompt(tiny64, "capital", query=1, k=2)
    fast, slow, checked = _both(tiny64, pair, "dai", params="qkvo")
    assert checked == 1 and fast.losses == slow.losses
    assert all(torch.equal(fast.deltas[n], slow.deltas[n]) for n in slow.deltas)
    for a, b in zip(fast.step_queries, slow.step_queries):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_the_bridge_is_whole_after_a_fast_fine_tune_even_on_error(tiny64):
    pair = ip.build_prompt(tiny64, "capital", query=1, k=2)
    with torch.inference_mode():
        before = tiny64(pair.icl_ids[None])
    names = [n for n, _ in tiny64.named_modules()]
    with pytest.raises(RuntimeError, match="inside"):
        with unwrapped(tiny64) as hf:
            assert not any("Bridge" in type(m).__name__ for m in hf.modules())
            raise RuntimeError("inside")
    ip.finetune(tiny64, pair, "dai", lr=1e-2)
    assert [n for n, _ in tiny64.named_modules()] == names
    with torch.inference_mode():
        assert torch.equal(tiny64(pair.icl_ids[None]), before)


def test_a_fast_path_that_drifts_raises(tiny64, monkeypatch):
    """A stand-in for a release where the unwrapped model no longer computes what the bridge
    does: the fine-tune refuses to go on, naming the way to the slow path."""
    pair = ip.build_prompt(tiny64, "capital", query=1, k=2)
    real = training.unwrapped

    class Drifted(torch.nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, **kw):
            out = self.hf(**kw)
            out.logits = out.logits * 1.01
            return out

    def drifted(model):
        cm = real(model)
        hf = cm.__enter__()
        try:
            yield Drifted(hf)
        finally:
            cm.__exit__(None, None, None)

    monkeypatch.setattr(training, "unwrapped", contextlib.contextmanager(drifted))
    with pytest.raises(FastPathError, match="fast=False"):
        ip.finetune(tiny64, pair, "dai", lr=1e-2)
    ft = ip.finetune(tiny64, pair, "dai", lr=1e-2, fast=False)  # the slow path still runs
    assert len(ft.losses) == 2


def test_families_without_plain_queries_take_the_bridge():
    """QK-norm (Gemma 3) and fused projections (GPT-NeoX) keep the bridge's steps."""
    for arch in ("gemma3", "neox"):
        model = ip.tiny_model(arch, seed=1, n_layers=2)
        assert plain_attentions(model) is None
        pair = ip.build_prompt(model, "capital", query=1, k=2)
        before = PASSED.get(PATH, 0)
        ft = ip.finetune(model, pair, "dai", lr=1e-2)
        assert PASSED.get(PATH, 0) == before and len(ft.losses) == 2
    assert plain_attentions(ip.tiny_model(seed=1, n_layers=2)) is not None


@pytest.mark.parametrize("method", ["dai", "batch"])
def test_the_fast_final_pass_equals_the_fine_tuned_views_two_forwards(embedded, method,
                                                                      monkeypatch):
    """The divergence rules' inputs (the watched example's loss after training, the zero-shot
    logits at p) come from one padded forward of the unwrapped model on the fast path; the
    bridge's path runs the fine-tuned view on each alone. Both are computed here, the second
    independently through the bridge and the view's patching."""
    pair = ip.build_prompt(embedded, "sentiment", query=0, k=3)
    train = ip.gd.trainable_parameters(embedded, "kv")
    examples = training._examples(pair, "demo")
    run = training._train(embedded, pair, train, examples, method, 1e-2, 1, 1, True, True)
    loss, zs = run["final"]
    view = ip.gd.FineTunedModel(embedded, run["deltas"])
    want_loss = training._final_loss(view, *examples[run["watched"]], method)
    want_zs = training._zero_shot_logits(view, pair)
    # float32 kernels of another shape (the padded batch): ~1e-6 here; a wrong mask or position
    # would move them by far more
    assert abs(loss - want_loss) <= 1e-4 * abs(want_loss)
    assert (zs - want_zs).abs().max() <= 1e-4 * want_zs.abs().max()
    # and finetune() reads them instead of running the view
    for name in ("_final_loss", "_zero_shot_logits"):
        monkeypatch.setattr(training, name, lambda *a, **k: pytest.fail("ran the view"))
    assert not ip.finetune(embedded, pair, method, lr=1e-2, fast=True).diverged
