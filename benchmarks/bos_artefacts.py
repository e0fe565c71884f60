"""Which BOS token should a scan prepend? Loss, first-token artefacts and attention sinks, per candidate.

For each candidate start token (by default ``<|endoftext|>``, ``<|im_start|>`` and no BOS at all) it runs the
model over the same windows of the bundled corpus and measures:

* **loss**: mean next-token NLL of the first real tokens (real index 1..5, i.e. positions 1..5 with a BOS) and
  over all real tokens, split into windows that start a document and windows that continue one. With a BOS the
  model also predicts the first real token from the BOS alone (``nll[r0]``); without one it cannot.
* **first-token artefacts** in the MLP neurons (``mlp.hook_post``) of every layer: each neuron's typical scale is
  the 99.9th percentile of ``|a|`` over real index >= 7 (positions >= 8 with a BOS) in that same condition; a
  neuron is an artefact at a position when ``|a|`` there exceeds ``--factor`` (10) times that scale — counted
  when it happens in *any* window (``n>10x any``) and when it is systematic, i.e. in the median window
  (``n>10x med``); and the neurons whose largest ``|a|`` at the position exceeds their own largest at real
  index >= 7 (``n>own max``: the position would be their top activation in a scan). Also the largest ``|a|`` at
  the position against the largest anywhere at real index >= 7 (``ref max``).
* **residual norm**: the largest, over layers, of the mean ``||resid_post||`` at the position divided by the
  median norm at real index >= 7 ("massive activations").
* **attention sink**: mean attention probability (all layers, all heads, queries at real index >= 7) to key
  position 0 and to key position 1.

Every condition sees the same real tokens: the windows are cut as the scan cuts them with a BOS (127 real tokens
after the BOS, ``iter_windows(..., context_length=128, bos_token_id=0)``); ``<|im_start|>`` swaps the BOS id, and
"no BOS" drops it (127 tokens, the first real token then sits at position 0, which the scan excludes). Rows are
keyed by absolute position in the window so they read as the scan sees them.

    python benchmarks/bos_artefacts.py                       # whole bundled corpus, embedded model (~5 min CPU)
    python benchmarks/bos_artefacts.py --max-tokens 10000    # a subset
    python benchmarks/bos_artefacts.py --json out.json       # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field

import torch

REF_FROM = 7  # reference positions: real index >= 7 (absolute position >= 8 with a BOS)
TOPK = 96  # per-neuron top values kept at reference positions (enough for the 99.9th pct of <= 96k tokens)
SHOW_POSITIONS = (0, 1, 2, 3)


@dataclass
class Acc:
    """Accumulated statistics of one condition."""

    name: str
    bos: int | None
    n_windows: int = 0
    n_ref: int = 0  # reference tokens (per neuron)
    top: torch.Tensor | None = None  # [L, d_mlp, TOPK] largest |a| at reference positions
    pos_abs: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # pos -> [windows of [L, d_mlp]]
    resid_ref: list[list[torch.Tensor]] = field(default_factory=list)  # per layer: ref-position norms
    resid_pos: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # pos -> [windows of [L]]
    attn_sum: torch.Tensor | None = None  # [L, 2] summed attention to key 0 / key 1
    attn_n: int = 0
    nll: list[torch.Tensor] = field(default_factory=list)  # per window: [n_real] NLL of real token r (nan: none)
    doc_start: list[bool] = field(default_factory=list)


def real_windows(tokenizer, context_length: int, max_tokens: int | None):
    """(doc_id, is_doc_start, real_ids) of the scan's windows with a BOS, without the BOS."""
    from neuronhunter.data.batches import iter_windows
    from neuronhunter.data.corpus import Corpus

    out = []
    for w in iter_windows(Corpus(None), tokenizer, context_length=context_length, bos_token_id=0,
                          max_tokens=max_tokens):
        out.append((w.doc_id, w.start == 0, w.ids[1:]))
    return out


