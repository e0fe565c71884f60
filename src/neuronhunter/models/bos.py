"""Which token to prepend as BOS: an explicit policy per model family.

Every scan window is ``[BOS, t1, ..., t127]``. The BOS should be the token the model saw at the start of its
training documents, not whatever the tokenizer calls ``bos_token``: chat checkpoints often set ``bos_token`` to a
turn marker (SmolLM2-Instruct: ``<|im_start|>``), while the pretraining mix joined documents with
``<|endoftext|>``. :func:`bos_policy` picks the token from the tokenizer (and optionally the HF config) alone, with no
model run, and says why in one sentence (:attr:`BosPolicy.reason`, recorded in run manifests).

Rules, first match wins (``docs/bos.md`` has the table and the measurement behind the SmolLM2 rule):

==========  ===========================================================  ======================================
rule        when                                                         token
==========  ===========================================================  ======================================
gemma       ``model_type`` starts with ``gemma`` and ``<bos>`` exists    ``<bos>`` (Gemma needs it)
llama3      the vocabulary has ``<|begin_of_text|>``                     ``<|begin_of_text|>``
gpt2        ``model_type`` is ``gpt2``                                   ``<|endoftext|>``
gpt_neox    ``model_type`` is ``gpt_neox`` (Pythia)                      ``<|endoftext|>``
smollm2     ``<|endoftext|>`` is id 0 and ``<|im_start|>`` id 1, or the  ``<|endoftext|>`` (measured: lower
            name says SmolLM                                             early loss than ``<|im_start|>``)
tokenizer   the tokenizer's ``bos_token``, unless it is a chat marker    that token (Llama 2/Mistral ``<s>``)
config      ``hf_config.bos_token_id``, unless it is a chat marker       that token
separator   the vocabulary has ``<|endoftext|>``                         ``<|endoftext|>`` (Qwen, OLMo)
eos         the tokenizer's ``eos_token``, unless it is a chat marker    that token
chat        only chat markers: the tokenizer's bos, else eos             that marker (flagged in the reason)
none        no bos, no eos, no document separator                        None (windows start with real tokens)
==========  ===========================================================  ======================================

Wiring: ``HookedModel.bos_token_id`` returns ``bos_policy(...).token_id`` and the scan manifest records
:meth:`BosPolicy.manifest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DOC_SEPARATOR = "<|endoftext|>"

#: Tokens that mark chat turns or roles; they are never chosen as BOS while anything else is available.
CHAT_MARKERS = frozenset({
    "<|im_start|>", "<|im_end|>", "<|im_sep|>",  # ChatML (SmolLM, Qwen, Phi-4)
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",  # Llama 3
    "<start_of_turn>", "<end_of_turn>",  # Gemma
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endofturn|>",  # Phi-3, Zephyr, misc.
    "[INST]", "[/INST]",  # Mistral / Llama 2 chat
    "<|turn_start|>", "<|turn_end|>", "<|eot|>",
})


@dataclass(frozen=True)
class BosPolicy:
    """The BOS token a model's windows start with, and why.

    Attributes:
        token_id: the id to prepend, or None for no BOS.
        token: its string form (``"<|endoftext|>"``), or None.
        rule: which rule chose it (``"smollm2"``, ``"gpt2"``, ``"tokenizer"``, ... see the module docstring).
        reason: one sentence naming the token and why (for the run manifest).
    """

    token_id: int | None
    token: str | None
    rule: str
    reason: str

    def manifest(self) -> dict[str, Any]:
        """The fields a run manifest records."""
        return {"bos_token_id": self.token_id, "bos_token": self.token, "bos_rule": self.rule,
                "bos_reason": self.reason}


def is_chat_marker(token: str | None) -> bool:
    """Whether ``token`` marks a chat turn or role rather than the start of a document."""
    return token is not None and token in CHAT_MARKERS


def _vocab(tokenizer: Any) -> dict[str, int]:
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return {}
    return dict(vocab) if vocab else {}


def _special(tokenizer: Any, attr: str, vocab: dict[str, int]) -> tuple[str, int] | None:
    """The tokenizer's ``bos``/``eos`` token as ``(string, id)``, if set and in the vocabulary."""
    token = getattr(tokenizer, f"{attr}_token", None)
    token = None if token is None else str(token)
    token_id = getattr(tokenizer, f"{attr}_token_id", None)
    if token is not None and token in vocab:
        return token, int(vocab[token])
    if token_id is not None:
        by_id = {v: k for k, v in vocab.items()}
        if int(token_id) in by_id:
            return by_id[int(token_id)], int(token_id)
    return None


