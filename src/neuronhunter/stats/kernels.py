"""The per-batch reduction behind :class:`~neuronhunter.stats.layer.LayerStats`, fused by ``torch.compile``.

:func:`batch_reduce` turns one batch of activations ``[windows, pos, d]`` and the mask of the tokens that count
into the small per-batch quantities the accumulators add up: per-window maxima and their positions (top-k), the
minimum, per-position sums, power sums up to the 4th, the count above the threshold, and (where the histograms are
not filled natively, :mod:`~neuronhunter.stats.native`) every token's histogram bin. Run eagerly that is some
twenty passes over the batch, each a few MB of memory traffic per layer; compiled (inductor: C++/OpenMP on CPU,
Triton on CUDA) the element-wise work fuses into a few loops that read the batch a few times.

The compiled functions are built on first use (seconds; inductor caches them on disk for later processes): one
specialised to the shape of a scan's full batches (when they hold at least 2**20 activations; a few such shapes
per process), which on CPU runs about twice as fast as the other, compiled with dynamic shapes, that serves every
other batch (last batches, small scans). Batches of one window or one position
are padded with uncounted tokens, since size-1 dims would make a specialised copy. Where compilation is not
possible (no C++ compiler, an unsupported platform) the first failure is logged once and the same function runs
eagerly. Compiled and eager results agree up to the float rounding of the sums (the summation order differs);
counts, maxima and positions are identical. ``benchmarks/bench_scan.py`` measures the whole scan against a bare
forward pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class BatchSums(NamedTuple):
    """What one batch contributes (``b`` windows, ``t`` positions, ``d`` neurons)."""

    wmax: Tensor  # [b, d] each window's maximum over its counted tokens (-inf for a window without any)
    wpos: Tensor  # [b, d] position of that maximum (first occurrence)
    wmin: Tensor  # [b, d] each window's minimum over its counted tokens (+inf for a window without any)
    wminpos: Tensor  # [b, d] position of that minimum (first occurrence)
    vmin: Tensor  # [d] minimum over the counted tokens (+inf if none)
    pos_sums: Tensor  # [t, d] per-position sums of the counted tokens
    s2: Tensor  # [d] sum of x**2 over the counted tokens (float32)
    s3: Tensor  # [d] sum of x**3
    s4: Tensor  # [d] sum of x**4
    active: Tensor  # [d] number of counted tokens with x > threshold
    active_neg: Tensor  # [d] number of counted tokens with x < -threshold
    bins: Tensor | None  # [b * t * d] histogram index ``bin + n_bins * neuron``; uncounted tokens get ``trash``


def bin_index(x: Tensor, scale: Tensor, shift: Tensor, top: Tensor, offsets: Tensor) -> Tensor:
    """Flat histogram index of every value of ``x [..., d]``: ``bin + (n_bins + 2) * neuron`` (``scale`` and
    ``shift`` are ``[d]``: each neuron has its own bins).

    ``x * scale + shift`` puts the underflow bin at ``[0, 1)`` and the overflow bin at ``[n_bins + 1, ...)``; after
    clamping to ``[0, top]`` (``top = n_bins + 1.5``) the conversion to int (truncation) is the floor; NaN goes to
    the underflow bin (as in the native loop, :mod:`~neuronhunter.stats.native`). The neuron
    offset is added after the conversion, in integers: added in float it would round values near a bin's upper
    edge into the next bin once the offsets are large.
    """
    return torch.minimum((x * scale + shift).nan_to_num(0.0).clamp_min(0.0), top).to(offsets.dtype) + offsets


def batch_reduce(
    x: Tensor, keep: Tensor, threshold: Tensor, scale: Tensor, shift: Tensor, top: Tensor, offsets: Tensor,
    trash: int, with_bins: bool = True,
) -> BatchSums:
    """Reduce one batch. ``x [b, t, d]`` (any float dtype; half precision is upcast), ``keep [b, t]`` bool marks
    the tokens that count (not padding, not position 0 unless it is counted). The histogram constants come from
    :meth:`~neuronhunter.stats.accumulators.Histogram.constants`; ``with_bins=False`` leaves the histogram index
    out (``bins`` is then None), for callers that fill the histograms from ``x`` themselves."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    k = keep.unsqueeze(-1)
    wmax, wpos = torch.where(k, x, float("-inf")).max(1)  # values and first index in one pass
    wmin, wminpos = torch.where(k, x, float("inf")).min(1)  # both tails: the bottom-k windows come from these
    z = torch.where(k, x, 0.0)  # uncounted tokens contribute nothing to the sums
    z2 = z * z
    # every reduction is first taken over positions (dim 1), like the window maxima, then over the few windows:
    # compiled, they share one loop over the batch (reducing over (0, 1) at once takes a second loop)
    vmin = wmin.amin(0)
    uncounted = (~keep).sum() * (threshold < 0)  # their zeros are "active" (either way) only if threshold < 0
    bins = torch.where(k, bin_index(x, scale, shift, top, offsets), trash).reshape(-1) if with_bins else None
    return BatchSums(
        wmax=wmax, wpos=wpos, wmin=wmin, wminpos=wminpos, vmin=vmin, pos_sums=z.sum(0),
        s2=z2.sum(1).sum(0), s3=(z2 * z).sum(1).sum(0), s4=(z2 * z2).sum(1).sum(0),
        active=(z > threshold).sum(1).sum(0) - uncounted, active_neg=(z < -threshold).sum(1).sum(0) - uncounted,
        bins=bins,
    )


