"""A runnable tour of the Python API (about a minute on 2 CPU cores with the embedded model).

    python examples/quickstart.py                       # embedded SmolLM2-135M-Instruct
    python examples/quickstart.py --model path/to/hf-folder --out runs/quickstart
"""

from __future__ import annotations

import argparse

import torch

import neuronhunter as nh


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--max-tokens", type=int, default=3000)
    args = p.parse_args()

    model = nh.load_model(args.model)
    print(model)

    # 1. Read activations at named sites.
    ids = model.to_tokens("The capital of France is Paris, and the capital of Italy is Rome.")
    last = model.n_layers - 1
    logits, cache = model.run_with_cache(ids, sites=[nh.Site.mlp_post(last), nh.Site.attn_pattern(0)])
    acts = cache[nh.Site.mlp_post(last)][0]  # [pos, d_mlp]
    pos, neuron = divmod(int(acts[1:].argmax()), acts.shape[1])
    tokens = model.to_str_tokens(ids[0])
    print(f"strongest neuron of layer {last} here: {neuron}, on token {tokens[pos + 1]!r} ({acts[1:].max():.2f})")

    # 2. Intervene: zero that neuron and see the next-token loss change (hooks are removed afterwards).
    def loss(lg: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(lg[0, :-1], ids[0, 1:]))

    with model.intervene({nh.Site.mlp_post(last): lambda a, s: a.index_fill(-1, torch.tensor([neuron]), 0.0)}):
        ablated = model.forward(ids)
    print(f"loss {loss(logits):.4f} -> {loss(ablated):.4f} with neuron {last}.{neuron} zeroed")

    # 3. Scan a few layers over the bundled corpus and look at the results as DataFrames.
    cfg = nh.ScanConfig(out=args.out, layers=[0, last], max_tokens=args.max_tokens, top_k=5, formats=["parquet"])
    result = nh.run_scan(cfg, model=model, overwrite=True)
    neurons = result.neurons_frame()
    top = neurons.nlargest(3, "max")[["layer", "neuron", "max", "mean", "frac_active"]]
    print(top.to_string(index=False))
    ex = result.examples_frame()
    best = top.iloc[0]
    rows = ex[(ex.layer == best.layer) & (ex.neuron == best.neuron)].head(3)
    for _, r in rows.iterrows():
        print(f"  {r.activation:7.2f}  {r.context!r}")
    print(f"run folder: {args.out}")


if __name__ == "__main__":
    main()
