"""Equivalences the faster code paths rely on."""

from __future__ import annotations

import random
from dataclasses import fields

import numpy as np

from flowbeam.packets import aggregation_columns
from flowbeam.packets.aggregation_columns import KeySources, Rows


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
    perm = np.lexsort([columns[name] for name in reversed(aggregation_columns._KEY_FIELDS)])
    change = aggregation_columns._key_change(columns, perm)
    starts = np.flatnonzero(np.concatenate(([True], change)))
    assert sources.runs_agree(perm, starts)
    assert not sources.runs_agree(perm, starts[:1])
