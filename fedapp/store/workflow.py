"""Flower's default round loop, made durable: it can start after round k and it reports every round's end.

Flower's ``DefaultWorkflow`` always starts at round 1 and offers no hook at the
round boundary; this subclass keeps its fit / centralised-evaluation /
federated-evaluation steps (Flower's own functions, and SecAgg+'s fit workflow
when configured) and changes only the loop around them:

* a fresh run initialises and evaluates the model as Flower does (round 0);
* a resumed run puts the checkpoint's model in place instead and starts at
  round k+1, with the same round numbers (clients seed by round);
* right after aggregation, before the new model leaves the server,
  :meth:`DurableRun.released` logs the server accountants' spend;
* after every round :meth:`DurableRun.round_done` audits, checkpoints and
  commits it before the next one starts.
"""

from __future__ import annotations

import timeit
from logging import INFO
from typing import cast

import numpy as np
from flwr.common import log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Grid, LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_init_params_workflow,
)
from flwr.app import ConfigRecord

from fedapp.store.durable import DurableRun


class DurableWorkflow(DefaultWorkflow):
    """``DefaultWorkflow`` with resume and a durable round boundary."""

    def __init__(self, durable: DurableRun, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.durable = durable

    def __call__(self, grid: Grid, context: LegacyContext) -> None:  # type: ignore[override]
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
        registered.wait()
        try:
            self._rounds(grid, context)
        finally:
            stop.set()
            thread.join()

    def _rounds(self, grid: Grid, context: LegacyContext) -> None:
        durable = self.durable
        resumed = durable.restore(context.strategy)
        if resumed is None:
            log(INFO, "[INIT]")
            default_init_params_workflow(grid, context)
            durable.round_done(0, _model(context), context.strategy)
        else:
            log(INFO, "[RESUME] from the checkpoint of round %s", durable.start_round)
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                ndarrays_to_parameters(resumed), keep_input=True
            )
        started = timeit.default_timer()
        cfg = ConfigRecord()
        cfg[Key.START_TIME] = started
        context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        for current_round in range(durable.start_round + 1, context.config.num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s]", current_round)
            cfg[Key.CURRENT_ROUND] = current_round
            durable.round_started()
            self.fit_workflow(grid, context)
            durable.released(current_round)  # before the new model leaves the server
            default_centralized_evaluation_workflow(grid, context)
            self.evaluate_workflow(grid, context)
            durable.round_done(current_round, _model(context), context.strategy)
            if durable.stopping:
                log(INFO, "Stopped after round %s at the operator's request (checkpoint taken); "
                    "`fedapp resume` continues", current_round)
                break
        log(INFO, "Run finished %s round(s) in %.2fs", context.config.num_rounds - durable.start_round,
            timeit.default_timer() - cast(float, cfg[Key.START_TIME]))


def _model(context: LegacyContext) -> list[np.ndarray]:
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    return parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
