"""The compliance report of one run: what was promised, what was spent, who was refused, and whether the record holds.

Auditors and security reviewers read this, not the code, so it states each
mechanism's guarantee *and its limits* in the same place, derives everything
from what the run store recorded (``RunStore.export``), and never claims more
than the configuration supports. ``fedapp serve`` serves it as JSON at
``/api/v1/runs/{id}/report`` (:func:`build_report`) and as a printable,
self-contained HTML document at ``/report.html`` (:func:`render_html`).

Report keys (stable; ``report_version`` changes when one changes meaning)
--------------------------------------------------------------------------
``report_version`` (int)
``generated_at`` (epoch s), ``generated_at_iso`` (ISO 8601 UTC)
``run``
    ``id``, ``name``, ``status``, ``started_at``/``ended_at`` (epoch s or null),
    ``started_at_iso``/``ended_at_iso``, ``rounds_done`` (last committed round),
    ``rounds_planned`` (``num_rounds``), ``attempts``, ``config_hash``,
    ``code_version``, ``error``, ``mode`` (simulation|processes), ``strategy``,
    ``secagg``, ``num_clients``, ``simulated_attack`` and ``simulated_faults``
    (null when none ran).
``threat_model``
    list of ``{mechanism, basis, protects, adversary, guarantee, not_covered}``:
    one per configured mechanism, always ending with the entry
    ``"Not protected by any configured mechanism"``. ``basis`` names the
    settings the entry derives from; ``not_covered`` is a list of sentences.
``privacy``
    ``client_dp`` (the configured DP-SGD settings, ``enabled`` false when off),
    ``delta`` (client DP's delta or null), ``clients``: list of ``{client,
    epsilon_spent, budget, left, within_budget, rounds_trained, rounds_declined,
    note}``, ``max_client_epsilon``, ``all_within_budget``, and ``central`` /
    ``distributed``: null when not configured, else ``{epsilon, released_epsilon,
    delta, released_rounds, superseded_releases}`` (the user-level epsilon at
    the last round of the run's lineage).
    A client's ``epsilon_spent`` is the largest epsilon any of its updates
    reported, in any attempt: ledgers are cumulative and survive a resume, and
    what an abandoned attempt spent is not refunded. ``rounds_trained`` counts
    (round, attempt) pairs in which it trained, abandoned ones included.
    ``budget`` is ``privacy.client.epsilon_budget``, else ``target_epsilon``,
    else null (no cap). ``within_budget`` is false when the spend exceeds the
    budget, and also when a client trained under client DP without reporting
    any epsilon (its spend cannot be checked); true when no cap applies.
``participants``
    one entry per effective round (``round`` >= 1): ``{round, attempt,
    participants, sampled, trained, failures, refused}``: ``sampled``,
    ``trained`` and ``failures`` are the round's ``fit_*`` metrics (null when
    not recorded), ``refused`` counts its refused, declined or quarantined updates.
``superseded_rounds``
    ``[{round, attempt}]`` of abandoned attempts (listed, never counted as participation).
``refusals``
    ``[{round, attempt, client, status, kind, reason, source, superseded}]``:
    refused/declined/quarantined updates and exclusion, quarantine, failure and
    block events, one entry per (round, client, reason) when an update and its
    event say the same thing (``source`` = ``update+event``).
``operator_actions``
    the operators' actions as given.
``audit``
    the ``AuditStatus`` dict as given.
``verdict``
    ``{audit_ok, within_budget, completed, summary}``: ``audit_ok`` is the
    audit status's ``ok``, ``within_budget`` is ``privacy.all_within_budget``,
    ``completed`` is status ``completed``; ``summary`` is one line starting
    ``PASS`` (all three true) or ``ATTENTION``.

Non-finite floats (an accountant that returned infinity) are written as the
strings ``"Infinity"``, ``"-Infinity"`` and ``"NaN"``: strict JSON has no
spelling for them, and an infinite epsilon must not vanish from the report.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fedapp.store.db import effective_rounds

__all__ = ["REFUSAL_EVENT_KINDS", "REFUSAL_UPDATE_STATUSES", "REPORT_VERSION", "build_report", "render_html"]

REPORT_VERSION = 1
NOT_PROTECTED = "Not protected by any configured mechanism"
REFUSAL_UPDATE_STATUSES = ("refused", "declined", "quarantined")
# Event kind -> what it did to the client. ``fit_failure`` is the legacy round loop's
# (client-less) failure line; the rest name the client.
REFUSAL_EVENT_KINDS: dict[str, str] = {
    "update_rejected": "refused",
    "ciphertext_rejected": "refused",
    "update_dropped": "refused",
    "client_excluded": "excluded",
    "client_quarantined": "quarantined",
    "client_failure": "failed",
    "fit_failure": "failed",
    "client_blocked": "blocked",
    "client_unblocked": "unblocked",
}
ROBUST_RULES = ("krum", "multikrum", "trimmedmean", "median")
_EPS_TOLERANCE = 1e-9  # relative: an accountant's float noise is not an overspend


# --------------------------------------------------------------------------- small helpers


def _get(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; the default where a level is missing (old or hand-made configs)."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _positive(value: Any) -> float | None:
    """A configured number, or None where 0 (or absent) means "not set"."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _iso(epoch: float | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``: auditors compare times across time zones."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(float(epoch), tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _client_key(label: str) -> tuple[int, int, str]:
    """Numeric labels in numeric order ("2" before "10"), other labels after them."""
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _count(metrics: dict[str, Any], key: str) -> int | None:
    value = _float(metrics.get(key))
    return None if value is None or math.isnan(value) else int(value)


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by their proto3-JSON strings, recursively (see the module docstring)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------- run facts


def _run_facts(run: dict[str, Any]) -> dict[str, Any]:
    """Who, what and when: the facts an auditor cites the report by."""
    config = run.get("config") or {}
    attack = _get(config, "attack.name", "none")
    faults = _get(config, "faults.kind", "none")
    return {
        "id": run.get("run_id"),
        "name": run.get("name"),
        "status": run.get("status"),
        "started_at": run.get("started_at"),
        "started_at_iso": _iso(run.get("started_at")),
        "ended_at": run.get("ended_at"),
        "ended_at_iso": _iso(run.get("ended_at")),
        "rounds_done": run.get("last_round", 0),
        "rounds_planned": config.get("num_rounds"),
        "attempts": run.get("attempt", 1),
        "config_hash": run.get("config_hash"),
        "code_version": run.get("code_version"),
        "error": run.get("error"),
        "mode": _get(config, "runtime.mode"),
        "strategy": _get(config, "strategy.name"),
        "secagg": _get(config, "secagg.method", "none"),
        "num_clients": _get(config, "partition.num_clients"),
        "simulated_attack": None if attack in (None, "none") else attack,
        "simulated_faults": None if faults in (None, "none") else faults,
    }


# --------------------------------------------------------------------------- threat model


@dataclass(frozen=True)
class _Threat:
    """One row of the threat model; kept as a type so that no entry can omit a column."""

    mechanism: str
    basis: str
    protects: str
    adversary: str
    guarantee: str
    not_covered: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism, "basis": self.basis, "protects": self.protects,
            "adversary": self.adversary, "guarantee": self.guarantee, "not_covered": list(self.not_covered),
        }


