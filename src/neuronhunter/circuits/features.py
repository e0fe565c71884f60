"""Features judged like neurons: the model seen through a dictionary, scanned, hunted and explained.

A dictionary feature is a unit like a neuron, named ``blocks.L.mlp.hook_post.sae.F`` (:class:`FeatureSite`).
:class:`DictionaryModel` is the model seen through a dictionary: at ``blocks.L.mlp.hook_post`` of a layer with a
coder it hands every hook the *feature* activations ``f = encode(a)`` (``[batch, pos, n_features]``) instead of the
neurons ``a``; a hook that returns changed features ``f'`` changes the neurons to ``a + (f' - f) W_dec``: the
reconstruction error is kept, so an unchanged ``f'`` leaves the model exactly as it was. Everything that reads or
edits neurons through hooks — the scan (statistics, exemplars), the hunt (verdicts), the held-out explanation
pass, ablations — therefore works on features unchanged: the encoder is a transform of the captured activations,
not a copy of the scan loop. For a transcoder the features are computed from the MLP's input and an edit changes
the MLP's output.

A feature run names its model ``<model>+<kind>:<dictionary file>@<fingerprint>`` (:func:`feature_spec`) in its
``config.json`` and manifest, so a tool that loads the run's model by name gets the dictionary too
(:func:`load_feature_model`), and one that does not know the spec fails instead of reading neurons as features.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, RunDirError, SiteError
from ..models.hooked import HookedModel, Intervention
from ..models.sites import FeatureSite, Site
from .dictionary import KINDS, WEIGHTS, Dictionary

if TYPE_CHECKING:
    from ..hunt import HuntConfig, HuntResult

log = logging.getLogger(__name__)

_SPEC_RE = re.compile(r"^(?P<base>.+)\+(?P<kind>sae|transcoder):(?P<path>.+)@(?P<fp>[0-9a-f]{16})$")


class DictionaryModel(HookedModel):
    """``base`` seen through ``dictionary``: the units at ``blocks.L.mlp.hook_post`` are its features (see the
    module docstring). Only the dictionary's layers can be hooked there; ``d_mlp`` is the number of features."""

    def __init__(self, base: HookedModel, dictionary: Dictionary, spec: str | None = None) -> None:
        self.__dict__.update(base.__dict__)  # the same HF model, tokenizer, adapter and blocks
        self.base = base
        self.dictionary = dictionary.requires_grad_(False)
        self.d_neurons = base.d_mlp
        self.d_mlp = dictionary.n_features
        self.name = spec or f"{base.name}+{dictionary.kind}"
        self.info = {**base.info, "dictionary": {"kind": dictionary.kind, "layers": dictionary.layers,
                                                 "n_features": dictionary.n_features, "k": dictionary.k,
                                                 "fingerprint": dictionary.fingerprint()},
                     "unit_site": f"blocks.{{layer}}.mlp.hook_post.{dictionary.kind}.{{unit}}"}
        expected = base.d_mlp if dictionary.kind == "sae" else base.d_model
        if dictionary.d_in != expected:
            raise ConfigError(f"the dictionary reads {dictionary.d_in} values, {base.name} has {expected} there: "
                              "it was trained on another model")

    def __repr__(self) -> str:
        return f"DictionaryModel({self.base!r}, {self.dictionary.kind}, features={self.d_mlp})"

    def check_site(self, site: Site | str) -> Site:
        site = super().check_site(site)
        if site.kind == "mlp.hook_post" and site.layer not in self.dictionary.coders:
            raise SiteError(f"layer {site.layer} has no dictionary (it has layers {self.dictionary.layers})")
        return site

    def check_layers(self, layers: Any) -> list[int]:
        out = super().check_layers(layers)
        missing = [x for x in out if x not in self.dictionary.coders]
        if missing:
            raise SiteError(f"layer {missing[0]} has no dictionary (it has layers {self.dictionary.layers})")
        return out

    def neuron_output_weights(self, layer: int) -> Tensor:
        """What each feature writes into the residual stream ``[n_features, d_model]``."""
        return self.dictionary.feature_writes(layer, self.base.neuron_output_weights(layer))

    def _attach(self, module: nn.Module, mode: str, site: Site, fns: list[Intervention]) -> Any:
        if site.kind != "mlp.hook_post":
            return super()._attach(module, mode, site, fns)
        dic, layer = self.dictionary, site.layer
        w_dec = dic.coder(layer).W_dec

        def run(f: Tensor) -> Tensor | None:
            changed = None
            for fn in fns:
                out = fn(f if changed is None else changed, site)
                if out is not None:
                    changed = out
            return changed

        if dic.kind == "sae":
            def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                act = args[0] if args else kwargs["hidden_states"]
                f = dic.features(layer, act)
                new = run(f)
                if new is None:
                    return None
                act = act + ((new - f) @ w_dec).to(act.dtype)
                return ((act, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": act})

            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return _TranscoderHooks(self.module(layer, self.adapter.mlp), dic, layer, run)


class _TranscoderHooks:
    """A transcoder's features read the MLP's input and an edit of them changes the MLP's output (one handle that
    removes both hooks)."""

    def __init__(self, mlp: nn.Module, dic: Dictionary, layer: int, run: Callable[[Tensor], Tensor | None]) -> None:
        seen: dict[str, Tensor] = {}
        w_dec = dic.coder(layer).W_dec

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["x"] = args[0] if args else kwargs["hidden_states"]

        def post(_m: nn.Module, _args: tuple, output: Any) -> Any:
            f = dic.features(layer, seen.pop("x"))
            new = run(f)
            if new is None:
                return None
            out = output[0] if isinstance(output, tuple) else output
            out = out + ((new - f) @ w_dec).to(out.dtype)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        self.handles = [mlp.register_forward_pre_hook(pre, with_kwargs=True), mlp.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------- specs
def dictionary_file(path: str | Path) -> Path:
    """The weights file of a dictionary given as a features run folder or the file itself (absolute)."""
    path = Path(path).expanduser()
    path = path / WEIGHTS if path.is_dir() else path
    if not path.is_file():
        raise RunDirError(f"no dictionary at {path} (train one with `neuronhunter features train`)")
    return path.resolve()


def feature_spec(base: str, dictionary: Dictionary, path: str | Path) -> str:
    """The model name of a feature run: ``<base>+<kind>:<absolute weights file>@<fingerprint prefix>``."""
    return f"{base}+{dictionary.kind}:{dictionary_file(path)}@{dictionary.fingerprint()[:16]}"


def parse_feature_spec(spec: str) -> tuple[str, str, Path, str] | None:
    """``(base model, kind, weights file, fingerprint prefix)`` of a feature spec, or None for a plain model."""
    m = _SPEC_RE.match(spec or "")
    if not m:
        return None
    return m.group("base"), m.group("kind"), Path(m.group("path")), m.group("fp")


def load_feature_model(spec: str, *, model: HookedModel | None = None, device: str = "cpu",
                       dtype: str = "float32") -> DictionaryModel:
    """Load the model of a feature spec (:func:`feature_spec`) with its dictionary; refuse a dictionary file whose
    weights changed since the spec was written."""
    from ..models.loading import load_model

    parsed = parse_feature_spec(spec)
    if parsed is None:
        raise ConfigError(f"{spec!r} is not a feature model (expected MODEL+sae:FILE@FINGERPRINT)")
    base_name, _kind, path, fp = parsed
    dictionary = Dictionary.load(path)
    if not dictionary.fingerprint().startswith(fp):
        raise RunDirError(f"the dictionary {path} changed since this run was made (fingerprint {fp}...)")
    base = model if model is not None else load_model(base_name, device=device, dtype=dtype)
    return DictionaryModel(base, dictionary, spec)


def model_for_run(run: str | Path, *, model: HookedModel | None = None, device: str = "cpu") -> HookedModel:
    """The model a run was made with: its dictionary view for a feature run, else the plain model."""
    from ..io import read_json
    from ..models.loading import load_model

    config_path = Path(run) / "config.json"
    name = (read_json(config_path).get("model") if config_path.exists() else None) or "smollm2-135m"
    if parse_feature_spec(name) is not None:
        base = model.base if isinstance(model, DictionaryModel) else model
        return load_feature_model(name, model=base, device=device)
    return model if model is not None else load_model(name, device=device)


def unit_name(layer: int, unit: int, kind: str | None = None) -> str:
    """``blocks.L.mlp.hook_post.N`` for a neuron, ``blocks.L.mlp.hook_post.sae.F`` for a feature."""
    site = Site.mlp_post(layer)
    return f"{site}.{unit}" if kind is None else str(FeatureSite(site, kind, unit))


# ---------------------------------------------------------------------------------------------------- scan
@dataclass
class FeatureScanResult:
    hunt: HuntResult
    out: Path | None
    spec: str


def run_feature_scan(dictionary: str | Path, cfg: HuntConfig, *, model: HookedModel | None = None,
                     progress: Callable[[int, int | None], None] | None = None, overwrite: bool = False,
                     resume: bool = False) -> FeatureScanResult:
    """The hunt (one streaming scan: statistics, exemplars; then verdicts) over the features of ``dictionary``.

    ``cfg`` is a hunt configuration; its ``model`` is the base model (replaced by the feature spec in what the run
    records) and its ``layers`` default to the dictionary's layers.
    """
    from ..hunt import run_hunt
    from ..models.loading import load_model
    from ..runfolder import updating

    path = dictionary_file(dictionary)
    dic = Dictionary.load(path, cfg.layers)
    base_name = cfg.model
    if parse_feature_spec(base_name) is not None:
        base_name = parse_feature_spec(base_name)[0]  # type: ignore[index]
    trained_on = dic.meta.get("model")
    if trained_on and trained_on != base_name and not (model is not None and model.name == trained_on):
        log.warning("the dictionary was trained on %s, the scan runs %s", trained_on, base_name)
    spec = feature_spec(base_name, dic, path)
    hcfg = cfg.model_copy(update={"model": spec, "layers": dic.layers})
    from ..hunt import check_out

    check_out(hcfg.out, overwrite=overwrite, resume=resume)
    if isinstance(model, DictionaryModel):
        model = model.base
    if model is None:
        model = load_model(base_name, device=cfg.device, dtype=cfg.dtype)
    view = DictionaryModel(model, dic, spec)
    result = run_hunt(hcfg, model=view, progress=progress, overwrite=overwrite, resume=resume)
    out = Path(hcfg.out)
    with updating(out) as manifest:
        manifest.setdefault("model", {})["neuron_site"] = view.info["unit_site"].replace("{unit}", "{neuron}")
        manifest["dictionary"] = {**view.info["dictionary"], "file": str(path), "meta": dic.meta}
    return FeatureScanResult(result, out, spec)


def explain_features(run: str | Path, *, model: HookedModel | None = None,
                     progress: Callable[[int, int | None], None] | None = None, **options: Any) -> Any:
    """The held-out explanation scores (``neuronhunter explain``) of a feature run, with its dictionary loaded."""
    from ..judge.explain.pipeline import ExplainConfig, explain_run

    view = model_for_run(run, model=model)
    return explain_run(run, ExplainConfig(**options), model=view, progress=progress)


def neuron_split(dictionary: Dictionary, layer: int, neuron: int, *, top: int = 8) -> list[tuple[int, float]]:
    """The features that carry most of a neuron's activity: ``(feature, weight)`` with ``weight`` the neuron's
    entry in the feature's decoder row (the neuron's value per unit of feature activation), largest magnitude
    first."""
    if dictionary.kind != "sae":
        raise ConfigError("a neuron's split into features needs an SAE (a transcoder's features are not made of "
                          "neurons)")
    col = dictionary.coder(layer).W_dec.detach()[:, neuron]
    order = torch.argsort(col.abs(), descending=True)[:top]
    return [(int(i), float(col[i])) for i in order]


GOOD_R = 0.5  # the explain engine's default: an explanation with held-out simulation r >= 0.5 explains a unit


def compare_runs(neuron_run: str | Path, feature_run: str | Path, *, good_r: float = GOOD_R,
                 split_top: int = 4, max_splits: int = 5) -> dict[str, Any]:
    """Neurons against features at the same layers: verdict shares, share explained (held-out simulation
    ``r >= good_r`` when the runs were explained), the distribution of held-out scores, and polysemantic neurons
    split into the features that carry them (each with the feature run's verdict and claim).

    Units that never fired (verdict ``dead``) are counted in the verdict shares and left out of the score
    distributions (a dead unit has nothing to explain)."""
    import numpy as np

    from ..io import MANIFEST, read_json, read_table, require_run

    neuron_run, feature_run = require_run(neuron_run, "neurons.parquet"), require_run(feature_run, "neurons.parquet")
    spec = read_json(feature_run / "config.json").get("model", "") if (feature_run / "config.json").exists() else ""
    parsed = parse_feature_spec(spec)
    if parsed is None:
        raise ConfigError(f"{feature_run} is not a feature run (its model is {spec!r})")
    dic = Dictionary.load(parsed[2])
    neurons, features = read_table(neuron_run / "neurons.parquet"), read_table(feature_run / "neurons.parquet")
    layers = sorted(set(features["layer"]) & set(neurons["layer"]))
    if not layers:
        raise ConfigError(f"{neuron_run} and {feature_run} share no layer")
    neurons, features = neurons[neurons["layer"].isin(layers)], features[features["layer"].isin(layers)]

    def side(frame: Any, run: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"units": int(len(frame)), "run": str(run),
                               "tokens": read_json(run / MANIFEST).get("tokens")}
        if "verdict" in frame.columns:
            counts = frame["verdict"].value_counts()
            out["verdicts"] = {str(k): int(v) for k, v in counts.items()}
            out["share"] = {str(k): float(v / len(frame)) for k, v in counts.items()}
            alive = frame[frame["verdict"] != "dead"]
            out["alive"] = int(len(alive))
            out["share_of_alive"] = {str(k): float(v / max(len(alive), 1))
                                     for k, v in alive["verdict"].value_counts().items()}
        else:
            alive = frame
        if "explanation_r" in frame.columns:
            r = alive["explanation_r"].astype(float).dropna().to_numpy()
            out["scored"] = int(len(r))
            out["explained_share"] = float((r >= good_r).mean()) if len(r) else None
            out["explanation_r_quantiles"] = ({str(q): float(np.quantile(r, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
                                              if len(r) else None)
            hist, edges = np.histogram(r, bins=10, range=(-0.2, 1.0))
            out["explanation_r_histogram"] = {"edges": edges.tolist(), "counts": hist.tolist()}
            if "explanation_kind" in alive.columns:
                kinds = alive[alive["explanation_r"] >= good_r]["explanation_kind"].value_counts()
                out["explained_by_kind"] = {str(k): int(v) for k, v in kinds.items()}
        return out

    splits = []
    if dic.kind == "sae" and "verdict" in neurons.columns:
        poly = neurons[neurons["verdict"] == "polysemantic"]
        order = "max" if "max" in poly.columns else "neuron"
        fidx = features.set_index(["layer", "neuron"])
        for row in poly.sort_values(order, ascending=False).head(max_splits).itertuples():
            parts = []
            for f, w in neuron_split(dic, int(row.layer), int(row.neuron), top=split_top):
                info = fidx.loc[(int(row.layer), f)] if (int(row.layer), f) in fidx.index else None
                parts.append({"feature": f, "decoder_weight": w,
                              "verdict": None if info is None else info.get("verdict"),
                              "claim_category": None if info is None else info.get("claim_category"),
                              "explanation": None if info is None else info.get("explanation"),
                              "explanation_r": None if info is None else _float(info.get("explanation_r"))})
            splits.append({"layer": int(row.layer), "neuron": int(row.neuron),
                           "claim_categories": getattr(row, "claim_categories", None),
                           "explanation": getattr(row, "explanation", None),
                           "explanation_r": _float(getattr(row, "explanation_r", None)), "features": parts})
    return {"layers": layers, "good_r": good_r, "dictionary": {"kind": dic.kind, "n_features": dic.n_features,
                                                               "k": dic.k, "file": str(parsed[2])},
            "neurons": side(neurons, neuron_run), "features": side(features, feature_run), "splits": splits}


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if v != v else v


__all__ = ["KINDS", "DictionaryModel", "FeatureScanResult", "compare_runs", "dictionary_file", "explain_features",
           "feature_spec",
           "load_feature_model", "model_for_run", "neuron_split", "parse_feature_spec", "run_feature_scan",
           "unit_name"]
