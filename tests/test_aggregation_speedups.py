"""Equivalences the faster code paths rely on."""

from __future__ import annotations

import random
from dataclasses import fields

import numpy as np
import pyarrow as pa

from flowbeam.flows.schema import arrow_schema, records_to_arrow
from flowbeam.packets import aggregation_columns
from flowbeam.packets.aggregation_columns import KeySources, Rows


def test_records_to_arrow_matches_from_pylist_with_missing_and_extra_keys():
    records = [{"id": "a", "src_port": 1, "unknown": 3}, {"id": "b", "vlan_id": None}, {}]
    schema = arrow_schema()
    assert records_to_arrow(records).equals(pa.Table.from_pylist(records, schema=schema))
    assert records_to_arrow([]).schema.equals(schema, check_metadata=True)


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
