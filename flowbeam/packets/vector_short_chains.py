"""The second stage's shortcut: IPv6 extension chains of one or two 8-byte headers.

Most IPv6 packets with extension headers carry one or two 8-byte ones: hop-by-hop options with
a router alert before MLD, a fragment header, or both (hop-by-hop, then a fragment header).
Their chains and the transport fields behind them lie in the first 70 bytes of the IP header,
so one gather of those bytes decodes them for the whole batch at once, without the general
chain walk of ``vector_headers`` (a gather and some twenty whole-array steps per chain depth,
plus its IP-header checks). The shapes read here:

* an 8-byte extension header other than a fragment header (hop-by-hop, destination options,
  routing, ... with length byte 0), then the transport at 48;
* a fragment header, then the transport at 48 (or nothing, for a non-first fragment);
* an 8-byte extension header, then a fragment header, then the transport at 56 (or nothing).

A packet is taken only when the chain walk would end exactly there with the whole transport
captured (as far as we read it): every other packet, cut, damaged or longer, is left to the
general walk, so the results are the walk's by construction; the tests hold both to the
per-packet path packet for packet.
"""

from __future__ import annotations

import numpy as np

from flowbeam.packets.header_constants import IPV6_FRAGMENT
from flowbeam.packets.vector_gather import gather_records
from flowbeam.packets.vector_headers import (
    EIGHT_BYTE_EXTENSION,
    IS_IPV6_EXTENSION,
    TCP_HEADER_READ,
    HeaderRows,
)
from flowbeam.packets.vector_transport import PORT_BYTES, TRANSPORT_BYTES

_FIRST = 40  # the first extension header, right after the fixed IPv6 header
_SECOND = 48  # the header (or transport) after an 8-byte one
_THIRD = 56  # the transport after two 8-byte headers

# Bytes 40 to 70 of the IP header: the header at 40 (read as an 8-byte extension header or a
# fragment header), the one at 48 (read as a fragment header), and the transport at 48 or 56
# (ports, and the TCP flags byte 13 bytes further on).
_CHAIN_RECORD = np.dtype(
    {
        "names": ["next", "frag", "ident", "next2", "frag2", "ident2", "ports2", "flags2",
                  "ports3", "flags3"],
        "formats": ["u1", ">u2", ">u4", "u1", ">u2", ">u4", ">u4", "u1", ">u4", "u1"],
        "offsets": [0, 2, 4, 8, 10, 12, 8, 21, 16, 29],
        "itemsize": 30,
    }
)


def decode_short_chains(
    data: np.ndarray, start: np.ndarray, rows: np.ndarray, kind: np.ndarray,
    length: np.ndarray, is6: np.ndarray, end: np.ndarray,
) -> tuple[np.ndarray, HeaderRows]:
    """(which of ``rows`` are short chains, what the second stage finds for those).

    ``rows`` are packets the first stage could not decode from the plain shapes; for each of
    them ``start`` is where its IP header starts in ``data``, ``kind`` the IPv6 next header,
    ``length`` the byte after it (an extension header's length byte), ``is6`` the first
    stage's reading and ``end`` the end of the captured IP payload (from the IP header). The
    ``HeaderRows`` are of the short-chain packets only, in order, all ``ok``.
    """
    eight = is6 & EIGHT_BYTE_EXTENSION[(kind.astype(np.intp) << 8) | length]
    fragment_first = is6 & (kind == IPV6_FRAGMENT)
    # Only where the first header was captured: the gather reads from there.
    candidates = np.flatnonzero((eight | fragment_first) & (end >= _SECOND))
    eight, end = eight[candidates], end[candidates]
    chain = gather_records(data, start[rows[candidates]] + _FIRST, _CHAIN_RECORD)
    fragment_second = eight & (chain["next"] == IPV6_FRAGMENT)
    frag = np.where(fragment_second, chain["frag2"], chain["frag"])
    offset = (frag & 0xFFF8) != 0  # the fragment offset (frag >> 3) is not 0
    fragment = (fragment_first[candidates] | fragment_second) & (offset | ((frag & 1) != 0))
    later = fragment & offset
    proto = np.where(fragment_second, chain["next2"], chain["next"]).astype(np.intp)
    available = end - np.where(fragment_second, _THIRD, _SECOND)
    short = (available >= 0) & (
        later | (~IS_IPV6_EXTENSION[proto] & (available >= TRANSPORT_BYTES[proto])))
    taken = np.flatnonzero(short)
    proto, later, available = proto[taken], later[taken], available[taken]
    readable = ~later & (PORT_BYTES[proto] > 0)
    readable_rows = np.flatnonzero(readable)
    transport = taken[readable_rows]
    ports = np.where(fragment_second, chain["ports3"], chain["ports2"]).astype(np.uint32)
    ports = ports[transport]
    flags = np.where(fragment_second, chain["flags3"], chain["flags2"])[transport]
    which = np.zeros(len(rows), dtype=bool)
    which[candidates[taken]] = True
    return which, HeaderRows(
        ok=np.ones(len(taken), dtype=bool), proto=proto, readable=readable,
        readable_rows=readable_rows, sport=ports >> 16, dport=ports & 0xFFFF,
        tcp_byte=np.where(available[readable_rows] >= TCP_HEADER_READ, flags, 0),
        truncated=0, fragment=fragment[taken], later=later,
        ident=np.where(fragment_second, chain["ident2"], chain["ident"])[taken],
    )
