"""The attention record: one uniform container of every traced layer's quantities at the
positions asked for, and the helpers that lay its tensors out (layer lists, padding)."""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int, Shaped
from safetensors.torch import load_file, save_file

from ..errors import TraceError
from ..models import attention_spec
from .gqa import expand_kv, group_mapping, n_kv_heads
from .weights import HALF

_KV_NAMES = ("k", "v", "W_K", "W_V", "b_K", "b_V")


# Shapes of the record's tensors, in the glossary's axis names (jaxtyping; tests/test_shapes.py
# checks them on a real record). Aliases rather than inline strings: pyflakes reads a string
# inside an annotation as Python and rejects "batch pos".
_PerHead = Int[torch.Tensor, "head"]


_PerPrompt = Int[torch.Tensor, "batch"]


_PositionIds = Int[torch.Tensor, "batch pos"]


_PositionMask = Bool[torch.Tensor, "batch pos"]


_KeyPositionIds = Int[torch.Tensor, "batch key_pos"]


_KeyPositionMask = Bool[torch.Tensor, "batch key_pos"]


_Logits = Float[torch.Tensor, "batch d_vocab"]


_PerLayer = Float[torch.Tensor, "layer"]


_AtPred = Shaped[torch.Tensor, "layer batch ..."]


def resolve_layers(layers: Iterable[int] | None, n_layers: int, where: str,
                   error: type[Exception] = TraceError) -> tuple[int, ...]:
    """``layers`` (None: every layer) as a tuple of block indices, or ``error`` naming the
    first one that is not an integer in ``0 .. n_layers - 1``."""
    if layers is None:
        return tuple(range(n_layers))
    valid = f"the model's layers are 0..{n_layers - 1}"
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise error(f"{where}(layers={layers!r}): expected a list of layer indices, e.g. "
                    f"layers=[{layers!r}]; {valid}")
    given = list(layers)
    if not given:
        raise error(f"{where}(layers=[]): no layers given; {valid} (None: all)")
    out = []
    for l in given:
        try:
            if isinstance(l, bool):
                raise TypeError
            index = operator.index(l)
        except TypeError:
            raise error(f"{where}(layers={given!r}): layer {l!r} is not an integer; "
                        f"{valid}") from None
        if not 0 <= index < n_layers:
            raise error(f"{where}(layers={given!r}): layer {index} is out of range; {valid}")
        out.append(index)
    return tuple(out)


def check_batch_size(batch_size: Any, where: str, error: type[Exception] = TraceError) -> None:
    """``error`` unless ``batch_size`` is a positive integer."""
    ok = not isinstance(batch_size, bool) and isinstance(batch_size, int) and batch_size >= 1
    if not ok:
        raise error(f"{where}(batch_size={batch_size!r}): batch_size is the number of prompts "
                    "per forward pass and must be a positive integer, e.g. batch_size=8")


