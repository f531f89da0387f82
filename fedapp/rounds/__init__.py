"""Rounds that fail loudly: deadlines, live progress and an outcome for every sampled client.

:mod:`~fedapp.rounds.outcomes` classifies what became of each client;
:mod:`~fedapp.rounds.workflow` is the fit step that applies the round deadline,
waits (boundedly) for nodes and stops a run that can no longer succeed;
:mod:`~fedapp.rounds.progress` shows it all as it happens.
"""

from fedapp.rounds.outcomes import ClientFailure, Outcome, RoundTally, RunFailed, classify_error, one_line

__all__ = ["ClientFailure", "Outcome", "RoundTally", "RunFailed", "classify_error", "one_line"]
