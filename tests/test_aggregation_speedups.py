"""Equivalences the faster code paths rely on."""

from __future__ import annotations

import random
from dataclasses import fields

import numpy as np

from flowbeam.flows.fragment import NO_TIME
from flowbeam.flows.protocols import TCP_FIN, TCP_RST
from flowbeam.packets.aggregation_columns import INT64_MAX, Rows, Staged, elements
from flowbeam.packets.aggregation_sort import (
    KEY_FIELDS,
    KeySources,
    key_change,
    sort_by_key_and_time,
)
from flowbeam.packets.aggregation_window import Window

_FIN_RST = TCP_FIN | TCP_RST


def test_key_sources_read_keys_across_parts_and_find_mixed_runs():
    rng = random.Random(3)
    parts = []
    for size in (0, 5, 7, 1):
        parts.append(Rows(*(np.array([rng.randrange(4) for _ in range(size)], np.uint64)
                            for _ in fields(Rows))))
    sources = KeySources(parts)
    columns = sources.concat()
    index = np.array([12, 0, 5, 7, 3])
    assert all((sources.at(index)[name] == columns[name][index]).all() for name in columns)
    perm = np.lexsort([columns[name] for name in reversed(KEY_FIELDS)])
    change = key_change(columns, perm)
    starts = np.flatnonzero(np.concatenate(([True], change)))
    assert sources.runs_agree(perm, starts)
    assert not sources.runs_agree(perm, starts[:1])


def _window_parts(rng: random.Random, opened: int, batches: int) -> tuple[Rows, list[Staged]]:
    """Open rows and staged packets of three keys (hash = key), times with ties and going
    back, some keys with two open rows (a split read's fold under heavy disorder)."""
    def keys(count: int) -> dict[str, np.ndarray]:
        key = np.array([rng.randrange(3) for _ in range(count)], np.uint64) << np.uint64(60)
        return {"misc": key, "a_hi": np.zeros(count, np.uint64), "a_lo": key + 1,
                "b_hi": np.zeros(count, np.uint64), "b_lo": key + 2, "hash": key}

    def ints(count: int, high: int, dtype: type = np.int64) -> np.ndarray:
        return np.array([rng.randrange(high) for _ in range(count)], dtype)

    syn2 = np.where(ints(opened, 2) == 1, ints(opened, 400), INT64_MAX)
    prev_last = np.where(ints(opened, 2) == 1, ints(opened, 100), NO_TIME)
    open_rows = Rows(**keys(opened), t2=ints(opened, 400), last=ints(opened, 400),
                     a_pk=ints(opened, 9), a_by=ints(opened, 9000), b_pk=ints(opened, 9),
                     b_by=ints(opened, 9000), flags=ints(opened, 1 << 16, np.uint16), syn2=syn2,
                     prev_flags=ints(opened, 1 << 16, np.uint16), prev_last=prev_last,
                     head=np.zeros(opened, bool))
    packets = []
    for _ in range(batches):
        count = rng.randrange(1, 40)
        packets.append(Staged(t2=ints(count, 400), nbytes=ints(count, 1500),
                              flags=ints(count, 256, np.uint8), **keys(count)))
    return open_rows, packets


def test_sort_orders_each_key_by_time_then_input_order():
    """As one stable sort by time, then by key, would: runs whose times go back are
    sorted again."""
    rng = random.Random(5)
    for _ in range(50):
        open_rows, packets = _window_parts(rng, rng.randrange(4), rng.randrange(1, 5))
        parts = [open_rows, *packets]
        hashes = np.concatenate([p.hash for p in parts])
        t2 = np.concatenate([p.t2 for p in parts])
        expected = np.lexsort((np.arange(len(t2)), t2, hashes))
        perm, change, sorted_t2 = sort_by_key_and_time(KeySources(parts), hashes.copy(), t2)
        assert (perm == expected).all()
        assert (sorted_t2 == t2[expected]).all()
        assert (change == (hashes[expected][1:] != hashes[expected][:-1])).all()


def test_rows_and_slow_keys_reduce_like_per_element_values():
    """``Elements.rows`` and ``Window._slow_keys`` work on packet columns and patch the open
    rows in; per-element values reduced one by one must give the same."""
    rng = random.Random(11)
    for _ in range(100):
        e = elements(*_window_parts(rng, rng.randrange(6), rng.randrange(1, 5)))
        n = len(e)
        v = e.values(np.arange(n))
        key_starts = np.flatnonzero(np.concatenate(([True], e.key_change)))
        cuts = np.array([i for i in range(n) if rng.random() < 0.2], np.intp)
        starts = np.union1d(key_starts, cuts)
        ends = np.append(starts[1:], n)
        rows = e.rows(starts)
        for name, ufunc in [("a_pk", np.add), ("b_pk", np.add), ("a_by", np.add),
                            ("b_by", np.add), ("flags", np.bitwise_or), ("syn2", np.minimum)]:
            assert (getattr(rows, name) == ufunc.reduceat(getattr(v, name), starts)).all(), name
        assert (rows.t2 == v.t2[starts]).all() and (rows.last == v.last[ends - 1]).all()
        assert (rows.prev_flags == v.prev_flags[starts]).all()
        assert (rows.prev_last == v.prev_last[starts]).all()
        first = v.t2 >> 1
        pure_syn = (v.syn2 != INT64_MAX) & ~e.is_open
        ended = (v.flags | v.prev_flags) & (_FIN_RST << 8 | _FIN_RST) != 0
        expected = (np.maximum.reduceat(np.where(pure_syn, first, np.iinfo(np.int64).min),
                                        key_starts)
                    >= np.minimum.reduceat(np.where(ended, first, INT64_MAX), key_starts))
        window = Window(idle=50, active=200, cut=None, max_ts=400, late=False)
        assert (window._slow_keys(e, key_starts) == expected).all()