def _reduce_static(*args: object) -> BatchSums:
    return batch_reduce(*args)  # type: ignore[arg-type]


def _reduce_dynamic(*args: object) -> BatchSums:
    return batch_reduce(*args)  # type: ignore[arg-type]


# A scan's full batches all have one shape; when they hold at least this many activations they get a kernel compiled
# for that shape, which runs about twice as fast as the shape-generic one (1.5 vs 3.1 ms for 16x128x1536 on 2 CPU
# threads). A few such shapes are allowed per process (each costs seconds of compilation, cached on disk);
# everything else (a scan's last batch, small scans, tests) runs the dynamic-shape kernel.
STATIC_MIN_ELEMENTS = 1 << 20
STATIC_MAX_SHAPES = 4
_static_shapes: set[tuple[object, ...]] = set()
_compiled: dict[str, Callable[..., BatchSums]] = {}
_compile_failed = False


def compile_enabled(requested: bool = True) -> bool:
    """Whether the fused kernel will be tried (``NEURONHUNTER_COMPILE=0`` turns it off everywhere)."""
    return requested and not _compile_failed and os.environ.get("NEURONHUNTER_COMPILE", "1") not in ("0", "false")


def _kernel(x: Tensor, with_bins: bool, specialise: bool) -> Callable[..., BatchSums]:
    """The compiled function for this batch: shape-specialised where asked for and worth it (large, one of the
    first few shapes), else shape-generic. Two separate functions, since dynamo keeps its compiled code per
    function."""
    key = (tuple(x.shape), x.stride(), x.dtype, x.device, with_bins)
    static = key in _static_shapes or (
        specialise and x.numel() >= STATIC_MIN_ELEMENTS and len(_static_shapes) < STATIC_MAX_SHAPES)
    if static:
        _static_shapes.add(key)
    kind = "static" if static else "dynamic"
    if kind not in _compiled:
        _compiled[kind] = torch.compile(_reduce_static if static else _reduce_dynamic, dynamic=not static)
    return _compiled[kind]


def reduce_batch(x: Tensor, keep: Tensor, constants: tuple[Tensor, ...], trash: int, *, compile: bool = True,
                 with_bins: bool = True, specialise: bool = False) -> BatchSums:
    """:func:`batch_reduce`, compiled when possible (see the module docstring); ``specialise`` says that many
    batches of this shape will follow (a scan's full batches), so a kernel compiled for it pays off."""
    global _compile_failed
    if compile_enabled(compile):
        try:
            b, t = keep.shape
            if b > 1 and t > 1:
                return _kernel(x, with_bins, specialise)(x, keep, *constants, trash, with_bins)
            # size-1 dims get a specialised recompilation (seconds, and memory that stays); pad instead with
            # tokens that do not count: they add nothing, and their outputs are cut off again
            pad_b, pad_t = int(b == 1), int(t == 1)
            x = torch.nn.functional.pad(x, (0, 0, 0, pad_t, 0, pad_b))
            keep = torch.nn.functional.pad(keep, (0, pad_t, 0, pad_b), value=False)
            r = _kernel(x, with_bins, False)(x, keep, *constants, trash, with_bins)
            return r._replace(wmax=r.wmax[:b], wpos=r.wpos[:b], wmin=r.wmin[:b], wminpos=r.wminpos[:b],
                              pos_sums=r.pos_sums[:t])
        except Exception as exc:  # inductor needs a C++ compiler on CPU and Triton on CUDA
            _compile_failed = True
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            log.warning("torch.compile is not available here (%s); scan statistics run eagerly (slower)", reason)
    return batch_reduce(x, keep, *constants, trash, with_bins)
