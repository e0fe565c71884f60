"""Planted ground truth: tiny random models whose chosen layer-0 neurons are rewired to known behaviours.

With the attention output of block 0 zeroed, the residual stream at the first MLP is just the token embedding (plus
the learned position embedding for GPT-2). We pick orthonormal directions (orthogonal to the all-ones vector, so
LayerNorm's centring does not touch them), remove them from every embedding row, then add them back only where we
want a neuron to fire:

* ``u`` on the color words            -> neuron MONO fires on color only            -> monosemantic
* ``w`` on the animal and vehicle words -> neuron POLY fires on both (unrelated)    -> polysemantic
* ``v`` on position 0 (GPT-2: wpe[0]; Llama: the BOS embedding)                   -> positional
* ``z`` on position 5 (GPT-2 only: wpe[5])                                        -> positional (fixed position)
* zero input weights and a very negative bias (or zero gate/up rows)              -> dead

The hunt must return exactly these verdicts for these neurons, on both architectures.
"""

from __future__ import annotations

import random

import pytest
import torch

from neuronhunter.hunt import HuntConfig, run_hunt
from neuronhunter.io import read_json, read_table
from neuronhunter.models.tiny import tiny_model

MONO, POLY, POS0, FIXED, DEAD = 3, 17, 42, 77, 101

ANIMALS = ["cat", "dog", "horse", "cow"]
VEHICLES = ["car", "bus", "train", "truck", "bike"]
COLORS = ["red", "blue", "green", "yellow", "white"]
FILLER = ["man", "woman", "house", "tree", "river", "city", "book", "table", "window", "road", "field", "garden",
          "child", "friend", "teacher", "door"]
VERBS = ["saw", "found", "passed", "watched", "liked", "followed", "met", "left", "near"]

CATEGORIES = {
    "animal": {"words": ANIMALS},
    "vehicle": {"words": VEHICLES},
    "color": {"words": COLORS},
    "function": {"control": True, "words": ["the", "a", "and", "of", "then"], "patterns": ["[.,]"]},
}


def make_text(n_sentences: int = 110, seed: int = 0) -> str:
    """Random simple sentences; category words always mid-sentence, at varied positions."""
    rng = random.Random(seed)

    def noun_phrase() -> str:
        kind = rng.random()
        noun = rng.choice(ANIMALS if kind < 0.25 else VEHICLES if kind < 0.5 else FILLER)
        adj = f"{rng.choice(COLORS)} " if rng.random() < 0.4 else ""
        return f"{rng.choice(['the', 'a'])} {adj}{noun}"

    sentences = []
    for _ in range(n_sentences):
        parts = [noun_phrase().capitalize(), rng.choice(VERBS), noun_phrase()]
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


def project_out(weight: torch.Tensor, basis: torch.Tensor) -> None:
    weight -= (weight @ basis) @ basis.T


@torch.no_grad()
def planted_gpt2():
    m = tiny_model("gpt2")
    hf, tok = m.model, m.tokenizer
    wte, wpe = hf.transformer.wte.weight, hf.transformer.wpe.weight
    d = wte.shape[1]
    basis = directions(d, 4)
    u, w, v, z = basis.T
    project_out(wte, basis)
    project_out(wpe, basis)
    a = 1.0
    wte[token_ids(tok, COLORS)] += a * u
    wte[token_ids(tok, ANIMALS + VEHICLES)] += a * w
    wpe[0] += a * v
    wpe[5] += a * z
    block = hf.transformer.h[0]
    block.attn.c_proj.weight.zero_()
    block.attn.c_proj.bias.zero_()
    block.ln_2.weight.fill_(1.0)
    block.ln_2.bias.zero_()
    fc_w, fc_b = block.mlp.c_fc.weight, block.mlp.c_fc.bias  # Conv1D: [d_model, d_mlp]
    for n, direction in ((MONO, u), (POLY, w), (POS0, v), (FIXED, z)):
        fc_w[:, n] = direction
        fc_b[n] = -3.0
    fc_w[:, DEAD] = 0.0
    fc_b[DEAD] = -10.0
    return m


@torch.no_grad()
def planted_llama():
    m = tiny_model("llama")
    hf, tok = m.model, m.tokenizer
    emb = hf.model.embed_tokens.weight
    d = emb.shape[1]
    basis = directions(d, 3)
    u, w, v = basis.T
    project_out(emb, basis)
    a = 1.0
    emb[token_ids(tok, COLORS)] += a * u
    emb[token_ids(tok, ANIMALS + VEHICLES)] += a * w
    emb[m.bos_token_id] += a * v  # BOS is always (and only) at position 0
    layer = hf.model.layers[0]
    layer.self_attn.o_proj.weight.zero_()
    layer.post_attention_layernorm.weight.fill_(1.0)
    gate, up = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight  # [d_mlp, d_model]
    for n, direction in ((MONO, u), (POLY, w), (POS0, v)):
        gate[n] = 0.5 * direction
        up[n] = 0.5 * direction
    gate[DEAD] = 0.0
    up[DEAD] = 0.0
    return m


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "text.txt"
    path.write_text(make_text(), encoding="utf-8")
    return str(path)


