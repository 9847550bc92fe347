"""Options from the environment: every ``--name`` of flowbeam's commands also comes from
``$FLOWBEAM_<NAME>`` (the command line wins), so a systemd unit, a container or a Dataflow
launcher sets them in its environment.

Shared by the pipelines (``pipelines.options``) and the capture agent (``flowbeam.agent``),
which must not import the pipelines: one reading of a variable, one switch syntax, one check
for misspelled variables.
"""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Any

ENV_PREFIX = "FLOWBEAM_"
# FLOWBEAM_ variables that are not options: the test suite's CI switch (tests/local_servers.py).
OTHER_ENV_VARIABLES = {"FLOWBEAM_REQUIRE_SERVERS"}
_option_variables: set[str] = set()  # every FLOWBEAM_<NAME> an option has looked up


def env_default(name: str, default: object = None) -> object:
    """The default for option ``name``: ``$FLOWBEAM_<NAME>`` when set, else ``default``."""
    variable = f"{ENV_PREFIX}{name.upper()}"
    _option_variables.add(variable)
    return os.environ.get(variable, default)


SWITCH_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_switch(value: str) -> bool:
    """A switch's value: true/false, 1/0 or yes/no, in any case (argparse's ``type``)."""
    try:
        return SWITCH_VALUES[value.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected true or false (also 1/0, yes/no), got {value!r}") from None


def add_switch(parser: Any, name: str, help_text: str) -> None:
    """Add the on/off option ``--name``: bare ``--name`` turns it on, and so does
    ``--name=true``; ``--name=false`` turns it off (values as ``parse_switch`` reads them).

    Why a value form: a Dataflow flex template passes every parameter as ``--name=value``, so
    a ``store_true`` flag could not be a template parameter. ``$FLOWBEAM_<NAME>`` is its
    default, read the same way (argparse converts a string default with ``type``, and a bad
    one is reported naming the variable).
    """
    parser.add_argument(f"--{name}", nargs="?", const=True, type=parse_switch,
                        default=env_default(name, False), metavar="true|false", help=help_text)


def unknown_environment() -> list[str]:
    """A warning for each ``FLOWBEAM_*`` variable no option reads, naming the closest one.

    Call it after every option has been looked up: a misspelled ``FLOWBEAM_IDLE_TIMOUT`` would
    otherwise be ignored without a word and the run would use the default.
    """
    known = sorted(_option_variables | OTHER_ENV_VARIABLES)
    warnings = []
    for variable in sorted(v for v in os.environ if v.startswith(ENV_PREFIX)):
        if variable in known:
            continue
        close = difflib.get_close_matches(variable, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"{variable} is no option of this command{hint}; it is ignored")
    return warnings
