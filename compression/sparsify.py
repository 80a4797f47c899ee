"""Top-k sparsification, per tensor or over all tensors at once."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from compression.errors import CodecError
from compression.frame import SparseTensor


def k_for(numel: int, fraction: float) -> int:
    """How many of ``numel`` entries a top-``fraction`` keeps: at least one."""
    return max(1, min(numel, math.ceil(fraction * numel)))


def topk_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the ``k`` non-zero entries of largest magnitude."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    # Partition only the non-zeros: numpy's introselect is pathologically slow on the
    # millions of tied zeros of an embedding-row delta (7 s against 20 ms).
    nz = np.flatnonzero(flat)
    if k >= nz.size:
        return nz.astype(np.int64)
    part = np.argpartition(np.abs(flat[nz]), nz.size - k)[nz.size - k :]
    return np.sort(nz[part]).astype(np.int64)


def topk_per_tensor(tensors: Mapping[str, np.ndarray], fraction: float) -> dict[str, SparseTensor]:
    """Keep the top ``fraction`` of each tensor's entries by magnitude (never exact zeros)."""
    _check_fraction(fraction)
    out: dict[str, SparseTensor] = {}
    for name, arr in tensors.items():
        flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
        if fraction >= 1.0:
            # Every non-zero goes; a mostly-zero tensor (a step averaged from sparse
            # updates, a frozen factor) goes as a sparse record of its non-zeros.
            nonzero = np.flatnonzero(flat)
            if nonzero.size < flat.size // 3:
                out[name] = SparseTensor(shape=tuple(arr.shape), values=flat[nonzero], indices=nonzero.astype(np.int64))
            else:
                out[name] = SparseTensor(shape=tuple(arr.shape), values=flat)
            continue
        # Exact zeros are never worth sending (rows of an embedding no local token touched).
        k = min(k_for(flat.size, fraction), int(np.count_nonzero(flat)))
        idx = topk_indices(flat, k)
        out[name] = SparseTensor(shape=tuple(arr.shape), values=flat[idx], indices=idx)
    return out


def topk_global(tensors: Mapping[str, np.ndarray], fraction: float) -> dict[str, SparseTensor]:
    """Keep the top ``fraction`` of all entries together: large tensors may take more than their share."""
    _check_fraction(fraction)
    if fraction >= 1.0:
        return topk_per_tensor(tensors, fraction)
    names = list(tensors)
    shapes = [tuple(np.shape(tensors[n])) for n in names]
    sizes = np.array([math.prod(int(d) for d in s) for s in shapes], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return {}
    # All tensors laid end to end: one threshold, one selection, then cut back into tensors.
    flat = np.concatenate([np.asarray(tensors[n], dtype=np.float32).reshape(-1) for n in names])
    mags = np.abs(flat)
    nonzero = mags[mags > 0]
    k = min(k_for(total, fraction), nonzero.size)
    if k == 0:
        return {
            n: SparseTensor(shape=s, values=np.zeros(0, np.float32), indices=np.zeros(0, np.int64))
            for n, s in zip(names, shapes, strict=True)
        }
    threshold = np.partition(nonzero, nonzero.size - k)[nonzero.size - k]
    # Everything strictly above the threshold is kept; ties at the threshold fill the rest of k,
    # first come first served in tensor order.
    above = np.flatnonzero(mags > threshold)
    ties = np.flatnonzero(mags == threshold)[: max(0, k - above.size)]
    idx = np.sort(np.concatenate([above, ties])).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    cuts = np.searchsorted(idx, offsets).tolist()
    values = flat[idx]
    out: dict[str, SparseTensor] = {}
    for j, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        lo, hi = cuts[j], cuts[j + 1]
        out[name] = SparseTensor(shape=shape, values=values[lo:hi], indices=idx[lo:hi] - offsets[j])
    return out


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise CodecError(f"top-k fraction must be in (0, 1], got {fraction}")


def rotating_period(fraction: float) -> int:
    """The stride of a rotating selection that sends ``fraction`` of the entries."""
    _check_fraction(fraction)
    return max(1, round(1.0 / fraction))


def rotating_global(tensors: Mapping[str, np.ndarray], fraction: float, phase: int) -> dict[str, SparseTensor]:
    """Every ``period``-th entry of all tensors laid end to end, starting at ``phase mod period``.

    The selection depends only on the shapes and ``phase``, not on the values: devices
    that share a phase (the global version they trained from) send the same coordinates,
    and over ``period`` consecutive phases every coordinate is sent once. The indices are
    an arithmetic progression, whose gaps zstd codes in almost nothing.
    """
    period = rotating_period(fraction)
    out: dict[str, SparseTensor] = {}
    offset = 0
    for name, arr in tensors.items():
        flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
        first = (phase - offset) % period
        # A tensor with nothing to send (frozen, or untouched) sends an empty record.
        idx = np.arange(first, flat.size, period, dtype=np.int64) if flat.any() else np.zeros(0, np.int64)
        out[name] = SparseTensor(shape=tuple(np.shape(arr)), values=flat[idx], indices=idx)
        offset += flat.size
    return out
