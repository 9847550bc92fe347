"""The Dataflow flex templates (``templates/``), checked without Docker or a cloud.

- Every pipeline has a ``templates/<pipeline>/metadata.json``; it parses as Dataflow parses it,
  and its parameters are exactly the pipeline's flowbeam options (but those ``NOT_PARAMETERS``
  leaves out, with why): a new option fails here until its parameter is added, an option the
  pipeline cannot run without is a non-optional parameter, a switch is a true/false parameter.
- A streaming template's launch writes a streaming job; the image's AWS profile trades the
  job's Google identity for an AWS role's credentials (stand-in metadata server and STS).
- The image's install step is replayed: flowbeam's wheel and the locked requirements into a
  fresh Python 3.11 virtual environment (``--no-deps``, then ``pip check``, as the Dockerfile
  does). From a directory outside the repository, the template's entry file gives the same rows
  as the source tree, also with worker processes (which must import flowbeam as installed).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import boto3
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from google.cloud.dataflow_v1beta3.types import ParameterType, TemplateMetadata

import pipelines
from flowbeam.synthetic import write_capture
from pipelines import pubsub_flows
from pipelines.options import OptionsError, bigquery_insert_mode, resolve_bigquery_config
from pipelines.pcap_flows import run
from tests import test_gcs_input
from tests.local_servers import free_port, server_unavailable
from transforms.bigquery_config import BigQueryConfigError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "templates"
METADATA_FILES = sorted(TEMPLATES.glob("*/metadata.json"))
PIPELINES = [path.parent.name for path in METADATA_FILES]
IMAGE_PYTHON = "3.11"
# Options of a pipeline that are deliberately no parameter of its template, and why.
NOT_PARAMETERS = {
    "pcap_flows": {"decode_processes": "local runs only: on Dataflow, split_mb spreads a "
                   "capture's ranges over the workers (whose captures are never local)"},
    "pubsub_flows": {"sensor": "refused by the pipeline: every batch names its sensor"},
    "vpc_flows": {
        "sensor": "refused by the pipeline: a flow is scoped by its network interface",
        "byte_accounting": "not used by the pipeline: flow logs report IP bytes only",
    },
}
RUNNER = "--runner=FnApiRunner"

# A valid value for every parameter (each must satisfy its parameter's regexes).
EXAMPLES = {
    "input": "gs://captures/2026/11/*/*.pcap",
    "output": "gs://flows/out/",
    "output_table": "my-project:network.flow_logs",
    "bq_project": "my-project",
    "bq_dataset": "network",
    "bq_table": "flow_logs",
    "bq_write_method": "streaming_inserts",
    "bq_insert_mode": "merge",
    "bq_endpoint": "http://127.0.0.1:9050",
    "service_account_key_file": "/secrets/key.json",
    "idle_timeout": "60",
    "active_timeout": "900.5",
    "byte_accounting": "frame",
    "flow_shards": "64",
    "sensor": "tap-1",
    "subscription": "projects/my-project/subscriptions/flowbeam-packets",
    "output_every": "30",
    "kinesis_stream": "vpc-flow-logs",
    "kinesis_endpoint": "http://127.0.0.1:4567",
    "aws_region": "eu-west-1",
    "start_position": "at_timestamp:2026-11-30T00:00:00Z",
    "kinesis_stop_at_latest": "false",
    "log_format": "${version} ${account-id} ${interface-id} ${srcaddr} ${dstaddr} ${srcport} "
                  "${dstport} ${protocol} ${packets} ${bytes} ${start} ${end} ${action} "
                  "${log-status}",
    "subnets_from_ec2": "true",
    "subnets_file": "gs://config/subnets.csv",
    "ec2_endpoint": "http://127.0.0.1:4568",
    "subnet_refresh_s": "600",
    "log_denied": "true",
    "split_mb": "32",
    "kinesis_resume_after": '{"shardId-000000000000": '
                            '"49590338271490256608559692538361571095921575989136588898"}',
}
# Checked separately: its example would need a real private key.
NEEDS_A_REAL_FILE = {"service_account_key_file"}


@dataclass(frozen=True)
class Launch:
    """A launch of a template that must be accepted: the parameters given (their EXAMPLES,
    unless ``values`` has another) and whether the pipeline then runs as a streaming job."""

    names: frozenset[str]
    streaming: bool = False
    values: tuple[tuple[str, str], ...] = ()

    def argv(self, without: str = "") -> list[str]:
        values = {**EXAMPLES, **dict(self.values)}
        return [f"--{name}={values[name]}" for name in sorted(self.names)
                if name != without and name not in NEEDS_A_REAL_FILE]

    def value(self, name: str) -> str:
        return dict(self.values).get(name, EXAMPLES[name])


SINKS = frozenset({"output", "output_table", "bq_project", "bq_dataset", "bq_table",
                   "bq_write_method", "bq_insert_mode", "bq_endpoint",
                   "service_account_key_file"})
FLOWS = frozenset({"idle_timeout", "active_timeout", "flow_shards"})
APPEND = (("bq_insert_mode", "append"),)
# Launches of each template that together give every parameter a value: a parameter is one
# the pipeline needs when every launch has it and each refuses to run without it.
LAUNCHES = {
    "pcap_flows": [Launch(SINKS | FLOWS | {"input", "split_mb", "byte_accounting", "sensor"})],
    "pubsub_flows": [Launch(SINKS | FLOWS | {"subscription", "output_every", "byte_accounting"},
                            streaming=True, values=APPEND)],
    "vpc_flows": [
        Launch(SINKS | FLOWS | {"input", "log_format", "subnets_file", "log_denied"},
               values=(("input", "s3://logs/AWSLogs/*/vpcflowlogs/*/2026/11/*/*.log.gz"),)),
        Launch(SINKS | FLOWS | {"kinesis_stream", "aws_region", "start_position",
                                "kinesis_stop_at_latest", "kinesis_endpoint",
                                "subnets_from_ec2", "ec2_endpoint", "subnet_refresh_s",
                                "output_every"}, streaming=True, values=APPEND),
        # A back-fill: a bounded read of the stream, so a batch job that merges.
        Launch(SINKS | FLOWS | {"kinesis_stream", "aws_region", "kinesis_stop_at_latest",
                                "kinesis_resume_after"},
               values=(("kinesis_stop_at_latest", "true"), ("start_position", "trim_horizon"))),
    ],
}


# --- metadata.json ------------------------------------------------------------------------------


def metadata(pipeline: str) -> TemplateMetadata:
    """The template's metadata, parsed as strictly as Dataflow does: an unknown or misspelled
    field fails here rather than at ``gcloud dataflow flex-template build``."""
    text = (TEMPLATES / pipeline / "metadata.json").read_text()
    return TemplateMetadata.from_json(text, ignore_unknown_fields=False)


def option_parser(module: ModuleType) -> argparse.ArgumentParser:
    """A parser of the flowbeam options of a pipeline: those of every PipelineOptions class of
    flowbeam's the pipeline module defines or imports (its own, and the shared ones it
    registers)."""
    parser = argparse.ArgumentParser()
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, PipelineOptions)
                and value.__module__.startswith("pipelines.")):
            value._add_argparse_args(parser)
    return parser


def pipeline_option_names(module: ModuleType) -> set[str]:
    """The names (``dest``) of the flowbeam options of a pipeline."""
    return {action.dest for action in option_parser(module)._actions if action.dest != "help"}


def refuses_to_run(module: ModuleType, argv: list[str], streaming: bool) -> bool:
    """Whether the pipeline's option checks (those ``run`` makes first, in the mode ``run``
    gives the job) reject ``argv``."""
    options = PipelineOptions(argv)
    options.view_as(StandardOptions).streaming = streaming
    try:
        bigquery = resolve_bigquery_config(options)
        if bigquery is not None:
            bigquery_insert_mode(options, bigquery)
        module.parse_config(options, to_bigquery=bigquery is not None)
    except (OptionsError, BigQueryConfigError):
        return True
    return False


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("FLOWBEAM_") or name == "BIGQUERY_EMULATOR_HOST":
            monkeypatch.delenv(name)


def test_every_pipeline_has_a_template():
    modules = [importlib.import_module(f"pipelines.{info.name}")
               for info in pkgutil.iter_modules(pipelines.__path__)]
    found = sorted(module.__name__.removeprefix("pipelines.") for module in modules
                   if callable(getattr(module, "build", None))
                   and callable(getattr(module, "main", None)))
    assert found == PIPELINES
    assert sorted(LAUNCHES) == found


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_parameters_are_exactly_the_pipeline_options(pipeline):
    parameters = [parameter.name for parameter in metadata(pipeline).parameters]
    options = pipeline_option_names(importlib.import_module(f"pipelines.{pipeline}"))
    left_out = set(NOT_PARAMETERS.get(pipeline, {}))
    assert left_out <= options, "NOT_PARAMETERS names an option the pipeline no longer has"
    assert len(parameters) == len(set(parameters)), "a parameter is listed twice"
    assert sorted(set(parameters) - (options - left_out)) == [], "parameters that are no options"
    assert sorted(options - left_out - set(parameters)) == [], "options missing from metadata.json"
    for parameter in metadata(pipeline).parameters:
        assert parameter.label and parameter.help_text and parameter.regexes, parameter.name


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_options_a_pipeline_needs_are_the_non_optional_parameters(pipeline, clean_env):
    module = importlib.import_module(f"pipelines.{pipeline}")
    parameters = {parameter.name: parameter for parameter in metadata(pipeline).parameters}
    launches = LAUNCHES[pipeline]
    unused = sorted(set(parameters) - set().union(*(launch.names for launch in launches)))
    assert unused == [], f"give {unused} a value in a launch of LAUNCHES[{pipeline!r}]"
    for launch in launches:
        assert launch.names <= set(parameters), sorted(launch.names - set(parameters))
        for name in launch.names:
            for regex in parameters[name].regexes:
                assert re.fullmatch(regex, launch.value(name)), (name, regex)
        assert not refuses_to_run(module, launch.argv(), launch.streaming), launch
    needed = sorted(name for name in parameters if name not in NEEDS_A_REAL_FILE
                    and all(name in launch.names
                            and refuses_to_run(module, launch.argv(without=name),
                                               launch.streaming)
                            for launch in launches))
    non_optional = sorted(name for name, p in parameters.items() if not p.is_optional)
    assert needed == non_optional


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_switches_are_true_false_parameters(pipeline, clean_env):
    """A template passes every parameter as ``--name=value``: a switch (an option whose
    default is a bool) is a BOOLEAN parameter of true or false, and the pipeline reads both."""
    parser = option_parser(importlib.import_module(f"pipelines.{pipeline}"))
    switches = sorted(action.dest for action in parser._actions
                      if isinstance(action.default, bool))
    parameters = {parameter.name: parameter for parameter in metadata(pipeline).parameters}
    booleans = sorted(name for name, parameter in parameters.items()
                      if parameter.param_type == ParameterType.BOOLEAN)
    assert booleans == [name for name in switches if name in parameters]
    for name in booleans:
        assert list(parameters[name].regexes) == ["^(true|false)$"], name
        for text, meant in (("true", True), ("false", False)):
            assert getattr(parser.parse_args([f"--{name}={text}"]), name) is meant, (name, text)


def load_entry_file() -> ModuleType:
    spec = importlib.util.spec_from_file_location("template_main", TEMPLATES / "main.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    return entry


def test_the_entry_file_sends_workers_to_its_own_image():
    entry = load_entry_file()
    image = {"TEMPLATE_SDK_CONTAINER_IMAGE": "europe-docker.pkg.dev/p/r/flowbeam-pcap_flows:abc"}
    assert entry.launch_argv(["--input=gs://b/*.pcap"], image) == [
        "--input=gs://b/*.pcap",
        "--sdk_container_image=europe-docker.pkg.dev/p/r/flowbeam-pcap_flows:abc"]
    given = ["--sdk_container_image=other:1", "--input=gs://b/*.pcap"]
    assert entry.launch_argv(given, image) == given
    assert entry.launch_argv(["--input=x"], {"TEMPLATE_SDK_CONTAINER_IMAGE": ""}) == ["--input=x"]
    assert entry.launch_argv(["--input=x"], {}) == ["--input=x"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_entry_file_runs_the_image_pipeline(pipeline):
    entry = load_entry_file()
    module = importlib.import_module(f"pipelines.{pipeline}")
    assert entry.pipeline_main({"TEMPLATE_PIPELINE": pipeline}) is module.main
    with pytest.raises(SystemExit) as stop:
        entry.pipeline_main({})
    assert str(stop.value) == (
        "flowbeam: TEMPLATE_PIPELINE is not set: build the image with "
        "--build-arg PIPELINE=<pipeline> (templates/build.sh does)")


# --- The image, replayed without Docker -------------------------------------------------------


def dockerfile() -> str:
    return (TEMPLATES / "Dockerfile").read_text()


def test_the_dockerfile_is_launcher_and_worker_and_installs_the_lock_only():
    text = dockerfile()
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in text
    assert "FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam_sdk" in text
    # The image's Python is the one the replay uses; its boot is the lock's Beam.
    assert re.search(r"^ARG PYTHON_VERSION=(\S+)$", text, re.M)[1] == IMAGE_PYTHON
    beam_version = re.search(r"^ARG BEAM_VERSION=(\S+)$", text, re.M)[1]
    assert "/opt/google/dataflow/python_template_launcher" in text
    assert "ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/main.py" in text
    # The pipeline and the image's name are the last layers: every other one is shared.
    assert text.rstrip().endswith(
        "ARG PIPELINE\nENV TEMPLATE_PIPELINE=${PIPELINE}\n"
        "ARG IMAGE\nENV TEMPLATE_SDK_CONTAINER_IMAGE=${IMAGE}\n\n"
        'ENTRYPOINT ["/opt/apache/beam/boot"]')
    # The step image_venv replays:
    assert ("RUN pip install --no-cache-dir --no-deps -r requirements.lock "
            "dist/flowbeam-*.whl && pip check") in text
    lock = (TEMPLATES / "requirements.lock").read_text()
    assert f"\napache-beam=={beam_version}\n" in lock
    pins = [line for line in lock.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9.\-]*==\S+", pin) for pin in pins), pins


def image_python() -> str:
    """A Python of the image's version for the fresh environment."""
    if sys.version_info[:2] == tuple(int(part) for part in IMAGE_PYTHON.split(".")):
        return sys.executable
    found = shutil.which(f"python{IMAGE_PYTHON}")
    if found is None:
        server_unavailable(f"python{IMAGE_PYTHON}", "not installed here: the image's "
                           "environment cannot be replayed")
    return found


