"""Shared fixtures: tiny random models for every architecture, and the real embedded model loaded once."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gpt2_tok():
    from neuronhunter.models.tiny import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session", params=["gpt2", "gpt_neox", "llama"])
def tiny_any(request):
    """A tiny random HookedModel of each supported architecture family."""
    from neuronhunter.models.tiny import tiny_model

    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from neuronhunter.models.tiny import tiny_model

    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    from neuronhunter.models.tiny import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_neox():
    from neuronhunter.models.tiny import tiny_model

    return tiny_model("gpt_neox")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M model, loaded once per test session (converted once per machine)."""
    from neuronhunter.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op torch thread for a module's duration, restored afterwards.

    Many small ops dominate these tests; on a shared 2-core machine two threads were several times slower.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def _plain_hooks(model, spec):
    """``spec``: key -> (module path, "in" | "out"); yields key -> tensor, filled by the next forward pass.

    Ground truth for the hook sites: plain ``register_forward_(pre_)hook`` on the HF modules, nothing of
    ``HookedModel``.
    """
    out, handles = {}, []
    for key, (path, mode) in spec.items():
        mod = model.get_submodule(path)
        if mode == "in":
            def pre(_m, args, kwargs, key=key):
                out[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(_m, _args, output, key=key):
                out[key] = (output[0] if isinstance(output, (tuple, list)) else output).detach().clone()
            handles.append(mod.register_forward_hook(post))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="session")
def plain_hooks():
    """The context manager ``plain_hooks(hf_model, spec)`` (see :func:`_plain_hooks`)."""
    return _plain_hooks
