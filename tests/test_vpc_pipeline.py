"""The VPC Flow Logs batch pipeline end to end, on files built from the real samples: an
S3-delivered flow log (gzip'd, header line) and a Firehose-style file of gzip'd subscription
envelopes. Expected rows are reasoned out from the sample lines."""

from __future__ import annotations

import glob
import gzip
import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from flowbeam.vpc.schemas import DENIED_FLOWS, SUBNET_TRAFFIC, ExtraTable
from flowbeam.vpc.subnets import load_subnets
from pipelines.summary import counter_values
from pipelines.vpc_flows import build, parse_config, run
from tests.test_pcap_pipeline import read_errors, read_flows, summary_of
from tests.test_vpc_envelopes import CONTROL, ENVELOPE
from tests.test_vpc_records import doc_lines

HEADER = ("version vpc-id subnet-id instance-id interface-id account-id type srcaddr dstaddr "
          "srcport dstport pkt-srcaddr pkt-dstaddr protocol bytes packets start end action "
          "tcp-flags log-status")
SUBNETS_CSV = ("cidr,subnet_id,name,vpc_id\n10.0.0.0/24,subnet-dmz,dmz,vpc-abcdefab012345678\n"
               "10.100.21.0/24,subnet-app,app,\n")
ENI = "eni-1235b8ca123456789"


def read_table(directory: Path, table: ExtraTable) -> list[dict]:
    rows = []
    for name in sorted(glob.glob(str(directory / f"{table.name}-*.parquet"))):
        data = pq.read_table(name)
        assert data.schema.names == [c.name for c in table.columns]
        rows.extend(data.to_pylist())
    return rows


def utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def tcp_row(row: dict) -> tuple:
    return (row["src_addr"], row["src_port"], row["dst_addr"], row["dst_port"],
            row["src_packets"], row["src_bytes"], row["dst_packets"], row["dst_bytes"],
            row["src_tcp_flags"], row["dst_tcp_flags"], row["status"], row["first_seen_at"],
            row["last_seen_at"], row["sensor"], row["action"], row["src_subnet"],
            row["dst_subnet"])


def test_files_to_flows_subnet_traffic_and_denials(vpc_inputs, tmp_path, capsys, caplog):
    flow_log, envelopes, subnets = vpc_inputs
    output = tmp_path / "out"
    output.mkdir()
    stale = output / "denied_flows-00001-of-00002.parquet"  # an earlier run's, two shards
    stale.write_bytes(b"PAR1")
    assert run(["--input", str(flow_log), "--input", str(envelopes), "--subnets_file",
                str(subnets), "--output", str(output), "--log_denied"]) == 0
    captured = capsys.readouterr()
    assert not stale.exists()
    assert f"flowbeam: replacing 1 files of an earlier run in {output}" in captured.err
    summary = summary_of(captured.out)
    # 8 TCP records + 139 log events (the redelivered copy is dropped by id).
    assert {label: summary[label] for label in (
        "files read", "envelopes", "control messages skipped", "bad envelopes",
        "flow records", "malformed records", "denied records", "dead letters")} == {
        "files read": "2", "envelopes": "2", "control messages skipped": "1",
        "bad envelopes": "0", "flow records": str(8 + 139), "malformed records": "1",
        "denied records": "14", "dead letters": "1"}

    [error] = read_errors(output)
    assert error == {"stage": "parse_vpc_record", "source": str(flow_log),
                     "reason": "line 6: 4 values for a format of 21 fields",
                     "offset": len(HEADER) + 1 + sum(len(line) + 1 for line in
                                                     doc_lines("3 vpc-abcdefab012345678")[:4]),
                     "payload": "3 vpc-1 subnet-1 broken"}

    flows = read_flows(output)
    by_source = defaultdict(list)
    for row in flows:
        by_source[row["sensor"]].append(row)
    # AWS's TCP flag sequence: the lines around the malformed one all count.
    assert sorted(tcp_row(r) for r in by_source[ENI]) == [
        ("52.213.180.42", 43416, "10.0.0.62", 5001, 8, 568, 7, 376, 2, 18, "idle_timeout",
         utc(1566848875), utc(1566848933), ENI, "ACCEPT", None, "subnet-dmz"),
        ("52.213.180.42", 43418, "10.0.0.62", 5001, 70 + 15774, 100701 + 23294588,
         12 + 1219, 632 + 63388, 3, 19, "end_of_flow", utc(1566848875), utc(1566849113), ENI,
         "ACCEPT", None, "subnet-dmz"),
        ("52.213.180.42", 43638, "10.0.0.62", 5001, 17, 1260, 14, 967, 3, 19, "end_of_flow",
         utc(1566933133), utc(1566933193), ENI, "ACCEPT", None, "subnet-dmz"),
    ]
    assert {(r["vpc_id"], r["subnet_id"], r["instance_id"], r["account_id"])
            for r in by_source[ENI]} == {("vpc-abcdefab012345678", "subnet-aaaaaaaa012345678",
                                          "i-01234567890123456", "123456789010")}
    check_envelope_flows(by_source["eni-12345678"])
    check_subnet_traffic(read_table(output, SUBNET_TRAFFIC))
    check_denials(read_table(output, DENIED_FLOWS), [r.getMessage() for r in caplog.records])


