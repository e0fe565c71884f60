"""Planted ground truth: tiny random models whose chosen layer-0 neurons are rewired to known behaviours.

With the attention output of block 0 zeroed, the residual stream at the first MLP is the token embedding (plus the
learned position embedding for GPT-2). We pick orthonormal directions (orthogonal to the all-ones vector, so
LayerNorm's centring does not touch them), replace the embedding of every word we plant by a sum of directions
(so all words of a class reach a neuron with the same strength), and point each planted neuron at one direction:

==========  ======================================================  =========================================
neuron      fires on                                                verdict
==========  ======================================================  =========================================
MONO        every colour word                                       monosemantic (color)
NEG         every colour word, *negatively* (Llama: up row negated)  monosemantic (color), direction ``-``
SPARSE      3 rare colour words (10% of the colour tokens)           monosemantic (color), flag ``sparse``
MODBOS      the same rare colours, and BOS at 0.6 x that value       monosemantic (color), flag ``pos0``
TOKEN       " by" only                                               token
NOUN        every noun (animals, vehicles, other nouns)              syntactic (noun)
POLY        animal and vehicle words                                 polysemantic (animal, vehicle)
POS0        BOS (position 0)                                         positional
FIXED       position 5 (GPT-2 position embedding)                    positional
DEAD        nothing (zero weights)                                   dead
==========  ======================================================  =========================================

The hunt must return exactly these verdicts, on both architectures.

Property (sign invariance): negating row ``n`` of ``up_proj`` and column ``n`` of ``down_proj`` leaves a Llama
model's function unchanged and negates neuron ``n``. For random sets of neurons (both layers) of a tiny random Llama
model we flip, hunt again, and compare: every verdict, claim, flag and score of every neuron is the same,
``direction`` is swapped exactly for the flipped neurons, and the per-direction table swaps its ``+``/``-`` rows.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch

from neuronhunter.hunt import HuntConfig, run_hunt
from neuronhunter.io import read_json, read_table
from neuronhunter.models.sites import Site
from neuronhunter.models.tiny import tiny_model

MONO, NEG, SPARSE, MODBOS, TOKEN, NOUN, POLY, POS0, FIXED, DEAD = 3, 9, 17, 23, 31, 42, 55, 64, 77, 101

ANIMALS = ["cat", "dog", "horse", "cow"]
VEHICLES = ["car", "bus", "train", "truck", "bike"]
COLORS = ["red", "blue", "green", "yellow", "white"]
RARE_COLORS = ["purple", "pink", "brown"]
FILLER = ["man", "woman", "house", "tree", "river", "city", "book", "table", "window", "road", "field", "garden",
          "child", "friend", "teacher", "door"]
VERBS = ["saw", "found", "passed", "watched", "liked", "followed", "met", "left"]

CATEGORIES = {
    "animal": {"words": ANIMALS},
    "vehicle": {"words": VEHICLES},
    "color": {"words": COLORS + RARE_COLORS},
    "function": {"control": True, "words": ["the", "a", "and", "of", "then", "by"], "patterns": ["[.,]"]},
    "noun": {"control": True, "words": FILLER, "includes": ["animal", "vehicle"]},
}


def make_text(n_sentences: int = 220, seed: int = 0) -> str:
    """Random simple sentences; nouns 20% animals, 20% vehicles, 60% other nouns; colours before 40% of them
    (a tenth of the colours rare); " by" in a third of the sentences."""
    rng = random.Random(seed)

    def noun_phrase() -> str:
        kind = rng.random()
        noun = rng.choice(ANIMALS if kind < 0.2 else VEHICLES if kind < 0.4 else FILLER)
        adj = ""
        if rng.random() < 0.4:
            adj = rng.choice(RARE_COLORS if rng.random() < 0.1 else COLORS) + " "
        return f"{rng.choice(['the', 'a'])} {adj}{noun}"

    sentences = []
    for _ in range(n_sentences):
        parts = [noun_phrase().capitalize(), rng.choice(VERBS), noun_phrase()]
        if rng.random() < 0.33:
            parts += ["by", noun_phrase()]
        if rng.random() < 0.5:
            parts += ["and", "then", rng.choice(VERBS), noun_phrase()]
        sentences.append(" ".join(parts) + rng.choice([".", ",", "."]))
    return " ".join(sentences)


def token_ids(tok, words: list[str]) -> list[int]:
    ids = set()
    for w in words:
        for form in (f" {w}", w, f" {w.capitalize()}", w.capitalize()):
            enc = tok.encode(form)
            if len(enc) == 1:
                ids.add(enc[0])
    return sorted(ids)


def directions(d: int, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` orthonormal directions ``[d, k]`` orthogonal to the all-ones vector."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.cat([torch.ones(d, 1), torch.randn(d, k, generator=g)], dim=1)
    q, _ = torch.linalg.qr(basis)
    return q[:, 1:]


def plant_embeddings(emb: torch.Tensor, tok, basis: dict[str, torch.Tensor], bos: int, bos_mod: float) -> None:
    """Planted words get embeddings that are sums of directions (nothing else), so every word of a class reaches
    its neurons equally; every other row loses its component along the directions."""
    stacked = torch.stack(list(basis.values()), dim=1)
    emb -= (emb @ stacked) @ stacked.T
    plan = {
        "color": token_ids(tok, COLORS) + token_ids(tok, RARE_COLORS),
        "rare": token_ids(tok, RARE_COLORS),
        "animal_vehicle": token_ids(tok, ANIMALS + VEHICLES),
        "noun": token_ids(tok, ANIMALS + VEHICLES + FILLER),
        "by": token_ids(tok, ["by"]),
    }
    planted = sorted({i for ids in plan.values() for i in ids})
    emb[planted] = 0.0
    for name, ids in plan.items():
        emb[ids] += basis[name]
    emb[token_ids(tok, RARE_COLORS)] += basis["modbos"]
    emb[bos] += basis["bos"] + bos_mod * basis["modbos"]


NAMES = ["color", "rare", "animal_vehicle", "noun", "by", "bos", "modbos", "pos5"]


def layer0_acts(m, text: str, neuron: int) -> tuple[list[int], torch.Tensor]:
    ids = [m.bos_token_id, *m.tokenizer.encode(text)]
    site = Site.mlp_post(0)
    with torch.no_grad():
        _, cache = m.run_with_cache(torch.tensor([ids]), sites=[site], stop_at_layer=1)
    return ids, cache[site][0, :, neuron]


def tune_bos(m, plant, target: float = 0.6) -> None:
    """Bisect the BOS share of MODBOS's direction so that its BOS activation is ``target`` x its rare-colour one."""
    lo, hi = 0.0, 2.0
    for _ in range(30):
        mid = (lo + hi) / 2
        plant(mid)
        _, a = layer0_acts(m, " a purple car", MODBOS)
        ratio = float(a[0] / a[2])
        lo, hi = (mid, hi) if ratio < target else (lo, mid)
    plant((lo + hi) / 2)


