"""``neuronhunter explain`` end to end (in-process): a scan of the train side of a planted model's corpus, the
explain command, ``--show``, text explanations through an OpenAI-compatible endpoint, and bad input."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pandas as pd
import pytest
import yaml

from neuronhunter.cli.main import main
from neuronhunter.judge.explain.planted import NEURONS, PLANTED_LEXICON, planted_model, write_planted_corpus

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    corpus = write_planted_corpus(root / "corpus")
    model = planted_model(corpus)
    model.model.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    (root / "lexicon.yaml").write_text(yaml.safe_dump(PLANTED_LEXICON))
    common = ["--model", str(root / "model"), "--corpus", str(corpus), "--context-length", "32", "--batch-size", "8",
              "--no-compile", "--concepts", str(root / "lexicon.yaml")]
    assert main(["scan", *common, "--out", str(root / "run"), "--split", "train"]) == 0
    assert main(["scan", *common, "--out", str(root / "all"), "--max-tokens", "500"]) == 0
    return root


class FakeChat(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat endpoint: explains any neuron as "colour words" and simulates by scoring
    colour tokens 9, others 0 (what a perfect explainer/simulator of the token neuron would answer)."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChat.requests.append({"path": self.path, **body})
        prompt = body["messages"][-1]["content"]
        if "index<TAB>score" in prompt:
            lines = re.findall(r"^(\d+)\t(.*)$", prompt, flags=re.M)
            reply = "\n".join(f"{i}\t{9 if t.strip().lower() in ('red', 'blue', 'green') else 0}" for i, t in lines)
        else:
            reply = "colour words"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_explain_writes_tables_and_prints_summary(setup, endpoint, capsys):
    run = setup / "run"
    assert main(["explain", str(run), "--batch-size", "8", "--text-neurons", f"0.{NEURONS['token']}",
                 "--explainer", endpoint, "--explainer-model", "fake"]) == 0
    out = capsys.readouterr().out
    assert "Explained 64 neurons" in out and "Winning kinds" in out and "baseline_random" in out
    assert "colour words" in out
    table = pd.read_parquet(run / "explanations.parquet")
    text = table[table.kind == "text"]
    assert len(text) == 1 and text.explanation.iloc[0] == "colour words" and not text.is_best.iloc[0]
    assert text.simulation_r.iloc[0] > 0.9  # the fake simulator is exact for the token neuron
    details = pd.read_parquet(run / "explain" / "text.parquet")
    assert details.rule_r_same_tokens.iloc[0] > 0.9 and details.rule_kind.iloc[0] == "tokens"
    assert FakeChat.requests and all(r["path"] == "/v1/chat/completions" and r["model"] == "fake"
                                     for r in FakeChat.requests)
    neurons = pd.read_parquet(run / "neurons.parquet")
    assert neurons.set_index("neuron").loc[NEURONS["position"], "explanation"] == "window positions 5, 6"


def test_show_prints_one_neuron(setup, capsys):
    run = setup / "run"
    if not (run / "explanations.parquet").exists():
        assert main(["explain", str(run), "--batch-size", "8"]) == 0
        capsys.readouterr()
    assert main(["explain", str(run), "--show", f"0.{NEURONS['context']}"]) == 0
    out = capsys.readouterr().out
    assert '"cat" after "the"' in out and "Direction +" in out and "Train exemplars" in out and "hard-neg" in out


def test_bad_input_is_one_line(setup, capsys):
    cases = [
        (["explain", str(setup / "run"), "--show", "0.999"], "is not in"),
        (["explain", str(setup / "run"), "--show", "x"], "LAYER.NEURON"),
        (["explain", str(setup / "nothing")], "not found"),
        (["explain", str(setup / "all")], "no text is left"),
        (["explain", str(setup / "run"), "--explainer", "ftp://x", "--text", "1"], "http(s) URL"),
        (["explain", str(setup / "run"), "--high-fraction", "2"], "high_fraction"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
