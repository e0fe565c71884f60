"""CLI commands: ``attention``, ``heads``, ``probe``, ``sparse-probe`` — attention heads and representations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError
from .common import console, parse_int_list, progress_bar
from .verify import load, resolve_run, write_html


def _out(out: str | None, run: str | None, default: str) -> Path:
    if out:
        return Path(out)
    return Path(run) / default if run else Path("runs") / default


def _labelled_batches(m: Any, s: dict[str, Any], *, labels: str | None, concepts: str | None, max_tokens: int,
                      batch_size: int, tokens_per_doc: int | None) -> tuple[list[Any], list[str]]:
    """Batches labelled by a user token-label file (its own texts) or the concept lexicon (the corpus)."""
    from ..analysis.probes import read_token_labels
    from ..causal.interventions import corpus_batches, load_concept_labeller

    if labels:
        docs, labeller = read_token_labels(labels)
        corpus: Any = docs
    else:
        labeller = load_concept_labeller(concepts or s.get("lexicon"), **s.get("labeller_options", {}))
        corpus = s["corpus"]
    batches = corpus_batches(m, corpus, context_length=s["context_length"], max_tokens=max_tokens,
                             batch_size=batch_size, prepend_bos=s["prepend_bos"], labeller=labeller,
                             tokens_per_doc=tokens_per_doc)
    return batches, list(labeller.categories)


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""

    @app.command("attention")
    def attention(
        text: str = typer.Option(..., "--text", "-t", help="The prompt"),
        model: str = typer.Option("smollm2-135m", "--model", "-m"),
        layers: str = typer.Option(None, help="Layers, e.g. '0,5,17-18' [default: all]"),
        bos: bool = typer.Option(True, "--bos/--no-bos", help="Prepend the BOS token"),
        device: str = typer.Option("cpu"),
        out: str = typer.Option("attention.html", "--out", "-o", help="Output HTML file"),
    ) -> None:
        """Attention patterns of every head for a prompt, as interactive offline HTML heatmaps."""
        from ..analysis.heads import attention_patterns
        from ..report.figures_verify import attention_figure

        if not text.strip():
            raise ConfigError("--text is empty")
        m = load(model, device)
        pats = attention_patterns(m, text, layers=parse_int_list(layers, "--layers"), prepend_bos=bos)
        path = write_html(attention_figure(pats), out)
        console.print(f"{len(pats.tokens)} tokens, {len(pats.layers)} layers × {m.n_heads} heads; wrote {path}")

    @app.command("heads")
    def heads(
        run: str = typer.Option(None, "--run", "-r", help="Take model and corpus from this run folder, write there"),
        model: str = typer.Option(None, "--model", "-m", help="Model [default: the run's, else smollm2-135m]"),
        corpus: str = typer.Option(None, "--corpus", "-c", help="Corpus for the corpus scores [default: bundled]"),
        layers: str = typer.Option(None, help="Layers [default: all]"),
        max_tokens: int = typer.Option(2048, help="Corpus tokens for prev/duplicate/sink/entropy scores"),
        batch_size: int = typer.Option(4),
        seq_len: int = typer.Option(40, help="Induction protocol: random tokens per copy"),
        n_seqs: int = typer.Option(16, help="Induction protocol: sequences"),
        seed: int = typer.Option(0),
        top: int = typer.Option(5, help="Heads to list per score"),
        device: str = typer.Option("cpu"),
        out: str = typer.Option(None, "--out", "-o", help="Output folder [default: RUN, else runs/heads]"),
    ) -> None:
        """Head scores (previous-token, duplicate, induction, BOS sink, entropy) and the induction loss curve."""
        from ..analysis.heads import SCORES, head_scores, top_heads
        from ..causal.interventions import corpus_batches
        from ..io import require_run, write_json, write_table
        from ..report.figures_verify import head_scores_figure, induction_curve_figure

        if run:
            require_run(run)
        s = resolve_run(run, model, corpus)
        m = load(s["model"], device)
        layer_list = m.check_layers(parse_int_list(layers, "--layers") or range(m.n_layers))
        batches = corpus_batches(m, s["corpus"], context_length=s["context_length"], max_tokens=max_tokens,
                                 batch_size=batch_size, prepend_bos=s["prepend_bos"])
        with progress_bar() as progress:
            task = progress.add_task("scoring heads", total=len(batches))
            scores, ind = head_scores(m, batches, layers=layer_list, seq_len=seq_len, n_seqs=n_seqs, seed=seed,
                                      progress=lambda: progress.advance(task))
        folder = Path(out) if out else (Path(run) if run else Path("runs/heads"))
        write_table(scores, folder / "heads", formats=("parquet", "csv"))
        write_table(ind.loss_curve, folder / "induction_curve", formats=("parquet", "csv"))
        write_html(head_scores_figure(scores), folder / "heads.html")
        write_html(induction_curve_figure(ind), folder / "induction.html")
        summary = {"model": s["model"], "corpus": s["corpus"] or "default", "seq_len": seq_len, "n_seqs": n_seqs,
                   "induction_loss_first_half": ind.first_half_loss, "induction_loss_second_half": ind.second_half_loss,
                   "top": {sc: top_heads(scores, sc, top)[["layer", "head", sc]].to_dict("records")
                           for sc in SCORES if scores[sc].notna().any()}}
        write_json(folder / "heads.json", summary)

        from rich.table import Table

        t = Table(title=f"Top {top} heads per score")
        t.add_column("score")
        t.add_column("heads (layer.head: score)")
        for sc, rows in summary["top"].items():
            t.add_row(sc, ", ".join(f"{r['layer']}.{r['head']}: {r[sc]:.3f}" for r in rows))
        console.print(t)
        console.print(f"induction loss: first copy {ind.first_half_loss:.3f}, second copy "
                      f"{ind.second_half_loss:.3f} nats; wrote {folder}/heads.parquet")

    def _probe_common(run: str | None, model: str | None, corpus: str | None, device: str) -> tuple[Any, dict]:
        if run:
            from ..io import require_run

            require_run(run)
        s = resolve_run(run, model, corpus)
        return load(s["model"], device), s

    def _probe_inputs(run: str | None, model: str | None, corpus: str | None, device: str, layers: str | None,
                      **batch_options: Any) -> tuple[Any, list[int], list[Any], list[str]]:
        """Model, layers, labelled batches and categories for the probe commands (split by document)."""
        m, s = _probe_common(run, model, corpus, device)
        layer_list = m.check_layers(parse_int_list(layers, "--layers") or range(m.n_layers))
        batches, cats = _labelled_batches(m, s, **batch_options)
        if len(set().union(*(b.doc_ids.tolist() for b in batches))) < 2:
            raise ConfigError("probes are split by document: the corpus (within --max-tokens) needs at least two "
                              "documents")
        return m, layer_list, batches, cats

    @app.command("probe")
    def probe(
        run: str = typer.Option(None, "--run", "-r", help="Take model/corpus/lexicon from this run folder"),
        model: str = typer.Option(None, "--model", "-m"),
        corpus: str = typer.Option(None, "--corpus", "-c"),
        site: str = typer.Option("resid", help="resid (residual stream after the block) or mlp (neurons)"),
        layers: str = typer.Option(None, help="Layers [default: all]"),
        labels: str = typer.Option(None, help="File of token labels (.tsv word<TAB>label, or .jsonl spans) "
                                   "instead of the concept categories"),
        concepts: str = typer.Option(None, help="Concept lexicon [default: the run's, else bundled]"),
        include_none: bool = typer.Option(False, help="Add unlabelled tokens as a 'none' class"),
        categories: str = typer.Option(None, help="Probe only these classes, e.g. 'animal,color,food' (tokens "
                                       "of other categories count as unlabelled) [default: all]"),
        max_tokens: int = typer.Option(4096),
        tokens_per_doc: int = typer.Option(256, help="At most this many tokens per document (0 = no cap): spreads "
                                           "the tokens over more documents for the split by document"),
        batch_size: int = typer.Option(8),
        folds: int = typer.Option(3, help="Cross-validation folds (split by document)"),
        seed: int = typer.Option(0),
        device: str = typer.Option("cpu"),
        out: str = typer.Option(None, "--out", "-o", help="Output folder [default: RUN/probes, else runs/probes]"),
    ) -> None:
        """Linear probes per layer: accuracy and macro-F1 vs majority baseline and shuffled-label control."""
        from ..analysis.probes import SITES, collect_features, linear_probes
        from ..io import write_table
        from ..report.figures_verify import probe_curve_figure

        if site not in SITES:
            raise ConfigError(f"probe site must be one of {', '.join(SITES)}, got {site!r}")
        m, layer_list, batches, cats = _probe_inputs(
            run, model, corpus, device, layers, labels=labels, concepts=concepts, max_tokens=max_tokens,
            batch_size=batch_size, tokens_per_doc=tokens_per_doc or None)
        with progress_bar() as progress:
            task = progress.add_task("capturing", total=len(batches))
            data = collect_features(m, batches, cats, layers=layer_list, site=site,
                                    progress=lambda: progress.advance(task))
            task2 = progress.add_task("fitting probes", total=len(layer_list))
            df = linear_probes(data, include_none=include_none, n_splits=folds, seed=seed,
                               categories=[c.strip() for c in categories.split(",")] if categories else None,
                               progress=lambda: progress.advance(task2))
        folder = _out(out, run, "probes")
        write_table(df, folder / f"probes_{site}", formats=("parquet", "csv"))
        write_html(probe_curve_figure(df), folder / f"probe_curve_{site}.html")

        from rich.table import Table

        t = Table(title=f"Linear probes ({site}), {int(df.n_tokens.iloc[0])} tokens, {int(df.n_docs.iloc[0])} "
                        f"documents, {int(df.n_classes.iloc[0])} classes")
        for col in ("layer", "accuracy", "macro-F1", "majority acc", "control acc", "selectivity"):
            t.add_column(col, justify="right")
        for r in df.itertuples():
            t.add_row(str(r.layer), f"{r.accuracy:.3f}", f"{r.macro_f1:.3f}", f"{r.majority_accuracy:.3f}",
                      f"{r.control_accuracy:.3f}", f"{r.selectivity:+.3f}")
        console.print(t)
        console.print(f"wrote {folder}/probes_{site}.parquet")

    @app.command("sparse-probe")
    def sparse_probe_cmd(
        run: str = typer.Option(None, "--run", "-r", help="Run folder: model/corpus/lexicon, and the hunt's "
                                "monosemantic neurons to compare with"),
        model: str = typer.Option(None, "--model", "-m"),
        corpus: str = typer.Option(None, "--corpus", "-c"),
        layers: str = typer.Option(None, help="Layers whose neurons compete [default: all]"),
        ks: str = typer.Option("1,2,4,8,16,32", help="Numbers of neurons k"),
        labels: str = typer.Option(None, help="File of token labels instead of the concept categories"),
        concepts: str = typer.Option(None, help="Concept lexicon [default: the run's, else bundled]"),
        min_positive: int = typer.Option(10, help="Skip categories with fewer tokens"),
        categories: str = typer.Option(None, help="Probe only these categories, e.g. 'animal,color'"),
        max_tokens: int = typer.Option(4096),
        tokens_per_doc: int = typer.Option(256, help="At most this many tokens per document (0 = no cap): spreads "
                                           "the tokens over more documents for the split by document"),
        batch_size: int = typer.Option(8),
        folds: int = typer.Option(3),
        seed: int = typer.Option(0),
        device: str = typer.Option("cpu"),
        out: str = typer.Option(None, "--out", "-o", help="Output folder [default: RUN/probes, else runs/probes]"),
    ) -> None:
        """Sparse probing over MLP neurons: F1/MCC vs k per category; k=1 vs the hunt's monosemantic neurons."""
        from ..analysis.probes import collect_features, compare_with_hunt, sparse_probe
        from ..io import read_table, write_table
        from ..report.figures_verify import sparse_probe_figure

        k_list = parse_int_list(ks, "--ks")
        if not k_list or min(k_list) < 1:
            raise ConfigError("--ks must be positive integers like '1,2,4,8'")
        m, layer_list, batches, cats = _probe_inputs(
            run, model, corpus, device, layers, labels=labels, concepts=concepts, max_tokens=max_tokens,
            batch_size=batch_size, tokens_per_doc=tokens_per_doc or None)
        with progress_bar() as progress:
            task = progress.add_task("capturing", total=len(batches))
            data = collect_features(m, batches, cats, layers=layer_list, site="mlp",
                                    progress=lambda: progress.advance(task))
            task2 = progress.add_task("probing categories", total=len(cats))
            res = sparse_probe(data, ks=k_list, n_splits=folds, seed=seed, min_positive=min_positive,
                               categories=[c.strip() for c in categories.split(",")] if categories else None,
                               progress=lambda: progress.advance(task2))
        folder = _out(out, run, "probes")
        write_table(res.curve, folder / "sparse_probes", formats=("parquet", "csv"))
        write_table(res.best, folder / "sparse_best_neurons", formats=("parquet", "csv"))
        write_html(sparse_probe_figure(res.curve), folder / "sparse_probe.html")
        compare = None
        if run and (Path(run) / "neurons.parquet").exists():
            neurons = read_table(Path(run) / "neurons.parquet")
            if {"verdict", "top_category"} <= set(neurons.columns):
                compare = compare_with_hunt(data, res, neurons, n_splits=folds, seed=seed)
                write_table(compare, folder / "sparse_vs_hunt", formats=("parquet", "csv"))
            else:
                console.print("(the run has no hunt verdicts: skipping the comparison with monosemantic neurons)")

        from rich.table import Table

        t = Table(title="Sparse probing: F1 by k (held-out documents)")
        t.add_column("category")
        kk = sorted(res.curve.k.unique())
        for k in kk:
            t.add_column(f"k={k}", justify="right")
        t.add_column("best neuron (k=1)", justify="right")
        best = res.best.set_index("category")
        for cat, g in res.curve.groupby("category", sort=False):
            f1 = dict(zip(g.k, g.f1, strict=True))
            b = best.loc[cat] if cat in best.index else None
            t.add_row(str(cat), *[f"{f1[k]:.3f}" if k in f1 else "" for k in kk],
                      f"{int(b.layer)}.{int(b.neuron)}" if b is not None else "")
        console.print(t)
        if compare is not None:
            t2 = Table(title="Best single neuron vs the hunt's monosemantic neurons")
            for col in ("category", "probe best", "F1", "hunt neurons", "same?", "hunt best", "its rank", "its F1"):
                t2.add_column(col, justify="right")
            for r in compare.itertuples():
                t2.add_row(r.category, r.probe_best, f"{r.probe_f1:.3f}", str(r.n_hunt),
                           "yes" if r.probe_best_is_hunt else "no",
                           r.hunt_best if isinstance(r.hunt_best, str) else "-",
                           "-" if r.hunt_best_rank != r.hunt_best_rank else str(int(r.hunt_best_rank)),
                           "-" if r.hunt_best_f1 != r.hunt_best_f1 else f"{r.hunt_best_f1:.3f}")
            console.print(t2)
        console.print(f"wrote {folder}/sparse_probes.parquet")
