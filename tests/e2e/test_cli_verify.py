"""End to end: the verify/circuits commands on a tiny saved model, in-process; files written, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from neuronhunter.cli.main import main

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread_module")]  # 1 thread, see conftest

WORDS = ("The red cat sat near the blue door on Monday. A dog ran to the green tree in March, and the fox "
         "watched the yellow car. Paris and London are cities; the horse ate an apple and a banana.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from neuronhunter.models.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("model") / "m", "gpt2"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (folder / f"{i}.txt").write_text(" ".join([WORDS] * 3), encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny, corpus):
    """A fake hunt run folder (what the scan and the hunt write), pointing at the tiny model."""
    folder = tmp_path_factory.mktemp("run") / "hunt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": tiny, "corpus": corpus, "context_length": 32,
                                                     "prepend_bos": True}))
    neurons = pd.DataFrame({
        "layer": [0, 0, 1, 1], "neuron": [1, 2, 3, 4], "mean": [0.1, 0.0, 0.2, 0.3],
        "verdict": ["monosemantic", "polysemantic", "monosemantic", "dead"], "direction": ["+", "-", "+", "+"],
        "claim_category": ["color", None, "animal", None], "claim_categories": [None, "animal,color", None, None],
        "top_category": ["color", "animal", "animal", None],
    })
    neurons.to_parquet(folder / "neurons.parquet")
    from neuronhunter.data.corpus import Corpus
    from neuronhunter.data.split import DocumentSplit

    split = DocumentSplit(0.3, 0)
    assert 0 < len(list(split.select(Corpus(corpus), "heldout"))) < 8  # a train and a held-out side
    (folder / "manifest.json").write_text(json.dumps({"kind": "hunt", "corpus": {"spec": corpus,
                                                                                 "split": split.manifest("train")}}))
    return folder


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_attention_and_heads(tmp_path, tiny, capsys):
    out = tmp_path / "att.html"
    assert main(["attention", "--text", "The cat sat on the mat", "--model", tiny, "--out", str(out)]) == 0
    assert "plotly" in out.read_text()[:200000].lower()
    heads_dir = tmp_path / "heads"
    assert main(["heads", "--model", tiny, "--max-tokens", "120", "--seq-len", "8", "--n-seqs", "2",
                 "--out", str(heads_dir)]) == 0
    df = pd.read_parquet(heads_dir / "heads.parquet")
    assert list(df.columns) == ["layer", "head", "prev_token", "duplicate_token", "induction", "bos_sink", "entropy"]
    assert len(df) == 2 * 4
    for name in ("heads.csv", "heads.html", "induction.html", "induction_curve.parquet", "heads.json"):
        assert (heads_dir / name).exists()
    capsys.readouterr()
    assert main(["heads", "--model", tiny, "--layers", "5", "--out", str(heads_dir)]) == 2
    assert "layer 5 is out of range" in _err(capsys)
    assert main(["attention", "--text", "  ", "--model", tiny]) == 2
    assert "empty" in _err(capsys)


def test_patch(tmp_path, tiny, capsys):
    out = tmp_path / "patch"
    assert main(["patch", "--clean", "The cat sat on the mat", "--corrupted", "The dog sat on the mat",
                 "--answer", " mat", "--wrong", " rug", "--model", tiny, "--out", str(out)]) == 0
    df = pd.read_parquet(out / "patching.parquet")
    assert set(df.kind) == {"resid", "head"}
    import numpy as np

    arrays = np.load(out / "patching.npz")
    assert arrays["resid"].shape == (2, 7) and arrays["heads"].shape == (2, 4)
    assert (out / "patching.html").exists()
    capsys.readouterr()
    assert main(["patch", "--clean", "The cat sat", "--corrupted", "The big dog sat", "--answer", " mat",
                 "--wrong", " rug", "--model", tiny, "--out", str(out)]) == 2
    assert "same number of tokens" in _err(capsys)


def test_logits_ablate_verify(run, capsys):
    assert main(["logits", str(run), "--k", "5", "--show", "0.1"]) == 0
    logits = pd.read_parquet(run / "logits.parquet")
    assert len(logits) == 4 * 2 * 5
    assert "0.1" in capsys.readouterr().out
    assert main(["ablate", str(run), "0", "1", "1", "3", "--max-tokens", "200", "--top", "5"]) == 0
    folder = run / "ablations" / "L0N1_L1N3_mean"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n_tokens"] > 100 and summary["neurons"] == [[0, 1], [1, 3]]
    by_cat = pd.read_parquet(folder / "by_category.parquet")
    assert {"animal", "color"} <= set(by_cat.category)
    assert len(pd.read_parquet(folder / "top_tokens.parquet")) == 5
    assert main(["ablate", str(run), "0", "1", "--heads", "1.2", "--method", "resample", "--max-tokens", "200",
                 "--out", str(run / "abl2")]) == 0
    fast = ["--n-nulls", "5", "--max-nulls", "5", "--max-claim-tokens", "6", "--min-tokens", "2", "--no-steer"]
    assert main(["verify", str(run), *fast, "--claim", "1:7-=tokens:red|blue"]) == 0
    from neuronhunter.causal.verification import CLAIM_COLUMNS

    claims = pd.read_parquet(run / "claims.parquet")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert len(claims) == 4 and set(claims.verified_on) == {"heldout"}
    assert claims.set_index(["layer", "neuron"]).loc[(1, 7), "claim"] == "tokens:red|blue"
    table = pd.read_parquet(run / "neurons.parquet")
    assert {"causal_effect", "causal_per_unit", "causal_p", "causal_q", "causally_confirmed",
            "verified_on"} <= set(table.columns)
    assert table.causal_p.notna().sum() == 3  # the hunt's three claims; the hand-given one is in claims.parquet
    assert (run / "verification.parquet").exists() and (run / "verification.html").exists()
    out = capsys.readouterr().out
    assert "Causal verification on heldout" in out and "tested claims confirmed" in out


def test_verify_claims_without_a_run(tmp_path, tiny, corpus, capsys):
    out = tmp_path / "mine"
    assert main(["verify", "--claim", "0:5=tokens:cat|dog", "--claim", "1:9-=tokens:red", "--model", tiny,
                 "--corpus", corpus, "--out", str(out), "--n-nulls", "5", "--max-nulls", "5",
                 "--max-claim-tokens", "6", "--no-steer", "--no-attribution"]) == 0
    claims = pd.read_parquet(out / "claims.parquet")
    assert list(claims.direction) == ["+", "-"] and set(claims.verified_on) == {f"corpus:{corpus}"}
    assert (claims.n_nulls == 5).all() and claims.p_value.between(0, 1).all()


def test_probe_and_sparse_probe(tmp_path, run, capsys):
    out = tmp_path / "probes"
    assert main(["probe", "--run", str(run), "--max-tokens", "500", "--folds", "2", "--out", str(out)]) == 0
    df = pd.read_parquet(out / "probes_resid.parquet")
    assert list(df.layer) == [0, 1]
    assert {"accuracy", "macro_f1", "majority_accuracy", "control_accuracy", "selectivity"} <= set(df.columns)
    assert (out / "probe_curve_resid.html").exists()
    assert main(["sparse-probe", "--run", str(run), "--max-tokens", "500", "--folds", "2", "--ks", "1,2,4",
                 "--min-positive", "3", "--out", str(out)]) == 0
    curve = pd.read_parquet(out / "sparse_probes.parquet")
    assert set(curve.k) == {1, 2, 4}
    assert (out / "sparse_vs_hunt.parquet").exists() and (out / "sparse_probe.html").exists()
    labels = tmp_path / "labels.tsv"
    labels.write_text("Paris\tLOC\nis\tO\nnice\tO\n\nLondon\tLOC\nis\tO\nbig\tO\n\nRome\tLOC\nis\tO\nold\tO\n")
    tiny = json.loads((run / "config.json").read_text())["model"]
    assert main(["probe", "--model", tiny, "--labels", str(labels),
                 "--include-none", "--folds", "2", "--layers", "0", "--out", str(out / "user")]) == 0
    assert pd.read_parquet(out / "user" / "probes_resid.parquet").classes.iloc[0].tolist() == ["LOC", "none"]
    capsys.readouterr()
    assert main(["probe", "--run", str(run), "--site", "banana", "--max-tokens", "100"]) == 2
    assert "probe site" in _err(capsys)


def test_bad_inputs(tmp_path, run, capsys):
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in _err(capsys)
    assert main(["ablate", str(run), "0", "999"]) == 2
    assert "neuron 999 is out of range" in _err(capsys)
    assert main(["ablate", str(run), "0", "1", "2"]) == 2
    assert "pairs" in _err(capsys)
    assert main(["ablate", str(run), "7", "1"]) == 2
    assert "layer 7 is out of range" in _err(capsys)
    assert main(["ablate", str(run), "0", "1", "--heads", "0.9"]) == 2
    assert "head 9 is out of range" in _err(capsys)
    assert main(["verify", str(run), "--n-nulls", "0"]) == 2
    assert "n_nulls" in _err(capsys)
    assert main(["verify", str(run), "--claim", "20=color"]) == 2
    assert "bad claim" in _err(capsys)
    assert main(["verify", "--claim", "0:1=color"]) == 2
    assert "--corpus and --out" in _err(capsys)
    assert main(["logits", str(run), "--show", "3.3"]) == 2
    assert "not in" in _err(capsys)
    assert main(["sparse-probe", "--run", str(run), "--ks", "0"]) == 2
    assert "--ks" in _err(capsys)
    plain = tmp_path / "scan-only"
    plain.mkdir()
    pd.DataFrame({"layer": [0], "neuron": [1]}).to_parquet(plain / "neurons.parquet")
    (plain / "manifest.json").write_text("{}")
    (plain / "config.json").write_text(json.dumps(json.loads((run / "config.json").read_text())))
    assert main(["verify", str(plain)]) == 2
    assert "hunt" in _err(capsys)
    (plain / "neurons.parquet").unlink()
    pd.read_parquet(run / "neurons.parquet").to_parquet(plain / "neurons.parquet")
    assert main(["verify", str(plain)]) == 2  # its manifest records no train/held-out split
    assert "no held-out side" in _err(capsys)