def envelope_records() -> list[list[str]]:
    return [event["message"].split() for event in json.loads(ENVELOPE)["logEvents"]]


def check_envelope_flows(rows: list[dict]) -> None:
    """Each conversation one row: the two directions' counts added, never doubled."""
    expected = defaultdict(lambda: [0, 0, set()])
    for fields in envelope_records():
        src, dst = (fields[3], int(fields[5])), (fields[4], int(fields[6]))
        counts = expected[(int(fields[7]), frozenset((src, dst)))]
        counts[0] += int(fields[8])
        counts[1] += int(fields[9])
        counts[2].add(fields[12])
    got = {(r["ip_protocol"], frozenset(((r["src_addr"], r["src_port"]),
                                         (r["dst_addr"], r["dst_port"])))):
           [r["src_packets"] + r["dst_packets"], r["src_bytes"] + r["dst_bytes"], r["action"]]
           for r in rows}
    assert len(got) == len(rows)
    assert got == {key: [packets, octets, "REJECT" if "REJECT" in actions else "ACCEPT"]
                   for key, (packets, octets, actions) in expected.items()}
    # The first event, read by hand: a scanner's UDP probe, rejected, never answered.
    [probe] = [r for r in rows if (r["src_addr"], r["src_port"]) == ("123.4.206.108", 43520)]
    assert (probe["src_port"], probe["dst_addr"], probe["dst_port"], probe["protocol"],
            probe["src_packets"], probe["src_bytes"], probe["dst_packets"], probe["action"],
            probe["first_seen_at"], probe["last_seen_at"], probe["account_id"],
            probe["src_subnet"], probe["dst_subnet"]) == (
        43520, "10.100.21.62", 13899, "udp", 2, 116, 0, "REJECT", utc(1466330686),
        utc(1466330742), "1234567890", None, "subnet-app")


def check_subnet_traffic(rows: list[dict]) -> None:
    """Per minute, direction and action: the records whose address is in a known subnet."""
    expected = defaultdict(lambda: [0, 0, 0])
    for fields in envelope_records():
        for direction, address in (("outbound", fields[3]), ("inbound", fields[4])):
            if address.startswith("10.100.21."):
                key = ("subnet-app", "app", None, int(fields[10]) // 60 * 60, direction,
                       fields[12])
                sums = expected[key]
                sums[0] += 1
                sums[1] += int(fields[8])
                sums[2] += int(fields[9])
    # The TCP records: 10.0.0.62 (subnet-dmz) receives the client's and sends the server's.
    minutes = {1566848875: 1566848820, 1566848933: 1566848880, 1566933133: 1566933120}
    for line in doc_lines("3 vpc-abcdefab012345678"):
        fields = line.split()
        direction = "inbound" if fields[8] == "10.0.0.62" else "outbound"
        key = ("subnet-dmz", "dmz", "vpc-abcdefab012345678", minutes[int(fields[16])],
               direction, "ACCEPT")
        sums = expected[key]
        sums[0] += 1
        sums[1] += int(fields[15])
        sums[2] += int(fields[14])
    got = {(r["subnet"], r["subnet_name"], r["vpc_id"], int(r["minute"].timestamp()),
            r["direction"], r["action"]): [r["flows"], r["packets"], r["bytes"]] for r in rows}
    assert len(got) == len(rows)
    assert got == expected
    assert got[("subnet-dmz", "dmz", "vpc-abcdefab012345678", 1566848820, "inbound",
                "ACCEPT")] == [2, 8 + 70, 568 + 100701]


