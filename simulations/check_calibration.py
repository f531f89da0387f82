"""Does calibration ever overspend? Calibrated sigma checked by Opacus and Google's dp-accounting.

    python simulations/check_calibration.py            # writes simulations/results/calibration.json

At the ``dp_fedsgd_mnist`` settings (q = 0.1, 200 steps, delta = 1e-5) and targets
0.5, 1, 2, 3 and 8, ``calibrate_noise_multiplier`` picks sigma; the script then counts
that run's epsilon independently of fedapp's own checks: Opacus's RDP accountant
(the ledger's), Google's dp-accounting RDP and its PLD (on the default 1e-4 grid,
not calibration's coarser one). For comparison each row also has what Opacus's
own search (``get_noise_multiplier``, the calibration before this check) picks and
spends. The verdict is the largest epsilon / target over all counts and targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from dp_accounting import dp_event, pld, rdp
from opacus.accountants.utils import get_noise_multiplier

from fedapp.privacy import PrivacyLedger, calibrate_noise_multiplier

RESULTS = Path(__file__).resolve().parent / "results"


def epsilons(sigma: float, q: float, steps: int, delta: float) -> dict[str, float]:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps by Opacus RDP, dp-accounting RDP and PLD."""
    ledger = PrivacyLedger("rdp")
    ledger.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    out = {"opacus_rdp": ledger.epsilon(delta)}
    for name, accountant in (("dp_accounting_rdp", rdp.RdpAccountant()), ("dp_accounting_pld", pld.PLDAccountant())):
        accountant.compose(event)
        out[name] = float(accountant.get_epsilon(delta))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0, 8.0])
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration.json")
    args = parser.parse_args()
    q, steps, delta = args.sample_rate, args.steps, args.delta

    rows = []
    for target in args.targets:
        started = time.perf_counter()
        sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
        seconds = time.perf_counter() - started
        spent = epsilons(sigma, q, steps, delta)
        old_sigma = float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps))
        old_spent = epsilons(old_sigma, q, steps, delta)
        row = {
            "target_epsilon": target,
            "sigma": sigma,
            "calibration_s": round(seconds, 3),
            "epsilon": spent,
            "max_epsilon_over_target": max(spent.values()) / target,
            "opacus_get_noise_multiplier": {
                "sigma": old_sigma,
                "epsilon": old_spent,
                "max_epsilon_over_target": max(old_spent.values()) / target,
            },
        }
        rows.append(row)
        print(
            f"target {target:>4}: sigma {sigma:.6f} ({seconds:.2f} s)  "
            + "  ".join(f"{k} {v:.5f}" for k, v in spent.items())
            + f"  | Opacus's search: sigma {old_sigma:.6f}, max {max(old_spent.values()):.5f}"
        )

    worst = max(r["max_epsilon_over_target"] for r in rows)
    out = {
        "command": "python simulations/check_calibration.py",
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
        "setting": {"sample_rate": q, "steps": steps, "delta": delta, "accountant": "rdp",
                    "dp_accounting_pld_interval": 1e-4},
        "results": rows,
        "verdict": {"calibration never overspends": {"value": worst, "target": 1.0, "met": worst <= 1.0}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"max epsilon / target = {worst:.6f} ({'met' if worst <= 1.0 else 'NOT met'}); wrote {args.out}")


if __name__ == "__main__":
    main()
