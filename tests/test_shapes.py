"""The public records' tensors have the shapes their annotations and docstrings say.

Every jaxtyping-annotated field of a real :class:`~icl_probe.AttentionRecord` and
:class:`~icl_probe.ImpliedUpdates` (and the tensors of the ``trace`` quantities table in
``icl_probe.hooks``' docstring) is checked against its annotation: dtype kind, rank, and each
named axis bound to one size across every field of the object and pinned to the size the model
and the prompts give it. The tiny model and the prompts have distinct sizes on every axis
(asserted below), so an axis swapped in the code or in an annotation cannot pass.
"""

import dataclasses
import re
import typing

import pytest
import torch
from jaxtyping import Float

import icl_probe as ip
from icl_probe import hooks
from icl_probe.hooks import tracing

N_PROMPTS = 5


def _pairs(model):
    # k = 4..8 demonstrations: 149-292 tokens, 8 demos, none of these sizes equal to another axis'
    return [ip.build_prompt(model, "capital", query=q, k=4 + q, seed=q) for q in range(N_PROMPTS)]


@pytest.fixture(scope="module")
def traced(tiny64):
    pairs = _pairs(tiny64)
    # positions="demos": the query axis (pos) is shorter than the key axis (key_pos)
    rec = ip.trace(tiny64, pairs, positions="demos")
    up = ip.implied_updates(tiny64, pairs, per_demo=True, model_space=[0, 2])
    return tiny64, pairs, rec, up


def _expected_sizes(model, pairs, up):
    """The size of every axis name, from the model's config and the prompts alone."""
    cfg = model.cfg
    return {
        "layer": cfg.n_layers, "batch": len(pairs), "head": cfg.n_heads,
        "kv_head": cfg.n_key_value_heads, "d_head": cfg.d_head, "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "demo": max(p.k for p in pairs),
        "pos": max(len(p.spans.demo_indices()) + 1 for p in pairs),  # demos + the prediction
        "key_pos": max(len(p.icl_ids) for p in pairs),
        "model_space_layer": len(up.model_space_layers),
    }


def _jaxtyping(t):
    return hasattr(t, "dim_str") and hasattr(t, "dtypes")


def annotated_tensors(obj):
    """(name, annotation, tensor) for every field of ``obj`` annotated with a jaxtyping type,
    ``X | None`` (when set) and ``dict[str, X]`` (every value) included."""
    out = []
    for name, hint in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        if typing.get_origin(hint) is dict:
            item = typing.get_args(hint)[1]
            if _jaxtyping(item):
                out += [(f"{name}[{key!r}]", item, x) for key, x in value.items()]
            continue
        options = [t for t in typing.get_args(hint) or (hint,) if _jaxtyping(t)]
        if options and value is not None:
            out.append((name, options[0], value))
    return out


def check_shapes(tensors, sizes):
    """Assert that each (name, annotation, tensor) matches its annotation, with every axis name
    taking one size across all of them and the size given in ``sizes`` where it has one.
    Returns the sizes bound."""
    bound = {axis: (size, "the model's config and the prompts") for axis, size in sizes.items()}
    for name, hint, x in tensors:
        assert isinstance(x, hint), f"{name}: {x.dtype} {tuple(x.shape)} is not a {hint}"
        for axis, size in zip(hint.dim_str.split(), x.shape):
            was, where = bound.setdefault(axis, (size, name))
            assert size == was, (f"{name} ({hint.dim_str}): axis {axis!r} has size {size}; "
                                 f"expected {was} (from {where}): axes swapped?")
    return {axis: size for axis, (size, _) in bound.items()}


def _quantity_table():
    """{quantity: shape per layer} from the table in icl_probe.hooks' module docstring."""
    rows = {}
    for line in tracing.__doc__.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) >= 3 and parts[0] in hooks.QUANTITIES:
            rows[parts[0]] = parts[-1]
    return rows


def _record_tensors(rec):
    table = _quantity_table()
    assert set(table) == set(hooks.QUANTITIES) == set(rec.data)
    return annotated_tensors(rec) + [
        (f"data[{q!r}]", Float[torch.Tensor, "layer " + table[q]], rec.data[q]) for q in table]


