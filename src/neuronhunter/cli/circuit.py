"""CLI: ``neuronhunter circuit TASK`` — automated circuit discovery by edge attribution patching."""

from __future__ import annotations

import typer

from .common import DeviceOpt, OverwriteOpt, console, parse_int_list


def register(app: typer.Typer) -> None:
    @app.command("circuit")
    def circuit(
        task: str = typer.Argument(..., help="A bundled task (ioi, capitals, colours) or a JSONL file of pairs "
                                   "{clean, corrupted, answer, wrong}"),
        model: str = typer.Option(None, "--model", "-m", help="[default: smollm2-135m]"),
        features: str = typer.Option(None, "--features", help="A features run: its layers' MLP units are the "
                                     "dictionary's features (plus an error node) instead of neurons"),
        out: str = typer.Option(None, "--out", "-o", help="Run folder [default: runs/circuit-TASK]"),
        method: str = typer.Option("eap", help="eap or eap-ig"),
        mlp: str = typer.Option("units", help="MLP writers: units (every neuron or feature) or layer (one per MLP)"),
        steps: int = typer.Option(5, help="Interpolation steps of eap-ig"),
        pairs: int = typer.Option(None, help="Use the first N pairs"),
        target: float = typer.Option(0.8, help="The chosen circuit is the smallest reaching this faithfulness"),
        sizes: str = typer.Option(None, help="Circuit sizes (edges) to measure, e.g. '1,10,100' [default: "
                                  "1..50000 on a log scale]"),
        check_top: int = typer.Option(10, help="Top edges checked by exact patching"),
        bos: bool = typer.Option(True, "--bos/--no-bos", help="Prepend the model's BOS token"),
        device: DeviceOpt = None,
        overwrite: OverwriteOpt = False,
    ) -> None:
        """Rank every edge between the embeddings, attention heads, MLP neurons (or features) and the logits by
        attribution patching, grow the circuit by score, report faithfulness against size and check the top edges
        by exact patching; writes circuit.json, edges.parquet and an offline circuit.html."""
        from ..circuits.discovery import discover
        from ..circuits.report import write_circuit_run
        from ..circuits.tasks import load_task
        from ..models.loading import load_model
        from ..runfolder import RunFolder

        t = load_task(task, limit=pairs)
        out = out or f"runs/circuit-{t.name}"
        RunFolder(out, kind="circuit").check(overwrite=overwrite)
        m = load_model(model or "smollm2-135m", device=device or "cpu")
        if features:
            from ..circuits.dictionary import Dictionary
            from ..circuits.features import DictionaryModel, dictionary_file, feature_spec

            path = dictionary_file(features)
            dic = Dictionary.load(path)
            m = DictionaryModel(m, dic, feature_spec(m.name, dic, path))
        size_list = parse_int_list(sizes, "--sizes")
        with console.status("discovering the circuit") as status:
            result = discover(m, t, method=method, steps=steps, sizes=size_list, target=target, check_top=check_top,
                              prepend_bos=bos, mlp=mlp, progress=lambda s: status.update(f"circuit: {s}"))
        summary = result.summary()
        c = summary["circuit"]
        console.print(f"{t.name}: {len(t)} pairs, logit difference clean {result.clean:.3f}, corrupted "
                      f"{result.corrupted:.3f}; {summary['edges_total']:,} edges scored ({method})")
        for point in result.curve:
            console.print(f"  {point['edges']:>6} edges  {point['nodes']:>5} writers  faithfulness "
                          f"{point['faithfulness']:.3f}")
        console.print(f"Chosen circuit: {c['n_edges']} edges, faithfulness {c['faithfulness']:.3f}"
                      f"{'' if summary['reached_target'] else ' (target not reached)'}")
        rho = summary["exact_vs_eap_spearman"]
        if rho is not None:
            console.print(f"Top {len(result.checks)} edges by exact patching: Spearman {rho:.2f} against EAP")
        cfg = {"task": task, "model": m.name, "method": method, "steps": steps, "pairs": len(t), "target": target,
               "sizes": size_list, "check_top": check_top, "mlp": mlp, "prepend_bos": bos, "features": features}
        write_circuit_run(result, out, m.n_layers, cfg, overwrite=overwrite)
        console.print(f"Wrote [bold]{out}[/] (circuit.json, edges.parquet, circuit.html)")
