"""Sizing a run before it starts: parameters and memory of each model, read from its config
on PyTorch's meta device (no weight is loaded), and the units an experiment holds.

:func:`plan` answers what a cluster request needs: per model, the parameter count, the
memory of the weights in the run's dtype, of one fine-tune (the trained copy, its gradients,
the optimizer state and the activations its backward keeps), and of the traces a unit holds;
and the number of units (``icl-probe plan CONFIG``). :func:`check_memory` is the same
estimate, made by :func:`icl_probe.load_model` before it loads anything, so a model that
cannot fit fails at once, with the estimate and the fix.

What is exact and what is an estimate:

- the parameter count is exact (the model class instantiated on the meta device, shared
  tensors counted once), and so is the memory of the weights;
- trace memory follows the record layout exactly (:func:`record_bytes`, checked against real
  records in the tests); the prompt lengths come from the model's tokenizer on a sample of
  the config's prompts, or, without a tokenizer, from characters / 3 (said in the output);
- fine-tuning activations are an upper-bound formula (every demonstration in one sequence,
  eager attention, the tensors autograd keeps per layer), not a measurement.
"""

from __future__ import annotations

import math
import os
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .config import Config
from .errors import IclProbeError, ModelLoadError, TraceError

__all__ = ["ModelShape", "Plan", "available_memory", "check_memory", "model_shape", "plan",
           "record_bytes"]

GB = 1e9
HEADROOM = 1.15  # loading needs some room beyond the weights (buffers, allocator slack)
SKIP_ENV = "ICL_PROBE_SKIP_MEMORY_CHECK"


@dataclass(frozen=True)
class ModelShape:
    """A model's sizes, from its config; ``n_params`` counted on the meta device."""

    key: str
    source: str
    n_params: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    tokenizer: Any = field(default=None, repr=False, compare=False)


def _hf_config(spec: str | None) -> tuple[Any, str, str | None]:
    """(transformers config, where it was read, a directory or GGUF with a tokenizer)."""
    from transformers import AutoConfig

    from .models import (GGUF_READ_ERRORS, embedded_gguf_path, gguf_cache_path, hub_snapshot,
                         refuse_remote_code, unreadable_gguf)

    if spec is None or str(spec).endswith(".gguf"):
        gguf = embedded_gguf_path() if spec is None else Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"{gguf}: no such GGUF file")
        cached = gguf_cache_path(gguf)
        if (cached / "config.json").is_file():
            return (AutoConfig.from_pretrained(str(cached), trust_remote_code=False),
                    f"{cached}/config.json", str(cached))
        from transformers import CONFIG_MAPPING
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            meta = dict(load_gguf_checkpoint(str(gguf), return_tensors=False)["config"])
        except GGUF_READ_ERRORS as e:
            raise unreadable_gguf(gguf, e) from e
        meta.pop("_model_name_or_path", None)
        kind = meta.pop("model_type")
        return CONFIG_MAPPING[kind](**meta), f"{gguf} (GGUF metadata)", str(gguf)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        refuse_remote_code(path, f"plan({str(spec)!r})")
        return (AutoConfig.from_pretrained(str(path), trust_remote_code=False),
                f"{path}/config.json", str(path))
    snapshot = hub_snapshot(str(spec))
    if snapshot is not None:
        refuse_remote_code(snapshot, f"plan({str(spec)!r})")
    try:
        cfg = AutoConfig.from_pretrained(str(spec), local_files_only=True,
                                         trust_remote_code=False)
    except OSError as e:
        raise ModelLoadError(f"{spec!r}: its config is not in the local Hugging Face cache; "
                             f"download it first (huggingface-cli download {spec})") from e
    return cfg, f"{spec} (local Hugging Face cache)", str(spec)


def _count_params(cfg: Any) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    seen, n = set(), 0
    for p in model.parameters():  # tied weights are one tensor, counted once
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _tokenizer(where: str | None) -> Any:
    if where is None:
        return None
    from transformers import AutoTokenizer

    try:
        if where.endswith(".gguf"):
            p = Path(where)
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name,
                                                 trust_remote_code=False)
        return AutoTokenizer.from_pretrained(where, local_files_only=True,
                                             trust_remote_code=False)
    except Exception:  # no tokenizer files: lengths are estimated from characters
        return None


