"""Flower ServerApp (legacy strategy API): FedAvg-family rounds with central evaluation.

Runs Flower's ``DefaultWorkflow`` on a :class:`LegacyContext`, so the round loop
is Flower's own, and writes metrics, a plot and a summary into
``runtime.output_dir`` when the rounds are over. The same app runs in the
simulation engine and on a real SuperLink.

With ``secagg.method=secaggplus`` the fit half of every round is Flower's
``SecAggPlusWorkflow`` (the clients run ``secaggplus_mod``): it calls the
strategy's ``configure_fit`` as usual, runs the four SecAgg+ stages, and then
calls ``aggregate_fit`` with one result per surviving client whose parameters
are all the same unmasked weighted mean (``num_examples`` and the fit metrics
stay each client's own, in the clear). So FedAvg, the wrappers and the
recording work unchanged on the mean; rules that need the individual updates
are refused at start-up (:func:`fedapp.strategies.check_strategy_config`).
"""

from __future__ import annotations

import json
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.common import Context, NDArrays, Scalar, log
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedapp.attacks import malicious_clients
from fedapp.components import check_experiment, new_model, test_data
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.metrics import RunRecorder
from fedapp.release import release_surface
from fedapp.report import format_table, write_report
from fedapp.rounds.outcomes import RunFailed, one_line
from fedapp.rounds.progress import RoundProgress
from fedapp.control.applier import RunControl
from fedapp.rounds.workflow import FitRound
from fedapp.runconfig import experiment_from_run_config
from fedapp.store.db import StoreError
from fedapp.store.durable import DurableRun
from fedapp.store.workflow import DurableWorkflow
from fedapp.strategies import EvaluateFn, build_strategy
from fedapp.tracking import TrackedProgress
from fedapp.traffic import TrafficMeter
from fedapp.training import evaluate, get_weights, set_weights


