"""Run one fedapp experiment (or a Hydra ``-m`` sweep of them); the same as ``fedapp run``.

    python simulations/run.py                                  # default experiment
    python simulations/run.py +experiment=fedavg_mnist_iid     # a named preset
    python simulations/run.py -m partition=iid,dirichlet seed=0,1   # a sweep
    python simulations/run.py +experiment=smoke runtime=processes   # real SuperLink/SuperNodes
    python simulations/run.py +experiment=smoke store.resume=RUN_ID  # continue a killed run

Each run writes into its Hydra output folder: ``.hydra/config.yaml`` (resolved
config), ``experiment.json``, ``metrics.json``/``metrics.csv`` per round,
``clients.jsonl``, ``events.jsonl``, ``rounds.png``, ``summary.json``,
``audit.jsonl`` and ``checkpoints/``; the run is recorded in the run store
(``store.url``, default ``outputs/fedapp.db``).
"""

from fedapp.runner import main

if __name__ == "__main__":
    main()
