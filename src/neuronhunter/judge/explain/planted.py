"""A tiny model with four planted neurons whose true rules are known: ground truth for the explanation tests.

:func:`planted_model` builds a one-layer GPT-2 (d_model 128, 4 heads of 32, 64 MLP neurons, real GPT-2 tokenizer)
and rewrites its weights so that the residual stream carries designed features and layer 0 holds:

==========  =====================================================================================================
neuron      rule
==========  =====================================================================================================
0 token     fires on ``red``, ``blue``, ``green`` (any case, any leading space) — *not* on ``yellow``, which the
            lexicon's colour category also lists
1 context   fires on ``cat`` only right after ``the`` (any case): a context rule, silent on ``a cat``, ``big cat``
2 position  fires at window positions 5 and 6, whatever the token
3 domain    fires on every token that occurs only in the ``shout`` documents (upper-case text), i.e. on the
            ``shout`` domain; case-normalised tokens cannot express it
==========  =====================================================================================================

Construction: the token embedding holds only feature dimensions (``the``, ``cat``, colour, shout) and the position
embedding one-hot positions 0-31 plus a constant pair ``(+4, -4)`` that fixes the layer norms' scale (so a feature
reads about 1.97 after either norm). Attention head 0 of layer 0 is a previous-token head: its query reads the
one-hot position ``i``, its key maps position ``j`` to ``j + 1`` (scores ~44 on the previous token, ~0 elsewhere),
its value reads the ``the`` feature and its output writes it into a *context* dimension. The MLP neurons read the
normalised features: ``gelu(g * (features - threshold))``. The other heads and the rest of attention are zeroed;
the other 60 MLP neurons stay random. :func:`write_planted_corpus` writes matching documents (``prose/`` in lower
case, ``shout/`` in upper case) and :data:`PLANTED_LEXICON` a small lexicon.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ...io import write_text
from ...models.hooked import HookedModel

WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "red", "blue", "green", "yellow", "big", "small", "ran",
         "park", "my", "and", "of", "in", "sun", "new", "old")
NEURONS = {"token": 0, "context": 1, "position": 2, "domain": 3}
COLOURS = ("red", "blue", "green")
POSITIONS = (5, 6)
PLANTED_LEXICON = {"categories": {
    "color": {"words": ["red", "blue", "green", "yellow"]},
    "animal": {"words": ["cat", "dog"]},
    "function": {"words": ["the", "a", "of", "and", "in", "on", "my"], "control": True},
}}

_POS_DIMS = 32
_CONST = (120, 121)
_THE, _CAT, _COLOUR, _SHOUT, _CTX = 64, 65, 66, 67, 80


def _ids_normalised_as(tokenizer: object, words: tuple[str, ...]) -> list[int]:
    from .features import normalise

    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])  # type: ignore[attr-defined]
    wanted = set(words)
    return [i for i, p in enumerate(pieces) if normalise(p) in wanted]


def _document(rng: random.Random, n_words: int, shout: bool) -> str:
    words: list[str] = []
    while len(words) < n_words:
        r = rng.random()
        if r < 0.06:
            words += ["the", "cat"]
        elif r < 0.2:
            words += [rng.choice(("a", "big", "my", "old")), "cat"]
        elif r < 0.28:
            words += ["the", rng.choice(("dog", "mat", "park", "sun"))]
        else:
            words.append(rng.choice(WORDS))
    text = " ".join(words) + ".\n"
    return text.upper() if shout else text


def write_planted_corpus(folder: str | Path, *, n_docs: int = 30, n_words: int = 90, seed: int = 0) -> Path:
    """Write ``prose/NN.txt`` (lower case) and ``shout/NN.txt`` (upper case) documents of random words, with
    ``the cat`` a quarter of the time ``cat`` occurs; their domains are the sub-folders."""
    rng = random.Random(seed)
    folder = Path(folder)
    for domain in ("prose", "shout"):
        for i in range(n_docs):
            write_text(folder / domain / f"{i:02d}.txt", _document(rng, n_words, domain == "shout"))
    return folder


@torch.no_grad()
def planted_model(corpus: str | Path | None = None, *, seed: int = 0) -> HookedModel:
    """The tiny model of the module docstring. ``corpus``: the folder of :func:`write_planted_corpus`, whose
    ``shout`` documents define the shout-only tokens (default: written into a temporary folder)."""
    import tempfile

    from ...data.batches import tokenize_document
    from ...data.corpus import Corpus
    from ...models.tiny import tiny_model

    hooked = tiny_model("gpt2", n_layers=1, d_model=128, n_heads=4, d_mlp=64, n_ctx=64, seed=seed)
    tok = hooked.tokenizer
    if corpus is None:
        corpus = write_planted_corpus(tempfile.mkdtemp(prefix="planted-"))
    seen: dict[str, set[int]] = {"prose": set(), "shout": set()}
    for doc in Corpus(str(corpus)):
        seen[doc.domain].update(tokenize_document(tok, doc.text)[0])
    shout_only = sorted(seen["shout"] - seen["prose"])
    model = hooked.model
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    wte.zero_()
    wpe.zero_()
    for dim, words in ((_THE, ("the",)), (_CAT, ("cat",)), (_COLOUR, COLOURS)):
        wte[_ids_normalised_as(tok, words), dim] = 1.0
    wte[shout_only, _SHOUT] = 1.0
    for p in range(_POS_DIMS):
        wpe[p, p] = 1.0
    wpe[:, _CONST[0]], wpe[:, _CONST[1]] = 4.0, -4.0
    block = model.transformer.h[0]
    attn = block.attn
    attn.c_attn.weight.zero_()
    attn.c_attn.bias.zero_()
    attn.c_proj.weight.zero_()
    attn.c_proj.bias.zero_()
    d = 128
    s = 8.0
    for m in range(_POS_DIMS):  # head 0: query = position one-hot, key = shifted one-hot (previous token)
        attn.c_attn.weight[m, m] = s
        if m >= 1:
            attn.c_attn.weight[m - 1, d + m] = s
    attn.c_attn.weight[_THE, 2 * d] = 1.0  # value: the "the" feature of the attended (previous) token
    attn.c_proj.weight[0, _CTX] = 0.5
    fc = block.mlp.c_fc
    g = 4.0
    for neuron, dims, thr in ((NEURONS["token"], (_COLOUR,), 1.0), (NEURONS["context"], (_CAT, _CTX), 3.0),
                              (NEURONS["position"], POSITIONS, 1.0), (NEURONS["domain"], (_SHOUT,), 1.0)):
        fc.weight[:, neuron] = 0.0
        fc.weight[list(dims), neuron] = g
        fc.bias[neuron] = -g * thr
    return hooked
