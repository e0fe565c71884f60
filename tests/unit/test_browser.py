"""The static neuron browser (``neuronhunter browse``): its data files hold every neuron of a real (tiny) scan with
its statistics, histogram and every exemplar, read back and compared with the run's tables; corpus text cannot end
a script; bad input is one clear error. (The pages themselves are driven in chromium in tests/e2e/test_browser.py.)
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from neuronhunter.cli.main import main
from neuronhunter.config import ScanConfig
from neuronhunter.errors import ConfigError, RunDirError
from neuronhunter.report.browser import browser_size, build_browser, pack, read_data_file, unpack
from neuronhunter.scan import run_scan


@pytest.fixture(scope="module")
def scan_run(tmp_path_factory, tiny_gpt2):
    root = tmp_path_factory.mktemp("browse")
    corpus = root / "doc.txt"
    corpus.write_text("The ferry left the harbour at dawn. </script><b>bold</b> & friends sailed north. " * 6)
    cfg = ScanConfig(model="tiny", corpus=str(corpus), out=str(root / "run"), layers=[0, 1], context_length=16,
                     top_k=3, formats=["parquet"], compile_stats=False)
    run_scan(cfg, model=tiny_gpt2)
    return root / "run"


def _exemplars(layer_data: dict, contexts: dict, i: int) -> list[tuple[str, float, str]]:
    """``(kind, activation, context as the scan wrote it)`` of the i-th neuron, in the file's order."""
    runs, acts, ids = layer_data["examples"][i]
    kinds = [layer_data["groups"][g][0] for g, n in runs for _ in range(n)]
    out = []
    for kind, act, c in zip(kinds, acts, ids, strict=True):
        left, tok, right, _, _ = contexts["contexts"][c]
        out.append((kind, act, f"{left}[[{tok}]]{right}"))
    return out


def test_data_files_hold_every_neuron_and_every_exemplar(scan_run):
    index = build_browser(scan_run)
    out = scan_run / "browser"
    assert index == out / "index.html"
    assert sorted(p.name for p in (out / "data").iterdir()) == ["contexts.js", "index.js", "layer_00.js",
                                                                  "layer_01.js"]
    neurons = pd.read_parquet(scan_run / "neurons.parquet")
    examples = pd.read_parquet(scan_run / "examples.parquet")
    contexts = read_data_file(out / "data" / "contexts.js")
    for layer in (0, 1):
        data = read_data_file(out / "data" / f"layer_{layer:02d}.js")
        frame = neurons[neurons.layer == layer].sort_values("neuron")
        assert data["neurons"] == frame.neuron.tolist()
        assert data["rows"]["max"] == pytest.approx(frame["max"].tolist(), rel=1e-3)
        assert data["hist"] == [list(h) for h in frame["hist"]]
        assert data["hist_lo"] == pytest.approx(frame.hist_lo.tolist(), rel=1e-3)
        for i, n in enumerate(data["neurons"]):
            mine = examples[(examples.layer == layer) & (examples.neuron == n)]
            want = sorted((k, c, a) for k, a, c in zip(mine.kind, mine.activation, mine.context, strict=True))
            got = sorted((k, c, a) for k, a, c in _exemplars(data, contexts, i))
            assert [(k, c) for k, c, _ in got] == [(k, c) for k, c, _ in want]
            assert [a for _, _, a in got] == pytest.approx([a for _, _, a in want], rel=1e-3, abs=1e-5)
            first = _exemplars(data, contexts, i)[0]  # the strongest top exemplar comes first
            top = mine[mine.kind == "top"].sort_values("rank").iloc[0]
            assert first[0] == "top" and first[2] == top.context
    # contexts are stored once: no more than the distinct corpus positions the exemplars refer to
    assert len(contexts["contexts"]) == examples[["source", "pos", "context"]].drop_duplicates().shape[0]
    info = read_data_file(out / "data" / "index.js")
    assert info["info"]["layers"] == [0, 1] and [s["layer"] for s in info["layers"]] == [0, 1]
    best = neurons.nlargest(1, "max").iloc[0]
    assert (info["strongest"][0]["layer"], info["strongest"][0]["neuron"]) == (best.layer, best.neuron)
    # the search index: each neuron's distinct top-exemplar tokens, in rank order
    search = info["search"]
    for layer in (0, 1):
        entry = search["layers"][str(layer)]
        for n, toks in zip(entry["neurons"], entry["tokens"], strict=True):
            top = examples[(examples.layer == layer) & (examples.neuron == n) & (examples.kind == "top")]
            assert [search["token"][t] for t in toks] == list(dict.fromkeys(top.sort_values("rank").token))
    assert browser_size(out) == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def test_examples_per_neuron_and_layers(scan_run, tmp_path):
    build_browser(scan_run, tmp_path / "b", layers=[1], examples_per_neuron=1)
    assert sorted(p.name for p in (tmp_path / "b" / "data").iterdir()) == ["contexts.js", "index.js", "layer_01.js"]
    data = read_data_file(tmp_path / "b" / "data" / "layer_01.js")
    for runs, _, _ in data["examples"]:
        assert all(n == 1 for _, n in runs)  # one exemplar of each group (top, bottom, each band)


