"""Fine-tuning over many epochs with checkpoints (icl_probe.gd.epochs): a checkpoint equals a
separate run stopped at that epoch, full-batch GD ignores the demonstrations' order, the
label-only loss reads only label tokens, and sub-model GD moves only its layer's W_V."""

import pytest
import torch

import icl_probe as ip
from icl_probe.gd import EpochFineTune, finetune_epochs, named_parameters, sub_model_layer
from icl_probe.gd.losses import _examples


@pytest.fixture(scope="module")
def model():
    # distinct sizes: 4 layers (mid 2, deep 3), 6 heads over 2 kv heads
    return ip.tiny_model(dtype=torch.float64, seed=5, n_layers=4, n_heads=6,
                         n_key_value_heads=2, d_head=10, d_model=42, d_mlp=72)


@pytest.fixture(scope="module")
def pair(model):
    return ip.build_prompt(model, "capital", query=3, k=4, seed=2)


def _zs_logits(model, pair):
    """The fine-tuned model's logits at the prediction position of the zero-shot prompt."""
    return ip.trace(model, [pair], kind="zs", what=("attn_out",), layers=[0]).logits[0].clone()


def _logits_at_checkpoints(model, pair, cfg, eval_every):
    seen = {}
    finetune_epochs(model, pair, cfg, eval_every=eval_every,
                    checkpoint=lambda epoch, m: seen.__setitem__(epoch, _zs_logits(m, pair)))
    return seen


@pytest.mark.parametrize("cfg", [
    EpochFineTune(params="all", optimizer="sgd", batch_size=1, epochs=5, lr=1e-2),
    EpochFineTune(params="kv", optimizer="adam", batch_size=2, epochs=5, lr=1e-3),
], ids=["sgd-b1-all", "adam-b2-kv"])
def test_a_checkpoint_equals_a_separate_run_stopped_there(model, pair, cfg):
    seen = _logits_at_checkpoints(model, pair, cfg, eval_every=2)
    assert sorted(seen) == [2, 4, 5]  # every second epoch, and the last
    for epoch in (2, 4):
        stopped = EpochFineTune(**{**cfg.__dict__, "epochs": epoch})
        alone = _logits_at_checkpoints(model, pair, stopped, eval_every=epoch)
        # the same steps on the same weights in float64: identical, bit for bit
        assert torch.equal(alone[epoch], seen[epoch]), epoch
    assert not torch.equal(seen[2], seen[4])  # the run did train between checkpoints


def test_the_base_weights_come_back_exactly(model, pair):
    before = {n: p.detach().clone() for n, p in named_parameters(model).items()}
    run = finetune_epochs(model, pair, EpochFineTune(epochs=3, lr=1e-2, batch_size=2))
    assert len(run.losses) == 3 and all(len(e) == 2 for e in run.losses)  # 4 demos, b = 2
    for n, p in named_parameters(model).items():
        assert torch.equal(p, before[n]), n
    assert any(d.abs().max() > 0 for d in run.deltas.values())


def test_full_batch_gd_ignores_the_order_at_every_epoch_and_sgd_does_not(model, pair):
    reordered = ip.build_prompt(model, "capital", query=3, demos=list(reversed(pair.demos)),
                                seed=2)
    assert sorted(reordered.demos) == sorted(pair.demos) and reordered.demos != pair.demos
    full = EpochFineTune(params="all", batch_size=None, epochs=4, lr=5e-2)
    a = _logits_at_checkpoints(model, pair, full, eval_every=1)
    b = _logits_at_checkpoints(model, reordered, full, eval_every=1)
    for epoch in range(1, 5):
        assert torch.equal(a[epoch], b[epoch]), epoch  # exactly 0 order sensitivity
    sgd = EpochFineTune(params="all", batch_size=1, epochs=4, lr=5e-2)
    a = _logits_at_checkpoints(model, pair, sgd, eval_every=1)
    b = _logits_at_checkpoints(model, reordered, sgd, eval_every=1)
    assert all((a[e] - b[e]).abs().max() > 1e-6 for e in range(1, 5))


def test_the_label_only_loss_reads_exactly_the_label_tokens(pair):
    examples = _examples(pair, "label")
    bos = 1 if pair.spans.bos is not None else 0
    for (ids, mask), d in zip(examples, pair.spans.demos):
        # an example is BOS + input + label; its label tokens sit after BOS and the input
        want = torch.zeros(len(ids), dtype=torch.bool)
        want[bos + len(d.input): bos + len(d.input) + len(d.label)] = True
        assert torch.equal(mask, want)
        assert torch.equal(ids[want], pair.icl_ids[d.label.slice])


@pytest.mark.parametrize("which,layer", [("v:mid", 2), ("v:deep", 3)])
def test_sub_model_gd_moves_only_its_layers_w_v(model, pair, which, layer):
    assert sub_model_layer(which, model.cfg.n_layers) == layer
    assert sub_model_layer("v:mid", 30) == 15 and sub_model_layer("v:deep", 30) == 22
    before = {n: p.detach().clone() for n, p in named_parameters(model).items()}
    changed = []

    def look(epoch, m):
        changed.extend(n for n, p in named_parameters(m).items() if not torch.equal(p, before[n]))

    run = finetune_epochs(model, pair, EpochFineTune(params=which, epochs=2, lr=1e-1),
                          checkpoint=look, eval_every=2)
    name = f"model.layers.{layer}.self_attn.v_proj.weight"
    assert sorted(run.deltas) == [name] and changed == [name]


@pytest.mark.parametrize("kwargs,match", [
    (dict(optimizer="rmsprop"), "optimizer"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(epochs=0), "epochs"),
    (dict(lr=-1.0), "lr"),
    (dict(loss_tokens="query"), "loss_tokens"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ip.FineTuneError, match=match):
        EpochFineTune(**kwargs)


def test_bad_eval_every_and_unknown_sub_model_layer(model, pair):
    with pytest.raises(ip.FineTuneError, match="eval_every"):
        finetune_epochs(model, pair, EpochFineTune(), eval_every=0)
    with pytest.raises(ip.FineTuneError, match="v:mid"):
        sub_model_layer("v:top", 4)
