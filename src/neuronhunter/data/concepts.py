"""Concept categories and token labelling.

A lexicon (YAML or JSON) lists categories, each with whole-word entries and optional regex patterns::

    categories:
      animal:
        description: Animals
        words: [dog, cat, polar bear]
        patterns: []
      function:
        control: true          # the function-word / punctuation control class
        words: [the, of, and]
        patterns: ['[.,;:!?]']

Labelling works on **words, not tokens**: matches are found in the text (case-insensitive by default; multi-word
entries allowed), then every token whose character span overlaps a match gets the category — so a word split into
several BPE pieces labels all of them (or only the last with ``last_token_only``). A token may carry several labels
or none. A category may ``include`` others (``noun: {control: true, includes: [animal, food]}``): its tokens are its
own matches plus every token of the included categories, so a broad class can serve as the baseline of its members.
The bundled default lexicon has date, location, animal, food, numeric, language, vehicle and color, plus the
control classes ``function`` (function words, punctuation) and ``noun`` (common nouns and the noun categories).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from ..config import StrictModel, read_config_file, validate
from ..errors import ConfigError
from .corpus import resource_path


class CategorySpec(StrictModel):
    description: str = ""
    words: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)
    control: bool = False
    includes: list[str] = Field(default_factory=list, description="other categories whose tokens also count as "
                                "this one (a broad class such as 'noun' that includes animal, food, ...)")


class Lexicon(StrictModel):
    categories: dict[str, CategorySpec]


def default_lexicon_path() -> Path:
    return resource_path("concepts.yaml")


def load_lexicon(source: str | Path | dict[str, Any] | Lexicon | None = None) -> Lexicon:
    """Load and validate a lexicon from a file, a mapping, or the bundled default (``None``)."""
    if isinstance(source, Lexicon):
        return source
    if isinstance(source, dict):
        data, where = source, "categories"
    else:
        path = default_lexicon_path() if source in (None, "default") else Path(source)
        data, where = read_config_file(path), str(path)
    lex = validate(Lexicon, data, where)
    if not lex.categories:
        raise ConfigError(f"{where}: no categories defined")
    for name, spec in lex.categories.items():
        if not spec.words and not spec.patterns:
            raise ConfigError(f"{where}: category {name!r} has no words or patterns")
        for other in spec.includes:
            if other == name or other not in lex.categories:
                raise ConfigError(f"{where}: category {name!r} includes {other!r}, which is not another category")
        for pattern in spec.patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{where}: category {name!r}: bad pattern {pattern!r}: {exc}") from None
    return lex


_ES_PLURAL = ("s", "x", "z", "ch", "sh", "o")


def _word_regex(word: str, plural: bool) -> str:
    """Regex for one lexicon entry: its words separated by any white space, plus an optional regular plural."""
    body = r"\s+".join(re.escape(part) for part in word.split())
    if not plural:
        return body
    return body + ("(?:es)?" if word.endswith(_ES_PLURAL) else "s?")


class ConceptLabeller:
    """Labels tokens with categories using word matches and the tokenizer's character offsets.

    Args:
        lexicon: a :class:`Lexicon`, a path, a mapping, or None for the bundled default.
        case_sensitive: match words with their case (default: case-insensitive).
        last_token_only: label only the last token of a multi-token match.
        plurals: also match regular English plurals of word entries ("cats" for "cat", "boxes" for "box"), except
            in control categories (function words: "us" must not match "uses").
    """

    def __init__(self, lexicon: Lexicon | str | Path | dict[str, Any] | None = None, *,
                 case_sensitive: bool = False, last_token_only: bool = False, plurals: bool = True) -> None:
        self.lexicon = load_lexicon(lexicon)
        self.categories: list[str] = list(self.lexicon.categories)
        self.control: list[str] = [n for n, s in self.lexicon.categories.items() if s.control]
        self.last_token_only = last_token_only
        index = {name: i for i, name in enumerate(self.categories)}
        self._includes = [(index[n], [index[o] for o in s.includes]) for n, s in self.lexicon.categories.items()
                          if s.includes]
        flags = 0 if case_sensitive else re.IGNORECASE
        self._regexes: list[list[re.Pattern[str]]] = []
        for spec in self.lexicon.categories.values():
            regs = []
            words = sorted({w.strip() for w in spec.words if w.strip()}, key=len, reverse=True)
            if words:
                alternation = "|".join(_word_regex(w, plurals and not spec.control) for w in words)
                regs.append(re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", flags))
            regs.extend(re.compile(p, flags) for p in spec.patterns)
            self._regexes.append(regs)

    def spans(self, text: str) -> list[tuple[int, int, int]]:
        """Character spans ``(start, end, category_index)`` of all matches in ``text``."""
        out = []
        for c, regs in enumerate(self._regexes):
            for reg in regs:
                out.extend((m.start(), m.end(), c) for m in reg.finditer(text) if m.end() > m.start())
        return out

    def label(self, text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
        """Bool labels ``[n_tokens, n_categories]`` for tokens with character ``offsets`` into ``text``."""
        n = len(offsets)
        labels = np.zeros((n, len(self.categories)), dtype=bool)
        if n == 0:
            return labels
        starts = np.array([o[0] for o in offsets])
        ends = np.array([o[1] for o in offsets])
        ends_max = np.maximum.accumulate(ends)
        for s, e, c in self.spans(text):
            i0 = int(np.searchsorted(ends_max, s, side="right"))  # first token ending after s
            i1 = int(np.searchsorted(starts, e, side="left"))  # first token starting at/after e
            if i1 <= i0:
                continue
            # tokens in [i0, i1) overlap the span if they have a non-empty overlap
            hit = [i for i in range(i0, i1) if ends[i] > s and starts[i] < e and ends[i] > starts[i]]
            if not hit:
                continue
            if self.last_token_only:
                labels[hit[-1], c] = True
            else:
                labels[hit, c] = True
        for c, members in self._includes:  # a broad class also holds its member categories' tokens
            labels[:, c] |= labels[:, members].any(1)
        return labels

    def label_text(self, tokenizer: Any, text: str) -> tuple[list[int], np.ndarray]:
        """Tokenise ``text`` (no special tokens) and label its tokens."""
        from .batches import tokenize_document

        ids, offsets = tokenize_document(tokenizer, text)
        return ids, self.label(text, offsets)


def load_labeller(path: str | Path | None = None, **kwargs: Any) -> ConceptLabeller:
    """A :class:`ConceptLabeller` for a lexicon file (None = bundled default)."""
    return ConceptLabeller(path, **kwargs)
