"""Model directories and the local Hugging Face cache, read without ever running code that
ships with a model (``trust_remote_code`` stays False, and such a directory is refused before
transformers is asked)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from ..errors import ModelLoadError


def remote_code(directory: Path) -> str | None:
    """Why loading ``directory`` would run Python code that ships with it, or None.

    A ``config.json`` (or ``tokenizer_config.json``) with an ``auto_map`` whose model type (or
    tokenizer class) transformers does not know can only be loaded by importing the
    directory's own ``.py`` files. icl-probe never does (``trust_remote_code`` is False on
    every call, and such a directory is refused before transformers is asked, so nothing ever
    prompts either)."""
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(directory) / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{f} is not a readable JSON file ({e}); a model directory "
                                 "written by save_pretrained has a valid one") from e
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not auto_map:
            continue
        if name == "config.json" and data.get("model_type") in CONFIG_MAPPING:
            continue  # a known architecture: transformers' own class is used, no code runs
        if name == "tokenizer_config.json" and hasattr(transformers,
                                                       str(data.get("tokenizer_class"))):
            continue
        files = sorted({str(v).split(".")[0] + ".py" for v in (
            auto_map.values() if isinstance(auto_map, dict) else [])
            if isinstance(v, str)})
        kind = (f"model_type {data.get('model_type')!r}" if name == "config.json"
                else f"tokenizer_class {data.get('tokenizer_class')!r}")
        return (f"{f} has an auto_map ({', '.join(files) or 'custom classes'}) and a {kind} "
                "that transformers does not know: loading it would import and run the "
                "directory's own Python code")
    return None


def refuse_remote_code(directory: Path, what: str) -> None:
    """Raise :class:`ModelLoadError` when loading ``directory`` would run its own code."""
    why = remote_code(directory)
    if why:
        raise ModelLoadError(
            f"{what}: {why}, which icl-probe never does (trust_remote_code stays False). Use a "
            "model whose architecture transformers implements, or convert the checkpoint to "
            "one (config.json with a standard model_type, weights as safetensors)")


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local Hugging Face cache's snapshot directory of ``repo_id`` (None if not cached)."""
    try:
        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an id huggingface_hub refuses is not in the cache either
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _from_hf_directory(path_or_id: str, *, dtype: torch.dtype, device_map: Any,
                       revision: str | None, max_memory: Any = None) -> tuple[Any, Any]:
    """The model and tokenizer of a directory or cached hub id; :func:`load_model` has refused
    any that would run its own code, and transformers is told never to."""
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if _offline():  # read now: huggingface_hub reads HF_HUB_OFFLINE only once, at import
        kwargs["local_files_only"] = True
    if revision is not None:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    hf_model = AutoModelForCausalLM.from_pretrained(
        path_or_id, dtype=dtype, device_map=device_map, attn_implementation="eager", **kwargs
    )
    return hf_model, tokenizer
