"""Applying the fragment tracker to a decoded batch: later fragments get their first's ports.

Both decode paths only recognise fragments (``FragmentPackets``); this step hands them to the
``FragmentTracker`` in capture order, whichever path decoded them, and rewrites the batch's
columns as its ``FragmentPlan`` says: later fragments completed in place, fragments that must
wait taken out, and released or pushed-out fragments emitted right after the row that let them
go. Everything but the tracker's own loop is whole-column NumPy work.
"""

from __future__ import annotations

import numpy as np

from flowbeam.packets.columns import COLUMN_DTYPES, COLUMN_NAMES
from flowbeam.packets.ip_fragments import (
    FragmentPackets,
    FragmentPlan,
    FragmentTracker,
    pack_transport,
    unpack_transport,
)

Columns = dict[str, np.ndarray]


def complete_fragments(
    cols: Columns, positions: np.ndarray, fragments: FragmentPackets, tracker: FragmentTracker
) -> Columns:
    """``cols`` (one row per packet at ``positions``, capture order) after fragment tracking."""
    order = np.argsort(fragments.pos, kind="stable")
    rows = np.searchsorted(positions, fragments.pos[order])
    values = pack_transport(cols["protocol"][rows], cols["src_port"][rows], cols["dst_port"][rows])
    plan = tracker.track(fragments.first[order], fragments.key[order], rows, values)
    tracker.detach(lambda row: tuple(cols[name][row].item() for name in COLUMN_NAMES))
    return _apply(cols, plan)


def rows_to_columns(rows: list[tuple]) -> Columns:
    """Row tuples (in ``COLUMN_NAMES`` order) as columns of the ``PacketColumns`` dtypes."""
    if not rows:
        return {name: np.empty(0, dtype=COLUMN_DTYPES[name]) for name in COLUMN_NAMES}
    return {name: np.asarray(values, dtype=COLUMN_DTYPES[name])
            for name, values in zip(COLUMN_NAMES, zip(*rows, strict=True), strict=True)}


def _apply(cols: Columns, plan: FragmentPlan) -> Columns:
    if len(plan.completed):
        _set_transport(cols, plan.completed, plan.completed_values)
    if not plan.held and not plan.anchors:
        return cols
    count = len(cols["ts_us"])
    kept = np.ones(count, dtype=bool)
    kept[plan.held] = False
    main = np.flatnonzero(kept)
    # Rows of earlier batches are appended to the table; the handles index into it.
    earlier = [h for h in plan.handles if isinstance(h, tuple)]
    table = cols
    if earlier:
        extra = rows_to_columns(earlier)
        table = {name: np.concatenate([cols[name], extra[name]]) for name in COLUMN_NAMES}
    numbering = iter(range(count, count + len(earlier)))
    sources = np.array([h if isinstance(h, int) else next(numbering) for h in plan.handles],
                       dtype=np.int64)
    slots = (np.searchsorted(main, np.asarray(plan.anchors, dtype=np.int64), side="right")
             + np.arange(len(sources)))
    take = np.empty(len(main) + len(sources), dtype=np.int64)
    inserted = np.zeros(len(take), dtype=bool)
    inserted[slots] = True
    take[slots] = sources
    take[~inserted] = main
    out = {name: table[name][take] for name in COLUMN_NAMES}
    values = np.asarray(plan.values, dtype=np.int64)
    changed = values >= 0
    if changed.any():
        _set_transport(out, slots[changed], values[changed])
    return out


def _set_transport(cols: Columns, rows: np.ndarray, values: np.ndarray) -> None:
    protocol, src_port, dst_port = unpack_transport(values)
    cols["protocol"][rows] = protocol
    cols["src_port"][rows] = src_port
    cols["dst_port"][rows] = dst_port