def _id_to_token(tokenizer: Any, token_id: int, vocab: dict[str, int]) -> str | None:
    for tok, i in vocab.items():
        if i == token_id:
            return tok
    try:
        out = tokenizer.convert_ids_to_tokens(int(token_id))
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return None if out is None else str(out)


def _pick(token: str, token_id: int, rule: str, why: str) -> BosPolicy:
    return BosPolicy(int(token_id), token, rule, f"BOS {token!r} (id {int(token_id)}): {why}.")


def bos_policy(model_type: str, tokenizer: Any, name: str = "", hf_config: Any = None) -> BosPolicy:
    """The token a model was trained to start documents with (see the module docstring for the rules).

    A pure function of its arguments: it reads the tokenizer's vocabulary and special tokens, never runs a model.

    Args:
        model_type: the HF ``config.model_type`` (``"llama"``, ``"gpt2"``, ...); empty: read from ``hf_config``.
        tokenizer: the model's tokenizer (anything with ``get_vocab()``, ``bos_token``, ``eos_token``), or None.
        name: the model's display name or hub id, used only to recognise a family (``"smollm2-135m"``).
        hf_config: the HF config, for ``model_type`` and as a fallback ``bos_token_id``.
    """
    model_type = (model_type or str(getattr(hf_config, "model_type", "") or "")).lower()
    if tokenizer is None:
        return BosPolicy(None, None, "none", "No BOS: the model has no tokenizer to take one from.")
    vocab = _vocab(tokenizer)
    label = " ".join(filter(None, [name, str(getattr(tokenizer, "name_or_path", "") or "")])).lower()
    sep = vocab.get(DOC_SEPARATOR)

    if model_type.startswith("gemma") and "<bos>" in vocab:
        return _pick("<bos>", vocab["<bos>"], "gemma",
                     "Gemma is trained with <bos> at the start of every sequence and degrades badly without it")
    if "<|begin_of_text|>" in vocab:
        return _pick("<|begin_of_text|>", vocab["<|begin_of_text|>"], "llama3",
                     "Llama 3 style models start every training document with <|begin_of_text|>")
    if model_type == "gpt2" and sep is not None:
        return _pick(DOC_SEPARATOR, sep, "gpt2",
                     "GPT-2 was trained on documents joined by <|endoftext|>, its only special token")
    if model_type == "gpt_neox" and sep is not None:
        return _pick(DOC_SEPARATOR, sep, "gpt_neox",
                     "Pythia/GPT-NeoX models were trained on documents separated by <|endoftext|>")
    smollm_layout = sep == 0 and vocab.get("<|im_start|>") == 1
    if sep is not None and (smollm_layout or "smollm" in label):
        return _pick(DOC_SEPARATOR, sep, "smollm2",
                     "SmolLM2's pretraining documents are separated by <|endoftext|> (<|im_start|> is a chat-turn "
                     "marker); measured on the embedded model it gives lower loss on the first tokens than "
                     "<|im_start|> or no BOS (docs/bos.md)")

    bos = _special(tokenizer, "bos", vocab)
    if bos is not None and not is_chat_marker(bos[0]):
        return _pick(bos[0], bos[1], "tokenizer", "the tokenizer's own BOS token, which is not a chat marker")
    cfg_id = getattr(hf_config, "bos_token_id", None) if hf_config is not None else None
    if isinstance(cfg_id, int):
        cfg_tok = _id_to_token(tokenizer, cfg_id, vocab)
        if cfg_tok is not None and not is_chat_marker(cfg_tok):
            return _pick(cfg_tok, cfg_id, "config", "the model config's bos_token_id (the tokenizer sets no usable BOS)")
    if sep is not None:
        why = (f"the tokenizer's BOS {bos[0]!r} is a chat marker" if bos is not None else "the tokenizer sets no BOS")
        return _pick(DOC_SEPARATOR, sep, "separator", f"{why}, so the document separator <|endoftext|> is used")
    eos = _special(tokenizer, "eos", vocab)
    if eos is not None and not is_chat_marker(eos[0]):
        return _pick(eos[0], eos[1], "eos", "no usable BOS, so the tokenizer's EOS (document end) is used as the "
                                            "sequence starter")
    for found, what in ((bos, "BOS"), (eos, "EOS")):
        if found is not None:
            return _pick(found[0], found[1], "chat",
                         f"only the tokenizer's {what}, a chat marker, is available (no document token), so windows "
                         "start with it; expect first-token artefacts")
    return BosPolicy(None, None, "none", "No BOS: the tokenizer has no BOS, EOS or <|endoftext|> token.")
