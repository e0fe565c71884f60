"""Tiny run folders for the server's tests, benchmarks and screenshots (built offline in seconds).

:func:`make_runs` saves a tiny random GPT-2 model to a folder (so the server can load it lazily from the run's
``config.json``), hunts and scans a small corpus with it — one document of which is hostile HTML, to check that
pages show corpus text as text — and writes the run's logit attribution. :func:`plant_tables` adds *synthetic*
explanation and claims tables (and the judgement columns ``direction``, ``flags``, ``claim_category``) to a run, to
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


CHROMIUM = "/usr/bin/chromium"  # Debian's package (make test installs it); NEURONHUNTER_CHROMIUM overrides
BROWSER_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run")


def chromium_path() -> str:
    """The chromium executable the browser tests and screenshots drive with Playwright (Playwright's own browser
    download is not used); a clear error when it is missing."""
    import os

    path = os.environ.get("NEURONHUNTER_CHROMIUM", CHROMIUM)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"no chromium at {path}: `apt-get install chromium` (make test does it as root) "
                                "or set NEURONHUNTER_CHROMIUM")
    return path


def browser_args() -> list[str]:
    """Chromium's command-line flags for headless runs here (no sandbox as root, no GPU, no network chatter)."""
    return list(BROWSER_ARGS)


def write_corpus(path: Path) -> Path:
    import json

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS), encoding="utf-8")
    return path


def make_runs(root: str | Path, *, family: str = "gpt2", logits: bool = True, planted: bool = False
              ) -> dict[str, Path]:
    """A hunt run (layers 0 and 1) and a scan run (layer 1, one histogram range for every neuron, its edges in
    the manifest) of a tiny random model saved in ``root/model``; returns their paths and the model's. With
    ``planted`` the hunt run also gets the synthetic tables of :func:`plant_tables`."""
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
    if planted:
        plant_tables(root / "hunt")
    return {"hunt": root / "hunt", "scan": root / "scan", "model": model_dir}


def plant_tables(run: str | Path, neurons: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Add synthetic ``explanations`` and ``claims`` tables and the judgement columns of the neurons table
    (``direction``, ``flags`` comma-joined, ``claim_category``, ``explanation``) to a run, shaped as the
    explain/verify/judge conventions describe them (for tests of optional tables; the values are made up)."""
    import pandas as pd

    from ..io import write_table

    run = Path(run)
    picked = neurons or [(1, 3), (1, 5), (0, 7)]
    text = "planted explanation {}.{}: <b>colour</b> words & \"names\""
    frame = pd.read_parquet(run / "neurons.parquet")
    frame["direction"] = ["+" if i % 3 else "-" for i in range(len(frame))]
    frame["flags"] = ["low_count,first_token" if i % 7 == 0 else None for i in range(len(frame))]
    frame["claim_category"] = None
    frame["explanation"] = None
    for layer, neuron in picked:
        at = (frame["layer"] == layer) & (frame["neuron"] == neuron)
        frame.loc[at, "explanation"] = text.format(layer, neuron)
        frame.loc[at, "claim_category"] = "color"
    write_table(frame, run / "neurons")
    explanations = pd.DataFrame({
        "layer": [p[0] for p in picked], "neuron": [p[1] for p in picked], "direction": ["+"] * len(picked),
        "explanation": [text.format(a, b) for a, b in picked],
        "f1_heldout": [0.5 + 0.1 * i for i in range(len(picked))], "scored_on": ["heldout"] * len(picked),
    })
    write_table(explanations, run / "explanations")
    claims = pd.DataFrame({
        "layer": [p[0] for p in picked], "neuron": [p[1] for p in picked], "direction": ["+"] * len(picked),
        "category": ["color"] * len(picked), "effect": [0.01 * (i + 1) for i in range(len(picked))],
        "z": [2.5 if i == 0 else 0.3 for i in range(len(picked))],
        "q_value": [0.01 if i == 0 else 0.6 for i in range(len(picked))],
        "confirmed": [i == 0 for i in range(len(picked))], "verified_on": ["heldout"] * len(picked),
    })
    write_table(claims, run / "claims")
    return {"neurons": picked, "explanations": explanations, "claims": claims}


SHOTS = ("index", "search", "neuron", "browse")


def screenshots(url: str, out: str | Path, *, run: str, layer: int, neuron: int, token: str, text: str,
                browse: Path | None = None, width: int = 1200) -> list[Path]:
    """PNG screenshots of the explorer's main pages at ``url`` (runs, a token search, a neuron page with its live
    panel run on ``text`` and steered) and, given ``browse`` (a ``browse`` index.html), of the static browser's
    neuron page; written to ``out`` (docs/img: ``serve-index.png`` ...), each cut to a readable height."""
    from playwright.sync_api import sync_playwright

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=browser_args())
        page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)
        page.set_default_timeout(600_000)

        def shot(name: str, height: int) -> None:
            path = out / f"{name}.png"
            page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": width, "height": height},
                            full_page=True)
            written.append(path)

        page.goto(f"{url}/?run={run}")
        shot("serve-index", 900)
        page.goto(f"{url}/search?run={run}&token={token}&sort=max")
        shot("serve-search", 760)
        page.goto(f"{url}/neurons/{layer}/{neuron}?run={run}")
        page.fill("#live-text", text)
        page.click("#live-run")
        page.wait_for_selector("#live-result .live-block")
        page.click("#steer-run")
        page.wait_for_selector("#steer-result table.steer")
        shot("serve-neuron", 1900)
        if browse is not None:
            page.goto(browse.resolve().as_uri() + f"#L{layer}.N{neuron}")
            page.wait_for_selector("#exemplars")
            shot("browse-neuron", 1100)
        browser.close()
    return written
