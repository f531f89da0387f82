"""Issue-11 figures: runs that survive faults, measured side by side with the fault-free run.

    FEDAPP_DATA_ROOT=../shared/data python simulations/bench_faults.py \
        [--scenarios crash stragglers nodes fuzz] [--merge] [--quick]

* ``crash``: full MNIST, 10 clients, 10 rounds, Flower's simulation engine; the same
  seed without faults and with each client crashing (after training, before its reply)
  with probability 0.3 per round. Figure: the run completes, final accuracy within
  1 pp of the fault-free run, every crash counted (events == injected) with its reason.
* ``stragglers``: the same run with 3 of 10 clients 10x slower and a round deadline of
  twice the fault-free run's median fit phase (rounds 2+; round 1 also starts Ray's actors,
  so a cold start can lose honest replies to the deadline too: counted per round). Figure: every fit phase bounded by the
  deadline (+1 s of bookkeeping); accuracy after 10 rounds against the fault-free run.
* ``nodes``: real processes (SuperLink + 5 SuperNodes, DP-SGD with each node's ledger
  in ``privacy.client.ledger_dir``); partition 1's SuperNode is killed when round 2
  starts and restarted when round 5 starts. Figure: the run completes; no round loses
  more than one deadline against the median unaffected round; the restarted node's
  epsilon continues from its ledger (its n-th trained round's epsilon equals client
  0's n-th, and is above what it had spent before the kill).
* ``fuzz``: every malformation (NaN/Inf, shape, count, dtype, absurd norm) x 200 seeds
  against the server's full strategy stack (validation, FedAvg, recording) with five
  honest updates each. Figure: 100 % refused with a reason, 0 server exceptions, and
  the aggregate equals FedAvg over the honest updates.

Results: ``simulations/results/faults.json`` (+ ``faults.png``), ending with a
``verdict`` object computed from the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "simulations" / "results"
RESULTS_NAME = "faults.json"

BASE = ["+experiment=fedavg_mnist_iid", "num_rounds=10", "seed=0", "runtime.num_cpus_per_client=0.5",
        "strategy.min_fit_clients=2", "strategy.min_available_clients=10"]
QUICK = ["+experiment=smoke", "num_rounds=3", "partition.num_clients=5", "dataset.synthetic_train_size=1000",
         "runtime.num_cpus_per_client=0.5", "strategy.min_fit_clients=2", "strategy.min_available_clients=5"]
STRAGGLERS = "2,5,8"  # 3 of 10 clients


def fedapp_run(overrides: list[str], out: Path, log: Path, timeout: float = 3600) -> dict[str, Any]:
    """One ``fedapp run`` (Hydra overrides) in its own process; what it wrote, its exit code and wall time."""
    started = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.run([sys.executable, "-m", "fedapp.cli", "run", *overrides, f"runtime.output_dir={out}",
                               f"hydra.run.dir={out}", f"name={out.name}"],  # fmt: skip
                              cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
    wall = time.perf_counter() - started
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines() if x.strip()] if (out / name).exists() else []  # noqa: E731
    rows = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else []
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return {"exit_code": code, "wall_s": wall, "rows": rows, "summary": summary, "events": read("events.jsonl"),
            "clients": read("clients.jsonl"), "log": str(log)}


def accuracy(run: dict[str, Any]) -> float | None:
    accs = [r["test_accuracy"] for r in run["rows"] if r.get("test_accuracy") is not None]
    return accs[-1] if accs else None


def per_round(run: dict[str, Any], key: str) -> dict[int, Any]:
    return {r["round"]: r.get(key) for r in run["rows"] if r["round"] > 0}


# ---- crash + stragglers (simulation) ----------------------------------------------------------------
def simulation_scenarios(work: Path, names: list[str], quick: bool) -> dict[str, Any]:
    from fedapp.config import FaultsConfig
    from fedapp.faults import fault_for

    base = QUICK if quick else BASE
    num_clients, num_rounds = (5, 3) if quick else (10, 10)
    out: dict[str, Any] = {}
    baseline = fedapp_run(base, work / "baseline", work / "baseline.log")
    out["baseline"] = summarize_run(baseline)
    if "crash" in names:
        crash = fedapp_run([*base, "faults.kind=crash", "faults.fraction=0.3", "faults.seed=11"], work / "crash",
                           work / "crash.log")  # fmt: skip
        plan = FaultsConfig(kind="crash", fraction=0.3, seed=11)
        injected = {(r, str(c)) for r in range(1, num_rounds + 1) for c in range(num_clients) if fault_for(plan, c, r)}
        counted = {(e["round"], str(e["client"])) for e in crash["events"] if e["kind"] == "client_failure"}
        reasons = [e["reason"] for e in crash["events"] if e["kind"] == "client_failure"]
        out["crash"] = {
            **summarize_run(crash),
            "injected_crashes": len(injected),
            "counted_crashes": len(counted),
            "counted_equals_injected": counted == injected,
            "every_reason_names_the_crash": all(r.startswith("InjectedFault: injected crash on client") for r in reasons),
            "sample_reason": reasons[0] if reasons else None,
            "accuracy_difference_pp": None if accuracy(crash) is None or accuracy(baseline) is None
            else round(100 * (accuracy(baseline) - accuracy(crash)), 3),
        }
    if "stragglers" in names:
        fit_times = [t for t in per_round(baseline, "fit_time_s").values() if t is not None]
        warm = fit_times[1:] or fit_times  # round 1 also starts the Ray actors
        deadline = round(2.0 * statistics.median(warm), 1)
        slow = fedapp_run([*base, "faults.kind=straggler", f"faults.clients='{STRAGGLERS if not quick else '1'}'",
                           "faults.slowdown=10", f"strategy.round_timeout_s={deadline}"],
                          work / "stragglers", work / "stragglers.log")  # fmt: skip
        fits = [t for t in per_round(slow, "fit_time_s").values() if t is not None]
        out["stragglers"] = {
            **summarize_run(slow),
            "deadline_s": deadline,
            "baseline_fit_time_s": fit_times,
            "fit_time_s": fits,
            "max_fit_time_over_deadline_s": round(max(fits) - deadline, 3) if fits else None,
            "timed_out_per_round": list(per_round(slow, "fit_timed_out").values()),
            "mean_round_time_ratio_vs_baseline": ratio(slow, baseline),
            "accuracy_difference_pp": None if accuracy(slow) is None or accuracy(baseline) is None
            else round(100 * (accuracy(baseline) - accuracy(slow)), 3),
        }
    return out


def time_lost(times: dict[int, float], rows: dict[int, dict[str, Any]]) -> tuple[float | None, dict[int, float]]:
    """Each round's time minus the median time of the rounds that lost no client (no node lost or timed out)."""
    clean = [t for r, t in times.items() if t and not (rows.get(r, {}).get("fit_node_lost") or rows.get(r, {}).get("fit_timed_out"))]
    median = statistics.median(clean) if clean else None
    return median, {r: round(t - median, 1) for r, t in times.items() if t and median is not None}


