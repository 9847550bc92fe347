"""``RecordBatch``: what the capture reader hands the packet decoder.

Plain NumPy arrays so the hot path (millions of packets per second) never builds a
Python object per packet; only the rare unusual packet takes a per-packet slow path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RecordBatch:
    """Consecutive records of one capture file, as parallel arrays over one byte buffer.

    ``data`` may be a view of a buffer the reader reuses: a consumer must finish with a batch
    before asking the reader for the next one.
    """

    data: np.ndarray  # uint8: the bytes the offsets point into
    offsets: np.ndarray  # int64: start of each record's captured bytes in ``data``
    caplen: np.ndarray  # int64: bytes captured (may be less than wirelen: snaplen)
    wirelen: np.ndarray  # int64: original length of the frame on the wire
    ts_us: np.ndarray  # int64: capture time, microseconds since the Unix epoch (UTC)
    linktype: np.ndarray  # int32: LINKTYPE_* of the interface that captured the record
    file_offsets: np.ndarray  # int64: byte offset of each record's header in the file

    def __len__(self) -> int:
        return len(self.offsets)
