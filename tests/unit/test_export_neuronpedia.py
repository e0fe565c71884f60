"""``neuronhunter export RUN --format neuronpedia``: a tiny hunt run written in Neuronpedia's export layout, read
back and checked against the layout's published schema (the field names and types of the records its importer
loads: features = Neuron, Activation, Explanation; the metadata files), and against independent computations:
every token value of an exemplar from a plain forward pass, the peak equal to the scan's recorded activation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from neuronhunter.cli.main import main
from neuronhunter.errors import ConfigError
from neuronhunter.report.neuronpedia import export_neuronpedia, slug
from neuronhunter.serve.testing import make_runs
from neuronhunter.stats.state import load_state

NUM, STR, BOOL, LIST, NONE = (int, float), str, bool, list, type(None)
# the published fields of each record (Neuronpedia's export layout / importer tables) and their JSON types
FEATURE = {"modelId": STR, "layer": STR, "index": STR, "creatorId": STR, "createdAt": STR, "maxActApprox": NUM,
           "hasVector": BOOL, "vector": LIST, "vectorLabel": (STR, NONE), "vectorDefaultSteerStrength": (*NUM, NONE),
           "hookName": (STR, NONE), "topkCosSimIndices": LIST, "topkCosSimValues": LIST,
           "neuron_alignment_indices": LIST, "neuron_alignment_values": LIST, "neuron_alignment_l1": LIST,
           "correlated_neurons_indices": LIST, "correlated_neurons_pearson": LIST, "correlated_neurons_l1": LIST,
           "correlated_features_indices": LIST, "correlated_features_pearson": LIST, "correlated_features_l1": LIST,
           "neg_str": LIST, "neg_values": LIST, "pos_str": LIST, "pos_values": LIST, "frac_nonzero": NUM,
           "freq_hist_data_bar_heights": LIST, "freq_hist_data_bar_values": LIST,
           "logits_hist_data_bar_heights": LIST, "logits_hist_data_bar_values": LIST, "decoder_weights_dist": LIST}
ACTIVATION = {"id": STR, "tokens": LIST, "index": STR, "layer": STR, "modelId": STR, "maxValue": NUM,
              "maxValueTokenIndex": int, "minValue": NUM, "values": LIST, "creatorId": STR,
              "dataSource": (STR, NONE), "dataIndex": (STR, NONE), "dfaValues": LIST, "dfaTargetIndex": (int, NONE),
              "dfaMaxValue": (*NUM, NONE), "createdAt": STR, "lossValues": LIST, "logitContributions": (STR, NONE),
              "binMin": (*NUM, NONE), "binMax": (*NUM, NONE), "binContains": (*NUM, NONE),
              "qualifyingTokenIndex": (int, NONE)}
EXPLANATION = {"id": STR, "modelId": STR, "layer": STR, "index": STR, "description": STR, "authorId": STR,
               "embedding": (LIST, NONE), "triggeredById": (STR, NONE), "typeName": (STR, NONE),
               "explanationModelName": (STR, NONE), "notes": (STR, NONE), "createdAt": STR}
SCORE = {"id": STR, "initiatedByUserId": STR, "value": NUM, "explanationId": STR, "explanationScoreTypeName": STR,
         "explanationScoreModelName": STR, "jsonDetails": STR, "createdAt": STR}
MODEL = {"id", "instruct", "creatorId", "displayNameShort", "displayName", "tlensId", "dimension", "visibility",
         "defaultSourceSetName", "defaultSourceId", "inferenceEnabled", "layers", "neuronsPerLayer", "createdAt",
         "owner", "updatedAt", "website"}
SOURCE = {"id", "modelId", "setName", "creatorId", "hasDashboards", "inferenceEnabled", "inferenceHosts",
          "saelensConfig", "saelensRelease", "saelensSaeId", "hfRepoId", "hfFolderId", "visibility",
          "defaultOfModelId", "hasUmap", "hasUmapLogSparsity", "hasUmapClusters", "num_prompts",
          "num_tokens_in_prompt", "dataset", "notes", "createdAt"}
SOURCESET = {"modelId", "name", "creatorId", "hasDashboards", "visibility", "description", "type", "creatorName",
             "urls", "creatorEmail", "releaseName", "defaultOfModelId", "defaultRange", "defaultShowBreaks",
             "showDfa", "showCorrelated", "showHeadAttribution", "showUmap", "createdAt"}
RELEASE = {"name", "description", "creatorName", "creatorId", "visibility", "isNewUi", "featured",
           "descriptionShort", "urls", "creatorEmail", "creatorNameShort", "defaultSourceSetName", "defaultSourceId",
           "defaultUmapSourceIds", "createdAt"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("np")
    paths = make_runs(root, planted=True)
    from neuronhunter.models.loading import load_model

    model = load_model(str(paths["model"]))
    out = export_neuronpedia(paths["hunt"], root / "np", examples=2, batch_size=50, layers_per_pass=1, model=model)
    return paths, out, model


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check(record: dict, schema: dict) -> None:
    assert set(record) == set(schema), set(record) ^ set(schema)
    for key, kind in schema.items():
        assert isinstance(record[key], kind), (key, record[key])


def test_layout_and_published_schema(exported):
    paths, out, model = exported
    assert out.name == "model"  # the model's id, from its folder's name
    sources = sorted(p.name for p in out.iterdir())
    assert sources == ["0-neuronhunter-mlp", "1-neuronhunter-mlp"]
    for source in sources:
        folder = out / source
        for name, fields in (("model", MODEL), ("source", SOURCE), ("sourceset", SOURCESET),
                             ("release", RELEASE)):
            lines = (folder / f"{name}.jsonl").read_text().splitlines()
            assert len(lines) == 1 and set(json.loads(lines[0])) == fields
        assert json.loads((folder / "source.jsonl").read_text())["id"] == source
        # 128 neurons in batches of 50: batch-0, batch-1, batch-2, every neuron once
        batches = sorted(p.name for p in (folder / "features").iterdir())
        assert batches == ["batch-0.jsonl.gz", "batch-1.jsonl.gz", "batch-2.jsonl.gz"]
        features = [r for b in batches for r in _read(folder / "features" / b)]
        assert [int(f["index"]) for f in features] == list(range(model.d_mlp))
        for f in features:
            _check(f, FEATURE)
            assert f["layer"] == source and f["modelId"] == "model"
        activations = [r for b in sorted((folder / "activations").iterdir()) for r in _read(b)]
        for a in activations:
            _check(a, ACTIVATION)
            assert len(a["values"]) == len(a["tokens"]) and a["maxValue"] == max(a["values"])
            assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"] and a["minValue"] == min(a["values"])
        assert len({a["id"] for a in activations}) == len(activations)


def test_values_are_the_models_and_peak_where_the_scan_saw_it(exported):
    import torch

    from neuronhunter.models.sites import Site

    paths, out, model = exported
    windows = load_state(paths["hunt"] / "stats.pt")[0].windows
    text = {int(w): tuple(model.to_str_tokens(v.ids[1:])) for w, v in windows.items()}  # BOS left out
    ex = pd.read_parquet(paths["hunt"] / "examples.parquet")
    ex = ex[ex["kind"].isin(["top", "band"]) & (ex["direction"] == "+") & (ex["rank"] < 2)]
    for layer in (0, 1):
        acts = [r for b in sorted((out / f"{layer}-neuronhunter-mlp" / "activations").iterdir()) for r in _read(b)]
        mine = ex[ex.layer == layer]
        assert len(acts) == len(mine)  # every chosen exemplar, none invented
        by = {(int(a["index"]), a["qualifyingTokenIndex"], tuple(a["tokens"])): a for a in acts}
        for rec in mine.itertuples():
            a = by[(int(rec.neuron), int(rec.window_pos) - 1, text[int(rec.window)])]
            # the value at the exemplar's token is the activation the scan recorded there
            assert a["values"][a["qualifyingTokenIndex"]] == pytest.approx(rec.activation, rel=1e-4, abs=1e-5)
            if rec.kind == "top" and rec.rank == 0:
                assert a["maxValue"] == pytest.approx(rec.activation, rel=1e-4, abs=1e-5)
        # one exemplar against a plain forward pass of its window (token ids from the scan's stats.pt)
        rec = mine.iloc[0]
        a = by[(int(rec.neuron), int(rec.window_pos) - 1, text[int(rec.window)])]
        ids = windows[int(rec.window)].ids
        _, cache = model.run_with_cache(torch.tensor([ids]), sites=[Site.mlp_post(layer)])
        want = cache[Site.mlp_post(layer)][0, 1:, int(rec.neuron)].numpy()  # BOS left out
        assert a["tokens"] == model.to_str_tokens(ids[1:]) and ids[0] == model.bos_token_id
        assert a["values"] == pytest.approx(want.tolist(), abs=1e-5)


def test_features_explanations_and_scores(exported):
    paths, out, _ = exported
    neurons = pd.read_parquet(paths["hunt"] / "neurons.parquet")
    logits = pd.read_parquet(paths["hunt"] / "logits.parquet")
    f = next(r for r in _read(out / "1-neuronhunter-mlp" / "features" / "batch-0.jsonl.gz") if r["index"] == "3")
    row = neurons[(neurons.layer == 1) & (neurons.neuron == 3)].iloc[0]
    assert f["maxActApprox"] == pytest.approx(row["max"]) and f["frac_nonzero"] == pytest.approx(row.frac_active)
    top = logits[(logits.layer == 1) & (logits.neuron == 3) & (logits.direction == "top")].sort_values("rank")
    assert f["pos_str"] == top.token.tolist() and f["pos_values"] == pytest.approx(top.value.tolist())
    assert sum(f["freq_hist_data_bar_heights"]) == sum(row["hist"][1:-1])
    assert len(f["freq_hist_data_bar_values"]) == len(row["hist"]) - 2
    planted = pd.read_parquet(paths["hunt"] / "explanations.parquet")
    exps = [r for p in sorted(out.glob("*/explanations/*.jsonl.gz")) for r in _read(p)]
    assert sorted((r["layer"], r["index"], r["description"]) for r in exps) == sorted(
        (f"{a}-neuronhunter-mlp", str(b), t) for a, b, t in zip(planted.layer, planted.neuron, planted.explanation,
                                                                strict=True))
    for r in exps:
        _check(r, EXPLANATION)
    scores = [r for p in sorted(out.glob("*/explanation-scores/*.jsonl.gz")) for r in _read(p)]
    for r in scores:
        _check(r, SCORE)
    assert sorted(r["value"] for r in scores) == pytest.approx(sorted(planted.f1_heldout))
    assert {r["explanationScoreTypeName"] for r in scores} == {"f1_heldout"}
    assert {r["explanationId"] for r in scores} == {r["id"] for r in exps}
    assert all("scored on heldout" in r["notes"] for r in exps)


def test_deterministic_and_bad_input(exported, tmp_path, capsys):
    paths, out, model = exported
    again = export_neuronpedia(paths["hunt"], tmp_path / "again", layers=[1], examples=2, batch_size=50,
                               model=model)
    first = {p.relative_to(out): p.read_bytes() for p in (out / "1-neuronhunter-mlp").rglob("*") if p.is_file()}
    second = {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()}
    assert first == second and len(first) > 10
    with pytest.raises(ConfigError, match="layer 5 is not in this run"):
        export_neuronpedia(paths["hunt"], tmp_path / "x", layers=[5], model=model)
    assert main(["export", str(paths["hunt"]), "--format", "neuronpedia", "--model-id", "Bad Id!",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--model-id must be" in capsys.readouterr().err
    assert slug("smollm2-135m") == "smollm2-135m" and slug("/a/b/SmolLM2_135M/") == "smollm2-135m"
    assert slug("HuggingFaceTB/SmolLM2-135M") == "smollm2-135m"


def test_cli(exported, tmp_path, capsys):
    paths, _, _ = exported
    assert main(["export", str(paths["hunt"]), "--format", "neuronpedia", "--layers", "1", "--examples", "1",
                 "--model-id", "tiny-gpt2", "--out", str(tmp_path / "np")]) == 0
    assert "batch-N.jsonl.gz" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "np" / "tiny-gpt2").iterdir()) == ["1-neuronhunter-mlp"]
