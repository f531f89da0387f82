"""Choose DP-FedSGD hyper-parameters fast, on the centralised equivalent (no Flower, no Paillier).

    FEDAPP_DATA_ROOT=../shared/data python simulations/tune_dp_fedsgd.py \\
        --epsilon 3 --rounds 200 --sample-rate 0.1 --lr 2 --momentum 0.9 --lr-decay 1.0

Why this is equivalent: in record-level DP-FedSGD every client Poisson-samples
its records at q and the decrypted sum carries noise sigma * C (any m - 1
shares), so a round is one DP-SGD step on the union of the clients' data with
a Poisson sample at q -- exactly what this script runs, in one process, with
per-sample gradients from ``torch.func`` (an implementation independent of
the Opacus path the product uses). It takes about 1 s a round on 2 cores,
against about 6 s a round with ten Paillier clients, so a schedule can be
tried in minutes. The noise here is sigma * C; the product's is
sigma * C * sqrt(n / (m - 1)) (5 % more for n = m = 10), so expect it to be a
little better than the real run. The figures come from
``bench_dp_mnist.py --experiment dp_fedsgd_mnist``, never from this script.
Each run appends one line to ``simulations/results/dp_fedsgd_tuning.jsonl``.

Choosing hyper-parameters on the test set is itself not private; like most of
the DP literature, fedapp does not account for it (stated in docs/privacy.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedapp.components import client_data, new_model, test_data
from fedapp.config import ExperimentConfig
from fedapp.privacy import calibrate_noise_multiplier
from fedapp.training import evaluate

RESULTS = Path(__file__).resolve().parent / "results"


def union_of_clients(cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every client's training records (validation splits excluded), as the federation holds them."""
    xs, ys = [], []
    for pid in range(cfg.partition.num_clients):
        train, _ = client_data(cfg, pid)
        idx = torch.as_tensor(train.indices)
        xs.append(train.dataset.tensors[0][idx])
        ys.append(train.dataset.tensors[1][idx])
    return torch.cat(xs), torch.cat(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, required=True)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--lr-decay", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--model", default="cnn_mnist_small")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = ExperimentConfig.from_dict({"model": {"name": args.model}, "partition": {"num_clients": args.clients}})
    x_all, y_all = union_of_clients(cfg)
    n = len(y_all)
    sigma = calibrate_noise_multiplier(
        target_epsilon=args.epsilon, delta=args.delta, sample_rate=args.sample_rate, steps=args.rounds
    )
    torch.manual_seed(args.seed)
    model = new_model(cfg)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per_sample_grads = vmap(grad(loss_one), in_dims=(None, 0, 0))
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    expected_batch = args.sample_rate * n
    curve, started = [], time.perf_counter()
    for t in range(1, args.rounds + 1):
        mask = torch.rand(n) < args.sample_rate
        x, y = x_all[mask], y_all[mask]
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        for s in range(0, len(y), 1024):
            g = per_sample_grads(params, x[s : s + 1024], y[s : s + 1024])
            norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
            scale = (args.clip / (norms + 1e-12)).clamp(max=1.0)
            for k in total:
                total[k] += torch.einsum("b,b...->...", scale, g[k])
        lr = args.lr * args.lr_decay ** (t - 1)
        for k in params:
            noisy = (total[k] + sigma * args.clip * torch.randn_like(total[k])) / expected_batch
            velocity[k] = args.momentum * velocity[k] + noisy
            params[k] = params[k] - lr * velocity[k]
        if t % 25 == 0 or t == args.rounds:
            model.load_state_dict(params, strict=False)
            curve.append((t, evaluate(model, test_data(cfg))[1]))
            print(f"round {t}: test accuracy {curve[-1][1]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    row = {**vars(args), "sigma": sigma, "final_test_accuracy": curve[-1][1], "curve": curve}
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "dp_fedsgd_tuning.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("epsilon", "lr", "momentum", "lr_decay", "sigma", "final_test_accuracy")}))


if __name__ == "__main__":
    main()
