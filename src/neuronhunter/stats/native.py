"""The pieces of the scan that are not plain torch: the per-neuron histogram loop (``histogram.c``) and the
exemplar updates (``exemplars.c``: top-k windows and band samples, see :mod:`~neuronhunter.stats.exemplars`).

Filling every neuron's histogram is a scatter of increments, which neither inductor nor ``torch.bincount`` does
fast on CPU: ``bincount`` is a serial loop over a flat index that the fused kernel first has to write (4 bytes per
activation), after two full passes that look for its minimum and maximum. ``histogram.c`` reads the activations
once, computes each bin in registers and increments the running counts in place, with the neurons split over
torch's own OpenMP threads. Profiled inside a scan of the embedded model (2 threads, 16x128-token batches), it takes
~2 ms per layer and batch where writing the flat index in the fused kernel and counting it took ~4 ms.

It is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``; inductor needs one anyway)
into the cache folder (``$NEURONHUNTER_CACHE/native``), keyed by the source and the compiler, and loaded with
ctypes. Where that is not possible (no compiler, not Linux/macOS) the failure is logged once and the histograms
are filled by ``bincount`` as before; both give identical counts (tested). ``NEURONHUNTER_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("histogram.c"), Path(__file__).with_name("exemplars.c"))
_lib: ctypes.CDLL | None = None
_failed = False


def enabled() -> bool:
    """Whether the native histogram will be tried (``NEURONHUNTER_NATIVE=0`` turns it off)."""
    return not _failed and os.environ.get("NEURONHUNTER_NATIVE", "1") not in ("0", "false")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _torch_uses_gomp() -> bool:
    """Whether torch runs its threads on GNU OpenMP (libgomp loaded in this process): only then does a library
    built with ``-fopenmp`` join torch's thread team instead of bringing a second OpenMP runtime (and threads)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps") as fh:
            return "libgomp" in fh.read()
    except OSError:
        return False


def _build(cc: str, target: Path, variants: tuple[list[str], ...]) -> None:
    """Compile the sources into ``target`` (atomically) with the first of the flag ``variants`` that builds."""
    from ..io import atomic_path

    with atomic_path(target) as tmp:
        errors = []
        for flags in variants:
            cmd = [cc, "-O3", "-std=c99", "-shared", "-fPIC", *flags, *map(str, SOURCES), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                return
            errors.append((proc.stderr or proc.stdout).strip().splitlines()[:1])
        raise OSError(f"{Path(cc).name} failed: {errors[0][0] if errors[0] else 'no output'}")


def _load() -> ctypes.CDLL:
    from ..io import cache_dir

    if platform.system() not in ("Linux", "Darwin"):
        raise OSError(f"not built on {platform.system()}")
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    variants = (["-fopenmp"], []) if _torch_uses_gomp() else ([],)  # with OpenMP where it is torch's, else serial
    key = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES) + repr((cc, version, platform.machine(), variants)).encode())
    target = cache_dir() / "native" / f"histogram-{key.hexdigest()[:16]}.so"
    if not target.exists():
        _build(cc, target, variants)
    lib = ctypes.CDLL(str(target))
    fn = lib.nh_histogram_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.nh_topk_update.restype = None
    lib.nh_topk_update.argtypes = [p, p, p, i64, i64, i64, p, p, p]
    lib.nh_bands_update.restype = None
    lib.nh_bands_update.argtypes = [p, p, p, p, i64, i64, p, p, i64, i64, p, p, p, p]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded helper, built on first use; None where it is turned off or could not be built (logged once)."""
    global _lib, _failed
    if _lib is None and enabled():
        try:
            _lib = _load()
        except (OSError, subprocess.SubprocessError) as exc:
            _failed = True
            log.warning("native statistics loops not available (%s); histograms are filled by torch.bincount and "
                        "exemplars by torch (slower)",
                        str(exc).strip()[:200] or type(exc).__name__)
    return _lib if enabled() else None


def used_by_scan(compile_stats: bool, device: torch.device | str) -> bool:
    """Whether a scan with these settings fills its histograms natively (compiled statistics on CPU)."""
    from .kernels import compile_enabled

    return compile_enabled(compile_stats) and torch.device(device).type == "cpu" and library() is not None


def usable(x: Tensor) -> bool:
    """Whether :func:`add_histogram` can take ``x`` (CPU; float32, or half precision that is upcast)."""
    return x.device.type == "cpu" and x.is_floating_point() and library() is not None


def add_histogram(counts: Tensor, x: Tensor, keep: Tensor, scale: Tensor, shift: Tensor, top: float,
                  groups: Tensor | None = None, group_counts: Tensor | None = None) -> None:
    """Add ``x [..., d]`` (rows where ``keep [...]`` is True) to ``counts [d, nb]`` (int64, CPU) in place; the bin of
    ``v`` for neuron ``j`` is ``floor(clamp(v * scale[j] + shift[j], 0, top))`` (NaN: 0), as in
    :func:`~neuronhunter.stats.kernels.bin_index`.

    With ``groups`` (one int64 bit mask per row) each counted row is also added to ``group_counts [G, d, nb]``
    (int32) for every group bit set (the per-category histograms of the hunt), from the same bins.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native histogram is not available")
    d = x.shape[-1]
    rows = x.reshape(-1, d) if x.ndim != 2 else x
    if rows.dtype != torch.float32:
        rows = rows.float()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    flags = keep.reshape(-1).contiguous()
    if flags.numel() != rows.shape[0] or flags.dtype != torch.bool:
        raise ValueError("keep must be a bool tensor with one entry per row of x")
    if not (counts.dtype == torch.int64 and counts.is_contiguous() and counts.shape[0] == d and counts.device.type == "cpu"):
        raise ValueError("counts must be a contiguous int64 CPU tensor [d, bins]")
    scale = scale.to(torch.float32).contiguous()
    shift = shift.to(torch.float32).contiguous()
    if scale.shape != (d,) or shift.shape != (d,):
        raise ValueError("scale and shift must hold one value per neuron")
    g_ptr = gc_ptr = None
    n_groups = 0
    if groups is not None:
        if group_counts is None or group_counts.dtype != torch.int32 or not group_counts.is_contiguous() or \
                group_counts.shape[1:] != counts.shape:
            raise ValueError("group_counts must be a contiguous int32 tensor [groups, d, bins]")
        groups = groups.reshape(-1).to(torch.int64).contiguous()
        if groups.numel() != rows.shape[0]:
            raise ValueError("groups must hold one bit mask per row of x")
        g_ptr, gc_ptr, n_groups = groups.data_ptr(), group_counts.data_ptr(), group_counts.shape[0]
    lib.nh_histogram_f32(rows.data_ptr(), flags.data_ptr(), rows.shape[0], d, rows.stride(0), scale.data_ptr(),
                         shift.data_ptr(), top, counts.shape[1], counts.data_ptr(), g_ptr, n_groups, gc_ptr,
                         torch.get_num_threads())


