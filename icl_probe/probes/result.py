"""The result of :func:`~icl_probe.probes.implied_updates`: every implied update per layer
and query head at the prediction position, with its tidy table."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from ..hooks import AttentionRecord, expand_kv
from ..prompts import PromptPair
from .mlp import _MlpDelta

# Shapes of the results, in the glossary's axis names (jaxtyping; tests/test_shapes.py checks
# them on a real result, and against the table in ImpliedUpdates' docstring). Aliases rather
# than inline strings: pyflakes reads a string inside an annotation as Python.
_HeadMatrices = Float[torch.Tensor, "layer batch head d_head d_head"]


_DemoMatrices = Float[torch.Tensor, "layer batch demo head d_head d_head"]


_DemoNorms = Float[torch.Tensor, "layer batch demo head"]


_DemoMask = Bool[torch.Tensor, "batch demo"]


_HeadScalars = Float[torch.Tensor, "layer batch head"]


_HeadVectors = Float[torch.Tensor, "layer batch head d_head"]


_MlpVectors = Float[torch.Tensor, "layer batch d_mlp"]


_ResidVectors = Float[torch.Tensor, "layer batch d_model"]


# model_space_layer indexes model_space_layers (a subset of layers)
_ModelSpace = Float[torch.Tensor, "model_space_layer batch head d_model d_model"]


_ModelSpaceBias = Float[torch.Tensor, "model_space_layer batch head d_model"]


_HeadRanks = Int[torch.Tensor, "layer batch head"]


_PromptScalars = Float[torch.Tensor, "layer batch"]


@dataclass
class ImpliedUpdates:
    """Implied updates for a batch of prompt pairs (see the module docstring).

    Tensors (``layer`` indexes ``layers``, ``model_space_layer`` indexes
    ``model_space_layers``; the field annotations say the same, and tests/test_shapes.py checks
    both against a real result)::

        dW_icl            layer batch head d_head d_head       Σ_{j∈D} v_j ⊗ k_j
        W_zs              layer batch head d_head d_head       Σ_{j∈Q} v_j ⊗ k_j
        demo_terms        layer batch demo head d_head d_head  ΔW_i (only with per_demo=True)
        demo_norms        layer batch demo head                ‖ΔW_i‖_F
        demo_mask         batch demo                           real demonstrations
        lam               layer batch head                     attention mass on demonstrations
        z, z_Q, z_D       layer batch head d_head              the real z and the split's parts
                                                               (0 for a side without mass)
        q                 layer batch head d_head              the query at p (after rotary)
        fidelity_err      layer batch head                     min_c ‖h − c h_lin‖ / ‖h‖
        mlp_a[name]       layer batch d_mlp                    W (u_ctx − u_0)
        mlp_b             layer batch d_model                  u_0 / ‖u_0‖²   (ΔW = a bᵀ)
        u_ctx, u_0        layer batch d_model                  MLP inputs at p (ICL, ZS)
        mlp_out_icl       layer batch d_model                  MLP output at p (ICL)
        model_space       model_space_layer batch head d_model d_model    M (on request)
        model_space_bias  model_space_layer batch head d_model            c (on request)
    """

    layers: tuple[int, ...]
    pairs: list[PromptPair]
    dW_icl: _HeadMatrices
    W_zs: _HeadMatrices
    demo_norms: _DemoNorms
    demo_mask: _DemoMask
    lam: _HeadScalars
    z: _HeadVectors
    z_Q: _HeadVectors
    z_D: _HeadVectors
    q: _HeadVectors
    fidelity_err: _HeadScalars
    mlp_a: dict[str, _MlpVectors]
    mlp_b: _ResidVectors
    u_ctx: _ResidVectors
    u_0: _ResidVectors
    mlp_out_icl: _ResidVectors
    records: dict[str, AttentionRecord] = field(repr=False, default_factory=dict)
    demo_terms: _DemoMatrices | None = None
    model_space: _ModelSpace | None = None
    model_space_bias: _ModelSpaceBias | None = None
    model_space_layers: tuple[int, ...] = ()

    def dW_icl_rank(self) -> _HeadRanks:
        """Numerical rank of ΔW_ICL per layer, prompt and head (layer batch head). Heads of a
        key/value group share k and v, hence ΔW_ICL: one SVD per group, expanded."""
        kv_head_of = self.records["icl"].kv_head_of
        first = [kv_head_of.tolist().index(g) for g in range(int(kv_head_of.max()) + 1)]
        ranks = torch.linalg.matrix_rank(self.dW_icl[:, :, first])  # layer batch kv_head
        return expand_kv(ranks, kv_head_of, dim=2)

    def mlp_delta(self, name: str, layer: int, prompt: int) -> _MlpDelta:
        """The rank-1 matrix ΔW (d_mlp, d_model) of MLP input map ``name`` ("gate"/"in")."""
        li = self.layers.index(layer)
        return torch.outer(self.mlp_a[name][li, prompt], self.mlp_b[li, prompt])

    def mlp_delta_norm(self, name: str) -> _PromptScalars:
        """‖ΔW‖_F = ‖a‖ ‖b‖ per layer and prompt (layer batch)."""
        return self.mlp_a[name].norm(dim=-1) * self.mlp_b.norm(dim=-1)

    def table(self, ranks: bool = True) -> pd.DataFrame:
        """Tidy table: one row per (prompt, layer, head, demo, quantity). ``head`` and ``demo``
        are -1 where they do not apply."""
        L, B, H = self.lam.shape
        rows: list[pd.DataFrame] = []

        def add(q: str, x: torch.Tensor, per_head: bool) -> None:
            x = x.detach().float().cpu()
            li, b, h = torch.meshgrid(torch.arange(L), torch.arange(B),
                                      torch.arange(H if per_head else 1), indexing="ij")
            rows.append(pd.DataFrame({
                "prompt": b.flatten().numpy(),
                "layer": torch.tensor(self.layers)[li.flatten()].numpy(),
                "head": (h.flatten() if per_head else torch.full((li.numel(),), -1)).numpy(),
                "demo": -1, "quantity": q, "value": x.reshape(-1).numpy(),
            }))

        add("dW_icl_norm", self.dW_icl.flatten(-2).norm(dim=-1), True)
        add("W_zs_norm", self.W_zs.flatten(-2).norm(dim=-1), True)
        if ranks:
            add("dW_icl_rank", self.dW_icl_rank().float(), True)
        add("lambda", self.lam, True)
        add("fidelity_err", self.fidelity_err, True)
        for name, a in self.mlp_a.items():
            add(f"mlp_dW_{name}_norm", self.mlp_delta_norm(name), False)
        add("u_shift_rel", (self.u_ctx - self.u_0).norm(dim=-1) / self.u_0.norm(dim=-1), False)
        # per-demonstration norms
        Lz, Bz, D, Hz = self.demo_norms.shape
        li, b, d, h = torch.meshgrid(*(torch.arange(n) for n in (Lz, Bz, D, Hz)), indexing="ij")
        keep = self.demo_mask[b.flatten(), d.flatten()]
        rows.append(pd.DataFrame({
            "prompt": b.flatten()[keep].numpy(),
            "layer": torch.tensor(self.layers)[li.flatten()[keep]].numpy(),
            "head": h.flatten()[keep].numpy(), "demo": d.flatten()[keep].numpy(),
            "quantity": "dW_icl_demo_norm",
            "value": self.demo_norms.float().cpu().flatten()[keep].numpy(),
        }))
        df = pd.concat(rows, ignore_index=True)
        df.insert(0, "task", [self.pairs[i].task for i in df.prompt])
        return df
