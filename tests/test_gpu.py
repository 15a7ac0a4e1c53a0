"""GPU paths (CUDA, bf16); skipped where no CUDA device is present (CI never has one)."""

import numpy as np
import pytest
import torch

import icl_probe as ip
from icl_probe.compare.shen import shen_curves
from icl_probe.gd import EpochFineTune, finetune_epochs
from icl_probe.hooks import answer_logprobs, selfcheck, trace_shared_prefix

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# bfloat16 keeps 8 significant bits: each stored value carries a relative rounding of up to
# 2^-8 = 4e-3, about 1e-2 after a few ops. Between the embedding and the logits the tiny model
# rounds a few dozen times and the errors partly cancel: its logits differ from float32 by
# 0.4-0.7 % (relative, per prompt; measured with the same model in bf16 on CPU, seeds 0, 3, 12).
# 3e-2 leaves room for GPU kernels' other accumulation order.
BF16_LOGITS_REL_TOL = 3e-2
# Identities recomputed from bf16-rounded activations: ~2e-3 for scores, pattern, z and the
# MLP; the model-space form multiplies the rounded q by ΔW_ICL, whose product partly cancels,
# and reaches 1.3e-2 on this model (bf16 on CPU), 3e-2 on the embedded model
# (tests/test_architectures.py, BF16_TOL).
BF16_TOL = 5e-2


@cuda
def test_trace_probes_and_finetune_on_cuda_bf16():
    cpu = ip.tiny_model(seed=12)
    gpu = ip.tiny_model(seed=12, device="cuda", dtype="bf16")
    assert next(gpu.parameters()).device.type == "cuda"
    pairs = [ip.build_prompt(cpu, "capital", query=q, k=3, seed=q) for q in range(3)]
    a = ip.trace(cpu, pairs)
    b = ip.trace(gpu, pairs)
    # records of half-precision models are kept in float32 (icl_probe.hooks), on the device
    assert b.z.device.type == "cuda" and b.z.dtype == torch.float32
    drift = ((a.logits - b.logits.cpu()).norm(dim=-1) / a.logits.norm(dim=-1)).max().item()
    assert drift < BF16_LOGITS_REL_TOL, f"bf16 CUDA vs float32 CPU logits drift={drift:.2e}"
    worst = ip.verify_identities(gpu, pairs).groupby("identity").max_rel_err.max()
    assert (worst < BF16_TOL).all(), worst.to_dict()
    ft = ip.finetune(gpu, pairs[0], lr=1e-2)
    assert not ft.diverged and all(d.device.type == "cuda" for d in ft.deltas.values())
    assert ip.trace(ft.model, pairs[:1], kind="zs").logits.isfinite().all()


def _gqa_pairs(model, n=4, k=4):
    return [ip.build_prompt(model, "capital", query=q, demos=list(range(20, 20 + k)))
            for q in range(n)]


@cuda
@pytest.mark.parametrize("dtype", ["bf16", "float32"])
def test_fast_paths_check_themselves_and_pass_on_cuda(dtype):
    gpu = ip.tiny_model(seed=5, device="cuda", dtype=dtype, n_key_value_heads=2)
    pairs = _gqa_pairs(gpu)
    before = dict(selfcheck.PASSED)
    rec = trace_shared_prefix(gpu, pairs, what=("scores",), min_prefix=1)
    assert rec.meta["shared_prefix"] > 0 and rec.logits.device.type == "cuda"
    assert selfcheck.PASSED["trace_shared_prefix"] == before.get("trace_shared_prefix", 0) + 1
    slow = ip.trace(gpu, pairs, what=("scores",))
    tol = selfcheck.tolerance(next(gpu.parameters()).dtype)
    assert selfcheck.relative_error(rec.logits, slow.logits) < tol
    fast = answer_logprobs(gpu, pairs, "icl")
    assert selfcheck.PASSED["answer_logprobs"] == before.get("answer_logprobs", 0) + 1
    exact = answer_logprobs(gpu, pairs, "icl", fast=False)
    assert selfcheck.relative_error(fast, exact) < tol


