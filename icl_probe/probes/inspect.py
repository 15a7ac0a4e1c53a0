"""A first look at one ICL prompt: where each layer's prediction-position attention goes, and
what the model predicts with and without demonstrations.

>>> import icl_probe as ip
>>> from icl_probe.probes.inspect import inspect_pair
>>> model = ip.tiny_model()
>>> view = inspect_pair(model, ip.build_prompt(model, "capital", query=0, k=4))
>>> list(view.layers.columns)
['layer', 'demo_mass', 'demo_mass_max_head', 'query_mass']
>>> view.mass.shape     # layer head: attention mass on demonstrations at p
torch.Size([3, 4])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import pandas as pd
import plotly.graph_objects as go
import torch

from ..errors import PromptError
from ..hooks import AttentionRecord, predictions, trace
from ..models import model_info
from ..prompts import PromptPair
from .plots import layer_head_heatmap


def demo_mass(record: AttentionRecord, pairs: list[PromptPair]) -> torch.Tensor:
    """λ = Σ_{j∈D} a_j: attention mass from the prediction position on demonstration tokens,
    per layer, prompt and head (docs/science.md, Exact softmax split). Shape (layer batch head)."""
    pattern = record.at_pred("pattern")  # layer batch head key_pos
    mask = torch.zeros(pattern.shape[1], pattern.shape[-1], dtype=pattern.dtype,
                       device=pattern.device)
    for b, p in enumerate(pairs):
        mask[b, p.spans_of(record.kind).demo_indices()] = 1
    return einops.einsum(pattern, mask,
                         "layer batch head key_pos, batch key_pos -> layer batch head")


@dataclass
class PairView:
    pair: PromptPair
    mass: torch.Tensor  # layer head
    layers: pd.DataFrame
    predictions: pd.DataFrame

    def to_dict(self) -> dict:
        return {
            "task": self.pair.task, "query": self.pair.query, "k": self.pair.k,
            "text": self.pair.text,
            "layers": self.layers.to_dict(orient="records"),
            "predictions": self.predictions.to_dict(orient="records"),
        }


def _predictions(model: Any, pair: PromptPair, logits: torch.Tensor, run: str) -> dict:
    tok = model.tokenizer
    # by the pair's scoring: the first token, or each answer's whole log-probability
    label_pick = int(predictions(model, [pair], run, logits[None])[0])
    vocab_pick = int(logits.argmax())
    return {
        "run": run,
        "scoring": pair.scoring,
        "label": pair.labels[label_pick],
        "label_correct": label_pick == pair.target,
        "top_token": tok.decode([vocab_pick]),
        "vocab_correct": vocab_pick == pair.target_id,
        "gold": pair.labels[pair.target],
        "p_gold": float(torch.softmax(logits.float(), -1)[pair.target_id]),
    }


def inspect_pair(model: Any, pair: PromptPair) -> PairView:
    """Per layer: mean (over heads) and largest attention mass on demonstrations at the
    prediction position; predictions of the ICL and the zero-shot run."""
    icl = trace(model, [pair], what=("pattern",))
    zs = trace(model, [pair], kind="zs", what=("pattern",))
    mass = demo_mass(icl, [pair])[:, 0]  # layer head
    pattern = icl.at_pred("pattern")[:, 0]  # layer head key_pos
    q_mass = pattern[..., pair.spans.query_indices()].sum(-1)
    layers = pd.DataFrame({
        "layer": list(icl.layers),
        "demo_mass": mass.mean(-1).tolist(),
        "demo_mass_max_head": mass.max(-1).values.tolist(),
        "query_mass": q_mass.mean(-1).tolist(),
    })
    preds = pd.DataFrame([_predictions(model, pair, icl.logits[0], "icl"),
                          _predictions(model, pair, zs.logits[0], "zs")])
    return PairView(pair, mass.cpu(), layers, preds)


def mass_heatmap(view: PairView):
    """plotly heatmap of λ (layer x head) for one prompt."""
    p = view.pair
    return layer_head_heatmap(
        view.mass.float().numpy(), list(view.layers["layer"]),
        f"Attention mass on demonstrations at the prediction position — task {p.task}, "
        f"query {p.query}, k={p.k}", "λ", zmin=0, zmax=1)


@dataclass
class TextView:
    tokens: list[str]
    attention: torch.Tensor  # layer pos: last position's attention, mean over heads
    top: pd.DataFrame  # next-token candidates

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "attention": self.attention.tolist(),
                "top": self.top.to_dict(orient="records")}


def inspect_text(model: Any, text: str, top_k: int = 5) -> TextView:
    """Free text instead of a task query: where the last position's attention goes in each
    layer (mean over heads) and the model's top next tokens."""
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    if model_info(model).prepend_bos and tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    if not ids:
        raise PromptError("inspect: the prompt is empty")
    rec = trace(model, [torch.tensor(ids)], what=("pattern",))
    att = rec.at_pred("pattern")[:, 0].float().mean(1)[:, : len(ids)]  # layer pos
    probs = torch.softmax(rec.logits[0].float(), -1)
    p, i = probs.topk(top_k)
    top = pd.DataFrame({"token": [tok.decode([t]) for t in i.tolist()], "p": p.tolist()})
    return TextView([tok.decode([t]) for t in ids], att.cpu(), top)


def text_heatmap(view: TextView):
    """plotly heatmap of the last position's attention (layer x token)."""
    labels = [f"{j}:{t!r}" for j, t in enumerate(view.tokens)]
    fig = go.Figure(go.Heatmap(z=view.attention.numpy(), x=labels,
                               y=[f"L{l}" for l in range(view.attention.shape[0])],
                               colorscale="Viridis", zmin=0, colorbar={"title": "attention"}))
    fig.update_layout(title="Attention of the last position, mean over heads",
                      yaxis_autorange="reversed", height=max(400, 22 * view.attention.shape[0]))
    return fig