@torch.no_grad()
def planted_gpt2():
    m = tiny_model("gpt2")
    hf, tok = m.model, m.tokenizer
    wte, wpe = hf.transformer.wte.weight, hf.transformer.wpe.weight
    d = wte.shape[1]
    basis = dict(zip(NAMES, directions(d, len(NAMES)).T, strict=True))
    original = wte.clone()
    wpe.zero_()  # no position signal (ties stay ties) except the planted one
    wpe[5] = 2.0 * basis["pos5"]
    block = hf.transformer.h[0]
    block.attn.c_proj.weight.zero_()
    block.attn.c_proj.bias.zero_()
    block.ln_2.weight.fill_(1.0)
    block.ln_2.bias.zero_()
    fc_w, fc_b = block.mlp.c_fc.weight, block.mlp.c_fc.bias  # Conv1D: [d_model, d_mlp]
    for n, name in ((MONO, "color"), (SPARSE, "rare"), (MODBOS, "modbos"), (TOKEN, "by"), (NOUN, "noun"),
                    (POLY, "animal_vehicle"), (POS0, "bos"), (FIXED, "pos5")):
        fc_w[:, n] = basis[name]
        fc_b[n] = -1.5
    fc_w[:, DEAD] = 0.0
    fc_b[DEAD] = -10.0

    def plant(bos_mod: float) -> None:
        wte.copy_(original)
        plant_embeddings(wte, tok, basis, m.bos_token_id, bos_mod)

    tune_bos(m, plant)
    return m


