"""The BOS policy: which token each model family's windows start with (see ``neuronhunter.models.bos``)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from neuronhunter.models.bos import CHAT_MARKERS, BosPolicy, bos_policy, is_chat_marker


def make_tok(specials: list[str], *, bos: str | None = None, eos: str | None = None, words: int = 8,
             name: str = ""):
    """A real ``PreTrainedTokenizerFast`` over a tiny word-level vocabulary, built offline.

    ``specials`` get ids 0, 1, 2, ... in order (so the SmolLM2 layout is ``["<|endoftext|>", "<|im_start|>", ...]``);
    then ``words`` plain words follow.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for j in range(words):
        vocab[f"w{j}"] = len(vocab)
    vocab["[unk]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[unk]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[unk]", **kwargs)
    if name:
        tok.name_or_path = name
    return tok


# ---------------------------------------------------------------------------------------------- real GPT-2 BPE
def test_gpt2_uses_endoftext(gpt2_tok):
    p = bos_policy("gpt2", gpt2_tok)
    assert (p.token_id, p.token, p.rule) == (50256, "<|endoftext|>", "gpt2")
    assert p.token_id == gpt2_tok.convert_tokens_to_ids("<|endoftext|>")
    assert "<|endoftext|>" in p.reason and "GPT-2" in p.reason


def test_gpt2_tokenizer_under_other_model_types(gpt2_tok):
    # The tiny gpt_neox / llama test models share the GPT-2 tokenizer: every rule lands on its <|endoftext|>.
    assert bos_policy("gpt_neox", gpt2_tok).rule == "gpt_neox"
    p = bos_policy("llama", gpt2_tok)
    assert (p.token_id, p.rule) == (50256, "tokenizer")
    assert bos_policy("gpt_neox", gpt2_tok).token_id == 50256


def test_model_type_read_from_config(gpt2_tok):
    cfg = SimpleNamespace(model_type="gpt2", bos_token_id=50256)
    assert bos_policy("", gpt2_tok, hf_config=cfg).rule == "gpt2"


# ---------------------------------------------------------------------------------------------- family stand-ins
SMOL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>"]


def test_smollm2_instruct_layout_picks_endoftext_not_chat_marker():
    tok = make_tok(SMOL, bos="<|im_start|>", eos="<|im_end|>")
    assert tok.bos_token_id == 1  # what HookedModel used to prepend
    p = bos_policy("llama", tok)
    assert (p.token_id, p.token, p.rule) == (0, "<|endoftext|>", "smollm2")
    assert "<|im_start|>" in p.reason  # it says what it avoided and why


def test_smollm2_base_layout():
    tok = make_tok(SMOL, bos="<|endoftext|>", eos="<|endoftext|>")
    assert bos_policy("llama", tok).token_id == 0


def test_smollm_recognised_by_name_without_the_layout():
    tok = make_tok(["<|im_start|>", "<|im_end|>", "<|endoftext|>"], bos="<|im_start|>", eos="<|im_end|>")
    p = bos_policy("llama", tok, name="HuggingFaceTB/SmolLM2-360M-Instruct")
    assert (p.token, p.token_id, p.rule) == ("<|endoftext|>", 2, "smollm2")
    # without the name the generic rules still avoid the chat marker
    q = bos_policy("llama", tok)
    assert (q.token, q.rule) == ("<|endoftext|>", "separator")


