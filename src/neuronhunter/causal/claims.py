"""Claims about neurons, and the tokens each claim is about.

A claim says: *neuron N of layer L, read in direction D (``+``: its activation ``a``; ``-``: ``-a``), is about X*,
where X is

* ``category``: one or more concept categories of the lexicon (``color``; ``color,food`` for a polysemantic
  claim: the union of the categories);
* ``tokens``: a set of tokens, compared after stripping spaces and lower-casing (``tokens:red|blue|green``);
* ``explanation``: an explanation written by ``neuronhunter explain`` (``explanations.parquet``): its ``rule``
  (JSON) names a token set (``tokens``, or exact ``token_ids``) or a ``category``, of the token itself (family
  ``tok``/``cat``), of the token before (``prev``/``prevcat``: "any token after ...") or of the token after
  (``next``/``nextcat``: "any token before ..."); ``explanation`` takes the neuron's best explanation in that
  direction, ``explanation:KIND`` the best of one kind. Explanations without such a rule (free text, bigrams,
  positions, domains) cannot be turned into a token set and are refused with the reason.

Claims come from a hunt (every neuron whose verdict is ``monosemantic`` or ``polysemantic`` by default, with the
category the verdict claims and the direction it is about), from the command line
(``--claim 20:882=color``, ``--claim 20:882-=tokens:red|blue``; repeatable) or from a file (one such spec per
line, or a CSV/Parquet/JSONL table with ``layer, neuron, claim`` and optionally ``direction``).

:func:`claim_mask` gives the verification tokens a claim is about (input token aligned: where the neuron is
claimed to fire; the loss measured there is that of predicting the next token).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

CLAIM_VERDICTS = ("monosemantic", "polysemantic")
DIRECTIONS = ("+", "-")
KINDS = ("category", "tokens", "explanation")

_SPEC = re.compile(r"^\s*L?(?P<layer>\d+)\s*[:.]\s*N?(?P<neuron>\d+)\s*(?P<dir>[+-])?\s*=\s*(?P<what>.+?)\s*$")


@dataclass(frozen=True)
class Claim:
    """One claim about one neuron (see the module docstring).

    Attributes:
        claim: the claim as written in outputs: ``color``, ``color,food``, ``tokens:red|blue``,
            ``explanation:<text>``.
        categories: the lexicon categories of a category claim (or of an explanation's rule).
        tokens: the normalised tokens of a token claim (or of an explanation's rule).
        token_ids: exact token ids (an explanation's rule), besides or instead of ``tokens``.
        offset: 0 = the token itself carries the category/token; -1 = the previous token does; +1 = the next.
        source: ``hunt``, ``user`` or ``explanation``.
        verdict: the hunt's verdict, for hunt claims.
    """

    layer: int
    neuron: int
    direction: str
    claim: str
    kind: str
    categories: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    offset: int = 0
    source: str = "user"
    verdict: str | None = None
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"claim {self.layer}:{self.neuron}: direction must be + or -, got {self.direction!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"claim {self.layer}:{self.neuron}: kind must be one of {', '.join(KINDS)}")
        if not self.categories and not self.tokens and not self.token_ids:
            raise ConfigError(f"claim {self.layer}:{self.neuron}={self.claim}: names no category and no token")

    @property
    def sign(self) -> float:
        return 1.0 if self.direction == "+" else -1.0

    @property
    def key(self) -> tuple[int, int, str, str]:
        return (self.layer, self.neuron, self.direction, self.claim)


def normalise_token(text: str) -> str:
    """How token claims compare tokens: surrounding spaces stripped, lower case."""
    return text.strip().lower()


def _split_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [v.strip() for v in re.split(r"[;,+]", value) if v.strip()]
    try:
        return [str(v).strip() for v in list(value) if str(v).strip()]
    except TypeError:
        return []


def category_claim(layer: int, neuron: int, direction: str, categories: Sequence[str], *, source: str = "user",
                   verdict: str | None = None) -> Claim:
    cats = tuple(dict.fromkeys(c.strip() for c in categories if c.strip()))
    return Claim(int(layer), int(neuron), direction, ",".join(cats), "category", categories=cats, source=source,
                 verdict=verdict)


def token_claim(layer: int, neuron: int, direction: str, tokens: Sequence[str], *, source: str = "user") -> Claim:
    toks = tuple(dict.fromkeys(normalise_token(t) for t in tokens if normalise_token(t)))
    if not toks:
        raise ConfigError(f"claim {layer}:{neuron}: the token list is empty")
    return Claim(int(layer), int(neuron), direction, "tokens:" + "|".join(toks), "tokens", tokens=toks,
                 source=source)


# ------------------------------------------------------------------------------------------------ explanations
_FAMILY_OFFSET = {"tok": 0, "cat": 0, "prev": -1, "prevcat": -1, "next": 1, "nextcat": 1}


def claim_from_rule(layer: int, neuron: int, direction: str, rule: Any, text: str, kind: str) -> Claim:
    """A claim from an explanation's ``rule`` (a JSON string or mapping; see the module docstring)."""
    if isinstance(rule, str):
        try:
            rule = json.loads(rule)
        except ValueError:
            rule = None
    where = f"explanation of {layer}:{neuron}{direction} ({kind}: {text!r})"
    if not isinstance(rule, dict):
        raise ConfigError(f"{where} has no rule naming tokens or categories; it cannot be verified on tokens")
    family = rule.get("family")
    if family is not None and family not in _FAMILY_OFFSET:
        raise ConfigError(f"{where}: a {family!r} rule names no token set or category; it cannot be verified here")
    cats = _split_list(rule.get("categories") or rule.get("category"))
    toks = [normalise_token(str(t)) for t in (rule.get("tokens") or []) if normalise_token(str(t))]
    ids: list[int] = []
    for x in rule.get("token_ids") or []:
        ids.extend(int(i) for i in (x if isinstance(x, (list, tuple)) else [x]))
    offset = _FAMILY_OFFSET.get(family, int(rule.get("offset", 0)))
    if offset not in (-1, 0, 1) or not (cats or toks or ids):
        raise ConfigError(f"{where}: its rule {rule} names no token set or category; it cannot be verified here")
    return Claim(int(layer), int(neuron), direction, f"explanation:{text}", "explanation", categories=tuple(cats),
                 tokens=tuple(toks), token_ids=tuple(sorted(set(ids))), offset=offset, source="explanation")


def explanation_claim(explanations: Any, layer: int, neuron: int, direction: str, kind: str | None = None) -> Claim:
    """The claim of the best explanation (``is_best``, else the highest ``simulation_r``) of a neuron in a
    direction, optionally of one ``kind``, from an ``explanations.parquet`` table."""
    if explanations is None:
        raise ConfigError("explanation claims need explanations.parquet in the run (run `neuronhunter explain`)")
    df = explanations[(explanations.layer == layer) & (explanations.neuron == neuron)]
    if "direction" in df.columns:
        df = df[df.direction == direction]
    if kind is not None and "kind" in df.columns:
        df = df[df.kind == kind]
    if df.empty:
        raise ConfigError(f"no explanation{' of kind ' + kind if kind else ''} for {layer}:{neuron}{direction} "
                          "in explanations.parquet")
    if kind is None and "is_best" in df.columns and df.is_best.any():
        df = df[df.is_best.astype(bool)]
    if "simulation_r" in df.columns:
        df = df.sort_values("simulation_r", ascending=False, kind="stable")
    row = df.iloc[0]
    return claim_from_rule(layer, neuron, direction, row.get("rule"), str(row.get("explanation", "")),
                           str(row.get("kind", "")))


# ------------------------------------------------------------------------------------------------ parsing
def parse_claim(spec: str, *, explanations: Any = None) -> Claim:
    """``LAYER:NEURON[+|-]=WHAT`` with WHAT a category list (``color`` / ``color,food``), ``tokens:a|b|c``,
    ``explanation`` or ``explanation:KIND`` (``20.882`` and ``L20.N882`` are accepted for the neuron)."""
    m = _SPEC.match(spec)
    if not m:
        raise ConfigError(f"bad claim {spec!r}: write LAYER:NEURON=CATEGORY, e.g. 20:882=color, 20:882-=color, "
                          "20:882=tokens:red|blue or 20:882=explanation")
    layer, neuron, direction = int(m["layer"]), int(m["neuron"]), m["dir"] or "+"
    what = m["what"]
    if what.startswith("tokens:"):
        return token_claim(layer, neuron, direction, what[len("tokens:"):].split("|"))
    if what == "explanation" or what.startswith("explanation:"):
        kind = what.split(":", 1)[1].strip() if ":" in what else None
        return explanation_claim(explanations, layer, neuron, direction, kind or None)
    return category_claim(layer, neuron, direction, what.split(","))


def read_claims_file(path: str | Path, *, explanations: Any = None) -> list[Claim]:
    """Claims from a file: one spec per line (``#`` comments), or a CSV/Parquet/JSONL table with columns
    ``layer, neuron, claim`` and optionally ``direction``."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"claims file not found: {path}")
    if path.suffix in (".csv", ".parquet", ".jsonl"):
        try:
            df = {".csv": pd.read_csv, ".parquet": pd.read_parquet,
                  ".jsonl": lambda p: pd.read_json(p, lines=True)}[path.suffix](path)
        except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
            raise ConfigError(f"cannot read claims table {path}: {str(exc).splitlines()[0]}") from None
        missing = {"layer", "neuron", "claim"} - set(df.columns)
        if missing:
            raise ConfigError(f"claims table {path} lacks columns {', '.join(sorted(missing))}")
        dirs = df["direction"] if "direction" in df.columns else ["+"] * len(df)
        return [parse_claim(f"{int(r.layer)}:{int(r.neuron)}{d}={r.claim}", explanations=explanations)
                for r, d in zip(df.itertuples(index=False), dirs, strict=True)]
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(parse_claim(line, explanations=explanations))
    if not out:
        raise ConfigError(f"claims file {path} holds no claims")
    return out


def hunt_claims(neurons: Any, verdicts: Sequence[str] = CLAIM_VERDICTS) -> list[Claim]:
    """The claims of a hunt's ``neurons.parquet``: every neuron with one of ``verdicts``, the category (or
    categories) its verdict claims and the direction it is about.

    Reads ``direction``, ``claim_category`` and ``claim_categories`` where the hunt writes them, else the older
    ``top_category`` / ``categories`` columns (direction ``+``).
    """
    need = {"layer", "neuron", "verdict"}
    if not need <= set(neurons.columns):
        raise ConfigError("neurons.parquet has no hunt verdicts; run `neuronhunter hunt` first (or give --claim)")
    df = neurons[neurons.verdict.isin(list(verdicts))]
    out = []
    for r in df.itertuples(index=False):
        d = getattr(r, "direction", "+")
        d = d if d in DIRECTIONS else "+"
        cats: list[str] = []
        if r.verdict == "polysemantic":
            cats = _split_list(getattr(r, "claim_categories", None))
        if not cats:
            cats = _split_list(getattr(r, "claim_category", None))
        if not cats:
            cats = _split_list(getattr(r, "categories", None)) or _split_list(getattr(r, "top_category", None))
        if cats:
            out.append(category_claim(int(r.layer), int(r.neuron), d, cats, source="hunt", verdict=str(r.verdict)))
    return out


def dedupe(claims: Iterable[Claim]) -> list[Claim]:
    """Claims in order, each (layer, neuron, direction, claim) once."""
    seen: dict[tuple[int, int, str, str], Claim] = {}
    for c in claims:
        seen.setdefault(c.key, c)
    return list(seen.values())


# ------------------------------------------------------------------------------------------------ tokens
class TokenMatcher:
    """Decides which verification tokens a claim is about (with a cache of decoded token strings)."""

    def __init__(self, tokenizer: Any, categories: Sequence[str], tokens: Any) -> None:
        """Args: ``tokens``: the :class:`~neuronhunter.causal.engine.VerificationTokens`."""
        self.tokenizer = tokenizer
        self.categories = list(categories)
        self._by_offset = {0: (tokens.input_ids, tokens.labels), -1: (tokens.prev_ids, tokens.prev_labels),
                           1: (tokens.target_ids, tokens.next_labels)}
        self._norm: dict[int, str] = {}

    def _normalised(self, ids: np.ndarray) -> np.ndarray:
        for i in np.unique(ids):
            if int(i) not in self._norm:
                self._norm[int(i)] = normalise_token(self.tokenizer.decode([int(i)]))
        return np.array([self._norm[int(i)] for i in ids], dtype=object)

    def unknown_categories(self, claim: Claim) -> list[str]:
        return [c for c in claim.categories if c not in self.categories]

    def mask(self, claim: Claim) -> np.ndarray:
        """``[N]`` bool: the verification tokens the claim is about."""
        ids, labels = self._by_offset[claim.offset]
        out = np.zeros(len(ids), dtype=bool)
        if claim.categories:
            bad = self.unknown_categories(claim)
            if bad:
                raise ConfigError(f"claim {claim.layer}:{claim.neuron}={claim.claim}: categor"
                                  f"{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)} not in the lexicon "
                                  f"({', '.join(self.categories)})")
            if labels is None:
                raise ConfigError("category claims need concept-labelled verification tokens")
            out |= labels[:, [self.categories.index(c) for c in claim.categories]].any(1)
        if claim.tokens:
            out |= np.isin(self._normalised(ids), list(claim.tokens))
        if claim.token_ids:
            out |= np.isin(ids, list(claim.token_ids))
        return out

    def vocabulary(self, claim: Claim, lexicon_words: dict[str, list[str]] | None) -> np.ndarray:
        """Token ids a claim predicts as *output* (for the steering check): the lexicon words of its categories and
        its tokens that are single tokens (with and without a leading space, as written and capitalised)."""
        words = list(claim.tokens)
        for c in claim.categories:
            words.extend((lexicon_words or {}).get(c, []))
        ids: set[int] = set(claim.token_ids)
        for w in words:
            for form in {w, w.capitalize()}:
                for text in (form, " " + form):
                    enc = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                    if len(enc) == 1:  # a word split into pieces predicts nothing specific with its first piece
                        ids.add(int(enc[0]))
        return np.array(sorted(ids), dtype=np.int64)