def model_layers(spec: str | None) -> int:
    """The number of layers of the model ``spec`` (as :func:`model_shape` reads it: from its
    config, no weights)."""
    cfg, _, _ = _hf_config(spec)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(text, name, None), int):
            return getattr(text, name)
    raise ModelLoadError(f"{spec}: its config gives no number of layers")


def model_shape(spec: str | None, key: str | None = None, *, tokenizer: bool = False
                ) -> ModelShape:
    """Sizes and parameter count of the model ``spec`` (None: the embedded default, a .gguf,
    a Hugging Face directory, or a hub id in the local cache), without loading weights."""
    from .experiments import model_key

    cfg, source, tok_from = _hf_config(spec)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def get(*names: str, default: Any = None) -> Any:
        for n in names:
            v = getattr(text, n, None)
            if v is not None:
                return v
        return default

    d_model = get("hidden_size", "n_embd", "d_model")
    n_heads = get("num_attention_heads", "n_head")
    return ModelShape(
        key=key or model_key(spec), source=source, n_params=_count_params(cfg),
        n_layers=get("num_hidden_layers", "n_layer"), d_model=d_model, n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", "n_kv_heads", default=n_heads),
        d_head=get("head_dim", default=d_model // n_heads),
        d_mlp=get("intermediate_size", "n_inner", default=4 * d_model) or 4 * d_model,
        d_vocab=get("vocab_size"), tokenizer=_tokenizer(tok_from) if tokenizer else None)


def _dtype_bytes(dtype: str | torch.dtype | None) -> int:
    return torch.empty((), dtype=_resolve(dtype)).element_size()


# ------------------------------------------------------------------------------ memory


def record_bytes(shape: ModelShape, what: Iterable[str], n_prompts: int, tokens: int, *,
                 positions: int = 1, logits: bool = True, weights: bool = True) -> int:
    """Bytes of an :class:`~icl_probe.hooks.AttentionRecord` of ``n_prompts`` prompts padded
    to ``tokens``, holding ``what`` at ``positions`` captured positions of every layer, with
    (``logits``) the logits at the prediction position and (``weights``) the stacked
    attention weights (biases, a few thousand numbers, left out). Records are float32
    (half-precision models' records are widened); all records of one model share one stack of
    weights (cached on the model)."""
    L, H, G, D, d = shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head, shape.d_model
    P, T, B = positions, tokens, n_prompts
    per = {"resid_pre": P * d, "attn_in": P * d, "attn_out": P * d, "resid_mid": P * d,
           "mlp_in": P * d, "mlp_out": P * d, "q": P * H * D, "z": P * H * D,
           "q_pre": P * H * D, "q_normed": P * H * D, "rot_cos": P * D, "rot_sin": P * D,
           "k": T * G * D, "v": T * G * D, "scores": P * H * T, "pattern": P * H * T,
           "head_out": P * H * d}
    unknown = set(what) - set(per)
    if unknown:
        raise TraceError(f"record_bytes(what=...): unknown quantities {sorted(unknown)}")
    n = L * B * sum(per[w] for w in what)
    n += attention_weight_count(shape) if weights else 0
    n += B * shape.d_vocab if logits else 0
    return 4 * n


def attention_weight_count(shape: ModelShape) -> int:
    """Numbers in the stacked attention weights of every layer: W_Q and W_O per head, W_K and
    W_V per kv head."""
    L, H, G, D, d = shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head, shape.d_model
    return L * (2 * H * d * D + 2 * G * d * D)


def finetune_bytes(shape: ModelShape, trainable: int, tokens: int, dtype_bytes: int,
                   optimizer_states: int) -> int:
    """One fine-tune: the trained copy of the selected parameters, their gradients and
    ``optimizer_states`` per parameter (SGD 0, Adam 2), plus an upper bound of the activations
    autograd keeps for a backward over a sequence of ``tokens`` tokens (per layer: the residual and norm
    inputs, q/k/v before and after rotary, scores and pattern, the head outputs, the MLP's
    hidden activations; then the logits and their gradient)."""
    L, H, G, D, d, f = (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head,
                        shape.d_model, shape.d_mlp)
    T = tokens
    per_layer = T * (4 * d + 2 * (H + 2 * G) * D + H * D + d + 4 * f) + 2 * H * T * T
    acts = (L * per_layer + 2 * T * shape.d_vocab) * dtype_bytes
    return trainable * dtype_bytes * (2 + optimizer_states) + acts


def trainable_count(shape: ModelShape, params: str) -> int:
    """Parameters a parameter set trains (:func:`icl_probe.gd.trainable_parameters`), from the
    sizes: ``kv`` (k and v projections), ``qkvo``, ``v:L`` (one layer's v), ``mlp``, ``all``
    (biases left out: at most a few thousand)."""
    L, H, G, D, d, f = (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head,
                        shape.d_model, shape.d_mlp)
    if params == "kv":
        return L * 2 * d * G * D
    if params == "qkvo":
        return L * (2 * d * H * D + 2 * d * G * D)
    if params.startswith("v:"):
        return d * G * D
    if params == "mlp":
        return L * 3 * d * f
    return shape.n_params


def available_memory(device: str | torch.device | None = None, *, device_map: Any = None,
                     n_devices: int | None = None) -> tuple[int, str]:
    """(bytes free, where) on the device a model would load onto: free GPU memory (summed
    over the GPUs a device map may use), or the machine's available RAM."""
    from .models import default_device

    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and torch.cuda.is_available():
        if device_map is not None or (n_devices or 1) > 1:
            ids = range(min(n_devices or torch.cuda.device_count(), torch.cuda.device_count()))
        else:
            ids = [dev.index or 0]
        free = sum(torch.cuda.mem_get_info(i)[0] for i in ids)
        return free, f"{len(ids)} GPU(s) ({', '.join(f'cuda:{i}' for i in ids)})"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "this machine's available RAM"
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, "this machine's free RAM"


def check_memory(spec: str | None, *, dtype: Any = None, device: Any = None,
                 device_map: Any = None, n_devices: int | None = None) -> None:
    """Raise :class:`ModelLoadError` before loading ``spec`` when its weights (in ``dtype``,
    with some headroom) exceed the free memory of where they would go; names the estimate and
    the fixes. ``ICL_PROBE_SKIP_MEMORY_CHECK=1`` skips the check."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return
    try:
        shape = model_shape(spec)
    except (IclProbeError, OSError, ValueError, KeyError, TypeError):
        return  # an unreadable or refused config: the loader itself says what is wrong
    # (any other exception is a bug, and propagates rather than switch the check off)
    b = _dtype_bytes(dtype)
    need = int(shape.n_params * b * HEADROOM)
    free, where = available_memory(device, device_map=device_map, n_devices=n_devices)
    if need <= free:
        return
    half = int(shape.n_params * 2 * HEADROOM)
    raise ModelLoadError(
        f"load_model({spec!r}): {shape.n_params:,} parameters need about {_size(need)} in "
        f"{str(_resolve(dtype)).replace('torch.', '')} (weights + {HEADROOM - 1:.0%} "
        f"headroom), but {where} has {_size(free)} free. Fixes: "
        f"dtype='bf16' ({_size(half)}; on a GPU), device_map='auto' / n_devices=N to spread it "
        "over several GPUs, or a machine with more memory (icl-probe plan CONFIG sizes the "
        f"whole run). {SKIP_ENV}=1 skips this check")


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _resolve(dtype: Any) -> torch.dtype:
    from .models import resolve_dtype

    return resolve_dtype(dtype)


# ------------------------------------------------------------------------------ plan


@dataclass
class Plan:
    """The plan of one config: one row per model (see :func:`plan`), and the units."""

    config: str
    dtype: str
    models: list[dict]
    units: dict[str, int]
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        lines = [f"plan of {self.config} (dtype {self.dtype}); units: "
                 + ", ".join(f"{k} {v}" for k, v in self.units.items())]
        for m in self.models:
            lines += [
                f"\nmodel {m['key']}: {m['n_params'] / 1e9:.3f} B parameters "
                f"({m['n_params']:,}), {m['n_layers']} layers, {m['n_heads']} heads over "
                f"{m['n_kv_heads']} kv heads, d_model {m['d_model']}",
                f"  read from {m['source']}",
                f"  weights            {m['weights_gb']:8.2f} GB  (with the random-weight "
                "baseline models the config runs, a copy each)",
                f"  fine-tune / unit   {m['finetune_gb']:8.2f} GB  ({m['finetune_note']})",
                f"  traces / unit      {m['traces_gb']:8.2f} GB  ({m['traces_note']})",
                f"  one process, peak  {m['process_gb']:8.2f} GB  (weights + a fine-tune + the "
                "records it keeps for reuse, running every unit of this model)",
            ]
        lines += ["", *[f"note: {n}" for n in self.notes]]
        return "\n".join(lines)


def _prompt_tokens(shape: ModelShape, tasks: Iterable[str], k: int, n: int = 16
                   ) -> tuple[int, int, int, int, str]:
    """(longest ICL prompt, longest zero-shot prompt, longest demonstration block, longest
    single demonstration) in tokens over ``n`` sampled prompts per task, and how they were
    measured."""
    from .prompts import build_prompt
    from .tasks import load_task

    tok = shape.tokenizer
    if tok is None:
        return _byte_estimate(tasks, k)
    stub = types.SimpleNamespace(tokenizer=tok, icl_probe_info=types.SimpleNamespace(
        prepend_bos=tok.bos_token_id is not None))
    icl = zs = demos = one = 0
    for name in tasks:
        task = load_task(name)
        for q in range(min(n, len(task))):
            pair = build_prompt(stub, task, q, min(k, len(task) - 1), seed=q)
            icl, zs = max(icl, len(pair.icl_ids)), max(zs, len(pair.zs_ids))
            demos = max(demos, len(pair.icl_ids) - len(pair.zs_ids))
            one = max(one, *(len(d.whole) for d in pair.spans.demos))
    return icl, zs, demos, one, ("tokenized with the model's tokenizer, longest of the "
                                 "sampled prompts")


BYTES_PER_TOKEN = 3  # BPE tokenizers average 3.5-4.5 bytes per token on English: generous


def _byte_estimate(tasks: Iterable[str], k: int) -> tuple[int, int, int, int, str]:
    """Without a tokenizer: the k longest demonstrations and the longest query, in bytes /
    :data:`BYTES_PER_TOKEN`, plus a BOS token."""
    from .prompts import split_template
    from .tasks import load_task

    icl = zs = demos = one = 0
    for name in tasks:
        task = load_task(name)
        head, label_prefix, sep = split_template(task.template)
        per_demo = sorted((len((head.format(x=it.x) + label_prefix + it.y + sep).encode())
                           for it in task.items), reverse=True)
        query = max(len(head.format(x=it.x).encode()) for it in task.items)
        d = math.ceil(sum(per_demo[:k]) / BYTES_PER_TOKEN)
        q = math.ceil(query / BYTES_PER_TOKEN) + 1
        icl, zs, demos = max(icl, d + q), max(zs, q), max(demos, d)
        one = max(one, math.ceil(per_demo[0] / BYTES_PER_TOKEN))
    return icl, zs, demos, one, (f"no tokenizer found: bytes / {BYTES_PER_TOKEN} of the longest "
                            "items, a generous estimate")


def plan(config: Config, *, model_name: str | None = None, dtype: str | None = None) -> Plan:
    """Parameters and memory per model, and units, of ``config`` without loading weights.

    Per model: ``weights_gb`` (the model, plus a copy for each random-weight baseline model
    the config runs), ``finetune_gb`` (one fine-tune), ``traces_gb`` (what one unit traces)
    and ``process_gb``: what a process running every unit of the model holds at its peak.
    An ``icl_vs_gd`` process keeps the zero-shot and ICL records of every (task, seed,
    variant) it has run, so that later units reuse them; a shard holding fewer tasks holds
    proportionally less."""
    from .experiments import MODEL_FREE, experiment_units, model_specs
    from .hooks import QUANTITIES
    from .protocol import ICL_WHAT, ZS_WHAT

    dtype = dtype or config.settings("experiment").dtype or "float32"
    b = _dtype_bytes(dtype)
    specs = model_specs(config, model_name)
    units = experiment_units(config, specs)
    counts: dict[str, int] = {}
    for sec, _ in units:
        counts[sec] = counts.get(sec, 0) + 1
    counts["total"] = len(units)
    uses_model = any(sec not in MODEL_FREE for sec in config.sections)
    rows, notes = [], []
    for key, spec in specs.items():
        if not uses_model:
            notes.append("no section of this config uses the language model (it is not loaded)")
            break
        shape = model_shape(spec, key, tokenizer=True)
        ft = traces = held = 0
        ft_note, tr_note = "no fine-tuning section", "no traced section"
        weights = shape.n_params * b
        stack = 4 * attention_weight_count(shape)  # W_Q, W_K, W_V, W_O stacked in float32
        how = ""
        if "icl_vs_gd" in config.sections:
            s = config.settings("icl_vs_gd")
            icl, zs, demos, one, how = _prompt_tokens(shape, s.tasks, s.k)
            n = s.queries + s.dev_queries
            opt = 2 if "adam" in s.methods else 0
            # every method but "batch" steps on one demonstration at a time
            ft_tokens = demos if "batch" in s.methods else one
            ft = finetune_bytes(shape, trainable_count(shape, s.params), ft_tokens, b, opt)
            ft_note = (f"params {s.params!r}: {trainable_count(shape, s.params):,} trained, "
                       f"{'Adam' if opt else 'SGD'}, backward over {ft_tokens} tokens")
            # kept per (task, seed, variant): the ICL and ZS records of test + dev queries and
            # ΔM_ICL, the demonstrations' Σ v ⊗ k per layer and kv head in float64
            # (docs/protocol.md, Cost); per unit, transiently, the demonstration prefix's k and
            # v (ΔM_ICL is summed from them) and a ZS record of the fine-tuned model
            refs = (record_bytes(shape, ICL_WHAT, n, icl, weights=False)
                    + record_bytes(shape, ZS_WHAT, n, zs, weights=False)
                    + 8 * shape.n_layers * shape.n_kv_heads * shape.d_head ** 2)
            transient = (record_bytes(shape, ("k", "v"), 1, demos, logits=False, weights=False)
                         + record_bytes(shape, ZS_WHAT, s.queries, zs, weights=False))
            models = {"untrained", "embeddings_only"} & set(s.baselines)
            variants = 1 + len({"shuffled_labels"} & set(s.baselines)) + len(models)
            weights *= 1 + len(models)
            # one cached float32 stack per model: the model, each random-weight baseline model
            # and the fine-tuned model of the unit
            stacks = 1 + len(models) + 1
            traces = refs + transient + 2 * stack
            held = len(s.tasks) * len(s.seeds) * variants * refs + transient + stacks * stack
            tr_note = (f"{n} queries, ICL prompts up to {icl} tokens; a process holds "
                       f"{len(s.tasks)} tasks x {len(s.seeds)} seeds x {variants} variants "
                       "of reference records")
        for sec in ("implied_updates", "real_heads"):
            if sec in config.sections:
                s = config.settings(sec)
                icl, _, _, _, how = _prompt_tokens(shape, s.tasks, s.k)
                t = record_bytes(shape, QUANTITIES, s.prompts, icl)
                if t > traces:
                    traces, tr_note = t, f"{sec}: {s.prompts} prompts of up to {icl} tokens"
                held = max(held, t)
        if "order_sensitivity" in config.sections:
            s = config.settings("order_sensitivity")
            _, _, demos, one, how = _prompt_tokens(shape, s.tasks, max(s.n_demos))
            opt = 2 if "adam" in s.methods else 0
            t = finetune_bytes(shape, trainable_count(shape, "kv"),
                               demos if "batch" in s.methods else one, b, opt)
            if t > ft:
                ft, ft_note = t, f"order_sensitivity: {'Adam' if opt else 'SGD'} on k and v"
        if how:
            notes.append(f"{key}: prompt lengths {how}")
        rows.append({**{k: v for k, v in asdict(shape).items() if k != "tokenizer"},
                     "weights_gb": weights / GB, "finetune_gb": ft / GB, "traces_gb": traces / GB,
                     "process_gb": (weights + ft + held) / GB, "finetune_note": ft_note,
                     "traces_note": tr_note})
    notes.append("parameter counts are exact (meta device); fine-tuning activations are an "
                 "upper bound; add about 1.5 GB per process for Python, torch and "
                 "transformers themselves; run one shard and read its peak memory before a "
                 "large request")
    return Plan(config.name, str(_resolve(dtype)).replace("torch.", ""), rows, counts, notes)
