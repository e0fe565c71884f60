"""Sanity checks for the bundled data: concept lexicons, default corpus and master text.

These tests read the files straight from the source tree (no package import needed) and use a
deliberately simple matcher, independent of the package's own labelling code, so that a
broken lexicon or a thin master text is caught even if the labeller changes.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest
import yaml

RESOURCES = Path(__file__).resolve().parents[2] / "src" / "neuronhunter" / "data" / "resources"
CONCEPTS = RESOURCES / "concepts.yaml"
CORPUS_DIR = RESOURCES / "corpus"
MASTER_TEXT = RESOURCES / "master_text.txt"

LEXICAL = ["animal", "food", "location", "language", "vehicle", "color"]
MIN_WORDS_LEXICAL = 200
MIN_DATE = 100  # words + patterns
MIN_NUMERIC = 100
MIN_MASTER_HITS = 250
MIN_CORPUS_FILES = 40
MIN_CORPUS_WORDS = 18_000

WORD_RE = re.compile(r"\S+")


def _word_count(text: str) -> int:
    return len(WORD_RE.findall(text))


@pytest.fixture(scope="module")
def categories() -> dict:
    data = yaml.safe_load(CONCEPTS.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and set(data) == {"categories"}
    cats = data["categories"]
    assert isinstance(cats, dict) and cats
    return cats


def _compile_category(entry: dict) -> list[re.Pattern]:
    """One case-insensitive whole-word alternation for the words (longest first) + raw patterns."""
    regexes = []
    words = sorted(set(entry.get("words") or []), key=len, reverse=True)
    if words:
        alternation = "|".join(re.escape(w) for w in words)
        regexes.append(re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE))
    for pat in entry.get("patterns") or []:
        regexes.append(re.compile(pat))
    return regexes


def _spans(regexes: list[re.Pattern], text: str) -> set[tuple[int, int]]:
    spans: set[tuple[int, int]] = set()
    for rx in regexes:
        spans.update(m.span() for m in rx.finditer(text) if m.end() > m.start())
    return spans


# --------------------------------------------------------------------------- concepts.yaml


def test_concepts_schema(categories):
    for name, entry in categories.items():
        assert re.fullmatch(r"[a-z_]+", name), name
        assert isinstance(entry, dict), name
        assert isinstance(entry.get("description"), str) and entry["description"], name
        assert isinstance(entry.get("words"), list), f"{name}: words must be a list"
        patterns = entry.get("patterns", [])
        assert patterns is None or isinstance(patterns, list), name
        for pat in patterns or []:
            assert isinstance(pat, str), (name, pat)
            re.compile(pat)  # raises on a bad regex
        if "control" in entry:
            assert isinstance(entry["control"], bool), name


def test_required_categories_present(categories):
    for name in [*LEXICAL, "date", "numeric", "function"]:
        assert name in categories, name
    assert categories["function"].get("control") is True
    controls = [n for n, e in categories.items() if e.get("control")]
    assert controls == ["function", "noun"]  # function words; nouns in general (the noun categories' baseline)
    # punctuation is covered by a pattern of the control category
    punct = _compile_category({"patterns": categories["function"]["patterns"]})
    for mark in ".,;:!?()\"'-":
        assert any(rx.fullmatch(mark) for rx in punct), mark


def test_words_are_lowercase_strings_without_duplicates(categories):
    for name, entry in categories.items():
        words = entry["words"]
        for w in words:
            # catches YAML surprises such as `no` -> False or `on` -> True
            assert isinstance(w, str), (name, w)
            assert w == w.lower(), (name, w)
            assert w == w.strip() and w, (name, repr(w))
        dups = [w for w, c in collections.Counter(words).items() if c > 1]
        assert not dups, f"{name}: duplicate words {dups}"


@pytest.mark.parametrize("name", LEXICAL)
def test_lexical_categories_are_large(categories, name):
    assert len(categories[name]["words"]) >= MIN_WORDS_LEXICAL, name


def test_date_and_numeric_sizes(categories):
    date = categories["date"]
    assert len(date["words"]) + len(date.get("patterns") or []) >= MIN_DATE
    assert len(date.get("patterns") or []) >= 3
    assert len(categories["numeric"]["words"]) >= MIN_NUMERIC
    assert categories["numeric"].get("patterns")


def test_patterns_match_their_examples(categories):
    date = _compile_category({"patterns": categories["date"]["patterns"]})
    for example in ["2024-05-01", "12/03/1999", "1990s", "May 5", "21 June 2019"]:
        assert any(rx.search(example) for rx in date), example
    assert any(rx.search("it opened in 1998.") for rx in date)
    numeric = _compile_category({"patterns": categories["numeric"]["patterns"]})
    for example in ["7", "1,200", "3.5", "12%", "22nd"]:
        assert any(rx.fullmatch(example) for rx in numeric), example


def test_cross_category_overlaps_are_rare(categories):
    seen: dict[str, list[str]] = collections.defaultdict(list)
    for name, entry in categories.items():
        for w in entry["words"]:
            seen[w].append(name)
    overlaps = {w: c for w, c in seen.items() if len(c) > 1}
    assert len(overlaps) <= 15, overlaps


# --------------------------------------------------------------------------- corpus


def test_corpus_size_and_naming():
    files = sorted(CORPUS_DIR.glob("*.txt"))
    assert len(files) >= MIN_CORPUS_FILES
    total = 0
    for f in files:
        assert re.fullmatch(r"\d{2}_[a-z0-9_]+\.txt", f.name), f.name
        text = f.read_text(encoding="utf-8")
        n = _word_count(text)
        assert 300 <= n <= 700, (f.name, n)
        total += n
    assert total >= MIN_CORPUS_WORDS, total


# --------------------------------------------------------------------------- master text


def test_master_text_shape():
    text = MASTER_TEXT.read_text(encoding="utf-8")
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    assert len(paragraphs) >= 40
    assert 8_000 <= _word_count(text) <= 14_000


def test_master_text_covers_every_category(categories):
    text = MASTER_TEXT.read_text(encoding="utf-8")
    counts = {name: len(_spans(_compile_category(entry), text)) for name, entry in categories.items()}
    thin = {name: n for name, n in counts.items() if n < MIN_MASTER_HITS}
    assert not thin, f"categories below {MIN_MASTER_HITS} hits in master text: {thin} (all: {counts})"


def test_package_loader_accepts_bundled_lexicon():
    """The bundled lexicon also passes the package's own (stricter, pydantic) loader."""
    concepts = pytest.importorskip("neuronhunter.data.concepts")
    lexicon = concepts.load_lexicon(CONCEPTS)
    assert set(lexicon.categories) >= {*LEXICAL, "date", "numeric", "function"}
    assert [n for n, c in lexicon.categories.items() if c.control] == ["function", "noun"]