def check_denials(rows: list[dict], log: list[str]) -> None:
    assert len(rows) == 14 and len({r["id"] for r in rows}) == 14
    [probe] = [r for r in rows if (r["src_addr"], r["src_port"]) == ("123.4.206.108", 43520)]
    assert {k: v for k, v in probe.items() if k != "id"} == {
        "start_at": utc(1466330686), "end_at": utc(1466330742), "interface_id": "eni-12345678",
        "account_id": "1234567890", "vpc_id": None, "subnet_id": None, "instance_id": None,
        "protocol": "udp", "ip_protocol": 17, "src_addr": "123.4.206.108",
        "dst_addr": "10.100.21.62", "src_port": 43520, "dst_port": 13899, "src_subnet": None,
        "dst_subnet": "subnet-app", "packets": 2, "bytes": 116, "tcp_flags": None,
        "flow_direction": None, "reject_reason": None}
    logged = [json.loads(line[len("flowbeam denied "):]) for line in log
              if line.startswith("flowbeam denied ")]
    assert len(logged) == 14
    [entry] = [e for e in logged if (e["src_addr"], e["src_port"]) == ("123.4.206.108", 43520)]
    assert entry == {"start_at": "2016-06-19T10:04:46+00:00",
                     "end_at": "2016-06-19T10:05:42+00:00", "interface_id": "eni-12345678",
                     "account_id": "1234567890", "protocol": "udp", "ip_protocol": 17,
                     "src_addr": "123.4.206.108", "dst_addr": "10.100.21.62",
                     "src_port": 43520, "dst_port": 13899, "dst_subnet": "subnet-app",
                     "packets": 2, "bytes": 116}


def test_bad_envelopes_and_a_default_format_file(tmp_path, capsys):
    """A Firehose file cut in the middle of its JSON, and a header-less file read with
    --log_format: dead letters for what cannot be read, the rest counts."""
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress((json.dumps(CONTROL) + ENVELOPE[:500]).encode()))
    plain = tmp_path / "plain.log"
    plain.write_text("eni-9 10.0.0.1 10.0.0.2 6 1 60 100 160 REJECT\n")
    output = tmp_path / "out"
    assert run(["--input", str(tmp_path / "*"), "--output", str(output), "--log_format",
                "${interface-id} ${srcaddr} ${dstaddr} ${protocol} ${packets} ${bytes} "
                "${start} ${end} ${action}"]) == 0
    summary = summary_of(capsys.readouterr().out)
    assert (summary["files read"], summary["bad envelopes"], summary["flow records"],
            summary["denied records"]) == ("2", "1", "1", "1")
    [error] = read_errors(output)
    assert (error["stage"], error["source"]) == ("decode_envelope", str(cut))
    assert error["reason"].startswith(f"not JSON at offset {len(json.dumps(CONTROL))}: ")
    [row] = read_flows(output)
    assert (row["src_addr"], row["dst_addr"], row["src_port"], row["dst_port"],
            row["src_bytes"], row["action"], row["sensor"]) == (
        "10.0.0.1", "10.0.0.2", 0, 0, 60, "REJECT", "eni-9")


def test_usage_errors(tmp_path, capsys):
    assert run(["--output", str(tmp_path)]) == 2
    assert ("--input (a flow log file, glob, gs:// or s3:// path) or --kinesis_stream is "
            "required") in capsys.readouterr().err
    assert run(["--input", "x", "--output", str(tmp_path), "--log_format", "${srcadr}"]) == 2
    assert "--log_format: unknown field(s) in the log format: srcadr" in capsys.readouterr().err
    assert run(["--input", "x", "--output", str(tmp_path), "--sensor", "s1"]) == 2
    assert "--sensor is not an option of the VPC pipeline" in capsys.readouterr().err
    assert run(["--input", "x", "--output", str(tmp_path), "--byte_accounting", "frame"]) == 2
    assert ("--byte_accounting frame is not an option of the VPC pipeline: flow logs count IP "
            "bytes only") in capsys.readouterr().err
    assert run(["--input", "x", "--output", str(tmp_path), "--subnets_file",
                str(tmp_path / "none.csv")]) == 2
    assert "--subnets_file: cannot read it" in capsys.readouterr().err
    assert run(["--input", "x", "--kinesis_stream", "s", "--output", str(tmp_path)]) == 2
    assert "give --input (files) or --kinesis_stream, not both" in capsys.readouterr().err
    assert run(["--kinesis_stream", "s", "--start_position", "oldest", "--output",
                str(tmp_path)]) == 2
    assert ("--start_position: start position 'oldest': expected one of"
            in capsys.readouterr().err)


