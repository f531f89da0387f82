"""What became of every client a round sampled, in words an operator can act on.

Flower hands a strategy ``results`` and ``failures``; a failure is an
``Exception(Error)`` whose reason may be a 3,000-character Ray traceback with
terminal colours, and a reply that never came is not there at all. fedapp
classifies every sampled client instead, once per round:

======================  ==========================================================
``trained``             an update that reached aggregation
``declined``            the client would not train (e.g. its privacy budget is spent)
``refused``             the server's validation refused the update (with the reason)
``failed``              the client raised or its ClientApp crashed (its error)
``timed_out``           no reply before the round's deadline
``node_lost``           the node disconnected (the SuperLink says it is unavailable)
======================  ==========================================================

A reason is one readable line naming the client; the full traceback goes to the log.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from flwr.common import Error
from flwr.common.constant import ErrorCode


class Outcome(StrEnum):
    """What a sampled client's round came to."""

    TRAINED = "trained"
    DECLINED = "declined"
    REFUSED = "refused"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    NODE_LOST = "node_lost"


FAULTS = (Outcome.REFUSED, Outcome.FAILED, Outcome.TIMED_OUT, Outcome.NODE_LOST)  # count as fit failures


class RunFailed(RuntimeError):
    """The run cannot go on; the message is the one line the operator reads (``flwr ls`` shows it)."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what is left of other escapes (OSC, ...) after _ANSI
# What a client may call itself in logs, events and progress lines: ASCII only and nothing after it
# (``$`` would accept "3\n"; ``\w`` a full-width "３"), so no label can pass for another.
LABEL = re.compile(r"[A-Za-z0-9_.-]{1,40}\Z")


def clean_text(text: str) -> str:
    """A client's text made safe for an operator's terminal: no escape sequences, no control characters."""
    return _CONTROL.sub("", _ANSI.sub("", text))


class ClientError(RuntimeError):
    """Raised by the ClientApp's outermost mod: ``[client <partition>] <Type>: <message>``.

    The tag lets the server name a failed client it never heard from before (its
    node id alone says nothing to an operator). It is the client's own claim, so
    it labels logs and events only; nothing is decided by it.
    """


_CLIENT_TAG = re.compile(r"\[client ([\w.-]{1,40})\] (.+)$", re.M)


def tagged(text: str) -> tuple[str | None, str]:
    """(client label, reason) from a tagged client error; (None, text) when untagged."""
    match = _CLIENT_TAG.search(clean_text(text))
    return (match[1], match[2].strip()) if match else (None, text)


class ClientFailure(Exception):
    """A sampled client's round that brought no update, as a strategy's ``failures`` entry."""

    def __init__(self, client: str, outcome: Outcome, reason: str, node_id: int | None = None) -> None:
        super().__init__(f"client {client}: {reason}")
        self.client = client
        self.outcome = outcome
        self.reason = reason
        self.node_id = node_id


_TORCH_MISMATCH = re.compile(
    r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit|Interrupt|Failure|Fault))\s*:\s*(.+)$")
MAX_REASON = 300


def one_line(text: str) -> str:
    """The sentence that says what went wrong: no colours, no traceback frames, at most 300 characters.

    A torch ``load_state_dict`` size mismatch becomes ``model mismatch (conv1.weight
    [6,1,5,5] vs [32,1,5,5])``: the server's shape first, then the client's.
    """
    clean = clean_text(text).strip()
    mismatch = _TORCH_MISMATCH.search(clean)
    if mismatch:
        server, client = (s.replace(" ", "") for s in mismatch.group(2, 3))
        return f"model mismatch ({mismatch.group(1)} [{server}] vs [{client}])"
    label, reason = tagged(clean)
    if label is not None:
        clean = reason
    lines = [line.strip() for line in clean.splitlines() if line.strip()]
    chosen = ""
    for line in reversed(lines):  # the last "SomeError: message" line is the exception that ended it
        match = _EXCEPTION_LINE.match(line)
        if match:
            chosen = f"{match[1]}: {match[2]}"
            break
    if not chosen:
        chosen = lines[-1] if lines else "no reason given"
    if chosen.endswith("'>"):  # Flower's deployed runtime wraps str(ex) as <'...'>
        chosen = chosen[:-2]
    return chosen if len(chosen) <= MAX_REASON else chosen[: MAX_REASON - 3] + "..."


def classify_error(error: Error) -> tuple[Outcome, str]:
    """A Flower error reply as an outcome and one line."""
    if error.code == ErrorCode.NODE_UNAVAILABLE:
        return Outcome.NODE_LOST, "node disconnected (the SuperLink reports it unavailable)"
    if error.code == ErrorCode.CLIENT_APP_CRASHED:
        return Outcome.FAILED, f"ClientApp process crashed ({one_line(error.reason or 'no reason given')})"
    if error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION:
        return Outcome.FAILED, f"ClientApp could not be loaded: {one_line(error.reason or '')}"
    if error.code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return Outcome.NODE_LOST, f"message lost ({one_line(error.reason or 'expired')})"
    return Outcome.FAILED, one_line(error.reason or f"error code {error.code}")


@dataclass
class RoundTally:
    """Outcome of every sampled client of every round.

    Entries are keyed by the node (``node-<id>``, assigned by the SuperLink), never by
    the partition id a client claims: two nodes claiming one id stay two entries, and a
    node cannot move its failures onto another's name. The claimed id is kept as the
    entry's display label only.
    """

    rounds: dict[int, dict[str, tuple[Outcome, str, str]]] = field(default_factory=dict)
    sampled: dict[int, int] = field(default_factory=dict)

    def begin(self, server_round: int, sampled: int) -> None:
        self.rounds[server_round] = {}
        self.sampled[server_round] = sampled

    def set(self, server_round: int, key: str, outcome: Outcome, reason: str = "", label: str | None = None) -> None:
        """Record (or correct: a trained reply refused later) one node's outcome; ``label`` names it in lines."""
        entries = self.rounds.setdefault(server_round, {})
        shown = label if label is not None else entries.get(key, (None, "", key))[2]
        entries[key] = (outcome, reason, shown)

    def counts(self, server_round: int) -> dict[Outcome, int]:
        got = Counter(outcome for outcome, _, _ in self.rounds.get(server_round, {}).values())
        return {outcome: got.get(outcome, 0) for outcome in Outcome}

    def faults(self, server_round: int) -> list[tuple[str, Outcome, str]]:
        """(label, outcome, reason) of every client that brought no update, in label order."""
        entries = self.rounds.get(server_round, {}).values()
        return sorted((label, o, r) for o, r, label in entries if o in FAULTS)

    def row(self, server_round: int) -> dict[str, int]:
        """The round's counts as metric columns (``fit_trained``, ``fit_failed``, ...)."""
        counts = self.counts(server_round)
        row = {f"fit_{outcome.value}": n for outcome, n in counts.items()}
        row["fit_sampled"] = self.sampled.get(server_round, sum(counts.values()))
        row["fit_failures"] = sum(counts[o] for o in FAULTS)
        return row

    def line(self, server_round: int) -> str:
        """``2 of 3 clients trained: 1 failed: model mismatch (...)`` -- counts, then the dominant reason."""
        counts = self.counts(server_round)
        sampled = self.sampled.get(server_round, sum(counts.values()))
        text = f"{counts[Outcome.TRAINED]} of {sampled} clients trained"
        others = [f"{counts[o]} {o.value.replace('_', ' ')}" for o in (Outcome.DECLINED, *FAULTS) if counts[o]]
        if others:
            text += ": " + ", ".join(others)
        dominant = self.dominant_reason(server_round)
        return f"{text}: {dominant}" if dominant else text

    def dominant_reason(self, server_round: int) -> str:
        """The most common reason among the round's faults (ties: the first client's)."""
        reasons = [reason for _, _, reason in self.faults(server_round)]
        if not reasons:
            return ""
        return Counter(reasons).most_common(1)[0][0]
