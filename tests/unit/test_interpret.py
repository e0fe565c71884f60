"""DuckDB interpretation of hunt runs: hand-made run folders with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from neuronhunter.analysis.interpret import (
    compare_runs,
    hypergeom_sf,
    interpret_run,
    query,
    replication,
    require_hunt,
)
from neuronhunter.errors import ConfigError, RunDirError
from neuronhunter.io import write_json, write_table

CATS = ["animal", "food", "color"]


def make_run(folder, n_layers: int, per_layer: int, selective: dict[str, set[int]], verdicts: dict[int, str],
             dprimes: dict[str, list[float]] | None = None):
    """A hunt run folder: neuron ids are global (layer * per_layer + neuron)."""
    n = n_layers * per_layer
    gid = np.arange(n)
    layer, neuron = gid // per_layer, gid % per_layer
    neurons = pd.DataFrame({"layer": layer.astype(np.int32), "neuron": neuron.astype(np.int32),
                            "max": np.linspace(1, 2, n), "crs": np.linspace(0, 1, n),
                            "dprime": np.linspace(0, 4, n), "entropy": np.linspace(2, 0, n),
                            "top_category": ["animal"] * n,
                            "verdict": [verdicts.get(int(g), "unexplained") for g in gid]})
    rows = []
    for c in [*CATS, "function", "unlabelled"]:
        for g in gid:
            dp = (dprimes or {}).get(c, [0.0] * n)[g] if c in CATS else 0.0
            rows.append({"layer": int(layer[g]), "neuron": int(neuron[g]), "category": c, "mean": 0.0, "std": 1.0,
                         "max": 1.0, "count": 50, "dprime": dp, "responsive": int(g) in selective.get(c, set()),
                         "selective": int(g) in selective.get(c, set())})
    write_table(neurons, folder / "neurons", formats=("parquet",))
    write_table(pd.DataFrame(rows), folder / "concepts", formats=("parquet",))
    write_json(folder / "manifest.json", {"kind": "hunt", "categories": [*CATS, "function"],
                                          "control_categories": ["function"], "layers": list(range(n_layers)),
                                          "model": {"n_layers": n_layers}})
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # 20 neurons (2 layers x 10): animal {0..5}, food {3..7}, color {12}
    sel = {"animal": set(range(6)), "food": set(range(3, 8)), "color": {12}}
    verdicts = {**{g: "monosemantic" for g in (0, 1, 2, 6, 7, 12)}, **{g: "polysemantic" for g in (3, 4, 5)},
                15: "positional", 19: "dead"}
    rng = np.random.default_rng(0)
    dps = {c: rng.normal(size=20).tolist() for c in CATS}
    dps["food"] = [2 * v + 1 for v in dps["animal"]]  # perfectly correlated with animal
    return make_run(tmp_path_factory.mktemp("run"), 2, 10, sel, verdicts, dps), dps


def test_pivots(run):
    folder, _ = run
    t = interpret_run(folder, write=False)
    cl = t["category_layer"]
    assert cl.loc["animal"].tolist() == [6, 0] and cl.loc["food"].tolist() == [5, 0]
    assert cl.loc["color"].tolist() == [0, 1]
    vl = t["verdict_layer"]
    assert vl.loc["monosemantic"].tolist() == [5, 1] and vl.loc["dead"].tolist() == [0, 1]
    assert int(vl.to_numpy().sum()) == 20
    sl = t["selectivity_layer"].set_index("layer")
    # layer 1 excludes the dead neuron 19 from the means
    assert sl.loc[1, "mean_crs"] == pytest.approx(np.linspace(0, 1, 20)[10:19].mean())
    assert sl.loc[0, "share_polysemantic"] == pytest.approx(0.3)


def test_overlaps_against_chance(run):
    folder, _ = run
    ov = interpret_run(folder, write=False)["overlaps"].set_index(["category_a", "category_b"])
    row = ov.loc[("animal", "food")]
    assert (row.n_a, row.n_b, row.shared) == (6, 5, 3)
    assert row.expected == pytest.approx(6 * 5 / 20) and row.ratio == pytest.approx(2.0)
    exact = sum(math.comb(6, k) * math.comb(14, 5 - k) for k in range(3, 6)) / math.comb(20, 5)
    assert row.p_value == pytest.approx(exact)
    assert ov.loc[("animal", "color")].shared == 0 and ov.loc[("animal", "color")].p_value == pytest.approx(1.0)


def test_hypergeom_edges():
    assert hypergeom_sf(0, 20, 6, 5) == pytest.approx(1.0)
    assert hypergeom_sf(6, 20, 6, 5) == 0.0
    assert hypergeom_sf(5, 10, 5, 5) == pytest.approx(1 / math.comb(10, 5))


def test_correlation(run):
    folder, dps = run
    corr = interpret_run(folder, write=False)["correlation"]
    assert corr.loc["animal", "food"] == pytest.approx(1.0)
    assert corr.loc["animal", "color"] == pytest.approx(np.corrcoef(dps["animal"], dps["color"])[0, 1])
    assert list(corr.index) == CATS


def test_writes_csv(run, tmp_path):
    folder, _ = run
    interpret_run(folder, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(f"{n}.csv" for n in ("category_layer", "monosemantic_layer", "verdict_layer",
                                                  "selectivity_layer", "overlaps", "correlation"))
    back = pd.read_csv(tmp_path / "out" / "category_layer.csv")
    assert back.columns.tolist() == ["category", "0", "1"] and back["0"].tolist() == [6, 5, 0]


def test_query(run):
    folder, _ = run
    df = query(folder, "SELECT verdict, count(*) AS n FROM neurons GROUP BY verdict ORDER BY n DESC, verdict")
    assert df.iloc[0].tolist() == ["unexplained", 9]
    with pytest.raises(ConfigError, match="query failed"):
        query(folder, "SELECT nope FROM neurons")


def test_compare_by_relative_depth(run, tmp_path):
    folder, _ = run
    # B: 4 layers x 5 neurons; animal selective in layer 3 (depth 100%) only
    other = make_run(tmp_path / "b", 4, 5, {"animal": {15, 16}, "color": {0}}, {15: "monosemantic",
                                                                                   16: "polysemantic", 0: "monosemantic"})
    res = compare_runs(folder, other, bins=2)
    depth = res["depth"].set_index(["category", "depth"])
    assert depth.loc[("animal", "0-50%"), ["selective_a", "selective_b"]].tolist() == [6, 0]
    assert depth.loc[("animal", "50-100%"), ["selective_a", "selective_b"]].tolist() == [0, 2]
    # per 1000 neurons scanned in the bin: A's bin 0 is layer 0 (10 neurons); B's bin 1 is layers 2-3 (10 neurons)
    assert depth.loc[("animal", "0-50%"), "per_1k_a"] == pytest.approx(600.0)
    assert depth.loc[("animal", "50-100%"), "per_1k_b"] == pytest.approx(200.0)
    assert depth.loc[("color", "0-50%"), "selective_b"] == 1
    verdicts = res["verdicts"].set_index("verdict")
    assert verdicts.loc["monosemantic"].tolist() == [6, 2]


def test_replication_neuron_by_neuron(tmp_path):
    """Two hunts of one model: which verdicts (and which claims) come back on other text."""

    def hunt(name, verdicts, directions, cats, model="m"):
        folder = make_run(tmp_path / name, 2, 4, {}, dict(enumerate(verdicts)))
        neurons = pd.read_parquet(folder / "neurons.parquet")
        neurons["direction"] = directions
        neurons["claim_category"] = cats
        write_table(neurons, folder / "neurons", formats=("parquet",))
        write_json(folder / "config.json", {"model": model})
        return folder

    a = hunt("a", ["monosemantic"] * 4 + ["token", "token", "unexplained", "unexplained"],
             ["+", "-", "+", "+", "+", "-", "+", "+"], ["color", "color", "food", "date", None, None, None, None])
    # B: neuron 0 same claim; 1 same verdict, other direction; 2 same verdict, other category; 3 unexplained;
    # 4 token again; 5 unexplained; 6 unexplained again; 7 monosemantic
    b = hunt("b", ["monosemantic"] * 3 + ["unexplained", "token", "unexplained", "unexplained", "monosemantic"],
             ["+", "+", "+", "+", "+", "-", "+", "-"], ["color", "color", "animal", None, None, None, None, "food"])
    r = replication(a, b).set_index("verdict")
    assert r.loc["monosemantic", ["n_a", "n_b", "same_verdict", "same_claim"]].tolist() == [4, 4, 3, 1]
    assert r.loc["token", ["n_a", "same_verdict", "same_claim"]].tolist() == [2, 1, 1]
    assert r.loc["unexplained", ["same_verdict", "same_claim"]].tolist() == [1, 1]
    assert r.loc["all", ["n_a", "same_verdict", "same_claim"]].tolist() == [8, 5, 3]
    assert r.loc["monosemantic", "pct_chance"] == pytest.approx(50.0)  # B calls 4 of 8 neurons monosemantic
    # chance agreement over all neurons: sum of A's share x B's share per verdict
    assert r.loc["all", "pct_chance"] == pytest.approx(100 * (0.5 * 0.5 + 0.25 * 0.125 + 0.25 * 0.375))
    with pytest.raises(ConfigError, match="one model"):
        replication(a, hunt("c", ["unexplained"] * 8, ["+"] * 8, [None] * 8, model="other"))


def test_requires_a_hunt_run(tmp_path):
    with pytest.raises(RunDirError, match="not found"):
        require_hunt(tmp_path / "missing")
    write_table(pd.DataFrame({"layer": [0], "neuron": [0]}), tmp_path / "neurons", formats=("parquet",))
    write_json(tmp_path / "manifest.json", {"kind": "scan"})
    with pytest.raises(RunDirError, match="neuronhunter hunt"):
        require_hunt(tmp_path)


def test_neuron_activation_figure_colours_tokens_by_category():
    from neuronhunter.report.figures import category_colors, neuron_activation_figure

    cats = ["animal", "color"]
    labels = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0, 0]], dtype=bool)
    fig = neuron_activation_figure(["<s>", " cat", " red", " fox", "\n"], [9.0, 1.0, 2.0, 3.0, 0.5], labels, cats,
                                   first_is_special=True)
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"animal", "color", "unlabelled", "position 0"}
    assert list(traces["animal"].x) == [1, 3]  # " fox" (animal + color) is coloured by its first category
    assert list(traces["color"].y) == [2.0] and list(traces["position 0"].x) == [0]
    assert traces["animal"].marker.color == category_colors(cats)["animal"]
    assert traces["animal"].customdata[1][1] == "animal, color"
    assert list(fig.layout.xaxis.ticktext) == ["<s>", "·cat", "·red", "·fox", "⏎"]
    with pytest.raises(ValueError, match="shapes"):
        neuron_activation_figure(["a"], [1.0, 2.0], labels[:1], cats)


def test_heatmap_and_offline_html(tmp_path):
    from neuronhunter.report.export import kaleido_available, write_figure
    from neuronhunter.report.figures import layer_category_heatmap

    table = pd.DataFrame([[1, 0, 4], [2, 3, 0]], index=["animal", "color"], columns=[0, 1, 2])
    fig = layer_category_heatmap(table)
    assert fig.data[0].z.tolist() == [[1, 0, 4], [2, 3, 0]] and list(fig.data[0].x) == ["0", "1", "2"]
    written = write_figure(fig, tmp_path / "map", png=False)
    assert written == [tmp_path / "map.html"]
    page = written[0].read_text()
    assert "<script src" not in page and len(page) > 1_000_000 and '"animal"' in page
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary file left
    if not kaleido_available():
        with pytest.raises(ConfigError, match="kaleido"):
            write_figure(fig, tmp_path / "m2.html", png=True)
        assert not (tmp_path / "m2.html").exists()
