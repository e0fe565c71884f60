"""``neuronhunter serve``: the JSON API and the pages over real (tiny) run folders, served by uvicorn in a
background thread: runs, search, neuron details, live activations and steering, limits, errors, escaping of hostile
corpus text, security headers, and that a slow live request does not block page views."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pandas as pd
import pytest

from neuronhunter.cli.main import main
from neuronhunter.serve.app import create_app
from neuronhunter.serve.server import ServerThread
from neuronhunter.serve.testing import HOSTILE, make_runs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("serve"), planted=True)


@pytest.fixture(scope="module")
def server(runs):
    app = create_app([runs["hunt"], runs["scan"]], max_text=2000, max_body=8192)
    with ServerThread(app) as url:
        yield app, url


class Client:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            res = conn.getresponse()
            data = res.read()
            return res.status, {k.lower(): v for k, v in res.getheaders()}, data
        finally:
            conn.close()

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def json(self, path: str, expect: int = 200):
        status, headers, body = self.get(path)
        assert status == expect, (path, status, body[:300])
        assert headers["content-type"].startswith("application/json")
        return json.loads(body)

    def post(self, path: str, payload, expect: int | None = 200, raw: bytes | None = None, ctype="application/json"):
        body = raw if raw is not None else json.dumps(payload).encode()
        status, headers, data = self.request("POST", path, body=body, headers={"Content-Type": ctype})
        if expect is not None:
            assert status == expect, (path, status, data[:300])
        return status, json.loads(data) if headers.get("content-type", "").startswith("application/json") else data


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1])


def _neurons(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "neurons.parquet")


# ------------------------------------------------------------------------------------------------- runs and search
def test_runs_lists_every_run_with_layers_and_verdicts(client, runs):
    data = client.json("/api/runs")
    names = [r["name"] for r in data["runs"]]
    assert names == ["hunt", "scan"]
    hunt, scan = data["runs"]
    assert hunt["kind"] == "hunt" and hunt["layer_ids"] == [0, 1] and hunt["neurons"] == 256
    assert sum(hunt["verdicts"].values()) == 256
    assert hunt["verdicts"] == _neurons(runs["hunt"])["verdict"].value_counts().to_dict()
    assert hunt["champion"]["layer"] in (0, 1)
    assert {"logits", "explanations", "claims", "concepts"} <= set(hunt["tables"])
    assert scan["kind"] == "scan" and scan["layer_ids"] == [1] and scan["verdicts"] == {}


def test_search_filters_sort_and_pages(client, runs):
    frame = _neurons(runs["hunt"])
    data = client.json("/api/neurons?run=hunt&layer=1&sort=max&order=desc&per_page=20")
    assert data["total"] == 128 and data["pages"] == 7 and len(data["rows"]) == 20
    maxes = [r["max"] for r in data["rows"]]
    assert maxes == sorted(maxes, reverse=True) and maxes[0] == pytest.approx(frame[frame.layer == 1]["max"].max())
    seen = []
    for page in range(1, 8):
        seen += [(r["layer"], r["neuron"]) for r in
                 client.json(f"/api/neurons?run=hunt&layer=1&sort=mean&order=asc&per_page=20&page={page}")["rows"]]
    assert len(seen) == len(set(seen)) == 128  # every neuron once over all pages
    beyond = client.json("/api/neurons?run=hunt&layer=1&per_page=20&page=99")
    assert beyond["rows"] == [] and beyond["total"] == 128
    verdict = frame["verdict"].value_counts().index[0]
    data = client.json(f"/api/neurons?run=hunt&verdict={verdict}&per_page=200")
    assert data["total"] == int((frame.verdict == verdict).sum()) and {r["verdict"] for r in data["rows"]} == {verdict}
    ranged = client.json("/api/neurons?run=hunt&min_max=0.5&max_mean=0.1&per_page=200")
    expected = frame[(frame["max"] >= 0.5) & (frame["mean"] <= 0.1)]
    assert ranged["total"] == len(expected)


def test_search_by_token_category_and_text(client, runs):
    ex = pd.read_parquet(runs["hunt"] / "examples.parquet")
    top = ex[ex.kind == "top"]
    token = top["token"].str.strip().value_counts().index[0]
    want = {(int(a), int(b)) for a, b in top[top.token.str.strip().str.lower() == token.lower()][["layer", "neuron"]]
            .itertuples(index=False)}
    data = client.json(f"/api/neurons?run=hunt&token={quote(token.upper())}&per_page=200")
    assert {(r["layer"], r["neuron"]) for r in data["rows"]} == want and data["total"] == len(want)
    assert all(r["top_token"] is not None for r in data["rows"])
    frame = _neurons(runs["hunt"])
    # a category matches the claim's category or any of the hunt's responsive categories
    cats = frame["categories"].fillna("").str.split(r"[;,+]")
    claimed = frame["claim_category"].fillna("")
    for cat in ("color", "date"):
        want = {(int(r.layer), int(r.neuron)) for r, c, k in zip(frame.itertuples(), cats, claimed, strict=True)
                if cat in c or k == cat}
        data = client.json(f"/api/neurons?run=hunt&category={cat}&per_page=200")
        assert {(r["layer"], r["neuron"]) for r in data["rows"]} == want and data["total"] == len(want)
    text = client.json("/api/neurons?run=hunt&q=PLANTED%20explanation&per_page=200")
    assert {(r["layer"], r["neuron"]) for r in text["rows"]} == {(1, 3), (1, 5), (0, 7)}
    for flag in ("low_count", "first_token"):  # comma-joined flags
        flagged = client.json(f"/api/neurons?run=hunt&flag={flag}&per_page=200")
        assert flagged["total"] == len(frame[[i % 7 == 0 for i in range(len(frame))]])
    assert client.json("/api/neurons?run=hunt&flag=low&per_page=200")["total"] == 0  # whole flags only


def test_search_rejects_bad_parameters(client):
    for path, word in [("/api/neurons?run=hunt&sort=nope", "cannot sort by"), ("/api/neurons?run=hunt&order=up", "order"),
                       ("/api/neurons?run=hunt&per_page=5000", "per_page"), ("/api/neurons?run=hunt&layer=a", "layer"),
                       ("/api/neurons?run=scan&verdict=dead", "verdict"), ("/api/neurons?run=hunt&min_nope=1", "nope"),
                       ("/api/neurons?run=hunt&token=" + "x" * 300, "longer")]:
        data = client.json(path, expect=400)
        assert word in data["error"] and "Traceback" not in json.dumps(data)


# ------------------------------------------------------------------------------------------------- one neuron
def test_neuron_details_match_the_tables(client, runs):
    frame = _neurons(runs["hunt"])
    row = frame[(frame.layer == 1) & (frame.neuron == 3)].iloc[0]
    data = client.json("/api/neurons/1/3?run=hunt")
    assert data["stats"]["max"] == pytest.approx(row["max"]) and data["verdict"] == row["verdict"]
    assert data["stats"]["direction"] in ("+", "-") and data["direction"] == data["stats"]["direction"]
    assert data["claim"] == "color" and data["flags"] == (row["flags"].split(",") if isinstance(row["flags"], str) else [])
    assert "claim_category" in data["groups"]["verdict"] and "flags" in data["groups"]["verdict"]
    assert "explanation" in data["groups"]["explanation"] and "verdict" in data["groups"]["verdict"]
    hist = data["histogram"]
    assert len(hist["counts"]) == len(hist["edges"]) - 1 == len(row["hist"]) - 2
    assert hist["edges"][0] == pytest.approx(row["hist_lo"]) and hist["edges"][-1] == pytest.approx(row["hist_hi"])
    assert sum(hist["counts"]) + hist["underflow"] + hist["overflow"] == sum(row["hist"])
    ex = pd.read_parquet(runs["hunt"] / "examples.parquet")
    mine = ex[(ex.layer == 1) & (ex.neuron == 3)]
    assert len(data["examples"]) == len(mine)
    kinds = [e["kind"] for e in data["examples"]]
    assert kinds[0] == "top" and set(kinds) == set(mine.kind)
    first = data["examples"][0]
    assert first["left"] + "[[" + first["peak"] + "]]" + first["right"] == first["context"]
    logits = data["tables"]["logits"]
    assert {r["direction"] for r in logits} == {"top", "bottom"} and len(logits) == 10
    assert data["tables"]["explanations"][0]["f1_heldout"] == pytest.approx(0.5)
    assert data["tables"]["claims"][0]["confirmed"] is True and data["tables"]["claims"][0]["q_value"] == 0.01
    assert {r["category"] for r in data["tables"]["concepts"]} >= {"color", "unlabelled"}


def test_scan_run_histogram_edges_from_the_manifest(client, runs):
    # the scan run has one histogram range (hist_range) for every neuron; drop the per-neuron edges as older runs
    frame = _neurons(runs["scan"]).drop(columns=["hist_lo", "hist_hi"])
    frame.to_parquet(runs["scan"] / "neurons.parquet", index=False)
    data = client.json("/api/neurons/1/0?run=scan")
    edges = json.loads((runs["scan"] / "manifest.json").read_text())["hist_edges"]
    assert data["histogram"]["edges"] == pytest.approx(edges)
    assert len(data["histogram"]["counts"]) == len(edges) - 1 and data["verdict"] is None


def test_a_new_column_appears_without_a_restart(client, runs, tmp_path):
    frame = _neurons(runs["hunt"])
    frame["f1_score"] = np.linspace(0, 1, len(frame))
    time.sleep(0.01)
    frame.to_parquet(runs["hunt"] / "neurons.parquet", index=False)
    data = client.json("/api/neurons/0/2?run=hunt")
    assert "f1_score" in data["groups"]["detection"]
    assert data["stats"]["f1_score"] == pytest.approx(frame.loc[2, "f1_score"])
    assert client.json("/api/neurons?run=hunt&sort=f1_score&per_page=1")["rows"][0]["f1_score"] == pytest.approx(1.0)


def test_bad_layer_neuron_and_run_are_404_with_a_message(client):
    cases = [("/api/neurons/9/0?run=hunt", "layer 9 is not in run 'hunt' (its layers: 0..1)"),
             ("/api/neurons/0/128?run=hunt", "neuron 128 is not in layer 0 of run 'hunt' (its neurons: 0..127)"),
             ("/api/neurons/0/-1?run=hunt", "neuron -1 is not in layer 0"),
             ("/api/neurons/x/1?run=hunt", "layer must be a whole number"),
             ("/api/neurons/0/1?run=nope", "no run named 'nope'"),
             ("/api/neurons/0/1?run=" + quote("/etc"), "no run named '/etc'"),
             ("/api/nothing", "no page at /api/nothing")]
    for path, message in cases:
        data = client.json(path, expect=404)
        assert message in data["error"], (path, data)
    status, headers, body = client.get("/neurons/9/0?run=hunt")
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert b"layer 9 is not in run" in body and b"Traceback" not in body


# ------------------------------------------------------------------------------------------------- pages
def test_pages_render_and_escape_hostile_corpus_text(client, runs):
    status, headers, body = client.get("/")
    assert status == 200 and b"hunt" in body and b"Champion" in body
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    ex = pd.read_parquet(runs["hunt"] / "examples.parquet")
    hostile = ex[ex.context.str.contains("<script>", regex=False)].iloc[0]
    status, _, body = client.get(f"/neurons/{hostile.layer}/{hostile.neuron}?run=hunt")
    page = body.decode()
    assert status == 200
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/" in page or "&lt;script&gt;alert(1)" in page
    assert page.count("<script") == 1  # only the page's own script file
    status, _, body = client.get("/neurons/1/3?run=hunt")
    assert "<b>colour</b>" not in body.decode() and "&lt;b&gt;colour&lt;/b&gt; words &amp; &#34;names&#34;" in body.decode()
    status, _, body = client.get("/search?run=hunt&token=script&q=%3Cscript%3E")
    assert status == 200 and b"<script>alert" not in body and b'value="&lt;script&gt;"' in body
    status, headers, _ = client.get("/neuron?run=hunt&layer=1&neuron=4")
    assert status == 303 and headers["location"] == "/neurons/1/4?run=hunt"


def test_host_header_must_name_this_machine(client):
    status, _, body = client.get("/api/runs", headers={"Host": "evil.example:8000"})
    assert status == 400 and b"Host header refused" in body
    assert client.get("/api/runs", headers={"Host": f"localhost:{client.port}"})[0] == 200


# ------------------------------------------------------------------------------------------------- live
def test_live_activations_equal_a_direct_forward(client, runs):
    import torch

    from neuronhunter.models.loading import load_model
    from neuronhunter.models.sites import Site

    text = "The red fox ran across the green field."
    _, data = client.post("/api/activations", {"text": text, "layer": 1, "neuron": 5, "run": "hunt"})
    assert len(data["tokens"]) == len(data["activations"]) and "".join(data["tokens"]) == text
    model = load_model(str(runs["model"]))
    ids = model.to_tokens(text)
    _, cache = model.run_with_cache(ids, sites=[Site.mlp_post(1)])
    want = cache[Site.mlp_post(1)][0, 1:, 5].float().numpy()  # the BOS token is not returned
    assert np.allclose(data["activations"], want, atol=1e-5)
    assert data["prepend_bos"] is True and data["categories"] is not None and len(data["categories"]) == len(want)
    _, default = client.post("/api/activations", {"text": text, "layer": 1, "neuron": 5})  # the first run
    assert default["run"] == "hunt" and default["activations"] == data["activations"]
    # longer than a window: cut like the scan cuts documents, one value per token still
    long = " ".join([text] * 8)
    _, data = client.post("/api/activations", {"text": long, "layer": 0, "neuron": 1})
    assert len(data["tokens"]) == len(data["activations"]) == len(model.to_tokens(long, prepend_bos=False)[0])
    assert torch.isfinite(torch.tensor(data["activations"])).all()


def test_steering_changes_the_next_token_distribution(client):
    payload = {"text": "The red fox ran across the", "layer": 1, "neuron": 5, "run": "hunt"}
    _, none = client.post("/api/steer", {**payload, "scale": 0})
    assert none["kl"] == pytest.approx(0, abs=1e-6)
    assert [e["id"] for e in none["base"]] == [e["id"] for e in none["steered"]]
    _, strong = client.post("/api/steer", {**payload, "scale": 200, "top": 5})
    assert strong["kl"] > 1e-4 and len(strong["steered"]) == 5
    assert 0 < sum(e["steered"] for e in strong["steered"]) <= 1 + 1e-6
    assert strong["promoted"][0]["steered"] > strong["promoted"][0]["base"]


def test_live_request_limits_are_clear_4xx(client):
    ok = {"text": "hello there", "layer": 0, "neuron": 1, "run": "hunt"}
    cases = [
        ({**ok, "text": "x" * 2001}, 413, "limit is 2,000"),
        ({**ok, "text": "   "}, 422, "empty"),
        ({k: v for k, v in ok.items() if k != "text"}, 422, "'text' must be a string (missing)"),
        ({**ok, "layer": "0"}, 422, "'layer' must be an integer"),
        ({**ok, "layer": True}, 422, "'layer' must be an integer"),
        ({**ok, "layer": 7}, 404, "layer 7 is not in run 'hunt'"),
        ({**ok, "neuron": 4096}, 404, "neuron 4096 is not in layer 0"),
        ({**ok, "run": "../hunt"}, 404, "no run named '../hunt'"),
        ({**ok, "run": 3}, 422, "'run' must be the name"),
    ]
    for payload, status, message in cases:
        got, data = client.post("/api/activations", payload, expect=None)
        assert got == status and message in data["error"], (payload, got, data)
    got, data = client.post("/api/activations", None, expect=None, raw=b"x" * 9000)
    assert got == 413 and "larger than the limit of 8,192 bytes" in data["error"]
    got, data = client.post("/api/activations", None, expect=None, raw=b"{not json")
    assert got == 400 and "not valid JSON" in data["error"]
    got, data = client.post("/api/activations", None, expect=None, raw=b"[1, 2]")
    assert got == 400 and "JSON object" in data["error"]
    got, data = client.post("/api/activations", None, expect=None, raw=json.dumps(ok).encode(), ctype="text/plain")
    assert got == 415
    got, data = client.post("/api/steer", {**ok, "scale": 1e9}, expect=None)
    assert got == 422 and "'scale'" in data["error"]
    assert client.get("/api/activations")[0] == 405


def test_hostile_text_comes_back_as_data(client):
    _, data = client.post("/api/activations", {"text": HOSTILE, "layer": 0, "neuron": 0, "run": "hunt"})
    assert "".join(data["tokens"]) == HOSTILE


def test_a_slow_live_request_does_not_block_pages(server, client):
    app, _ = server
    release = threading.Event()
    blocker = app.state.live.start(release.wait, 30)  # occupies the model thread
    results = {}

    def live_call():
        results["live"] = client.post("/api/activations", {"text": "a red bus", "layer": 0, "neuron": 2})

    worker = threading.Thread(target=live_call)
    worker.start()
    try:
        time.sleep(0.2)
        t0 = time.perf_counter()
        for path in ("/", "/neurons/1/3?run=hunt", "/api/neurons/0/1?run=hunt", "/search?run=hunt&layer=0"):
            assert client.get(path)[0] == 200
        assert time.perf_counter() - t0 < 5
        assert "live" not in results  # still waiting for the model
        assert client.json("/api/health")["live_pending"] == 2
    finally:
        release.set()
    blocker.result(timeout=10)
    worker.join(timeout=60)
    assert results["live"][0] == 200


def test_too_many_waiting_live_requests_are_503(runs):
    app = create_app([runs["hunt"]], max_pending=1)
    release = threading.Event()
    live = app.state.live
    blocker = live.start(release.wait, 30)
    with ServerThread(app) as url:
        got, data = Client(url).post("/api/activations", {"text": "hi", "layer": 0, "neuron": 0}, expect=None)
        release.set()
    blocker.result(timeout=10)
    assert got == 503 and "busy" in data["error"]


def test_unloadable_model_is_a_503_with_a_message(runs, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(runs["scan"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"] = str(tmp_path / "no-such-model")
    (copy / "config.json").write_text(json.dumps(config))
    with ServerThread(create_app([copy])) as url:
        c = Client(url)
        got, data = c.post("/api/activations", {"text": "hi", "layer": 1, "neuron": 0}, expect=None)
        assert got == 503 and "cannot load the model" in data["error"] and "--model" in data["error"]
        assert c.json("/api/neurons/1/0")["layer"] == 1  # the tables still serve


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: run folder not found")
    assert main(["serve", str(runs["hunt"]), "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535" in capsys.readouterr().err
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", str(runs["hunt"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in err and "\n" not in err


def test_duplicate_folder_names_get_unique_run_names(runs, tmp_path):
    from neuronhunter.serve.runs import RunSet

    other = tmp_path / "x" / "hunt"
    shutil.copytree(runs["hunt"], other)
    assert [r.name for r in RunSet([runs["hunt"], other])] == ["hunt", "hunt-2"]
