"""Predictor + trainer on a tiny llama with a planted neuron (an indicator of the token " cat").

Every head type and unfreezing strategy must lower the validation loss; the predictor must recover the planted
neuron with near-perfect correlation; a run resumed from a checkpoint must end exactly where an uninterrupted
run ends.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neuronhunter.models.tiny import tiny_model
from neuronhunter.selfreport import (
    ActivationDatasetGenerator,
    ActivationPredictor,
    DatasetConfig,
    NeuronRef,
    PredictorConfig,
    PredictorTrainer,
    TargetCodec,
    TrainingConfig,
    plant_token_neuron,
    write_toy_corpus,
)
from neuronhunter.selfreport.evaluation import score

TARGET = NeuronRef(layer=0, neuron=3)


pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest


def planted_model():
    hm = tiny_model("llama", seed=0)
    plant_token_neuron(hm, layer=TARGET.layer, neuron=TARGET.neuron, token_ids=[hm.tokenizer.encode(" cat")[0]])
    return hm


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    corpus = write_toy_corpus(tmp_path_factory.mktemp("toy"), n_docs=10, words_per_doc=50, rate=0.3)
    cfg = DatasetConfig(corpus=str(corpus), max_tokens=500, context_length=24)
    return ActivationDatasetGenerator(planted_model(), cfg).generate([TARGET])[TARGET]


def build(ds, head, unfreeze, *, out=None, prompt="", **training):
    hm = planted_model()
    train, val = ds.tensors("train"), ds.tensors("val")
    pcfg = PredictorConfig(head=head, n_classes=2, binning="uniform", prompt=prompt)
    codec = TargetCodec.fit(train.target[train.selected].numpy(), pcfg.n_classes, pcfg.binning)
    predictor = ActivationPredictor(hm, TARGET, pcfg, codec, seed=0)
    defaults = {"unfreeze": unfreeze, "k": 1, "epochs": 2, "batch_size": 2 if head != "token" else 16,
                "lr": 1e-2, "body_lr": 5e-2 if head == "token" and unfreeze != "all" else 1e-2, "gradual_every": 3, "tensorboard": False, "patience": None}
    tcfg = TrainingConfig(**(defaults | training))
    return predictor, PredictorTrainer(predictor, train, val, tcfg, out_dir=out)


def test_planted_neuron_is_a_token_indicator(ds):
    df = ds.table[ds.table["position"] > 0]
    is_cat = df["token"] == " cat"
    assert 0.2 < is_cat.mean() < 0.4
    assert df[is_cat]["activation"].min() > 10 * df[~is_cat]["activation"].abs().max()


COMBOS = [(h, u) for h in ("regression", "classification", "token") for u in ("head", "last_k", "all", "gradual")
          if not (h == "token" and u == "head")]


@pytest.mark.parametrize(("head", "unfreeze"), COMBOS)
def test_every_head_and_strategy_lowers_the_loss(ds, head, unfreeze):
    predictor, trainer = build(ds, head, unfreeze, max_steps=12 if unfreeze == "all" else None)
    before, _ = trainer.evaluate()
    result = trainer.train()
    assert result.steps == trainer.total_steps > 0
    assert result.best_val_loss < 0.8 * before, (before, result.best_val_loss)
    trainable = {k for k, p in predictor.model.named_parameters() if p.requires_grad}
    if unfreeze == "head":
        assert not trainable
    elif unfreeze == "all":
        assert trainable == {k for k, _ in predictor.model.named_parameters()}
    else:
        assert trainable and all(".layers." in k or k.startswith("model.norm") for k in trainable)


@pytest.mark.parametrize(("head", "unfreeze"), [("regression", "last_k"), ("classification", "head"),
                                                 ("token", "last_k")])
def test_predictor_recovers_the_planted_neuron(ds, head, unfreeze):
    # the token head at body_lr 5e-2 for 3 epochs diverged for some seeds and CPUs (pearson 0.18-0.89 for seeds 1
    # and 3, 0.886 on CI's machine); 5 epochs at 2e-2 recovered the neuron (pearson 1.0) for seeds 0-3
    token = {"batch_size": 8, "epochs": 5, "body_lr": 2e-2}
    predictor, trainer = build(ds, head, unfreeze, **(token if head == "token" else {"epochs": 3}))
    trainer.train()
    test = ds.tensors("test")
    preds, _ = predictor.predict(test)
    y = test.target[test.selected].numpy()
    m = score(y, preds.score, preds.cls, predictor.codec)
    assert m["pearson"] > 0.95, m
    assert m["accuracy"] > 0.95, m
    if head == "token":
        assert (preds.free_cls >= 0).mean() > 0.95  # the model itself answers with a digit token


def test_gradual_unfreezing_schedule(ds):
    predictor, trainer = build(ds, "regression", "gradual", gradual_every=2)
    assert [trainer.unfrozen_at(s) for s in range(6)] == [0, 0, 1, 1, 2, 2]
    predictor, trainer = build(ds, "token", "gradual", gradual_every=2, gradual_max=1)
    assert [trainer.unfrozen_at(s) for s in range(4)] == [1, 1, 1, 1]


def test_gradient_accumulation_matches_a_bigger_batch(ds):
    _, t1 = build(ds, "regression", "last_k", batch_size=4, grad_accum=1, epochs=1, grad_clip=None)
    _, t2 = build(ds, "regression", "last_k", batch_size=2, grad_accum=2, epochs=1, grad_clip=None)
    t2.epoch_order = t1.epoch_order  # same item order; 2 x 2 micro-batches == one batch of 4
    r1, r2 = t1.train(), t2.train()
    assert r1.steps == r2.steps
    for k, p in t1.params.items():
        assert torch.allclose(p, t2.params[k], atol=1e-5), k


def test_early_stopping_restores_the_best_weights(ds):
    predictor, trainer = build(ds, "regression", "head", lr=0.5, epochs=8, eval_every=1, patience=2)
    result = trainer.train()
    vals = [r for r in result.history if r["split"] == "val"]
    assert result.best_val_loss == min(r["loss"] for r in vals)
    if result.stopped_early:
        assert result.steps < trainer.total_steps
    loss, _ = trainer.evaluate()
    assert loss == pytest.approx(result.best_val_loss, rel=1e-5)


@pytest.mark.parametrize(("head", "unfreeze"), [("regression", "gradual"), ("token", "last_k")])
def test_resume_from_checkpoint_gives_the_same_result(ds, tmp_path, head, unfreeze):
    kwargs = {"eval_every": 2, "epochs": 2}
    if head == "token":
        kwargs["max_steps"] = 8
    p_full, t_full = build(ds, head, unfreeze, out=tmp_path / "full", **kwargs)
    full = t_full.train()

    _, t_cut = build(ds, head, unfreeze, out=tmp_path / "cut", **kwargs)
    cut = t_cut.train(stop_after=3)
    assert cut.interrupted and cut.steps == 3
    assert (tmp_path / "cut" / "checkpoints" / "last.safetensors").is_file()
    assert json.loads((tmp_path / "cut" / "checkpoints" / "last.json").read_text())["step"] == 3

    p_res, t_res = build(ds, head, unfreeze, out=tmp_path / "cut", **kwargs)  # a fresh process, in effect
    res = t_res.train(resume=True)
    assert res.steps == full.steps and not res.interrupted
    assert res.best_step == full.best_step
    assert res.best_val_loss == full.best_val_loss
    for k, p in t_full.params.items():
        assert torch.equal(p, t_res.params[k]), k
    test = ds.tensors("test")
    a, _ = p_full.predict(test)
    b, _ = p_res.predict(test)
    assert np.array_equal(a.score, b.score)
    csv = (tmp_path / "cut" / "logs" / "metrics.csv").read_text().splitlines()
    assert len(csv) == len((tmp_path / "full" / "logs" / "metrics.csv").read_text().splitlines())


def test_checkpoints_and_logs_are_written(ds, tmp_path):
    _, trainer = build(ds, "regression", "last_k", out=tmp_path, tensorboard=True)
    trainer.train()
    assert (tmp_path / "checkpoints" / "best.safetensors").is_file()
    assert (tmp_path / "logs" / "metrics.csv").read_text().startswith("step,epoch,split,loss")
    assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoints" / "last.safetensors"))
    assert any(k.startswith("param/head.") for k in saved)
    assert any(k.startswith("param/model.model.layers.1.") for k in saved)
    assert not any(k.startswith("param/model.model.layers.0.") for k in saved)  # k=1: only the top block
    assert any(k.startswith("optim/") for k in saved)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_wandb_is_never_required(ds, tmp_path):
    pytest.importorskip("tensorboardX")
    _, trainer = build(ds, "regression", "head", out=tmp_path, wandb=True, epochs=1)
    trainer.train()  # wandb is not installed here: a warning, no error, no network
    assert (tmp_path / "logs" / "metrics.csv").is_file()


def test_head_features_are_read_at_the_read_layer(ds):
    hm = planted_model()
    test = ds.tensors("test")
    codec = TargetCodec.fit(np.array([0.0, 1.0]), 2)
    predictor = ActivationPredictor(hm, TARGET, PredictorConfig(read_layer=0), codec)
    from neuronhunter.models import Site

    feats = predictor.features(test.input_ids, test.attention_mask)
    _, cache = hm.run_with_cache(test.input_ids, test.attention_mask, sites=[Site.resid_post(0)])
    assert torch.allclose(feats, cache[Site.resid_post(0)], atol=1e-6)
    assert predictor.model_param_names(1) and all(".layers.0." in n for n in predictor.model_param_names(5))


def test_token_head_logits_equal_the_full_model(ds):
    hm = planted_model()
    test = ds.tensors("test")
    codec = TargetCodec.fit(np.array([0.0, 1.0, 2.0]), 3)
    predictor = ActivationPredictor(hm, TARGET, PredictorConfig(head="token", n_classes=3), codec)
    pairs = test.selected.nonzero()[:3]
    with torch.no_grad():
        logits = predictor._token_logits(test, pairs)
        w, t = pairs[0].tolist()
        ids = torch.cat([test.input_ids[w, : t + 1], predictor.prompt_ids])[None]
        full = hm.forward(ids)[0, -1]
    assert torch.allclose(logits[0], full, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_frozen_prefix_path_equals_a_full_forward(ds, family):
    hm = tiny_model(family, n_layers=3, seed=1)
    test = ds.tensors("test")
    codec = TargetCodec.fit(np.array([0.0, 1.0]), 2)
    predictor = ActivationPredictor(hm, TARGET, PredictorConfig(read_layer=2), codec)
    for start in (1, 2):
        assert predictor.check_prefix_path(test, start)
        states = predictor.prefix_states(test, start)
        fast = predictor.features_from(start, states, test.input_ids, test.attention_mask)
        full = predictor.features(test.input_ids, test.attention_mask)
        assert torch.allclose(fast, full, atol=1e-5)
    assert len(hm.blocks) == 3 and all(type(b).__name__ != "_Passthrough" for b in hm.blocks)


def test_training_with_and_without_the_prefix_cache_agree(ds):
    _, cached = build(ds, "regression", "last_k", epochs=1, grad_clip=None)
    _, full = build(ds, "regression", "last_k", epochs=1, grad_clip=None, cache_frozen=False)
    a, b = cached.train(), full.train()
    assert a.best_val_loss == pytest.approx(b.best_val_loss, rel=1e-3)
    for k, p in cached.params.items():
        assert torch.allclose(p, full.params[k], atol=1e-4), k