def check_run(command: list[str], cwd: Path, what: str, timeout_s: float = 300,
              **env_vars: str) -> str:
    """Run a step of the replay with only ``env_vars`` of flowbeam's settings; a failure shows
    its output."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONPATH", "BIGQUERY_EMULATOR_HOST")
           and not name.startswith("FLOWBEAM_")}
    env.update(env_vars)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    """The image's /template replayed in a directory outside the repository: the wheel of a
    copy of the tree (no stale setuptools build/), a fresh venv with the lock and the wheel,
    ``pip check``, and the entry file. About 1 min with pip's cache (more on a busy machine)."""
    base = tmp_path_factory.mktemp("image")
    source = base / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("flowbeam", "pipelines", "transforms"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    started = time.monotonic()
    check_run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
               "--wheel-dir", str(base / "dist"), str(source)], base, "pip wheel")
    venv = base / "venv"
    check_run([image_python(), "-m", "venv", str(venv)], base, "python -m venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    wheels = glob.glob(str(base / "dist" / "flowbeam-*.whl"))
    # As the Dockerfile, but without byte-compiling (a third of the time, nothing to check).
    check_run([*pip, "install", "--quiet", "--no-compile", "--no-deps", "-r",
               str(TEMPLATES / "requirements.lock"), *wheels], base, "pip install", 600)
    stale = ("pip check (is templates/requirements.lock stale? `.venv/bin/python "
             "templates/lock_requirements.py > templates/requirements.lock`)")
    assert "No broken requirements found." in check_run([*pip, "check"], base, stale)
    template = base / "template"
    template.mkdir()
    shutil.copy(TEMPLATES / "main.py", template / "main.py")
    print(f"image environment replayed in {time.monotonic() - started:.1f} s")
    return base


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("capture") / "sample.pcap"
    write_capture(str(path), flows=60, packets=900, seed=5)
    return path


def parquet_rows(directory: Path) -> list[dict]:
    files = sorted(glob.glob(str(directory / "flows-*.parquet")))
    assert files, f"no flows-*.parquet in {directory}"
    rows = [row for name in files for row in pq.read_table(name).to_pylist()]
    return sorted(rows, key=lambda row: row["id"])


@pytest.fixture(scope="module")
def source_tree_rows(capture, tmp_path_factory) -> list[dict]:
    output = tmp_path_factory.mktemp("source_tree")
    assert run(["--input", str(capture), "--output", str(output), RUNNER]) == 0
    return parquet_rows(output)


# The GCS emulator of tests/test_gcs_input.py: Dataflow's runner stages files in a bucket.
gcs = test_gcs_input.gcs


def test_a_template_launch_writes_the_job_graph_and_returns(gcs, capture, tmp_path, capsys):
    """What the flex template launcher does: run the entry file with --template_location.
    Dataflow's runner builds the job graph (flowbeam's transforms, pickled) and writes it
    instead of starting a job; there is nothing to wait for and no metric to read, so the
    launch must end at once, with 0. Offline: no job is created, only files are staged."""
    image = "europe-docker.pkg.dev/my-project/flowbeam/flowbeam-pcap_flows:abc"
    job_file = tmp_path / "job.json"
    code = run(["--input", str(capture), "--output", "gs://captures/flows/",
                "--runner=DataflowRunner", "--project=my-project", "--region=europe-west1",
                "--temp_location=gs://captures/tmp", "--staging_location=gs://captures/staging",
                f"--template_location={job_file}", "--sdk_location=container",
                *load_entry_file().launch_argv([], {"TEMPLATE_SDK_CONTAINER_IMAGE": image})])
    assert code == 0
    assert capsys.readouterr().out == (
        "flowbeam: job graph written to --template_location; Dataflow runs the job\n")
    [workers] = json.loads(job_file.read_text())["environment"]["workerPools"]
    assert workers["workerHarnessContainerImage"] == image
    assert [c["containerImage"] for c in workers["sdkHarnessContainerImages"]] == [image]


def test_the_image_imports_flowbeam_as_installed(image_venv):
    python = str(image_venv / "venv" / "bin" / "python")
    found = check_run([python, "-c", "import flowbeam, pipelines, transforms; "
                       "print(flowbeam.__file__, pipelines.__file__, transforms.__file__)"],
                      image_venv, "import")
    site_packages = str(image_venv / "venv" / "lib" / f"python{IMAGE_PYTHON}" / "site-packages")
    assert [path.startswith(site_packages) for path in found.split()] == [True, True, True]


@pytest.mark.parametrize("workers", [
    [],
    ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
], ids=["in_process", "two_worker_processes"])
def test_the_entry_file_gives_the_rows_of_the_source_tree(image_venv, capture, source_tree_rows,
                                                          workers, tmp_path):
    python = str(image_venv / "venv" / "bin" / "python")
    entry = str(image_venv / "template" / "main.py")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    summary = check_run([python, entry, "--input", str(capture), "--output", str(tmp_path / "out"),
                         RUNNER, *workers], elsewhere, "the entry file",
                        TEMPLATE_PIPELINE="pcap_flows")
    assert "flows                    60" in summary
    assert parquet_rows(tmp_path / "out") == source_tree_rows
    assert len(source_tree_rows) == 60


# --- AWS credentials of a job (templates/aws_credentials.py) ------------------------------------


def write_aws_profile(directory: Path, **build_args: str) -> Path:
    """Replay the Dockerfile's AWS profile step with ``build_args``, in ``directory`` instead
    of /template (the credential helper copied there); returns the AWS_CONFIG_FILE it sets."""
    step = re.search(r'^RUN (if \[ -n "\$AWS_ROLE_ARN" \].*?fi)$', dockerfile(), re.M | re.S)[1]
    assert "ENV AWS_CONFIG_FILE=/template/aws_config" in dockerfile()
    assert re.search(r"^ARG AWS_AUDIENCE=flowbeam$", dockerfile(), re.M)
    shutil.copy(TEMPLATES / "aws_credentials.py", directory / "aws_credentials.py")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "AWS_AUDIENCE": "flowbeam",
           **build_args}
    subprocess.run(["sh", "-c", step.replace("/template/", f"{directory}/")], env=env,
                   check=True)
    return directory / "aws_config"