def _client_budget(config: dict[str, Any]) -> float | None:
    """Where a DP-SGD client stops: ``epsilon_budget``, else ``target_epsilon``, else no cap."""
    return _positive(_get(config, "privacy.client.epsilon_budget")) or _positive(
        _get(config, "privacy.client.target_epsilon")
    )


def _dp_on(config: dict[str, Any]) -> bool:
    return bool(
        _get(config, "privacy.client.enabled") or _get(config, "privacy.central.enabled")
        or _positive(_get(config, "secagg.noise_sigma_total"))
    )


def _paillier_key_mode(config: dict[str, Any]) -> str:
    """``threshold``, ``single`` or ``unknown``.

    The key mode is a property of the key folder, not of the config, so a
    report must not guess it. It is known when the config records it
    (``secagg.key_mode``, or ``secagg.threshold`` = t: 1 means any single key
    holder decrypts), or when any DP mode is on: start-up refuses a single key
    pair under DP (``fedapp.components.check_paillier_keys``).
    """
    mode = str(_get(config, "secagg.key_mode", "") or "").lower()
    if mode in ("threshold", "single"):
        return mode
    t = _get(config, "secagg.threshold")
    if isinstance(t, int) and not isinstance(t, bool) and t >= 1:
        return "threshold" if t >= 2 else "single"
    return "threshold" if _dp_on(config) else "unknown"


def _threshold_text(config: dict[str, Any]) -> tuple[str, str]:
    """(t, t - 1) as text: numbers when the config records t, symbols otherwise."""
    t = _get(config, "secagg.threshold")
    if isinstance(t, int) and not isinstance(t, bool) and t >= 2:
        return str(t), str(t - 1)
    return "t", "t - 1"


def _t_meaning(config: dict[str, Any]) -> str:
    """What t is, with its value where the config records it (it is fixed when the keys are dealt)."""
    t, _ = _threshold_text(config)
    if t == "t":
        return "t = key shares needed to decrypt, fixed when the keys were dealt and not recorded in the config"
    return f"t = {t} key shares needed to decrypt"


def _participation_limit() -> str:
    return (
        "Does not hide participation: the server sees which clients took part in which round, message sizes "
        "and timing."
    )


def _flwr_run_limit() -> str:
    return (
        "Under `flwr run` the ClientApp code and the run configuration (noise multiplier, target epsilon, "
        "learning rate) come from whoever submits the run; the guarantee assumes SuperNodes run fedapp's own "
        "code with their privacy mode pinned in the node configuration."
    )


def _sum_leaks(config: dict[str, Any]) -> list[str]:
    """What a revealed sum leaks when no DP entry covers it (secure aggregation alone is not DP)."""
    if _dp_on(config):
        return []
    return [
        "Differencing over rounds: the sum is revealed every round, so a client present in one round and absent "
        "in the next leaks roughly its update.",
        "Secure aggregation is not differential privacy: the revealed sum itself may reveal training data.",
    ]


def _local_dp_threat(config: dict[str, Any]) -> _Threat:
    delta = _get(config, "privacy.client.delta")
    budget = _client_budget(config)
    sigma = _positive(_get(config, "privacy.client.noise_multiplier"))
    cap = (
        f"per-client cap epsilon = {budget:g}" if budget is not None
        else f"no cap: each client's epsilon is what its ledger booked at noise multiplier {sigma or '?'}"
    )
    return _Threat(
        mechanism="Client-side DP-SGD (local differential privacy of records)",
        basis="privacy.client (enabled, mode=local)",
        protects="Each individual training record of each client (record-level privacy).",
        adversary=(
            "Anyone who sees a client's updates or any released model: the server (honest-but-curious or "
            "malicious), the network, other clients and any coalition of them. Only the client itself is trusted "
            "to clip and add its noise."
        ),
        guarantee=(
            f"(epsilon, delta)-DP per record, per client, cumulative over every round the client trained in "
            f"(delta = {delta}; {cap})"
            + ("; a client declines, explicitly, a round that would take it past its cap." if budget else ".")
        ),
        not_covered=[
            "No user-level guarantee: a client's data as a whole is not protected, only each record.",
            _participation_limit() + " Sample counts are hidden only because every client reports the constant "
            "count 1 (release surface).",
            "The sample rate is 1 / ceil(N / B), so the published epsilon reveals a client's record count to "
            "within one batch.",
            "Each epsilon comes from the client's own ledger; the server cannot verify that a client added its "
            "noise.",
            "Noise is drawn from torch's generator seeded by the operating system, not from a CSPRNG.",
            "The privacy cost of choosing hyperparameters (e.g. on the test set) is not accounted.",
            _flwr_run_limit(),
        ],
    )


def _fedsgd_threat(config: dict[str, Any]) -> _Threat:
    method = _get(config, "secagg.method", "none")
    m = _get(config, "secagg.min_contributors", "m")
    delta = _get(config, "privacy.client.delta")
    budget = _client_budget(config)
    t, t_minus_1 = _threshold_text(config)
    server = (
        "the server (honest-but-curious or malicious)" if method == "paillier"
        else "an honest-but-curious server (Flower's SecAgg+ has no PKI and no consistency round)"
    )
    return _Threat(
        mechanism=f"Distributed DP-FedSGD (record-level DP, noise in shares under {method})",
        basis="privacy.client (enabled, mode=distributed), secagg.min_contributors",
        protects="Each individual training record of each client (record-level privacy) in every released sum.",
        adversary=(
            f"{server[0].upper()}{server[1:]} together with at most one colluding client; no sum of fewer than "
            f"m = {m} updates is released, and any m - 1 noise shares carry the full noise"
            + (f"; at most {t_minus_1} colluding key-share holders in total ({_t_meaning(config)})."
               if method == "paillier" else ".")
        ),
        guarantee=(
            f"(epsilon, delta)-DP per record, per client, cumulative over the run (delta = {delta}"
            + (f"; per-client cap epsilon = {budget:g}" if budget is not None else "")
            + "), provided every released sum holds at least m - 1 honest noise shares."
        ),
        not_covered=[
            "c >= 2 colluding clients remove their shares: the noise left is sigma * sqrt((m - c) / (m - 1)).",
            (f"{t} or more colluding key-share holders decrypt single uploads, each carrying only its own noise "
             "share sigma / sqrt(m - 1)." if method == "paillier"
             else "A malicious server could substitute relayed keys or report inconsistent dropouts (SecAgg+)."),
            "Assumes every client adds its share; a client that omits it weakens the others' guarantee, "
            "undetectably.",
            "Shares are added before fixed-point rounding and analysed as the continuous Gaussian mechanism "
            "(the distributed discrete Gaussian is not implemented); clamped coordinates are not covered.",
            _participation_limit() + " Reply latency grows with the Poisson sample size.",
            _flwr_run_limit(),
        ],
    )


