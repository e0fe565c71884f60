"""End to end in a real browser: Debian's chromium driven by Playwright, against ``neuronhunter serve`` (a tiny
hunt run served by uvicorn on 127.0.0.1) and against the static ``neuronhunter browse`` pages opened from disk.

What a person does: open the index, search for a token, open a neuron, see its exemplars and histogram, type a
sentence and see its per-token activations (checked against a plain forward pass), compare two texts, steer,
follow a deep link, and see hostile corpus text (``<script>``, quotes) as text, never run as markup.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from playwright import sync_api  # the browser-tests extra (make test installs it)

from neuronhunter.serve.testing import HOSTILE, browser_args, chromium_path, make_runs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("browser"), planted=True)


@pytest.fixture(scope="module")
def server(runs):
    from neuronhunter.serve.app import create_app
    from neuronhunter.serve.server import ServerThread

    with ServerThread(create_app([runs["hunt"], runs["scan"]])) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=browser_args())
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.dialogs = []  # any alert() run by injected corpus text would land here
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    assert pg.dialogs == [] and pg.errors == []
    context.close()


def _examples(run, layer, neuron):
    ex = pd.read_parquet(run / "examples.parquet")
    return ex[(ex.layer == layer) & (ex.neuron == neuron)]


def _hostile_neuron(run):
    ex = pd.read_parquet(run / "examples.parquet")
    row = ex[(ex.kind == "top") & ex.context.str.contains("<script>", regex=False)].iloc[0]
    return int(row.layer), int(row.neuron)


# ------------------------------------------------------------------------------------------------- serve
def test_index_search_and_neuron_page(page, server, runs):
    page.goto(server + "/")
    assert page.locator("section.run").count() == 2
    champion = page.locator("p.champion a.neuron-link").first
    assert re.fullmatch(r"L\d+\.N\d+", champion.inner_text())
    # search a token from the header box, as a person would
    top = pd.read_parquet(runs["hunt"] / "examples.parquet")
    top = top[top.kind == "top"]
    token = top.token.str.strip().value_counts().index[0]
    want = {f"L{a}.N{b}" for a, b in top[top.token.str.strip().str.lower() == token.lower()][["layer", "neuron"]]
            .drop_duplicates().itertuples(index=False)}
    page.fill("header form.quick input[name=token]", token)
    page.press("header form.quick input[name=token]", "Enter")
    page.wait_for_url(re.compile(r"/search\?"))
    count = int(page.inner_text("#result-count").split()[0].replace(",", ""))
    assert count == len(want)
    shown = set(page.locator("#results a.neuron-link").all_inner_texts())
    assert shown <= want and len(shown) == min(len(want), 50)
    first = page.locator("#results a.neuron-link").first
    name = first.inner_text()
    first.click()
    page.wait_for_selector("#neuron-title")
    assert page.inner_text("#neuron-title").startswith(name)
    layer, neuron = (int(x) for x in re.findall(r"\d+", name))
    mine = _examples(runs["hunt"], layer, neuron)
    rows = page.locator("tr.exemplar")
    assert rows.count() == len(mine)
    best = mine[mine.kind == "top"].sort_values("rank").iloc[0]
    assert page.locator("table.exemplars[data-kind=top] mark.peak").first.inner_text() == best.token.replace("\n", "⏎")
    bins = len(pd.read_parquet(runs["hunt"] / "neurons.parquet")["hist"].iloc[0]) - 2
    assert page.locator("#histogram svg rect.bar").count() == bins
    assert page.locator("#histogram svg rect.flow").count() == 2  # under- and overflow


def test_live_activations_per_token_match_a_forward_pass(page, server, runs):
    import torch

    from neuronhunter.models.loading import load_model
    from neuronhunter.models.sites import Site

    page.goto(server + "/neurons/1/5?run=hunt")
    text = "The red fox ran across the green field."
    page.fill("#live-text", text)
    page.click("#live-run")
    page.wait_for_selector("#live-result .live-block")
    spans = page.locator("#live-result .live-text .tok")
    tokens = spans.all_inner_texts()
    values = [float(v) for v in spans.evaluate_all("els => els.map(e => e.dataset.activation)")]
    model = load_model(str(runs["model"]))
    ids = model.to_tokens(text)
    _, cache = model.run_with_cache(ids, sites=[Site.mlp_post(1)])
    want = cache[Site.mlp_post(1)][0, 1:, 5].float().numpy()  # the run prepends BOS; it is not shown
    assert "".join(tokens) == text and len(tokens) == len(want)
    assert np.allclose(values, want, atol=1e-5)
    assert page.locator("#live-result .bar-col").count() == len(want)
    # the strongest token has the tallest bar
    heights = page.locator("#live-result .bar-col .bar").evaluate_all("els => els.map(e => parseFloat(e.style.height))")
    assert int(np.argmax(heights)) == int(np.argmax(np.abs(want)))
    # compare two texts: two blocks, the second one's tokens are the second text's
    page.click("#compare summary")
    page.fill("#live-text-b", "A blue car stopped.")
    page.click("#live-run")
    page.locator("#live-result .live-block").nth(1).wait_for()  # (wait_for_function would need eval: CSP)
    second = page.locator("#live-result .live-block").nth(1).locator(".live-text .tok").all_inner_texts()
    assert "".join(second) == "A blue car stopped."
    # steering: the next-token tables appear
    page.fill("#steer-scale", "200")
    page.click("#steer-run")
    page.wait_for_selector("#steer-result table.steer")
    assert page.locator("#steer-result .steer-list").count() == 3
    assert torch.isfinite(torch.tensor(values)).all()


def test_deep_links_and_404(page, server):
    page.goto(server + "/neurons/0/7?run=hunt")
    assert page.inner_text("#neuron-title").startswith("L0.N7")
    assert page.locator("a.badge.claim").inner_text() == "color"  # the planted claim
    page.click("#next-neuron")
    page.wait_for_url(re.compile(r"/neurons/0/8"))
    page.fill("header form.jump input[name=layer]", "1")
    page.fill("header form.jump input[name=neuron]", "3")
    page.press("header form.jump input[name=neuron]", "Enter")
    page.wait_for_url(re.compile(r"/neurons/1/3\?run=hunt"))
    res = page.goto(server + "/neurons/9/0?run=hunt")
    assert res.status == 404 and "layer 9 is not in run 'hunt'" in page.inner_text("#error-message")


def test_hostile_corpus_text_is_shown_as_text(page, server, runs):
    layer, neuron = _hostile_neuron(runs["hunt"])
    page.goto(server + f"/neurons/{layer}/{neuron}?run=hunt")
    contexts = " ".join(page.locator("td.context").all_inner_texts())
    assert "<script>alert(1)</script>" in contexts and 'The "qu' in contexts
    assert page.locator("td.context img, td.context script").count() == 0
    assert page.locator("script").count() == 1  # only the page's own script file
    # typed hostile text comes back as text too
    page.fill("#live-text", HOSTILE)
    page.click("#live-run")
    page.wait_for_selector("#live-result .live-block")
    assert "".join(page.locator("#live-result .live-text .tok").all_inner_texts()) == HOSTILE
    assert page.locator("#live-result img").count() == 0
    # and in the search box
    page.goto(server + "/search?run=hunt&q=%3Cscript%3Ealert(3)%3C/script%3E")
    assert page.input_value("input[name=q]") == "<script>alert(3)</script>"


# ------------------------------------------------------------------------------------------------- browse
def test_static_browser_from_disk(page, runs, tmp_path):
    from neuronhunter.report.browser import build_browser

    index = build_browser(runs["hunt"], tmp_path / "web")
    page.goto(index.as_uri())
    page.wait_for_selector("#layers")
    assert page.locator("#layers a.layer-link").all_inner_texts() == ["0", "1"]
    # deep link to a neuron: its layer's data is loaded on demand
    layer, neuron = _hostile_neuron(runs["hunt"])
    page.goto(index.as_uri() + f"#L{layer}.N{neuron}")
    page.wait_for_selector("#neuron-title")
    assert page.inner_text("#neuron-title").startswith(f"L{layer}.N{neuron}")
    mine = _examples(runs["hunt"], layer, neuron)
    assert page.locator("#exemplars .example").count() == len(mine)
    text = " ".join(page.locator("#exemplars .example").all_inner_texts())
    assert "<script>alert(1)</" in text and page.locator("#exemplars img, #exemplars script").count() == 0
    bins = len(pd.read_parquet(runs["hunt"] / "neurons.parquet")["hist"].iloc[0]) - 2
    assert page.locator("#histogram svg rect.bar").count() == bins
    # search a token across layers from the header
    top = pd.read_parquet(runs["hunt"] / "examples.parquet")
    top = top[top.kind == "top"]
    token = top.token.str.strip().value_counts().index[0]
    want = top[top.token.str.strip().str.lower() == token.lower()][["layer", "neuron"]].drop_duplicates()
    page.fill("#search-token", token)
    page.press("#search-token", "Enter")
    page.wait_for_selector("#result-count")
    assert page.inner_text("#result-count").startswith(f"{len(want)} neurons")
    # a layer page lists every neuron; clicking one opens it
    page.goto(index.as_uri() + "#L1")
    page.wait_for_selector("#layer-table")
    assert page.locator("#layer-table tbody tr").count() == 128
    page.fill("#filter", "color")
    assert 0 < page.locator("#layer-table tbody tr").count() < 128
    page.goto(index.as_uri() + "#L7")
    assert "layer 7 is not in this browser" in page.inner_text("#error-message")
