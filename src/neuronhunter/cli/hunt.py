"""CLI: ``hunt`` (scan + verdicts), ``interpret``, ``query``, ``compare`` and ``plot neuron`` / ``plot map``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError
from .common import (
    AddressOpt,
    BatchSizeOpt,
    BosOpt,
    CompileOpt,
    ContextLengthOpt,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    FormatsOpt,
    HeldoutFractionOpt,
    LayersOpt,
    LazyProgress,
    MaxTokensOpt,
    NeuronsPerLayerOpt,
    OverwriteOpt,
    ShardsOpt,
    ShardStoreOpt,
    SplitSeedOpt,
    ThresholdOpt,
    TopKOpt,
    WorkersOpt,
    console,
    engine_options,
    parse_int_list,
)


def short_example(context: str, width: int = 48) -> str:
    """An example context cut to ``width`` characters around its ``[[token]]`` marker, whitespace collapsed."""
    text = " ".join(str(context).split())
    at = text.find("[[")
    if len(text) <= width or at < 0:
        return text[:width]
    start = max(0, min(at - width // 2, len(text) - width))
    return ("…" if start > 0 else "") + text[start:start + width] + ("…" if start + width < len(text) else "")


def print_frame(df: Any, title: str, *, index: bool = False, floats: str = "{:.3g}", max_rows: int = 60) -> None:
    """Print a DataFrame as a rich table (index included when ``index``; cell text is not markup)."""
    from pandas.api.types import is_numeric_dtype
    from rich.markup import escape
    from rich.table import Table

    frame = df.reset_index() if index else df
    table = Table(title=title, show_lines=False, title_justify="left")
    for col in frame.columns:
        text = not is_numeric_dtype(frame[col].dtype)
        table.add_column(str(col), justify="left" if text else "right", no_wrap=True, overflow="ellipsis",
                         max_width=60, min_width=min(len(str(col)), 10 if text else 14))
    for row in frame.head(max_rows).itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(floats.format(v) if v == v else "")
            else:
                cells.append(escape(str(v)))
        table.add_row(*cells)
    console.print(table)
    if len(frame) > max_rows:
        console.print(f"... {len(frame) - max_rows} more rows")


def print_hunt_summary(result: Any) -> None:
    """Verdict counts per layer and per direction, the champion, and the top neurons per category."""
    from rich.markup import escape

    m, info = result.manifest, result.info
    speed = m.get("timings", {}).get("tokens_per_s")
    split = (m.get("corpus") or {}).get("split") or {}
    side = split.get("side") if isinstance(split, dict) else None
    console.print(
        f"[bold]Hunted[/] {info['tokens']:,} tokens ({m['corpus']['spec']}"
        + (f", {side} side of the document split" if side and side != "all" else "")
        + f"), {len(m['layers'])} layers x {m['neurons_per_layer']} neurons of {m['model']['name']}"
        + (f", {speed:.0f} tok/s" if speed else "")
    )
    console.print("Labelled tokens: " + ", ".join(f"{k} {v:,}" for k, v in info["labelled_tokens"].items()))
    counts = result.verdict_counts().rename(columns={"monosemantic": "mono", "polysemantic": "poly",
                                                     "positional": "posit.", "syntactic": "syntac.",
                                                     "unexplained": "unexpl."})
    print_frame(counts, "Verdicts per layer (mono = monosemantic, poly = polysemantic)", index=True)
    print_frame(result.direction_counts(), "Verdicts by the direction they are about (+: a, -: -a)", index=True,
                floats="{:.2f}")
    champ = result.champion
    if champ is None:
        console.print("Champion: none (every neuron is positional or dead)")
    else:
        console.print(f"[bold]Champion[/] (largest |activation| outside positional artefacts): "
                      f"L{champ['layer']}.N{champ['neuron']}  {champ['activation']:.2f}  {champ['verdict']} "
                      f"({champ['verdict_direction']}{' ' + champ['claim'] if champ['claim'] else ''})  "
                      f"example: {escape(repr(short_example(champ['example'], 70)))}")
    top = result.top
    if top.empty:
        console.print("No monosemantic or polysemantic neurons found.")
        return
    best = top[top["rank"] == 0].copy()
    best["neuron"] = [f"L{r.layer}.N{r.neuron}{r.direction}" for r in best.itertuples()]
    best["kind"] = best["kind"].map({"monosemantic": "mono", "polysemantic": "poly"})
    best["categories"] = best["categories"].str.replace(",", "+")
    best["example"] = [short_example(e) for e in best["example"]]
    best = best.rename(columns={"precision": "prec.", "example": "its strongest activation"})
    print_frame(best[["category", "kind", "neuron", "prec.", "recall", "f1", "auprc", "categories",
                      "its strongest activation"]],
                "Top neuron per category and kind (ranked by F1 over its high activations; +/-: direction)")


def _verdict_direction(run: Path, layer: int, neuron: int) -> str:
    """The direction of a neuron's verdict in a hunt run ('+' for a scan run)."""
    import pyarrow.parquet as pq

    path = run / "neurons.parquet"
    if not path.exists() or "direction" not in pq.read_schema(path).names:
        return "+"
    table = pq.read_table(path, columns=["layer", "neuron", "direction"],
                          filters=[("layer", "=", layer), ("neuron", "=", neuron)])
    return str(table["direction"][0]) if table.num_rows else "+"


