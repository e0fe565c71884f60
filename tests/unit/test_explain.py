"""Explanations against ground truth: a tiny model with planted token, context, position and domain neurons
(:mod:`neuronhunter.judge.explain.planted`), scored on held-out documents, checked against an independent
computation (plain PyTorch hooks, numpy, scikit-learn), merged shards and a sign-relabelled gated neuron."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from neuronhunter.config import ScanConfig
from neuronhunter.errors import RunDirError
from neuronhunter.judge.explain import ExplainConfig, explain_run
from neuronhunter.judge.explain.planted import NEURONS, PLANTED_LEXICON, planted_model, write_planted_corpus
from neuronhunter.scan import run_scan

CTX = 32


@pytest.fixture(scope="module")
def planted(tmp_path_factory, one_thread_module):
    root = tmp_path_factory.mktemp("planted")
    corpus = write_planted_corpus(root / "corpus")
    lexicon = root / "lexicon.yaml"
    lexicon.write_text(yaml.safe_dump(PLANTED_LEXICON))
    model = planted_model(corpus)
    cfg = ScanConfig(model="planted", corpus=str(corpus), out=str(root / "run"), context_length=CTX, batch_size=8,
                     split="train", concepts=str(lexicon), compile_stats=False, checkpoint_every=0)
    run_scan(cfg, model=model)
    result = explain_run(root / "run", ExplainConfig(batch_size=8), model=model)
    return {"root": root, "corpus": corpus, "lexicon": lexicon, "model": model, "run": root / "run",
            "result": result, "table": result.explanations}


def rows(table: pd.DataFrame, neuron: int, direction: str = "+") -> pd.DataFrame:
    return table[(table.layer == 0) & (table.neuron == neuron) & (table.direction == direction)]


def best_of(table: pd.DataFrame, neuron: int) -> pd.Series:
    t = rows(table, neuron)
    return t[t.is_best].iloc[0]


def test_token_neuron_best_explanation_is_its_token_set(planted):
    t = planted["table"]
    best = best_of(t, NEURONS["token"])
    assert best.kind == "tokens"
    assert set(json.loads(best.rule)["tokens"]) == {"red", "blue", "green"}
    assert best.simulation_r > 0.95 and best.detection_f1 > 0.95 and best.detection_auprc > 0.95
    # the lexicon's colour category also lists "yellow", on which the neuron is silent: it scores lower
    cat = rows(t, NEURONS["token"]).query("kind == 'category'")
    colour = cat[cat.rule.map(lambda r: json.loads(r)["category"]) == "color"].iloc[0]
    assert colour.simulation_r < best.simulation_r - 0.15


def test_context_neuron_is_not_explained_by_its_token_set(planted):
    t = planted["table"]
    best = best_of(t, NEURONS["context"])
    assert best.kind == "context" and json.loads(best.rule)["bigrams"] == [["the", "cat"]]
    assert best.simulation_r > 0.95 and best.hard_negative_accuracy > 0.95
    tokens = rows(t, NEURONS["context"]).query("kind == 'tokens'").iloc[0]
    assert json.loads(tokens.rule)["tokens"] == ["cat"]
    # "cat" after anything but "the": the same token where the neuron is silent (hard negatives)
    assert tokens.n_hard_negatives > 20
    assert tokens.hard_negative_accuracy <= 0.5 + 1e-9
    assert tokens.simulation_r < 0.6


def test_position_and_domain_neurons(planted):
    t = planted["table"]
    pos = best_of(t, NEURONS["position"])
    assert pos.kind == "position" and sorted(json.loads(pos.rule)["positions"]) == [5, 6]
    assert pos.simulation_r > 0.95
    dom = best_of(t, NEURONS["domain"])
    assert dom.kind == "domain" and json.loads(dom.rule)["domains"] == ["shout"]
    assert dom.simulation_r > 0.9
    # case-normalised tokens cannot say "upper case": the token explanation is far behind
    tokens = rows(t, NEURONS["domain"]).query("kind == 'tokens'").iloc[0]
    assert tokens.simulation_r < dom.simulation_r - 0.3


def test_wrong_explanations_score_at_baseline(planted):
    t = planted["table"]
    for neuron in (NEURONS["position"], NEURONS["token"]):
        r = rows(t, neuron)
        random = r.query("kind == 'baseline_random'").simulation_r.iloc[0]
        assert abs(random) < 0.2
    # the position neuron's token explanation (whatever tokens sat at positions 5-6) is as good as chance
    tokens = rows(t, NEURONS["position"]).query("kind == 'tokens'").simulation_r.iloc[0]
    assert abs(tokens) < 0.2
    # the domain neuron's position explanation too
    assert all(abs(x) < 0.25 for x in rows(t, NEURONS["domain"]).query("kind == 'position'").simulation_r)


def test_outputs_in_place(planted):
    run = planted["run"]
    table = pd.read_parquet(run / "explanations.parquet")
    for col in ("layer", "neuron", "direction", "kind", "explanation", "simulation_r", "detection_f1",
                "detection_auprc", "hard_negative_accuracy", "n_heldout_tokens", "is_best", "rule"):
        assert col in table.columns
    assert set(table.direction) == {"+", "-"}
    neurons = pd.read_parquet(run / "neurons.parquet")
    assert len(neurons) == 64 and {"max", "hist", "explanation", "explanation_r", "explanation_kind"} <= set(neurons)
    n1 = neurons[neurons.neuron == NEURONS["context"]].iloc[0]
    assert n1.explanation == '"cat" after "the"' and n1.explanation_direction == "+" and n1.explanation_r > 0.95
    manifest = json.loads((run / "manifest.json").read_text())
    scored = manifest["explain"]["scored_on"]
    assert scored["side"] == "heldout" and scored["tokens"] > 500 and sum(scored["fold_documents"]) == scored["documents"]
    assert manifest["kind"] == "scan" and not (run / ".manifest.updating.json").exists()
    # held-out and train documents are disjoint
    from neuronhunter.data.split import DocumentSplit

    assert manifest["corpus"]["split"]["side"] == "train"
    assert DocumentSplit(0.3, 0).counts([f"prose/{i:02d}.txt" for i in range(30)])["heldout"] > 0


def _heldout_activations(planted):
    """Held-out tokens with the planted neurons' activations, from plain PyTorch hooks (no neuronhunter hooks)."""
    from neuronhunter.data.batches import iter_windows
    from neuronhunter.data.concepts import ConceptLabeller
    from neuronhunter.data.corpus import Corpus
    from neuronhunter.data.split import DocumentSplit
    from neuronhunter.judge.explain.heldout import doc_fold

    model = planted["model"]
    tok = model.tokenizer
    labeller = ConceptLabeller(str(planted["lexicon"]))
    docs = list(DocumentSplit(0.3, 0).select(Corpus(str(planted["corpus"])), "heldout"))
    domain = {d.doc_id: d.domain for d in docs}
    fold = {d.doc_id: doc_fold(d.uid, 0) for d in docs}
    captured = {}
    handle = model.model.transformer.h[0].mlp.c_proj.register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("a", args[0].detach()))
    recs = []
    try:
        for w in iter_windows(docs, tok, context_length=CTX, bos_token_id=50256, labeller=labeller):
            with torch.no_grad():
                model.model(torch.tensor([w.ids]))
            a = captured["a"][0].numpy()
            pieces = [tok.decode([i]) for i in w.ids]
            norm = [(p[1:] if len(p) > 1 and p[0] == " " else p).lower() for p in pieces]
            for p in range(1, len(w.ids)):
                recs.append({"norm": norm[p], "prev": norm[p - 1], "pos": p, "domain": domain[w.doc_id],
                             "fold": fold[w.doc_id], "labels": w.labels[p], **{f"a{n}": a[p, n] for n in range(4)}})
    finally:
        handle.remove()
    return pd.DataFrame(recs)


