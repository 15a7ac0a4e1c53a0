"""Tiny randomly initialised models of every tested family, with a byte-level tokenizer built
in memory: for tests and synthetic tasks, nothing read from disk or network."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

from ..errors import ModelLoadError
from .bridge import ModelInfo, _bridge
from .devices import resolve_dtype


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built in memory (256 byte tokens + ``<s>`` + ``<pad>``): no files,
    no network. Every string round-trips; each byte is one token."""
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
    n_layers: int = 3,
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

    The default sizes are all distinct (3 layers, 4 query heads over 2 key/value heads,
    ``d_head`` 12, ``d_model`` 48, ``d_mlp`` 80), so that a test on the defaults fails when
    two axes are swapped (a layer axis read as a key/value-head axis, say).

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