def test_help_lists_the_vpc_options(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--input", "--kinesis_stream", "--kinesis_endpoint", "--start_position",
                 "--log_format", "--subnets_from_ec2", "--subnets_file", "--ec2_endpoint",
                 "--subnet_refresh_s", "--aws_region", "--log_denied", "--output",
                 "--output_table", "--idle_timeout"):
        assert flag in out
    for refused in ("--sensor", "--byte_accounting"):
        assert refused not in out


def test_subnet_traffic_figures_are_also_beam_counters(vpc_inputs, tmp_path):
    flow_log, envelopes, subnets = vpc_inputs
    output = tmp_path / "out"
    options = PipelineOptions(["--runner=FnApiRunner"])
    config = parse_config(PipelineOptions([
        "--input", str(flow_log), "--input", str(envelopes), "--output", str(output)]))
    pipeline = beam.Pipeline(options=options)
    build(pipeline, config, load_subnets(str(subnets), subnets.read_text()))
    result = pipeline.run()
    result.wait_until_finish()
    expected = defaultdict(int)
    for row in read_table(output, SUBNET_TRAFFIC):
        for measure in ("flows", "packets", "bytes"):
            expected[f"subnet_traffic/{row['subnet']}/{row['direction']}/{row['action']}/"
                     f"{measure}"] += row[measure]
    values = counter_values(result)
    assert {name: value for name, value in values.items()
            if name.startswith("subnet_traffic/")} == expected
    # subnet-app (10.100.21.0/24) received every one of the 14 REJECT events of the envelope.
    assert values["subnet_traffic/subnet-app/inbound/REJECT/flows"] == 14


def test_every_option_also_comes_from_the_environment(monkeypatch):
    for name, value in (("KINESIS_STREAM", "vpc-flow-logs"), ("AWS_REGION", "eu-west-1"),
                        ("KINESIS_ENDPOINT", "http://127.0.0.1:4567"),
                        ("START_POSITION", "at_timestamp:2026-11-30T12:00:00"),
                        ("LOG_FORMAT", "${srcaddr} ${dstaddr}"), ("SUBNETS_FROM_EC2", "true"),
                        ("SUBNET_REFRESH_S", "60"), ("LOG_DENIED", "1"), ("OUTPUT", "out")):
        monkeypatch.setenv(f"FLOWBEAM_{name}", value)
    config = parse_config(PipelineOptions([]))
    assert (config.kinesis.stream, config.kinesis.region, config.kinesis.endpoint,
            config.kinesis.start_position, config.kinesis.stop_at_latest) == (
        "vpc-flow-logs", "eu-west-1", "http://127.0.0.1:4567",
        "at_timestamp:2026-11-30T12:00:00", False)
    assert config.streaming and config.inputs == ()
    assert (config.log_format, config.log_denied, config.flows.output) == (
        ("srcaddr", "dstaddr"), True, "out")
    assert (config.ec2.region, config.ec2.endpoint, config.ec2.refresh_s) == (
        "eu-west-1", None, 60.0)