def test_scores_equal_an_independent_computation(planted):
    from sklearn.metrics import average_precision_score, f1_score

    t, run = planted["table"], planted["run"]
    data = _heldout_activations(planted)
    ex = pd.read_parquet(run / "examples.parquet")
    cats = json.loads((run / "manifest.json").read_text())["categories"]
    assert planted["result"].info["scored_on"]["tokens"] == len(data)
    checked = 0
    for neuron in range(4):
        a = data[f"a{neuron}"].to_numpy(dtype=np.float64)
        top = ex[(ex.neuron == neuron) & (ex.kind == "top")].activation.to_numpy()
        high = 0.5 * np.median(top)
        positive = a > high
        token_rule = json.loads(rows(t, neuron).query("kind == 'tokens'").rule.iloc[0])
        hard = data.norm.isin(token_rule["tokens"]).to_numpy() & (a <= 0.1 * np.median(top))
        for row in rows(t, neuron).itertuples():
            rule = json.loads(row.rule)
            w = rule["weights"]
            fam = rule["family"]
            x = np.zeros(len(data))
            if fam == "tok":
                for wt, k in zip(w, rule["tokens"], strict=True):
                    x[data.norm.to_numpy() == k] = wt
            elif fam == "bigram":
                for wt, (p, k) in zip(w, rule["bigrams"], strict=True):
                    x[(data.prev.to_numpy() == p) & (data.norm.to_numpy() == k)] = wt
            elif fam == "pos":
                for wt, p in zip(w, rule["positions"], strict=True):
                    x[data.pos.to_numpy() == p] = wt
            elif fam == "domain":
                x[data.domain.isin(rule["domains"]).to_numpy()] = 1.0
            elif fam == "cat":
                x[np.array([lab[cats.index(rule["category"])] for lab in data.labels])] = 1.0
            else:
                continue
            if np.std(x) == 0:
                continue
            assert row.simulation_r == pytest.approx(np.corrcoef(x, a)[0, 1], abs=1e-6)
            if positive.any():
                assert row.detection_f1 == pytest.approx(f1_score(positive, x > 0), abs=1e-9)
                assert row.detection_auprc == pytest.approx(average_precision_score(positive, x), abs=1e-9)
            if hard.any() and positive.any():
                tnr = 1 - (x[hard] > 0).mean()
                assert row.hard_negative_accuracy == pytest.approx(((x[positive] > 0).mean() + tnr) / 2, abs=1e-9)
            fold1 = data.fold.to_numpy() == 1
            if np.std(x[fold1]) > 0:
                assert row.confirm_simulation_r == pytest.approx(np.corrcoef(x[fold1], a[fold1])[0, 1], abs=1e-6)
            checked += 1
    assert checked >= 20