def run_condition(model, acc: Acc, windows, batch_size: int) -> None:
    from neuronhunter.models.sites import Site

    L = model.n_layers
    shift = 1 if acc.bos is not None else 0
    sites = ([Site.mlp_post(i) for i in range(L)] + [Site(i, "hook_resid_post") for i in range(L)]
             + [Site(i, "attn.hook_pattern") for i in range(L)])
    acc.resid_ref = [[] for _ in range(L)]
    acc.attn_sum = torch.zeros(L, 2, dtype=torch.float64)
    pad = model.tokenizer.pad_token_id or 0
    for b0 in range(0, len(windows), batch_size):
        chunk = windows[b0 : b0 + batch_size]
        rows = [([acc.bos] if acc.bos is not None else []) + ids for _, _, ids in chunk]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logits, cache = model.run_with_cache(ids, mask, sites=sites)
        B = len(rows)
        pos = torch.arange(T)
        real_idx = pos - shift  # real index of each position (-1: the BOS)
        ref = mask.bool() & (real_idx >= REF_FROM).unsqueeze(0)  # [B, T]
        # --- loss: logits at p predict token p+1; real token r sits at p = r + shift
        logp = torch.log_softmax(logits.float(), dim=-1)
        tgt = ids[:, 1:]
        nll_pred = -logp[:, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [B, T-1]: token at p=1..T-1
        valid = mask[:, 1:].bool()
        for i, (_, start, real) in enumerate(chunk):
            n_real = len(real)
            row = torch.full((n_real,), math.nan)
            # predicted positions p = 1..T-1 -> real index p - shift
            for_p = nll_pred[i][valid[i]]  # tokens at p = 1 .. len(rows[i]) - 1
            r_first = 1 - shift  # real index of p = 1
            row[r_first:] = for_p[: n_real - r_first]
            acc.nll.append(row)
            acc.doc_start.append(start)
        # --- neurons
        mlp = torch.stack([cache[Site.mlp_post(i)].abs() for i in range(L)], dim=1)  # [B, L, T, d]
        sel = mlp.permute(1, 3, 0, 2)[:, :, ref]  # [L, d, n_ref_batch]
        acc.n_ref += int(ref.sum())
        merged = sel if acc.top is None else torch.cat([acc.top, sel], dim=-1)
        k = min(TOPK, merged.shape[-1])
        acc.top = merged.topk(k, dim=-1).values
        for p in SHOW_POSITIONS:
            keep = mask[:, p].bool() if p < T else torch.zeros(B, dtype=torch.bool)
            acc.pos_abs.setdefault(p, []).extend(mlp[keep, :, p, :].unbind(0))
        # --- residual norms
        norms = torch.stack([cache[Site(i, "hook_resid_post")].norm(dim=-1) for i in range(L)], dim=1)  # [B,L,T]
        for i in range(L):
            acc.resid_ref[i].append(norms[:, i][ref])
        for p in SHOW_POSITIONS:
            keep = mask[:, p].bool() if p < T else torch.zeros(B, dtype=torch.bool)
            acc.resid_pos.setdefault(p, []).extend(norms[keep, :, p].unbind(0))
        # --- attention to key 0 and key 1 from reference queries
        for i in range(L):
            pat = cache[Site(i, "attn.hook_pattern")]  # [B, H, q, k]
            q = pat.permute(0, 2, 1, 3)[ref]  # [n_ref_q, H, k]
            acc.attn_sum[i, 0] += q[..., 0].sum().double()
            acc.attn_sum[i, 1] += q[..., 1].sum().double()
        acc.attn_n += int(ref.sum()) * pat.shape[1]
        acc.n_windows += B
        del cache, mlp, logits, logp


def summarise(acc: Acc, factor: float) -> dict:
    q = 0.999
    n = acc.n_ref
    rank = max(1, math.ceil((1 - q) * n))  # the rank-th largest value is the q-quantile (upper)
    if rank > acc.top.shape[-1]:
        raise SystemExit(f"TOPK={TOPK} too small for {n} reference tokens")
    scale = acc.top[..., rank - 1].clamp_min(1e-6)  # [L, d]
    ref_max = acc.top[..., 0]
    li, ni = divmod(int(ref_max.argmax()), ref_max.shape[1])
    out = {"name": acc.name, "bos": acc.bos, "windows": acc.n_windows, "ref_tokens": n,
           "ref_max": float(ref_max.max()), "ref_max_neuron": f"L{li}N{ni}", "positions": {}}
    ref_med_norm = torch.stack([torch.cat(x).median() for x in acc.resid_ref])  # [L]
    for p in SHOW_POSITIONS:
        vals = acc.pos_abs.get(p) or []
        if not vals:
            continue
        a = torch.stack(vals)  # [W, L, d]
        mx = a.max(dim=0).values
        med = a.median(dim=0).values
        over_any = mx > factor * scale
        over_med = med > factor * scale
        li, ni = divmod(int(mx.argmax()), mx.shape[1])
        rn = torch.stack(acc.resid_pos[p]).mean(dim=0) / ref_med_norm  # [L]
        is_bos = acc.bos is not None and p == 0
        out["positions"][p] = {
            "what": "BOS" if is_bos else f"real[{p - (1 if acc.bos is not None else 0)}]",
            "n_any": int(over_any.sum()), "n_med": int(over_med.sum()), "n_top": int((mx > ref_max).sum()),
            "layers_any": sorted({int(x) for x in over_any.nonzero()[:, 0]}),
            "max": float(mx.max()), "max_neuron": f"L{li}N{ni}", "max_neuron_scale": float(scale[li, ni]),
            "resid_ratio": float(rn.max()), "resid_layer": int(rn.argmax()),
        }
    attn = (acc.attn_sum / acc.attn_n).float()  # [L, 2]
    out["attn_key0"] = float(attn[:, 0].mean())
    out["attn_key1"] = float(attn[:, 1].mean())
    out["attn_key0_min_layer"] = float(attn[:, 0].min())
    width = max(len(x) for x in acc.nll)
    nll = torch.stack([torch.nn.functional.pad(x, (0, width - len(x)), value=math.nan) for x in acc.nll])
    starts = torch.tensor(acc.doc_start)

    def mean(x: torch.Tensor) -> float:
        x = x[~torch.isnan(x)]
        return float(x.mean()) if x.numel() else math.nan

    out["nll"] = {}
    for tag, rows in (("all", torch.ones_like(starts)), ("doc_start", starts), ("continuation", ~starts)):
        sub = nll[rows]
        out["nll"][tag] = {"n_windows": int(rows.sum()),
                           "r0": mean(sub[:, 0]), **{f"r{r}": mean(sub[:, r]) for r in range(1, 6)},
                           "r1_5": mean(sub[:, 1:6]), "r1_all": mean(sub[:, 1:]), "r7_all": mean(sub[:, 7:]),
                           "n_tokens_r1_all": int((~torch.isnan(sub[:, 1:])).sum())}
    return out


def print_tables(results: list[dict], factor: float, n_real: int, elapsed: float) -> None:
    print(f"\nTokens: {n_real} real tokens in {results[0]['windows']} windows "
          f"({results[0]['nll']['doc_start']['n_windows']} start a document); reference (real index >= {REF_FROM}) "
          f"{results[0]['ref_tokens']} tokens per neuron; {elapsed:.0f} s\n")
    print("Next-token loss (mean NLL, nats). r = real index (position r+1 with a BOS); r0 is predicted from the BOS")
    print(f"{'condition':<16}{'windows':<14}{'r0':>7}{'r1':>7}{'r2':>7}{'r3':>7}{'r4':>7}{'r5':>7}"
          f"{'r1..5':>8}{'r1..':>8}{'r7..':>8}")
    for tag in ("all", "doc_start", "continuation"):
        for res in results:
            s = res["nll"][tag]
            r0 = "-" if math.isnan(s["r0"]) else f"{s['r0']:.2f}"
            print(f"{res['name']:<16}{tag + ' (' + str(s['n_windows']) + ')':<14}{r0:>7}"
                  + "".join(f"{s[f'r{r}']:>7.2f}" for r in range(1, 6))
                  + f"{s['r1_5']:>8.3f}{s['r1_all']:>8.3f}{s['r7_all']:>8.3f}")
    print(f"\nMLP neurons (30 layers x d_mlp): |a| > {factor:g} x (99.9th pct of |a| at real index >= {REF_FROM}); "
          "resid = max over layers of mean ||resid_post|| / median at reference")
    print(f"{'condition':<16}{'pos':>4} {'token':<9}{'n>10x any':>10}{'n>10x med':>10}{'max |a|':>9}"
          f"{'(neuron, its scale)':>24}{'ref max':>9}{'n>own max':>10}{'resid':>7}")
    for res in results:
        for p, s in res["positions"].items():
            print(f"{res['name']:<16}{p:>4} {s['what']:<9}{s['n_any']:>10}{s['n_med']:>10}{s['max']:>9.1f}"
                  f"{s['max_neuron'] + ', ' + format(s['max_neuron_scale'], '.2f'):>24}"
                  f"{res['ref_max']:>9.1f}{s['n_top']:>10}{s['resid_ratio']:>6.1f}x")
    print("\nAttention from queries at real index >= 7 (mean over 30 layers x heads)")
    print(f"{'condition':<16}{'to key 0':>10}{'to key 1':>10}{'min layer key 0':>17}")
    for res in results:
        print(f"{res['name']:<16}{res['attn_key0']:>10.3f}{res['attn_key1']:>10.3f}{res['attn_key0_min_layer']:>17.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=None, help="real tokens to use (default: whole corpus)")
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--factor", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--candidates", default="<|endoftext|>,<|im_start|>,none",
                    help="comma-separated token strings; 'none' for no BOS")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import neuronhunter as nh

    t0 = time.time()
    model = nh.load_model(args.model)
    tok = model.tokenizer
    windows = real_windows(tok, args.context_length, args.max_tokens)
    n_real = sum(len(w[2]) for w in windows)
    print(f"model {args.model} ({model.info.get('gguf', model.info.get('source'))}), "
          f"tokenizer bos={tok.bos_token!r} eos={tok.eos_token!r}; {len(windows)} windows, {n_real} real tokens")
    results = []
    for cand in args.candidates.split(","):
        cand = cand.strip()
        bos = None if cand.lower() == "none" else tok.convert_tokens_to_ids(cand)
        name = "no BOS" if bos is None else f"{cand}({bos})"
        acc = Acc(name, bos)
        t1 = time.time()
        with torch.inference_mode():
            run_condition(model, acc, windows, args.batch_size)
        results.append(summarise(acc, args.factor))
        print(f"  {name}: {time.time() - t1:.0f} s", flush=True)
        del acc
    print_tables(results, args.factor, n_real, time.time() - t0)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "n_real_tokens": n_real, "factor": args.factor, "results": results},
                      fh, indent=1)


if __name__ == "__main__":
    main()
