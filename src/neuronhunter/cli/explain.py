"""CLI: ``explain`` — candidate explanations of every neuron, scored on held-out text; ``--show L.N`` prints one."""

from __future__ import annotations

from typing import Any

import typer

from .common import AddressOpt, EngineOpt, LazyProgress, ShardsOpt, WorkersOpt, console


def _fmt(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "–" if v != v else f"{v:.{digits}f}"


def print_summary(result: Any) -> None:
    """What the run now holds: counts, kinds that win, share explained, baselines side by side."""
    import numpy as np

    from ..judge.explain.summary import baseline_table, winning_kinds
    from .hunt import print_frame

    info, table, best = result.info, result.explanations, result.best
    scored = info["scored_on"]
    t = info["timings"]
    console.print(f"[bold]Explained[/] {len(best):,} neurons with {len(table):,} candidate explanations; scored on "
                  f"{scored['tokens']:,} held-out tokens ({scored['label']}, {scored['documents']} documents) in "
                  f"{t.get('heldout_s', 0):.0f} s ({t.get('heldout_tokens_per_s', 0):.0f} tok/s)")
    r = best["explanation_r"].to_numpy(dtype=float)
    ok = np.isfinite(r)
    console.print(f"Best explanation's held-out r (fold 1): median {np.median(r[ok]) if ok.any() else float('nan'):.3f}; "
                  f"r >= 0.5: {(r[ok] >= 0.5).mean() if ok.any() else 0:.1%}, r >= 0.7: "
                  f"{(r[ok] >= 0.7).mean() if ok.any() else 0:.1%} of {int(ok.sum()):,} neurons")
    print_frame(winning_kinds(best), "Winning kinds")
    print_frame(baseline_table(table), "Best explanation vs baselines (same neuron and direction, all held-out "
                                       "tokens; mean simulation r)")


def print_neuron(run: str, unit: str) -> None:
    """``--show L.N``: every explanation with its scores, then the train exemplars."""
    from rich.markup import escape

    from ..judge.explain.summary import neuron_report
    from ..judge.explain.text import parse_units
    from .hunt import print_frame, short_example

    layer, neuron = parse_units([unit])[0]
    rep = neuron_report(run, layer, neuron)
    head = rep["neuron"]
    console.print(f"[bold]L{layer}.N{neuron}[/]" + "".join(f"  {k} {escape(str(v))}" for k, v in head.items()))
    for direction in ("+", "-"):
        ex = rep["explanations"]
        ex = ex[ex["direction"] == direction]
        if not len(ex):
            continue
        shown = ex.assign(best=ex["is_best"].map({True: "*", False: ""}))[
            ["best", "kind", "explanation", "simulation_r", "detection_f1", "detection_auprc",
             "hard_negative_accuracy", "n_high", "n_heldout_tokens"]]
        label = "fires on (+, the activation)" if direction == "+" else "fires on (−, the negated activation)"
        print_frame(shown.rename(columns={"simulation_r": "r", "detection_f1": "F1", "detection_auprc": "AUPRC",
                                          "hard_negative_accuracy": "hard-neg acc", "n_heldout_tokens": "tokens"}),
                    f"Direction {direction}: {label}; * = best (chosen on held-out fold 0)")
    exemplars = rep["exemplars"]
    if len(exemplars):
        exemplars = exemplars.assign(context=exemplars["context"].map(lambda c: short_example(c, 70)))
        print_frame(exemplars, "Train exemplars (top = highest activations, bottom = most negative)")


def register(app: typer.Typer) -> None:
    """Add the ``explain`` command to app."""

    @app.command("explain")
    def explain(
        run: str = typer.Argument("runs/hunt", help="Run folder of a scan or hunt of the train side"),
        show: str = typer.Option(None, "--show", help="Print one neuron's explanations and exemplars, e.g. 20.882 "
                                 "(reads the run; computes nothing)"),
        corpus: str = typer.Option(None, "--corpus", "-c", help="Score on this corpus (all of it) [default: the "
                                   "held-out side of the run's corpus]"),
        max_tokens: int = typer.Option(None, help="Stop the held-out pass after this many tokens"),
        batch_size: int = typer.Option(None, help="Windows per batch [default: 16]"),
        text: int = typer.Option(None, "--text", help="Text explanations for this many sampled neurons [default: 0]"),
        text_neurons: str = typer.Option(None, help="Text explanations for these neurons, e.g. '20.882,5.3'"),
        explainer: str = typer.Option(None, help="'embedded' or an OpenAI-compatible endpoint URL "
                                      "(e.g. http://localhost:8080/v1) [default: embedded]"),
        explainer_model: str = typer.Option(None, help="Model name sent to the endpoint"),
        simulator: str = typer.Option(None, help="'embedded' or an endpoint URL [default: the explainer]"),
        high_fraction: float = typer.Option(None, help="High tokens: above this fraction of the neuron's median "
                                            "top-k peak (train) [default: 0.5]"),
        device: str = typer.Option(None, help="cpu, cuda, cuda:N or auto [default: cpu]"),
        engine: EngineOpt = None,
        workers: WorkersOpt = None,
        address: AddressOpt = None,
        shards: ShardsOpt = None,
        config: str = typer.Option(None, "--config", help="YAML/JSON file of explain options (options win)"),
    ) -> None:
        """Explain every neuron of RUN (tokens, context, category, position, domain, optional text) and score each
        explanation on held-out documents; writes explanations.parquet and best-explanation columns of
        neurons.parquet into RUN."""
        from ..config import load_config
        from ..judge.explain import ExplainConfig, explain_run

        if show is not None:
            print_neuron(run, show)
            return
        units = [u for u in text_neurons.split(",") if u.strip()] if text_neurons else None
        cfg = load_config(ExplainConfig, config, corpus=corpus, max_tokens=max_tokens, batch_size=batch_size,
                          text_neurons=text, text_units=units, explainer=explainer, explainer_model=explainer_model,
                          simulator=simulator, high_fraction=high_fraction, device=device, engine=engine,
                          workers=workers, ray_address=address, shards=shards)
        with LazyProgress("held-out pass") as progress:
            result = explain_run(run, cfg, progress=progress)
        print_summary(result)
        if result.text is not None and len(result.text):
            from .hunt import print_frame

            print_frame(result.text[["layer", "neuron", "direction", "explanation", "simulation_r",
                                     "rule_r_same_tokens", "rule_kind"]],
                        "Text explanations (r on held-out excerpts) vs the best rule on the same tokens")
        console.print(f"Wrote {run}/explanations.parquet and the explanation columns of {run}/neurons.parquet")