@torch.no_grad()
def planted_llama():
    m = tiny_model("llama")
    hf, tok = m.model, m.tokenizer
    emb = hf.model.embed_tokens.weight
    d = emb.shape[1]
    basis = dict(zip(NAMES, directions(d, len(NAMES)).T, strict=True))
    original = emb.clone()
    layer = hf.model.layers[0]
    layer.self_attn.o_proj.weight.zero_()
    layer.post_attention_layernorm.weight.fill_(1.0)
    gate, up = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight  # [d_mlp, d_model]
    for n, name in ((MONO, "color"), (NEG, "color"), (SPARSE, "rare"), (MODBOS, "modbos"), (TOKEN, "by"),
                    (NOUN, "noun"), (POLY, "animal_vehicle"), (POS0, "bos")):
        gate[n] = 0.5 * basis[name]
        up[n] = 0.5 * basis[name]
    up[NEG] *= -1  # the same neuron as MONO with its sign relabelled (the model is unchanged)
    layer.mlp.down_proj.weight[:, NEG] *= -1
    gate[DEAD] = 0.0
    up[DEAD] = 0.0

    def plant(bos_mod: float) -> None:
        emb.copy_(original)
        plant_embeddings(emb, tok, basis, m.bos_token_id, bos_mod)

    tune_bos(m, plant)
    return m


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "text.txt"
    path.write_text(make_text(), encoding="utf-8")
    return str(path)


def hunt(model, corpus, out, **kw):
    cfg = HuntConfig(model="tiny", corpus=corpus, out=str(out), categories=CATEGORIES, context_length=32,
                     top_k=20, split="all", formats=["parquet"], **kw)
    return run_hunt(cfg, model=model, overwrite=True)


EXPECTED = {
    MONO: ("monosemantic", "color"), SPARSE: ("monosemantic", "color"), MODBOS: ("monosemantic", "color"),
    TOKEN: ("token", None), NOUN: ("syntactic", "noun"), POLY: ("polysemantic", None), POS0: ("positional", None),
    DEAD: ("dead", None),
}
EXPECTED_FAMILY = {"gpt2": {FIXED: ("positional", None)}, "llama": {NEG: ("monosemantic", "color")}}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def planted(request, corpus, tmp_path_factory):
    model = planted_gpt2() if request.param == "gpt2" else planted_llama()
    out = tmp_path_factory.mktemp(f"hunt_{request.param}")
    return request.param, hunt(model, corpus, out), out


def text(value):
    return value if isinstance(value, str) else None


def layer0(result):
    frame = result.neurons
    return frame[frame.layer == 0].set_index("neuron")


def test_planted_verdicts(planted):
    family, result, _ = planted
    rows = layer0(result)
    expected = {**EXPECTED, **EXPECTED_FAMILY[family]}
    got = {n: (rows.loc[n, "verdict"], text(rows.loc[n, "claim_category"])) for n in expected}
    assert got == expected


def test_planted_scores_and_flags(planted):
    family, result, _ = planted
    rows = layer0(result)
    mono = rows.loc[MONO]
    assert mono.direction == "+" and mono.precision == 1.0 and mono.recall > 0.85 and mono.auprc > 0.99
    assert mono.q_value < 1e-10 and mono.crs > 0.99 and mono.distinct_types >= 3
    sparse = rows.loc[SPARSE]
    assert sparse.precision == 1.0 and 0.04 < sparse.recall < 0.2 and "sparse" in sparse["flags"].split(",")
    assert sparse.dprime < 1.5  # the mean-based rule could not see it
    modbos = rows.loc[MODBOS]
    assert "pos0" in modbos["flags"].split(",") and 0.5 < modbos.pos0_ratio < 0.7
    assert rows.loc[TOKEN].claim_token == "by" and rows.loc[TOKEN].top_tokens.startswith("by 1.00")
    # all its high activations are function words, but one word is not a class: token, not syntactic
    assert rows.loc[TOKEN].top_category == "function" and rows.loc[TOKEN].precision == 1.0
    assert rows.loc[TOKEN].category_types == 1
    poly = rows.loc[POLY]
    assert set(poly.claim_categories.split(",")) == {"animal", "vehicle"}
    assert "control:noun" in poly["flags"]  # nouns are all of its high activations, but it is specific beyond them
    assert rows.loc[POS0].pos0_value > 2 and rows.loc[POS0].peak < 0.5  # BOS carries its only high activations
    if family == "llama":
        neg = rows.loc[NEG]
        assert neg.direction == "-"
        same = ["verdict", "claim_category", "precision", "recall", "f1", "auprc", "p_value", "q_value", "crs",
                "dprime", "distinct_types", "flags", "n_high", "peak", "threshold"]
        assert neg[same].tolist() == mono[same].tolist()
    else:
        assert rows.loc[FIXED].topk_pos == 5 and rows.loc[FIXED].topk_pos_frac == 1.0