def _central_dp_threat(config: dict[str, Any]) -> _Threat:
    delta = _get(config, "privacy.central.delta")
    return _Threat(
        mechanism="Central DP (user-level, applied by the server)",
        basis="privacy.central (enabled, noise_multiplier, clipping_norm)",
        protects="Each client's whole contribution (user-level privacy) in the released global models.",
        adversary=(
            "Anyone who sees only the released models. The server is TRUSTED: it sees every update in the clear "
            "and applies the clipping and the noise itself."
        ),
        guarantee=(
            f"(epsilon, delta)-DP per client (user-level), cumulative over the run, delta = {delta}, accounted "
            "with client sampling q = clients per round / clients (final epsilon under Privacy)."
        ),
        not_covered=[
            "No protection against the server, or anyone with its memory, logs or the individual updates.",
            "Sampling amplification assumes the server samples clients at random as configured; a server "
            "that chooses them is not bound by it.",
            _participation_limit(),
        ],
    )


def _distributed_dp_threat(config: dict[str, Any]) -> _Threat:
    delta = _get(config, "secagg.noise_delta")
    t, _ = _threshold_text(config)
    return _Threat(
        mechanism="Distributed DP (user-level noise shares under Paillier)",
        basis="secagg.noise_sigma_total, secagg.clip_norm, secagg.noise_delta",
        protects="Each client's whole update (user-level privacy) in every decrypted sum.",
        adversary=(
            "An honest-but-curious server that sees only the noisy sum and chooses the clients (central_epsilon, "
            "no sampling amplification); released_epsilon is against whoever sees only the released models."
        ),
        guarantee=(
            f"(epsilon, delta)-DP per client (user-level), cumulative over the released rounds, delta = {delta}, "
            "booked with the number of contributors actually in each sum."
        ),
        not_covered=[
            "A decryptor knows its own share: against it the noise is sigma * sqrt((k - 1) / n).",
            f"Colluding clients remove their shares; {t} or more colluding key-share holders decrypt single "
            "uploads, each carrying only its own share sigma / sqrt(n).",
            "Assumes every client adds its share; an omitted share is undetectable.",
            "Noise is added before fixed-point rounding and analysed as the continuous Gaussian; coordinates "
            "clamped to the fixed-point bound are not covered.",
            _participation_limit(),
        ],
    )


def _paillier_threat(config: dict[str, Any]) -> _Threat:
    mode = _paillier_key_mode(config)
    m = _get(config, "secagg.min_contributors", "m")
    decryptors = _get(config, "secagg.decryptors", 2)
    t, t_minus_1 = _threshold_text(config)
    common = [
        "Malicious clients: a client may encrypt any plaintext and move the sum arbitrarily; robust rules and "
        "the anomaly detector cannot run on ciphertexts.",
        *_sum_leaks(config),
        _participation_limit(),
    ]
    if mode == "threshold":
        return _Threat(
            mechanism="Paillier secure aggregation (threshold keys)",
            basis="secagg.method=paillier, secagg.min_contributors, secagg.decryptors, dealt threshold keys",
            protects="Each client's individual update: the server sees only decrypted sums of signed updates.",
            adversary=(
                f"The server, honest-but-curious or malicious, with up to {t_minus_1} colluding clients "
                f"({_t_meaning(config)}; the server holds the public key only)."
            ),
            guarantee=(
                f"Confidentiality of individual updates: only sums of at least m = {m} distinct enrolled, signed "
                "updates are decrypted; relabelled, padded, replayed or second sums are refused by the decryptors."
            ),
            not_covered=[
                f"{t} or more colluding key-share holders decrypt every upload; a leaked set of {t} shares "
                "exposes every recorded ciphertext (no forward secrecy).",
                "Two disjoint groups of decryptors could each release a different sum in one round when 2t <= l "
                "and m < l (warned at start-up).",
                "Partial decryptions carry no correctness proof: a crafted shift of the sum is not detected.",
                *common,
            ],
        )
    if mode == "single":
        return _Threat(
            mechanism="Paillier secure aggregation (single key pair)",
            basis="secagg.method=paillier, secagg.decryptors, single-key folder",
            protects="Each client's individual update, from the server alone.",
            adversary=(
                "An honest-but-curious server that colludes with no client. Every client holds the whole private "
                f"key, so each decryptor is TRUSTED ({decryptors} asked per round"
                + ("; its answer is taken without a cross-check" if decryptors == 1 else "") + ")."
            ),
            guarantee="Individual updates are hidden from the server only while no client colludes with it.",
            not_covered=[
                "The server plus any one client decrypts every upload; a decryptor sees the plain sum.",
                *common,
            ],
        )
    return _Threat(
        mechanism="Paillier secure aggregation (key mode not recorded)",
        basis="secagg.method=paillier; the key folder's kind is not in the run's config",
        protects="Each client's individual update, under the key mode actually dealt.",
        adversary=(
            f"With dealt threshold keys: the server plus up to t - 1 colluding clients. With a single key pair "
            f"(`fedapp.keys generate`) every client holds the whole private key, so every decryptor is TRUSTED "
            f"({decryptors} asked per round)."
        ),
        guarantee=(
            f"Only sums of at least m = {m} updates are decrypted (threshold keys); nothing against a colluding "
            "client (single key). Verify which keys were dealt before relying on this entry."
        ),
        not_covered=["The report cannot tell which key mode was used; assume the weaker (single key).", *common],
    )


def _secaggplus_threat(config: dict[str, Any]) -> _Threat:
    shares = _get(config, "secagg.num_shares", 1.0)
    threshold = _get(config, "secagg.reconstruction_threshold", 0.7)
    return _Threat(
        mechanism="SecAgg+ secure aggregation (Flower)",
        basis="secagg.method=secaggplus, secagg.num_shares, secagg.reconstruction_threshold",
        protects="Each client's individual (quantised, clipped) parameters: the server unmasks only their sum.",
        adversary=(
            "An honest-but-curious server, with fewer colluding neighbours than the reconstruction threshold "
            f"(num_shares = {shares}, threshold = {threshold}); no shared key, so one colluding client reveals "
            "nothing."
        ),
        guarantee=(
            "Confidentiality of individual updates against that adversary, with dropouts tolerated up to "
            "num_shares - threshold per neighbourhood."
        ),
        not_covered=[
            "A malicious server could substitute the relayed public keys or report different dropout sets to "
            "different clients (no PKI, no consistency round in Flower's implementation).",
            "Malicious clients may move the sum arbitrarily; robust rules and the anomaly detector are refused.",
            *_sum_leaks(config),
            _participation_limit(),
        ],
    )