def test_corpus_text_cannot_break_out_of_a_script(scan_run, tmp_path):
    build_browser(scan_run, tmp_path / "b")
    for f in (tmp_path / "b" / "data").iterdir():
        text = f.read_text(encoding="ascii")  # base64 inside one call: no markup, no quotes, no </script>
        assert "<" not in text and ">" not in text and "&" not in text
    html = (tmp_path / "b" / "index.html").read_text()
    assert html.count("<script") == 2 and "bold" not in html
    contexts = read_data_file(tmp_path / "b" / "data" / "contexts.js")
    assert any("</script><b>bold" in "".join(c[:3]) for c in contexts["contexts"])
    assert unpack(pack({"t": "</script>\u2028"})) == {"t": "</script>\u2028"}


def test_hunt_columns_and_tables_reach_the_layer_files(scan_run, tmp_path):
    run = tmp_path / "hunt"
    shutil.copytree(scan_run, run)
    neurons = pd.read_parquet(run / "neurons.parquet")
    neurons["verdict"] = "unexplained"
    top = neurons["max"].idxmax()
    neurons.loc[top, "verdict"] = "positional"  # the strongest neuron is a sequence-starter artefact
    neurons["claim_category"] = None
    neurons.loc[3, "claim_category"] = "color"
    neurons["flags"] = [None] * len(neurons)
    neurons.loc[3, "flags"] = "low_count,first_token"
    neurons.to_parquet(run / "neurons.parquet")
    pd.DataFrame({"layer": [int(neurons.layer[3])], "neuron": [int(neurons.neuron[3])], "direction": ["+"],
                  "explanation": ["colour <words>"], "f1_heldout": [0.7]}).to_parquet(run / "explanations.parquet")
    build_browser(run)
    info = read_data_file(run / "browser" / "data" / "index.js")
    assert all(s["verdict"] != "positional" for s in info["strongest"])
    layer, n = int(neurons.layer[3]), int(neurons.neuron[3])
    entry = info["search"]["layers"][str(layer)]
    i = entry["neurons"].index(n)
    assert info["search"]["text"][entry["claim_category"][i]] == "color"
    assert info["search"]["text"][entry["flags"][i]] == "low_count,first_token"
    assert entry["explanation"][i] == "colour <words>"
    data = read_data_file(run / "browser" / "data" / f"layer_{layer:02d}.js")
    j = data["neurons"].index(n)
    assert data["tables"]["explanations"]["rows"][str(j)] == [["+", "colour <words>", 0.7]]
    assert data["rows"]["verdict"][j] == "unexplained"


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
    out = capsys.readouterr().out
    assert "index.html" in out and "MB" in out
    assert sorted(p.name for p in (tmp_path / "web" / "data").iterdir()) == ["contexts.js", "index.js",
                                                                             "layer_00.js"]
