"""Sparse dictionaries: planted superposition is separated, the feature view equals an independent computation,
training resumes exactly, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

from neuronhunter.circuits.dictionary import Dictionary
from neuronhunter.circuits.features import (
    DictionaryModel,
    feature_spec,
    load_feature_model,
    neuron_split,
    parse_feature_spec,
    run_feature_scan,
)
from neuronhunter.circuits.planted import ANIMALS, COLOURS, FILLER, _ids, superposition_model, write_corpus
from neuronhunter.circuits.training import DictionaryConfig, train_dictionaries
from neuronhunter.errors import ConfigError, RunDirError, SiteError
from neuronhunter.models.sites import FeatureSite, Site

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _cfg(tmp, corpus, **kw):
    base = dict(model="planted", corpus=str(corpus), out=str(tmp / "dict"), layers=[0], n_features=8, k=1,
                train_tokens=12000, eval_tokens=2000, token_batch=128, shuffle_tokens=1024, context_length=64,
                batch_size=8)
    base.update(kw)
    return DictionaryConfig(**base)


@pytest.fixture(scope="module")
def planted():
    return superposition_model()


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sae")
    corpus = write_corpus(tmp / "corpus.jsonl")
    result = train_dictionaries(_cfg(tmp, corpus), model=planted)
    return result, tmp, corpus


def _acts(model, words):
    ids = torch.tensor([[50256, *_ids(model, words)]])
    _, cache = model.run_with_cache(ids, sites=[Site.mlp_post(0)], stop_at_layer=1)
    return cache[Site.mlp_post(0)][0, 1:]


def test_planted_superposition_is_split_into_two_monosemantic_features(planted, trained):
    result, _tmp, _corpus = trained
    dic = result.dictionary
    animals, colours, filler = _acts(planted, ANIMALS), _acts(planted, COLOURS), _acts(planted, FILLER)
    # the planted neuron 0 is polysemantic: it fires on both sets, hardly on filler
    assert animals[:, 0].min() > 3 and colours[:, 0].min() > 3 and filler[:, 0].max() < 0.5
    fa, fc = dic.features(0, animals), dic.features(0, colours)
    a_feat, c_feat = int(fa.mean(0).argmax()), int(fc.mean(0).argmax())
    assert a_feat != c_feat
    # each feature fires on its own set (every token) and not on the other
    assert fa[:, a_feat].min() > 2.0 and fc[:, c_feat].min() > 2.0
    assert fc[:, a_feat].max() < 0.1 * fa[:, a_feat].mean()
    assert fa[:, c_feat].max() < 0.1 * fc[:, c_feat].mean()
    # neuron 0's activity is carried by both features: both decoder rows write to it
    w = dic.coder(0).W_dec.detach()
    assert w[a_feat, 0] > 0.5 and w[c_feat, 0] > 0.5
    split = [f for f, _ in neuron_split(dic, 0, 0, top=3)]
    assert a_feat in split and c_feat in split
    m = result.metrics[0]
    assert m["fvu"] < 0.1
    assert m["loss_dictionary"] < m["loss_mean_ablated"] and m["loss_recovered"] > 0.5


def test_saved_dictionary_round_trips(trained):
    result, tmp, _ = trained
    loaded = Dictionary.load(tmp / "dict")
    assert loaded.fingerprint() == result.dictionary.fingerprint()
    assert loaded.kind == "sae" and loaded.layers == [0] and loaded.n_features == 8 and loaded.k == 1
    assert loaded.meta["train_tokens"] == result.summary["train"]["tokens"]
    with pytest.raises(ConfigError, match="no coder for layer 1"):
        Dictionary.load(tmp / "dict", layers=[1])
    (tmp / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RunDirError):
        Dictionary.load(tmp / "bad.safetensors")


def test_feature_view_equals_independent_computation(planted, trained):
    result, tmp, _ = trained
    dic = result.dictionary
    view = DictionaryModel(planted, dic)
    ids = torch.tensor([[50256, *_ids(planted, ANIMALS + COLOURS + FILLER)]])
    neurons = _acts(planted, ANIMALS + COLOURS + FILLER)
    # what the view hands a hook at the neuron site: the SAE's top-k code of the neurons, by hand
    w_enc, b_enc, b_dec = (dic.coder(0).encoder.weight, dic.coder(0).encoder.bias, dic.coder(0).b_dec)
    pre = torch.relu((neurons - b_dec) @ w_enc.T + b_enc)
    top = pre.topk(1, dim=-1)
    expected = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    _, cache = view.run_with_cache(ids, sites=[Site.mlp_post(0)], stop_at_layer=1)
    got = cache[Site.mlp_post(0)][0, 1:]
    assert got.shape == (len(neurons), 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # a hook that returns the features unchanged leaves the model exactly as it is
    plain = planted.forward(ids)
    with view.hooks({Site.mlp_post(0): lambda f, _s: f.clone()}):
        same = view.forward(ids)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    # ablating one feature moves the neurons by exactly its decoder row times its activation
    feat = int(expected[:4].mean(0).argmax())
    seen = {}

    def grab(act, _site):
        seen["a"] = act.detach().clone()

    def ablate(f, _site):
        f = f.clone()
        f[..., feat] = 0
        return f

    with view.hooks({Site.mlp_post(0): ablate}), planted.hooks({Site.mlp_post(0): grab}):
        view.forward(ids, stop_at_layer=1)
    delta = neurons - seen["a"][0, 1:]
    torch.testing.assert_close(delta, expected[:, feat:feat + 1] * dic.coder(0).W_dec[feat], atol=1e-5, rtol=1e-5)
    # features write through the decoder and the MLP's output weights
    torch.testing.assert_close(view.neuron_output_weights(0), dic.coder(0).W_dec @ planted.neuron_output_weights(0))
    with pytest.raises(SiteError, match="no dictionary"):
        view.check_site("blocks.1.mlp.hook_post")


def test_feature_spec_and_loading(planted, trained, tmp_path):
    result, tmp, _ = trained
    spec = feature_spec("planted", result.dictionary, tmp / "dict")
    base, kind, path, fp = parse_feature_spec(spec)
    assert (base, kind) == ("planted", "sae") and path.name == "weights.safetensors"
    assert result.dictionary.fingerprint().startswith(fp)
    assert parse_feature_spec("smollm2-135m") is None
    view = load_feature_model(spec, model=planted)
    assert view.d_mlp == 8 and view.d_neurons == 16
    assert str(FeatureSite.parse("blocks.0.mlp.hook_post.sae.5")) == "blocks.0.mlp.hook_post.sae.5"
    changed = Dictionary.load(tmp / "dict")
    with torch.no_grad():
        changed.coder(0).b_dec += 1.0
    changed.save(tmp_path / "weights.safetensors")
    moved = spec.replace(str(path), str(tmp_path / "weights.safetensors"))
    with pytest.raises(RunDirError, match="changed"):
        load_feature_model(moved, model=planted)


def test_feature_scan_ranks_the_animal_feature_on_animals(planted, trained, tmp_path):
    from neuronhunter.hunt import HuntConfig
    from neuronhunter.io import read_json, read_table

    result, tmp, corpus = trained
    cats = {"animal": {"words": [w.strip() for w in ANIMALS]}, "colour": {"words": [w.strip() for w in COLOURS]}}
    cfg = HuntConfig(model="planted", corpus=str(corpus), out=str(tmp_path / "fscan"), categories=cats,
                     context_length=64, batch_size=8, max_tokens=4000, compile_stats=False)
    run_feature_scan(tmp / "dict", cfg, model=planted)
    neurons = read_table(tmp_path / "fscan" / "neurons.parquet")
    assert len(neurons) == 8  # one row per feature
    examples = read_table(tmp_path / "fscan" / "examples.parquet")
    a_feat = int(result.dictionary.features(0, _acts(planted, ANIMALS)).mean(0).argmax())
    top = examples[(examples.neuron == a_feat) & (examples.kind == "top")]
    assert len(top) and set(top.token) <= set(ANIMALS)
    manifest = read_json(tmp_path / "fscan" / "manifest.json")
    assert manifest["model"]["neuron_site"] == "blocks.{layer}.mlp.hook_post.sae.{neuron}"
    assert manifest["dictionary"]["fingerprint"] == result.dictionary.fingerprint()
    assert parse_feature_spec(read_json(tmp_path / "fscan" / "config.json")["model"]) is not None


def test_training_resumes_exactly(planted, trained, tmp_path):
    _, _, corpus = trained
    small = dict(train_tokens=1500, epochs=2, eval_tokens=500, shuffle_tokens=512, token_batch=128,
                 checkpoint_every=1)
    whole = train_dictionaries(_cfg(tmp_path, corpus, out=str(tmp_path / "whole"), **small), model=planted)
    calls = {"n": 0}

    def interrupt(done, total):
        calls["n"] += 1
        if done > 2000:  # in the second pass
            raise KeyboardInterrupt

    cfg = _cfg(tmp_path, corpus, out=str(tmp_path / "cut"), **small)
    with pytest.raises(KeyboardInterrupt):
        train_dictionaries(cfg, model=planted, progress=interrupt)
    assert (tmp_path / ".cut.partial" / "checkpoints" / "train.safetensors").exists()
    with pytest.raises(RunDirError, match="different configuration"):
        train_dictionaries(cfg.model_copy(update={"k": 2}), model=planted, resume=True)
    resumed = train_dictionaries(cfg, model=planted, resume=True)
    assert resumed.summary["train"]["steps"] == whole.summary["train"]["steps"]
    for name, t in whole.dictionary.state_tensors().items():
        torch.testing.assert_close(resumed.dictionary.state_tensors()[name], t, atol=0, rtol=0)


def test_bad_options_are_one_line_errors(planted, tmp_path):
    with pytest.raises(ValueError):
        DictionaryConfig(layers=[])
    with pytest.raises(ValueError):
        DictionaryConfig(layers=[0], kind="pca")
    with pytest.raises(SiteError):
        train_dictionaries(DictionaryConfig(layers=[7], out=str(tmp_path / "x"), corpus=None), model=planted)


def test_load_model_understands_a_feature_runs_model(planted, trained, tmp_path):
    """Every command that loads a run's model by name (verify, serve's live view, ablate, ...) gets the feature view
    for a feature run: ``load_model`` reads ``BASE+sae:FILE@FP`` (here with the base model saved as a local folder)."""
    from neuronhunter.models import load_model

    result, tmp, _ = trained
    base_dir = tmp_path / "base"
    planted.model.save_pretrained(base_dir)
    planted.tokenizer.save_pretrained(base_dir)
    spec = feature_spec(str(base_dir), result.dictionary, tmp / "dict")
    view = load_model(spec)
    assert isinstance(view, DictionaryModel) and view.name == spec and view.d_neurons == 16
    reference = load_feature_model(spec, model=planted)
    ids = torch.tensor([[50256, *_ids(planted, ANIMALS[:3] + COLOURS[:3])]])
    site = Site.mlp_post(0)
    _, got = view.run_with_cache(ids, sites=[site], stop_at_layer=1)
    _, want = reference.run_with_cache(ids, sites=[site], stop_at_layer=1)
    torch.testing.assert_close(got[site], want[site])
    assert float(got[site].abs().max()) > 0  # the features do fire on these words
