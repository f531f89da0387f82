"""Privacy-utility table and plot for finished runs (e.g. a Hydra epsilon sweep).

    python simulations/run.py -m +experiment=dp_mnist privacy.client.target_epsilon=0.5,1,2,3,8
    python simulations/privacy_report.py multirun/dp_mnist/<time>      # writes privacy_utility.{json,png} there

Each row has the record-level DP-SGD epsilon (max over clients) and, for runs with
central or distributed DP (Paillier noise shares), the user-level epsilon, labelled by
mechanism; the per-round curves are each run's own ``epsilon.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedapp.report import format_privacy_utility, plot_privacy_utility, privacy_utility_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="folder holding one sub-folder per run")
    args = parser.parse_args()
    runs = sorted(p for p in args.sweep_dir.iterdir() if (p / "summary.json").exists())
    if not runs:
        raise SystemExit(f"no finished runs (summary.json) under {args.sweep_dir}")
    rows = privacy_utility_rows(runs)
    (args.sweep_dir / "privacy_utility.json").write_text(json.dumps(rows, indent=2))
    plot_privacy_utility(rows, args.sweep_dir / "privacy_utility.png")
    print(format_privacy_utility(rows))


if __name__ == "__main__":
    main()