def _updates_tensors(up):
    hints = {name: typing.get_type_hints(getattr(type(up), name))["return"]
             for name in ("dW_icl_rank", "mlp_delta_norm", "mlp_delta")}
    layer = up.layers[-1]
    return annotated_tensors(up) + [
        ("dW_icl_rank()", hints["dW_icl_rank"], up.dW_icl_rank()),
        ("mlp_delta_norm('gate')", hints["mlp_delta_norm"], up.mlp_delta_norm("gate")),
        ("mlp_delta('gate', ...)", hints["mlp_delta"], up.mlp_delta("gate", layer, 0)),
    ]


def assert_distinct(sizes):
    """Axes of equal size could be swapped unnoticed."""
    by_size = {}
    for axis, size in sizes.items():
        by_size.setdefault(size, []).append(axis)
    assert all(len(axes) == 1 for axes in by_size.values()), f"axes of equal size: {by_size}"


def test_attention_record_matches_its_annotations(traced):
    model, pairs, rec, up = traced
    tensors = _record_tensors(rec)
    assert {name for name, _, _ in tensors} >= {
        "kv_head_of", "lengths", "positions", "pos_mask", "key_positions", "logits", "scale",
        "data['k']", "data['pattern']"}
    sizes = _expected_sizes(model, pairs, up)
    for name in ("demo", "d_mlp", "model_space_layer"):
        sizes.pop(name)
    assert check_shapes(tensors, sizes) == sizes
    assert_distinct(sizes)


def test_implied_updates_match_their_annotations(traced):
    model, pairs, rec, up = traced
    tensors = _updates_tensors(up)
    assert {name for name, _, _ in tensors} >= {
        "dW_icl", "demo_terms", "demo_mask", "lam", "z_D", "mlp_a['gate']", "mlp_a['in']",
        "model_space", "model_space_bias"}
    sizes = _expected_sizes(model, pairs, up)
    for name in ("pos", "key_pos", "d_vocab", "kv_head"):
        sizes.pop(name)
    assert check_shapes(tensors, sizes) == sizes
    assert_distinct(sizes)


def test_implied_updates_docstring_table_matches_the_annotations():
    table = {}
    doc = ip.ImpliedUpdates.__doc__
    for line in doc[doc.index("::"):].splitlines()[1:]:
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) >= 2 and parts[0]:
            for name in parts[0].split(", "):
                table[name.removesuffix("[name]")] = parts[1]
    hints = typing.get_type_hints(ip.ImpliedUpdates)
    annotated = {}
    for name, hint in hints.items():
        args = typing.get_args(hint) or (hint,)
        kinds = [t for a in args for t in (typing.get_args(a) or (a,)) if _jaxtyping(t)]
        if kinds:
            annotated[name] = kinds[0].dim_str
    assert annotated == table


@pytest.mark.parametrize("target, name, swap", [
    ("record", "positions", lambda x: x.T),  # batch <-> pos
    ("record", "data['k']", lambda x: x.transpose(2, 3)),  # key_pos <-> kv_head
    ("updates", "lam", lambda x: x.transpose(0, 1)),  # layer <-> batch
    ("updates", "z", lambda x: x.transpose(2, 3)),  # head <-> d_head
    ("updates", "mlp_a['gate']", lambda x: x.transpose(0, 1)),  # layer <-> batch
])
def test_a_swapped_axis_is_caught(traced, target, name, swap):
    """The check can fail: the same record with two axes of one tensor swapped."""
    model, pairs, rec, up = traced
    tensors = _record_tensors(rec) if target == "record" else _updates_tensors(up)
    assert name in {n for n, _, _ in tensors}
    swapped = [(n, hint, swap(x) if n == name else x) for n, hint, x in tensors]
    with pytest.raises(AssertionError, match=re.escape(name)):
        check_shapes(swapped, _expected_sizes(model, pairs, up))


def test_records_are_dataclasses_whose_tensor_fields_are_all_annotated(traced):
    """A tensor field added without a shape annotation would escape the checks above."""
    _, _, rec, up = traced
    for obj, checked in ((rec, _record_tensors(rec)), (up, _updates_tensors(up))):
        names = {n.split("[")[0] for n, _, _ in checked}
        for f in dataclasses.fields(obj):
            if isinstance(getattr(obj, f.name), torch.Tensor):
                assert f.name in names, f"{type(obj).__name__}.{f.name} has no shape annotation"
