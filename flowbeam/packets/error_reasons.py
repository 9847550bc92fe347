"""The public error reasons: the keys under which ``PacketDecoder.errors`` counts packets.

They live apart from the decoder because both the decoder and the per-packet path
(``slow_path``) count under them; one module keeps the full list of keys in one place.
"""

SHORT_LINK_HEADER = "short_link_header"
SHORT_IP_HEADER = "short_ip_header"
BAD_IP_VERSION = "bad_ip_version"
BAD_IP_HEADER_LENGTH = "bad_ip_header_length"
BAD_IP_TOTAL_LENGTH = "bad_ip_total_length"
NOT_IP = "not_ip"
UNKNOWN_LINKTYPE = "unknown_linktype"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
TRUNCATED_TRANSPORT = "truncated_transport"
BAD_IPV6_EXTENSION_HEADER = "bad_ipv6_extension_header"
