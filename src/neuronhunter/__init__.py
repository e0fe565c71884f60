"""neuronhunter: neuron-level mechanistic interpretability of transformer language models.

The public API is re-exported here lazily (``import neuronhunter`` stays light; torch and transformers load when
a name is first used)::

    import neuronhunter as nh

    model = nh.load_model()                          # the embedded SmolLM2-135M-Instruct
    result = nh.run_scan(nh.ScanConfig(out="runs/scan", max_tokens=5000), model=model)
    logits, cache = model.run_with_cache(model.to_tokens("Hello"), sites=[nh.Site.mlp_post(3)])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "load_model": "neuronhunter.models.loading",
    "HookedModel": "neuronhunter.models.hooked",
    "Site": "neuronhunter.models.sites",
    "tiny_model": "neuronhunter.models.tiny",
    "ScanConfig": "neuronhunter.config",
    "run_scan": "neuronhunter.scan",
    "Scanner": "neuronhunter.scan",
    "ScanState": "neuronhunter.stats.state",
    "ScanResult": "neuronhunter.results",
    "Corpus": "neuronhunter.data.corpus",
    "ConceptLabeller": "neuronhunter.data.concepts",
    "LayerStats": "neuronhunter.stats.layer",
    "NeuronHunterError": "neuronhunter.errors",
    # the hunt
    "HuntConfig": "neuronhunter.hunt",
    "run_hunt": "neuronhunter.hunt",
    "rescore_run": "neuronhunter.hunt",
    "VerdictThresholds": "neuronhunter.judge.thresholds",
    "interpret_run": "neuronhunter.analysis.interpret",
    "compare_runs": "neuronhunter.analysis.interpret",
    "query": "neuronhunter.analysis.interpret",
    # verify and explain
    "ablation_effect": "neuronhunter.causal.interventions",
    "neuron_ablation": "neuronhunter.causal.interventions",
    "head_ablation": "neuronhunter.causal.interventions",
    "patching_sweep": "neuronhunter.causal.patching",
    "head_scores": "neuronhunter.analysis.heads",
    "induction_scores": "neuronhunter.analysis.heads",
    "linear_probes": "neuronhunter.analysis.probes",
    "sparse_probe": "neuronhunter.analysis.probes",
    "verify_run": "neuronhunter.causal.verification",
    "direct_logit_weights": "neuronhunter.analysis.attribution",
    "crs": "neuronhunter.analysis.metrics",
    # self-report
    "SelfReportConfig": "neuronhunter.selfreport",
    "run_selfreport": "neuronhunter.selfreport",
    # superposition lab
    "MonopolyConfig": "neuronhunter.toy",
    "run_monopoly": "neuronhunter.toy",
    "TMSConfig": "neuronhunter.toy",
    "run_tms": "neuronhunter.toy",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neuronhunter' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
