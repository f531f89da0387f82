"""The release surface: every field a client sends, per privacy mode, and the mod that enforces it.

Privacy is about everything that leaves a client, not only the update. For each
privacy mode this module declares one table of every field of every reply a
client sends -- the parameters, ``num_examples``, the evaluation loss and every
metric key -- each marked with a :class:`Release` status. :func:`make_release_mod`
builds a Flower client mod that sits innermost in the ClientApp (closest to
the client, so it runs last on the reply: after training, DP, simulated
attacks and Paillier encryption, before SecAgg+ masking), and drops every
metric not declared sendable, replaces ``num_examples`` by the declared
constant, and refuses to answer a message kind the mode never answers. A
metric someone adds later therefore cannot slip out: it is dropped (and
logged once) until it is declared here.

Why the exact per-client metrics must go under client DP: DP's adversary
knows every record of a client but one. An exact ``train_loss`` or the size of
the Poisson sample (``dp_batch``) is a deterministic function of whether that
record was sampled, so the server learns membership outright while the ledger
prints a finite epsilon. ``num_examples`` is the record count itself: releasing
it exactly breaks the add/remove neighbouring relation the accountants assume.
What remains public under client DP is a function of the configuration only
(sigma, sample rate, steps, and the epsilon the ledger computes from them).
Monitoring comes from the server's own evaluation on its held-out test set.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from logging import INFO
from typing import Any, Callable

import numpy as np
from flwr.common import Context, Message, MessageType, log, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import (
    evaluateres_to_recorddict,
    fitres_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)

from fedapp.crypto.protocol import MODE_DECRYPT, SECAGG_MODE, SECAGG_SHARE_INDEX, SECAGG_TOTAL_WEIGHT
from fedapp.crypto.vectors import MAGIC as ENCRYPTED_MAGIC
from fedapp.wrappers import CLIENT_ID_KEY, DECLINED_KEY, EPSILON_KEY, REASON_CODE_KEY, REASON_KEY


class Release(enum.Enum):
    """What happens to one field on its way out of a client."""

    PUBLIC = "public"  # no privacy claim covers it, or a function of public configuration only
    PRIVATISED = "privatised"  # noised by a DP mechanism whose cost the ledger books
    SECURE_SUM = "secure-sum"  # leaves only encrypted or masked; only a sum over >= m clients is revealed
    NEVER = "never"  # dropped here; never leaves the client


# Pseudo-keys for the non-metric fields of a reply.
PARAMETERS = "<parameters>"
NUM_EXAMPLES = "<num_examples>"
LOSS = "<loss>"

FIT, DECRYPT, EVALUATE = "fit", "decrypt", "evaluate"
CONSTANT_NUM_EXAMPLES = 1  # every client weighs the same: the count reveals nothing

# Privacy modes, from the weakest claim to the strongest.
PLAIN = "plain"
CENTRAL_DP = "central_dp"
SECURE_AGGREGATION = "secure_aggregation"
DISTRIBUTED_DP = "distributed_dp"
CLIENT_DP_LOCAL = "client_dp_local"
CLIENT_DP_DISTRIBUTED = "client_dp_distributed"


@dataclass(frozen=True)
class Field:
    """One field of one reply kind: its status and why it has it."""

    status: Release
    why: str


@dataclass(frozen=True)
class ReleaseSurface:
    """Everything a client may send in one privacy mode.

    ``replies`` maps a reply kind (``fit``, ``decrypt``, ``evaluate``) to its
    declared fields; a kind absent from it is never answered. ``num_examples``
    is ``None`` when the exact count is released, else the constant sent instead
    (a decline, which trains nothing, always sends 0).
    """

    mode: str
    replies: dict[str, dict[str, Field]]
    num_examples: int | None = CONSTANT_NUM_EXAMPLES
    notes: tuple[str, ...] = field(default_factory=tuple)

    def status(self, kind: str, key: str) -> Release:
        """The status of ``key`` in a ``kind`` reply; undeclared keys are :attr:`Release.NEVER`."""
        return self.replies.get(kind, {}).get(key, Field(Release.NEVER, "not declared")).status

    def sendable(self, kind: str, key: str) -> bool:
        return self.status(kind, key) is not Release.NEVER


def _public(why: str) -> Field:
    return Field(Release.PUBLIC, why)


def _never(why: str) -> Field:
    return Field(Release.NEVER, why)


_IDENTITY = {CLIENT_ID_KEY: _public("the partition id: the server knows which node replied anyway")}
_DECLINE = {
    DECLINED_KEY: _public("a decline trains nothing; when it is for the budget, the budget is a function of the config"),
    REASON_CODE_KEY: _public("the decline's reason code"),
    REASON_KEY: _public("the decline's reason in words: budget figures computed from the configuration"),
}
_LEDGER = {
    EPSILON_KEY: _public("the ledger's cumulative epsilon: a function of sigma, sample rate and steps"),
    "delta": _public("configuration"),
    "noise_multiplier": _public("configuration (calibrated from the target epsilon)"),
    "dp_steps": _public("steps booked so far: the number of rounds trained times steps per round"),
}
_EXACT_TRAINING = {
    "train_loss": _public("no privacy claim in this mode"),
    "train_accuracy": _public("no privacy claim in this mode"),
}
_NO_TRAINING_METRICS = {
    "train_loss": _never("an exact loss on private records reveals whether a record was in the batch"),
    "train_accuracy": _never("an exact accuracy on private records reveals whether a record was in the batch"),
    "dp_batch": _never("the Poisson sample's size differs by one with and without a record"),
    "secagg_clamped": _never("how many coordinates were clamped depends on the data (logged on the client)"),
}
_DECRYPT_REPLY = {
    PARAMETERS: _public("a partial decryption of a sum of >= m signed updates; alone it reveals nothing"),
    NUM_EXAMPLES: _public("always 0: a decryptor trains nothing"),
    CLIENT_ID_KEY: _IDENTITY[CLIENT_ID_KEY],
    SECAGG_SHARE_INDEX: _public("which key share made the partial decryption"),
    SECAGG_TOTAL_WEIGHT: _public("the total weight of the sum, which the server computed itself"),
}
_EXACT_EVALUATION = {
    LOSS: _public("no privacy claim in this mode"),
    NUM_EXAMPLES: _public("no privacy claim in this mode"),
    CLIENT_ID_KEY: _IDENTITY[CLIENT_ID_KEY],
    "accuracy": _public("no privacy claim in this mode"),
}


def _fit(parameters: Field, num_examples: Field, *tables: dict[str, Field]) -> dict[str, Field]:
    merged = {PARAMETERS: parameters, NUM_EXAMPLES: num_examples}
    for table in tables:
        merged |= table
    return merged


_CONSTANT_COUNT = Field(Release.PUBLIC, f"constant {CONSTANT_NUM_EXAMPLES}: uniform weights, the record count stays home")

SURFACES: dict[str, ReleaseSurface] = {
    PLAIN: ReleaseSurface(
        PLAIN,
        {
            FIT: _fit(_public("the update in the clear"), _public("FedAvg weights by it"), _IDENTITY, _DECLINE,
                      _EXACT_TRAINING, {"secagg_clamped": _never("only meaningful under secure aggregation")}),
            EVALUATE: _EXACT_EVALUATION,
        },
        num_examples=None,
        notes=("no privacy mechanism: the server sees every update and metric",),
    ),
    CENTRAL_DP: ReleaseSurface(
        CENTRAL_DP,
        {
            FIT: _fit(_public("clipped and noised by the trusted server"), _public("the trusted server sees it"),
                      _IDENTITY, _DECLINE, _EXACT_TRAINING),
            EVALUATE: _EXACT_EVALUATION,
        },
        num_examples=None,
        notes=("central DP trusts the server; it protects what the server releases (the model), "
               "not what clients send it",),
    ),
    SECURE_AGGREGATION: ReleaseSurface(
        SECURE_AGGREGATION,
        {
            FIT: _fit(Field(Release.SECURE_SUM, "encrypted (Paillier) or masked (SecAgg+)"), _CONSTANT_COUNT,
                      _IDENTITY, _DECLINE, _NO_TRAINING_METRICS),
            DECRYPT: _DECRYPT_REPLY,
        },
        notes=("secure aggregation promises that the server learns the sum only: per-client metrics would "
               "break that promise, so none is sent; no DP: the sum itself is exact",),
    ),
    DISTRIBUTED_DP: ReleaseSurface(
        DISTRIBUTED_DP,
        {
            FIT: _fit(Field(Release.PRIVATISED, "clipped, a noise share added, encrypted; the sum is accounted "
                            "(central_epsilon)"), _CONSTANT_COUNT, _IDENTITY, _DECLINE, _NO_TRAINING_METRICS),
            DECRYPT: _DECRYPT_REPLY,
        },
    ),
    CLIENT_DP_LOCAL: ReleaseSurface(
        CLIENT_DP_LOCAL,
        {
            FIT: _fit(Field(Release.PRIVATISED, "Opacus DP-SGD, booked in the client's ledger"), _CONSTANT_COUNT,
                      _IDENTITY, _DECLINE, _LEDGER, _NO_TRAINING_METRICS),
            DECRYPT: _DECRYPT_REPLY,
        },
        notes=("epsilon depends on q = 1/ceil(N/B): it reveals ceil(N/B), the record count to within a batch; "
               "set privacy.client.mode=distributed (q from the configuration) where that matters",),
    ),
    CLIENT_DP_DISTRIBUTED: ReleaseSurface(
        CLIENT_DP_DISTRIBUTED,
        {
            FIT: _fit(Field(Release.PRIVATISED, "one DP-SGD step with a noise share, only summed (secure "
                            "aggregation); each round booked in the client's ledger"), _CONSTANT_COUNT,
                      _IDENTITY, _DECLINE, _LEDGER,
                      {"noise_share_multiplier": _public("configuration")}, _NO_TRAINING_METRICS),
            DECRYPT: _DECRYPT_REPLY,
        },
    ),
}


def privacy_mode(cfg: Any) -> str:
    """The privacy mode of an :class:`~fedapp.config.ExperimentConfig` (duck-typed)."""
    client_dp, central_dp, secagg = cfg.privacy.client, cfg.privacy.central, cfg.secagg
    if client_dp.enabled:
        return CLIENT_DP_DISTRIBUTED if client_dp.mode == "distributed" else CLIENT_DP_LOCAL
    if secagg.method != "none":
        return DISTRIBUTED_DP if secagg.noise_sigma_total > 0 else SECURE_AGGREGATION
    return CENTRAL_DP if central_dp.enabled else PLAIN


def release_surface(cfg: Any) -> ReleaseSurface:
    """The declared surface of ``cfg``'s privacy mode."""
    return SURFACES[privacy_mode(cfg)]