def ratio(run: dict[str, Any], baseline: dict[str, Any]) -> float | None:
    a = [t for t in per_round(run, "round_time_s").values() if t]
    b = [t for t in per_round(baseline, "round_time_s").values() if t]
    return round(statistics.mean(a) / statistics.mean(b), 3) if a and b else None


def summarize_run(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "exit_code": run["exit_code"],
        "status": run["summary"].get("status"),
        "final_accuracy": accuracy(run),
        "accuracy_per_round": per_round(run, "test_accuracy"),
        "round_time_s": per_round(run, "round_time_s"),
        "failures": run["summary"].get("failures"),
        "failed_rounds": run["summary"].get("failed_rounds"),
        "wall_s": round(run["wall_s"], 1),
        "log": run["log"],
    }


# ---- SuperNode killed and restarted (processes) ---------------------------------------------------------
def nodes_scenario(work: Path, quick: bool) -> dict[str, Any]:
    deadline = 90.0
    ledgers = work / "ledgers"
    overrides = [
        "+experiment=dp_mnist", "runtime=processes", "num_rounds=6", "partition.num_clients=5",
        "strategy.min_fit_clients=3", "strategy.min_available_clients=3", f"strategy.round_timeout_s={deadline}",
        "strategy.node_wait_s=180", "faults.node_schedule='kill 1 @2, restart 1 @5'",
        f"privacy.client.ledger_dir={ledgers}", "dataset.max_train_samples=15000", "runtime.timeout_s=3000",
    ]
    if quick:
        overrides += ["dataset.name=synthetic_mnist", "num_rounds=6"]
    run = fedapp_run(overrides, work / "nodes", work / "nodes.log", timeout=3600)
    times = per_round(run, "round_time_s")
    outcomes = {r["round"]: r for r in run["rows"] if r["round"] > 0}
    median, excess = time_lost(times, outcomes)
    eps: dict[str, list[tuple[int, float]]] = {}
    for line in run["clients"]:
        if line.get("epsilon") is not None and not line.get("declined"):
            eps.setdefault(str(line["client"]), []).append((line["round"], float(line["epsilon"])))
    one, zero = sorted(eps.get("1", [])), sorted(eps.get("0", []))
    before = [e for r, e in one if r < 2]
    after = [(i, r, e) for i, (r, e) in enumerate(one) if r >= 5]
    continues = bool(before and after and after[0][2] > before[-1])
    matches = all(i < len(zero) and abs(e - zero[i][1]) < 1e-9 for i, _, e in after) if after else False
    return {
        **summarize_run(run),
        "deadline_s": deadline,
        "round_time_s": times,
        "median_unaffected_round_s": median,
        "excess_over_median_s": excess,
        "max_excess_s": affected_excess(excess, outcomes),
        "per_round_outcomes": {r["round"]: {k: r.get(k) for k in ("fit_sampled", "fit_trained", "fit_node_lost",
                                                                  "fit_timed_out", "fit_failed")}
                               for r in run["rows"] if r["round"] > 0},  # fmt: skip
        "client1_epsilon": one,
        "client0_epsilon": zero,
        "epsilon_continues_after_restart": continues,
        "epsilon_equals_uninterrupted_client_at_same_trained_rounds": matches,
        "node_events": [e for e in run["events"] if e["kind"] in ("client_failure", "round_failed")],
    }


