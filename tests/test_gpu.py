"""GPU paths (CUDA, bf16); skipped where no CUDA device is present (CI never has one)."""

import pytest
import torch

import icl_probe as ip

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
