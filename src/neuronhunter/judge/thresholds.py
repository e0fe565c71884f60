"""The verdict thresholds (one validated config; every formula that uses them is in :mod:`.verdicts`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from ..config import StrictModel

VERDICTS = ("dead", "positional", "token", "syntactic", "monosemantic", "polysemantic", "unexplained")


class VerdictThresholds(StrictModel):
    """Thresholds of the verdict policy. ``S`` is the layer's activation scale (median neuron standard deviation),
    ``P`` a direction's typical peak (median of its top-k window peaks)."""

    # the high set (judge.specificity)
    high_quantile: float = Field(0.01, gt=0, lt=1, description="the high set holds at most about this top share "
                                 "of the tokens")
    floor: float = Field(2.0, ge=0, description="high activations are >= floor * S (noise cannot score)")
    peak_fraction: float = Field(0.5, ge=0, le=1, description="high activations are >= peak_fraction * P")
    crs_floor: float = Field(0.5, ge=0, description="CRS is 0 unless the best concept mean >= crs_floor * S")
    # dead
    dead_range: float = Field(0.05, ge=0, description="dead: max - min over all tokens (position 0 included) "
                              "<= dead_range * S")
    # positional
    pos0_ratio: float = Field(1.0, gt=0, description="positional: the position-0 value >= pos0_ratio * P (and "
                              ">= floor * S): the sequence starter carries the neuron's highest activations")
    fixed_position_frac: float = Field(0.8, gt=0, le=1, description="positional: share of the top-k peaks at one "
                                       "window position")
    fixed_position_min_examples: int = Field(5, ge=1, description="top-k windows needed for the fixed-position "
                                             "and token tests")
    # token
    token_share: float = Field(0.8, gt=0, le=1, description="token: the two most common word types carry >= this "
                               "share of the top-k peaks")
    # a category is specific (per direction)
    min_count: int = Field(5, ge=1, description="categories with fewer labelled tokens are not scored")
    min_hits: int = Field(5, ge=1, description="specific: at least this many high tokens in the category")
    min_share: float = Field(0.2, gt=0, le=1, description="specific: precision (share of the high set) >= this")
    min_lift: float = Field(2.0, ge=1, description="specific: precision >= min_lift * base rate (and inside each "
                            "broad class that includes the category)")
    alpha: float = Field(0.01, gt=0, lt=1, description="specific: Benjamini-Hochberg q-value <= alpha, over every "
                         "test of the hunt")
    min_types: int = Field(3, ge=1, description="specific: distinct word types of the category among the top-k "
                           "peaks (a concept claim needs several words, else it is a token neuron)")
    # claims
    claim_coverage: float = Field(0.5, gt=0, le=1, description="a claim (syntactic, mono-, polysemantic) must "
                                  "explain >= this share of the high set (sum over its groups of the best "
                                  "precision in each)")
    related: list[tuple[str, str]] = Field([("date", "numeric")], description="category pairs counted as related")
    related_overlap: float = Field(0.3, gt=0, le=1, description="related when |A&B|/min(|A|,|B|) of tokens >= this")
    sparse_recall: float = Field(0.2, gt=0, le=1, description="flag 'sparse': the claim's recall is below this")

    @field_validator("related")
    @classmethod
    def _pairs(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for a, b in value:
            if a == b:
                raise ValueError(f"related pair ({a}, {b}) names one category twice")
        return value
