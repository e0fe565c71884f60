"""Concept labelling works on words, not tokens (real GPT-2 BPE tokenizer, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from neuronhunter.config import load_config
from neuronhunter.data.concepts import ConceptLabeller, load_lexicon
from neuronhunter.data.corpus import Corpus
from neuronhunter.errors import ConfigError
from neuronhunter.hunt import HuntConfig

LEX = {"categories": {
    "animal": {"words": ["giraffe", "cat", "polar bear"]},
    "food": {"words": ["orange", "bread"]},
    "color": {"words": ["orange", "red"]},
    "date": {"words": ["monday"], "patterns": [r"\b\d{4}-\d{2}-\d{2}\b"]},
    "function": {"control": True, "words": ["the", "a"], "patterns": ["[.,]"]},
}}


def labelled(tok, text, **kw):
    lab = ConceptLabeller(LEX, **kw)
    ids, labels = lab.label_text(tok, text)
    pieces = [tok.decode([i]) for i in ids]
    return pieces, labels, lab.categories


def tokens_of(pieces, labels, cats, category):
    c = cats.index(category)
    return [p for p, hit in zip(pieces, labels[:, c], strict=True) if hit]


def test_multi_token_word_labels_every_piece(gpt2_tok):
    pieces, labels, cats = labelled(gpt2_tok, "We saw a giraffe today")
    assert len(gpt2_tok.encode(" giraffe")) == 2
    assert tokens_of(pieces, labels, cats, "animal") == [" gir", "affe"]


def test_last_token_only(gpt2_tok):
    pieces, labels, cats = labelled(gpt2_tok, "We saw a giraffe and a polar bear", last_token_only=True)
    assert tokens_of(pieces, labels, cats, "animal") == ["affe", " bear"]
    pieces, labels, cats = labelled(gpt2_tok, "We saw a polar bear")
    assert tokens_of(pieces, labels, cats, "animal") == [" polar", " bear"]


def test_case_insensitive_by_default(gpt2_tok):
    pieces, labels, cats = labelled(gpt2_tok, "GIRAFFE, Cat and cat")
    assert len(tokens_of(pieces, labels, cats, "animal")) == len(gpt2_tok.encode("GIRAFFE")) + 2
    pieces, labels, cats = labelled(gpt2_tok, "GIRAFFE, Cat and cat", case_sensitive=True)
    assert tokens_of(pieces, labels, cats, "animal") == [" cat"]


def test_several_labels_or_none(gpt2_tok):
    pieces, labels, cats = labelled(gpt2_tok, "An orange cat ate bread on Monday 2024-05-01.")
    orange = pieces.index(" orange")
    assert {cats[j] for j in np.nonzero(labels[orange])[0]} == {"food", "color"}
    assert not labels[pieces.index(" ate")].any()
    assert labels[pieces.index(" cat"), cats.index("animal")]
    assert labels[pieces.index(" Monday"), cats.index("date")]
    date_tokens = tokens_of(pieces, labels, cats, "date")
    assert "".join(date_tokens[1:]).strip() == "2024-05-01"  # the pattern labels all pieces of the date
    assert tokens_of(pieces, labels, cats, "function") == ["."]


def test_words_do_not_match_inside_other_words(gpt2_tok):
    pieces, labels, cats = labelled(gpt2_tok, "The category of catalogues; cats and redness")
    assert tokens_of(pieces, labels, cats, "animal") == [" cats"]  # plural matched, not 'category'
    assert tokens_of(pieces, labels, cats, "color") == []


def test_adding_a_category_is_adding_a_list(gpt2_tok):
    lex = {"categories": {**LEX["categories"], "planet": {"words": ["mars", "jupiter"]}}}
    lab = ConceptLabeller(lex)
    ids, labels = lab.label_text(gpt2_tok, "Mars and Jupiter are bright")
    assert lab.categories[-1] == "planet" and labels[:, -1].sum() == 2


def test_default_lexicon_has_the_categories_and_a_control():
    lab = ConceptLabeller(None)
    assert {"date", "location", "animal", "food", "numeric", "language", "vehicle", "color"} <= set(lab.categories)
    assert lab.control == ["function", "noun"]  # control classes: function words, nouns in general
    lex = load_lexicon(None)
    for name in ("animal", "food", "location", "language", "vehicle", "color"):
        assert len(lex.categories[name].words) >= 150, name


def test_master_text_has_enough_tokens_per_category(gpt2_tok):
    lab = ConceptLabeller(None)
    totals = np.zeros(len(lab.categories), dtype=int)
    for doc in Corpus("master"):
        totals += lab.label_text(gpt2_tok, doc.text)[1].sum(0)
    low = {c: int(n) for c, n in zip(lab.categories, totals, strict=True) if n < 200}
    assert not low, f"categories with < 200 labelled tokens in the master text: {low}"


def test_lexicon_and_hunt_config_reject_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_lexicon({"categories": {"animal": {"wordz": ["cat"]}}})
    with pytest.raises(ConfigError, match="bad pattern"):
        load_lexicon({"categories": {"animal": {"patterns": ["("]}}})
    bad = tmp_path / "hunt.yaml"
    bad.write_text("thresholds:\n  floor: 2\n  colour: red\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="thresholds.colour: unknown key"):
        load_config(HuntConfig, bad)
    good = tmp_path / "ok.yaml"
    good.write_text("max_tokens: 100\ncategories:\n  planet: {words: [mars]}\n  function: {control: true, "
                    "words: [the]}\nthresholds: {floor: 3}\n", encoding="utf-8")
    cfg = load_config(HuntConfig, good)
    assert cfg.corpus == "master" and cfg.thresholds.floor == 3
    assert cfg.labeller().categories == ["planet", "function"]
