"""CLI: ``neuronhunter scan`` — the one-pass neuron scan."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import ScanConfig, load_config
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
    OnBadDocumentOpt,
    OverwriteOpt,
    ShardsOpt,
    ShardStoreOpt,
    SplitOpt,
    SplitSeedOpt,
    ThresholdOpt,
    TopKOpt,
    WorkersOpt,
    console,
    engine_options,
    parse_int_list,
)


def scan_options_to_config(config: Path | None, /, config_cls: type[ScanConfig] = ScanConfig,
                           **options: object) -> ScanConfig:
    """Merge a config file with CLI options (options that were given win)."""
    return load_config(config_cls, config, **options)


def run_with_progress(cfg: ScanConfig, *, overwrite: bool, resume: bool, **kwargs: object):
    """Run a scan with a rich progress bar over tokens."""
    from ..scan import run_scan

    with LazyProgress("scanning tokens") as progress:
        return run_scan(cfg, progress=progress, overwrite=overwrite, resume=resume, **kwargs)


def print_scan_summary(result, *, top: int = 1) -> None:
    """Strongest neuron per layer and dead-neuron counts."""
    from rich.markup import escape
    from rich.table import Table

    neurons = result.neurons_frame()
    examples = result.examples_frame()
    first = examples[(examples["kind"] == "top") & (examples["rank"] == 0)].set_index(["layer", "neuron"])
    m = result.manifest()
    t = result.timings
    console.print(
        f"[bold]Scanned[/] {m['tokens']:,} tokens in {m['windows']:,} windows of {m['context_length']} "
        f"({'BOS prepended' if m['prepend_bos'] else 'no BOS'}), {len(m['layers'])} layers x "
        f"{m['neurons_per_layer']} neurons, {t.get('tokens_per_s', 0):.0f} tok/s"
    )
    if result.environment.get("engine"):  # a Ray scan
        console.print(f"Engine: {result.environment['engine']}; {int(t.get('shards_scanned', 0))} shards scanned now, "
                      f"{int(t.get('shards_resumed', 0))} from before; merge {t.get('merge_s', 0):.1f} s after the "
                      f"last shard ({t.get('merge_during_scan_s', 0):.1f} s while shards ran)")
    table = Table(title="Strongest neuron per layer (position 0 excluded)", show_lines=False)
    for col in ("layer", "neuron", "max", "mean", "active", "dead", "at"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("top example", no_wrap=True, overflow="ellipsis", max_width=60)
    opener = 0 if result.config.include_first else 1  # the first counted position of a window
    flagged = 0
    from ..judge.verdicts import dead_neurons  # the one definition of "dead"

    is_dead = dead_neurons(neurons)
    for layer, group in neurons.groupby("layer"):
        best = group.nlargest(top, "max")
        dead = int(is_dead[(neurons["layer"] == layer).to_numpy()].sum())
        for _, row in best.iterrows():
            key = (int(row["layer"]), int(row["neuron"]))
            ctx, at = (first.loc[key, "context"], int(first.loc[key, "window_pos"])) if key in first.index else ("", -1)
            flagged += at == opener
            table.add_row(str(layer), str(int(row["neuron"])), f"{row['max']:.2f}", f"{row['mean']:.3f}",
                          f"{row['frac_active']:.2f}", str(dead), f"{at}{'*' if at == opener else ''}",
                          escape(ctx.replace("\n", " ").strip()[-60:]))
    console.print(table)
    if flagged:
        console.print(f"at = position of the peak in its window; * = the window's first counted token, where massive "
                      f"activations are often positional artefacts ({flagged} of these rows; the hunt checks them)")
    console.print(f"Dead neurons (max - min <= 0.05 x the layer's median neuron sd, the hunt's rule): "
                  f"{int(is_dead.sum())} of {len(neurons):,}")


def register(app: typer.Typer) -> None:
    @app.command("scan")
    def scan(
        model: str = typer.Option(None, "--model", "-m", help="Alias (smollm2-135m, gpt2, pythia-70m), hub id, "
                                  "local folder or .gguf [default: smollm2-135m]"),
        corpus: str = typer.Option(None, "--corpus", "-c", help="Text file, folder of .txt, .jsonl, .parquet, "
                                   "'master' or hf:NAME[:CONFIG][:SPLIT] [default: bundled corpus]"),
        out: str = typer.Option(None, "--out", "-o", help="Run folder [default: runs/scan]"),
        layers: LayersOpt = None,
        neurons_per_layer: NeuronsPerLayerOpt = None,
        top_k: TopKOpt = None,
        context_length: ContextLengthOpt = None,
        batch_size: BatchSizeOpt = None,
        max_tokens: MaxTokensOpt = None,
        concepts: str = typer.Option(None, help="Concept lexicon (YAML/JSON) for per-category statistics"),
        threshold: ThresholdOpt = None,
        bos: BosOpt = None,
        include_first: bool = typer.Option(None, "--include-first/--exclude-first",
                                           help="Count position 0 in statistics and top-k [default: exclude]"),
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        compile_stats: CompileOpt = None,
        formats: FormatsOpt = None,
        split: SplitOpt = None,
        heldout_fraction: HeldoutFractionOpt = None,
        split_seed: SplitSeedOpt = None,
        on_bad_document: OnBadDocumentOpt = None,
        seed: int = typer.Option(None, help="Random seed [default: 0]"),
        engine: EngineOpt = None,
        workers: WorkersOpt = None,
        address: AddressOpt = None,
        shards: ShardsOpt = None,
        shard_store: ShardStoreOpt = None,
        config: Path = typer.Option(None, "--config", help="YAML/JSON file with any of these options"),
        overwrite: OverwriteOpt = False,
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted scan from its checkpoint "
                                    "(a Ray scan: scan only the shards not yet done)"),
    ) -> None:
        """Scan every MLP neuron of every layer in one streaming pass and write neurons/examples tables."""
        cfg = scan_options_to_config(
            config, model=model, corpus=corpus, out=out, layers=parse_int_list(layers, "--layers"),
            neurons_per_layer=neurons_per_layer, top_k=top_k, context_length=context_length, batch_size=batch_size,
            max_tokens=max_tokens, concepts=concepts, threshold=threshold, prepend_bos=bos,
            include_first=include_first, device=device, dtype=dtype, compile_stats=compile_stats,
            formats=formats.split(",") if formats else None, seed=seed, split=split,
            heldout_fraction=heldout_fraction, split_seed=split_seed, on_bad_document=on_bad_document,
            **engine_options(engine, workers, address, shards, shard_store),
        )
        result = run_with_progress(cfg, overwrite=overwrite, resume=resume)
        print_scan_summary(result)
        shards = ", shards/index.json" if cfg.engine == "ray" else ""
        console.print(f"Wrote [bold]{cfg.out}[/] (neurons, examples, stats.pt, config.json, manifest.json{shards})")
