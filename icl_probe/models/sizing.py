"""A model's size before it loads: its shape and parameter count read from its config on the
meta device (no weight is read), the memory its weights need, and the check
:func:`~icl_probe.models.load_model` makes with it so that a model that cannot fit fails at
once, with the estimate and the fix. Also the short key a model's results are filed under.

The parameter count is exact (the model class instantiated on the meta device, shared tensors
counted once), and so is the memory of the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from ..errors import IclProbeError, ModelLoadError
from .cache import GGUF_READ_ERRORS, embedded_gguf_path, gguf_cache_path, unreadable_gguf
from .devices import default_device, resolve_dtype
from .hub import hub_snapshot, refuse_remote_code

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
    if spec is None or str(spec).endswith(".gguf"):
        gguf = embedded_gguf_path() if spec is None else Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"{gguf}: no such GGUF file")
        cached = gguf_cache_path(gguf)
        if (cached / "config.json").is_file():
            return (AutoConfig.from_pretrained(str(cached), trust_remote_code=False),
                    f"{cached}/config.json", str(cached))

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


def model_key(spec: Any) -> str:
    """The short name a model's units are keyed by: ``embedded`` for the default, a GGUF
    file's stem, a directory's name, a hub id's last part (``EleutherAI/pythia-70m`` ->
    ``pythia-70m``); a loaded model is named from its ``icl_probe_info``."""
    if spec is None:
        return "embedded"
    if not isinstance(spec, (str, Path)):
        info = getattr(spec, "icl_probe_info", None)
        if info is None:
            return "model"
        return "embedded" if info.source == "embedded" else model_key(str(info.label))
    s = str(spec).rstrip("/")
    return Path(s).stem if s.endswith(".gguf") else Path(s).name


def model_shape(spec: str | None, key: str | None = None, *, tokenizer: bool = False
                ) -> ModelShape:
    """Sizes and parameter count of the model ``spec`` (None: the embedded default, a .gguf,
    a Hugging Face directory, or a hub id in the local cache), without loading weights."""
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


def available_memory(device: str | torch.device | None = None, *, device_map: Any = None,
                     n_devices: int | None = None) -> tuple[int, str]:
    """(bytes free, where) on the device a model would load onto: free GPU memory (summed
    over the GPUs a device map may use), or the machine's available RAM."""
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
    return resolve_dtype(dtype)