SWITCHES = {  # each on/off option, and what it sets in the config
    "log_denied": lambda config: config.log_denied,
    "subnets_from_ec2": lambda config: config.ec2 is not None,
    "kinesis_stop_at_latest": lambda config: config.kinesis.stop_at_latest,
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_switches_also_take_a_value_as_a_flex_template_passes_it(name, monkeypatch):
    monkeypatch.delenv(f"FLOWBEAM_{name.upper()}", raising=False)
    setting = SWITCHES[name]
    for given, expected in ((["--NAME"], True), (["--NAME=true"], True), (["--NAME=YES"], True),
                            (["--NAME=1"], True), (["--NAME", "--output=o"], True),
                            (["--NAME=false"], False), (["--NAME=No"], False),
                            (["--NAME=0"], False), ([], False)):
        argv = ["--kinesis_stream=s", "--output=o", *(a.replace("NAME", name) for a in given)]
        assert setting(parse_config(PipelineOptions(argv))) is expected, given
    for value, expected in (("TRUE", True), ("no", False)):
        monkeypatch.setenv(f"FLOWBEAM_{name.upper()}", value)
        assert setting(parse_config(PipelineOptions(["--kinesis_stream=s", "--output=o"]))) \
            is expected


@pytest.mark.parametrize(("given", "env", "message"), [
    (["--log_denied=maybe"], {},
     "argument --log_denied: expected true or false (also 1/0, yes/no), got 'maybe'"),
    (["--subnets_from_ec2", "on"], {},
     "argument --subnets_from_ec2: expected true or false (also 1/0, yes/no), got 'on'"),
    ([], {"FLOWBEAM_KINESIS_STOP_AT_LATEST": "y"},
     "FLOWBEAM_KINESIS_STOP_AT_LATEST: expected true or false (also 1/0, yes/no), got 'y'"),
], ids=["value", "separate-value", "environment"])
def test_a_switch_with_another_value_is_a_usage_error(given, env, message, tmp_path, capsys,
                                                      monkeypatch):
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    assert run(["--kinesis_stream", "s", "--output", str(tmp_path), *given]) == 2
    assert capsys.readouterr().err == f"flowbeam: error: {message}\n"


RESUME_AFTER_SHAPE = (
    "must be a JSON object of shard id -> sequence number (a string of digits), e.g. "
    '{"shardId-000000000000": "49590338271490256608559692538361571095921575989136588898"}')


def test_the_resume_point_is_json_inline_or_in_a_file(tmp_path):
    positions = {"shardId-000000000000": "49590338271490256608559692538361571095921575989136588898",
                 "shardId-000000000001": "7"}
    saved = tmp_path / "kinesis_positions.json"
    saved.write_text(json.dumps(positions))
    for value in (json.dumps(positions), f"@{saved}"):
        config = parse_config(PipelineOptions([
            "--kinesis_stream=s", "--output=o", f"--kinesis_resume_after={value}"]))
        assert config.kinesis.resume_after == positions
    config = parse_config(PipelineOptions(["--kinesis_stream=s", "--output=o"]))
    assert config.kinesis.resume_after == {}


@pytest.mark.parametrize(("value", "message"), [
    ('{"shardId-000000000000": 4959}', f"the value {RESUME_AFTER_SHAPE}"),
    ('["shardId-000000000000"]', f"the value {RESUME_AFTER_SHAPE}"),
    ('{"shardId-000000000000": "49x"}', f"the value {RESUME_AFTER_SHAPE}"),
    ("shardId-000000000000=4959", "the value is not JSON (Expecting value: line 1 column 1 "
                                  "(char 0))"),
    ("@FILE", "'FILE' is not JSON (Expecting value: line 1 column 1 (char 0))"),
    ("@MISSING", "cannot read 'MISSING': [Errno 2] No such file or directory: 'MISSING'"),
], ids=["number", "list", "not-digits", "not-json", "file-not-json", "no-file"])
def test_a_bad_resume_point_is_a_usage_error(value, message, tmp_path, capsys):
    bad_file = tmp_path / "positions.json"
    bad_file.write_text("not json\n")
    missing = tmp_path / "missing.json"
    value = value.replace("FILE", str(bad_file)).replace("MISSING", str(missing))
    message = message.replace("FILE", str(bad_file)).replace("MISSING", str(missing))
    assert run(["--kinesis_stream", "s", "--output", str(tmp_path),
                "--kinesis_resume_after", value]) == 2
    assert capsys.readouterr().err == f"flowbeam: error: --kinesis_resume_after: {message}\n"


def test_a_resume_point_needs_a_stream(tmp_path, capsys):
    assert run(["--input", "x", "--output", str(tmp_path), "--kinesis_resume_after", "{}"]) == 2
    assert capsys.readouterr().err == (
        "flowbeam: error: --kinesis_resume_after needs --kinesis_stream\n")
