"""Tiny models with planted structure: the ground truth of the dictionary, cluster and circuit tests.

* :func:`superposition_model`: layer 0's neuron 0 fires for two unrelated token sets (animals and colours: two
  features in one neuron); neuron 1 also fires on animals, neuron 2 on colours. A dictionary over the neurons should
  find one feature per set, each firing on one set only, both writing to neuron 0.
* :func:`cofiring_model`: two groups of layer-0 neurons each read one embedding direction (the neurons of a group
  fire together, on animals or on colours); every other neuron reads a direction of its own.
* :func:`planted_path_model`: a two-layer model whose answer logit difference is carried by one path, head
  ``(0, 0)`` -> neuron ``(1, 0)`` -> logits, while a decoy path (head ``(0, 1)`` -> neuron ``(1, 1)``) fires on the
  same input change but writes a direction the metric does not read. The other heads and neurons are silenced.

All start from :func:`neuronhunter.models.tiny.tiny_hf_model` (GPT-2 shaped, random weights, the real GPT-2
tokenizer) and edit weights in place; the token sets are single GPT-2 tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import Tensor

from ..models.hooked import HookedModel

ANIMALS = (" cat", " dog", " cow", " horse")
COLOURS = (" red", " blue", " green", " yellow")
FILLER = (" the", " a", " and", " of", " in", " to", " it", " was", " on", " with")


def _ids(model: HookedModel, words: tuple[str, ...]) -> list[int]:
    ids = [model.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    assert all(len(i) == 1 for i in ids), words
    return [i[0] for i in ids]


def _directions(d: int, n: int, seed: int) -> Tensor:
    """``n`` orthonormal directions of ``R^d`` with zero mean (LayerNorm centres its input)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, n, generator=g)
    m -= m.mean(0, keepdim=True)
    q, _ = torch.linalg.qr(m)
    q -= q.mean(0, keepdim=True)
    q, _ = torch.linalg.qr(q)
    return q.T.contiguous()  # [n, d]


def _plant_embeddings(model: HookedModel, groups: list[tuple[list[int], Tensor]], scale: float = 1.0) -> None:
    """Remove the planted directions from every embedding row, then add ``scale * direction`` to each group's
    tokens."""
    wte = model.model.get_input_embeddings().weight
    with torch.no_grad():
        dirs = torch.stack([d for _, d in groups])
        wte -= (wte @ dirs.T) @ dirs
        for ids, d in groups:
            wte[ids] += scale * d


def _gpt2(d_mlp: int, seed: int, n_layers: int = 2) -> HookedModel:
    from ..models.tiny import gpt2_tokenizer, tiny_hf_model

    model = tiny_hf_model("gpt2", n_layers=n_layers, d_model=64, n_heads=4, d_mlp=d_mlp, seed=seed)
    return HookedModel(model, gpt2_tokenizer(), name="planted", info={"source": "planted"})


def superposition_model(seed: int = 0) -> HookedModel:
    """Two features (animals, colours) in neuron 0 of layer 0 (see the module docstring)."""
    model = _gpt2(16, seed)
    u = _directions(64, 2, seed)
    _plant_embeddings(model, [(_ids(model, ANIMALS), u[0]), (_ids(model, COLOURS), u[1])])
    block = model.model.transformer.h[0]
    with torch.no_grad():
        block.attn.c_proj.weight.zero_()
        block.attn.c_proj.bias.zero_()
        w, b = block.mlp.c_fc.weight, block.mlp.c_fc.bias  # Conv1D: [d_model, d_mlp]
        w.zero_()
        b.fill_(-3.0)
        w[:, 0] = u[0] + u[1]  # polysemantic: both sets
        w[:, 1] = 0.6 * u[0]  # animals only
        w[:, 2] = 0.6 * u[1]  # colours only
    return model


