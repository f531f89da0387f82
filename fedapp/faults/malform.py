"""Broken updates, made on purpose: what a buggy or hostile client could send.

Used by the ``malformed`` fault (:mod:`fedapp.faults.mod`) and by the fuzz
benchmark (``simulations/bench_faults.py``), so the server is tested against the
same malformations the product injects.
"""

from __future__ import annotations

import numpy as np
from flwr.common import NDArrays

from fedapp.faults.plan import MALFORMATIONS

_BAD_DTYPES = ("float64", "float16", "int32", "complex64", "bool", "<U4")


def malform(kind: str, reference: NDArrays, update: NDArrays, rng: np.random.Generator) -> NDArrays:
    """A copy of ``update`` broken as ``kind`` says; ``reference`` is the global model it was trained from.

    ``nan``/``inf``: one to all entries of one array; ``shape``: one array cut,
    grown or transposed; ``count``: an array dropped or added; ``dtype``: one
    array cast to another type (wider float, int, complex, bool, text);
    ``norm``: the update ``update - reference`` stretched until its largest entry is
    10^3 .. 10^37 (finite in float32 up to 3.4e38, so only a norm check can refuse it).
    """
    if kind not in MALFORMATIONS:
        raise ValueError(f"unknown malformation {kind!r}; valid: {list(MALFORMATIONS)}")
    out = [np.array(a, copy=True) for a in update]
    i = int(rng.integers(len(out)))
    if kind in ("nan", "inf"):
        value = np.nan if kind == "nan" else float(rng.choice([np.inf, -np.inf]))
        flat = out[i].astype(np.float32).reshape(-1)
        count = int(rng.integers(1, flat.size + 1))
        flat[rng.choice(flat.size, size=count, replace=False)] = value
        out[i] = flat.reshape(out[i].shape)
    elif kind == "shape":
        a = out[i]
        variant = int(rng.integers(3))
        if variant == 0 and a.size > 1:
            out[i] = a.reshape(-1)[:-1]
        elif variant == 1 or a.ndim < 2:
            out[i] = np.concatenate([a.reshape(-1), np.zeros(1, a.dtype)]).reshape(-1)
        else:
            out[i] = np.swapaxes(a, 0, -1).copy() if a.shape[0] != a.shape[-1] else a.reshape(-1)
        if out[i].shape == a.shape:  # a square array flattened to its own shape cannot happen; guard anyway
            out[i] = a.reshape(-1)[:-1]
    elif kind == "count":
        if rng.random() < 0.5 and len(out) > 1:
            del out[i]
        else:
            out.insert(i, np.zeros_like(out[i]))
    elif kind == "dtype":
        dtype = _BAD_DTYPES[int(rng.integers(len(_BAD_DTYPES)))]
        out[i] = out[i].astype(dtype)
    else:  # norm: the update stretched until its largest entry is 10^3 .. 10^37
        target = 10.0 ** float(rng.uniform(3, 37))
        deltas = [u.astype(np.float64) - r for r, u in zip(reference, update)]
        largest = max(float(np.abs(d).max()) for d in deltas if d.size)
        if largest == 0.0:  # a zero update has no direction to stretch
            deltas[i] = np.ones_like(deltas[i])
            largest = 1.0
        out = [(r + d * (target / largest)).astype(u.dtype) for r, u, d in zip(reference, update, deltas)]
    return out
