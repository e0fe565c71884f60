"""The scan on Ray (a local Ray on 2 CPUs, a tiny model): the same tables as one process whatever the number of
workers, interrupted runs resume only their unfinished shards, killed workers are restarted."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch

from neuronhunter.config import ScanConfig
from neuronhunter.data.concepts import ConceptLabeller, load_lexicon
from neuronhunter.distributed import compare_runs
from neuronhunter.errors import RunDirError
from neuronhunter.hunt import CooccurrenceLabeller
from neuronhunter.scan import run_scan

ray = pytest.importorskip("ray", reason="the distributed extra is installed by make test")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture()
def corpus(tmp_path):
    """A folder of three JSONL files and a Parquet file (read from the file of a shard's first document on)."""
    import pandas as pd

    rng = random.Random(2)
    words = ("the river ran past the mill and the baker sold bread to a miller in spring while she sang of "
             "rain snow and sun def return class import self").split()
    texts = []
    for i in range(16):
        texts.append(" ".join(rng.choice(words) for _ in range(rng.choice([5, 40, 120, 260]))))
        if i % 6 == 0:
            texts.append(texts[-1])  # duplicated documents: exact ties between windows
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    for name, part in (("a.jsonl", texts[:5]), ("b/c.jsonl", texts[5:9]), ("b/d.jsonl", texts[9:12])):
        (folder / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    pd.DataFrame({"text": texts[12:]}).to_parquet(folder / "e.parquet")
    return folder


def Cooccurrence():  # noqa: N802 - the hunt's labeller, which counts label co-occurrence over what it labels
    return CooccurrenceLabeller(ConceptLabeller(load_lexicon(None)))


@contextlib.contextmanager
def torch_threads(n):
    """Compare with a one-process scan on as many torch threads as each worker has: CPU matrix kernels split their
    sums by thread, so the last float32 bit of an activation can depend on the thread count (in one process too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


def _config(corpus, out, **kw):
    return ScanConfig(model="tiny", corpus=str(corpus), out=str(out), context_length=24, batch_size=3, top_k=4,
                      compile_stats=False, **kw)


@pytest.mark.parametrize("workers", [1, 3])
def test_ray_scan_equals_one_process(tiny_llama, corpus, tmp_path, ray_session, workers):
    """1 or 3 workers (3 share the 2 CPUs), 7 shards, concept labels, a max_tokens cut inside a document, the train
    side of the split: neurons, examples and concepts tables equal the one-process scan's (exemplars to the last bit),
    and so do the labeller's co-occurrence counts, merged from the workers."""
    kw = dict(max_tokens=900, split="train", heldout_fraction=0.2)
    one_lab, ray_lab = Cooccurrence(), Cooccurrence()
    with torch_threads(2 // workers or 1):  # 2 CPUs: one worker has 2 threads, three have 1 each
        one = run_scan(_config(corpus, tmp_path / "one", **kw), model=tiny_llama, labeller=one_lab)
    res = run_scan(_config(corpus, tmp_path / "ray", engine="ray", workers=workers, shards=7, **kw),
                   model=tiny_llama, labeller=ray_lab)
    assert compare_runs(tmp_path / "one", tmp_path / "ray") == []
    assert res.state.tokens == one.state.tokens == 900
    assert np.array_equal(ray_lab.cooccurrence, one_lab.cooccurrence) and one_lab.cooccurrence.sum() > 0
    index = json.loads((tmp_path / "ray" / "shards" / "index.json").read_text())
    assert len(index["workers"]) == workers and len(index["shards"]) == 7
    assert sum(s["tokens"] for s in index["shards"].values()) == 900
    assert not list((tmp_path / "ray" / "shards").glob("shard-*"))  # merged: the shard states are gone
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text())["versions"]["engine"].startswith("ray ")
    starts = [s for s in index["starts"] if s]  # shards start reading at their first document's file
    assert {s[0] for s in starts} - {"a.jsonl"} and all(s[0] in {"a.jsonl", "b/c.jsonl", "b/d.jsonl", "e.parquet"}
                                                        for s in starts)


def test_interrupted_ray_scan_resumes_only_unfinished_shards(tiny_gpt2, corpus, tmp_path, ray_session):
    out = tmp_path / "run"
    cfg = _config(corpus, out, engine="ray", workers=2, shards=6)

    class Interrupt(Exception):
        pass

    def stop_after_two_shards(done, total):
        if len(list((tmp_path / ".run.partial" / "shards").glob("shard-*.json"))) >= 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_scan(cfg, model=tiny_gpt2, progress=stop_after_two_shards)
    partial = tmp_path / ".run.partial" / "shards"
    finished = {p.name for p in partial.glob("shard-*.json")}
    assert 2 <= len(finished) < 6 and not out.exists()
    # a changed corpus (or configuration) is refused, and the interrupted run is kept
    original = (corpus / "a.jsonl").read_text()
    (corpus / "a.jsonl").write_text(original.replace('"text": "', '"text": "changed ', 1))
    with pytest.raises(RunDirError, match="different corpus"):
        run_scan(cfg, model=tiny_gpt2, resume=True)
    (corpus / "a.jsonl").write_text(original)
    with pytest.raises(RunDirError, match="different configuration"):
        run_scan(cfg.model_copy(update={"top_k": 5}), model=tiny_gpt2, resume=True)
    with pytest.raises(RunDirError, match="engine ray"):
        run_scan(cfg.model_copy(update={"engine": "local"}), model=tiny_gpt2, resume=True)
    assert {p.name for p in partial.glob("shard-*.json")} == finished
    res = run_scan(cfg, model=tiny_gpt2, resume=True)
    assert res.timings["shards_resumed"] == len(finished)
    assert res.timings["shards_scanned"] == 6 - len(finished)
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["resumes"] == 1
    assert sorted(int(k) for k, s in index["shards"].items() if s.get("session") == 1) == sorted(
        set(range(6)) - {int(n[6:11]) for n in finished})
    with torch_threads(1):
        run_scan(_config(corpus, tmp_path / "one"), model=tiny_gpt2)
    assert compare_runs(tmp_path / "one", out) == []


def test_killed_worker_is_restarted_and_the_result_is_the_same(tiny_gpt2, corpus, tmp_path, ray_session):
    """SIGKILL the only worker while it scans: Ray restarts it and retries the shard; the tables do not change.
    (The shard states go to a store outside the run folder, in a folder of the run's own.)"""
    out = tmp_path / "run"
    cfg = _config(corpus, out, engine="ray", workers=1, shards=6, shard_store=str(tmp_path / "store"))
    result, errors = {}, []

    def scan():
        try:
            result["res"] = run_scan(cfg, model=tiny_gpt2)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=scan)
    thread.start()
    shards = tmp_path / ".run.partial" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "store").glob("*/shard-*.json")):
        time.sleep(0.05)
    pid = json.loads((shards / "index.json").read_text())["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    thread.join(600)
    assert not errors, errors
    index = json.loads((out / "shards" / "index.json").read_text())
    assert {s["pid"] for s in index["shards"].values()} - {pid}  # a restarted worker scanned the rest
    assert not list((tmp_path / "store").iterdir())  # merged: the run's shard states and folder are gone
    with torch_threads(2):
        run_scan(_config(corpus, tmp_path / "one"), model=tiny_gpt2)
    assert compare_runs(tmp_path / "one", out) == []


def test_hunt_on_ray_gives_the_same_verdicts(tiny_gpt2, corpus, tmp_path, ray_session):
    """The hunt shares the scan: with --engine ray its tables (verdicts included) and its label co-occurrence
    counts equal the one-process hunt's."""
    import pandas as pd

    from neuronhunter.hunt import HuntConfig, run_hunt

    kw = dict(model="tiny", corpus=str(corpus), context_length=24, batch_size=3, top_k=4, compile_stats=False)
    with torch_threads(1):
        run_hunt(HuntConfig(out=str(tmp_path / "one"), **kw), model=tiny_gpt2)
    run_hunt(HuntConfig(out=str(tmp_path / "ray"), engine="ray", workers=2, shards=5, **kw), model=tiny_gpt2)
    assert compare_runs(tmp_path / "one", tmp_path / "ray") == []
    a, b = (pd.read_parquet(tmp_path / r / "neurons.parquet") for r in ("one", "ray"))
    assert a["verdict"].tolist() == b["verdict"].tolist()
    info = [json.loads((tmp_path / r / "hunt.json").read_text()) for r in ("one", "ray")]
    assert info[0]["cooccurrence"] == info[1]["cooccurrence"] and np.sum(info[0]["cooccurrence"]) > 0


def test_explain_on_ray_scores_as_one_process(tmp_path, ray_session):
    """The explain pass shares the scan's engine: with --engine ray (2 workers, 5 shards) every candidate's held-out
    counts equal the one-process pass's, its scores agree to float64 rounding, and the same explanations win."""
    import pandas as pd
    import yaml

    from neuronhunter.judge.explain import ExplainConfig, explain_run
    from neuronhunter.judge.explain.planted import PLANTED_LEXICON, planted_model, write_planted_corpus

    corpus = write_planted_corpus(tmp_path / "corpus")
    lexicon = tmp_path / "lexicon.yaml"
    lexicon.write_text(yaml.safe_dump(PLANTED_LEXICON))
    model = planted_model(corpus)
    with torch_threads(1):
        run_scan(ScanConfig(model="planted", corpus=str(corpus), out=str(tmp_path / "run"), context_length=32,
                            batch_size=8, split="train", concepts=str(lexicon), compile_stats=False,
                            checkpoint_every=0), model=model)
        one = explain_run(tmp_path / "run", ExplainConfig(batch_size=8), model=model, write=False)
    ray_ = explain_run(tmp_path / "run", ExplainConfig(batch_size=8, engine="ray", workers=2, shards=5), model=model,
                       write=False)
    assert ray_.info["timings"]["ray_scan_s"] > 0 and ray_.state.tokens == one.state.tokens > 0
    assert ray_.state.corpus_fp == one.state.corpus_fp and ray_.state.fold_documents == one.state.fold_documents
    assert torch.equal(ray_.state.feature_counts, one.state.feature_counts)
    a, b = one.explanations, ray_.explanations
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 100
    for col in a.columns:
        if pd.api.types.is_float_dtype(a[col]):
            assert np.allclose(a[col], b[col], rtol=1e-9, atol=1e-12, equal_nan=True), col
        else:
            assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), col
    assert b["is_best"].sum() > 0
    assert not list((tmp_path / "run").glob(".explain-shards-*"))  # the pass's own folder is gone
