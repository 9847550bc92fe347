"""The batched fragment tracker against the one-packet-at-a-time model, on random sequences.

``FragmentTracker`` handles a batch's fragments at once (first fragments only touch an
array-backed table that answers all later fragments of the batch together), so these tests
drive it through ``complete_fragments`` (the columns step the decoder uses) with synthetic
fragment rows and compare every emitted row, its position and its ports with
``ReferenceTracker``: tables that overflow within a batch and across
batches, keys repeated within a run, first and later fragments interleaved, waiting fragments
pushed out, and long floods of first fragments. Any faster tracker must keep them green.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowbeam.packets.columns import COLUMN_DTYPES, COLUMN_NAMES
from flowbeam.packets.fragment_rows import complete_fragments, rows_to_columns
from flowbeam.packets.ip_fragments import (
    FRAGMENT_KEY_BYTES,
    FragmentPackets,
    FragmentTracker,
    fragment_key,
)
from tests.test_vector_shapes import ReferenceTracker


def key_of(datagram: int) -> bytes:
    return fragment_key(4, 0, 1, 0, 2, 17, datagram)


def ports_of(datagram: int) -> tuple[int, int]:
    return 1000 + datagram % 50_000, 2000 + datagram % 60_000


def run_tracker(packets: list[tuple[bool, int]], limit: int,
                batch_sizes: list[int]) -> list[tuple[int, tuple[int, int]]]:
    """(name, ports) of every row ``complete_fragments`` emits; a packet's name is its index."""
    tracker = FragmentTracker(limit)
    out: list[tuple[int, tuple[int, int]]] = []
    start = 0
    for size in batch_sizes:
        batch = packets[start:start + size]
        names = np.arange(start, start + len(batch))
        start += len(batch)
        if not batch:
            continue
        first = np.array([f for f, _ in batch], dtype=bool)
        datagrams = [d for _, d in batch]
        ports = np.array([ports_of(d) if f else (0, 0) for f, d in batch], dtype=np.int64)
        cols = {name: np.zeros(len(batch), dtype=COLUMN_DTYPES[name]) for name in COLUMN_NAMES}
        cols["ts_us"][:] = names
        cols["protocol"][:] = 17
        cols["src_port"][:] = ports[:, 0]
        cols["dst_port"][:] = ports[:, 1]
        keys = np.frombuffer(b"".join(map(key_of, datagrams)), dtype=FRAGMENT_KEY_BYTES)
        positions = np.arange(len(batch), dtype=np.int64)
        # Hand the fragments over out of order: the step sorts them by position.
        shuffle = np.random.default_rng(len(out)).permutation(len(batch))
        fragments = FragmentPackets(positions[shuffle], first[shuffle], keys[shuffle])
        done = complete_fragments(cols, positions, fragments, tracker)
        out += emitted(done)
    out += emitted(rows_to_columns(tracker.drain()))
    return out


def emitted(cols: dict[str, np.ndarray]) -> list[tuple[int, tuple[int, int]]]:
    return list(zip(cols["ts_us"].tolist(),
                    zip(cols["src_port"].tolist(), cols["dst_port"].tolist(), strict=True),
                    strict=True))


def run_reference(packets: list[tuple[bool, int]], limit: int) -> list[tuple]:
    reference = ReferenceTracker(limit)
    out = []
    for name, (first, datagram) in enumerate(packets):
        if first:
            out += reference.first(datagram, name, ports_of(datagram))
        else:
            out += reference.later(datagram, name)
    return out + reference.drain()


def random_packets(rng: np.random.Generator, count: int, datagrams: int,
                   first_share: float) -> list[tuple[bool, int]]:
    """Fragments of a few datagrams, with runs: floods of first fragments (often repeated
    keys), and later fragments that come before, soon after or long after their first."""
    packets: list[tuple[bool, int]] = []
    while len(packets) < count:
        run = int(rng.integers(1, 40))
        first = bool(rng.random() < first_share)
        if rng.random() < 0.3:  # one key again and again
            packets += [(first, int(rng.integers(datagrams)))] * run
        else:
            packets += [(first, int(d)) for d in rng.integers(datagrams, size=run)]
    return packets[:count]


def random_batches(rng: np.random.Generator, count: int) -> list[int]:
    sizes = []
    while sum(sizes) < count:
        sizes.append(int(rng.choice([1, 2, 7, 30, 200, 1000])))
    return sizes


@pytest.mark.parametrize("seed", range(40))
def test_random_sequences_match_one_packet_at_a_time(seed: int) -> None:
    rng = np.random.default_rng(seed)
    limit = int(rng.choice([1, 2, 3, 5, 8, 16, 50, 200]))
    datagrams = int(rng.choice([3, limit + 1, 2 * limit + 3, 10 * limit, 1000]))
    packets = random_packets(rng, 3000, datagrams, float(rng.choice([0.3, 0.6, 0.9, 0.98])))
    got = run_tracker(packets, limit, random_batches(rng, len(packets)))
    assert got == run_reference(packets, limit)


@pytest.mark.parametrize(("limit", "batch"), [(64, 5000), (64, 37), (1, 1000), (1000, 999)])
def test_long_floods_compact_the_stamps_and_still_match(limit: int, batch: int) -> None:
    """Mostly first fragments of new datagrams, a repeated one, and later fragments of old
    ones, some already forgotten: the table overflows at almost every first fragment."""
    rng = np.random.default_rng(limit + batch)
    packets: list[tuple[bool, int]] = []
    for i in range(20_000):
        roll = rng.random()
        if roll < 0.05:
            packets.append((False, int(rng.integers(max(1, i - 3 * limit), i + 1))))
        elif roll < 0.15:
            packets.append((True, 7))
        else:
            packets.append((True, i))
    got = run_tracker(packets, limit, [batch] * (len(packets) // batch + 1))
    assert got == run_reference(packets, limit)