@dataclass
class AttentionRecord:
    """Per-layer attention quantities for a batch of prompts (see the module docstring).

    ``positions[b, i]`` is the token position of slot ``i`` (``pos_mask`` marks real slots);
    ``pred_slot[b]`` is the slot of the prediction position ``pred[b]``. ``key_positions`` /
    ``key_mask`` do the same for the key axis of ``k`` and ``v``; the key axis of ``scores`` and
    ``pattern`` is the token position itself (``key_pos < lengths[b]``). ``scale[i]`` is the
    factor layer ``layers[i]`` multiplies ``q·k`` by; ``softcap[i]`` / ``window[i]`` its logit
    soft-capping and sliding window (None where it has none).
    """

    layers: tuple[int, ...]
    n_heads: int
    n_kv_heads: int
    d_head: int
    kv_head_of: _PerHead
    lengths: _PerPrompt
    pred: _PerPrompt
    positions: _PositionIds
    pos_mask: _PositionMask
    pred_slot: _PerPrompt
    key_positions: _KeyPositionIds
    key_mask: _KeyPositionMask
    data: dict[str, torch.Tensor]  # shapes: the module docstring's table, after "layer"
    weights: dict[str, torch.Tensor]  # shapes: attention_weights
    logits: _Logits | None
    hook_names: dict[str, str]
    kind: str = "icl"
    q_rotated: bool = True
    meta: dict = field(default_factory=dict)
    scale: _PerLayer | None = None
    softcap: tuple[float | None, ...] = ()
    window: tuple[int | None, ...] = ()

    # ---------------------------------------------------------------- access
    def __getattr__(self, name: str) -> torch.Tensor:
        return _widen(self._stored(name))

    def _stored(self, name: str) -> torch.Tensor:
        """A quantity as the record keeps it: half-precision tensors (a half-precision model's
        weight stack, data :func:`compact` narrowed) not yet widened."""
        data = self.__dict__.get("data", {})
        weights = self.__dict__.get("weights", {})
        if name in ("k", "v") and name in data:
            return expand_kv(data[name], self.kv_head_of, dim=3)
        if name in data:
            return data[name]
        if name in weights:
            w = weights[name]
            return expand_kv(w, self.kv_head_of, dim=1) if name in ("W_K", "W_V", "b_K",
                                                                   "b_V") else w
        raise AttributeError(
            f"AttentionRecord has no {name!r}; captured: {sorted(data)}, weights: "
            f"{sorted(weights)}. Ask trace(..., what=[...]) for it"
        )

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise TraceError(f"layer {layer} was not traced; traced layers: {list(self.layers)}")

    def __getitem__(self, hook_name: str) -> torch.Tensor:
        """A TransformerLens hook name (``"blocks.3.attn.hook_pattern"``) -> that layer's
        tensor, or a quantity name (``"pattern"``) -> all traced layers."""
        if hook_name in self.data or hook_name in _KV_NAMES:
            return getattr(self, hook_name)
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
        if m:
            suffix = m.group(2)
            for q, template in self.hook_names.items():
                if template.split("{l}.", 1)[1] == suffix and q in self.data:
                    return getattr(self, q)[self.layer_index(int(m.group(1)))]
        raise KeyError(
            f"{hook_name!r} is not in this record; it holds "
            + ", ".join(self.hook_names[q] for q in self.data)
        )

    def at_pred(self, name: str) -> _AtPred:
        """A query-side quantity at each prompt's prediction position: (layer, batch, ...)."""
        x = self._stored(name)  # widened after the positions are picked, not before
        b = torch.arange(x.shape[1], device=x.device)
        return _widen(x[:, b, self.pred_slot.to(x.device)])

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    # ---------------------------------------------------------------- on disk
    def save(self, path: str | Path) -> Path:
        """Write the record to ``path`` (safetensors: every tensor, in its own dtype) and
        ``path`` + ``.json`` beside it (every other field); :func:`load_record` reads both
        back bit for bit, without the model. ``meta`` must hold JSON values (numbers, strings,
        lists, dicts). Returns ``path``."""
        path = Path(path)
        tensors = {f"{group}/{name}": x for group in _TENSOR_GROUPS
                   for name, x in getattr(self, group).items()}
        tensors.update({name: getattr(self, name) for name in _TENSOR_FIELDS
                        if getattr(self, name) is not None})
        try:
            side = json.dumps({"format": RECORD_FORMAT, **{
                f: getattr(self, f) for f in _JSON_FIELDS}}, allow_nan=True)
        except TypeError as e:
            raise TraceError(f"AttentionRecord.save({str(path)!r}): meta must hold JSON values "
                             f"(numbers, strings, lists, dicts): {e}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: x.detach().cpu().contiguous().clone() for k, x in tensors.items()},
                  str(path))
        _sidecar(path).write_text(side)
        return path


RECORD_FORMAT = "icl-probe-record/1"
_TENSOR_GROUPS = ("data", "weights")
_TENSOR_FIELDS = ("kv_head_of", "lengths", "pred", "positions", "pos_mask", "pred_slot",
                  "key_positions", "key_mask", "logits", "scale")
