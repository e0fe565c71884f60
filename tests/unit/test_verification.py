"""Causal verification with planted ground truth: what drives a category's loss is confirmed, what is read by
nothing is not, p-values of irrelevant claims are uniform, verdicts do not depend on a gated neuron's sign."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from neuronhunter.causal import nulls as N
from neuronhunter.causal.claims import (
    Claim,
    category_claim,
    claim_from_rule,
    explanation_claim,
    hunt_claims,
    parse_claim,
    read_claims_file,
    token_claim,
)
from neuronhunter.causal.interventions import corpus_batches
from neuronhunter.causal.verification import (
    CLAIM_COLUMNS,
    NEURON_COLUMNS,
    VerifyConfig,
    verify_claims,
    verify_run,
)
from neuronhunter.data.corpus import Document
from neuronhunter.data.split import DocumentSplit
from neuronhunter.errors import ConfigError
from neuronhunter.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest

ANIMALS = ["cat", "dog", "fox", "bird", "horse"]
WORDS = ["the", "red", "blue", "green", "door", "and", "then", "near", "tree", "old"]
FAST = dict(steer_tokens=8, steer_sets=50, n_draws=500, max_claim_tokens=16)


class WordLabeller:
    """Labels tokens whose stripped, lower-cased text is in a category's word set."""

    def __init__(self, sets: dict[str, set[str]]):
        self.categories = list(sets)
        self.sets = sets

    def label(self, text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
        out = np.zeros((len(offsets), len(self.categories)), dtype=bool)
        for i, (s, e) in enumerate(offsets):
            word = text[s:e].strip().lower()
            for c, name in enumerate(self.categories):
                out[i, c] = word in self.sets[name]
        return out


LABELLER = WordLabeller({"animal": set(ANIMALS), "color": {"red", "blue", "green"}})


def _texts(n: int, seed: int = 1) -> list[str]:
    """Random word sequences in which every animal is followed by ' ran'."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        toks: list[str] = []
        for _ in range(40):
            toks.extend([str(rng.choice(ANIMALS)), "ran"] if rng.random() < 0.2 else [str(rng.choice(WORDS))])
        texts.append(" ".join(toks))
    return texts


@pytest.fixture(scope="module")
def planted():
    """A 2-layer GPT-2 where neuron 1.7 fires on animals and writes 0.5 W_U[' ran'] (every animal is followed by ' ran':
    it drives the animals' next-token loss); neuron 1.20 fires on animals three times as strongly but writes a
    constant vector, which the final LayerNorm's centring removes exactly (read by nothing); neuron 1.21 writes
    nothing at all. The unembedding is untied from the input embedding (a fresh random matrix), so that no input
    token's own embedding lies along the driver's write (with tied weights the " ran" tokens would carry W_U[' ran']
    in their residual stream, and removing that direction there would also cost loss: a real but different effect)."""
    m = tiny_model("gpt2", seed=4)
    hf = m.model
    ran = m.tokenizer(" ran", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(hf.lm_head.weight.shape, generator=g) * 0.02)
        for w in ANIMALS:
            (tid,) = m.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            hf.transformer.wte.weight[tid, 0] += 1.0
        c_fc = hf.transformer.h[1].mlp.c_fc
        for n, gain in ((7, 1.0), (20, 3.0), (21, 1.0)):
            c_fc.weight[:, n] = 0.0
            c_fc.weight[0, n] = gain
            c_fc.bias[n] = -1.0
        m.neuron_output_weights(1)[7] = 0.5 * m.unembed_matrix()[:, ran]
        m.neuron_output_weights(1)[20] = 5.0
        m.neuron_output_weights(1)[21] = 0.0
    docs = [Document(i, t, f"v{i}") for i, t in enumerate(_texts(12))]
    batches = corpus_batches(m, docs, context_length=48, max_tokens=None, batch_size=8, labeller=LABELLER)
    return m, docs, batches


@pytest.fixture(scope="module")
def planted_results(planted):
    m, _, batches = planted
    claims = [category_claim(1, 7, "+", ["animal"]), category_claim(1, 20, "+", ["animal"]),
              category_claim(1, 21, "+", ["animal"]), category_claim(1, 3, "+", ["color"]),
              category_claim(0, 5, "-", ["color"])]
    return verify_claims(m, batches, claims, LABELLER.categories, VerifyConfig(**FAST),
                         lexicon_words={"animal": ANIMALS, "color": ["red", "blue", "green"]})


def test_planted_driver_is_confirmed(planted_results):
    df, summary = planted_results
    r = df.iloc[0]
    assert r.causally_confirmed and r.q_value <= 0.05
    assert r.causal_effect > 0.1 and r.causal_effect > 2 * r.null_neuron_mean
    assert r.n_nulls > 50  # it beat the first 50 nulls, so it got more (sequential nulls)
    assert r.p_neuron == pytest.approx(1 / (r.n_nulls + 1)) and r.p_token < 0.01
    assert r.causal_per_unit == pytest.approx(r.causal_effect / r.perturbation)
    assert r.n_tokens == 16 and r.n_tokens_available > 16
    assert summary["confirmed"] == 1 and summary["tested"] == 4 and summary["claims"] == 5


def test_unread_neuron_is_not_confirmed_however_large(planted, planted_results):
    m, _, batches = planted
    df, _ = planted_results
    r = df.iloc[1]
    assert not r.causally_confirmed and r.p_value > 0.5
    assert abs(r.causal_effect) < 1e-4  # the final norm removes what it writes
    assert r.perturbation > df.iloc[0].perturbation  # it perturbs the residual stream more than the driver does
    # its matched nulls perturb by exactly as much, and that does hurt
    assert r.null_neuron_mean > 0.1
    zero = df.iloc[2]
    assert zero.status.startswith("no perturbation") and np.isnan(zero.p_value) and not zero.causally_confirmed


def test_attribution_and_steering_columns(planted_results):
    df, summary = planted_results
    corr = summary["attribution_vs_exact"]
    assert corr["n"] > 1000 and -1 <= corr["pearson"] <= 1
    r = df.iloc[0]
    assert r.attribution_effect > 0 and r.attribution_p < 0.05
    assert r.steer_p < 0.05  # switching it on raises ' ran' (its logit prediction) more than matched token sets
    assert r.steer_amount > 1.0
    assert set(CLAIM_COLUMNS) <= set(df.columns)


def test_sign_relabelling_changes_nothing_but_the_direction():
    """Negating row n of up_proj and column n of down_proj is the same model; a claim about n in direction + must
    get exactly the results of the claim about the relabelled neuron in direction -."""
    m = tiny_model("llama", n_layers=2, seed=2)
    docs = [Document(i, t, f"s{i}") for i, t in enumerate(_texts(6, seed=3))]
    cfg = VerifyConfig(**{**FAST, "max_claim_tokens": 10}, n_nulls=10, max_nulls=10)
    flipped = (5, 9)
    claims = [category_claim(1, n, "+", ["animal"]) for n in flipped] + [category_claim(1, 2, "+", ["color"])]

    def run(model, cls):
        b = corpus_batches(model, docs, context_length=32, max_tokens=None, batch_size=8, labeller=LABELLER)
        return verify_claims(model, b, cls, LABELLER.categories, cfg, lexicon_words={"animal": ANIMALS})[0]

    before = run(m, claims)
    with torch.no_grad():
        for n in flipped:
            m.model.model.layers[1].mlp.up_proj.weight[n] *= -1
            m.model.model.layers[1].mlp.down_proj.weight[:, n] *= -1
    after = run(m, [Claim(c.layer, c.neuron, "-" if c.neuron in flipped else "+", c.claim, c.kind,
                          categories=c.categories) for c in claims])
    assert list(after.direction) == ["-", "-", "+"]
    for col in ("causal_effect", "null_neuron_mean", "p_neuron", "p_token", "p_value", "steer_effect", "steer_p",
                "attribution_effect"):
        np.testing.assert_allclose(after[col].to_numpy(float), before[col].to_numpy(float), atol=1e-5, rtol=1e-4)


def test_irrelevant_claims_have_uniform_p_values():
    """Calibration: claims that random neurons of random tiny models are about random word sets. Their p-values of
    each null must be uniform, and the combined p (their maximum) conservative."""
    vocab = ["the", "a", "red", "blue", "green", "door", "and", "then", "near", "tree", "old", "cat", "dog",
             "ran", "sat", "on", "in", "big", "small", "house", "river", "stone", "light", "dark"]
    p_neuron, p_token, p_all = [], [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        m = tiny_model(("gpt2", "llama", "gpt2")[seed], n_layers=2, seed=10 + seed)
        texts = [" ".join(rng.choice(vocab, size=60)) for _ in range(8)]
        sets = {f"c{k}": set(rng.choice(vocab, size=4, replace=False)) for k in range(10)}
        labeller = WordLabeller(sets)
        docs = [Document(i, t, f"r{i}") for i, t in enumerate(texts)]
        b = corpus_batches(m, docs, context_length=48, max_tokens=None, batch_size=8, labeller=labeller)
        claims = [category_claim(int(rng.integers(0, 2)), int(n), "+", [f"c{k}"])
                  for k, n in zip(range(10), rng.choice(m.d_mlp, size=10, replace=False), strict=True)]
        claims += [category_claim(int(rng.integers(0, 2)), int(n), "-", [f"c{k}"])
                   for k, n in zip(range(10), rng.choice(m.d_mlp, size=10, replace=False), strict=True)]
        cfg = VerifyConfig(n_nulls=19, max_nulls=19, max_claim_tokens=8, token_matches=3, n_draws=400,
                           steer=False, attribution=False, seed=seed, early_stop=0)  # the fixed-size test
        df, _ = verify_claims(m, b, claims, labeller.categories, cfg)
        df = df[df.p_value.notna()]
        p_neuron += list(df.p_neuron)
        p_token += list(df.p_token)
        p_all += list(df.p_value)
    assert len(p_all) >= 50
    n = len(p_all)
    # p_neuron lives on the grid k/20: its quintiles must hold a fifth each (chi-square, 4 df, 1% level: 13.28)
    counts = np.bincount(np.round(np.asarray(p_neuron) * 20).astype(int), minlength=21)[1:].reshape(5, 4).sum(1)
    assert ((counts - n / 5) ** 2 / (n / 5)).sum() < 13.28, counts
    # p_token: Kolmogorov-Smirnov distance to the uniform below its 1% critical value 1.63 / sqrt(n)
    x = np.sort(p_token)
    ks = max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n))
    assert ks < 1.63 / np.sqrt(n), ks
    for alpha in (0.1, 0.2, 0.5):
        assert np.mean(np.asarray(p_all) <= alpha) <= alpha + 0.08


def test_early_stopping_changes_no_confirmation(planted):
    """Besag-Clifford early stopping of the null sequence: a claim leaves at an interim look only once ``early_stop``
    nulls match it, so its p-value (and the p-value it would have had after all n_nulls) is far above any BH
    threshold; every other claim gets exactly the p-value of the full sequence, and the confirmations are the same."""
    m, _, batches = planted
    rng = np.random.default_rng(4)
    claims = [category_claim(1, 7, "+", ["animal"]), category_claim(1, 3, "+", ["color"])]
    claims += [category_claim(int(L), int(n), "+-"[k % 2], [("animal", "color")[k % 2]])
               for k, (L, n) in enumerate(zip(rng.integers(0, 2, 10), rng.choice(m.d_mlp, 10, replace=False),
                                              strict=True))]
    # alpha below 6/51: a claim stopped after 5 of its first 10 or 20 nulls could not reach it with 50
    base = dict(**FAST, n_nulls=50, max_nulls=400, steer=False, attribution=False, alpha=0.11)
    full, _ = verify_claims(m, batches, claims, LABELLER.categories, VerifyConfig(**base, early_stop=0))
    early, _ = verify_claims(m, batches, claims, LABELLER.categories, VerifyConfig(**base, early_stop=5))
    tested = full.p_value.notna()
    assert (early.p_value.notna() == tested).all() and tested.sum() >= 9
    stopped = tested & (early.n_nulls < 50)
    assert stopped.sum() >= 3, early.n_nulls.tolist()  # most irrelevant claims leave at the first look
    assert set(early.n_nulls[stopped]) <= {10, 20}
    assert (full.n_nulls[tested & ~stopped] == early.n_nulls[tested & ~stopped]).all()
    np.testing.assert_array_equal(early.p_neuron[~stopped], full.p_neuron[~stopped])
    s = early[stopped]
    assert (s.p_neuron >= 6 / (s.n_nulls + 1) - 1e-12).all() and (full.p_neuron[stopped] >= 6 / 51 - 1e-12).all()
    assert (early.causally_confirmed == full.causally_confirmed).all() and early.causally_confirmed.iloc[0]
    assert full.n_nulls[tested].min() >= 50


def test_null_helpers():
    assert N.rank_p(1.0, np.array([0.0, 2.0, 3.0])) == pytest.approx(3 / 4)
    assert N.rank_p(5.0, np.array([])) == 1.0
    p = np.array([0.01, 0.04, 0.03, 0.5])
    # hand: sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.06, 0.0533, 0.5 -> monotone from the top: 0.04, 0.0533, 0.0533, 0.5
    np.testing.assert_allclose(N.bh_qvalues(p), [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    sizes = np.array([1.0, 2.0, 0.0, 4.0, 1.9, 2.2])
    np.testing.assert_array_equal(N.match_neurons(sizes, 1, 3, exclude=[5]), [4, 0, 3])
    dev = np.array([5.0, 0.1, 4.0, 4.5, 0.0, 3.9, -1.0, 6.0])
    strata = N.match_tokens(dev, np.array([0, 2]), np.array([1, 3, 4, 5, 6, 7]), 2)
    assert set(strata[0]) == {3, 7} and set(strata[1]) == {5, 1}  # the bigger claim token chooses first
    assert len(set(strata.ravel())) == 4
    rng = np.random.default_rng(0)
    p1, draws = N.stratified_p(np.array([1.0, 1.0]), np.ones(2), np.zeros((2, 3)), np.ones((2, 3)), 999, rng)
    assert p1 < 0.1 and len(draws) == 999
    p2, _ = N.stratified_p(np.zeros(2), np.ones(2), np.ones((2, 3)), np.ones((2, 3)), 999, rng)
    assert p2 == 1.0
    vals = N.null_values(np.array([[1.0, 3.0]]), np.array([0.0, 1.0]), np.array([2.0, 4.0]), np.array([8.0]),
                         np.array([1]))
    assert vals[0, 0] == pytest.approx(3.0 - 8.0 / 4.0)  # towards its mean by the claim's norm / its write norm


# ------------------------------------------------------------------------------------------------ claims
def test_parse_claims(tmp_path):
    c = parse_claim("20:882=color")
    assert (c.layer, c.neuron, c.direction, c.claim, c.categories) == (20, 882, "+", "color", ("color",))
    assert parse_claim("L3.N7-=color, food").categories == ("color", "food")
    assert parse_claim("3.7-=color,food").direction == "-"
    t = parse_claim("1:2=tokens: Red| blue")
    assert t.tokens == ("red", "blue") and t.claim == "tokens:red|blue"
    for bad in ("20=color", "a:b=color", "1:2=", "1:2=tokens:  "):
        with pytest.raises(ConfigError):
            parse_claim(bad)
    with pytest.raises(ConfigError, match="explanations.parquet"):
        parse_claim("1:2=explanation")
    f = tmp_path / "claims.txt"
    f.write_text("# mine\n1:2=color\n\n3:4-=tokens:the\n")
    assert [x.key for x in read_claims_file(f)] == [(1, 2, "+", "color"), (3, 4, "-", "tokens:the")]
    pd.DataFrame({"layer": [1], "neuron": [2], "claim": ["animal"], "direction": ["-"]}).to_csv(tmp_path / "c.csv")
    assert read_claims_file(tmp_path / "c.csv")[0].key == (1, 2, "-", "animal")
    with pytest.raises(ConfigError, match="not found"):
        read_claims_file(tmp_path / "missing.txt")


def test_explanation_claims():
    ex = pd.DataFrame({"layer": [1, 1, 1], "neuron": [2, 2, 2], "direction": ["+", "+", "-"],
                       "kind": ["tokens", "category", "text"], "explanation": ["red, blue", "color", "sad words"],
                       "simulation_r": [0.6, 0.4, 0.9], "is_best": [True, False, True],
                       "rule": [json.dumps({"tokens": [" Red", "blue"]}), json.dumps({"category": "color"}), None]})
    best = explanation_claim(ex, 1, 2, "+")
    assert best.tokens == ("red", "blue") and best.claim == "explanation:red, blue" and best.source == "explanation"
    assert explanation_claim(ex, 1, 2, "+", "category").categories == ("color",)
    with pytest.raises(ConfigError, match="no rule"):
        explanation_claim(ex, 1, 2, "-")
    prev = claim_from_rule(1, 2, "+", {"categories": ["color"], "offset": -1}, "after a colour", "context")
    assert prev.offset == -1
    assert parse_claim("1:2=explanation:category", explanations=ex).categories == ("color",)
    # the rules `neuronhunter explain` writes: a family, tokens and their exact ids
    after = claim_from_rule(1, 2, "+", json.dumps({"family": "prev", "tokens": ["red"], "token_ids": [[1, 2]]}),
                            'any token after "red"', "context")
    assert (after.offset, after.tokens, after.token_ids) == (-1, ("red",), (1, 2))
    before = claim_from_rule(1, 2, "-", {"family": "nextcat", "category": "animal"}, "any token before an animal "
                             "word", "context")
    assert (before.offset, before.categories) == (1, ("animal",))
    with pytest.raises(ConfigError, match="bigram"):
        claim_from_rule(1, 2, "+", {"family": "bigram", "bigrams": [["a", "b"]]}, '"b" after "a"', "context")


def test_claim_tokens_with_offsets(planted):
    from neuronhunter.causal.claims import TokenMatcher
    from neuronhunter.causal.engine import VerificationTokens

    m, _, batches = planted
    t = VerificationTokens.from_batches(batches)
    match = TokenMatcher(m.tokenizer, LABELLER.categories, t)
    ran = m.tokenizer(" ran", add_special_tokens=False)["input_ids"][0]
    animal = match.mask(category_claim(1, 7, "+", ["animal"]))
    np.testing.assert_array_equal(animal, t.labels[:, 0])
    before = match.mask(claim_from_rule(1, 7, "+", {"family": "nextcat", "category": "animal"}, "x", "context"))
    np.testing.assert_array_equal(before, t.next_labels[:, 0])
    after_animal = match.mask(claim_from_rule(1, 7, "+", {"family": "prevcat", "category": "animal"}, "x", "c"))
    assert after_animal.any() and np.all(t.input_ids[after_animal] == ran)  # every animal is followed by " ran"
    by_id = match.mask(claim_from_rule(1, 7, "+", {"family": "tok", "token_ids": [ran]}, "x", "tokens"))
    np.testing.assert_array_equal(by_id, match.mask(token_claim(1, 7, "+", ["Ran "])))
    assert np.all(by_id[after_animal]) and by_id.sum() <= after_animal.sum() + t.n_windows  # (window starts)


def test_hunt_claims_old_and_new_schema():
    new = pd.DataFrame({"layer": [0, 0, 1], "neuron": [1, 2, 3], "verdict": ["monosemantic", "polysemantic", "token"],
                        "direction": ["-", "+", "+"], "claim_category": ["color", None, None],
                        "claim_categories": [None, "food,animal", None]})
    got = hunt_claims(new)
    assert [c.key for c in got] == [(0, 1, "-", "color"), (0, 2, "+", "food,animal")]
    assert got[1].verdict == "polysemantic" and got[1].source == "hunt"
    old = pd.DataFrame({"layer": [0], "neuron": [1], "verdict": ["monosemantic"], "top_category": ["color"],
                        "categories": [["color", "date"]]})
    assert hunt_claims(old)[0].categories == ("color", "date")
    with pytest.raises(ConfigError, match="hunt"):
        hunt_claims(pd.DataFrame({"layer": [0], "neuron": [1]}))


def test_unknown_category_and_out_of_range(planted):
    m, _, batches = planted
    with pytest.raises(ConfigError, match="not in the lexicon"):
        verify_claims(m, batches, [category_claim(1, 7, "+", ["vehicle"])], LABELLER.categories, VerifyConfig())
    with pytest.raises(ConfigError, match="out of range"):
        verify_claims(m, batches, [category_claim(1, 700, "+", ["color"])], LABELLER.categories, VerifyConfig())
    with pytest.raises(ConfigError, match="no claims"):
        verify_claims(m, batches, [], LABELLER.categories, VerifyConfig())
    few = verify_claims(m, batches, [token_claim(1, 7, "+", ["zebra"])], LABELLER.categories,
                        VerifyConfig(**FAST))[0]
    assert few.status.iloc[0].startswith("too few") and not few.causally_confirmed.iloc[0]


# ------------------------------------------------------------------------------------------------ run folders
def _run_folder(tmp_path, docs, split_side="train"):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in docs:
        (corpus / f"{d.source}.txt").write_text(d.text, encoding="utf-8")
    run = tmp_path / "hunt"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "tiny", "corpus": str(corpus), "context_length": 48}))
    split = DocumentSplit(0.3, 0).manifest(split_side)
    (run / "manifest.json").write_text(json.dumps({"kind": "hunt", "corpus": {"spec": str(corpus), "split": split}}))
    pd.DataFrame({"layer": [1, 1, 0], "neuron": [7, 20, 3], "verdict": ["monosemantic", "monosemantic", "dead"],
                  "direction": ["+", "+", "+"], "claim_category": ["animal", "animal", None],
                  "causal_z": [1.0, 2.0, 3.0]}).to_parquet(run / "neurons.parquet")
    return run, corpus


def test_verify_run_on_heldout_documents(tmp_path, planted):
    from neuronhunter.data.corpus import Corpus

    m, _, _ = planted
    docs = [Document(i, t, f"doc{i:02d}") for i, t in enumerate(_texts(20, seed=5))]
    run, corpus = _run_folder(tmp_path, docs)
    cfg = VerifyConfig(**{**FAST, "max_claim_tokens": 8}, n_nulls=50, max_nulls=100, steer=False)
    res, summary = verify_run(run, m, cfg, claims=[parse_claim("1:3=color")], labeller=LABELLER)
    claims = pd.read_parquet(run / "claims.parquet")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert len(claims) == 3 and set(claims.verified_on) == {"heldout"}
    heldout = [d for d in DocumentSplit(0.3, 0).select(Corpus(str(corpus)), "heldout")]
    assert 0 < summary["n_documents"] == len(heldout) < len(docs)
    assert summary["data"]["split"]["side"] == "heldout"
    table = pd.read_parquet(run / "neurons.parquet").set_index(["layer", "neuron"])
    assert set(NEURON_COLUMNS) <= set(table.columns) and "causal_z" not in table.columns
    assert bool(table.loc[(1, 7), "causally_confirmed"]) and table.loc[(1, 7), "verified_on"] == "heldout"
    assert np.isnan(table.loc[(0, 3), "causal_effect"]) and not table.loc[(0, 3), "causally_confirmed"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["verification"]["verified_on"] == "heldout" and manifest["kind"] == "hunt"
    assert (run / "verification.parquet").exists() and (run / "verification.json").exists()
    # again, into another folder: the run is left alone
    before = (run / "neurons.parquet").read_bytes()
    verify_run(run, m, cfg, labeller=LABELLER, out=tmp_path / "elsewhere", corpus=str(corpus))
    assert (run / "neurons.parquet").read_bytes() == before
    other = pd.read_parquet(tmp_path / "elsewhere" / "claims.parquet")
    assert set(other.verified_on) == {f"corpus:{corpus}"}


def test_verify_run_refuses_a_run_without_heldout_side(tmp_path, planted):
    m, _, _ = planted
    docs = [Document(i, t, f"doc{i:02d}") for i, t in enumerate(_texts(4))]
    run, _ = _run_folder(tmp_path, docs, split_side="all")
    with pytest.raises(ConfigError, match="no held-out side"):
        verify_run(run, m, VerifyConfig(), labeller=LABELLER)
    assert not (run / "claims.parquet").exists()
