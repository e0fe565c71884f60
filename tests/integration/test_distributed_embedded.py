"""The Ray scan of the real embedded model equals the single-process scan (every layer, a small corpus)."""

from __future__ import annotations

import pytest
import torch

from neuronhunter.config import ScanConfig
from neuronhunter.distributed import compare_runs
from neuronhunter.scan import run_scan

ray = pytest.importorskip("ray", reason="the distributed extra is installed by make test")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_scan_of_the_embedded_model_equals_one_process(embedded, ray_session, tmp_path):
    """Two workers (each loads the model from its cache), five shards, a max_tokens cut inside a document, the
    train side of the split: the same tables as one process, to the last bit of every maximum and exemplar."""
    kw = dict(model="smollm2-135m", corpus="python-stdlib:json", max_tokens=1200, context_length=64, batch_size=4,
              top_k=5, split="train", formats=["parquet"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two workers on 2 CPUs (the last float32 bit can depend on it)
    try:
        one = run_scan(ScanConfig(out=str(tmp_path / "one"), **kw), model=embedded)
    finally:
        torch.set_num_threads(threads)
    ray_run = run_scan(ScanConfig(out=str(tmp_path / "ray"), engine="ray", workers=2, shards=5, **kw))
    assert ray_run.state.tokens == one.state.tokens == 1200
    assert len(one.state.layers) == embedded.n_layers
    assert compare_runs(tmp_path / "one", tmp_path / "ray") == []
    assert ray_run.timings["shards_scanned"] == 5