def centralized_evaluator(cfg: ExperimentConfig) -> EvaluateFn:
    """Evaluate the global model on the held-out test set every ``runtime.eval_every`` rounds and the last."""
    model = new_model(cfg)
    test_set = test_data(cfg)
    every = cfg.runtime.eval_every

    def evaluate_fn(
        server_round: int, weights: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        if server_round % every and server_round != cfg.num_rounds:
            return None
        set_weights(model, weights)
        loss, acc = evaluate(model, test_set, cfg.runtime.eval_batch_size, cfg.runtime.device)
        return loss, {"test_accuracy": acc}

    return evaluate_fn


def fit_config(server_round: int) -> dict[str, Scalar]:
    """Per-round instructions sent to clients (the round seeds their shuffling)."""
    return {"server_round": server_round}


def secaggplus_workflow(cfg: ExperimentConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with ``cfg.secagg``'s parameters.

    Our config holds the share count and threshold as floats (<= 1: fractions,
    > 1: counts); Flower tells the two apart by type, so counts become ints here.
    """
    sa = cfg.secagg
    # Where the release surface sends a constant count instead of each client's own (fedapp.release), every
    # client weighs the same: Flower's weight ratio num_examples / max_weight must then be exactly 1, or the
    # update would be shrunk before quantisation.
    surface_count = release_surface(cfg).num_examples

    def fraction_or_count(value: float) -> int | float:
        return float(value) if value <= 1 else int(value)

    return SecAggPlusWorkflow(
        num_shares=fraction_or_count(sa.num_shares),
        reconstruction_threshold=fraction_or_count(sa.reconstruction_threshold),
        max_weight=float(sa.max_num_examples if surface_count is None else surface_count),
        clipping_range=sa.clipping_range,
        quantization_range=sa.quantization_range,
        timeout=sa.timeout_s or None,
    )


def run_experiment(grid: Grid, context: Context, cfg: ExperimentConfig) -> dict:
    """Run all rounds of ``cfg`` on ``grid`` (from its checkpoint with ``store.resume``); write outputs; return the summary."""
    try:  # names, sizes, data and key files: a mistake is one line, before any round
        check_experiment(cfg)  # includes the tracking extra
    except ConfigError as err:
        log(ERROR, "Run config refused: %s", err)
        raise RunFailed(f"run config refused: {err}") from None
    durable: DurableRun | None = None
    if cfg.store.enabled:
        try:
            durable, recorder = DurableRun.open(cfg)
        except StoreError as err:
            if not cfg.store.best_effort or cfg.store.resume:
                raise
            log(WARNING, "store.best_effort: %s; this run goes on WITHOUT a record, checkpoints or audit log", err)
    if durable is None:
        recorder = RunRecorder(cfg.runtime.output_dir)
    out = Path(cfg.runtime.output_dir)
    resumed = durable is not None and durable.start_round > 0
    if cfg.tracking.tensorboard:  # the same round ends, also as TensorBoard scalars (fedapp.tracking)
        progress = TrackedProgress(out, cfg.num_rounds, recorder=recorder, resume=resumed)
    else:
        progress = RoundProgress(out, cfg.num_rounds, resume=resumed)
    try:
        rows = _train(grid, context, cfg, recorder, durable, progress)
    except BaseException as err:
        line = str(err).splitlines()[0][:500] if isinstance(err, RunFailed) else one_line(f"{type(err).__name__}: {err}")
        if isinstance(err, (KeyboardInterrupt, SystemExit)):  # stopped from outside: resumable, not failed
            if durable is not None:
                durable.finish("interrupted", error=f"interrupted ({type(err).__name__})")
            progress.end_run("interrupted")
            raise
        if durable is not None:
            durable.finish("failed", error=line)
        recorder.event("run_failed", 0, line)
        progress.end_run("failed", f"run failed: {line}")
        log(ERROR, "Run failed: %s", line)
        raise
    extra: dict[str, object] = {}
    if durable is not None and durable.stopping:
        durable.stop()
    elif durable is not None:
        durable.finish("completed")
        extra = {"run_id": durable.run.run_id, "status": durable.status, "attempt": durable.attempt,
                 "output_dir": str(out), **({"error": durable.error} if durable.error else {})}
    summary = write_report(rows, out, title=cfg.name, extra=extra)
    progress.end_run(str(extra.get("status", "completed")), f"run {extra.get('status', 'completed')}; outputs in {out}")
    log(INFO, "Experiment %s finished; outputs in %s\n%s", cfg.name, out, format_table(rows))
    if extra.get("status") == "failed":  # e.g. no round aggregated an update: never "completed"
        raise RunFailed(f"run {extra.get('run_id')}: {extra.get('error')}")
    return summary


def _train(
    grid: Grid, context: Context, cfg: ExperimentConfig, recorder: RunRecorder, durable: DurableRun | None,
    progress: RoundProgress,
) -> list[dict]:
    """Build the strategy and run the rounds; the round rows."""
    out = Path(cfg.runtime.output_dir)
    (out / "experiment.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    attackers = malicious_clients(cfg.attack, cfg.partition.num_clients)
    if attackers and (durable is None or durable.start_round == 0):  # evaluation only; no server decision reads it
        recorder.event(
            "attack_ground_truth", 0, f"simulated {cfg.attack.name} attackers (evaluation only)",
            attack=cfg.attack.name, malicious=[str(pid) for pid in attackers],
        )
    fit_round = FitRound(
        cfg, recorder, progress, inner=secaggplus_workflow(cfg) if cfg.secagg.method == "secaggplus" else None
    )
    strategy = build_strategy(
        cfg,
        initial_parameters=get_weights(new_model(cfg)),
        evaluate_fn=centralized_evaluator(cfg),
        recorder=recorder,
        on_fit_config_fn=fit_config,
        rounds=fit_round,
    )
    if durable is not None:  # operators' actions from the API (fedapp serve), applied at round boundaries
        strategy = durable.control = RunControl(strategy, cfg, durable.store, durable.run.run_id, recorder)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)
    if durable is not None and durable.control is not None:
        durable.control.client_manager = legacy.client_manager
    if cfg.secagg.method != "none" and (durable is None or durable.start_round == 0):
        recorder.event("secure_aggregation", 0, f"fit rounds use {cfg.secagg.method}", method=cfg.secagg.method)
    workflow = DefaultWorkflow(fit_workflow=fit_round) if durable is None else DurableWorkflow(durable, fit_workflow=fit_round)
    try:
        workflow(TrafficMeter(grid, recorder), legacy)
    finally:
        progress.close()
    return recorder.table()


def make_server_app(cfg: ExperimentConfig | None = None) -> ServerApp:
    """A ServerApp for ``cfg`` or, when ``None``, for the run's ``run_config``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None:
            experiment = cfg
        else:
            try:  # a user's mistake in the run config: one line, before any round (flwr ls shows it)
                experiment = experiment_from_run_config(context.run_config)
            except ConfigError as err:
                log(ERROR, "Run config refused: %s", err)
                raise RunFailed(f"run config refused: {err}") from None
        run_experiment(grid, context, experiment)

    return app


app = make_server_app()