def hunt(model, corpus, out, **kw):
    cfg = HuntConfig(model="tiny", corpus=corpus, out=str(out), categories=CATEGORIES, context_length=32,
                     top_k=10, formats=["parquet"], **kw)
    return run_hunt(cfg, model=model, overwrite=True)


EXPECTED = {
    "gpt2": {MONO: "monosemantic", POLY: "polysemantic", POS0: "positional", FIXED: "positional", DEAD: "dead"},
    "llama": {MONO: "monosemantic", POLY: "polysemantic", POS0: "positional", DEAD: "dead"},
}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def planted(request, corpus, tmp_path_factory):
    model = planted_gpt2() if request.param == "gpt2" else planted_llama()
    out = tmp_path_factory.mktemp(f"hunt_{request.param}")
    return request.param, hunt(model, corpus, out), out


def test_planted_verdicts(planted):
    family, result, _ = planted
    frame = result.scores.frame
    layer0 = frame[frame.layer == 0].set_index("neuron")
    got = {n: layer0.loc[n, "verdict"] for n in EXPECTED[family]}
    assert got == EXPECTED[family]


def test_planted_categories_and_scores(planted):
    family, result, _ = planted
    layer0 = result.scores.frame[result.scores.frame.layer == 0].set_index("neuron")
    mono, poly = layer0.loc[MONO], layer0.loc[POLY]
    assert mono.top_category == "color" and mono.categories == "color" and mono.n_categories == 1
    assert mono.crs > 0.99 and mono.entropy < 0.05 and mono.dprime > 10
    assert set(poly.categories.split(";")) == {"animal", "vehicle"} and poly.n_categories == 2
    assert poly.crs < 0.2 and 0.9 < poly.entropy < 1.1  # two equal responses: 1 bit
    pos = layer0.loc[POS0]
    assert pos.pos0_share > 0.99 and pos.pos0_max_share > 0.99
    if family == "gpt2":
        fixed = layer0.loc[FIXED]
        assert fixed.topk_pos == 5 and fixed.topk_pos_frac == 1.0 and fixed.pos0_share < 0.01


def test_planted_top_neurons_and_champion(planted):
    _, result, _ = planted
    top = result.top
    first = top[(top["rank"] == 0)].set_index(["category", "kind"])
    assert (first.loc[("color", "monosemantic"), ["layer", "neuron"]].tolist()) == [0, MONO]
    assert first.loc[("animal", "polysemantic"), "neuron"] == POLY
    assert first.loc[("vehicle", "polysemantic"), "neuron"] == POLY
    champ = result.champion
    assert champ is not None and champ["verdict"] not in ("positional", "dead")
    # the positional neurons are the strongest anywhere, but never champions
    assert (champ["layer"], champ["neuron"]) != (0, POS0)


def test_planted_run_folder(planted):
    family, result, out = planted
    neurons = read_table(out / "neurons.parquet")
    concepts = read_table(out / "concepts.parquet")
    manifest = read_json(out / "manifest.json")
    assert manifest["kind"] == "hunt" and manifest["hunt"]["verdicts"]["dead"] >= 1
    assert {"verdict", "crs", "dprime", "entropy", "n_categories", "top_category"} <= set(neurons.columns)
    assert len(neurons) == len(result.scores.frame) and neurons.verdict.notna().all()
    row = neurons[(neurons.layer == 0) & (neurons.neuron == MONO)].iloc[0]
    assert row.verdict == "monosemantic"
    assert {"layer", "neuron", "category", "mean", "max", "count", "dprime", "selective"} <= set(concepts.columns)
    sel = concepts[(concepts.layer == 0) & (concepts.neuron == POLY) & concepts.selective]
    assert set(sel.category) == {"animal", "vehicle"}
    # the labelled token counts are the same for every neuron and match the labeller
    counts = concepts.groupby("category")["count"].nunique()
    assert (counts == 1).all()
    assert read_json(out / "hunt.json")["cooccurrence"][0][0] == int(
        concepts[(concepts.category == "animal")]["count"].iloc[0])


def test_rescore_from_stored_statistics(planted, tmp_path):
    import shutil

    from neuronhunter.analysis.selectivity import VerdictThresholds
    from neuronhunter.hunt import rescore_run

    family, result, out = planted
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    strict = rescore_run(copy, VerdictThresholds(dprime_min=1e12))
    neurons = read_table(copy / "neurons.parquet").set_index(["layer", "neuron"])
    assert neurons.loc[(0, MONO), "verdict"] == "unselective" and neurons.loc[(0, POS0), "verdict"] == "positional"
    assert not read_table(copy / "concepts.parquet")["selective"].any()
    assert read_json(copy / "config.json")["thresholds"]["dprime_min"] == 1e12
    assert strict.manifest["hunt"]["verdicts"]["monosemantic"] == 0
    again = rescore_run(copy, VerdictThresholds())  # back to the defaults: the same verdicts as the live hunt
    assert again.scores.frame["verdict"].tolist() == result.scores.frame["verdict"].tolist()
    assert read_json(copy / "manifest.json")["kind"] == "hunt"
