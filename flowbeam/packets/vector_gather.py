"""Gathering one fixed-layout header record per packet from a batch buffer, for the vector paths.

Every vectorised stage (link layers, IP headers, extension headers, transports) reads its
headers this way, so the trick that makes it cheap lives once, here.
"""

from __future__ import annotations

import numpy as np


def read_only(table: np.ndarray) -> np.ndarray:
    """Module-level tables are shared by every decoder: make accidental writes fail loudly."""
    table.flags.writeable = False
    return table


def gather_records(data: np.ndarray, starts: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One ``dtype`` record per start position, copied from ``data`` (contiguous uint8).

    A strided view with a one-byte stride exposes a record at every byte of the buffer, so a
    single fancy index copies all of them. The view is of opaque ``V<width>`` items and only
    the gathered copy is reinterpreted as ``dtype``: NumPy copies void items with a plain
    memory copy (~12 ns per 54-byte record here) but structured items field by field (~60 ns).
    Records that would run past the end of the buffer (the last packets of a batch) are read
    from a small zero-padded copy of the tail instead; the bytes past a packet's caplen are
    garbage either way and the callers mask them out.
    """
    width = dtype.itemsize
    limit = len(data) - width  # last start whose record lies wholly inside the buffer
    if len(starts) == 0:
        return np.empty(0, dtype=dtype)
    if limit >= 0 and int(starts.max()) <= limit:
        return _record_view(data, width, limit + 1)[starts].view(dtype)
    out = np.empty(len(starts), dtype=as_void(dtype))
    over = starts > limit
    inside = ~over
    if limit >= 0 and inside.any():
        out[inside] = _record_view(data, width, limit + 1)[starts[inside]]
    tail_start = int(starts[over].min())
    tail = np.zeros(len(data) - tail_start + width, dtype=np.uint8)
    tail[: len(data) - tail_start] = data[tail_start:]
    out[over] = _record_view(tail, width, len(tail) - width + 1)[starts[over] - tail_start]
    return out.view(dtype)


def take_records(records: np.ndarray, which: np.ndarray) -> np.ndarray:
    """``records[which]`` for structured records, moved as opaque bytes.

    Indexing a structured array copies field by field (slow); its void view copies each
    record with one memory copy.
    """
    return records.view(as_void(records.dtype))[which].view(records.dtype)


def take_rows(values: np.ndarray, rows: np.ndarray, copy: bool = False) -> np.ndarray:
    """``values[rows]`` for sorted distinct ``rows``: ``values`` itself (a plain copy if
    ``copy``) when that is all of it.

    Most batches are all IP of one link type: their per-packet arrays are then used as they
    are, not copied by a fancy index (without ``copy``, callers must not write to the result).
    """
    if len(rows) != len(values):
        return values[rows]
    return values.copy() if copy else values


def _record_view(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """``count`` overlapping ``width``-byte items, one starting at each byte of ``data``."""
    return np.ndarray(shape=(count,), dtype=np.dtype((np.void, width)), buffer=data, strides=(1,))


def as_void(dtype: np.dtype) -> np.dtype:
    """Opaque bytes of the same size as ``dtype``: NumPy moves these with a plain copy."""
    return np.dtype((np.void, dtype.itemsize))
