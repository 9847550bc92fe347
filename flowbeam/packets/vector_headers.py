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

This stage only finds where each packet's transport is and reads it (``HeaderRows``):
``vector_path`` writes the results into the same columns as its plain packets, so both kinds
of rows are built by one set of whole-batch operations and come out already in capture order.

Fragments are only recognised here (their identification and whether they are first);
matching later fragments to their first fragment needs the state of the whole capture
(``ip_fragments``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flowbeam.packets.header_constants import IPV6_AH, IPV6_EXTENSION_HEADERS, IPV6_FRAGMENT
from flowbeam.packets.vector_gather import gather_records, read_only
from flowbeam.packets.vector_transport import PORT_BYTES

# Chains deeper than this take the per-packet path: real chains have a few headers, and a
# hostile packet of thousands of 8-byte headers must not cost a NumPy pass per header.
MAX_CHAIN = 12

IS_IPV6_EXTENSION = read_only(np.isin(np.arange(256), list(IPV6_EXTENSION_HEADERS)))


def _extension_size_table() -> np.ndarray:
    """[header type << 8 | length byte] -> the extension header's size in bytes.

    The fragment header is always 8 bytes, AH counts 4-byte words minus 2, the others 8-byte
    words minus 1: one lookup instead of a chain of ``np.where`` per chain depth.
    """
    length = np.arange(256, dtype=np.int64)
    table = np.tile((length + 1) * 8, 256)
    table[IPV6_AH << 8 : (IPV6_AH + 1) << 8] = (length + 2) * 4
    table[IPV6_FRAGMENT << 8 : (IPV6_FRAGMENT + 1) << 8] = 8
    return table


_EXTENSION_SIZE = read_only(_extension_size_table())
# [header type << 8 | length byte] -> an 8-byte extension header that the walk steps over
# (fragment headers excepted: they may end the walk), with nothing to check but its size.
EIGHT_BYTE_EXTENSION = read_only(
    np.repeat(IS_IPV6_EXTENSION, 256) & (_EXTENSION_SIZE == 8)
    & (np.arange(1 << 16) >> 8 != IPV6_FRAGMENT)
)

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
TCP_HEADER_READ = 14  # bytes of TCP header up to and including the flags byte


class HeaderRows(NamedTuple):
    """What the second stage found, one element per packet given to it.

    ``proto`` and the transport fields only mean something where ``ok``; the transport fields
    only where ``readable``: the other ``ok`` rows get ports and flags 0.
    """

    ok: np.ndarray  # bool: decodable here; else the per-packet path decodes (or counts) it
    proto: np.ndarray  # intp: the protocol after the extension headers
    readable: np.ndarray  # bool: the transport's ports were captured (and it has ports)
    readable_rows: np.ndarray  # intp: flatnonzero(readable), the rows the fields below are of
    sport: np.ndarray  # the transport's first two bytes
    dport: np.ndarray  # its next two
    tcp_byte: np.ndarray  # uint8: its 14th byte when captured, else 0
    truncated: int  # ok rows whose transport was cut before its ports (truncated_transport)
    fragment: np.ndarray  # bool: a fragment of a fragmented datagram (only meaningful if ok)
    later: np.ndarray  # bool: a non-first fragment
    ident: np.ndarray  # int64: the fragment identification


class _Walk(NamedTuple):
    """Per-packet IP-layer state, updated in place as the extension chains are walked."""

    ok: np.ndarray  # bool: decodable here (so far)
    proto: np.ndarray  # intp: the protocol after the headers walked so far
    transport: np.ndarray  # int64: offset of that protocol's header from the IP header
    end: np.ndarray  # int64: end of the captured IP payload, from the IP header
    fragment: np.ndarray  # bool: a fragment of a fragmented datagram
    later: np.ndarray  # bool: a non-first fragment
    ident: np.ndarray  # int64: the fragment identification


def decode_headers(
    data: np.ndarray, start: np.ndarray, rec: np.ndarray, captured: np.ndarray,
    version: np.ndarray, is4: np.ndarray, ip_bytes: np.ndarray,
) -> HeaderRows:
    """Find and read the transports of packets whose IP header ``rec`` (``vector_path``'s IP
    record) starts at ``start`` in ``data``, with ``captured`` bytes from there.

    ``version`` is what the link layer says (0: the version nibble decides); ``is4`` (version
    nibble 4, not contradicted by the link layer) and ``ip_bytes`` are ``vector_path``'s.
    """
    state = _ip_layer(rec, captured, version, is4, ip_bytes)
    _walk_chains(data, start, state, is4)
    ok, proto, later = state.ok, state.proto, state.later
    transport_start = start + state.transport
    available = state.end - state.transport
    needed = PORT_BYTES[proto]
    missing = ~later & (available < needed)
    readable = ok & ~later & ~missing & (needed > 0)
    rows = np.flatnonzero(readable)
    transport = gather_records(data, transport_start[rows], _TRANSPORT_RECORD)
    return HeaderRows(
        ok=ok, proto=proto, readable=readable, readable_rows=rows,
        sport=transport["sport"], dport=transport["dport"],
        tcp_byte=np.where(available[rows] >= TCP_HEADER_READ, transport["flags"], 0),
        truncated=int(np.count_nonzero(missing & ok)),
        fragment=state.fragment, later=later, ident=state.ident,
    )


def _ip_layer(
    rec: np.ndarray, captured: np.ndarray, version: np.ndarray, is4: np.ndarray,
    ip_bytes: np.ndarray,
) -> _Walk:
    """The IP header's checks and fields (``slow_ip`` before the chain walk)."""
    vihl = rec["vihl"]
    header = (vihl & 0x0F).astype(np.int64) << 2
    total = rec["len4"]
    # A whole IPv4 header (captured >= header >= 20 also means captured >= 20) within the
    # datagram; an IPv6 one captured whole.
    ok4 = is4 & (header >= 20) & (captured >= header) & (total >= header)
    ok6 = ((vihl >> 4) == 6) & (version != 4) & (captured >= 40)
    frag4 = rec["frag4"]
    fragment = ok4 & ((frag4 & 0x3FFF) != 0)  # more fragments, or an offset
    return _Walk(
        ok=ok4 | ok6,
        proto=np.where(is4, rec["proto4"], rec["next6"]).astype(np.intp),
        transport=np.where(is4, header, 40),
        end=np.minimum(captured, ip_bytes),
        fragment=fragment,
        later=fragment & ((frag4 & 0x1FFF) != 0),
        ident=np.where(is4, rec["ident4"], 0).astype(np.int64),
    )


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
        if not fits.all():
            state.ok[walking[~fits]] = False
            walking, at, end = walking[fits], at[fits], end[fits]
        ext = gather_records(data, start[walking] + at, _EXTENSION_RECORD)
        kind = state.proto[walking]
        at += _EXTENSION_SIZE[(kind << 8) | ext["length"]]
        fits = at <= end
        following = ext["next"].astype(np.intp)
        state.proto[walking] = following
        state.transport[walking] = at
        more = fits & IS_IPV6_EXTENSION[following]
        fragment_headers = np.flatnonzero(kind == IPV6_FRAGMENT)
        if len(fragment_headers):
            frag = ext["frag"][fragment_headers]
            offset = (frag & 0xFFF8) != 0  # the fragment offset (frag >> 3) is not 0
            fragmented = offset | ((frag & 1) != 0)  # an offset, or more fragments
            marked = fragment_headers[fragmented]
            state.fragment[walking[marked]] = True
            state.later[walking[marked]] = offset[fragmented]
            state.ident[walking[marked]] = ext["ident"][marked]
            more[fragment_headers[offset]] = False  # a later fragment: nothing to walk after it
        if not fits.all():
            state.ok[walking[~fits]] = False
        walking = walking[more]
    state.ok[walking] = False  # deeper than MAX_CHAIN: the per-packet path walks it
