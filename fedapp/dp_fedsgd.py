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

Under SecAgg+ (``secagg.method=secaggplus``: Flower's ``secaggplus_mod`` and
``SecAggPlusWorkflow``, pairwise masks, no shared key) the shares and the
ledger are the same; what the Paillier decryptors enforce must come from the
protocol's settings instead, checked at start-up
(:mod:`fedapp.config_checks`) and again by every client in each round's setup
(:func:`dp_fedsgd_secaggplus_mod`):

* At least ``m`` updates in every unmasked sum. The server unmasks the sum of
  the clients that survived to the masked-vector stage, and Flower lets it do
  so only with at least ``reconstruction_threshold`` survivors (server check,
  and each client's own check before it sends its unmasking shares). So the
  threshold must be ``>= m``, and a client refuses (raises, failing the round
  for itself) a setup with fewer than ``m`` sampled clients or a threshold
  below ``m``. Declines would undercut this -- a client over its budget still
  takes part with weight 0 and no noise share -- so a budget that can bind
  mid-run (``epsilon_budget`` with a given sigma) is refused.
* Equal weights, exactly 1. SecAgg+ multiplies each client's parameters by
  ``num_examples / max_weight`` before quantising; a weight ``w`` scales one
  client's records and its share together, which the others' shares no
  longer cover when ``w`` is the largest, and a small ratio shrinks the
  update until quantisation swamps it (a large one overflows the modulus).
  The server sets ``max_weight`` to the release surface's constant count, 1
  (:func:`fedapp.server_app.secaggplus_workflow`; ``secagg.max_num_examples``
  is then unused), and each client pins its ``num_examples`` to 1 (0 for a
  decline, whatever inner layers report) and refuses a setup whose
  ``max_weight`` is not 1, so every ratio is exactly 1.
* Rounding and clipping small against a share. SecAgg+ quantises
  *parameters* (global model + update), clipped to ``[-clipping_range,
  clipping_range]``, on ``quantization_range`` levels: ``clipping_range``
  must cover the largest parameter plus a few share deviations (a clipped
  share is not Gaussian any more), and the step ``2 clipping_range /
  quantization_range`` must be far below the share's deviation
  (:func:`secaggplus_quantisation_warnings`; clipped coordinates are logged
  on the client).

What remains trusted, stated plainly: as under Paillier, an honest-but-curious
server (plus at most one curious client). The ``m`` a client checks comes from
its experiment configuration, which under ``flwr run`` arrives with the run,
i.e. from whoever submits it -- no protection against a malicious operator
unless the SuperNode pins it. A malicious SecAgg+ server can also (i) stand up
Sybil clients, since Flower's SecAgg+ binds no public key to a real client,
and so make an honest client's update the only real one in a "sum" of ``m``;
(ii) report a client as dropped to some neighbours and as alive to others, to
collect both its mask-key and its seed shares and unmask it alone -- Bell et
al. (CCS 2020) prove SecAgg+ secure against a semi-honest server, or a
malicious one only with consistency checks and a PKI that Flower's version
does not implement. (With ``reconstruction_threshold = 1.0`` every share is
needed, so (ii) would need twice as many answers as there are clients; (i)
stays.) Such a server must be ruled out by deployment, not by these checks.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import Dataset

from fedapp.config import ClientDPConfig, ConfigError
from fedapp.privacy import ACCOUNTANTS, private_generator, sigma_and_budget

log = logging.getLogger("flwr").log  # Flower's logger by name; Flower itself is imported only where needed


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


# --- SecAgg+ (Flower's secaggplus_mod) -------------------------------------------------------------


class SecAggPlusRoundRefused(RuntimeError):
    """A client will not take part in a SecAgg+ round whose sum could hold fewer than ``m`` noise shares."""


def secaggplus_refusal(
    *, sample_num: int, threshold: int, min_contributors: int, max_weight: float = 1.0
) -> str | None:
    """Why a DP-FedSGD client refuses a SecAgg+ round set up with these numbers; ``None`` if it takes part."""
    if max_weight != 1:
        return (
            f"the SecAgg+ round weighs each client by num_examples / max_weight = 1 / {max_weight:g}: DP-FedSGD's "
            "updates must go in with weight exactly 1 (a smaller one drowns the update in quantisation, a larger "
            "one overflows the masking modulus)"
        )
    if sample_num < min_contributors:
        return (
            f"the SecAgg+ round was set up for {sample_num} clients, fewer than secagg.min_contributors="
            f"{min_contributors}: its sum would carry less noise than sigma"
        )
    if threshold < min_contributors:
        return (
            f"the SecAgg+ round's reconstruction threshold is {threshold}, below secagg.min_contributors="
            f"{min_contributors}: after dropouts the server could unmask a sum of fewer noise shares than counted"
        )
    return None


def secaggplus_quantisation_warnings(
    plan: SharedNoisePlan, *, lr: float, clipping_range: float, quantization_range: int, max_abs_parameter: float = 0.0
) -> list[str]:
    """What makes SecAgg+'s integer encoding too coarse or too narrow for a noise share (empty: nothing).

    ``lr`` is the smallest learning rate of the run (a noise share in the
    parameters has std ``lr x share x C / B``, smallest in the last round);
    ``max_abs_parameter`` the largest parameter known now (e.g. of the initial
    model). SecAgg+ clips and quantises *parameters*, global model + update,
    so ``clipping_range`` must cover the parameters themselves plus the noise.
    """
    share_std = lr * plan.share_multiplier * plan.max_grad_norm / plan.normaliser
    step = 2 * clipping_range / quantization_range
    found = []
    if step > share_std / 10:
        found.append(
            f"a client's noise share in its parameters has std {share_std:.3g} (lr x share x C / B) but SecAgg+'s "
            f"quantisation step 2 x clipping_range / quantization_range is {step:.3g}: keep the step below std/10 "
            "(raise secagg.quantization_range), since rounding each share is not covered by the Gaussian accounting"
        )
    if clipping_range < max_abs_parameter + 6 * share_std:
        found.append(
            f"secagg.clipping_range={clipping_range:g} does not cover the parameters (largest |parameter| now "
            f"{max_abs_parameter:.3g}) plus 6 noise-share deviations ({6 * share_std:.3g}): SecAgg+ clips the "
            "parameters themselves (global model + update), and a clipped share is not covered by the Gaussian "
            "accounting; raise secagg.clipping_range"
        )
    return found


def warn_if_secaggplus_too_coarse(
    plan: SharedNoisePlan, *, lr: float, clipping_range: float, quantization_range: int, max_abs_parameter: float = 0.0
) -> None:
    """Log :func:`secaggplus_quantisation_warnings` at start-up, as the Paillier path warns of its fixed point."""
    for message in secaggplus_quantisation_warnings(
        plan, lr=lr, clipping_range=clipping_range, quantization_range=quantization_range,
        max_abs_parameter=max_abs_parameter,
    ):
        log(logging.WARNING, "%s", message)


Handler = Callable[[Any, Any], Any]  # flwr Message, Context -> Message (Flower imported lazily)


def dp_fedsgd_secaggplus_mod(
    msg: Any, context: Any, call_next: Handler, *, min_contributors: int, clipping_range: float
) -> Any:
    """Flower's ``secaggplus_mod`` for a DP-FedSGD client: refuse small rounds, send unit weight, log clipping.

    In the setup stage, a round with fewer than ``min_contributors`` sampled
    clients, a reconstruction threshold below it or a ``max_weight`` other
    than 1 is refused (:class:`SecAggPlusRoundRefused`: the round fails for
    this client, with the reason). The reply's ``num_examples`` becomes 1 (0 for a decline,
    which trains nothing): SecAgg+ weighs by it, and the shares must weigh the
    same. Parameters beyond ``clipping_range`` are counted and logged here,
    on the client (the count itself depends on the data, so it is not sent).
    """
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Message, MessageType, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitres

    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        if configs.get(Key.STAGE) == Stage.SETUP:
            why = secaggplus_refusal(
                sample_num=int(configs.get(Key.SAMPLE_NUMBER, 0)), threshold=int(configs.get(Key.THRESHOLD, 0)),
                min_contributors=min_contributors, max_weight=float(configs.get(Key.MAX_WEIGHT, 0.0)),
            )
            if why is not None:
                log(logging.WARNING, "refusing a SecAgg+ round: %s", why)
                raise SecAggPlusRoundRefused(why)

    def unit_weight(message: Any, ctx: Any) -> Any:
        reply = call_next(message, ctx)
        if reply.has_error():
            return reply
        res = recorddict_to_fitres(reply.content, keep_input=True)
        res.num_examples = 1 if res.num_examples > 0 else 0
        if res.num_examples:
            arrays = parameters_to_ndarrays(res.parameters)
            clipped = sum(int(np.count_nonzero(np.abs(a) > clipping_range)) for a in arrays)
            if clipped:
                log(logging.WARNING, "%d parameters lie outside secagg.clipping_range=%g and are clipped before "
                    "masking (not covered by the Gaussian accounting; biases the mean): raise it", clipped,
                    clipping_range)
        return Message(fitres_to_recorddict(res, keep_input=True), reply_to=message)

    return secaggplus_mod(msg, context, unit_weight)
