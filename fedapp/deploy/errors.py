"""The one error type of a deployment, in a leaf module every other part can import.

Staging, process management and the ``flwr`` CLI calls all fail the same way for a
caller (the run did not happen or did not finish), so they share one exception and
the CLI catches just that (plus ``ConfigError`` and ``OSError``).
"""

from __future__ import annotations


class LaunchError(RuntimeError):
    """The processes could not be started, the run failed, or it ran out of time."""