_JSON_FIELDS = ("layers", "n_heads", "n_kv_heads", "d_head", "hook_names", "kind", "q_rotated",
                "meta", "softcap", "window")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_record(path: str | Path, device: str | torch.device = "cpu") -> AttentionRecord:
    """An :class:`AttentionRecord` written by :meth:`AttentionRecord.save`, on ``device``:
    tensors from the safetensors file (no pickle, nothing executed), the other fields from
    its JSON sidecar."""
    path = Path(path)
    side = _sidecar(path)
    missing = [str(p) for p in (path, side) if not p.is_file()]
    if missing:
        raise TraceError(f"load_record({str(path)!r}): {' and '.join(missing)} not found; "
                         "a record is saved as NAME and NAME.json (AttentionRecord.save)")
    fields = json.loads(side.read_text())
    if fields.pop("format", None) != RECORD_FORMAT:
        raise TraceError(f"load_record({str(path)!r}): {side} is not an icl-probe record "
                         f"sidecar (expected format {RECORD_FORMAT!r})")
    tensors = load_file(str(path), device=str(device))
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in _TENSOR_GROUPS}
    for key, x in tensors.items():
        group, _, name = key.partition("/")
        if name:
            groups[group][name] = x
    plain = {f: tensors.get(f) for f in _TENSOR_FIELDS}
    fields["layers"] = tuple(fields["layers"])
    fields["softcap"], fields["window"] = tuple(fields["softcap"]), tuple(fields["window"])
    return AttentionRecord(**fields, **groups, **plain)


def _widen(x: torch.Tensor) -> torch.Tensor:
    """Half precision as float32 (exact), anything else as it is: a record hands out float32
    for a half-precision model, however it keeps it."""
    return x.float() if x.dtype in HALF else x


def compact(rec: AttentionRecord, dtype: torch.dtype) -> AttentionRecord:
    """Keep every float32 tensor of ``rec.data`` in ``dtype`` (a half-precision model's own
    dtype) where each of its values survives the round trip exactly, in place; ``rec`` is
    returned. A half-precision model computes its hooked activations in its own dtype and the
    record widens them to float32, so they narrow back without loss and the record hands out
    the same float32 numbers at half the memory. Quantities computed after the forward in
    float32 do not survive the round trip and stay as they are. Not half precision: nothing
    changes."""
    if dtype not in HALF:
        return rec
    for name, x in rec.data.items():
        if x.dtype == torch.float32:
            y = x.to(dtype)
            # layer by layer: the check widens one layer's slice at a time, not the whole tensor
            if all(torch.equal(y[i].float(), x[i]) for i in range(len(x))):
                rec.data[name] = y
    return rec


def pad_stack(rows: list[torch.Tensor], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask


def pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)



def in_order(parts: Sequence[torch.Tensor], order: Sequence[int]) -> torch.Tensor:
    """Batch chunks run in ``order`` (prompts sorted by length), concatenated and put back in
    the caller's order."""
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(list(order))] = torch.arange(len(order))
    return torch.cat(list(parts), 0)[inverse.to(parts[0].device)]


def model_record(model: Any, layers: Sequence[int], **fields: Any) -> AttentionRecord:
    """An :class:`AttentionRecord` of ``model``'s ``layers``: the head counts, the key/value
    grouping and each layer's score scale, soft-capping and window are read off the model;
    ``fields`` give the rest."""
    cfg, spec = model.cfg, attention_spec(model)
    n_kv = n_kv_heads(cfg)
    return AttentionRecord(
        layers=tuple(layers), n_heads=cfg.n_heads, n_kv_heads=n_kv, d_head=cfg.d_head,
        kv_head_of=group_mapping(cfg.n_heads, n_kv),
        scale=torch.tensor([spec.scale[l] for l in layers], dtype=torch.float64),
        softcap=tuple(spec.softcap[l] for l in layers),
        window=tuple(spec.window[l] for l in layers), **fields)
