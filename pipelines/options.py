"""Environment-variable defaults for pipeline options.

Every flowbeam option ``--name`` can also come from ``FLOWBEAM_<NAME>`` so a container (a flex
template, a Kubernetes job) can be configured without rewriting its command line. The command
line wins over the environment; argparse converts the string with the option's ``type``.
"""

from __future__ import annotations

import os


def env_default(name: str, default: object = None) -> object:
    """The default for option ``name``: ``$FLOWBEAM_<NAME>`` when set, else ``default``."""
    return os.environ.get(f"FLOWBEAM_{name.upper()}", default)
