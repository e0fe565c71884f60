"""CLI: ``neuronhunter features train|scan|compare`` — sparse dictionaries over neurons, judged like neurons."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import (
    BatchSizeOpt,
    ContextLengthOpt,
    DeviceOpt,
    HeldoutFractionOpt,
    LazyProgress,
    MaxTokensOpt,
    OverwriteOpt,
    SplitSeedOpt,
    console,
    parse_int_list,
)


def print_train_summary(result) -> None:
    from rich.table import Table

    t = Table(title="Dictionaries on held-out tokens (position 0 excluded)")
    for col in ("layer", "features", "k", "FVU", "dead", "L0", "loss clean", "dictionary", "mean-ablated",
                "recovered"):
        t.add_column(col, justify="right")
    d = result.summary["dictionary"]
    for layer, m in sorted(result.metrics.items()):
        t.add_row(str(layer), f"{d['n_features']:,}", str(d["k"]), f"{m['fvu']:.3f}",
                  f"{m['dead_features']} ({m['dead_fraction']:.1%})", f"{m['l0']:.1f}", f"{m['loss_clean']:.3f}",
                  f"{m['loss_dictionary']:.3f}", f"{m['loss_mean_ablated']:.3f}", f"{m['loss_recovered']:.3f}")
    console.print(t)
    tr = result.summary["train"]
    console.print(f"Trained on {tr['tokens']:,} tokens ({tr['steps']} steps, lr {tr['lr']:.2e}); evaluated on "
                  f"{next(iter(result.metrics.values()))['tokens']:,} held-out tokens")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Sparse dictionaries (SAEs, transcoders) over a layer's neurons; features are judged "
                        "like neurons.", no_args_is_help=True)

    @group.command("train")
    def train(
        layers: str = typer.Option(..., help="Layers to train a dictionary on, e.g. '3' or '3,15'"),
        model: str = typer.Option(None, "--model", "-m", help="[default: smollm2-135m]"),
        corpus: str = typer.Option(None, "--corpus", "-c", help="Corpus spec [default: master]; training reads "
                                   "its train side, evaluation its held-out side"),
        out: str = typer.Option(None, "--out", "-o", help="Run folder [default: runs/features]"),
        kind: str = typer.Option(None, help="sae (neurons -> neurons) or transcoder (MLP in -> out) [default: sae]"),
        n_features: int = typer.Option(None, help="Features per layer [default: expansion x width]"),
        expansion: int = typer.Option(None, help="Features per neuron [default: 8]"),
        k: int = typer.Option(None, "--k", help="Active features per token [default: 32]"),
        train_tokens: int = typer.Option(None, help="Training tokens per pass [default: 200000]"),
        epochs: int = typer.Option(None, help="Passes over the training tokens [default: 1]"),
        eval_tokens: int = typer.Option(None, help="Held-out evaluation tokens [default: 8192]"),
        token_batch: int = typer.Option(None, help="Tokens per optimiser step [default: 1024]"),
        shuffle_tokens: int = typer.Option(None, help="Tokens shuffled together [default: 16384]"),
        optimizer: str = typer.Option(None, help="signum (sparsify's default) or adam [default: signum]"),
        lr: float = typer.Option(None, help="Learning rate [default: sparsify's rule for the width]"),
        context_length: ContextLengthOpt = None,
        batch_size: BatchSizeOpt = None,
        heldout_fraction: HeldoutFractionOpt = None,
        split_seed: SplitSeedOpt = None,
        seed: int = typer.Option(None, help="[default: 0]"),
        checkpoint_every: int = typer.Option(None, help="Checkpoint every N shuffle buffers [default: 4]"),
        device: DeviceOpt = None,
        config: Path = typer.Option(None, "--config", help="YAML/JSON file with any of these options"),
        overwrite: OverwriteOpt = False,
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted training run"),
    ) -> None:
        """Train a top-k sparse autoencoder (or transcoder) on the neurons of each layer with EleutherAI's
        sparsify, on the scan's token stream; report FVU, dead features and the next-token loss with the layer
        replaced by its reconstruction against the clean and mean-ablated loss."""
        from ..circuits.training import DictionaryConfig, train_dictionaries
        from ..config import load_config

        cfg = load_config(DictionaryConfig, config, layers=parse_int_list(layers, "--layers"), model=model,
                          corpus=corpus, out=out, kind=kind, n_features=n_features, expansion=expansion, k=k,
                          train_tokens=train_tokens, epochs=epochs, eval_tokens=eval_tokens, token_batch=token_batch,
                          shuffle_tokens=shuffle_tokens, optimizer=optimizer, lr=lr, context_length=context_length,
                          batch_size=batch_size, heldout_fraction=heldout_fraction, split_seed=split_seed, seed=seed,
                          checkpoint_every=checkpoint_every, device=device)
        with LazyProgress("training, then evaluating (tokens)") as progress:
            result = train_dictionaries(cfg, progress=progress, overwrite=overwrite, resume=resume)
        print_train_summary(result)
        console.print(f"Wrote [bold]{cfg.out}[/] (weights.safetensors, metrics.json, config.json, manifest.json)")

    @group.command("scan")
    def scan(
        dictionary: str = typer.Argument(..., help="A features run folder (or its weights.safetensors)"),
        out: str = typer.Option(None, "--out", "-o", help="Run folder [default: runs/features-hunt]"),
        model: str = typer.Option(None, "--model", "-m", help="Base model [default: the dictionary's]"),
        corpus: str = typer.Option(None, "--corpus", "-c", help="[default: master, train side]"),
        layers: str = typer.Option(None, help="Layers [default: every layer of the dictionary]"),
        max_tokens: MaxTokensOpt = None,
        context_length: ContextLengthOpt = None,
        batch_size: BatchSizeOpt = None,
        device: DeviceOpt = None,
        explain: bool = typer.Option(False, "--explain", help="Then score explanations on the held-out side "
                                     "(neuronhunter explain, with the dictionary loaded)"),
        config: Path = typer.Option(None, "--config", help="YAML/JSON hunt config (lexicon, thresholds, ...)"),
        overwrite: OverwriteOpt = False,
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted feature scan"),
    ) -> None:
        """Scan and hunt the dictionary's features like neurons (statistics, exemplars, verdicts; the run's units
        are blocks.L.mlp.hook_post.sae.F), so browse, serve, explain and verify read them as they read neurons."""
        from ..circuits.dictionary import Dictionary
        from ..circuits.features import dictionary_file, explain_features, run_feature_scan
        from ..config import load_config
        from ..hunt import HuntConfig
        from .hunt import print_hunt_summary

        dic = Dictionary.load(dictionary_file(dictionary))
        cfg = load_config(HuntConfig, config, model=model or dic.meta.get("model") or None, corpus=corpus,
                          out=out or "runs/features-hunt", layers=parse_int_list(layers, "--layers"),
                          max_tokens=max_tokens, context_length=context_length, batch_size=batch_size, device=device)
        with LazyProgress("scanning features (tokens)") as progress:
            result = run_feature_scan(dictionary, cfg, progress=progress, overwrite=overwrite, resume=resume)
        print_hunt_summary(result.hunt)
        console.print(f"Wrote [bold]{cfg.out}[/] (model {result.spec})")
        if explain:
            with LazyProgress("scoring explanations on held-out text (tokens)") as progress:
                explain_features(cfg.out, progress=progress)
            console.print(f"Explained [bold]{cfg.out}[/] (explanations.parquet, neurons.parquet columns)")

    @group.command("explain")
    def explain(
        run: str = typer.Argument(..., help="A feature run (features scan)"),
        max_tokens: MaxTokensOpt = None,
        batch_size: BatchSizeOpt = None,
    ) -> None:
        """Score explanations of a feature run's features on held-out text (neuronhunter explain, with the
        run's dictionary loaded)."""
        from ..circuits.features import explain_features

        options = {k: v for k, v in {"max_tokens": max_tokens, "batch_size": batch_size}.items() if v is not None}
        with LazyProgress("scoring explanations on held-out text (tokens)") as progress:
            explain_features(run, progress=progress, **options)
        console.print(f"Explained [bold]{run}[/] (explanations.parquet, neurons.parquet columns)")

    @group.command("compare")
    def compare(
        neuron_run: str = typer.Argument(..., help="A hunt run of the neurons"),
        feature_run: str = typer.Argument(..., help="A feature hunt run (features scan) of the same layers"),
        good_r: float = typer.Option(0.5, help="Held-out simulation r that counts as explained"),
        json_out: str = typer.Option(None, "--json", help="Also write the comparison as JSON here"),
    ) -> None:
        """Neurons against features at the same layers: verdict shares, share explained, held-out score
        distribution, and polysemantic neurons split into the features that carry them."""
        from rich.table import Table

        from ..circuits.features import compare_runs

        res = compare_runs(neuron_run, feature_run, good_r=good_r)
        t = Table(title=f"Neurons vs features, layers {res['layers']}")
        t.add_column("")
        t.add_column("neurons", justify="right")
        t.add_column("features", justify="right")
        n, f = res["neurons"], res["features"]
        t.add_row("units", f"{n['units']:,}", f"{f['units']:,}")
        for v in sorted(set(n.get("share", {})) | set(f.get("share", {}))):
            t.add_row(v, f"{n.get('share', {}).get(v, 0):.1%}", f"{f.get('share', {}).get(v, 0):.1%}")
        for key, label in (("explained_share", f"explained (r >= {good_r})"),):
            t.add_row(label, "-" if n.get(key) is None else f"{n[key]:.1%}",
                      "-" if f.get(key) is None else f"{f[key]:.1%}")
        console.print(t)
        for s in res["splits"]:
            parts = ", ".join(f"F{p['feature']} ({p['verdict']}/{p['claim_category']}, w={p['decoder_weight']:.2f})"
                              for p in s["features"])
            console.print(f"polysemantic L{s['layer']}.N{s['neuron']} ({s['claim_categories']}) -> {parts}")
        if json_out:
            from ..io import write_text

            write_text(json_out, json.dumps(res, indent=2, default=str) + "\n")
            console.print(f"Wrote [bold]{json_out}[/]")

    app.add_typer(group, name="features")
