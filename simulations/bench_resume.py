"""Issue-10 figures: SIGKILL a run mid-round, resume it, compare with the run that was never interrupted.

    FEDAPP_DATA_ROOT=../shared/data python simulations/bench_resume.py [--modes simulation processes]
        [--scenarios fedavg dp_fedsgd_paillier] [--out DIR]

For each scenario and each runtime (Flower's simulation engine; real SuperLink +
SuperNode processes), three runs on full MNIST with 10 clients and the same seed:

1. ``straight``: never interrupted;
2. ``killed``: SIGKILL to *every* process of the run (driver, Ray workers or
   SuperLink, ServerApp, SuperNodes: all carry a tag in their environment) as
   soon as the clients' replies for round ``kill_round`` reach the server, i.e.
   after they trained and spent privacy for it, before the round is committed;
3. ``fedapp resume`` of the killed run, which continues from its last checkpoint.

Figures (``simulations/results/resume.json`` + ``resume.png``): final accuracy
difference, whether the final model is bit-for-bit equal (its SHA-256 in the
audit log), per-client epsilon (equal, or higher by exactly the re-trained
round(s), recomputed independently with dp-accounting), the audit chain verified
across the resume (``fedapp audit verify``); the store + audit overhead per
round (time spent at the round boundary over the round's time, and the same
run with ``store.enabled=false`` side by side); checkpoint write time and size;
the tamper matrix (``simulations/tamper.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "simulations" / "results"
sys.path.insert(0, str(ROOT / "simulations"))

from fedapp.metrics import read_jsonl  # noqa: E402
from fedapp.store.db import RunStore  # noqa: E402

TAG_ENV = "FEDAPP_BENCH_TAG"
RESULTS_NAME = "resume.json"
DELTA = 1e-5

SCENARIOS: dict[str, dict[str, Any]] = {
    "smoke": {  # seconds-long check of the benchmark itself (synthetic data); not a figure
        "overrides": ["+experiment=smoke", "num_rounds=4", "dataset.synthetic_train_size=600"],
        "kill_round": 3,
        "deterministic": True,
    },
    "fedavg": {
        "overrides": ["+experiment=fedavg_mnist_iid", "num_rounds=5", "strategy.min_fit_clients=10",
                      "strategy.min_available_clients=10"],
        "kill_round": 3,
        "deterministic": True,
    },
    "dp_fedsgd_paillier": {
        # epsilon_budget above the target: with the budget equal to the target (the default) the
        # interrupted round's spend makes every client decline the last round instead (measured too).
        "overrides": ["+experiment=dp_fedsgd_mnist", "num_rounds=12", "runtime.eval_every=4",
                      "privacy.client.target_epsilon=3.0", "privacy.client.epsilon_budget=4.0"],
        "kill_round": 7,
        "deterministic": False,
        "key_bits": 512,
    },
    # Real processes: each SuperNode starts a ClientApp process per message, ~2 minutes a round for 10 nodes
    # on 2 cores, so the processes-mode DP run is 3 rounds (the kill in round 2), not 12.
    "dp_fedsgd_paillier_short": {
        "overrides": ["+experiment=dp_fedsgd_mnist", "num_rounds=3", "runtime.eval_every=1",
                      "privacy.client.target_epsilon=3.0", "privacy.client.epsilon_budget=4.0"],
        "kill_round": 2,
        "deterministic": False,
        "key_bits": 512,
    },
}


def tagged_env(tag: str) -> dict[str, str]:
    env = dict(os.environ)
    env[TAG_ENV] = tag
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def processes_with_tag(tag: str) -> list[int]:
    """PIDs whose environment carries ``TAG_ENV=tag`` (this run's whole process tree, whatever its sessions)."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_all(tag: str) -> int:
    """SIGKILL every process of the run until none is left; how many were killed."""
    killed: set[int] = set()
    for _ in range(50):
        pids = processes_with_tag(tag)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return len(killed)


def fedapp(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedapp.cli", *args]


def run_overrides(scenario: dict[str, Any], name: str, out: Path, store_url: str, mode: str, extra: list[str]) -> list[str]:
    runtime = ["runtime=processes"] if mode == "processes" else []
    return [*scenario["overrides"], *runtime, f"name={name}", f"hydra.run.dir={out / name}", f"store.url={store_url}",
            f"store.run_id={name}", "seed=0", *extra]


def straight_run(args: list[str], log: Path, tag: str) -> float:
    started = time.perf_counter()
    with log.open("w") as fh:
        subprocess.run(fedapp("run", *args), cwd=ROOT, env=tagged_env(tag), stdout=fh, stderr=subprocess.STDOUT,
                       check=True, timeout=3600)
    kill_all(tag)  # nothing should be left; make sure
    return time.perf_counter() - started


def killed_run(args: list[str], run_dir: Path, kill_round: int, log: Path, tag: str) -> dict[str, Any]:
    """Start the run, SIGKILL all its processes once round ``kill_round``'s replies were recorded."""
    with log.open("w") as fh:
        proc = subprocess.Popen(fedapp("run", *args), cwd=ROOT, env=tagged_env(tag), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 3600
        reached = False
        while time.monotonic() < deadline and proc.poll() is None:
            if any(line.get("round") == kill_round for line in read_jsonl(run_dir / "clients.jsonl")):
                reached = True
                break
            time.sleep(0.02)
        killed = kill_all(tag)
        proc.wait()
    if not reached:
        raise RuntimeError(f"the run ended before round {kill_round}; see {log}")
    return {"kill_round": kill_round, "processes_killed": killed}


def resume_run(run_id: str, store_url: str, log: Path, tag: str) -> float:
    started = time.perf_counter()
    with log.open("w") as fh:
        subprocess.run(fedapp("resume", run_id, "--store", store_url), cwd=ROOT, env=tagged_env(tag), stdout=fh,
                       stderr=subprocess.STDOUT, check=True, timeout=3600)
    kill_all(tag)
    return time.perf_counter() - started


def final_epsilons(run_dir: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    for line in read_jsonl(run_dir / "clients.jsonl"):
        if line.get("epsilon") is not None:
            last[str(line["client"])] = float(line["epsilon"])
    return last


def rounds_trained(run_dir: Path) -> dict[str, int]:
    """Noisy steps each client took (DP-SGD steps reported per trained round, over every attempt)."""
    counts: dict[str, int] = {}
    for line in read_jsonl(run_dir / "clients.jsonl"):
        if not line.get("declined") and line.get("epsilon") is not None:
            counts[str(line["client"])] = counts.get(str(line["client"]), 0) + 1
    return counts


def independent_epsilon(sigma: float, q: float, steps: int) -> float:
    """dp-accounting's RDP accountant (Google), not Opacus: the check is independent of the ledger's code."""
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(DELTA))


def client_sigma_q(run_dir: Path) -> tuple[float, float] | None:
    """The clients' sigma (reported: public, a function of the config) and q (the config's sample rate)."""
    q = json.loads((run_dir / "experiment.json").read_text())["privacy"]["client"]["sample_rate"]
    for line in read_jsonl(run_dir / "clients.jsonl"):
        if line.get("noise_multiplier") is not None and q:
            return float(line["noise_multiplier"]), float(q)
    return None


def audit_verifies(run_id: str, store_url: str, public_key: Path) -> tuple[bool, str]:
    """``fedapp audit verify`` with the operator's public key pinned: chain, recorded head and signature."""
    done = subprocess.run(fedapp("audit", "verify", run_id, "--store", store_url, "--public-key", str(public_key)),
                          cwd=ROOT, capture_output=True, text=True)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def last_model_digest(run_dir: Path) -> str:
    entries = [e for e in read_jsonl(run_dir / "audit.jsonl") if e["kind"] == "aggregation"]
    return entries[-1]["fields"]["model_sha256"]


def compare(scenario: dict[str, Any], straight: Path, resumed: Path, store_url: str, run_id: str,
            public_key: Path) -> dict[str, Any]:
    s_sum = json.loads((straight / "summary.json").read_text())
    r_sum = json.loads((resumed / "summary.json").read_text())
    ok, line = audit_verifies(run_id, store_url, public_key)
    resume_entries = [e for e in read_jsonl(resumed / "audit.jsonl") if e["kind"] == "resume"]
    out: dict[str, Any] = {
        "straight_accuracy": s_sum["final_test_accuracy"],
        "resumed_accuracy": r_sum["final_test_accuracy"],
        "accuracy_difference": abs(r_sum["final_test_accuracy"] - s_sum["final_test_accuracy"]),
        "bitwise_equal_model": last_model_digest(straight) == last_model_digest(resumed),
        "resumed_status": r_sum.get("status"), "resumed_attempt": r_sum.get("attempt"),
        "resume_from_round": resume_entries[0]["fields"]["from_round"] if resume_entries else None,
        "interrupted_rounds": resume_entries[0]["fields"]["interrupted_rounds"] if resume_entries else None,
        "audit_verifies": ok, "audit_verify_output": line,
    }
    s_eps, r_eps = final_epsilons(straight), final_epsilons(resumed)
    if s_eps:
        sigma_q = client_sigma_q(resumed)
        trained_s, trained_r = rounds_trained(straight), rounds_trained(resumed)
        per_client = {}
        for client in sorted(s_eps, key=lambda c: int(c) if c.isdigit() else c):
            extra = trained_r.get(client, 0) - trained_s.get(client, 0)
            expected = independent_epsilon(*sigma_q, trained_r[client]) if sigma_q else None
            per_client[client] = {
                "straight": s_eps[client], "resumed": r_eps.get(client), "extra_rounds_trained": extra,
                "independent_resumed": expected,
            }
        out["epsilon_per_client"] = per_client
        out["epsilon_never_under_counted"] = all(
            v["resumed"] is not None and v["resumed"] >= v["straight"] - 1e-9 for v in per_client.values())
        out["epsilon_equal_or_one_round_more"] = all(
            (v["extra_rounds_trained"] == 0 and abs(v["resumed"] - v["straight"]) <= 1e-9 * max(1, v["straight"]))
            or (v["extra_rounds_trained"] >= 1 and v["resumed"] > v["straight"])
            for v in per_client.values())
        out["epsilon_agrees_with_independent_accountant"] = all(
            v["independent_resumed"] is not None and abs(v["resumed"] - v["independent_resumed"]) <= 0.02 * v["resumed"]
            for v in per_client.values())
        out["sigma_q"] = sigma_q
    return out


def overhead(store_url: str, run_id: str, run_dir: Path) -> dict[str, Any]:
    store = RunStore(store_url)
    rows = {r.round: r for r in store.rounds(run_id, effective_only=True)}
    events = [e for e in store.events(run_id) if e.kind == "store_overhead"]
    checkpoints = store.checkpoints(run_id)
    store.close()
    seconds = {int(k): float(v) for e in events for k, v in e.fields["seconds"].items()}
    round_times = {r: float(rows[r].metrics.get("round_time_s") or 0) for r in rows if r > 0}
    fractions = [seconds[r] / (round_times[r] + seconds[r]) for r in round_times if r in seconds and round_times[r] > 0]
    return {
        "boundary_seconds_per_round": seconds,
        "round_time_s": round_times,
        "overhead_fraction_mean": sum(fractions) / len(fractions) if fractions else None,
        "overhead_fraction_max": max(fractions) if fractions else None,
        "checkpoint_write_s_mean": sum(c.write_s for c in checkpoints) / len(checkpoints) if checkpoints else None,
        "checkpoint_size_bytes": checkpoints[-1].size_bytes if checkpoints else None,
    }


def mean_round_time(run_dir: Path, skip_first: bool = True) -> float:
    rows = json.loads((run_dir / "metrics.json").read_text())
    times = [r["round_time_s"] for r in rows if r["round"] > (1 if skip_first else 0) and r.get("round_time_s")]
    return sum(times) / len(times)


def key_overrides(scenario: dict[str, Any], out: Path) -> list[str]:
    bits = scenario.get("key_bits")
    if not bits:
        return []
    from bench_dp_mnist import paillier_key  # deals threshold keys for the preset (2 of 10, m = 10)

    return paillier_key("dp_fedsgd_mnist", out, bits, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["simulation", "processes"])
    parser.add_argument("--scenarios", nargs="+", default=["fedavg", "dp_fedsgd_paillier"], choices=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-overhead-pair", action="store_true", help="skip the store.enabled=false run")
    parser.add_argument("--results-name", default="resume.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the results file and --out's runs")
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs already in the results file (same --out) and add these; verdict over all")
    args = parser.parse_args()
    global RESULTS_NAME
    RESULTS_NAME = args.results_name
    if args.plot_only:
        plot(json.loads((RESULTS / RESULTS_NAME).read_text()), args.out.resolve())
        return
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench-resume-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store_url = f"sqlite:///{out / 'store.db'}"
    audit_key, audit_public = out / "audit_ed25519.pem", out / "audit_ed25519.pub"
    if not audit_key.exists():
        from fedapp.store.audit import generate_audit_key

        audit_key, audit_public = generate_audit_key(out)
    signed = [f"store.audit_key={audit_key}"]
    results: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "runs": {}}
    if args.merge and (RESULTS / RESULTS_NAME).exists():
        previous = json.loads((RESULTS / RESULTS_NAME).read_text())
        results["runs"] = previous.get("runs", {})
        if "side_by_side" in previous:
            results["side_by_side"] = previous["side_by_side"]
    for name in args.scenarios:
        scenario = SCENARIOS[name]
        keys = key_overrides(scenario, out)
        for mode in args.modes:
            label = f"{name}-{mode}"
            extra = [*keys, *signed, f"privacy.client.ledger_dir={out / label / 'ledgers'}"]
            tag = uuid.uuid4().hex
            (out / "logs").mkdir(exist_ok=True)
            print(f"[{label}] straight run", flush=True)
            t_straight = straight_run(run_overrides(scenario, f"{label}-straight", out, store_url, mode,
                                                    [*keys, *signed, f"privacy.client.ledger_dir={out / label / 'ledgers-straight'}"]),
                                      out / "logs" / f"{label}-straight.log", tag)
            spread = None
            if not scenario["deterministic"]:  # the run-to-run spread that fresh noise alone gives
                print(f"[{label}] second uninterrupted run (noise spread)", flush=True)
                straight_run(run_overrides(scenario, f"{label}-straight-b", out, store_url, mode,
                                           [*keys, *signed, f"privacy.client.ledger_dir={out / label / 'ledgers-b'}"]),
                             out / "logs" / f"{label}-straight-b.log", tag)
                acc = [json.loads((out / f"{label}-{k}" / "summary.json").read_text())["final_test_accuracy"]
                       for k in ("straight", "straight-b")]
                spread = abs(acc[0] - acc[1])
            print(f"[{label}] run to kill at round {scenario['kill_round']}", flush=True)
            kill = killed_run(run_overrides(scenario, f"{label}-killed", out, store_url, mode, extra),
                              out / f"{label}-killed", scenario["kill_round"], out / "logs" / f"{label}-killed.log", tag)
            print(f"[{label}] resume", flush=True)
            t_resume = resume_run(f"{label}-killed", store_url, out / "logs" / f"{label}-resume.log", tag)
            entry = compare(scenario, out / f"{label}-straight", out / f"{label}-killed", store_url, f"{label}-killed",
                            audit_public)
            entry |= {"kill": kill, "straight_wall_s": t_straight, "resume_wall_s": t_resume,
                      "deterministic": scenario["deterministic"], "uninterrupted_spread": spread}
            entry["overhead"] = overhead(store_url, f"{label}-straight", out / f"{label}-straight")
            results["runs"][label] = entry
            print(json.dumps(entry, indent=1, default=str)[:3000], flush=True)
            _write(results)
    if not args.no_overhead_pair:
        # Side by side, back to back: the same FedAvg run with the store (checkpoint every round, signed
        # audit) and without it; machines here are noisy, so this is the ratio of two neighbouring runs.
        print("[overhead] the same FedAvg run with and without the store, back to back", flush=True)
        pair: dict[str, float] = {}
        for label, extra in (("with", signed), ("without", ["store.enabled=false"])):
            name = f"fedavg-simulation-pair-{label}"
            straight_run(run_overrides(SCENARIOS["fedavg"], name, out, store_url, "simulation", extra),
                         out / "logs" / f"{name}.log", uuid.uuid4().hex)
            pair[label] = mean_round_time(out / name)
        results["side_by_side"] = {"mean_round_s_with_store": pair["with"], "mean_round_s_without_store": pair["without"],
                                   "ratio": pair["with"] / pair["without"]}
    from tamper import tamper_matrix

    results["tamper"] = tamper_matrix(out / "tamper", entries=60, trials_per_kind=40)
    results["verdict"] = verdict(results)
    _write(results)
    plot(results, out)
    print(json.dumps(results["verdict"], indent=2))


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    v: dict[str, Any] = {}
    for label, r in results["runs"].items():
        if r["deterministic"]:
            v[f"{label}: final model bit-for-bit equal to the uninterrupted run"] = {
                "value": r["bitwise_equal_model"], "target": True, "met": bool(r["bitwise_equal_model"])}
            v[f"{label}: final accuracy difference"] = {
                "value": r["accuracy_difference"], "target": 0.0, "met": r["accuracy_difference"] == 0.0}
        else:
            tolerance = 2 * r["uninterrupted_spread"] + 0.005
            v[f"{label}: final accuracy difference (fresh DP noise after the resume)"] = {
                "value": r["accuracy_difference"],
                "target": f"<= {tolerance:.4f} = 2 x the spread of two uninterrupted runs ({r['uninterrupted_spread']:.4f}) "
                          "+ 0.005: DP noise is drawn afresh from the OS and never replayed",
                "met": r["accuracy_difference"] <= tolerance}
        if "epsilon_per_client" in r:
            v[f"{label}: per-client epsilon equal or higher by exactly the re-trained round"] = {
                "value": r["epsilon_equal_or_one_round_more"] and r["epsilon_agrees_with_independent_accountant"],
                "target": True,
                "met": bool(r["epsilon_equal_or_one_round_more"] and r["epsilon_agrees_with_independent_accountant"])}
        v[f"{label}: audit chain verifies across the resume"] = {
            "value": r["audit_verifies"], "target": True, "met": bool(r["audit_verifies"])}
    fed = results["runs"].get("fedavg-simulation")
    if fed:
        frac = fed["overhead"]["overhead_fraction_mean"]
        v["store + audit overhead per round (share of round time, FedAvg MNIST simulation)"] = {
            "value": frac, "target": 0.02, "met": frac is not None and frac <= 0.02}
        v["checkpoint write time (s) and size (bytes), reported"] = {
            "value": [fed["overhead"]["checkpoint_write_s_mean"], fed["overhead"]["checkpoint_size_bytes"]],
            "target": "reported", "met": fed["overhead"]["checkpoint_size_bytes"] is not None}
    pair = results.get("side_by_side")
    if pair:
        v["mean round time with the store / without (same FedAvg run side by side, rounds 2..)"] = {
            "value": pair["ratio"], "target": 1.02, "met": pair["ratio"] <= 1.02}
    for kind, k in results["tamper"]["kinds"].items():
        v[f"tamper detected: {kind}"] = {"value": k["detection_rate"], "target": 1.0, "met": k["detection_rate"] == 1.0}
    return v


def plot(results: dict[str, Any], out: Path) -> None:
    """Test accuracy per round, uninterrupted vs killed-and-resumed, one panel per scenario and runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["runs"])
    if not labels:
        return
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for run, style in ((f"{label}-straight", "-"), (f"{label}-killed", "--")):
            rows = [r for r in json.loads((out / run / "metrics.json").read_text()) if r.get("test_accuracy") is not None]
            ax.plot([r["round"] for r in rows], [100 * r["test_accuracy"] for r in rows], style, marker="o", ms=3,
                    label="uninterrupted" if run.endswith("straight") else "killed + resumed")
        r = results["runs"][label]
        ax.axvline(r["kill"]["kill_round"], color="red", lw=0.8, ls=":", label=f"SIGKILL in round {r['kill']['kill_round']}")
        ax.set_title(f"{label}\nbitwise equal: {r['bitwise_equal_model']}, audit: {'OK' if r['audit_verifies'] else 'FAIL'}",
                     fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / Path(RESULTS_NAME).with_suffix(".png").name, dpi=110)
    plt.close(fig)


def _write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / RESULTS_NAME).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
