"""The coder of fragment batches: how lists of ``Fragment``s cross stages and shuffles.

Every source hands ``BuildFlows`` lists of fragments. Beam's default coder encodes a list
element by element, and a ``Fragment`` (a NamedTuple, not a plain tuple) falls back to pickle
one by one: on the 20M-packet benchmark capture that pickling took ~2 s of a ~30 s run. This
coder sends a batch as columns instead: the integer fields as two NumPy blocks (the four
address halves are unsigned 64-bit, everything else fits a signed one), the scopes and the
source attributes through Beam's fast primitives coder. Decoding builds the fragments back
with one ``tuple.__new__`` per fragment, as the aggregator does.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np
from apache_beam import coders

from flowbeam.flows.fragment import Fragment

# Positions in a flat fragment (key fields first, then the fields after the key).
_KEY_FIELDS = 10
_ADDRESS_FIELDS = (3, 4, 6, 7)  # a_hi, a_lo, b_hi, b_lo: unsigned 64-bit
_SCOPE_FIELD = 9
_SIGNED_KEY_FIELDS = tuple(i for i in range(_KEY_FIELDS)
                           if i not in _ADDRESS_FIELDS and i != _SCOPE_FIELD)
_VALUE_FIELDS = len(Fragment._fields) - 2  # first_us .. open_at_end (not key, attributes)


class FragmentBatch(list):
    """Type hint of a PCollection of fragment lists; it selects ``FragmentBatchCoder``."""


class FragmentBatchCoder(coders.Coder):
    """A list of ``Fragment``s as integer columns plus their scopes and attributes."""

    def __init__(self) -> None:
        self._parts = coders.FastPrimitivesCoder()

    def encode(self, fragments: list[Fragment]) -> bytes:
        if not fragments:
            return self._parts.encode((0, b"", b"", (), None))
        fields = list(zip(*fragments, strict=True))
        keys = list(zip(*fields[0], strict=True))
        signed = np.array([keys[i] for i in _SIGNED_KEY_FIELDS] + fields[1:1 + _VALUE_FIELDS],
                          dtype=np.int64)
        addresses = np.array([keys[i] for i in _ADDRESS_FIELDS], dtype=np.uint64)
        attributes = fields[-1] if any(fields[-1]) else None
        return self._parts.encode((len(fragments), signed.tobytes(), addresses.tobytes(),
                                   keys[_SCOPE_FIELD], attributes))

    def decode(self, encoded: bytes) -> list[Fragment]:
        count, signed_bytes, address_bytes, scopes, attributes = self._parts.decode(encoded)
        if count == 0:
            return []
        signed = np.frombuffer(signed_bytes, dtype=np.int64).reshape(-1, count)
        addresses = np.frombuffer(address_bytes, dtype=np.uint64).reshape(-1, count)
        columns: list[list] = [[] for _ in range(_KEY_FIELDS)]
        for row, i in enumerate(_SIGNED_KEY_FIELDS):
            columns[i] = signed[row].tolist()
        for row, i in enumerate(_ADDRESS_FIELDS):
            columns[i] = addresses[row].tolist()
        columns[_SCOPE_FIELD] = scopes
        values = [column.tolist() for column in signed[len(_SIGNED_KEY_FIELDS):]]
        values[-1] = signed[-1].astype(bool).tolist()  # open_at_end
        return list(map(tuple.__new__, repeat(Fragment, count),
                        zip(zip(*columns, strict=True), *values,
                            attributes if attributes is not None else repeat((), count),
                            strict=False)))

    def estimate_size(self, fragments: list[Fragment]) -> int:
        """Runners sample element sizes; encoding a whole batch to measure it costs as much
        as sending it, so this is an estimate: the integer columns plus a few scope bytes."""
        return 8 * (len(_SIGNED_KEY_FIELDS) + _VALUE_FIELDS + len(_ADDRESS_FIELDS) + 1) * len(
            fragments)

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self) -> type:
        return FragmentBatch


coders.registry.register_coder(FragmentBatch, FragmentBatchCoder)
