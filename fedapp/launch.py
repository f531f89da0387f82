"""``fedapp-launch`` and ``python -m fedapp.launch``, kept as a module of its own.

The console script (``pyproject.toml``), the docs, the tests and
``simulations/run.py`` name ``fedapp.launch``; the code lives in
:mod:`fedapp.deploy`, one module per job, and this name stays a stable front door.
"""

from __future__ import annotations

import sys

from fedapp.deploy import (
    CONNECTION,
    MARKER_ENV,
    STARTUP_TIMEOUT_S,
    STATUS_COMPLETED,
    LaunchError,
    generate_certificates,
    generate_node_keys,
    load_experiment,
    main,
    project_root,
    run_in_processes,
    stage_app,
    submit_run,
)

__all__ = [
    "CONNECTION",
    "LaunchError",
    "MARKER_ENV",
    "STARTUP_TIMEOUT_S",
    "STATUS_COMPLETED",
    "generate_certificates",
    "generate_node_keys",
    "load_experiment",
    "main",
    "project_root",
    "run_in_processes",
    "stage_app",
    "submit_run",
]

if __name__ == "__main__":
    sys.exit(main())
