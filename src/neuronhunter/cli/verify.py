"""CLI commands: ``ablate``, ``verify``, ``patch``, ``logits`` — causal tests of neurons and heads."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError
from .common import console, parse_int_list, progress_bar


# ------------------------------------------------------------------------------------------------ shared helpers
def write_html(fig: Any, path: str | Path) -> Path:
    """Write a Plotly figure as self-contained offline HTML, atomically."""
    from ..io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return path


def resolve_run(run: str | None, model: str | None, corpus: str | None) -> dict[str, Any]:
    """Model/corpus/windowing from a run folder's config (when given), overridden by explicit options."""
    from ..causal.verification import run_settings

    if run is not None:
        s = run_settings(run)
    else:
        s = {"model": "smollm2-135m", "corpus": None, "context_length": 128, "prepend_bos": True,
             "lexicon": None, "labeller_options": {}}
    if model:
        s["model"] = model
    if corpus:
        s["corpus"] = corpus
    return s


def load(name: str, device: str) -> Any:
    from ..models import load_model

    with console.status(f"loading {name}..."):
        return load_model(name, device=device)


def parse_pairs(text: str | None, what: str) -> list[tuple[int, int]]:
    """``"3.5,10.2"`` -> ``[(3, 5), (10, 2)]``."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        bits = part.strip().split(".")
        if len(bits) != 2:
            raise ConfigError(f"{what} must look like 'LAYER.INDEX,LAYER.INDEX' (e.g. '5.3'), got {text!r}")
        try:
            out.append((int(bits[0]), int(bits[1])))
        except ValueError:
            raise ConfigError(f"{what} must be integers like '5.3', got {part!r}") from None
    return out


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if x != x else f"{x:.{digits}f}"


def _print_verification(results: Any, summary: dict[str, Any], alpha: float) -> None:
    from rich.table import Table

    data = summary.get("data", {})
    console.print(f"[bold]Causal verification[/] on {summary['verified_on']} ({data.get('documents', '?')} documents, "
                  f"{summary['n_tokens']:,} tokens), {summary['seconds']:.0f} s: {summary['confirmed']} of "
                  f"{summary['tested']} tested claims confirmed at q ≤ {alpha} ({summary['claims']} claims)")
    for group, v in summary["by_group"].items():
        console.print(f"  {group}: {v['confirmed']} of {v['tested']} tested confirmed ({v['claims']} claims; "
                      f"steering confirmed {v['steering_confirmed']})")
    for status, n in summary["not_tested"].items():
        console.print(f"  not tested: {n} ({status})")
    corr = summary.get("attribution_vs_exact") or {}
    if corr.get("pearson") is not None:
        console.print(f"  attribution patching vs exact ablation: Pearson {corr['pearson']:.3f}, Spearman "
                      f"{corr['spearman']:.3f} over {corr['n']:,} interventions")
    tested = results[results.p_value.notna()].sort_values(["q_value", "causal_effect"], ascending=[True, False])
    t = Table(title="Claims (best first; at most 25)")
    for col in ("neuron", "claim", "tokens", "effect", "per unit", "nulls", "p", "q", "confirmed", "steer p"):
        t.add_column(col, justify="right", overflow="ellipsis", max_width=30)
    for r in tested.head(25).itertuples():
        t.add_row(f"{r.layer}.{r.neuron}{r.direction}", r.claim, str(r.n_tokens), _fmt(r.causal_effect, 5),
                  _fmt(r.causal_per_unit, 4), f"{_fmt(r.null_neuron_mean, 5)} ({r.n_nulls})", _fmt(r.p_value, 4),
                  _fmt(r.q_value, 4), "[green]yes[/]" if r.causally_confirmed else "no", _fmt(r.steer_p, 3))
    console.print(t)


# ------------------------------------------------------------------------------------------------ commands
def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""

    @app.command("ablate")
    def ablate(
        run: str = typer.Argument(..., help="Run folder (model, corpus and concept lexicon come from its config)"),
        units: list[int] = typer.Argument(..., help="Neurons to ablate together: LAYER NEURON [LAYER NEURON ...]"),
        heads: str = typer.Option(None, help="Also ablate attention heads, e.g. '5.3,17.4'"),
        method: str = typer.Option("mean", help="zero, mean (over the corpus) or resample (from another window)"),
        model: str = typer.Option(None, "--model", "-m", help="Model [default: the run's model]"),
        corpus: str = typer.Option(None, "--corpus", "-c", help="Corpus [default: the run's corpus]"),
        concepts: str = typer.Option(None, help="Concept lexicon for per-category effects [default: the run's]"),
        max_tokens: int = typer.Option(2048, help="Corpus tokens to evaluate"),
        batch_size: int = typer.Option(8),
        align: str = typer.Option("input", help="A token is in a category by its input token, target or either"),
        top: int = typer.Option(20, help="Tokens with the largest log-probability change to show"),
        device: str = typer.Option("cpu"),
        out: str = typer.Option(None, "--out", "-o", help="Output folder [default: RUN/ablations/<neurons>]"),
    ) -> None:
        """Ablate neurons (and heads): effect on next-token loss overall, per category, and per token."""
        from ..causal.interventions import (
            ablation_effect,
            corpus_batches,
            group_units,
            load_concept_labeller,
            parse_units,
        )
        from ..io import require_run, write_json, write_table
        from ..report.figures_verify import ablation_figure

        require_run(run)
        neurons = parse_units(units)
        head_list = parse_pairs(heads, "--heads")
        s = resolve_run(run, model, corpus)
        m = load(s["model"], device)
        group_units(m, neurons, "mlp.hook_post")  # check ranges before the corpus work
        group_units(m, head_list, "attn.hook_z")
        labeller = load_concept_labeller(concepts or s["lexicon"], **s["labeller_options"])
        batches = corpus_batches(m, s["corpus"], context_length=s["context_length"], max_tokens=max_tokens,
                                 batch_size=batch_size, prepend_bos=s["prepend_bos"], labeller=labeller)
        with progress_bar() as progress:
            task = progress.add_task("ablating", total=2 * len(batches))
            eff = ablation_effect(m, batches, neurons=neurons, heads=head_list, method=method,
                                  categories=labeller.categories, progress=lambda: progress.advance(task))
        tag = "_".join(f"L{a}N{b}" for a, b in neurons) + "".join(f"_L{a}H{b}" for a, b in head_list)
        if len(tag) > 60:
            tag = tag[:40] + "_" + hashlib.sha1(tag.encode()).hexdigest()[:8]
        folder = Path(out) if out else Path(run) / "ablations" / f"{tag}_{method}"
        summary = {**eff.summary(), "method": method, "neurons": neurons, "heads": head_list, "align": align,
                   "model": s["model"], "corpus": s["corpus"] or "default"}
        by_cat = eff.by_category(align)
        top_tokens = eff.top_tokens(m.tokenizer, batches, k=top)
        write_table(by_cat, folder / "by_category", formats=("parquet", "csv"))
        write_table(top_tokens, folder / "top_tokens", formats=("parquet", "csv"))
        write_html(ablation_figure(by_cat, summary, tag), folder / "ablation.html")
        write_json(folder / "summary.json", summary)

        from rich.table import Table

        console.print(f"[bold]Ablating[/] {tag} ({method}) on {summary['n_tokens']:,} tokens: loss "
                      f"{summary['clean_loss']:.4f} → {summary['ablated_loss']:.4f} (Δ {summary['delta_loss']:+.5f} nats)")
        t = Table(title="Loss increase by category (tokens whose input token is in the category)")
        for col in ("category", "tokens", "clean", "ablated", "Δ category", "Δ other"):
            t.add_column(col, justify="right")
        for r in by_cat[by_cat.n_tokens > 0].itertuples():
            t.add_row(r.category, str(r.n_tokens), _fmt(r.clean_loss), _fmt(r.ablated_loss), _fmt(r.delta_loss, 5),
                      _fmt(r.delta_other, 5))
        console.print(t)
        t2 = Table(title=f"Tokens whose log-probability changed most (top {top})")
        for col in ("context", "next token", "clean logp", "ablated logp", "change"):
            t2.add_column(col, justify="right", overflow="ellipsis", max_width=40)
        for r in top_tokens.itertuples():
            t2.add_row(r.context.replace("\n", " "), repr(r.token), _fmt(r.clean_logprob, 3),
                       _fmt(r.ablated_logprob, 3), f"{r.logprob_change:+.4f}")
        console.print(t2)
        console.print(f"wrote {folder}")

    @app.command("verify")
    def verify(
        run: str = typer.Argument(None, help="A hunt run folder (its claims, model, corpus split and lexicon); "
                                  "optional with --claim, --corpus and --out"),
        claim: list[str] = typer.Option(None, "--claim", help="A claim to test, LAYER:NEURON[+|-]=WHAT with WHAT a "
                                        "category list (color / color,food), tokens:red|blue or explanation[:KIND]; "
                                        "repeatable"),
        claims_file: str = typer.Option(None, "--claims", help="A file of claims: one --claim spec per line, or a "
                                        "CSV/Parquet/JSONL table with layer, neuron, claim[, direction]"),
        hunt: bool = typer.Option(True, "--hunt/--no-hunt", help="Also test the run's own claims"),
        verdicts: str = typer.Option(None, help="Hunt verdicts whose claims are tested [default: "
                                     "monosemantic,polysemantic]"),
        corpus: str = typer.Option(None, "--corpus", "-c", help="Verify on this corpus instead of the held-out "
                                   "documents of the run's corpus"),
        n_nulls: int = typer.Option(None, help="Matched null neurons per claim [default: 50]"),
        max_nulls: int = typer.Option(None, help="Null neurons for claims that beat the first --n-nulls "
                                      "[default: 200]"),
        early_stop: int = typer.Option(None, help="Stop a claim's nulls at 10 or 20 once this many match it "
                                       "(Besag-Clifford; it could not be confirmed); 0: all --n-nulls [default: 5]"),
        max_claim_tokens: int = typer.Option(None, help="Held-out tokens tested per claim, a seeded sample "
                                             "[default: 16]"),
        min_tokens: int = typer.Option(None, help="Claims with fewer held-out tokens are not tested [default: 3]"),
        alpha: float = typer.Option(None, help="Confirmed when the Benjamini-Hochberg q-value is at most this "
                                    "[default: 0.05]"),
        steer: bool = typer.Option(None, "--steer/--no-steer", help="Run the steering check [default: yes]"),
        attribution: bool = typer.Option(None, "--attribution/--no-attribution", help="Attribution-patching "
                                         "screen and its correlation with exact effects [default: yes]"),
        max_tokens: int = typer.Option(None, help="Verification corpus tokens [default: 32768]"),
        config: str = typer.Option(None, "--config", help="YAML/JSON file with any VerifyConfig setting"),
        model: str = typer.Option(None, "--model", "-m", help="Model [default: the run's model]"),
        concepts: str = typer.Option(None, help="Concept lexicon [default: the run's]"),
        out: str = typer.Option(None, "--out", "-o", help="Write claims.parquet etc. here instead of into the run "
                                "(the run is then left unchanged)"),
        seed: int = typer.Option(None, help="Seed of token samples and permutation draws [default: 0]"),
        device: str = typer.Option("cpu"),
    ) -> None:
        """Test claims causally: held-out tokens, matched nulls, BH q-values, steering; writes claims.parquet."""
        from ..causal.claims import parse_claim, read_claims_file
        from ..causal.interventions import load_concept_labeller
        from ..causal.verification import VerifyConfig, collect_claims, verification_documents, verify_run
        from ..config import load_config
        from ..io import read_table, require_run
        from ..report.figures_verify import verification_figure

        if run is not None:
            require_run(run, "neurons.parquet")
        explanations = None
        if run is not None and (Path(run) / "explanations.parquet").exists():
            explanations = read_table(Path(run) / "explanations.parquet")
        given = [parse_claim(c, explanations=explanations) for c in claim or []]
        if claims_file:
            given += read_claims_file(claims_file, explanations=explanations)
        cfg = load_config(VerifyConfig, config,
                          verdicts=[v.strip() for v in verdicts.split(",") if v.strip()] if verdicts else None,
                          hunt=hunt and run is not None, n_nulls=n_nulls, max_nulls=max_nulls, early_stop=early_stop,
                          max_claim_tokens=max_claim_tokens, min_tokens=min_tokens, alpha=alpha, steer=steer,
                          attribution=attribution, max_tokens=max_tokens, seed=seed)
        if run is None and not (given and corpus and out):
            raise ConfigError("give a hunt run folder, or --claim with --corpus and --out")
        _, settings = collect_claims(run, cfg, given)  # bad input fails here, before the model loads
        verification_documents(settings, corpus)
        s = resolve_run(run, model, None)
        m = load(s["model"], device)
        labeller = load_concept_labeller(concepts or s["lexicon"], **s["labeller_options"])
        with progress_bar() as progress:
            task = progress.add_task("claims", total=None)
            results, summary = verify_run(run, m, cfg, claims=given, corpus=corpus, labeller=labeller, out=out,
                                          progress_total=lambda n: progress.update(task, total=n),
                                          progress=lambda n: progress.advance(task, n))
        folder = Path(out) if out else Path(run)
        write_html(verification_figure(results), folder / "verification.html")
        _print_verification(results, summary, cfg.alpha)
        console.print(f"wrote {folder / 'claims.parquet'}, verification.parquet/.json/.html"
                      + ("" if out else " and causal columns in neurons.parquet"))

    @app.command("patch")
    def patch(
        clean: str = typer.Option(..., help="Clean prompt (the model should answer --answer)"),
        corrupted: str = typer.Option(..., help="Corrupted prompt with the same number of tokens"),
        answer: str = typer.Option(..., help="Answer token of the clean prompt (one token, e.g. ' Paris')"),
        wrong: str = typer.Option(..., help="Answer token of the corrupted prompt"),
        model: str = typer.Option("smollm2-135m", "--model", "-m"),
        layers: str = typer.Option(None, help="Layers to sweep, e.g. '0-11' [default: all]"),
        heads: bool = typer.Option(True, "--heads/--no-heads", help="Also patch each attention head"),
        bos: bool = typer.Option(True, "--bos/--no-bos", help="Prepend the BOS token"),
        batch_size: int = typer.Option(16),
        device: str = typer.Option("cpu"),
        out: str = typer.Option("runs/patching", "--out", "-o", help="Output folder"),
    ) -> None:
        """Activation patching sweep: residual stream per layer × position, and each head's output."""
        import numpy as np

        from ..causal.patching import check_prompts, patching_frame, patching_sweep
        from ..io import atomic_path, write_json, write_table
        from ..report.figures_verify import patching_figure

        m = load(model, device)
        check_prompts(m, clean, corrupted, answer, wrong, prepend_bos=bos)
        layer_list = m.check_layers(parse_int_list(layers, "--layers") or range(m.n_layers))
        with progress_bar() as progress:
            task = progress.add_task("patching", total=None)
            res = patching_sweep(m, clean, corrupted, answer, wrong, heads=heads, layers=layer_list,
                                 prepend_bos=bos, batch_size=batch_size, progress=lambda: progress.advance(task))
        folder = Path(out)
        write_table(patching_frame(res), folder / "patching", formats=("parquet", "csv"))
        arrays = {"resid": res.resid.numpy(), "resid_raw": res.resid_raw.numpy(), "layers": np.array(res.layers)}
        if res.heads is not None and res.heads_raw is not None:
            arrays.update(heads=res.heads.numpy(), heads_raw=res.heads_raw.numpy())
        with atomic_path(folder / "patching.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        write_html(patching_figure(res), folder / "patching.html")
        write_json(folder / "summary.json", {"clean": clean, "corrupted": corrupted, "answer": res.answer,
                                             "wrong": res.wrong, "clean_metric": res.clean_metric,
                                             "corrupted_metric": res.corrupted_metric, "model": model,
                                             "tokens": res.clean_tokens})
        console.print(f"logit diff {res.answer!r} − {res.wrong!r}: clean {res.clean_metric:.3f}, corrupted "
                      f"{res.corrupted_metric:.3f}")
        from rich.table import Table

        n_pos = res.resid.shape[1]
        if n_pos <= 16:
            t = Table(title="Restored fraction when patching resid_pre at (layer, position)")
            t.add_column("layer", justify="right")
            for p in range(n_pos):
                t.add_column(f"{p}:{res.clean_tokens[p]!r}"[:14], justify="right")
            for i, L in enumerate(res.layers):
                t.add_row(str(L), *[f"{float(res.resid[i, p]):.2f}" for p in range(n_pos)])
            console.print(t)
        else:
            flat = [(float(res.resid[i, p]), L, p) for i, L in enumerate(res.layers) for p in range(n_pos)]
            for v, L, p in sorted(flat, key=lambda x: -abs(x[0]) if x[0] == x[0] else 0)[:5]:
                console.print(f"  resid_pre layer {L} position {p} {res.clean_tokens[p]!r}: restored {v:.3f}")
        if res.heads is not None:
            hs = [(float(res.heads[i, h]), L, h) for i, L in enumerate(res.layers) for h in range(res.heads.shape[1])]
            for v, L, h in sorted(hs, key=lambda x: -abs(x[0]) if x[0] == x[0] else 0)[:5]:
                console.print(f"  head {L}.{h}: restored {v:.3f}")
        console.print(f"wrote {folder}")

    @app.command("logits")
    def logits(
        run: str = typer.Argument(..., help="Run folder: logits for every neuron of its neurons.parquet"),
        k: int = typer.Option(20, help="Top and bottom tokens per neuron"),
        norm: bool = typer.Option(True, "--norm/--no-norm", help="Apply the final norm's weight (approximation)"),
        show: str = typer.Option(None, help="Print these neurons' tokens, e.g. '5.3,12.40'"),
        model: str = typer.Option(None, "--model", "-m", help="Model [default: the run's model]"),
        device: str = typer.Option("cpu"),
    ) -> None:
        """Direct logit attribution of the scanned neurons: writes RUN/logits.parquet."""
        from ..analysis.attribution import write_logits
        from ..io import read_table, require_run

        require_run(run, "neurons.parquet")
        if k < 1:
            raise ConfigError("--k must be at least 1")
        wanted = parse_pairs(show, "--show")
        units = read_table(Path(run) / "neurons.parquet")[["layer", "neuron"]].drop_duplicates()
        known = set(zip(units.layer.astype(int), units.neuron.astype(int), strict=True))
        for layer, neuron in wanted:
            if (layer, neuron) not in known:
                raise ConfigError(f"neuron {layer}.{neuron} is not in {run}/neurons.parquet")
        s = resolve_run(run, model, None)
        m = load(s["model"], device)
        n = len(units)
        with progress_bar() as progress:
            task = progress.add_task("neurons", total=n)
            path = write_logits(run, m, k=k, through_norm=norm, progress=lambda c: progress.advance(task, c))
        df = read_table(path)
        for layer, neuron in wanted:
            part = df[(df.layer == layer) & (df.neuron == neuron)]
            top = part[part.direction == "top"].head(10)
            bot = part[part.direction == "bottom"].head(10)
            console.print(f"[bold]{layer}.{neuron}[/] promotes: " + ", ".join(f"{t!r} {v:+.3f}" for t, v in
                                                                          zip(top.token, top.value, strict=True)))
            console.print("        suppresses: " + ", ".join(f"{t!r} {v:+.3f}" for t, v in
                                                            zip(bot.token, bot.value, strict=True)))
        console.print(f"wrote {path} ({len(df):,} rows)")
