"""Co-activation statistics and neuron clusters: planted co-firing groups cluster, exact statistics equal numpy and
merge like one pass, the cross-layer sketch stays within its error, clusters ignore sign relabelling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronhunter.circuits.correlations import (
    Coactivation,
    CrossLayerSketch,
    clusters_of,
    coactivation_pass,
    correlate_run,
)
from neuronhunter.circuits.planted import ANIMALS, cofiring_model
from neuronhunter.config import ScanConfig
from neuronhunter.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def planted():
    return cofiring_model()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from neuronhunter.circuits.planted import write_corpus

    return str(write_corpus(tmp_path_factory.mktemp("corr") / "corpus.jsonl", n_docs=100, varied=True))


@pytest.fixture(scope="module")
def rows(planted, corpus):
    """Counted-token activations of layers 0 and 1 from plain hooks, with each token's window id and position."""
    from neuronhunter.circuits.training import scan_batches
    from neuronhunter.stats.tokens import counted_tokens

    model, _ = planted
    scfg = ScanConfig(model="planted", corpus=corpus, layers=[0, 1], max_tokens=6000, context_length=64,
                      batch_size=8)
    acts = {0: [], 1: []}
    wids, poss = [], []
    for _i, batch, _l in scan_batches(model, scfg):
        _, cache = model.run_with_cache(batch.input_ids, batch.attention_mask,
                                        sites=["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"], stop_at_layer=2)
        keep = counted_tokens(batch.attention_mask)
        b, p = torch.nonzero(keep, as_tuple=True)
        for layer in (0, 1):
            acts[layer].append(cache[next(s for s in cache if s.layer == layer)][keep])
        wids.append(batch.window_ids[b])
        poss.append(p)
    return scfg, {k: torch.cat(v) for k, v in acts.items()}, torch.cat(wids), torch.cat(poss)


def test_planted_cofiring_groups_are_the_clusters(planted, rows):
    model, groups = planted
    scfg, _, _, _ = rows
    res = coactivation_pass(model, scfg)
    found = clusters_of(res.correlations()[0], threshold=0.5)
    assert sorted(sorted(members) for members, _, _ in found) == sorted(groups)
    assert all(s == [1] * len(m) and r > 0.8 for m, s, r in found)


def test_exact_statistics_equal_numpy_and_merge_like_one_pass(planted, rows):
    model, _ = planted
    scfg, acts, _, _ = rows
    res = coactivation_pass(model, scfg)
    a = acts[0].double().numpy()
    np.testing.assert_allclose(res.exact[0].correlation().numpy(), np.corrcoef(a.T), atol=1e-9)
    assert res.tokens == a.shape[0]
    half = a.shape[0] // 2
    first, second = Coactivation(a.shape[1]), Coactivation(a.shape[1])
    first.update(torch.from_numpy(a[:half]))
    second.update(torch.from_numpy(a[half:]))
    merged = Coactivation.from_state_dict(first.state_dict()).merge(second)
    torch.testing.assert_close(merged.cross, res.exact[0].cross, rtol=1e-10, atol=1e-8)
    with pytest.raises(ConfigError):
        merged.merge(Coactivation(3))


def test_clusters_do_not_change_when_a_neuron_is_relabelled(planted, rows):
    _, groups = planted
    _, acts, _, _ = rows
    flip = torch.ones(acts[0].shape[1], dtype=torch.float64)
    flip[[1, 5]] = -1  # negate one neuron in each group (what negating up_proj row and down_proj column does)
    plain, relabelled = Coactivation(acts[0].shape[1]), Coactivation(acts[0].shape[1])
    plain.update(acts[0])
    relabelled.update(acts[0].double() * flip)
    a = clusters_of(plain.correlation(), 0.5)
    b = clusters_of(relabelled.correlation(), 0.5)
    assert [m for m, _, _ in a] == [m for m, _, _ in b]
    for (members, signs, _), (_, signs_b, _) in zip(a, b, strict=True):
        assert [s * int(flip[m]) for s, m in zip(signs, members, strict=True)] == signs_b


def test_cross_layer_sketch_estimates_correlations_within_its_error(rows):
    _, acts, wids, poss = rows
    d0, d1 = acts[0].shape[1], acts[1].shape[1]
    sk = CrossLayerSketch({0: d0, 1: d1}, buckets=1024)
    sk.update(acts, wids, poss)
    exact = Coactivation(d0 + d1)
    exact.update(torch.cat([acts[0], acts[1]], dim=1))
    r = exact.correlation()[:d0, d0:]
    z = sk.normalised().double()
    est = z[:, :d0].T @ z[:, d0:]
    ok = ~torch.isnan(r)
    err = (est - r)[ok].abs()
    assert err.mean() < 1.5 / np.sqrt(1024) and err.max() < 6 / np.sqrt(1024)
    # two shards (any split of the tokens) merge into the same sketch
    half = acts[0].shape[0] // 3
    a = CrossLayerSketch({0: d0, 1: d1}, buckets=1024)
    b = CrossLayerSketch({0: d0, 1: d1}, buckets=1024)
    a.update({k: v[:half] for k, v in acts.items()}, wids[:half], poss[:half])
    b.update({k: v[half:] for k, v in acts.items()}, wids[half:], poss[half:])
    torch.testing.assert_close(a.merge(b).sketch, sk.sketch, atol=1e-4, rtol=1e-5)


def test_correlate_run_writes_tables_with_shared_explanations(planted, corpus, tmp_path):
    from neuronhunter.io import read_json, read_table
    from neuronhunter.scan import run_scan

    model, groups = planted
    cfg = ScanConfig(model="planted", corpus=corpus, out=str(tmp_path / "run"), layers=[0, 1], max_tokens=5000,
                     context_length=64, batch_size=8, compile_stats=False)
    run_scan(cfg, model=model)
    table, clusters, summary = correlate_run(tmp_path / "run", model=model, max_tokens=5000, top=5, sketch_mb=0.25)
    assert (tmp_path / "run" / "correlations.parquet").exists() and (tmp_path / "run" / "clusters.parquet").exists()
    assert set(table["method"]) == {"exact", "sketch"}
    assert (table[table.method == "exact"].groupby(["layer", "neuron"]).size() == 5).all()
    layer0 = clusters[clusters.layer == 0]
    assert sorted(sorted(n) for n in layer0.neurons) == sorted(groups)
    animal = layer0[layer0.neurons.map(lambda n: 0 in list(n))].iloc[0]
    # the tokens most members' strongest exemplars share are animals
    assert animal.shared_tokens[0] in ANIMALS and animal.shared_token_share[0] == 1.0
    assert all(t in ANIMALS for t, s in zip(animal.shared_tokens, animal.shared_token_share, strict=True) if s >= 0.5)
    assert read_json(tmp_path / "run" / "manifest.json")["correlate"]["clusters"] == summary["clusters"]
    assert read_table(tmp_path / "run" / "clusters.parquet").shape[0] == len(clusters)
    with pytest.raises(ConfigError, match="not scanned"):
        correlate_run(tmp_path / "run", model=model, layers=[5])