@cuda
def test_a_drifted_cache_makes_the_fast_paths_raise_on_cuda(drifted_cache):
    gpu = ip.tiny_model(seed=5, device="cuda", dtype="bf16", n_key_value_heads=2)
    pairs = _gqa_pairs(gpu)
    with pytest.raises(ip.FastPathError, match="fast=False"):
        trace_shared_prefix(gpu, pairs, what=("scores",), min_prefix=1)
    with pytest.raises(ip.FastPathError, match="ICL_PROBE_FAST=0"):
        answer_logprobs(gpu, pairs[:2], "icl")
    slow = trace_shared_prefix(gpu, pairs, what=("scores",), min_prefix=1, fast=False)
    assert slow.logits.isfinite().all()


@cuda
def test_whole_model_epochs_on_cuda_bf16_checkpoint_and_restore_exactly():
    gpu = ip.tiny_model(seed=12, device="cuda", dtype="bf16")
    pair = ip.build_prompt(gpu, "capital", query=0, k=4, seed=0)
    before = {n: p.detach().clone() for n, p in gpu.named_parameters()}
    seen = []
    run = finetune_epochs(gpu, pair, EpochFineTune(params="all", epochs=4, lr=1e-2),
                          eval_every=2, keep_deltas=False,
                          checkpoint=lambda e, m: seen.append(
                              (e, ip.trace(m, [pair], kind="zs").logits.float().cpu())))
    assert run.diverged_at is None and [e for e, _ in seen] == [2, 4] and not run.deltas
    assert run.losses[-1][0] < run.losses[0][0]
    assert not torch.equal(seen[0][1], seen[1][1])  # the weights moved between checkpoints
    for n, p in gpu.named_parameters():
        assert torch.equal(p, before[n]), n


@cuda
def test_compare_and_shen_curves_run_on_cuda_and_agree_with_the_cpu():
    """Every metric of a compare() unit and of Shen's curves, on the GPU against the same
    model on the CPU, both in float64, with the random baselines drawn on the CPU (the same
    draws on every device). Measured on an H200: scores agree to 2e-8 of 0.085 and logits to
    7e-8 of 0.39, float32's precision, not float64's, because transformers' eager attention
    takes its softmax in float32 whatever the model's dtype. Every value agrees to 1e-6 but two
    that amplify it: SimAM_delta, a cosine between two differences of nearly equal score
    vectors (a fine-tune of 3 steps moves the scores by ~1e-5: it differed by up to 0.024),
    and Kendall's tau over near-tied attention weights (4e-5). The random-weight baseline
    models are drawn where the model lives, by that device's generator (a 7B float32 copy
    drawn on the CPU first would be 27 GB): on the GPU they are other random models, so their
    rows (and the model's paired differences with them) are checked for their keys only."""
    kw = dict(seed=12, dtype="float64")
    runs = {}
    for dev in ("cpu", "cuda"):
        model = ip.tiny_model(device=dev, **kw)
        tabs = ip.compare(model, "capital", k=3, queries=4, seeds=[0], progress=False,
                          gd=ip.FineTuneConfig(method="dai", params="kv", lr=1e-2))
        curves = shen_curves(model, "capital", n_demos=3, lrs=[1e-2], queries=4,
                             methods=[EpochFineTune(params="all", epochs=2)])
        runs[dev] = (tabs.summary, curves)
    (s_cpu, c_cpu), (s_gpu, c_gpu) = runs["cpu"], runs["cuda"]
    assert len(s_cpu) == len(s_gpu) and len(c_cpu) == len(c_gpu)
    random_models = ("untrained", "embeddings_only")
    assert s_cpu[["run", "metric", "baseline"]].equals(s_gpu[["run", "metric", "baseline"]])
    for a, b in ((s_cpu, s_gpu), (c_cpu, c_gpu)):
        if "run" in a:  # compare()'s summary: the model's own rows and in-run baselines
            same = ~(a.run.isin(random_models) | a.baseline.isin(random_models))
            assert same.sum() > len(a) / 2
            a, b = a[same.to_numpy()], b[same.to_numpy()]
        x, y = a["value"].to_numpy(float), b["value"].to_numpy(float)
        assert ((x != x) == (y != y)).all()  # NaN in the same places
        diff = abs(np.nan_to_num(x) - np.nan_to_num(y))
        loose = np.where(a.metric.astype(str) == "SimAM_delta", 0.05,
                         np.where(a.metric.astype(str).str.startswith("Kendall"), 1e-3, 1e-6))
        shown = a.assign(gpu=y)[diff > 1e-6][["metric", "value", "gpu"]].to_string()
        assert (diff <= loose).all(), shown
