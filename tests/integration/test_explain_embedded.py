"""Explanations on the real embedded model: a known colour neuron (L20.N882, see docs/hunt.md and docs/verify.md)
must get a best explanation that lists colour words (or names the colour category) and scores high on held-out
documents; the embedded explainer and simulator really run on it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from neuronhunter.data.concepts import load_lexicon
from neuronhunter.hunt import HuntConfig, run_hunt
from neuronhunter.judge.explain import ExplainConfig, explain_run

pytestmark = pytest.mark.integration

LAYER, NEURON = 20, 882


@pytest.fixture(scope="module")
def explained(embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "hunt"
    # the train side of the master text, layer 20 only (the pass stops after it)
    run_hunt(HuntConfig(split="train", layers=[LAYER], out=str(out), max_tokens=6000), model=embedded)
    cfg = ExplainConfig(max_tokens=3000, text_units=[f"{LAYER}.{NEURON}"], text_windows=2)
    return out, explain_run(out, cfg, model=embedded)


def test_colour_neuron_best_explanation_lists_colour_words(explained):
    run, result = explained
    table = result.explanations
    mine = table[(table.layer == LAYER) & (table.neuron == NEURON) & (table.direction == "+")]
    best = mine[mine.is_best].iloc[0]
    rule = json.loads(best.rule)
    colours = {w.lower() for w in load_lexicon().categories["color"].words}
    if best.kind == "category":
        assert rule["category"] == "color"
    else:
        assert best.kind == "tokens"
        assert sum(t in colours for t in rule["tokens"]) >= 2
    assert best.simulation_r >= 0.5 and best.confirm_simulation_r >= 0.5
    assert best.detection_auprc >= 0.5
    random = mine[mine.kind == "baseline_random"].simulation_r.iloc[0]
    assert abs(random) < 0.2 and best.simulation_r > random + 0.4
    neurons = pd.read_parquet(run / "neurons.parquet").set_index(["layer", "neuron"])
    assert neurons.loc[(LAYER, NEURON), "explanation_kind"] in ("tokens", "category")
    assert neurons.loc[(LAYER, NEURON), "explanation_direction"] == "+"


def test_embedded_explainer_and_simulator_ran(explained):
    run, result = explained
    text = result.text
    assert text is not None and len(text) == 1
    row = text.iloc[0]
    assert isinstance(row.explanation, str) and row.explanation and row.explain_s > 0
    assert row.n_heldout_tokens >= 24 and row.n_excerpts == 2 and row.exemplars_shown >= 5
    assert np.isfinite(row.rule_r_same_tokens)
    assert json.loads(result.explanations.query("kind == 'text'").rule.iloc[0])["explainer"].startswith("embedded")
    assert (run / "explain" / "text.parquet").exists()