STS_ANSWER = """<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>ASIAFLOWBEAMTEST</AccessKeyId>
      <SecretAccessKey>not-a-real-secret</SecretAccessKey>
      <SessionToken>session-token</SessionToken>
      <Expiration>2099-12-01T12:00:00Z</Expiration>
    </Credentials>
    <SubjectFromWebIdentityToken>104200000000000000001</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/flowbeam-dataflow/flowbeam-dataflow</Arn>
      <AssumedRoleId>AROAFLOWBEAM:flowbeam-dataflow</AssumedRoleId>
    </AssumedRoleUser>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>flowbeam-test</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"""


@pytest.fixture
def google_and_sts(monkeypatch, tmp_path):
    """A metadata server that signs 'google-id-token' and an STS that trades it for fixed
    credentials, on 127.0.0.1; the requests they got; no other AWS configuration."""
    seen: dict[str, object] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # the metadata server
            seen["identity"] = (self.path, self.headers.get("Metadata-Flavor"))
            self._answer(b"google-id-token", "application/text")

        def do_POST(self):  # STS
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            seen["sts"] = (urllib.parse.parse_qs(body), self.headers.get("Authorization"))
            self._answer(STS_ANSWER.encode(), "text/xml")

        def _answer(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{server.server_port}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{server.server_port}")
    yield seen
    server.shutdown()
    thread.join()


def test_without_a_role_the_image_has_no_aws_profile(tmp_path):
    assert not write_aws_profile(tmp_path, AWS_ROLE_ARN="").exists()


def test_boto3_trades_the_job_identity_for_the_role_credentials(google_and_sts, tmp_path,
                                                                 monkeypatch):
    role = "arn:aws:iam::123456789012:role/flowbeam-dataflow"
    config = write_aws_profile(tmp_path, AWS_ROLE_ARN=role)
    assert config.read_text() == (f"[default]\ncredential_process = {sys.executable} "
                                  f"{tmp_path}/aws_credentials.py {role} flowbeam\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    credentials = boto3.session.Session().get_credentials().get_frozen_credentials()
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (
        "ASIAFLOWBEAMTEST", "not-a-real-secret", "session-token")
    path, flavor = google_and_sts["identity"]
    assert flavor == "Google"
    assert path == ("/computeMetadata/v1/instance/service-accounts/default/identity"
                    "?audience=flowbeam&format=full")
    form, authorization = google_and_sts["sts"]
    assert form["Action"] == ["AssumeRoleWithWebIdentity"]
    assert form["RoleArn"] == [role]
    assert form["WebIdentityToken"] == ["google-id-token"]
    assert authorization is None  # unsigned: the job has no AWS credential to sign with


def test_the_credential_helper_fails_in_one_line(google_and_sts, monkeypatch):
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{free_port()}")
    done = subprocess.run([sys.executable, str(TEMPLATES / "aws_credentials.py"),
                           "arn:aws:iam::123456789012:role/r", "flowbeam"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("flowbeam: no Google ID token from the metadata server: ")
    assert done.stderr.count("\n") == 1


def test_a_pubsub_template_launch_writes_a_streaming_job(gcs, tmp_path, capsys):
    """The streaming template needs no ``streaming`` parameter: the pipeline makes its job a
    streaming one itself, and the launch returns once the job graph is written."""
    job_file = tmp_path / "job.json"
    code = pubsub_flows.run([
        "--subscription=projects/my-project/subscriptions/flowbeam-packets",
        "--output=gs://captures/flows/", "--runner=DataflowRunner", "--project=my-project",
        "--region=europe-west1", "--temp_location=gs://captures/tmp",
        "--staging_location=gs://captures/staging", f"--template_location={job_file}",
        "--sdk_location=container"])
    assert code == 0
    assert capsys.readouterr().out == (
        "flowbeam: job graph written to --template_location; Dataflow runs the job\n")
    assert json.loads(job_file.read_text())["type"] == "JOB_TYPE_STREAMING"
