"""The hunt commands end to end (in-process): hunt, interpret, query, compare, plot neuron/map, and bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from neuronhunter.cli.main import main
from neuronhunter.report.export import kaleido_available

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from neuronhunter.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("hunt") / "run"
    code = main(["hunt", "--model", str(tiny_folder), "--out", str(out), "--max-tokens", "700",
                 "--context-length", "48", "--top-k", "4", "--formats", "parquet,csv"])
    assert code == 0
    return out


def test_hunt_writes_the_schema(run):
    neurons = pd.read_parquet(run / "neurons.parquet")
    concepts = pd.read_parquet(run / "concepts.parquet")
    assert len(neurons) == 2 * 128 and neurons["verdict"].notna().all()
    assert {"layer", "neuron", "max", "verdict", "direction", "claim_category", "claim_categories", "flags",
            "precision", "recall", "f1", "auprc", "p_value", "q_value", "distinct_types", "top_tokens", "crs",
            "dprime", "entropy", "n_categories", "categories", "top_category", "pos0_ratio"} <= set(neurons.columns)
    assert set(neurons.direction) <= {"+", "-"}
    directions = pd.read_parquet(run / "directions.parquet")
    assert len(directions) == 2 * len(neurons) and set(directions.direction) == {"+", "-"}
    assert {"layer", "neuron", "category", "mean", "max", "count", "dprime", "selective", "precision_pos",
            "precision_neg", "auprc_neg", "q_value_pos", "specific_neg"} <= set(concepts.columns)
    assert set(concepts.category) == {"date", "location", "animal", "food", "numeric", "language", "vehicle", "color",
                                      "function", "noun", "unlabelled"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["kind"] == "hunt" and manifest["control_categories"] == ["function", "noun"]
    assert manifest["corpus"]["spec"] == "master" and manifest["tokens"] == 700
    assert manifest["corpus"]["split"]["side"] == "train" and manifest["hunt"]["judged_on"]["side"] == "train"
    assert sum(manifest["hunt"]["verdicts"].values()) == 256
    assert (run / "neurons.csv").exists() and not (run / "neurons.json").exists()
    assert (run / "top_neurons.parquet").exists() and (run / "hunt.json").exists()
    from neuronhunter.runfolder import foreign_entries

    assert foreign_entries(run) == []  # every file the hunt wrote is the tool's: --overwrite may replace the run


def test_hunt_prints_summary(tiny_folder, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["hunt", "--model", str(tiny_folder), "--out", str(out), "--max-tokens", "300",
                 "--context-length", "32", "--top-k", "2", "--formats", "parquet", "--layers", "1"]) == 0
    text = capsys.readouterr().out
    assert "Verdicts per layer" in text and "Champion" in text and "Labelled tokens" in text
    assert "total" in text and "unexpl." in text and "direction" in text
    assert set(pd.read_parquet(out / "neurons.parquet").layer) == {1}


def test_rescore_with_new_thresholds(run, tmp_path, capsys):
    strict = tmp_path / "strict.yaml"
    strict.write_text("thresholds:\n  min_lift: 1000\n  pos0_ratio: 1000000\n"
                      "  fixed_position_frac: 1.0\n  fixed_position_min_examples: 1000\n")
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(run, copy)
    assert main(["hunt", "--rescore", str(copy), "--config", str(strict)]) == 0
    verdicts = pd.read_parquet(copy / "neurons.parquet")["verdict"]
    assert set(verdicts) <= {"unexplained", "dead"}
    assert json.loads((copy / "config.json").read_text())["thresholds"]["min_lift"] == 1000
    assert "Re-scored" in capsys.readouterr().out


def test_interpret_and_query(run, tmp_path, capsys):
    assert main(["interpret", str(run)]) == 0
    text = capsys.readouterr().out
    assert "category x layer" in text and "vs chance" in text and "Correlation" in text
    for name in ("category_layer", "verdict_layer", "selectivity_layer", "overlaps", "correlation"):
        assert (run / "interpret" / f"{name}.csv").exists()
    vl = pd.read_csv(run / "interpret" / "verdict_layer.csv")
    assert int(vl.drop(columns=["verdict"]).to_numpy().sum()) == 256
    out_csv = tmp_path / "q.csv"
    assert main(["query", str(run), "SELECT layer, count(*) AS n FROM neurons GROUP BY layer ORDER BY layer",
                 "--out", str(out_csv)]) == 0
    assert pd.read_csv(out_csv)["n"].tolist() == [128, 128]


def test_compare(run, tiny_folder, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["hunt", "--model", str(tiny_folder), "--corpus", "default", "--out", str(other),
                 "--max-tokens", "300", "--context-length", "48", "--top-k", "2", "--formats", "parquet"]) == 0
    capsys.readouterr()
    out_csv = tmp_path / "cmp.csv"
    assert main(["compare", str(run), str(other), "--bins", "2", "--out", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "relative depth" in text
    assert "Replication, neuron by neuron" in text  # two runs of one model (other text): verdicts compared
    df = pd.read_csv(out_csv)
    assert list(df.columns) == ["category", "depth", "selective_a", "selective_b", "per_1k_a", "per_1k_b"]
    assert len(df) == 8 * 2 and set(df.depth) == {"0-50%", "50-100%"}


def test_plots_are_offline_html(run, tmp_path, capsys):
    html = tmp_path / "n.html"
    assert main(["plot", "neuron", str(run), "0", "5", "--text", "A red bus drove past three cats in Paris.",
                 "--out", str(html), "--no-png"]) == 0
    page = html.read_text()
    # plotly.js is inlined: no script is loaded from anywhere (plotly.js only mentions its CDN as a geo default)
    assert "<script src" not in page and 'src="http' not in page and len(page) > 1_000_000
    assert "plotly.js v" in page or "plotly.min.js" in page or "Plotly" in page
    assert "animal" in page and "vehicle" in page and "color" in page and "unlabelled" in page
    assert "max" in capsys.readouterr().out
    # default text: the neuron's top example; default path under the run
    assert main(["plot", "neuron", str(run), "1", "7", "--no-png"]) == 0
    assert (run / "plots" / "neuron_L1_N7.html").exists()
    assert main(["plot", "map", str(run), "--no-png"]) == 0
    page = (run / "plots" / "map.html").read_text()
    assert "heatmap" in page and "<script src" not in page
    assert main(["plot", "map", str(run), "--kind", "monosemantic", "--out", str(tmp_path / "m.html"),
                 "--no-png"]) == 0
    assert (tmp_path / "m.html").exists()


@pytest.mark.skipif(kaleido_available(), reason="kaleido installed: PNG export works")
def test_png_without_kaleido_is_a_clean_error(run, tmp_path, capsys):
    assert main(["plot", "map", str(run), "--png", "--out", str(tmp_path / "m.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PNG export needs kaleido") and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["interpret", "NOPE"], "run folder not found"),
    (["query", "RUN", "SELECT nope FROM neurons"], "query failed"),
    (["plot", "neuron", "RUN", "9", "0", "--text", "hi"], "out of range"),
    (["plot", "neuron", "RUN", "0", "5000", "--text", "hi"], "out of range"),
    (["plot", "map", "RUN", "--kind", "weird"], "--kind must be"),
    (["compare", "RUN", "NOPE"], "run folder not found"),
    (["hunt", "--config", "BADCFG"], "unknown key"),
    (["hunt", "--out", "RUN"], "--overwrite"),
    (["interpret", "SCANRUN"], "neuronhunter hunt"),
])
def test_bad_input_is_one_line(run, tiny_folder, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text("thresholds:\n  dprime_min: 1\n  nonsense: 2\n")
    scan_run = tmp_path / "scan"
    if "SCANRUN" in args:
        assert main(["scan", "--model", str(tiny_folder), "--corpus", "master", "--out", str(scan_run),
                     "--max-tokens", "100", "--formats", "parquet"]) == 0
        capsys.readouterr()
    subst = {"RUN": str(run), "NOPE": str(tmp_path / "nope"), "BADCFG": str(bad), "SCANRUN": str(scan_run)}
    argv = [subst.get(a, a) for a in args]
    if argv[0] == "hunt" and "--model" not in argv:
        argv += ["--model", str(tiny_folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:") and err.count("\n") == 1