def _validation_threat(config: dict[str, Any]) -> _Threat:
    method = _get(config, "secagg.method", "none")
    checks = ["array count, shapes, dtypes and finiteness"]
    absolute = _positive(_get(config, "validation.max_update_norm", 1000.0))
    relative = _positive(_get(config, "validation.relative_norm_bound", 10.0))
    max_examples = _positive(_get(config, "validation.max_num_examples"))
    off: list[str] = []
    checks.append(f"update L2 norm <= {absolute:g}" if absolute else "no absolute norm bound")
    checks.append(f"norm <= {relative:g} x the round's lower-median norm" if relative else "no relative norm bound")
    if _get(config, "validation.replay_check", True):
        checks.append("replayed updates")
    else:
        off.append("Replay check is off: a client may resend an earlier update.")
    if max_examples:
        checks.append(f"claimed sample count <= {max_examples:g}")
    if not absolute and not relative:
        off.append("Both norm bounds are off: a finite but absurd update passes.")
    if method != "none":
        off.insert(0, (
            f"OFF for individual updates under secure aggregation ({method}): the server cannot inspect an "
            "encrypted or masked update; only the client's own clip bounds it, and a malicious client can skip it."
            + (" Ciphertexts are still checked for form, round, layout, replay and signature."
               if method == "paillier" else "")
        ))
    return _Threat(
        mechanism="Update validation (always on)",
        basis="validation.*",
        protects="The global model against malformed or absurd client updates.",
        adversary="Any client, or whoever controls its node, sending arbitrary bytes.",
        guarantee="No plain update that fails a check is aggregated; each refusal is recorded with its reason. "
        "Checks: " + "; ".join(checks) + ".",
        not_covered=[
            *off,
            "Well-formed poisoning within the bounds (label flipping, small shifts inside the honest spread) passes.",
        ],
    )