class ReleaseRefused(RuntimeError):
    """A reply this mode never sends (e.g. federated evaluation on private records under client DP)."""


_already_said: set[tuple[str, str, str]] = set()


def _drop(surface: ReleaseSurface, kind: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without the keys ``surface`` does not let out; each drop is logged once per process."""
    kept = {}
    for key, value in metrics.items():
        if surface.sendable(kind, key):
            kept[key] = value
        elif (surface.mode, kind, key) not in _already_said:
            _already_said.add((surface.mode, kind, key))
            log(INFO, "release surface (%s): metric %r is not sent in %s replies", surface.mode, key, kind)
    return kept


def filter_fit_reply(surface: ReleaseSurface, kind: str, num_examples: int, metrics: dict[str, Any]) -> tuple[int, dict]:
    """What may leave of a fit-type reply: the declared count and the sendable metrics."""
    if kind not in surface.replies:
        raise ReleaseRefused(f"a {kind} reply is never sent under the {surface.mode} privacy mode")
    kept = _drop(surface, kind, metrics)
    if kind == DECRYPT:
        return 0, kept
    if surface.num_examples is not None:
        num_examples = 0 if int(kept.get(DECLINED_KEY, 0)) == 1 else surface.num_examples
    return num_examples, kept


NextHandler = Callable[[Message, Context], Message]


def check_encrypted(arrays: list[np.ndarray]) -> None:
    """Under Paillier an update leaves only as an encrypted vector (plus its signature): else refused here."""
    if not arrays or arrays[0].dtype != np.uint8 or not arrays[0][: len(ENCRYPTED_MAGIC)].tobytes() == ENCRYPTED_MAGIC:
        raise ReleaseRefused("secagg.method is paillier but this reply's update is not an encrypted vector: not sent")


def make_release_mod(experiment_of: Callable[[Context], Any]) -> Callable[[Message, Context, NextHandler], Message]:
    """A Flower client mod enforcing the release surface of the run's experiment on every reply.

    Put it last in ``ClientApp(mods=[...])`` so it wraps the client most
    closely: its filter is the final step before a reply leaves (SecAgg+
    masking, outside it, only masks the parameters it lets through).
    """

    def release_mod(msg: Message, context: Context, call_next: NextHandler) -> Message:
        surface = release_surface(experiment_of(context))
        message_type = msg.metadata.message_type
        if message_type == MessageType.EVALUATE and EVALUATE not in surface.replies:
            raise ReleaseRefused(
                f"federated evaluation on a client's own records is never sent under the {surface.mode} privacy "
                "mode (an exact loss leaks membership); evaluate on the server's test set"
            )
        reply = call_next(msg, context)
        if reply.has_error() or message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
            return reply
        if message_type == MessageType.EVALUATE:
            res = recorddict_to_evaluateres(reply.content)
            res.metrics = _drop(surface, EVALUATE, dict(res.metrics))
            return Message(evaluateres_to_recorddict(res), reply_to=msg)
        res = recorddict_to_fitres(reply.content, keep_input=True)
        config = msg.content.config_records.get("fitins.config", {})
        kind = DECRYPT if config.get(SECAGG_MODE) == MODE_DECRYPT else FIT
        res.num_examples, res.metrics = filter_fit_reply(surface, kind, res.num_examples, dict(res.metrics))
        if experiment_of(context).secagg.method == "paillier" and kind == FIT and not res.metrics.get(DECLINED_KEY):
            check_encrypted(parameters_to_ndarrays(res.parameters))
        return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    return release_mod
