"""CloudWatch Logs subscription envelopes, on the real decoded envelope in ../shared/data/vpc."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from flowbeam.vpc.envelopes import (
    CONTROL_MESSAGE,
    DATA_MESSAGE,
    EnvelopeError,
    LogEvent,
    decode_record,
    documents_in,
)
from flowbeam.vpc.records import parse_record
from tests.test_vpc_records import SAMPLES

ENVELOPE = (SAMPLES / "flowlog-exporter__main_test_testData.json").read_text()
# As AWS documents the message CloudWatch Logs sends when a subscription is created.
CONTROL = {"messageType": "CONTROL_MESSAGE", "owner": "CloudwatchLogs", "logGroup": "",
           "logStream": "", "subscriptionFilters": [],
           "logEvents": [{"id": "", "timestamp": 1432826855105,
                          "message": "CWL CONTROL MESSAGE: Checking health of destination "
                                     "Kinesis stream."}]}


def test_a_data_message_has_every_log_event():
    envelope = decode_record(gzip.compress(ENVELOPE.encode()))
    assert (envelope.message_type, envelope.owner, envelope.log_group, envelope.log_stream) == (
        DATA_MESSAGE, "1234567890", "network-logs", "eni-12345678-all")
    assert len(envelope.events) == 139
    assert len({event.id for event in envelope.events}) == 139
    assert envelope.events[0] == LogEvent(
        "32700267005272614824908230066198952485659061324041748480", 1466330686000,
        "2 1234567890 eni-12345678 123.4.206.108 10.100.21.62 43520 13899 17 2 116 "
        "1466330686 1466330742 REJECT OK", "network-logs/eni-12345678-all")
    records = [parse_record(event.message) for event in envelope.events]
    assert Counter(r.action for r in records) == {"ACCEPT": 125, "REJECT": 14}


def test_a_control_message_has_no_events():
    envelope = decode_record(gzip.compress(json.dumps(CONTROL).encode()))
    assert (envelope.message_type, envelope.events) == (CONTROL_MESSAGE, ())


@pytest.mark.parametrize(("data", "reason"), [
    (b"2 123 eni-1 ...", "not gzip data (starts with b'2 123 en')"),
    (b"\xf3\x89\x9a\xc2\x0a\x01", "a KPL-aggregated record: CloudWatch Logs subscriptions "
                                  "never aggregate, so this stream has another producer"),
    (gzip.compress(b"not json"), "not JSON after gunzip: Expecting value: line 1 column 1 "
                                 "(char 0)"),
    (gzip.compress(b"[1, 2]"), "not a subscription envelope: a JSON list"),
    (gzip.compress(b'{"messageType": "OTHER"}'),
     "not a subscription envelope: messageType 'OTHER'"),
    (gzip.compress(b'{"messageType": "DATA_MESSAGE"}'), "DATA_MESSAGE without a logEvents list"),
    (gzip.compress(b'{"messageType": "DATA_MESSAGE", "logEvents": [{"id": "1"}]}'),
     "a log event without id, timestamp or message: KeyError('timestamp')"),
])
def test_what_is_not_an_envelope_says_why(data, reason):
    with pytest.raises(EnvelopeError) as error:
        decode_record(data)
    assert error.value.reason == reason


def test_corrupt_gzip_is_refused():
    data = bytearray(gzip.compress(ENVELOPE.encode()))
    data[-8:] = b"\0" * 8  # the CRC and length
    with pytest.raises(EnvelopeError, match=r"^corrupt gzip data: CRC check failed"):
        decode_record(bytes(data))


def test_a_file_of_envelopes_concatenated_or_one_per_line():
    text = json.dumps(CONTROL) + json.dumps({"a": 1}) + "\n  " + json.dumps([2]) + "\n"
    assert [(offset, doc) for offset, doc in documents_in(text)] == [
        (0, CONTROL), (len(json.dumps(CONTROL)), {"a": 1}),
        (len(json.dumps(CONTROL)) + 8 + 3, [2])]
    with pytest.raises(EnvelopeError, match="not JSON at offset 9: Expecting value"):
        list(documents_in('{"a": 1} oops'))