def _scanner(planted, shard=None, batch_size=5):
    from neuronhunter.data.concepts import ConceptLabeller
    from neuronhunter.judge.explain.features import Vocabulary
    from neuronhunter.judge.explain.heldout import HeldoutScanner
    from neuronhunter.judge.explain.pipeline import scan_config, scoring_side

    run, model, cands = planted["run"], planted["model"], planted["result"].candidates
    manifest = json.loads((run / "manifest.json").read_text())
    config = json.loads((run / "config.json").read_text())
    cfg = ExplainConfig(batch_size=batch_size)  # another batch size: the sums must not depend on it
    scfg = scan_config(config, manifest, scoring_side(manifest, config, cfg), cfg)
    return HeldoutScanner(model, scfg, ConceptLabeller(str(planted["lexicon"])), cands, Vocabulary(model.tokenizer),
                          domains=cands.space.domains, fold_seed=0, shard=shard)


def _same_sums(m, w):
    assert torch.equal(m.high_count, w.high_count) and torch.equal(m.hard_count, w.hard_count)
    assert torch.allclose(m.sum, w.sum, atol=1e-4) and torch.allclose(m.totals, w.totals, atol=1e-4)
    assert torch.equal(m.count, w.count) and torch.allclose(m.sumsq, w.sumsq, rtol=1e-6)


