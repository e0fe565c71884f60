"""Tiny run folders for the server's tests, benchmarks and screenshots (built offline in seconds).

:func:`make_runs` saves a tiny random GPT-2 model to a folder (so the server can load it lazily from the run's
``config.json``), hunts and scans a small corpus with it — one document of which is hostile HTML, to check that
pages show corpus text as text — and writes the run's logit attribution. :func:`plant_tables` adds *synthetic*
explanation and verification tables (and the future neurons columns ``direction`` and ``flags``) to a run, to
test that optional tables and columns appear; they are made-up data, for tests only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HOSTILE = ("<script>alert(1)</script> The \"quoted\" harbour & the 'single' ferry "
           "<img src=x onerror=alert(2)> sailed at dawn.")
DOCUMENTS = [
    "The red fox ran across the green field while a brown dog slept under the old oak tree.",
    "On Monday, 12 March 1999, the ferry left Lisbon for Porto with forty passengers on board.",
    "She ordered bread, cheese, olives and a cup of coffee at the small cafe near the station.",
    HOSTILE,
    "The blue car and the yellow bus stopped at the corner; a cat watched from the window.",
    "In Paris and Berlin people speak French and German; in Madrid they speak Spanish.",
    HOSTILE,
    "Seven horses and three cows grazed beside the river until the evening train passed by.",
]


def write_corpus(path: Path) -> Path:
    import json

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS), encoding="utf-8")
    return path


def make_runs(root: str | Path, *, family: str = "gpt2", logits: bool = True) -> dict[str, Path]:
    """A hunt run (layers 0 and 1) and a scan run (layer 1, one histogram range for every neuron, its edges in
    the manifest) of a tiny random model saved in ``root/model``; returns their paths and the model's."""
    from ..config import ScanConfig
    from ..hunt import HuntConfig, run_hunt
    from ..models.loading import load_model
    from ..models.tiny import save_tiny_model
    from ..scan import run_scan

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_model(root / "model", family)
    model = load_model(str(model_dir))
    corpus = write_corpus(root / "corpus.jsonl")
    common: dict[str, Any] = {"model": str(model_dir), "corpus": str(corpus), "context_length": 16, "top_k": 3,
                              "compile_stats": False, "checkpoint_every": 0}
    run_hunt(HuntConfig(out=str(root / "hunt"), layers=[0, 1], **common), model=model)
    run_scan(ScanConfig(out=str(root / "scan"), layers=[1], hist_range=(-2.0, 4.0), **common), model=model)
    if logits:
        from ..analysis.attribution import write_logits

        write_logits(root / "hunt", model, k=5)
    return {"hunt": root / "hunt", "scan": root / "scan", "model": model_dir}


def plant_tables(run: str | Path, neurons: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Add synthetic ``explanations`` and ``verification`` tables and ``direction``/``flags``/``explanation``
    columns of the neurons table to a run (for tests of optional tables; the values are made up)."""
    import pandas as pd

    from ..io import write_table

    run = Path(run)
    picked = neurons or [(1, 3), (1, 5), (0, 7)]
    frame = pd.read_parquet(run / "neurons.parquet")
    frame["direction"] = ["+" if i % 3 else "-" for i in range(len(frame))]
    frame["flags"] = [["low_count"] if i % 7 == 0 else [] for i in range(len(frame))]
    frame["explanation"] = None
    for layer, neuron in picked:
        at = (frame["layer"] == layer) & (frame["neuron"] == neuron)
        frame.loc[at, "explanation"] = f"planted explanation {layer}.{neuron}: <b>colour</b> words & \"names\""
    write_table(frame, run / "neurons")
    explanations = pd.DataFrame({
        "layer": [p[0] for p in picked], "neuron": [p[1] for p in picked],
        "explanation": [f"planted explanation {a}.{b}: <b>colour</b> words & \"names\"" for a, b in picked],
        "score_heldout": [0.5 + 0.1 * i for i in range(len(picked))],
    })
    write_table(explanations, run / "explanations")
    verification = pd.DataFrame({
        "layer": [p[0] for p in picked], "neuron": [p[1] for p in picked], "category": ["color"] * len(picked),
        "causal_effect": [0.01 * (i + 1) for i in range(len(picked))], "causal_z": [2.5 if i == 0 else 0.3 for i in range(len(picked))],
        "confirmed": [i == 0 for i in range(len(picked))],
    })
    write_table(verification, run / "verification")
    return {"neurons": picked, "explanations": explanations, "verification": verification}
