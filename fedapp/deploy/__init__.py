"""Run an experiment as real Flower processes (``runtime.mode=processes``).

The simulation engine (:mod:`fedapp.simulation`) runs every client inside one Ray
cluster; this package runs the *deployment* path instead: one ``flower-superlink``,
``partition.num_clients`` ``flower-supernode`` processes and ``flwr run``, exactly the
commands a multi-machine setup uses (see ``docs/deployment.md``), only on loopback.
It is the honest check that the apps work when every message starts a new ClientApp
process and all state crosses a network boundary.

One job a module, imports flowing downwards (import from ``fedapp.deploy``;
:mod:`fedapp.launch` is only the console script's entry point):

* :mod:`~fedapp.deploy.cli` -- ``fedapp-launch``: experiment file + overrides;
* :mod:`~fedapp.deploy.runner` -- :func:`run_in_processes` (loopback federation)
  and :func:`submit_run` (an existing SuperLink);
* :mod:`~fedapp.deploy.flwr_commands` -- the ``flwr`` CLI calls: connection,
  ``supernode register``, ``run``, ``ls`` (final status), ``stop``;
* :mod:`~fedapp.deploy.processes` -- start, health-wait, watch and stop processes,
  including the detached ones Flower starts behind our back;
* :mod:`~fedapp.deploy.staging` -- the app copy that ``flwr run`` packages;
* :mod:`~fedapp.deploy.credentials` -- TLS certificates and SuperNode key pairs;
* :mod:`~fedapp.deploy.errors` -- :class:`LaunchError`.
"""

from fedapp.deploy.cli import load_experiment, main
from fedapp.deploy.credentials import generate_certificates, generate_node_keys
from fedapp.deploy.errors import LaunchError
from fedapp.deploy.flwr_commands import CONNECTION, STATUS_COMPLETED
from fedapp.deploy.processes import MARKER_ENV, STARTUP_TIMEOUT_S
from fedapp.deploy.runner import run_in_processes, submit_run
from fedapp.deploy.staging import project_root, stage_app

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
