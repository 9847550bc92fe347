"""Every command block of the README's pcap sections that a user would copy is run here, as
written, in a scratch directory; and the README's BigQuery queries return rows on the sample.

Not run: blocks that need a cloud (``DataflowRunner``, ``gs://my-bucket``), and the
``make test`` line of the set-up block (it runs this suite: it would run itself).
The BigQuery emulator block runs with other free ports than the README's 9050/9060 (other
tests may be using those) and is stopped when it ends.
"""

from __future__ import annotations

import collections
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flowbeam.capture.writer import write_pcap, write_pcapng
from flowbeam.cli import REFUSED
from flowbeam.synthetic import REFUSED_KIND, generate_packets, plan_traffic, write_capture
from pipelines.pcap_flows import run
from tests.local_servers import free_port, server_unavailable
from tests.test_pcap_pipeline import read_errors, read_flows

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUN_SECTIONS = ("Set up and run", "Running the pcap pipeline", "Bad input",
                "Reading the results")
NEEDS_A_CLOUD = ("DataflowRunner", "gs://my-bucket")
EMULATOR_BLOCK = "tests/bigquery_emulator.py start"


def blocks(language: str) -> list[tuple[str, str]]:
    """(heading, text) of every ```language block of the README, in order."""
    found, heading, block = [], "", None
    for line in README.read_text().splitlines():
        if block is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif block is None and line == f"```{language}":
            block = []
        elif block is not None and line == "```":
            found.append((heading, "\n".join(block) + "\n"))
            block = None
        elif block is not None:
            block.append(line)
    return found


def pcap_blocks() -> list[str]:
    """The sh blocks of the pcap sections to run, in README order."""
    return [text for heading, text in blocks("sh")
            if heading.startswith(RUN_SECTIONS) and not any(c in text for c in NEEDS_A_CLOUD)]


def shell(script: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run a README block with bash, as a user's shell would, without FLOWBEAM_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWBEAM_")}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch checkout: the Makefile, this venv and tests (links), and the inputs the pcap
    block names: captures/*.pcap.gz and other.pcapng."""
    root = tmp_path_factory.mktemp("readme")
    for name in (".venv", "tests"):
        (root / name).symlink_to(REPO / name)
    shutil.copy(REPO / "Makefile", root / "Makefile")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    os.utime(root / "pyproject.toml", (0, 0))  # older than .venv/.installed: no reinstall
    (root / "captures").mkdir()
    with gzip.open(root / "captures" / "a.pcap.gz", "wb") as stream:
        write_pcap(stream, generate_packets(plan_traffic(flows=30, packets=600, seed=41)))
    with open(root / "other.pcapng", "wb") as stream:
        write_pcapng(stream, list(generate_packets(
            plan_traffic(flows=20, packets=400, seed=42, start_s=1_800_000_000))))
    return root


def test_the_readme_has_the_blocks_this_test_runs():
    texts = pcap_blocks()
    assert [t.split()[0] for t in texts] == ["make", ".venv/bin/python", ".venv/bin/python",
                                            ".venv/bin/python", "cat"]


def test_the_pcap_sections_run_as_written(workspace):
    setup, pipeline, duckdb_query, pyarrow_read, dead_letters = pcap_blocks()
    assert setup.splitlines()[1].startswith("make test")
    done = shell(setup.splitlines()[0] + "\n", workspace)  # make run
    assert done.returncode == 0, done.stderr
    assert "flowbeam summary" in done.stdout
    assert len(read_flows(workspace / "out")) == 2000

    done = shell(pipeline, workspace)
    assert done.returncode == 0, done.stderr
    assert len(read_flows(workspace / "out")) == 30 + 20
    assert read_errors(workspace / "out") == []

    done = shell(duckdb_query, workspace)
    assert done.returncode == 0, done.stderr
    assert "10 rows" in done.stdout and "src_addr" in done.stdout

    done = shell(pyarrow_read, workspace)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "50 flows"

    done = shell(dead_letters, workspace)
    assert (done.returncode, done.stdout) == (0, "")


def test_the_bigquery_emulator_block_runs_and_reads_the_rows_back(workspace):
    try:
        import bqemulator  # noqa: F401
    except ImportError:
        server_unavailable("BigQuery emulator", "bqemulator is not installed")
    [block] = [text for _, text in blocks("sh") if EMULATOR_BLOCK in text]
    if not (workspace / "sample" / "sample.pcap").exists():
        assert shell("make run\n", workspace).returncode == 0
    rest, grpc = free_port(), free_port()
    script = block.replace("9050", str(rest)).replace("9060", str(grpc))
    done = shell("trap 'kill $(jobs -p) 2>/dev/null' EXIT\n" + script, workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = collections.Counter(r["status"] for r in read_flows(workspace / "out"))
    read_back = done.stdout[done.stdout.index("flowbeam summary"):].splitlines()
    assert read_back[-len(statuses):] == [f"{s} {n}" for s, n in sorted(statuses.items())]


def sql_block(marker: str) -> str:
    """The one README query containing ``marker``."""
    [text] = [text for _, text in blocks("sql") if marker in text]
    return text


def test_the_example_queries_return_rows_on_the_sample(bigquery_emulator, tmp_path):
    from google.cloud import bigquery

    from transforms.bigquery_config import STREAMING_INSERTS, BigQueryConfig, TableRef
    from transforms.bigquery_tables import cloud_client

    project = bigquery_emulator.project
    client: bigquery.Client = cloud_client(BigQueryConfig(
        TableRef(project, "readme", "flow_logs"), STREAMING_INSERTS, bigquery_emulator.url))
    client.delete_dataset("readme", delete_contents=True, not_found_ok=True)
    client.create_dataset("readme")
    sample = tmp_path / "sample.pcap"
    plan = write_capture(str(sample), 2000, 40000, 1, REFUSED)  # `flowbeam generate`'s
    assert run(["--input", str(sample), "--output", str(tmp_path / "out"),
                "--output_table", f"{project}:readme.flow_logs",
                "--bq_endpoint", bigquery_emulator.url, "--runner=FnApiRunner"]) == 0
    rows = {}
    for name, marker in (("top", "bytes_sent"), ("refused", "AS reset"),
                         ("rejected", "flow_logs_errors")):
        sql = re.sub(r"`my-project\.network\.", f"`{project}.readme.", sql_block(marker))
        rows[name] = [dict(r.items()) for r in client.query(sql).result()]
    assert len(rows["top"]) == 20
    refused_flows = int((plan.kind == REFUSED_KIND).sum())
    assert refused_flows > 0
    assert len(rows["refused"]) == refused_flows
    assert all(r["reset"] and r["packets"] == 2 for r in rows["refused"])
    assert rows["rejected"] == []  # the emulator accepted every row
