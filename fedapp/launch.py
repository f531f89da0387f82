"""``fedapp-launch`` and ``python -m fedapp.launch``: the command-line entry point only.

The console script in ``pyproject.toml`` and the Dockerfile name this module;
the code lives in :mod:`fedapp.deploy` (import from there), one module per job.
"""

from __future__ import annotations

import sys

from fedapp.deploy.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
