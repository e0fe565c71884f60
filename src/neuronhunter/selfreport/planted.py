"""Planting a known neuron in a small model: ground truth for the self-report pipeline.

:func:`plant_token_neuron` edits weights so that neuron ``n`` of block ``layer`` becomes (almost exactly) an
indicator of the current token being one of ``token_ids``:

1. residual dimension ``dim`` is cleared in every token embedding (and position embedding), then set to ``scale``
   for the chosen tokens, so the stream carries a clean "is one of these tokens" feature;
2. the neuron's input weights read only that dimension (GELU MLPs: ``c_fc[:, n]``, bias ``-bias``; gated MLPs:
   gate and up rows), so its activation is large on those tokens and ~0 elsewhere (attention leaks only a little
   of the feature to other positions through random small weights).

A predictor that works must then recover the neuron with near-perfect correlation; tests rely on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import write_text
from ..models import HookedModel


@torch.no_grad()
def plant_token_neuron(hooked: HookedModel, *, layer: int, neuron: int, token_ids: Sequence[int], dim: int = 0,
                       scale: float = 1.0, gain: float = 2.0, bias: float = 1.0) -> None:
    """Make ``blocks.layer.mlp.hook_post[..., neuron]`` fire on ``token_ids`` (see the module docstring).

    Supported families: ``gpt2`` and Llama-style gated MLPs. Edits the model in place.
    """
    a = hooked.adapter
    model = hooked.model
    embed = model.get_submodule(a.embed).weight  # [vocab, d_model]
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    embed[:, dim] = 0.0
    embed[ids, dim] = scale
    if a.pos_embed is not None:
        model.get_submodule(a.pos_embed).weight[:, dim] = 0.0
    block = hooked.blocks[layer]
    if a.family == "gpt2":
        fc = block.get_submodule(a.mlp_in_proj)  # Conv1D, weight [d_model, d_mlp]
        fc.weight[:, neuron] = 0.0
        fc.weight[dim, neuron] = gain
        fc.bias[neuron] = -bias
    elif a.gated and a.mlp_up_proj is not None:
        gate = block.get_submodule(a.mlp_in_proj)  # Linear, weight [d_mlp, d_model]
        up = block.get_submodule(a.mlp_up_proj)
        gate.weight[neuron] = 0.0
        gate.weight[neuron, dim] = gain
        up.weight[neuron] = 0.0
        up.weight[neuron, dim] = 1.0
    else:
        raise ConfigError(f"planting a neuron is implemented for gpt2 and gated (llama) MLPs, not {a.family}")


TOY_WORDS = ("the", "dog", "sat", "on", "a", "mat", "while", "birds", "ran", "in", "park", "and", "sang", "of", "rain",
             "green", "hills", "under", "sun", "river")


def write_toy_corpus(folder: str | Path, *, n_docs: int = 12, words_per_doc: int = 120, planted_word: str = "cat",
                     rate: float = 0.3, seed: int = 0) -> Path:
    """Write ``n_docs`` small random-word documents (``NN.txt``) where ``planted_word`` has frequency ``rate``.

    Pairs with :func:`plant_token_neuron` on the token of ``" " + planted_word`` for ground-truth experiments.
    """
    import random

    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [planted_word if rng.random() < rate else rng.choice(TOY_WORDS) for _ in range(words_per_doc)]
        write_text(folder / f"{i:02d}.txt", " ".join(words) + "\n")
    return folder