def test_planted_top_neurons_and_champion(planted):
    _, result, _ = planted
    first = result.top[result.top["rank"] == 0].set_index(["category", "kind"])
    best = first.loc[("color", "monosemantic")]
    assert (best.layer, best.neuron) in {(0, MONO), (0, NEG)}  # all colours; SPARSE has precision 1, recall 0.06
    assert best.precision == 1.0 and best.f1 > 0.9
    from neuronhunter.judge.judgement import top_neurons_per_category

    every = top_neurons_per_category(result.judgement, n=10_000)
    listed = every[(every.layer == 0) & (every.neuron == POLY)]
    assert set(listed.category) == {"animal", "vehicle"} and set(listed.kind) == {"polysemantic"}
    champ = result.champion
    assert champ is not None and champ["verdict"] not in ("positional", "dead")


def test_planted_run_folder(planted):
    family, result, out = planted
    neurons = read_table(out / "neurons.parquet")
    directions = read_table(out / "directions.parquet")
    concepts = read_table(out / "concepts.parquet")
    manifest = read_json(out / "manifest.json")
    assert manifest["kind"] == "hunt" and manifest["hunt"]["verdicts"]["dead"] >= 1
    # one definition of "dead": the scan summary, browser and explorer (no verdicts) count what the hunt calls dead
    from neuronhunter.judge.verdicts import dead_neurons

    stats_only = neurons.drop(columns=[c for c in neurons.columns if c not in
                                       ("layer", "neuron", "std", "min", "max", "first_min", "first_max")])
    assert (dead_neurons(stats_only) == (neurons["verdict"] == "dead").to_numpy()).all()
    assert dead_neurons(stats_only)[(neurons.layer == 0).to_numpy() & (neurons.neuron == DEAD).to_numpy()].all()
    assert {"verdict", "direction", "claim_category", "claim_categories", "flags", "precision", "recall", "f1",
            "auprc", "p_value", "q_value", "distinct_types", "crs", "dprime"} <= set(neurons.columns)
    assert len(directions) == 2 * len(neurons)
    d = directions[(directions.layer == 0) & (directions.neuron == MONO)].set_index("direction")
    assert d.loc["+", "verdict"] == "monosemantic" and d.loc["-", "verdict"] != "monosemantic"
    sel = concepts[(concepts.layer == 0) & (concepts.neuron == POLY) & concepts.selective]
    assert set(sel.category) == {"animal", "vehicle"}
    row = concepts[(concepts.layer == 0) & (concepts.neuron == MONO) & (concepts.category == "color")].iloc[0]
    assert row.precision_pos == 1.0 and row.specific_pos and not row.specific_neg
    counts = concepts.groupby("category")["count"].nunique()
    assert (counts == 1).all()
    assert read_json(out / "hunt.json")["cooccurrence"][0][0] == int(
        concepts[(concepts.category == "animal")]["count"].iloc[0])


def test_rescore_from_stored_statistics(planted, tmp_path):
    import shutil

    from neuronhunter.hunt import rescore_run
    from neuronhunter.judge.thresholds import VerdictThresholds

    family, result, out = planted
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    strict = rescore_run(copy, VerdictThresholds(min_lift=1e9))
    neurons = read_table(copy / "neurons.parquet").set_index(["layer", "neuron"])
    assert neurons.loc[(0, MONO), "verdict"] == "unexplained" and neurons.loc[(0, POS0), "verdict"] == "positional"
    assert not read_table(copy / "concepts.parquet")["selective"].any()
    assert read_json(copy / "config.json")["thresholds"]["min_lift"] == 1e9
    assert strict.manifest["hunt"]["verdicts"]["monosemantic"] == 0
    again = rescore_run(copy, VerdictThresholds())  # back to the defaults: the same verdicts as the live hunt
    cols = ["verdict", "direction", "claim_category", "flags", "top_tokens"]
    assert again.neurons[cols].equals(result.neurons[cols])
    assert read_json(copy / "manifest.json")["kind"] == "hunt"