def _load_run_model_and_labeller(run: Path) -> tuple[Any, Any, dict[str, Any]]:
    from ..data.concepts import ConceptLabeller, load_lexicon
    from ..io import read_json
    from ..models.loading import load_model

    cfg = read_json(run / "config.json") if (run / "config.json").exists() else {}
    lexicon_path = run / "lexicon.json"
    lexicon = load_lexicon(read_json(lexicon_path)) if lexicon_path.exists() else load_lexicon(
        cfg.get("concepts") or None)
    labeller = ConceptLabeller(lexicon, case_sensitive=bool(cfg.get("case_sensitive", False)),
                               last_token_only=bool(cfg.get("label_last_token_only", False)))
    model = load_model(cfg.get("model") or "smollm2-135m", device=cfg.get("device") or "cpu",
                       dtype=cfg.get("dtype") or "float32")
    return model, labeller, cfg


def register(app: typer.Typer) -> None:  # noqa: C901 - one block of command definitions
    @app.command("hunt")
    def hunt(
        model: str = typer.Option(None, "--model", "-m", help="Alias, hub id, local folder or .gguf "
                                  "[default: smollm2-135m, the embedded model]"),
        corpus: str = typer.Option(None, "--corpus", "-c", help="Corpus spec (file, folder, .jsonl, .parquet, "
                                   "'default', hf:NAME) [default: master, the bundled master text]"),
        split: str = typer.Option(None, "--split", help="Documents to read: train, heldout or all (by a stable "
                                  "hash of each document's id) [default: train]"),
        heldout_fraction: HeldoutFractionOpt = None,
        split_seed: SplitSeedOpt = None,
        out: str = typer.Option(None, "--out", "-o", help="Run folder [default: runs/hunt]"),
        concepts: str = typer.Option(None, help="Lexicon file (YAML/JSON) [default: the bundled lexicon]"),
        layers: LayersOpt = None,
        neurons_per_layer: NeuronsPerLayerOpt = None,
        top_k: TopKOpt = None,
        context_length: ContextLengthOpt = None,
        batch_size: BatchSizeOpt = None,
        max_tokens: MaxTokensOpt = None,
        threshold: ThresholdOpt = None,
        last_token_only: bool = typer.Option(None, "--last-token-only/--all-tokens",
                                             help="Label only the last token of a multi-token word [default: all]"),
        case_sensitive: bool = typer.Option(None, "--case-sensitive/--ignore-case", help="[default: ignore case]"),
        bos: BosOpt = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        compile_stats: CompileOpt = None,
        formats: FormatsOpt = None,
        top: int = typer.Option(None, help="Top neurons per category and kind kept in top_neurons [default: 3]"),
        config: Path = typer.Option(None, "--config", help="YAML/JSON hunt config: any of these options, "
                                    "'categories' (inline lexicon) and 'thresholds' (verdict rule)"),
        rescore: str = typer.Option(None, "--rescore", help="Re-verdict this finished run from its stored "
                                    "statistics (no model run); thresholds from --config"),
        engine: EngineOpt = None,
        workers: WorkersOpt = None,
        address: AddressOpt = None,
        shards: ShardsOpt = None,
        shard_store: ShardStoreOpt = None,
        overwrite: OverwriteOpt = False,
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted hunt from its checkpoint"),
    ) -> None:
        """Scan with concept labels (train side of the document split) and give every neuron a verdict in its
        stronger direction (dead, positional, token, syntactic, monosemantic, polysemantic, unexplained)."""
        from ..hunt import HuntConfig, check_out, rescore_run, run_hunt
        from .scan import scan_options_to_config

        if rescore is not None:
            thresholds = None
            if config is not None:
                thresholds = scan_options_to_config(config, config_cls=HuntConfig).thresholds
            result = rescore_run(rescore, thresholds, top_per_category=top)
            print_hunt_summary(result)
            console.print(f"Re-scored [bold]{rescore}[/] (neurons, concepts, top_neurons, hunt.json, manifest)")
            return
        cfg = scan_options_to_config(
            config, config_cls=HuntConfig, model=model, corpus=corpus, out=out, concepts=concepts,
            layers=parse_int_list(layers, "--layers"), neurons_per_layer=neurons_per_layer, top_k=top_k,
            context_length=context_length, batch_size=batch_size, max_tokens=max_tokens, threshold=threshold,
            label_last_token_only=last_token_only, case_sensitive=case_sensitive, prepend_bos=bos, device=device,
            dtype=dtype, compile_stats=compile_stats, formats=formats.split(",") if formats else None,
            top_per_category=top, split=split, heldout_fraction=heldout_fraction, split_seed=split_seed,
            **engine_options(engine, workers, address, shards, shard_store),
        )
        check_out(cfg.out, overwrite=overwrite, resume=resume)
        with LazyProgress("hunting (scan)") as progress:
            result = run_hunt(cfg, progress=progress, overwrite=overwrite, resume=resume)
        print_hunt_summary(result)
        console.print(f"Wrote [bold]{cfg.out}[/] (neurons with verdicts, directions, concepts, top_neurons, examples, "
                      "hunt.json)")

    @app.command("interpret")
    def interpret(
        run: str = typer.Argument(..., help="A hunt run folder"),
        out: str = typer.Option(None, "--out", "-o", help="Folder for the CSV tables [default: RUN/interpret]"),
    ) -> None:
        """Pivot tables, category overlaps vs chance and category correlations of a hunt run (DuckDB)."""
        from ..analysis.interpret import interpret_run

        tables = interpret_run(run, out)
        # printed with layers as rows (fits a terminal); the CSV files have categories as rows
        print_frame(tables["category_layer"].T, "Selective neurons per layer and category (CSV: category x layer)",
                    index=True)
        print_frame(tables["monosemantic_layer"].T, "Monosemantic neurons per layer, by top category", index=True)
        verdicts = tables["verdict_layer"].T.rename(columns={"monosemantic": "mono", "polysemantic": "poly"})
        print_frame(verdicts, "Verdicts per layer", index=True)
        sel = tables["selectivity_layer"][["layer", "neurons", "mean_crs", "mean_dprime", "mean_entropy",
                                           "share_monosemantic", "share_polysemantic", "share_positional"]]
        print_frame(sel, "Mean selectivity per layer (non-dead neurons)")
        print_frame(tables["overlaps"], "Category pairs sharing selective neurons (vs chance)", floats="{:.3g}")
        print_frame(tables["correlation"], "Correlation of d' between categories over neurons", index=True,
                    floats="{:.2f}")
        console.print(f"Wrote CSV tables to [bold]{out or Path(run) / 'interpret'}[/]")

    @app.command("query")
    def query_cmd(
        run: str = typer.Argument(..., help="A run folder"),
        sql: str = typer.Argument(..., help="SQL over the views neurons, concepts, examples, top_neurons"),
        out: str = typer.Option(None, "--out", "-o", help="Also write the result to this CSV file"),
        max_rows: int = typer.Option(50, help="Rows to print"),
    ) -> None:
        """Run your own SQL (DuckDB) over a run's Parquet tables."""
        from ..analysis.interpret import query
        from ..io import write_table

        df = query(run, sql)
        print_frame(df, f"{len(df)} rows", max_rows=max_rows, floats="{:.4g}")
        if out:
            path = Path(out)
            write_table(df, path.with_suffix(""), formats=("csv",))
            console.print(f"Wrote [bold]{path.with_suffix('.csv')}[/]")

    @app.command("compare")
    def compare(
        run_a: str = typer.Argument(..., help="First hunt run (A)"),
        run_b: str = typer.Argument(..., help="Second hunt run (B), scanned with the same lexicon"),
        bins: int = typer.Option(5, help="Relative-depth bins"),
        out: str = typer.Option(None, "--out", "-o", help="Also write the comparison to this CSV file"),
    ) -> None:
        """Selective neurons per category and relative depth, two runs side by side; for two runs of one model
        (e.g. --split train and --split heldout), also how many verdicts replicate neuron by neuron."""
        from ..analysis.interpret import compare_runs, replication, run_model
        from ..io import write_table

        res = compare_runs(run_a, run_b, bins=bins)
        models = [run_model(r) for r in (run_a, run_b)]
        console.print(f"A = {run_a}\nB = {run_b}")
        if res["only_a"] or res["only_b"]:
            console.print(f"Categories only in A: {res['only_a'] or '-'}; only in B: {res['only_b'] or '-'}")
        print_frame(res["verdicts"], "Verdicts")
        print_frame(res["depth"], "Selective neurons per category and relative depth (per_1k = per 1000 scanned)",
                    max_rows=500, floats="{:.1f}")
        if models[0] is not None and models[0] == models[1]:
            print_frame(replication(run_a, run_b), "Replication, neuron by neuron: A's verdicts found again in B "
                        "(same claim = same verdict, direction and category set or token; chance = B's share)",
                        floats="{:.1f}")
        if out:
            write_table(res["depth"], Path(out).with_suffix(""), formats=("csv",))
            console.print(f"Wrote [bold]{Path(out).with_suffix('.csv')}[/]")

    plot_app = typer.Typer(help="Plotly charts of a hunt run (offline HTML; PNG when kaleido is installed).",
                           no_args_is_help=True)
    app.add_typer(plot_app, name="plot")

    @plot_app.command("neuron")
    def plot_neuron(
        run: str = typer.Argument(..., help="A hunt (or scan) run folder: its model and lexicon are used"),
        layer: int = typer.Argument(..., help="Layer"),
        neuron: int = typer.Argument(..., help="Neuron index in the layer"),
        text: str = typer.Option(None, "--text", "-t", help="Text to run [default: the neuron's top example]"),
        text_file: Path = typer.Option(None, "--text-file", help="Read the text from a file"),
        show_first: bool = typer.Option(False, "--show-first", help="Also show the BOS token at position 0"),
        out: str = typer.Option(None, "--out", "-o", help="HTML file [default: RUN/plots/neuron_L{L}_N{N}.html]"),
        png: bool = typer.Option(None, "--png/--no-png", help="PNG too [default: when kaleido is installed]"),
    ) -> None:
        """A neuron's activation over every token of a text, coloured by concept category."""
        from ..hunt import activation_history
        from ..io import read_table, require_run
        from ..report.export import write_figure
        from ..report.figures import neuron_activation_figure

        run_path = require_run(run)
        if text_file is not None:
            if not text_file.is_file():
                raise ConfigError(f"text file not found: {text_file}")
            text = text_file.read_text(encoding="utf-8")
        if text is None:
            ex = read_table(run_path / "examples.parquet") if (run_path / "examples.parquet").exists() else None
            if ex is not None and "kind" in ex.columns:  # the strongest example in the verdict's direction
                kind = "bottom" if _verdict_direction(run_path, layer, neuron) == "-" else "top"
                ex = ex[ex.kind == kind]
            row = None if ex is None else ex[(ex.layer == layer) & (ex.neuron == neuron)].sort_values("rank")
            if row is None or row.empty:
                raise ConfigError(f"no stored example for neuron {layer}.{neuron}; pass --text")
            text = row.iloc[0]["context"].replace("[[", "").replace("]]", "")
        model, labeller, cfg = _load_run_model_and_labeller(run_path)
        bos = bool(cfg.get("prepend_bos", True))
        tokens, acts, labels = activation_history(model, layer, neuron, text, labeller,
                                                  context_length=int(cfg.get("context_length") or 128),
                                                  prepend_bos=bos)
        has_bos = bos and model.bos_token_id is not None
        if has_bos and not show_first:
            tokens, acts, labels = tokens[1:], acts[1:], labels[1:]
        fig = neuron_activation_figure(tokens, acts, labels, labeller.categories,
                                       title=f"L{layer}.N{neuron} activation over {len(tokens)} tokens",
                                       first_is_special=has_bos and show_first)
        path = Path(out) if out else run_path / "plots" / f"neuron_L{layer}_N{neuron}.html"
        for p in write_figure(fig, path, png=png):
            console.print(f"Wrote [bold]{p}[/]")
        top = int(acts.argmax())
        console.print(f"max {acts[top]:.3f} on token {top} {tokens[top]!r}; mean {acts.mean():.3f}")

    @plot_app.command("map")
    def plot_map(
        run: str = typer.Argument(..., help="A hunt run folder"),
        kind: str = typer.Option("selective", help="selective (mono+poly per category) or monosemantic"),
        out: str = typer.Option(None, "--out", "-o", help="HTML file [default: RUN/plots/map.html]"),
        png: bool = typer.Option(None, "--png/--no-png", help="PNG too [default: when kaleido is installed]"),
    ) -> None:
        """Layer x category heatmap of selective (or monosemantic) neurons."""
        from ..analysis.interpret import category_layer_counts, connect, require_hunt, run_categories
        from ..report.export import write_figure
        from ..report.figures import layer_category_heatmap

        if kind not in ("selective", "monosemantic"):
            raise ConfigError(f"--kind must be selective or monosemantic, got {kind!r}")
        run_path = require_hunt(run)
        cats, _ = run_categories(run_path)
        con = connect(run_path)
        try:
            layers = [int(r[0]) for r in con.execute("SELECT DISTINCT layer FROM neurons ORDER BY 1").fetchall()]
            table = category_layer_counts(con, cats, layers, monosemantic_only=kind == "monosemantic")
        finally:
            con.close()
        fig = layer_category_heatmap(table, title=f"{kind.capitalize()} neurons per layer and category ({run})")
        path = Path(out) if out else run_path / "plots" / "map.html"
        for p in write_figure(fig, path, png=png):
            console.print(f"Wrote [bold]{p}[/]")
