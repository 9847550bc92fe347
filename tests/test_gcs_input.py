"""gs:// inputs and outputs through Beam's GCS filesystem, against a real GCS emulator
(gcp-storage-emulator) on 127.0.0.1."""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from apache_beam.internal.gcp import auth as beam_auth

from flowbeam.capture.writer import write_pcap
from flowbeam.synthetic import generate_packets, plan_traffic
from pipelines.pcap_flows import run
from tests.local_servers import free_port, running_server, server_unavailable
from tests.test_pcap_pipeline import as_expected, truth

EMULATOR = Path(sys.executable).with_name("gcp-storage-emulator")


@pytest.fixture(scope="module")
def gcs():
    if not EMULATOR.exists():
        server_unavailable("gcp-storage-emulator",
                           f"{EMULATOR} is absent (pip install gcp-storage-emulator)")
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        env.setenv("NO_GCE_CHECK", "True")  # never probe a cloud metadata server
        env.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        # Beam looks for Application Default Credentials with ~20 s of retries before it
        # connects anonymously (what the emulator wants): start from "none found".
        env.setattr(beam_auth._Credentials, "_credentials_init", True)
        env.setattr(beam_auth._Credentials, "_credentials", None)
        from google.cloud import storage
        client = storage.Client.create_anonymous_client()

        def bucket_created() -> bool:
            try:
                client.create_bucket("captures")
            except OSError:
                return False
            return True

        command = [str(EMULATOR), "start", "--host", "127.0.0.1", "--port", str(port),
                   "--in-memory"]
        with running_server(command, bucket_created, "gcp-storage-emulator"):
            yield client


def test_gs_glob_in_and_gs_directory_out(gcs):
    plan = plan_traffic(flows=60, packets=1200, seed=31)
    packets = list(generate_packets(plan))
    half = len(packets) // 2
    plain, packed = io.BytesIO(), io.BytesIO()
    write_pcap(plain, packets[:half])
    with gzip.GzipFile(fileobj=packed, mode="wb") as stream:
        write_pcap(stream, packets[half:])
    bucket = gcs.bucket("captures")
    bucket.blob("site-a/1.pcap").upload_from_string(plain.getvalue())
    bucket.blob("site-a/2.pcap.gz").upload_from_string(packed.getvalue())

    assert run(["--input", "gs://captures/site-a/*", "--output", "gs://captures/flows",
                "--runner=FnApiRunner"]) == 0
    names = sorted(b.name for b in gcs.list_blobs("captures", prefix="flows/"))
    parquet = [n for n in names if n.startswith("flows/flows-") and n.endswith(".parquet")]
    assert parquet, names
    rows = []
    for name in parquet:
        rows += pq.read_table(io.BytesIO(bucket.blob(name).download_as_bytes())).to_pylist()
    assert sorted(as_expected(r) for r in rows) == truth(plan)
