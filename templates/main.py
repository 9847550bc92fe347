"""Entry file of every flowbeam flex template (``FLEX_TEMPLATE_PYTHON_PY_FILE``).

The template launcher runs this file with the template's parameters as ``--name=value``
flags (plus Dataflow's own: ``--runner``, ``--project``, ``--region``, ``--temp_location``...).
It runs the installed ``pipelines.<TEMPLATE_PIPELINE>`` (the image's pipeline, set by
the Dockerfile's ``PIPELINE``: a template spec cannot set the launcher's environment, and a
parameter naming the pipeline would be one more thing to get wrong at every launch), so a new
pipeline's template needs only its ``metadata.json``; and it makes sure the workers run the
image the launcher runs (``launch_argv``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence

PIPELINE_VARIABLE = "TEMPLATE_PIPELINE"
IMAGE_VARIABLE = "TEMPLATE_SDK_CONTAINER_IMAGE"


def pipeline_main(environ: Mapping[str, str]) -> Callable[[], None]:
    """The ``main`` of the image's pipeline module."""
    name = environ.get(PIPELINE_VARIABLE)
    if not name:
        sys.exit(f"flowbeam: {PIPELINE_VARIABLE} is not set: build the image with "
                 "--build-arg PIPELINE=<pipeline> (templates/build.sh does)")
    return importlib.import_module(f"pipelines.{name}").main


def launch_argv(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """``argv`` plus ``--sdk_container_image`` = this image (the Dockerfile records its own name
    in ``TEMPLATE_SDK_CONTAINER_IMAGE``) unless the launch gave one: without it, workers would
    start Beam's stock container, which has no flowbeam to import."""
    image = environ.get(IMAGE_VARIABLE)
    if not image or any(arg.split("=", 1)[0] == "--sdk_container_image" for arg in argv):
        return list(argv)
    return [*argv, f"--sdk_container_image={image}"]


if __name__ == "__main__":
    pipeline = pipeline_main(os.environ)
    sys.argv[1:] = launch_argv(sys.argv[1:], os.environ)
    pipeline()
