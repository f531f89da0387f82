"""Byzantine behaviours for simulated attacks, applied on the client (numpy only).

In a real deployment an attacker controls its own client, so every attack here
runs inside the malicious client's ``fit`` and the server never learns who is
malicious (nothing about the attack goes into the fit metrics). Which clients
are malicious is decided once per run by :func:`malicious_clients`,
deterministically from ``attack.seed`` (or the explicit ``attack.clients``).

An attack is an :class:`Attack`: two hooks, both honest by default.

- ``poison_labels(labels, ctx) -> labels``: data poisoning; the client trains
  this round on its own images with the returned labels.
- ``poison_update(update, ctx) -> update``: model poisoning; ``update`` is the
  client's honest update, ``new weights - global weights``, as a list of float
  arrays (one per floating-point model array; integer buffers are never
  touched). The returned list must have the same shapes; the client sends
  ``global weights + returned update``.

Registered names: see :data:`ATTACKS`. A user adds an attack without editing
fedapp by naming it with a dotted path, ``attack.name: mypkg.mymod:my_attack``,
where ``my_attack`` is one of

- an :class:`Attack` subclass (instantiated with no arguments) or instance, or
- a plain function ``(update: list[np.ndarray], ctx: AttackContext) -> list[np.ndarray]``
  (model poisoning only).

Parameters reach an attack through ``ctx.config`` (the :class:`AttackConfig`:
``scale``, ``sigma``, ``z``) and randomness through ``ctx.rng``, seeded by
``(attack.seed, round, partition id)`` so runs repeat exactly.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Protocol

import numpy as np

from fedapp.config import AttackConfig, ConfigError

Update = list[np.ndarray]


class AttackError(RuntimeError):
    """An attack could not be carried out (e.g. it returned arrays of the wrong shape)."""


@dataclass(frozen=True)
class AttackContext:
    """What a malicious client knows when it attacks.

    Parameters
    ----------
    partition_id : int
        This client.
    server_round : int
        The round being trained.
    malicious : tuple[int, ...]
        All malicious partition ids: the colluders, this client included.
    num_clients : int
        Clients in the federation (``partition.num_clients``).
    num_classes : int
        Label classes of the data set (label flipping needs it).
    config : AttackConfig
        The attack's parameters (``scale``, ``sigma``, ``z``).
    rng : np.random.Generator
        Seeded by ``(attack.seed, server_round, partition_id)``.
    honest_update_of : Callable[[int], Update] | None
        Trains and returns colluder ``pid``'s honest update for this round (same
        global model, that colluder's data and seed); ``None`` where the caller
        cannot train (default: None). ALIE needs it.
    """

    partition_id: int
    server_round: int
    malicious: tuple[int, ...]
    num_clients: int
    num_classes: int
    config: AttackConfig
    rng: np.random.Generator
    honest_update_of: Callable[[int], Update] | None = None


class Attack:
    """A Byzantine behaviour; both hooks are honest unless a subclass overrides them."""

    def poison_labels(self, labels: np.ndarray, ctx: AttackContext) -> np.ndarray:
        """Labels the client trains on this round (data poisoning)."""
        return labels

    def poison_update(self, update: Update, ctx: AttackContext) -> Update:
        """The update the client sends instead of its honest one (model poisoning)."""
        return update


class UpdateAttackFn(Protocol):
    """A plain function usable as a model-poisoning attack by dotted path."""

    def __call__(self, update: Update, ctx: AttackContext) -> Update: ...


class FunctionAttack(Attack):
    """Adapts a plain ``(update, ctx) -> update`` function to :class:`Attack`."""

    def __init__(self, fn: UpdateAttackFn) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return f"FunctionAttack({getattr(self.fn, '__qualname__', self.fn)!r})"

    def poison_update(self, update: Update, ctx: AttackContext) -> Update:
        return self.fn(update, ctx)


class SignFlip(Attack):
    """Send the negated update (Damaskinos et al. 2018): same norm, opposite direction."""

    def poison_update(self, update: Update, ctx: AttackContext) -> Update:
        return [-u for u in update]


class GaussianNoise(Attack):
    """Send pure noise ``N(0, sigma^2)`` per coordinate instead of an update (Fang et al. 2020)."""

    def poison_update(self, update: Update, ctx: AttackContext) -> Update:
        sigma = ctx.config.sigma
        return [ctx.rng.normal(0.0, sigma, size=u.shape).astype(u.dtype) for u in update]


class LabelFlip(Attack):
    """Train on ``y -> num_classes - 1 - y`` (data poisoning; the update itself is honest)."""

    def poison_labels(self, labels: np.ndarray, ctx: AttackContext) -> np.ndarray:
        return (ctx.num_classes - 1 - labels).astype(labels.dtype)


class Scaling(Attack):
    """Boost the update by ``scale`` (model replacement, Bagdasaryan et al. 2020)."""

    def poison_update(self, update: Update, ctx: AttackContext) -> Update:
        return [ctx.config.scale * u for u in update]


class ALIE(Attack):
    """"A little is enough" (Baruch et al. 2019): send ``mean - z * std`` of benign updates.

    The server's help is not needed: the malicious clients collude as one
    adversary that holds all their partitions. Each of them trains one honest
    update per colluder (``ctx.honest_update_of``: the colluder's own data and
    seed, the same global model), so every colluder computes the same per-
    coordinate mean and standard deviation (over the ``m`` colluders' honest
    updates, population std) and all send the same vector. This costs each
    malicious client ``m`` local trainings per round. ``z`` is ``attack.z``, or
    when that is 0 the paper's ``z_max`` for ``n`` clients and ``m`` attackers
    (:func:`alie_z_max`).
    """

    def poison_update(self, update: Update, ctx: AttackContext) -> Update:
        if ctx.honest_update_of is None:
            raise AttackError("ALIE needs the colluders' honest updates (ctx.honest_update_of is None)")
        peers = [update if pid == ctx.partition_id else ctx.honest_update_of(pid) for pid in ctx.malicious]
        z = ctx.config.z or alie_z_max(ctx.num_clients, len(ctx.malicious))
        out = []
        for layers in zip(*peers, strict=True):
            stacked = np.stack([np.asarray(a, dtype=np.float64) for a in layers])
            out.append((stacked.mean(axis=0) - z * stacked.std(axis=0)).astype(layers[0].dtype))
        return out


def alie_z_max(num_clients: int, num_malicious: int) -> float:
    """Baruch et al.'s largest z that stays inside the benign spread.

    ``s = floor(n/2 + 1) - m`` benign clients must be "seduced" to side with the
    attackers; ``z_max = Phi^-1((n - s) / n)``. For n = 20, m = 4: s = 7,
    z_max = Phi^-1(0.65) = 0.385. The probability is clamped to [0.5, 0.999]
    (with a Byzantine majority, s <= 0, the formula has no finite answer).
    """
    if num_clients < 1 or num_malicious < 0:
        raise ValueError(f"need num_clients >= 1 and num_malicious >= 0, got {num_clients}, {num_malicious}")
    s = math.floor(num_clients / 2 + 1) - num_malicious
    p = min(max((num_clients - s) / num_clients, 0.5), 0.999)
    return NormalDist().inv_cdf(p)


ATTACKS: dict[str, Callable[[], Attack]] = {
    "signflip": SignFlip,
    "gaussian": GaussianNoise,
    "labelflip": LabelFlip,
    "scaling": Scaling,
    "alie": ALIE,
}
NO_ATTACK = "none"


def resolve_attack(name: str) -> Attack | None:
    """The attack named ``name``: a registered name, ``"none"`` (None) or ``pkg.mod:attr``.

    Raises :class:`ConfigError` listing the valid names, or saying why a dotted
    path does not import or is not usable as an attack.
    """
    if name == NO_ATTACK:
        return None
    if name in ATTACKS:
        return ATTACKS[name]()
    if ":" not in name:
        raise ConfigError(
            f"unknown attack.name {name!r}; valid: {[NO_ATTACK, *sorted(ATTACKS)]} "
            "or a dotted path 'package.module:attribute' to your own attack"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"attack.name {name!r}: module {module_name!r} does not import ({err})") from None
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"attack.name {name!r}: module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(target, Attack):
        return target
    if isinstance(target, type):
        if not issubclass(target, Attack):
            raise ConfigError(f"attack.name {name!r}: class {attr} does not subclass fedapp.attacks.Attack")
        return target()
    if callable(target):
        return FunctionAttack(target)
    raise ConfigError(f"attack.name {name!r}: {attr} is neither an Attack nor a function (update, ctx) -> update")


def malicious_clients(cfg: AttackConfig, num_clients: int) -> tuple[int, ...]:
    """Malicious partition ids, sorted: ``attack.clients`` if given, else a seeded draw.

    The draw takes ``floor(fraction * num_clients)`` ids without replacement from
    ``numpy.random.default_rng(attack.seed)``, so clients and the evaluation on
    the server agree without talking. No attack (``name: none``): nobody.
    """
    if cfg.name == NO_ATTACK:
        return ()
    explicit = cfg.client_ids()
    if explicit:
        return tuple(sorted(explicit))
    count = math.floor(round(cfg.fraction * num_clients, 6))
    if count == 0:
        return ()
    chosen = np.random.default_rng(cfg.seed).choice(num_clients, size=count, replace=False)
    return tuple(sorted(int(c) for c in chosen))


def attack_rng(cfg: AttackConfig, server_round: int, partition_id: int) -> np.random.Generator:
    """The attack's randomness for one client in one round (independent of training's)."""
    return np.random.default_rng([cfg.seed, server_round, partition_id])


def poison_weights(attack: Attack, old: Update, new: Update, ctx: AttackContext) -> Update:
    """Weights to send: ``old + attack.poison_update(new - old)`` on floating-point arrays.

    Integer arrays (buffers such as counters) are passed through unchanged; the
    attack's result is checked for count and shapes, so a broken custom attack
    fails on the client with a clear message instead of on the server.
    """
    floating = [i for i, a in enumerate(new) if np.issubdtype(np.asarray(a).dtype, np.floating)]
    update = [np.asarray(new[i]) - np.asarray(old[i]) for i in floating]
    poisoned = attack.poison_update(update, ctx)
    if len(poisoned) != len(update):
        raise AttackError(f"{attack!r} returned {len(poisoned)} arrays for an update of {len(update)}")
    out = [np.asarray(a) for a in new]
    for i, honest, bad in zip(floating, update, poisoned):
        bad = np.asarray(bad)
        if bad.shape != honest.shape:
            raise AttackError(f"{attack!r} returned shape {bad.shape} for an array of shape {honest.shape}")
        out[i] = (np.asarray(old[i]) + bad).astype(out[i].dtype)
    return out
