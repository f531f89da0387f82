"""Record-level DP-FedSGD with the Gaussian noise split into shares that secure aggregation sums.

Why this exists: with local DP-SGD (:mod:`fedapp.privacy`) every client adds
the full noise its own epsilon needs, and averaging ``n`` clients leaves
``sqrt(n)`` times more noise on the global model than one DP-SGD step over the
pooled data would. Under secure aggregation nobody sees one client's upload, so
the noise only has to be there *in the sum*: each client takes one DP-SGD step
per round -- a Poisson sample of its records, every per-sample gradient clipped
to ``C``, summed -- and adds only a share ``N(0, sigma^2 C^2 / (m - 1))`` of the
noise, where ``m`` is the fewest updates a decryptor will decrypt
(``secagg.min_contributors``). The decrypted mean is then one step of DP-SGD on
the union of the clients' data with noise multiplier at least ``sigma``.

Threat model (stated in ``docs/privacy.md``): honest-but-curious server and
clients that follow the protocol; the server sees only decrypted sums of at
least ``m`` updates (enforced by the decryptors). Counting ``m - 1`` shares, not
``m``, keeps the guarantee against any single client too -- a decryptor that
subtracts its own share from the sum still faces ``sigma``. Each record of
client ``i`` is then in a round's sum with probability ``q`` (Poisson) and moves
it by at most ``C``: one step of the subsampled Gaussian mechanism at
``(sigma, q)``, booked in that client's own cumulative ledger.

Every client divides its noisy sum by the same constant ``B``
(``client.batch_size``), so one record has the same sensitivity ``lr C / B`` in
every client's update; with clients of different sizes this keeps each client's
noise share the same size as everyone else's (a per-client divisor would give a
small client's records less noise relative to their influence). Opacus does the
sampling (:class:`UniformWithReplacementSampler`), the per-sample gradients
(:class:`GradSampleModule`), the clipping and the noise (:class:`DPOptimizer`);
only the split of sigma into shares and the booking are fedapp's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import Dataset

from fedapp.config import ClientDPConfig, ConfigError
from fedapp.privacy import ACCOUNTANTS, private_generator, sigma_and_budget


@dataclass(frozen=True)
class SharedNoisePlan:
    """One client's DP-FedSGD settings for the whole run, identical on every client.

    ``noise_multiplier`` (sigma) is what the ledger books: the noise of
    ``shares_counted`` shares together, each of multiplier ``share_multiplier``.
    """

    noise_multiplier: float
    share_multiplier: float
    shares_counted: int
    max_grad_norm: float
    sample_rate: float
    normaliser: int
    delta: float
    epsilon_budget: float  # 0 = no cap
    accountant: str


def share_multiplier(noise_multiplier: float, shares_counted: int) -> float:
    """Each client's noise multiplier so that ``shares_counted`` shares together reach ``noise_multiplier``."""
    if shares_counted < 1:
        raise ValueError(f"at least one share must be counted, got {shares_counted}")
    return noise_multiplier / math.sqrt(shares_counted)


def plan_shared_noise(
    dp: ClientDPConfig, *, min_contributors: int, num_rounds: int, batch_size: int
) -> SharedNoisePlan:
    """Sigma for the whole run (one step per round at ``dp.sample_rate``) and each client's share.

    Depends on the configuration only, never on a client's data, so every
    client computes the same shares: a client's ledger may count on the others'
    shares being as large as its own.
    """
    if dp.accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown privacy.client.accountant {dp.accountant!r}; valid: {list(ACCOUNTANTS)}")
    if min_contributors < 2:
        raise ConfigError(
            f"privacy.client.mode='distributed' needs secagg.min_contributors >= 2, got {min_contributors}: "
            "the noise is counted over min_contributors - 1 shares"
        )
    if not 0 < dp.sample_rate <= 1:
        raise ConfigError(
            f"privacy.client.mode='distributed' needs 0 < privacy.client.sample_rate <= 1 (each record's chance "
            f"to be in a round's gradient), got {dp.sample_rate}"
        )
    sigma, budget = sigma_and_budget(dp, sample_rate=dp.sample_rate, steps=num_rounds)
    counted = min_contributors - 1
    return SharedNoisePlan(
        noise_multiplier=sigma,
        share_multiplier=share_multiplier(sigma, counted),
        shares_counted=counted,
        max_grad_norm=dp.max_grad_norm,
        sample_rate=dp.sample_rate,
        normaliser=batch_size,
        delta=dp.delta,
        epsilon_budget=budget,
        accountant=dp.accountant,
    )


def noisy_gradient_step(
    model: nn.Module, data: Dataset, *, plan: SharedNoisePlan, lr: float, device: str = "cpu",
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One DP-SGD step on ``model`` in place: ``-lr (sum of clipped grads + noise share) / B``.

    The Poisson sample is drawn by Opacus's sampler at ``plan.sample_rate``; an
    empty sample still adds the noise share (the step the ledger books). Plain
    SGD without momentum, so the update is linear in the noisy sum and the sum
    over clients is the noisy sum over the union. ``generator`` is for tests;
    by default both the sample and the noise come from :func:`private_generator`.
    """
    generator = generator if generator is not None else private_generator()
    sampler = UniformWithReplacementSampler(
        num_samples=len(data), sample_rate=plan.sample_rate, generator=generator, steps=1
    )
    indices = next(iter(sampler))
    module = GradSampleModule(model.to(device).train(), loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=lr),
        noise_multiplier=plan.share_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.normaliser,
        loss_reduction="mean",  # divide the noisy sum by expected_batch_size = B
        generator=generator,
    )
    loss_value, correct = float("nan"), 0
    try:
        optimizer.zero_grad(set_to_none=True)
        if indices:
            x, y = _batch(data, indices, device)
            out = module(x)
            loss = nn.functional.cross_entropy(out, y, reduction="sum")
            with warnings.catch_warnings():  # the inputs need no gradient; Opacus's hooks fire all the same
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            loss_value, correct = loss.item() / len(indices), int((out.argmax(1) == y).sum().item())
        else:  # no record sampled: zero per-sample gradients, so the step is the noise share alone
            for p in module.parameters():
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()  # clip each sample to C, sum, add N(0, (share*C)^2), divide by B, SGD step
    finally:
        module._close()
    return {"train_loss": loss_value, "train_accuracy": correct / max(1, len(indices)), "dp_batch": float(len(indices))}


def _batch(data: Dataset, indices: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The records at ``indices`` as one batch of inputs and one of labels."""
    xs, ys = zip(*(data[i] for i in indices))
    return torch.stack(xs).to(device), torch.as_tensor(ys).to(device)