def test_shards_merge_to_one_pass(planted):
    from neuronhunter.judge.explain.heldout import run_heldout

    a = run_heldout(_scanner(planted, (0, 2)))
    b = run_heldout(_scanner(planted, (1, 2)))
    assert a.tokens > 0 and b.tokens > 0
    merged = a.merge(b)
    whole = planted["result"].state
    assert merged.tokens == whole.tokens and merged.corpus_fp == whole.corpus_fp
    assert torch.equal(merged.feature_counts, whole.feature_counts)
    _same_sums(merged.layers[0], whole.layers[0])


@pytest.mark.parametrize("heavy", [1, 10**9])
def test_row_and_join_paths_agree(planted, monkeypatch, heavy):
    """Every feature summed by the row path (one sparse product), or every one by the join path: same sums."""
    from neuronhunter.judge.explain import scoring
    from neuronhunter.judge.explain.heldout import run_heldout

    monkeypatch.setattr(scoring, "HEAVY", heavy)
    monkeypatch.setattr(scoring, "MAX_CHUNK", 37)  # and many small chunks (the packed counts' base changes)
    sc = _scanner(planted, batch_size=3)
    state = run_heldout(sc)
    layer = state.layers[0]
    assert (len(layer.join_feature) == 0) == (heavy == 1) and (layer.n_row == 0) == (heavy == 10**9)
    _same_sums(layer, planted["result"].state.layers[0])


def test_refuses_a_run_without_heldout_text(planted, tmp_path):
    model = planted["model"]
    cfg = ScanConfig(model="planted", corpus=str(planted["corpus"]), out=str(tmp_path / "all"), context_length=CTX,
                     batch_size=8, split="all", compile_stats=False, checkpoint_every=0, max_tokens=600)
    run_scan(cfg, model=model)
    with pytest.raises(RunDirError, match="no text is left"):
        explain_run(tmp_path / "all", model=model, write=False)
    # another corpus is fine, and recorded
    other = write_planted_corpus(tmp_path / "other", n_docs=4, seed=7)
    res = explain_run(tmp_path / "all", ExplainConfig(corpus=str(other)), model=model, write=False)
    assert res.info["scored_on"]["corpus"] == str(other) and res.info["scored_on"]["side"] == "all"


def test_sign_relabelled_gated_neuron_swaps_directions(tmp_path, one_thread_module):
    """Negating row n of up_proj and column n of down_proj leaves the model unchanged and negates neuron n: its
    explanations and scores must be the same with + and - swapped."""
    from neuronhunter.models.tiny import tiny_model

    corpus = write_planted_corpus(tmp_path / "corpus", n_docs=10, n_words=60)
    results = []
    for flip in (False, True):
        model = tiny_model("llama", n_layers=1, d_mlp=32)
        if flip:
            with torch.no_grad():
                model.model.model.layers[0].mlp.up_proj.weight[5] *= -1
                model.model.model.layers[0].mlp.down_proj.weight[:, 5] *= -1
        cfg = ScanConfig(model="tiny", corpus=str(corpus), out=str(tmp_path / f"run{flip}"), context_length=CTX,
                         batch_size=8, split="train", compile_stats=False, checkpoint_every=0)
        run_scan(cfg, model=model)
        results.append(explain_run(tmp_path / f"run{flip}", model=model, write=False).explanations)
    cols = ["kind", "explanation", "simulation_r", "detection_f1", "detection_auprc", "hard_negative_accuracy",
            "is_best"]

    def view(t, direction):
        r = t[(t.neuron == 5) & (t.direction == direction)][cols].sort_values(["kind", "explanation"])
        return r.round(6).reset_index(drop=True)

    for d, e in (("+", "-"), ("-", "+")):
        pd.testing.assert_frame_equal(view(results[0], d), view(results[1], e))
    assert len(view(results[0], "+")) >= 4
    # the other neurons did not move
    pd.testing.assert_frame_equal(view(results[0].assign(neuron=results[0].neuron.replace({6: 5, 5: -1})), "+"),
                                  view(results[1].assign(neuron=results[1].neuron.replace({6: 5, 5: -1})), "+"))
