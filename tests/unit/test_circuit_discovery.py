"""Circuit discovery: a planted path is recovered with faithfulness ~1 and a decoy that fires is left out; EAP scores
equal an independent autograd computation; all edges give the clean run, none the corrupted one; tasks load."""

from __future__ import annotations

import json

import pytest
import torch

from neuronhunter.circuits.discovery import Graph, discover, prepare
from neuronhunter.circuits.planted import planted_path_model, planted_task
from neuronhunter.circuits.tasks import BUNDLED, Pair, Task, load_task
from neuronhunter.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread_module")

PATH = {("input", "attn0"), ("a0.h0", "mlp1"), ("m1.n0", "logits")}
DECOY = {("a0.h1", "mlp1"), ("m1.n1", "logits")}


@pytest.fixture(scope="module")
def model():
    return planted_path_model()


@pytest.fixture(scope="module")
def task():
    return Task("planted", [Pair(**p) for p in planted_task()], "planted")


@pytest.fixture(scope="module")
def result(model, task):
    return discover(model, task, method="eap", check_top=6)


def _edges(frame):
    return set(zip(frame.upstream, frame.down, strict=True))


def test_planted_path_is_the_circuit_and_the_decoy_is_left_out(result):
    assert result.clean > 1.0 > 0.1 > abs(result.corrupted)
    assert _edges(result.edges.head(3)) == PATH
    assert _edges(result.circuit) == PATH
    faith = {c["edges"]: c["faithfulness"] for c in result.curve}
    assert 0.9 <= faith[3] <= 1.2
    assert abs(faith[1]) < 0.05 and abs(faith[2]) < 0.05  # half a path carries nothing
    assert not (_edges(result.circuit) & DECOY)
    # exact patching: each planted edge alone carries the whole effect, the decoy's edges almost none
    checks = {(c["upstream"], c["downstream"]): c for c in result.checks}
    for edge in PATH:
        assert checks[edge]["exact_normalised"] > 0.9
    for edge in DECOY & set(checks):
        assert abs(checks[edge]["exact_normalised"]) < 0.1
    summary = result.summary()
    assert summary["circuit"]["n_edges"] == 3 and summary["exact_vs_eap_spearman"] > 0.5
    json.dumps(summary)  # circuit.json is plain JSON


def test_all_edges_give_the_clean_run_and_none_the_corrupted(result):
    assert result.curve[-1]["edges"] == len(result.edges)
    assert abs(result.curve[-1]["faithfulness"] - 1.0) < 1e-4
    assert abs(result.curve[0]["faithfulness"]) < 0.05  # one edge (a middle one of the path) changes nothing


def test_eap_scores_equal_an_independent_autograd_computation(model, task, result):
    pr = prepare(model, task)
    hf = model.model
    tr = hf.transformer
    seen = {}

    def grab_final(_m, args):  # the unembedding's input as a leaf: its gradient is the logits' g
        seen["x"] = args[0].detach().clone().requires_grad_(True)
        return (seen["x"], *args[1:])

    def grab_neurons(key):
        def hook(_m, args):
            seen[key] = args[0].detach()
        return hook

    h1 = tr.ln_f.register_forward_pre_hook(grab_final)
    h2 = tr.h[1].mlp.c_proj.register_forward_pre_hook(grab_neurons("a"))
    try:
        with torch.no_grad():
            hf(input_ids=pr.corrupted, attention_mask=pr.mask)
        a_corr = seen["a"]
        logits = hf(input_ids=pr.clean, attention_mask=pr.mask).logits
    finally:
        h1.remove()
        h2.remove()
    rows = torch.arange(len(pr.last))
    m = (logits[rows, pr.last, pr.answer] - logits[rows, pr.last, pr.wrong]).mean()
    m.backward()
    w_out = tr.h[1].mlp.c_proj.weight.detach()  # Conv1D [d_mlp, d_model]: row n is neuron n's write
    expected = ((seen["a"] - a_corr)[..., 0] * (seen["x"].grad @ w_out[0])).sum()
    row = result.edges[(result.edges.upstream == "m1.n0") & (result.edges.down == "logits")].iloc[0]
    assert row.score == pytest.approx(float(expected), rel=1e-4)


def test_eap_ig_ranks_the_planted_path_first(model, task):
    res = discover(model, task, method="eap-ig", steps=4, check_top=0, sizes=(3,))
    assert _edges(res.edges.head(3)) == PATH
    with pytest.raises(ConfigError):
        discover(model, task, method="eap-ig", steps=1)
    with pytest.raises(ConfigError):
        discover(model, task, method="acdc")


def test_tasks_load_and_bad_pairs_are_refused(model, tmp_path):
    for name in BUNDLED:
        t = load_task(name)
        assert len(t) >= 8 and all(p.answer.startswith(" ") for p in t.pairs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a b", "corrupted": "a b"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.jsonl:1 needs"):
        load_task(bad)
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_task(bad)
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("no-such-task")
    uneven = Task("uneven", [Pair("The cat sat", "The hippopotamus sat", " on", " in")], "x")
    with pytest.raises(ConfigError, match="pair 1: clean and corrupted"):
        prepare(model, uneven)


def test_post_norm_models_are_refused():
    from neuronhunter.models.tiny import tiny_model

    with pytest.raises(ConfigError, match="pre-norm"):
        Graph(tiny_model("gemma2"))


def test_circuit_cli_writes_the_run_folder(model, tmp_path, capsys):
    from neuronhunter.cli.main import main
    from neuronhunter.io import read_json, read_table

    folder = tmp_path / "planted-model"
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in planted_task()), encoding="utf-8")
    out = tmp_path / "circuit"
    assert main(["circuit", str(pairs), "--model", str(folder), "--out", str(out), "--sizes", "1,3",
                 "--check-top", "3"]) == 0
    summary = read_json(out / "circuit.json")
    assert {(e["upstream"], e["downstream"]) for e in summary["circuit"]["edges"]} == PATH
    assert summary["circuit"]["edges"][0]["site"]
    assert len(read_table(out / "edges.parquet")) == summary["edges_total"]
    page = (out / "circuit.html").read_text(encoding="utf-8")
    assert "<svg" in page and "a0.h0" in page and "<script" not in page
    assert read_json(out / "manifest.json")["kind"] == "circuit"
    capsys.readouterr()
    assert main(["circuit", str(tmp_path / "missing.jsonl"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task" in err[0]


def test_mlp_layer_writers_sum_their_units(model, task, result):
    layered = discover(model, task, mlp="layer", check_top=2, sizes=(3,))
    assert _edges(layered.edges.head(3)) == {("input", "attn0"), ("a0.h0", "mlp1"), ("m1", "logits")}
    units = result.edges[(result.edges.up_kind == "unit") & (result.edges.up_layer == 1)
                         & (result.edges.down == "logits")]["score"].sum()
    row = layered.edges[(layered.edges.upstream == "m1") & (layered.edges.down == "logits")].iloc[0]
    assert row.score == pytest.approx(units, rel=1e-5)
    assert 0.9 <= layered.curve[0]["faithfulness"] <= 1.2