# ------------------------------------------------------------------------------------------- sign invariance
SEEDS = [1]


@pytest.fixture(scope="module")
def flip_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("flip") / "text.txt"
    path.write_text(make_text(120, seed=3), encoding="utf-8")
    return str(path)


def hunt_in_memory(model, corpus):
    cfg = HuntConfig(model="tiny", corpus=corpus, categories=CATEGORIES, context_length=32, top_k=20, split="all")
    return run_hunt(cfg, model=model, write=False)


@pytest.fixture(scope="module")
def baseline(flip_corpus):
    model = tiny_model("llama")
    return model, hunt_in_memory(model, flip_corpus)


@torch.no_grad()
def flip(model, neurons: dict[int, list[int]]) -> None:
    for layer, idx in neurons.items():
        mlp = model.model.model.layers[layer].mlp
        mlp.up_proj.weight[idx] *= -1
        mlp.down_proj.weight[:, idx] *= -1


def compare(a: pd.DataFrame, b: pd.DataFrame, exclude: tuple[str, ...] = ()) -> None:
    for col in a.columns:
        if col in exclude:
            continue
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=col)
        else:
            assert [v if isinstance(v, str | int | np.integer | bool | np.bool_) else None for v in x] == \
                [v if isinstance(v, str | int | np.integer | bool | np.bool_) else None for v in y], col


@pytest.mark.parametrize("seed", SEEDS)
def test_flipping_neurons_changes_only_direction(baseline, flip_corpus, seed):
    model, before = baseline
    rng = np.random.default_rng(seed)
    d = model.d_mlp
    flipped = {layer: sorted(rng.choice(d, size=24, replace=False).tolist()) for layer in range(model.n_layers)}
    flip(model, flipped)
    try:
        after = hunt_in_memory(model, flip_corpus)
    finally:
        flip(model, flipped)  # negation is exact: the shared model is restored bit for bit
    a = before.neurons.set_index(["layer", "neuron"]).sort_index()
    b = after.neurons.set_index(["layer", "neuron"]).sort_index()
    # the model's function is unchanged: the scan's direction-free columns agree too
    compare(a, b, exclude=("direction", "mean", "min", "max", "skew", "first_mean", "first_max", "first_min",
                           "top_activation", "bottom_activation", "hist_lo", "hist_hi", "hist", "frac_active",
                           "frac_active_neg", "first_frac_active", "pos_mean_max"))
    is_flipped = np.zeros(len(a), dtype=bool)
    for layer, idx in flipped.items():
        is_flipped[[a.index.get_loc((layer, n)) for n in idx]] = True
    directional = a["verdict"].to_numpy() != "dead"
    swap = {"+": "-", "-": "+"}
    expected = np.where(is_flipped & directional, [swap[x] for x in a["direction"]], a["direction"])
    assert b["direction"].tolist() == expected.tolist()
    assert (is_flipped & directional).sum() >= 40  # the property was exercised
    # a flipped neuron's min is the other's -max (the scan itself sees the mirror image)
    np.testing.assert_array_equal(b["min"].to_numpy()[is_flipped], -a["max"].to_numpy()[is_flipped])
    # per-direction rows swap
    da = before.directions.copy()
    key = list(zip(da.layer, da.neuron, strict=True))
    flip_set = {(layer, n) for layer, idx in flipped.items() for n in idx}
    da["direction"] = [swap[s] if k in flip_set else s for s, k in zip(da.direction, key, strict=True)]
    da = da.set_index(["layer", "neuron", "direction"]).sort_index()
    db = after.directions.set_index(["layer", "neuron", "direction"]).sort_index()
    compare(da, db)
    # so do the per-category scores of the concepts table
    for k in ("precision", "f1", "auprc", "q_value", "specific"):
        pa, pb = before.judgement.per_category[k], after.judgement.per_category[k]
        rows = np.nonzero(is_flipped)[0]
        np.testing.assert_allclose(pa[rows][:, ::-1].astype(float), pb[rows].astype(float), rtol=1e-9, atol=1e-12)
