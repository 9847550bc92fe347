"""The vectorised path's second stage: IP headers whose transport is not at a fixed offset.

``vector_path`` decodes plain headers (IPv4 without options, IPv6 without extension headers,
not fragmented, whole transport captured) with one gather. Real traffic also carries many
packets that are unusual only in the IP layer: IPv4 options, IPv4 and IPv6 fragments, IPv6
extension-header chains (hop-by-hop, routing, destination options, fragment, AH, ...), and
transports cut by the snaplen. Handing those to the per-packet path cost ~20 µs each; here they
are decoded for the whole batch at once, the chains by a loop over chain depth that only visits
the packets still walking. The rules are those of ``slow_path`` (``slow_ip``, ``slow_ports``),
which the tests hold this stage to packet for packet; a packet that would be malformed there, or
whose chain is deeper than ``MAX_CHAIN``, is handed back to it, so errors are counted in one
place only.

Fragments are only recognised here (their key and whether they are first); matching later
fragments to their first fragment needs the state of the whole capture (``ip_fragments``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flowbeam.capture.records import RecordBatch
from flowbeam.packets.header_constants import IPV6_AH, IPV6_EXTENSION_HEADERS, IPV6_FRAGMENT
from flowbeam.packets.ip_fragments import (
    FRAGMENT_KEY_BYTES,
    FRAGMENT_KEY_DTYPE,
    FragmentPackets,
)
from flowbeam.packets.vector_gather import (
    gather_records,
    ip_columns,
    read_only,
    take_records,
)
from flowbeam.packets.vector_transport import PORT_BYTES, transport_columns

# Chains deeper than this take the per-packet path: real chains have a few headers, and a
# hostile packet of thousands of 8-byte headers must not cost a NumPy pass per header.
MAX_CHAIN = 12

IS_IPV6_EXTENSION = read_only(np.isin(np.arange(256), list(IPV6_EXTENSION_HEADERS)))

# An extension header's first 8 bytes: next header and length; for the fragment header, the
# offset and flags and the identification.
_EXTENSION_RECORD = np.dtype(
    {"names": ["next", "length", "frag", "ident"], "formats": ["u1", "u1", ">u2", ">u4"],
     "offsets": [0, 1, 2, 4], "itemsize": 8}
)
_TRANSPORT_RECORD = np.dtype(
    {"names": ["sport", "dport", "flags"], "formats": [">u2", ">u2", "u1"],
     "offsets": [0, 2, 13], "itemsize": 14}
)
_TCP_HEADER_READ = 14  # bytes of TCP header up to and including the flags byte


class HeaderResult(NamedTuple):
    """What the second stage decoded: rows, the fragments among them, and what it left."""

    pos: np.ndarray  # int64: packet positions of the rows, in capture order
    cols: dict[str, np.ndarray]  # the rows' PacketColumns fields
    fragments: FragmentPackets  # the rows that are fragments
    rest: np.ndarray  # int64: packet positions left to the per-packet path
    truncated: int  # rows whose transport was cut before its ports (truncated_transport)


class _Walk(NamedTuple):
    """Per-packet IP-layer state, updated in place as the extension chains are walked."""

    ok: np.ndarray  # bool: decodable here (so far)
    proto: np.ndarray  # int64: the protocol after the headers walked so far
    transport: np.ndarray  # int64: offset of that protocol's header from the IP header
    end: np.ndarray  # int64: end of the captured IP payload, from the IP header
    fragment: np.ndarray  # bool: a fragment of a fragmented datagram
    later: np.ndarray  # bool: a non-first fragment
    ident: np.ndarray  # int64: the fragment identification


def decode_headers(
    batch: RecordBatch, data: np.ndarray, idx: np.ndarray, start: np.ndarray, rec: np.ndarray,
    captured: np.ndarray, version: np.ndarray, vlan: np.ndarray,
) -> HeaderResult:
    """Decode the packets at ``idx`` whose IP header ``rec`` (``vector_path``'s IP record) starts
    at ``start`` in ``data``, with ``captured`` bytes from there; ``version`` is what the link
    layer says (0: the version nibble decides)."""
    state, is4 = _ip_layer(rec, captured, version)
    _walk_chains(data, start, state, is4)
    keep = np.flatnonzero(state.ok)
    rec, start, is4, vlan = take_records(rec, keep), start[keep], is4[keep], vlan[keep]
    proto, transport, end, later = (state.proto[keep], state.transport[keep], state.end[keep],
                                    state.later[keep])
    pos = idx[keep]
    cols = ip_columns(batch, pos, rec, is4, proto, vlan,
                      np.where(is4, rec["len4"], rec["plen6"].astype(np.int64) + 40))
    ports, truncated = _ports(data, start + transport, end - transport, proto, later)
    cols.update(ports)
    fragment = np.flatnonzero(state.fragment[keep])
    fragments = FragmentPackets(
        pos=pos[fragment], first=~later[fragment],
        key=_fragment_keys(cols, fragment, state.ident[keep][fragment]),
    )
    return HeaderResult(pos, cols, fragments, idx[~state.ok], truncated)


def _ip_layer(
    rec: np.ndarray, captured: np.ndarray, version: np.ndarray
) -> tuple[_Walk, np.ndarray]:
    """The IP header's checks and fields (``slow_ip`` before the chain walk); (state, is IPv4)."""
    vihl = rec["vihl"]
    header = (vihl & 0x0F).astype(np.int64) * 4
    total = rec["len4"].astype(np.int64)
    is4 = (((vihl >> 4) == 4) & (version != 6) & (captured >= 20) & (header >= 20)
           & (captured >= header) & (total >= header))
    is6 = ((vihl >> 4) == 6) & (version != 4) & (captured >= 40)
    frag4 = rec["frag4"]
    fragment = is4 & ((frag4 & 0x3FFF) != 0)  # more fragments, or an offset
    return _Walk(
        ok=is4 | is6,
        proto=np.where(is4, rec["proto4"], rec["next6"]).astype(np.int64),
        transport=np.where(is4, header, 40),
        end=np.minimum(captured, np.where(is4, total, rec["plen6"].astype(np.int64) + 40)),
        fragment=fragment,
        later=fragment & ((frag4 & 0x1FFF) != 0),
        ident=np.where(is4, rec["ident4"], 0).astype(np.int64),
    ), is4


def _walk_chains(data: np.ndarray, start: np.ndarray, state: _Walk, is4: np.ndarray) -> None:
    """Step over IPv6 extension headers, one chain depth per pass (``_walk_ipv6_extensions``).

    Each header must lie within the captured IP payload, else the packet is left to the
    per-packet path (which counts it as ``bad_ipv6_extension_header``); a fragment header with
    an offset ends the walk (a non-first fragment: its protocol is the fragment header's next
    header).
    """
    walking = np.flatnonzero(state.ok & ~is4 & IS_IPV6_EXTENSION[state.proto])
    for _ in range(MAX_CHAIN):
        if not len(walking):
            return
        at, end = state.transport[walking], state.end[walking]
        fits = at + 8 <= end
        state.ok[walking[~fits]] = False
        walking, at, end = walking[fits], at[fits], end[fits]
        ext = gather_records(data, start[walking] + at, _EXTENSION_RECORD)
        kind = state.proto[walking]
        is_fragment_header = kind == IPV6_FRAGMENT
        length = ext["length"].astype(np.int64)
        size = np.where(is_fragment_header, 8,
                        np.where(kind == IPV6_AH, (length + 2) * 4, (length + 1) * 8))
        too_long = at + size > end
        state.ok[walking[too_long]] = False
        offset = ext["frag"] >> 3
        fragmented = is_fragment_header & ((offset != 0) | ((ext["frag"] & 1) != 0))
        marked = walking[fragmented]
        state.fragment[marked] = True
        state.later[marked] = offset[fragmented] != 0
        state.ident[marked] = ext["ident"][fragmented]
        state.proto[walking] = ext["next"]
        state.transport[walking] = at + size
        more = ~too_long & ~(is_fragment_header & (offset != 0)) & IS_IPV6_EXTENSION[ext["next"]]
        walking = walking[more]
    state.ok[walking] = False  # deeper than MAX_CHAIN: the per-packet path walks it


def _ports(
    data: np.ndarray, transport_start: np.ndarray, available: np.ndarray, proto: np.ndarray,
    later: np.ndarray,
) -> tuple[dict[str, np.ndarray], int]:
    """Ports and flags read within the captured IP payload (``slow_ports``); (columns, count of
    transports cut before their ports). Non-first fragments carry no transport: zeros."""
    needed = PORT_BYTES[proto]
    missing = ~later & (available < needed)
    readable = ~later & ~missing & (needed > 0)
    rec = gather_records(data, np.where(readable, transport_start, 0), _TRANSPORT_RECORD)
    tcp_byte = np.where(available >= _TCP_HEADER_READ, rec["flags"], 0)
    cols = transport_columns(rec["sport"], rec["dport"], tcp_byte, proto)
    for column in cols.values():
        column[~readable] = 0
    return cols, int(np.count_nonzero(missing))


def _fragment_keys(
    cols: dict[str, np.ndarray], rows: np.ndarray, ident: np.ndarray
) -> np.ndarray:
    """The ``FragmentTracker`` keys of the fragment rows (the IPv6 key has no protocol)."""
    key = np.zeros(len(rows), dtype=FRAGMENT_KEY_DTYPE)
    version = cols["ip_version"][rows]
    key["version"] = version
    for name in ("src_hi", "src_lo", "dst_hi", "dst_lo"):
        key[name] = cols[name][rows]
    key["protocol"] = np.where(version == 4, cols["protocol"][rows], 0)
    key["ident"] = ident
    return key.view(FRAGMENT_KEY_BYTES)