def cofiring_model(seed: int = 0, group: int = 4) -> tuple[HookedModel, list[list[int]]]:
    """Layer-0 neurons in two groups that fire together (see the module docstring). Returns the model and the
    planted groups: ``[0, group)`` reads the animal direction, ``[group, 2 group)`` the colour direction; every
    other neuron reads a private direction that every token carries a random amount of."""
    d_mlp = 32
    model = _gpt2(d_mlp, seed)
    u = _directions(64, 2 + d_mlp, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        wte = model.model.get_input_embeddings().weight
        wte.normal_(0.0, 0.02, generator=g)
        wte += 0.3 * torch.randn(wte.shape[0], d_mlp, generator=g) @ u[2:]
        for ids, d in zip([_ids(model, ANIMALS), _ids(model, COLOURS)], u[:2], strict=True):
            wte[ids] += d
        block = model.model.transformer.h[0]
        block.attn.c_proj.weight.zero_()
        block.attn.c_proj.bias.zero_()
        w, b = block.mlp.c_fc.weight, block.mlp.c_fc.bias
        w.zero_()
        b.zero_()
        groups = [list(range(0, group)), list(range(group, 2 * group))]
        for n in range(d_mlp):
            w[:, n] = u[2 + n]
        for which, members in enumerate(groups):
            for n in members:
                w[:, n] = u[which] * (1.0 + 0.1 * n) + 0.05 * u[2 + n]
    return model, groups


def planted_path_model(seed: int = 0) -> HookedModel:
    """The answer is carried by head (0, 0) -> neuron (1, 0) -> logits; head (0, 1) -> neuron (1, 1) is a decoy that
    fires on the same change as strongly but writes a direction the logit difference does not read (see
    :func:`planted_task`). Every token carries a large shared background direction, so the LayerNorms stay in
    their near-linear regime (no planted write dominates a residual stream)."""
    model = _gpt2(32, seed)
    d, h = 64, 4
    dh = d // h
    u = _directions(d, 6, seed)  # 0: cue, 1: head 0 writes, 2: head 1 writes, 3: answer, 4: decoy out, 5: background
    cue, wrong_cue = _ids(model, (" cat",))[0], _ids(model, (" red",))[0]
    answer, wrong = _ids(model, (" yes",))[0], _ids(model, (" no",))[0]
    tr = model.model.transformer
    with torch.no_grad():
        wte = tr.wte.weight  # tied with the unembedding: the same rows write and read the planted directions
        wte -= (wte @ u.T) @ u
        wte += 3.0 * u[5]
        wte[cue] += u[0]
        wte[wrong_cue] -= u[0]
        wte[answer] += 0.5 * u[3]
        wte[wrong] -= 0.5 * u[3]
        for layer, block in enumerate(tr.h):
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
            block.mlp.c_fc.weight.zero_()
            block.mlp.c_fc.bias.fill_(-4.0)
            if layer == 0:
                qkv = block.attn.c_attn.weight  # [d, 3d]: q | k | v
                qkv[:, : 2 * d].zero_()  # every head attends uniformly
                block.attn.c_attn.bias.zero_()
                for head, out in ((0, u[1]), (1, u[2])):
                    v = torch.zeros(d, dh)
                    v[:, 0] = u[0]
                    qkv[:, 2 * d + head * dh: 2 * d + (head + 1) * dh] = v
                    block.attn.c_proj.weight[head * dh, :] = 4.0 * out
            else:
                block.mlp.c_fc.weight[:, 0] = 3.0 * u[1]
                block.mlp.c_fc.weight[:, 1] = 3.0 * u[2]
                block.mlp.c_fc.bias[0] = block.mlp.c_fc.bias[1] = -1.0
                block.mlp.c_proj.weight[0, :] = 0.15 * u[3]
                block.mlp.c_proj.weight[1, :] = 0.15 * u[4]  # as strong a write, in a direction no logit reads
    return model


def planted_task() -> list[dict[str, str]]:
    """Contrast pairs for :func:`planted_path_model`: the cue word (clean) or its opposite (corrupted) somewhere in
    a filler sentence; the answer is `` yes`` over `` no``."""
    rng = random.Random(0)
    pairs = []
    for _ in range(8):
        words = [rng.choice(FILLER) for _ in range(6)]
        at = rng.randrange(1, 5)
        clean = "".join(words[:at] + [" cat"] + words[at:]).strip()
        corrupted = "".join(words[:at] + [" red"] + words[at:]).strip()
        pairs.append({"clean": clean, "corrupted": corrupted, "answer": " yes", "wrong": " no"})
    return pairs


def write_corpus(path: str | Path, n_docs: int = 200, words: int = 60, seed: int = 0, *, varied: bool = False
                 ) -> Path:
    """A JSONL corpus of filler, animal and colour words (the planted models' tokens); ``varied``: the words of
    the bundled corpus instead of the filler, with animals and colours as one word in ten (many token types, so
    units that read unrelated directions do not correlate by chance)."""
    rng = random.Random(seed)
    vocab = list(ANIMALS + COLOURS + FILLER + FILLER)
    if varied:
        from ..data.corpus import Corpus

        pool = sorted({" " + w.strip(".,;:!?\"'()") for doc in Corpus(None) for w in doc.text.split()} - {" "})
        vocab = pool + list(ANIMALS + COLOURS) * max(1, len(pool) // 80)
    path = Path(path)
    path.write_text("\n".join(json.dumps({"text": "".join(rng.choice(vocab) for _ in range(words)).strip()})
                              for _ in range(n_docs)) + "\n", encoding="utf-8")
    return path
