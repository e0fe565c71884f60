"""The HTML neuron browser: pages from a real (tiny) scan and a planted hunt table, rendered by the page's own
JavaScript in node (with a minimal DOM), escaping of corpus text, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from neuronhunter.cli.main import main
from neuronhunter.config import ScanConfig
from neuronhunter.errors import ConfigError, RunDirError
from neuronhunter.report.browser import build_browser
from neuronhunter.scan import run_scan

RENDER = Path(__file__).parent.parent / "js" / "render_page.js"
NODE = shutil.which("node")


@pytest.fixture(scope="module")
def scan_run(tmp_path_factory, tiny_gpt2):
    root = tmp_path_factory.mktemp("browse")
    corpus = root / "doc.txt"
    corpus.write_text("The ferry left the harbour at dawn. </script><b>bold</b> & friends sailed north. " * 6)
    cfg = ScanConfig(model="tiny", corpus=str(corpus), out=str(root / "run"), layers=[0, 1], context_length=16,
                     top_k=3, formats=["parquet"])
    run_scan(cfg, model=tiny_gpt2)
    return root / "run"


def _data(page: Path) -> dict:
    text = page.read_text()
    start = text.index("<script id='data' type='application/json'>") + len("<script id='data' type='application/json'>")
    return json.loads(text[start : text.index("</script>", start)])


def _render(page: Path, hash_: str = "") -> dict:
    out = subprocess.run([NODE, str(RENDER), str(page), hash_], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _walk(node: dict):
    yield node
    for c in node.get("children", []):
        yield from _walk(c)


def _text(node: dict) -> str:
    if node.get("text") is not None:
        return node["text"]
    return "".join(_text(c) for c in node.get("children", []))


def test_pages_hold_every_neuron_and_its_examples(scan_run):
    index = build_browser(scan_run)
    assert index == scan_run / "browser" / "index.html"
    pages = sorted(p.name for p in (scan_run / "browser").iterdir())
    assert pages == ["index.html", "layer_00.html", "layer_01.html"]
    neurons = pd.read_parquet(scan_run / "neurons.parquet")
    examples = pd.read_parquet(scan_run / "examples.parquet")
    data = _data(scan_run / "browser" / "layer_01.html")
    rows = {r["neuron"]: r for r in data["rows"]}
    layer1 = neurons[neurons.layer == 1]
    assert sorted(rows) == sorted(layer1.neuron.tolist())
    for rec in layer1.itertuples():
        row = rows[rec.neuron]
        assert row["max"] == pytest.approx(rec.max, abs=1e-4) and row["hist"] == list(rec.hist)
        ex = examples[(examples.layer == 1) & (examples.neuron == rec.neuron) & (examples.kind == "top")].sort_values("rank")
        assert [e["a"] for e in row["ex"]] == pytest.approx(ex.activation.tolist(), abs=1e-4)
        for e, ctx in zip(row["ex"], ex.context, strict=True):
            assert e["l"] + "[[" + e["t"] + "]]" + e["r"] == ctx
    index_data = _data(index)
    assert [s["layer"] for s in index_data["layers"]] == [0, 1]
    best = neurons.nlargest(1, "max").iloc[0]
    assert (index_data["strongest"][0]["layer"], index_data["strongest"][0]["neuron"]) == (best.layer, best.neuron)


def test_corpus_text_cannot_break_out_of_the_page(scan_run, tmp_path):
    build_browser(scan_run, tmp_path / "b")
    html = (tmp_path / "b" / "layer_00.html").read_text()
    # the corpus holds "</script><b>bold</b>": only the page's own three script tags close
    assert html.count("</script>") == 2 and "<b>bold" not in html
    assert any("script" in e["t"] + e["l"] + e["r"] for r in _data(tmp_path / "b" / "layer_00.html")["rows"]
               for e in r["ex"])


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_layer_page_renders_table_and_neuron_detail(scan_run, tmp_path):
    build_browser(scan_run, tmp_path / "b", layers=[1], examples_per_neuron=2)
    data = _data(tmp_path / "b" / "layer_01.html")
    target = max(data["rows"], key=lambda r: r["max"])
    page = _render(tmp_path / "b" / "layer_01.html", f"#n{target['neuron']}")
    nodes = list(_walk(page["app"]))
    body_rows = [n for n in nodes if n["tag"] == "tr" and "row" in n.get("cls", "")]
    assert len(body_rows) == len(data["rows"])
    selected = [n for n in body_rows if "selected" in n["cls"]]
    assert len(selected) == 1 and _text(selected[0]["children"][0]) == str(target["neuron"])
    detail = next(n for n in nodes if n.get("cls") == "detail")
    assert f"L1.N{target['neuron']}" in _text(detail)
    shown = [n for n in _walk(detail) if n.get("cls") == "example"]
    assert len(shown) == len(target["ex"]) == 2
    tokens = [_text(c) for n in shown for c in n["children"] if c.get("cls") == "tok"]
    assert tokens == [e["t"] for e in target["ex"]]
    assert sum(1 for n in _walk(detail) if n["tag"] == "rect") == len(target["hist"])
    # tokens are text nodes, never parsed markup: no <b> element exists anywhere
    assert not any(n["tag"] == "b" for n in nodes)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_index_page_links_layers_and_hunt_verdicts(scan_run, tmp_path):
    run = tmp_path / "hunt"
    shutil.copytree(scan_run, run)
    neurons = pd.read_parquet(run / "neurons.parquet")
    neurons["verdict"] = "unselective"
    top = neurons["max"].idxmax()
    neurons.loc[top, "verdict"] = "positional"  # the strongest neuron is a sequence-starter artefact
    neurons["top_category"] = "date"
    neurons.to_parquet(run / "neurons.parquet")
    index = build_browser(run)
    page = _render(index)
    nodes = list(_walk(page["app"]))
    links = [n["attrs"]["href"] for n in nodes if n["tag"] == "a"]
    assert "layer_00.html" in links and "layer_01.html" in links
    strongest = _data(index)["strongest"]
    assert all(s["verdict"] != "positional" for s in strongest)
    assert (strongest[0]["layer"], strongest[0]["neuron"]) != (neurons.loc[top, "layer"], neurons.loc[top, "neuron"])
    verdict_headers = [_text(n) for n in nodes if n["tag"] == "th"]
    assert "positional" in verdict_headers and "unselective" in verdict_headers


def test_bad_input_is_one_clear_error(scan_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="layer 7 is not in this run"):
        build_browser(scan_run, tmp_path / "x", layers=[7])
    with pytest.raises(RunDirError, match="run folder not found"):
        build_browser(tmp_path / "nothing")
    assert main(["browse", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "run folder not found" in err and "Traceback" not in err


def test_cli_writes_the_browser(scan_run, tmp_path, capsys):
    assert main(["browse", str(scan_run), "--out", str(tmp_path / "web"), "--layers", "0"]) == 0
    assert "index.html" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "web").iterdir()) == ["index.html", "layer_00.html"]
