"""The Dataflow flex templates (``templates/``), checked without Docker or a cloud.

- Every ``templates/<pipeline>/metadata.json`` parses as Dataflow parses it, and its parameters
  are exactly the pipeline's flowbeam options: a new option fails here until its parameter is
  added, an option the pipeline cannot run without is a non-optional parameter.
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
import time
from pathlib import Path
from types import ModuleType

import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from google.cloud.dataflow_v1beta3.types import TemplateMetadata

import pipelines
from flowbeam.synthetic import write_capture
from pipelines.options import OptionsError, bigquery_insert_mode, resolve_bigquery_config
from pipelines.pcap_flows import run
from tests import test_gcs_input
from tests.local_servers import server_unavailable
from transforms.bigquery_config import BigQueryConfigError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "templates"
METADATA_FILES = sorted(TEMPLATES.glob("*/metadata.json"))
PIPELINES = [path.parent.name for path in METADATA_FILES]
IMAGE_PYTHON = "3.11"
# Pipelines whose template is still to come, and why: a new pipeline must be here or have its
# templates/<pipeline>/metadata.json.
NO_TEMPLATE_YET = {
    "pubsub_flows": "streaming; its options are still changing",
    "vpc_flows": "its boolean flags (--log_denied) need a value form to be template parameters",
}
RUNNER = "--runner=FnApiRunner"

# A valid value for every flowbeam option, to find which ones a pipeline cannot run without
# (each must also satisfy its parameter's regexes). A new option needs an example here.
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
}
# Checked separately: its example would need a real private key.
NEEDS_A_REAL_FILE = {"service_account_key_file"}


# --- metadata.json ------------------------------------------------------------------------------


def metadata(pipeline: str) -> TemplateMetadata:
    text = (TEMPLATES / pipeline / "metadata.json").read_text()
    return TemplateMetadata.from_json(text, ignore_unknown_fields=False)


def pipeline_option_names(module: ModuleType) -> set[str]:
    """The flowbeam options of a pipeline: those of every PipelineOptions class of flowbeam's
    the pipeline module defines or imports (its own, and the shared ones it registers)."""
    parser = argparse.ArgumentParser()
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, PipelineOptions)
                and value.__module__.startswith("pipelines.")):
            value._add_argparse_args(parser)
    return {action.dest for action in parser._actions if action.dest != "help"}


def refuses_to_run(module: ModuleType, argv: list[str]) -> bool:
    """Whether the pipeline's option checks (those ``run`` makes first) reject ``argv``."""
    options = PipelineOptions(argv)
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
    assert sorted([*PIPELINES, *NO_TEMPLATE_YET]) == found


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_parameters_are_exactly_the_pipeline_options(pipeline):
    parameters = [parameter.name for parameter in metadata(pipeline).parameters]
    options = pipeline_option_names(importlib.import_module(f"pipelines.{pipeline}"))
    assert len(parameters) == len(set(parameters)), "a parameter is listed twice"
    assert sorted(set(parameters) - options) == [], "parameters that are not options"
    assert sorted(options - set(parameters)) == [], "options missing from metadata.json"
    for parameter in metadata(pipeline).parameters:
        assert parameter.label and parameter.help_text and parameter.regexes, parameter.name


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_options_a_pipeline_needs_are_the_non_optional_parameters(pipeline, clean_env):
    module = importlib.import_module(f"pipelines.{pipeline}")
    parameters = {parameter.name: parameter for parameter in metadata(pipeline).parameters}
    missing = sorted(set(parameters) - set(EXAMPLES))
    assert missing == [], f"give an example value for {missing} in EXAMPLES"
    for name, parameter in parameters.items():
        for regex in parameter.regexes:
            assert re.fullmatch(regex, EXAMPLES[name]), (name, regex)
    given = {name: EXAMPLES[name] for name in parameters if name not in NEEDS_A_REAL_FILE}
    argv = [f"--{name}={value}" for name, value in given.items()]
    assert not refuses_to_run(module, argv)
    needed = sorted(name for name in given
                    if refuses_to_run(module, [arg for arg in argv
                                               if not arg.startswith(f"--{name}=")]))
    non_optional = sorted(name for name, p in parameters.items() if not p.is_optional)
    assert needed == non_optional


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
    assert "ARG PIPELINE=pcap_flows\nENV TEMPLATE_PIPELINE=${PIPELINE}\n" in text
    assert "ENV TEMPLATE_SDK_CONTAINER_IMAGE=${IMAGE}" in text
    assert text.rstrip().endswith('ENTRYPOINT ["/opt/apache/beam/boot"]')
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