def _rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.detach().cpu().to(dtype).contiguous()


def _held(t: Tensor, dtype: torch.dtype, name: str) -> None:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor")


def topk_update(values: Tensor, window: Tensor, pos: Tensor, peak: Tensor, peak_pos: Tensor,
                window_ids: Tensor) -> None:
    """Offer windows (peaks ``[n, d]`` at positions ``peak_pos [n, d]``, ids ``window_ids [n]``) to the top-k lists
    ``values [k, d]`` (float32), ``window [k, d]`` (int64), ``pos [k, d]`` (int32), in place (``exemplars.c``)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native exemplar loop is not available")
    _held(values, torch.float32, "values")
    _held(window, torch.int64, "window")
    _held(pos, torch.int32, "pos")
    k, d = values.shape
    peak, peak_pos, ids = _rows(peak, torch.float32), _rows(peak_pos, torch.int64), _rows(window_ids, torch.int64)
    if peak.shape[1:] != (d,) or peak_pos.shape != peak.shape or ids.shape != peak.shape[:1]:
        raise ValueError("peaks, positions and window ids do not match the lists")
    lib.nh_topk_update(peak.data_ptr(), peak_pos.data_ptr(), ids.data_ptr(), peak.shape[0], d, k,
                       values.data_ptr(), window.data_ptr(), pos.data_ptr())


def bands_update(hash_: Tensor, window: Tensor, pos: Tensor, value: Tensor, scale: Tensor, inner: Tensor,
                 peak: Tensor, peak_pos: Tensor, window_ids: Tensor, window_hashes: Tensor) -> None:
    """Offer windows to band samples ``hash_, window [B, r, d]`` (int64), ``pos`` (int32), ``value`` (float32), in
    place; ``scale [d]`` clamped to > 0 and ``inner [B - 1]`` the inner band edges (``exemplars.c``)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native exemplar loop is not available")
    _held(hash_, torch.int64, "hash")
    _held(window, torch.int64, "window")
    _held(pos, torch.int32, "pos")
    _held(value, torch.float32, "value")
    n_bands, r, d = hash_.shape
    peak, peak_pos = _rows(peak, torch.float32), _rows(peak_pos, torch.int64)
    ids, hashes = _rows(window_ids, torch.int64), _rows(window_hashes, torch.int64)
    scale, inner = _rows(scale, torch.float32), _rows(inner, torch.float32)
    if peak.shape[1:] != (d,) or peak_pos.shape != peak.shape or ids.shape != peak.shape[:1] or \
            hashes.shape != ids.shape or scale.shape != (d,) or inner.shape != (n_bands - 1,):
        raise ValueError("peaks, positions, window ids, hashes, scales or band edges do not match the samples")
    lib.nh_bands_update(peak.data_ptr(), peak_pos.data_ptr(), ids.data_ptr(), hashes.data_ptr(), peak.shape[0], d,
                        scale.data_ptr(), inner.data_ptr(), n_bands, r, hash_.data_ptr(), window.data_ptr(),
                        pos.data_ptr(), value.data_ptr())