# ---- malformed-update fuzz (in-process, the server's strategy stack) --------------------------------------
def broken_parameters(kind: str, reference: list[np.ndarray], rng: np.random.Generator):  # -> Parameters
    """A malformed update as it arrives: ``malform``'s arrays, or (``bytes``) serialised arrays that do not decode."""
    from flwr.common import ndarrays_to_parameters

    from fedapp.faults import malform

    honest = [w + np.float32(0.01) for w in reference]
    if kind != "bytes":
        return ndarrays_to_parameters(malform(kind, reference, honest, rng))
    params = ndarrays_to_parameters(honest)
    i = int(rng.integers(len(params.tensors)))
    blob = bytearray(params.tensors[i])
    variant = int(rng.integers(3))
    if variant == 0:  # truncated
        blob = blob[: int(rng.integers(0, len(blob)))]
    elif variant == 1:  # random bytes, .npy magic kept
        blob[8:] = rng.integers(0, 256, len(blob) - 8, dtype=np.uint8).tobytes()
    else:  # a header that claims a huge shape
        blob = bytearray(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (4000000000,), }"
                         + b" " * 40 + b"\n" + bytes(16))  # fmt: skip
    params.tensors[i] = bytes(blob)
    return params



def fuzz_scenario(seeds: int) -> dict[str, Any]:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.client_manager import SimpleClientManager

    from fedapp.components import new_model
    from fedapp.config import ExperimentConfig
    from fedapp.faults import MALFORMATIONS
    from fedapp.metrics import RunRecorder
    from fedapp.strategies import build_strategy
    from fedapp.training import get_weights

    class Proxy(ClientProxy):  # only its identity is used by the server-side strategy
        def get_properties(self, *a, **k): raise NotImplementedError  # noqa: E704, ANN001, ANN002, ANN003, ANN201
        def get_parameters(self, *a, **k): raise NotImplementedError  # noqa: E704, ANN001, ANN002, ANN003, ANN201
        def fit(self, *a, **k): raise NotImplementedError  # noqa: E704, ANN001, ANN002, ANN003, ANN201
        def evaluate(self, *a, **k): raise NotImplementedError  # noqa: E704, ANN001, ANN002, ANN003, ANN201
        def reconnect(self, *a, **k): raise NotImplementedError  # noqa: E704, ANN001, ANN002, ANN003, ANN201

    cfg = ExperimentConfig.from_dict({"dataset": {"name": "synthetic-mnist"}, "model": {"name": "cnn_mnist_small"},
                                      "partition": {"num_clients": 6}})  # fmt: skip
    reference = get_weights(new_model(cfg))
    tmp = Path(tempfile.mkdtemp(prefix="fedapp-fuzz-"))
    per_kind: dict[str, dict[str, int]] = {}
    crashes: list[str] = []
    honest_ok = 0
    total = 0
    for kind in (*MALFORMATIONS, "bytes"):
        stats = {"cases": 0, "refused_with_reason": 0, "server_exceptions": 0, "honest_aggregate_exact": 0}
        for seed in range(seeds):
            rng = np.random.default_rng([seed, (*MALFORMATIONS, "bytes").index(kind)])
            recorder = RunRecorder(tmp / f"{kind}-{seed}")
            strategy = build_strategy(cfg, initial_parameters=reference, evaluate_fn=None, recorder=recorder)
            manager = SimpleClientManager()
            proxies = [Proxy(str(i)) for i in range(6)]
            for p in proxies:
                manager.register(p)
            strategy.configure_fit(1, ndarrays_to_parameters(reference), manager)
            honest = [[w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in reference] for _ in range(5)]
            sizes = [int(rng.integers(50, 500)) for _ in range(6)]
            results = [
                (proxies[i], FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), sizes[i], {"partition_id": i}))
                for i, u in enumerate(honest)
            ]
            results.append((proxies[5], FitRes(Status(Code.OK, ""), broken_parameters(kind, reference, rng), sizes[5],
                                               {"partition_id": 5})))  # fmt: skip
            order = rng.permutation(6)
            stats["cases"] += 1
            total += 1
            try:
                params, _ = strategy.aggregate_fit(1, [results[i] for i in order], [])
            except Exception as err:  # noqa: BLE001 - the figure counts them
                stats["server_exceptions"] += 1
                crashes.append(f"{kind}/{seed}: {type(err).__name__}: {err}")
                continue
            refusals = [e for e in recorder.drain() if e.get("line") == "event" and e["kind"] == "update_rejected"]
            if [e["client"] for e in refusals] == ["5"] and refusals[0]["reason"]:
                stats["refused_with_reason"] += 1
            expected = [sum(s * u[j].astype(np.float64) for s, u in zip(sizes[:5], honest)) / sum(sizes[:5])
                        for j in range(len(reference))]  # fmt: skip
            got = parameters_to_ndarrays(params) if params is not None else None
            if got is not None and all(np.allclose(g, e, rtol=1e-5, atol=1e-6) for g, e in zip(got, expected)):
                stats["honest_aggregate_exact"] += 1
                honest_ok += 1
        per_kind[kind] = stats
    refused = sum(s["refused_with_reason"] for s in per_kind.values())
    return {"seeds": seeds, "cases": total, "per_malformation": per_kind, "refused_with_reason": refused,
            "refused_fraction": refused / total, "server_exceptions": len(crashes), "exceptions": crashes[:10],
            "honest_aggregated_fraction": honest_ok / total}