def test_pythia_neox():
    tok = make_tok(["<|endoftext|>", "<|padding|>"], bos="<|endoftext|>", eos="<|endoftext|>")
    p = bos_policy("gpt_neox", tok, name="EleutherAI/pythia-70m")
    assert (p.token_id, p.rule) == (0, "gpt_neox")


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_needs_bos(model_type):
    tok = make_tok(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>")
    p = bos_policy(model_type, tok)
    assert (p.token_id, p.token, p.rule) == (2, "<bos>", "gemma")
    assert "Gemma" in p.reason


def test_gemma_bos_even_if_tokenizer_does_not_declare_it():
    tok = make_tok(["<pad>", "<eos>", "<bos>"], eos="<eos>")
    assert bos_policy("gemma2", tok).token == "<bos>"


def test_llama3_begin_of_text_over_chat_bos():
    tok = make_tok(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>")
    p = bos_policy("llama", tok)
    assert (p.token_id, p.rule) == (0, "llama3")
    # an instruct tokenizer that set bos to a header marker still gets <|begin_of_text|>
    tok2 = make_tok(["<|start_header_id|>", "<|begin_of_text|>", "<|eot_id|>"], bos="<|start_header_id|>")
    assert bos_policy("llama", tok2).token_id == 1


def test_llama2_mistral_s():
    tok = make_tok(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>")
    p = bos_policy("mistral", tok)
    assert (p.token, p.token_id, p.rule) == ("<s>", 1, "tokenizer")


def test_qwen_no_bos_uses_document_separator():
    tok = make_tok(["<|endoftext|>", "<|im_start|>", "<|im_end|>"][::-1], eos="<|im_end|>")
    # ids: <|im_end|>=0, <|im_start|>=1, <|endoftext|>=2: not the SmolLM2 layout
    p = bos_policy("qwen2", tok, name="Qwen/Qwen2.5-0.5B-Instruct")
    assert (p.token, p.token_id, p.rule) == ("<|endoftext|>", 2, "separator")
    assert "sets no BOS" in p.reason


def test_chat_bos_falls_back_to_plain_eos():
    tok = make_tok(["<|im_start|>", "</s>"], bos="<|im_start|>", eos="</s>")
    p = bos_policy("llama", tok)
    assert (p.token, p.rule) == ("</s>", "eos")


def test_config_bos_used_when_tokenizer_has_none():
    tok = make_tok(["<|im_start|>", "<doc>"])
    p = bos_policy("olmo2", tok, hf_config=SimpleNamespace(model_type="olmo2", bos_token_id=1))
    assert (p.token, p.token_id, p.rule) == ("<doc>", 1, "config")
    # a config bos that is a chat marker is not taken
    assert bos_policy("olmo2", tok, hf_config=SimpleNamespace(bos_token_id=0)).rule == "none"


def test_only_chat_markers_keeps_them_but_says_so():
    tok = make_tok(["<|im_start|>", "<|im_end|>"], bos="<|im_start|>", eos="<|im_end|>")
    p = bos_policy("llama", tok)
    assert (p.token, p.token_id, p.rule) == ("<|im_start|>", 0, "chat")
    assert "chat marker" in p.reason


def test_none_when_tokenizer_has_neither():
    tok = make_tok([], words=4)
    p = bos_policy("llama", tok)
    assert (p.token_id, p.token, p.rule) == (None, None, "none")
    assert bos_policy("llama", None).token_id is None


# ---------------------------------------------------------------------------------------------- the object
def test_policy_is_frozen_pure_and_one_sentence(gpt2_tok):
    tok = make_tok(SMOL, bos="<|im_start|>", eos="<|im_end|>")
    a, b = bos_policy("llama", tok), bos_policy("llama", tok)
    assert a == b and isinstance(a, BosPolicy)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.token_id = 1  # type: ignore[misc]
    for p in (a, bos_policy("gpt2", gpt2_tok), bos_policy("llama", make_tok([]))):
        assert p.reason.endswith(".") and "\n" not in p.reason
        if p.token is not None:
            assert repr(p.token) in p.reason and f"id {p.token_id}" in p.reason
    assert a.manifest() == {"bos_token_id": 0, "bos_token": "<|endoftext|>", "bos_rule": "smollm2",
                            "bos_reason": a.reason}
    assert tok.bos_token_id == 1  # the tokenizer itself is not modified


def test_chat_markers():
    assert is_chat_marker("<|im_start|>") and is_chat_marker("<|eot_id|>") and is_chat_marker("<start_of_turn>")
    assert not is_chat_marker("<|endoftext|>") and not is_chat_marker("<s>") and not is_chat_marker(None)
    assert "<bos>" not in CHAT_MARKERS and "<|begin_of_text|>" not in CHAT_MARKERS


# ---------------------------------------------------------------------------------------------- embedded model
@pytest.mark.integration
def test_embedded_smollm2_policy(embedded):
    tok = embedded.tokenizer
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1  # the tokenizer's own (chat) BOS
    p = bos_policy(embedded.config.model_type, tok, name=embedded.name, hf_config=embedded.config)
    assert (p.token_id, p.token, p.rule) == (0, "<|endoftext|>", "smollm2")
    assert tok.convert_ids_to_tokens(p.token_id) == "<|endoftext|>"


@pytest.mark.integration
def test_embedded_model_windows_start_with_the_policy_token(embedded):
    """The wiring: the model's BOS (what every scan window starts with) is the policy's, not the tokenizer's."""
    assert embedded.bos_token_id == 0 and embedded.bos_policy.rule == "smollm2"
    ids = embedded.to_tokens("The capital of France is", prepend_bos=True)[0].tolist()
    assert ids[0] == 0 and 1 not in ids