def _rules_in_force(config: dict[str, Any], actions: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(rule, first round) for the config's rule and every applied ``set_rule`` switch, in order."""
    rules = [(str(_get(config, "strategy.name", "fedavg")), 1)]
    for action in actions:
        if action.get("action") == "set_rule" and action.get("status") == "applied":
            rule = (action.get("params") or {}).get("rule")
            if rule:
                rules.append((str(rule), int(action.get("effective_round") or 0)))
    return rules


def _robust_rule_threat(config: dict[str, Any], rules: list[tuple[str, int]]) -> _Threat | None:
    robust = [(rule, start) for rule, start in rules if rule in ROBUST_RULES]
    if not robust:
        return None
    f = int(_get(config, "strategy.num_malicious", 0) or 0)
    how = {
        "krum": "selects the single update closest to its neighbours; needs n > 2f + 2 clients per round",
        "multikrum": (f"averages the {_get(config, 'strategy.num_clients_to_keep', 'm')} updates with the best "
                      "Krum scores; needs n > 2f + 2 clients per round"),
        "trimmedmean": f"drops the {_get(config, 'strategy.beta', 0.2)} fraction of largest and smallest values "
                       "per coordinate",
        "median": "takes the coordinate-wise median (breaks down at half the clients)",
    }
    in_force = "; ".join(f"{rule} from round {start}: {how[rule]}" for rule, start in robust)
    not_covered = [
        f"More than f = {f} Byzantine clients in a round (strategy.num_malicious).",
        "The rule bounds the influence of malicious updates; it does not certify the model: attacks inside "
        "the honest spread (e.g. ALIE) pass, and on non-IID data honest information is discarded too.",
        "It does not identify or exclude the malicious clients.",
    ]
    if f == 0:
        not_covered.insert(0, "Configured with f = 0: the rule's guarantee covers no Byzantine client at all.")
    if len(rules) > len(robust):
        not_covered.append("Rounds aggregated under a non-robust rule in this run have no such bound.")
    return _Threat(
        mechanism="Robust aggregation rule (" + ", ".join(rule for rule, _ in robust) + ")",
        basis="strategy.name, strategy.num_malicious, applied set_rule actions",
        protects="The global model against poisoned updates from a bounded number of clients.",
        adversary=f"Up to f = {f} malicious clients per round, colluding, with any strategy.",
        guarantee=f"Statistical robustness up to f Byzantine clients per round: {in_force}.",
        not_covered=not_covered,
    )


def _detector_threat(config: dict[str, Any]) -> _Threat:
    d = lambda key, default: _get(config, f"defense.{key}", default)  # noqa: E731 - local shorthand
    drop = "flagged updates are left out of the round's aggregate" if d("drop_flagged", True) else (
        "flagged updates are still aggregated (drop_flagged = false)")
    release = d("release_after", 5)
    return _Threat(
        mechanism="Anomaly detection and quarantine",
        basis="defense.name=detect, defense.*",
        protects="The global model, by leaving out updates and clients that stand out statistically.",
        adversary="Malicious clients whose updates differ measurably from the honest ones.",
        guarantee=(
            f"Heuristic, no formal bound: a client is flagged when a robust z-score (norm, cosine to the median "
            f"update, Krum score) exceeds {d('threshold', 3.0)}; {drop}; below reputation "
            f"{d('quarantine_below', 0.4)} it is quarantined"
            + (f" and released on probation after {release} rounds." if release else " for the rest of the run.")
        ),
        not_covered=[
            "Attackers that stay inside the honest spread (e.g. ALIE) are not detected.",
            "Honest clients with unusual (non-IID) data can be flagged and quarantined.",
            "A released client may attack again; a majority of attackers shifts the reference itself.",
        ],
    )


def _audit_threat(config: dict[str, Any], audit: dict[str, Any]) -> _Threat:
    signed = bool(audit.get("signed")) or bool(_get(config, "store.audit_key"))
    limits = [
        "Entries never written: a server that records falsehoods from the start writes a consistent chain.",
        "Entries after the last recorded head can be cut or forged undetected.",
        "A rollback to an older genuine state is caught only by a later head recorded elsewhere.",
        "This report's tables are read from the store's rows; the chain vouches for the decisions it recorded, "
        "and the report does not cross-check each row against it.",
    ]
    if signed:
        adversary = ("Anyone with write access to the output folder or the database (an insider, a compromised "
                     "server host) who does not hold the operator's Ed25519 signing key.")
        limits.insert(0, "A holder of the signing key who rewrites the chain and every place its head is recorded.")
        if not audit.get("checked_signature"):
            limits.insert(1, "The head's signature was not checked against a pinned public key for this report.")
    else:
        adversary = ("Anyone with write access to the output folder who cannot also rewrite the database row "
                     "and every checkpoint that record the chain's head.")
        limits.insert(0, "Unsigned: an adversary who rewrites the log, the database row and the checkpoints "
                         "together forges a consistent history undetectably.")
    return _Threat(
        mechanism="Audit chain (" + ("signed with the operator's key" if signed else "unsigned") + ")",
        basis="store.audit_key; the audit status below",
        protects="The integrity of the run's record of decisions: refusals, quarantines, privacy spends, "
                 "aggregations, checkpoints, operator actions.",
        adversary=adversary,
        guarantee="Tamper-evident, not tamper-proof: an edited, inserted, deleted or reordered entry, or a cut "
                  "tail, is detected when the chain is verified against its recorded heads.",
        not_covered=limits,
    )


def _unprotected(config: dict[str, Any], rules: list[tuple[str, int]]) -> _Threat:
    """What no configured mechanism covers; always present, so silence is never read as protection."""
    method = _get(config, "secagg.method", "none")
    items: list[str] = []
    if not _dp_on(config):
        items.append("No differential privacy: there is no (epsilon, delta) guarantee for any record or client; "
                     "the released models can reveal training data (membership inference, reconstruction).")
    if method == "none":
        items.append("Individual updates are visible to the server in the clear.")
    items.append("Who took part in each round, message sizes and timing are visible to the server in every mode.")
    robust = any(rule in ROBUST_RULES for rule, _ in rules)
    if not robust and _get(config, "defense.name", "none") != "detect":
        bound = ("without any server-side bound (secure aggregation hides the update)" if method != "none"
                 else "as far as update validation's norm bounds allow")
        items.append(f"Byzantine clients: under {rules[-1][0]} one malicious client moves the aggregate {bound}.")
    if _get(config, "runtime.mode") == "simulation":
        items.append("Simulation: every party runs on one machine under one operator; the separation between "
                     "server and clients that the mechanisms assume is modelled, not enforced.")
    elif not _get(config, "runtime.tls", False):
        items.append("runtime.tls is off: traffic between the SuperLink and the SuperNodes is not encrypted in "
                     "transit.")
    items.append("Code provenance: every guarantee above assumes the SuperNodes run fedapp's own ClientApp; under "
                 "`flwr run` its code (the FAB) comes from whoever submits the run.")
    return _Threat(
        mechanism=NOT_PROTECTED,
        basis="the whole configuration",
        protects="-",
        adversary="-",
        guarantee="None.",
        not_covered=items,
    )


def _threat_model(config: dict[str, Any], audit: dict[str, Any], actions: list[dict[str, Any]]) -> list[dict]:
    """One entry per mechanism the config turns on, then validation, audit and the unprotected remainder."""
    entries: list[_Threat] = []
    if _get(config, "privacy.client.enabled"):
        distributed = _get(config, "privacy.client.mode", "local") == "distributed"
        entries.append(_fedsgd_threat(config) if distributed else _local_dp_threat(config))
    if _get(config, "privacy.central.enabled"):
        entries.append(_central_dp_threat(config))
    if _positive(_get(config, "secagg.noise_sigma_total")):
        entries.append(_distributed_dp_threat(config))
    method = _get(config, "secagg.method", "none")
    if method == "paillier":
        entries.append(_paillier_threat(config))
    elif method == "secaggplus":
        entries.append(_secaggplus_threat(config))
    entries.append(_validation_threat(config))
    rules = _rules_in_force(config, actions)
    robust = _robust_rule_threat(config, rules)
    if robust is not None:
        entries.append(robust)
    if _get(config, "defense.name", "none") == "detect":
        entries.append(_detector_threat(config))
    entries.append(_audit_threat(config, audit))
    entries.append(_unprotected(config, rules))
    return [e.as_dict() for e in entries]


# --------------------------------------------------------------------------- rounds and lineage


@dataclass(frozen=True)
class _RoundKey:
    """What :func:`effective_rounds` reads of a round, pointing back at the exported dict."""

    round: int
    attempt: int
    row: int


def _lineage(rounds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(effective, superseded) round dicts, using the store's own rule so the two can never disagree."""
    keys = [_RoundKey(int(r["round"]), int(r["attempt"]), i) for i, r in enumerate(rounds)]
    kept = {k.row for k in effective_rounds(keys)}  # type: ignore[arg-type] - reads only .round and .attempt
    effective = [rounds[k.row] for k in sorted(keys, key=lambda k: k.round) if k.row in kept]
    superseded = [rounds[k.row] for k in sorted(keys, key=lambda k: (k.round, k.attempt)) if k.row not in kept]
    return effective, superseded


def _participants(effective: list[dict[str, Any]], updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Who took part in each round of the lineage, with the round's own counts (round 0 only evaluates)."""
    refused: dict[tuple[int, int], int] = {}
    for u in updates:
        if u.get("status") in REFUSAL_UPDATE_STATUSES:
            key = (int(u["round"]), int(u["attempt"]))
            refused[key] = refused.get(key, 0) + 1
    out = []
    for r in effective:
        if int(r["round"]) < 1:
            continue
        metrics = r.get("metrics") or {}
        out.append({
            "round": int(r["round"]),
            "attempt": int(r["attempt"]),
            "participants": sorted((str(p) for p in r.get("participants") or []), key=_client_key),
            "sampled": _count(metrics, "fit_sampled"),
            "trained": _count(metrics, "fit_trained"),
            "failures": _count(metrics, "fit_failures"),
            "refused": refused.get((int(r["round"]), int(r["attempt"])), 0),
        })
    return out


# --------------------------------------------------------------------------- privacy


def _client_privacy(client: str, updates: list[dict[str, Any]], budget: float | None, dp: bool) -> dict[str, Any]:
    """One client's spend. Every attempt counts: a ledger is cumulative and an abandoned round is not refunded."""
    epsilons = [e for e in (_float(u.get("epsilon")) for u in updates) if e is not None]
    spent = max(epsilons) if epsilons else None
    trained = {(u["round"], u["attempt"]) for u in updates if u.get("status") != "declined"}
    declined = {(u["round"], u["attempt"]) for u in updates if u.get("status") == "declined"}
    note = ""
    if not dp:
        within, note = True, "no client DP in this run"
    elif spent is None:
        within = not trained
        note = "trained without reporting epsilon: spend unverifiable" if trained else "never trained"
    elif budget is None:
        within, note = True, "no budget set"
    else:
        within = not math.isnan(spent) and spent <= budget * (1 + _EPS_TOLERANCE)
    left = None if spent is None or budget is None else budget - spent
    return {
        "client": client, "epsilon_spent": spent, "budget": budget if dp else None,
        "left": left if dp else None, "within_budget": within,
        "rounds_trained": len(trained), "rounds_declined": len(declined), "note": note,
    }


def _user_level(
    effective: list[dict[str, Any]], superseded: list[dict[str, Any]], mode: str, delta: Any
) -> dict[str, Any]:
    """The user-level epsilon of one mechanism (central or distributed) at the end of the lineage.

    Round rows name their mechanism in ``dp_mode``; a row without it belongs to
    the configured one. Releases of abandoned attempts are counted, not
    composed: the resumed accountant restarted from its checkpoint.
    """
    def mine(row: dict[str, Any]) -> bool:
        metrics = row.get("metrics") or {}
        return metrics.get("central_epsilon") is not None and metrics.get("dp_mode", mode) == mode

    rows = [r["metrics"] for r in effective if mine(r)]
    return {
        "epsilon": _float(rows[-1]["central_epsilon"]) if rows else None,
        "released_epsilon": next(
            (_float(m["released_epsilon"]) for m in reversed(rows) if m.get("released_epsilon") is not None), None
        ),
        "delta": delta,
        "released_rounds": len(rows),
        "superseded_releases": sum(1 for r in superseded if mine(r)),
    }


def _privacy(
    config: dict[str, Any], updates: list[dict[str, Any]], effective: list[dict[str, Any]],
    superseded: list[dict[str, Any]],
) -> dict[str, Any]:
    dp = bool(_get(config, "privacy.client.enabled"))
    budget = _client_budget(config) if dp else None
    by_client: dict[str, list[dict[str, Any]]] = {}
    for u in updates:
        by_client.setdefault(str(u["client"]), []).append(u)
    clients = [_client_privacy(c, by_client[c], budget, dp) for c in sorted(by_client, key=_client_key)]
    spent = [c["epsilon_spent"] for c in clients if c["epsilon_spent"] is not None]
    central_on = bool(_get(config, "privacy.central.enabled"))
    distributed_on = bool(_positive(_get(config, "secagg.noise_sigma_total")))
    return {
        "client_dp": {
            "enabled": dp,
            "mode": _get(config, "privacy.client.mode", "local") if dp else None,
            "delta": _get(config, "privacy.client.delta") if dp else None,
            "epsilon_budget": budget,
            "target_epsilon": _positive(_get(config, "privacy.client.target_epsilon")) if dp else None,
            "noise_multiplier": _positive(_get(config, "privacy.client.noise_multiplier")) if dp else None,
            "accountant": _get(config, "privacy.client.accountant") if dp else None,
        },
        "delta": _get(config, "privacy.client.delta") if dp else None,
        "clients": clients,
        "max_client_epsilon": max(spent) if spent else None,
        "all_within_budget": all(c["within_budget"] for c in clients),
        "central": _user_level(effective, superseded, "central", _get(config, "privacy.central.delta"))
        if central_on else None,
        "distributed": _user_level(effective, superseded, "distributed", _get(config, "secagg.noise_delta"))
        if distributed_on else None,
    }


# --------------------------------------------------------------------------- refusals


def _event_attempt(event: dict[str, Any], rounds: list[dict[str, Any]]) -> int | None:
    """The attempt an event belongs to: its own field, else the round record whose run it fell in.

    Events carry no attempt column; a round run twice has two records, and the
    event's time falls after the start of the one that wrote it.
    """
    fields = event.get("fields") or {}
    if isinstance(fields.get("attempt"), int):
        return int(fields["attempt"])
    if event.get("round") is None:
        return None
    same = [r for r in rounds if int(r["round"]) == int(event["round"])]
    started = [r for r in same if _float(r.get("started_at")) is not None
               and float(r["started_at"]) <= float(event.get("time") or 0.0)]
    if started:
        return int(max(started, key=lambda r: float(r["started_at"]))["attempt"])
    return int(same[0]["attempt"]) if len(same) == 1 else None


def _update_refusals(updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "round": int(u["round"]), "attempt": int(u["attempt"]), "client": str(u["client"]),
            "status": u["status"], "kind": f"update_{u['status']}", "reason": str(u.get("reason") or ""),
            "source": "update",
        }
        for u in updates if u.get("status") in REFUSAL_UPDATE_STATUSES
    ]


def _event_refusal(event: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    client = (event.get("fields") or {}).get("client")
    return {
        "round": int(event.get("round") or 0), "attempt": _event_attempt(event, rounds),
        "client": None if client is None else str(client), "status": REFUSAL_EVENT_KINDS[event["kind"]],
        "kind": event["kind"], "reason": str(event.get("reason") or ""), "source": "event",
    }


def _merge(entries: list[dict[str, Any]], found: dict[str, Any]) -> bool:
    """Fold an event into the update entry that records the same decision; False when there is none."""
    for entry in entries:
        same = (entry["round"], entry["client"], entry["reason"]) == (found["round"], found["client"], found["reason"])
        if same and entry["source"] == "update" and found["attempt"] in (None, entry["attempt"]):
            entry["source"], entry["kind"] = "update+event", found["kind"]
            return True
    return False


def _refusals(
    updates: list[dict[str, Any]], events: list[dict[str, Any]], rounds: list[dict[str, Any]],
    effective: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Every refusal, exclusion, failure and block, once each, marked when it belongs to an abandoned attempt."""
    entries = _update_refusals(updates)
    for event in events:
        if event.get("kind") in REFUSAL_EVENT_KINDS:
            found = _event_refusal(event, rounds)
            if not _merge(entries, found):
                entries.append(found)
    lineage = {(int(r["round"]), int(r["attempt"])) for r in effective}
    for entry in entries:
        entry["superseded"] = None if entry["attempt"] is None else (entry["round"], entry["attempt"]) not in lineage
    return sorted(entries, key=lambda e: (e["round"], e["attempt"] or 0, _client_key(e["client"] or ""), e["kind"]))


# --------------------------------------------------------------------------- verdict and assembly


def _verdict(run: dict[str, Any], privacy: dict[str, Any], audit: dict[str, Any], config: dict[str, Any]) -> dict:
    audit_ok = bool(audit.get("ok"))
    within = bool(privacy["all_within_budget"])
    completed = run.get("status") == "completed"
    return {
        "audit_ok": audit_ok,
        "within_budget": within,
        "completed": completed,
        "summary": _summary(run, privacy, audit_ok, within, completed, config),
    }


def _summary(
    run: dict[str, Any], privacy: dict[str, Any], audit_ok: bool, within: bool, completed: bool,
    config: dict[str, Any],
) -> str:
    """One line a reviewer can quote: the overall outcome first, then each of its three parts."""
    done, planned = run.get("last_round", 0), config.get("num_rounds")
    parts = [
        f"run {run.get('status')} after {done}/{planned if planned is not None else '?'} rounds",
        "audit chain verified" if audit_ok else "audit chain FAILED verification",
    ]
    failing = [c for c in privacy["clients"] if not c["within_budget"]]
    over = [c["client"] for c in failing if c["epsilon_spent"] is not None]
    unverifiable = [c["client"] for c in failing if c["epsilon_spent"] is None]
    if not privacy["client_dp"]["enabled"]:
        parts.append("no client DP" + ("" if _dp_on(config) else ": no DP guarantee"))
    elif failing:
        parts += [f"{len(labels)} client(s) {what}: {_some(labels)}"
                  for labels, what in ((over, "over the epsilon budget"), (unverifiable, "with unverifiable spend"))
                  if labels]
    else:
        top = privacy["max_client_epsilon"]
        cap = privacy["client_dp"]["epsilon_budget"]
        parts.append("all clients within budget"
                     + (f" (max epsilon {top:.4g} of {cap:g})" if top is not None and cap is not None else ""))
    for name in ("central", "distributed"):
        level = privacy[name]
        if level is not None:
            eps = level["epsilon"]
            parts.append(f"{name} DP epsilon " + (f"{eps:.4g}" if eps is not None else "not recorded"))
    outcome = "PASS" if audit_ok and within and completed else "ATTENTION"
    return f"{outcome}: " + "; ".join(parts) + "."


def _some(labels: list[str], limit: int = 5) -> str:
    """A few client labels for a one-line summary, and how many more there are."""
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def build_report(
    export: dict[str, Any],
    *,
    audit: dict[str, Any],
    actions: list[dict[str, Any]] | None = None,
    generated_at: float | None = None,
) -> dict[str, Any]:
    """The compliance report of one run as JSON-ready data (keys: see the module docstring).

    Pure: reads only its arguments, so the API, the CLI and the tests build the
    same report from the same export; ``generated_at`` defaults to now.
    """
    run = export.get("run") or {}
    config = run.get("config") or {}
    rounds = list(export.get("rounds") or [])
    updates = list(export.get("updates") or [])
    actions = [dict(a) for a in (actions or [])]
    effective, superseded = _lineage(rounds)
    privacy = _privacy(config, updates, effective, superseded)
    stamp = time.time() if generated_at is None else float(generated_at)
    report = {
        "report_version": REPORT_VERSION,
        "generated_at": stamp,
        "generated_at_iso": _iso(stamp),
        "run": _run_facts(run),
        "threat_model": _threat_model(config, audit, actions),
        "privacy": privacy,
        "participants": _participants(effective, updates),
        "superseded_rounds": [{"round": int(r["round"]), "attempt": int(r["attempt"])} for r in superseded],
        "refusals": _refusals(updates, list(export.get("events") or []), rounds, effective),
        "operator_actions": actions,
        "audit": dict(audit),
        "verdict": _verdict(run, privacy, audit, config),
    }
    return _json_safe(report)


# --------------------------------------------------------------------------- HTML


_CSS = """
@page { size: A4; margin: 16mm 14mm 18mm 14mm; }
* { box-sizing: border-box; }
body { font: 10.5pt/1.45 "Helvetica Neue", Arial, "Liberation Sans", sans-serif; color: #1c2430;
       margin: 0 auto; max-width: 1100px; padding: 28px 32px; background: #fff; }
header { border-bottom: 3px solid #1f3b5c; padding-bottom: 10px; margin-bottom: 18px; }
header .kicker { font-size: 9pt; letter-spacing: .12em; text-transform: uppercase; color: #56657a; }
h1 { font-size: 20pt; margin: 2px 0 4px; color: #1f3b5c; }
header .sub { color: #3b4858; font-size: 10pt; }
h2 { font-size: 13pt; color: #1f3b5c; border-bottom: 1px solid #c9d2dd; padding-bottom: 3px; margin: 26px 0 10px; }
p.note { color: #56657a; font-size: 9pt; margin: 4px 0 8px; }
code, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 9pt; word-break: break-all; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; font-size: 9.5pt; }
th, td { border: 1px solid #c9d2dd; padding: 4px 6px; text-align: left; vertical-align: top; }
thead th { background: #eef2f6; font-weight: 600; }
tbody tr:nth-child(even) td { background: #f8fafc; }
table.facts th { width: 24%; background: #eef2f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
ul { margin: 0; padding-left: 16px; }
.verdict { border: 2px solid; border-radius: 4px; padding: 12px 16px; margin: 8px 0 18px; }
.verdict.pass { border-color: #1d7a46; background: #f1faf4; }
.verdict.attention { border-color: #b3261e; background: #fdf3f2; }
.verdict .line { font-weight: 600; font-size: 11pt; margin-bottom: 8px; }
.checks { display: flex; gap: 12px; flex-wrap: wrap; }
.check { border: 1px solid #c9d2dd; border-radius: 3px; padding: 4px 10px; background: #fff; }
.ok { color: #1d7a46; font-weight: 700; }
.bad { color: #b3261e; font-weight: 700; }
.muted { color: #7a8796; }
footer { margin-top: 28px; border-top: 1px solid #c9d2dd; padding-top: 6px; font-size: 8.5pt; color: #56657a; }
@media print {
  body { padding: 0; max-width: none; font-size: 9.5pt; }
  h2 { break-after: avoid; page-break-after: avoid; }
  tr, .verdict, .check { break-inside: avoid; page-break-inside: avoid; }
  thead { display: table-header-group; }
  .verdict, thead th, tbody tr:nth-child(even) td, table.facts th {
    -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


def _e(value: Any) -> str:
    """Escaped text of any value: labels, reasons and names come from clients and operators."""
    if value is None:
        return '<span class="muted">&ndash;</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return html.escape(f"{value:.6g}")
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, sort_keys=True, ensure_ascii=False))
    return html.escape(str(value), quote=True)


def _mark(ok: Any) -> str:
    if ok is None:
        return _e(None)
    return '<span class="ok">PASS</span>' if ok else '<span class="bad">FAIL</span>'


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], *, numeric: Iterable[int] = ()) -> str:
    """A table from already-escaped cells; ``numeric`` columns are right-aligned."""
    right = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in right else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts(pairs: Iterable[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="facts"><tbody>{rows}</tbody></table>'


def _empty(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _html_header(report: dict[str, Any]) -> str:
    run = report["run"]
    return (
        '<header><div class="kicker">fedapp &middot; federated learning control plane</div>'
        f"<h1>Compliance report</h1><div class=\"sub\">Run <strong>{_e(run.get('name'))}</strong> "
        f"&middot; <span class=\"mono\">{_e(run.get('id'))}</span> &middot; generated "
        f"{_e(report.get('generated_at_iso'))}</div></header>"
    )


def _html_verdict(report: dict[str, Any]) -> str:
    v = report["verdict"]
    cls = "pass" if v["audit_ok"] and v["within_budget"] and v["completed"] else "attention"
    checks = "".join(
        f'<div class="check">{_e(label)}: {_mark(v[key])}</div>'
        for label, key in (("Audit chain intact", "audit_ok"), ("Within privacy budget", "within_budget"),
                           ("Run completed", "completed"))
    )
    return (f'<section><h2>Verdict</h2><div class="verdict {cls}"><div class="line">{_e(v["summary"])}</div>'
            f'<div class="checks">{checks}</div></div></section>')


def _html_run(report: dict[str, Any]) -> str:
    run = report["run"]
    pairs = [
        ("Run id", f'<span class="mono">{_e(run["id"])}</span>'), ("Name", _e(run["name"])),
        ("Status", _e(run["status"])), ("Started (UTC)", _e(run["started_at_iso"])),
        ("Ended (UTC)", _e(run["ended_at_iso"])),
        ("Rounds done / planned", f"{_e(run['rounds_done'])} / {_e(run['rounds_planned'])}"),
        ("Attempts", _e(run["attempts"])), ("Mode", _e(run["mode"])),
        ("Aggregation rule (config)", _e(run["strategy"])), ("Secure aggregation", _e(run["secagg"])),
        ("Clients", _e(run["num_clients"])),
        ("Simulated attack / faults", f"{_e(run['simulated_attack'])} / {_e(run['simulated_faults'])}"),
        ("Config SHA-256", f'<span class="mono">{_e(run["config_hash"])}</span>'),
        ("Code version", f'<span class="mono">{_e(run["code_version"])}</span>'),
        ("Error", _e(run["error"])),
    ]
    return f"<section><h2>Run</h2>{_facts(pairs)}</section>"


def _html_threats(report: dict[str, Any]) -> str:
    rows = [
        [f"<strong>{_e(t['mechanism'])}</strong><br><span class=\"muted\">{_e(t['basis'])}</span>",
         _e(t["protects"]), _e(t["adversary"]), _e(t["guarantee"]),
         "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in t["not_covered"]) + "</ul>"]
        for t in report["threat_model"]
    ]
    return ("<section><h2>Threat model</h2>"
            + _empty("Derived from the run's configuration; each guarantee holds only under the adversary named "
                     "beside it, and the last column states what it does not cover.")
            + _table(["Mechanism", "Protects", "Adversary assumed", "Guarantee", "Not covered"], rows) + "</section>")


def _html_user_level(name: str, level: dict[str, Any] | None) -> str:
    if level is None:
        return ""
    return (f"<p>{_e(name)}: epsilon {_e(level['epsilon'])} at delta {_e(level['delta'])} "
            f"({_e(level['released_rounds'])} released rounds; released-model epsilon "
            f"{_e(level['released_epsilon'])}; releases of abandoned attempts not composed: "
            f"{_e(level['superseded_releases'])}).</p>")


def _html_privacy(report: dict[str, Any]) -> str:
    p = report["privacy"]
    dp = p["client_dp"]
    intro = (_empty(f"Client DP-SGD ({dp['mode']}): delta {dp['delta']}, budget {dp['epsilon_budget']}, accountant "
                    f"{dp['accountant']}. Epsilon is the largest cumulative value any update of the client reported, "
                    "over every attempt.")
             if dp["enabled"] else _empty("No client-side differential privacy in this run."))
    rows = [
        [_e(c["client"]), _e(c["epsilon_spent"]), _e(c["budget"]), _e(c["left"]), _mark(c["within_budget"]),
         _e(c["rounds_trained"]), _e(c["rounds_declined"]), _e(c["note"] or None)]
        for c in p["clients"]
    ]
    table = (_table(["Client", "Epsilon spent", "Budget", "Left", "Within budget", "Trained (all attempts)",
                     "Declined", "Note"], rows, numeric=(1, 2, 3, 5, 6))
             if rows else _empty("No client updates were recorded."))
    totals = _facts([("Max client epsilon", _e(p["max_client_epsilon"])),
                     ("All clients within budget", _mark(p["all_within_budget"]))])
    user = _html_user_level("Central DP (user-level)", p["central"]) + _html_user_level(
        "Distributed DP (user-level)", p["distributed"])
    return f"<section><h2>Privacy</h2>{intro}{table}{totals}{user}</section>"


def _html_participants(report: dict[str, Any]) -> str:
    rows = [
        [_e(r["round"]), _e(r["attempt"]), _e(r["sampled"]), _e(r["trained"]), _e(r["failures"]), _e(r["refused"]),
         _e(", ".join(r["participants"]) or None)]
        for r in report["participants"]
    ]
    superseded = report["superseded_rounds"]
    note = _empty(
        "Rounds of the run's lineage only. Superseded by a later attempt (not listed): "
        + ", ".join(f"round {s['round']} of attempt {s['attempt']}" for s in superseded) + "."
    ) if superseded else ""
    table = _table(["Round", "Attempt", "Sampled", "Trained", "Failures", "Refused", "Participants"], rows,
                   numeric=(0, 1, 2, 3, 4, 5)) if rows else _empty("No training round was recorded.")
    return f"<section><h2>Participants per round</h2>{note}{table}</section>"


def _html_refusals(report: dict[str, Any]) -> str:
    rows = [
        [_e(r["round"]), _e(r["attempt"]), _e(r["client"]), _e(r["status"]), _e(r["kind"]), _e(r["reason"]),
         _e("abandoned attempt" if r["superseded"] else None)]
        for r in report["refusals"]
    ]
    body = _table(["Round", "Attempt", "Client", "Outcome", "Kind", "Reason", "Note"], rows, numeric=(0, 1)) \
        if rows else _empty("No update was refused, declined or quarantined, and no client was excluded or failed.")
    return f"<section><h2>Refusals, exclusions and failures</h2>{body}</section>"


def _html_actions(report: dict[str, Any]) -> str:
    rows = [
        [_e(a.get("id")), _e(_iso(_float(a.get("requested_at")))), _e(a.get("requested_by")), _e(a.get("action")),
         _e(a.get("params")), _e(a.get("reason")), _e(a.get("status")),
         f"{_e(a.get('boundary_round'))} &rarr; {_e(a.get('effective_round'))}", _e(a.get("result"))]
        for a in report["operator_actions"]
    ]
    body = _table(["Id", "Requested (UTC)", "By", "Action", "Parameters", "Reason", "Status",
                   "After round \u2192 from round", "Result"], rows, numeric=(0,)) \
        if rows else _empty("No operator action was requested for this run.")
    return f"<section><h2>Operator actions</h2>{body}</section>"


def _html_audit(report: dict[str, Any]) -> str:
    a = report["audit"]
    pairs = [
        ("Verification", _mark(a.get("ok"))), ("Result", _e(a.get("line"))), ("Entries", _e(a.get("entries"))),
        ("Head signed", _e(a.get("signed"))), ("Signature checked against pinned key", _e(a.get("checked_signature"))),
        ("Head", f'<span class="mono">{_e(a.get("head"))}</span>'),
    ]
    return f"<section><h2>Audit chain</h2>{_facts(pairs)}</section>"


def render_html(report: dict[str, Any]) -> str:
    """The report as one printable HTML document: inline CSS, no script, nothing fetched from elsewhere.

    Every value is escaped (:func:`_e`): client labels, reasons and run names
    are chosen by parties the report is about, and must not become markup.
    """
    sections = "".join(
        part(report) for part in (_html_verdict, _html_run, _html_threats, _html_privacy, _html_participants,
                                  _html_refusals, _html_actions, _html_audit)
    )
    title = f"Compliance report: {report['run'].get('name') or report['run'].get('id')}"
    footer = (f"<footer>Generated {_e(report.get('generated_at_iso'))} from the run store by fedapp "
              f"(report version {_e(report.get('report_version'))}). Config SHA-256 "
              f"<span class=\"mono\">{_e(report['run'].get('config_hash'))}</span>.</footer>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body>{_html_header(report)}{sections}{footer}</body></html>\n"
    )