# ---- verdict, plot ---------------------------------------------------------------------------------------
def verdict(results: dict[str, Any]) -> dict[str, Any]:
    v: dict[str, Any] = {}
    crash = results.get("crash")
    if crash:
        v["30% crash: completes"] = {"value": crash["status"], "target": "completed", "met": crash["status"] == "completed"}
        diff = crash["accuracy_difference_pp"]
        v["30% crash: accuracy within 1 pp of fault-free"] = {
            "value": diff, "target": "<= 1.0 pp", "met": diff is not None and abs(diff) <= 1.0}
        v["30% crash: every crash counted with its reason"] = {
            "value": f"{crash['counted_crashes']} counted / {crash['injected_crashes']} injected",
            "target": "equal, reasons name the crash",
            "met": crash["counted_equals_injected"] and crash["every_reason_names_the_crash"] and crash["injected_crashes"] > 0}
    nodes = results.get("nodes")
    if nodes:
        v["node killed r2, restarted r5: completes"] = {"value": nodes["status"], "target": "completed",
                                                        "met": nodes["status"] == "completed"}  # fmt: skip
        v["node killed: time lost per round <= one deadline"] = {
            "value": nodes["max_excess_s"], "target": f"<= {nodes['deadline_s']} s",
            "met": nodes["max_excess_s"] is not None and nodes["max_excess_s"] <= nodes["deadline_s"]}
        v["restarted node's epsilon continues from its ledger"] = {
            "value": {"continues": nodes["epsilon_continues_after_restart"],
                      "equals_uninterrupted_client": nodes["epsilon_equals_uninterrupted_client_at_same_trained_rounds"]},
            "target": "both true",
            "met": nodes["epsilon_continues_after_restart"] and nodes["epsilon_equals_uninterrupted_client_at_same_trained_rounds"]}
    fuzz = results.get("fuzz")
    if fuzz:
        v["fuzz: refused with a reason"] = {"value": fuzz["refused_fraction"], "target": 1.0,
                                            "met": fuzz["refused_fraction"] == 1.0}  # fmt: skip
        v["fuzz: server crashes"] = {"value": fuzz["server_exceptions"], "target": 0, "met": fuzz["server_exceptions"] == 0}
        v["fuzz: honest updates still aggregated"] = {"value": fuzz["honest_aggregated_fraction"], "target": 1.0,
                                                      "met": fuzz["honest_aggregated_fraction"] == 1.0}  # fmt: skip
    slow = results.get("stragglers")
    if slow:
        over = slow["max_fit_time_over_deadline_s"]
        v["stragglers: round bounded by the deadline"] = {
            "value": over, "target": "<= 1.0 s over the deadline", "met": over is not None and over <= 1.0}
        v["stragglers: accuracy after 10 rounds vs none (reported)"] = {
            "value": {"with": slow["final_accuracy"], "without": results["baseline"]["final_accuracy"],
                      "difference_pp": slow["accuracy_difference_pp"]},
            "target": "reported", "met": slow["final_accuracy"] is not None}
    return v


def refigure(results: dict[str, Any]) -> None:
    """Derived node figures from the stored per-round times and outcomes (after a change of formula)."""
    nodes = results.get("nodes")
    if nodes:
        times = {int(r): t for r, t in nodes["round_time_s"].items()}
        rows = {int(r): v for r, v in nodes["per_round_outcomes"].items()}
        median, excess = time_lost(times, rows)
        nodes["median_unaffected_round_s"] = median
        nodes["excess_over_median_s"] = excess
        nodes["max_excess_s"] = affected_excess(excess, rows)


def affected_excess(excess: dict[int, float], rows: dict[int, dict[str, Any]]) -> float | None:
    """The largest time lost by a round that lost a client (node lost or timed out)."""
    hit = [e for r, e in excess.items() if rows.get(r, {}).get("fit_node_lost") or rows.get(r, {}).get("fit_timed_out")]
    return max(hit) if hit else None


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("baseline", "-"), ("crash", "--"), ("stragglers", ":")):
        run = results.get(name)
        if not run:
            continue
        acc = {int(k): v for k, v in run["accuracy_per_round"].items() if v is not None}
        times = {int(k): v for k, v in run["round_time_s"].items() if v is not None}
        label = {"baseline": "no faults", "crash": "30 % crash per round", "stragglers": "3 of 10 clients 10x slower"}[name]
        ax_acc.plot(list(acc), [100 * a for a in acc.values()], style, marker="o", label=label)
        ax_time.plot(list(times), list(times.values()), style, marker="o", label=label)
    if results.get("stragglers"):
        ax_time.axhline(results["stragglers"]["deadline_s"], color="red", lw=1, label="round deadline (fit phase)")
    ax_acc.set(xlabel="round", ylabel="test accuracy (%)", title="Full MNIST, 10 clients, FedAvg")
    ax_time.set(xlabel="round", ylabel="round time (s)", title="Round time")
    for ax in (ax_acc, ax_time):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["fuzz", "crash", "stragglers", "nodes"],
                        choices=["fuzz", "crash", "stragglers", "nodes"])  # fmt: skip
    parser.add_argument("--merge", action="store_true", help="keep the other scenarios of an earlier results file")
    parser.add_argument("--quick", action="store_true", help="synthetic data, few rounds: checks the benchmark itself")
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--refigure", action="store_true",
                        help="recompute derived figures and the verdict from the measurements already in the results file")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULTS_NAME
    results: dict[str, Any] = {}
    if args.merge and path.exists():
        results = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("verdict", "machine")}
    if args.refigure:
        results = {k: v for k, v in json.loads(path.read_text()).items() if k != "verdict"}
        refigure(results)
        results["verdict"] = verdict(results)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(json.dumps(results["verdict"], indent=2))
        return
    work = Path(tempfile.mkdtemp(prefix="fedapp-bench-faults-"))
    print(f"work folder (logs, outputs): {work}", flush=True)
    if "fuzz" in args.scenarios:
        results["fuzz"] = fuzz_scenario(args.seeds)
        print("fuzz:", {k: results["fuzz"][k] for k in ("refused_fraction", "server_exceptions")}, flush=True)
    sims = [s for s in ("crash", "stragglers") if s in args.scenarios]
    if sims:
        results.update(simulation_scenarios(work, sims, args.quick))
    if "nodes" in args.scenarios:
        results["nodes"] = nodes_scenario(work, args.quick)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "quick": args.quick,
                          "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}  # fmt: skip
    results["verdict"] = verdict(results)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if any(k in results for k in ("baseline", "crash", "stragglers")):
        plot(results, args.out / "faults.png")
    print(json.dumps(results["verdict"], indent=2))


if __name__ == "__main__":
    main()
