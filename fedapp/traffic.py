"""Count what clients upload, per round, by looking at the replies that reach the server.

Why a :class:`~flwr.server.Grid` wrapper and not a strategy wrapper: with
SecAgg+ the strategy never sees a client's upload (Flower's workflow replaces
every result's parameters with the unmasked mean), and the Paillier decryption
sub-round and SecAgg+'s key-exchange stages are replies too. Every reply passes
through the grid, whatever the fit workflow, so the same count holds for
``secagg.method`` none, paillier and secaggplus.

Two numbers per client and round (training messages only, evaluation excluded):

* ``upload_update_bytes``: the model-update payload of the client's first reply
  that carries one -- the ``nbytes`` of its parameter arrays (float32 weights,
  the Paillier ciphertext blob, or the SecAgg+ masked vector);
* ``upload_total_bytes``: every byte-carrying value of every training reply of
  that round (serialised arrays, bytes and strings in config records: keys,
  shares, decrypted sums), i.e. the protocol's whole upload, framing excluded.

The round row gets their means over the clients that replied, and two round totals for the
run store: ``upload_round_bytes`` (the sum of the clients' totals) and ``download_round_bytes``
(every message the server sent with that round's group id, all message types).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np
from flwr.common import Message, MessageType, RecordDict, bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.run import Run
from flwr.server import Grid

from fedapp.metrics import RunRecorder

_SCALAR_BYTES = 8  # an int/float/bool in a config record, as a rough wire size


def update_nbytes(content: RecordDict) -> int:
    """``nbytes`` of the model update a reply carries: its arrays, or SecAgg+'s masked vector."""
    # Legacy (NumPyClient) replies carry each array as serialised .npy bytes: decode to get nbytes
    # (a reply that does not decode counts its raw bytes; validation refuses it later, with the reason).
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            try:
                total += array.numpy().nbytes
            except Exception:  # noqa: BLE001 - a client's malformed bytes must not stop the server
                total += len(array.data)
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.MASKED_PARAMETERS in configs:
        for blob in configs[Key.MASKED_PARAMETERS]:
            try:
                total += bytes_to_ndarray(blob).nbytes
            except Exception:  # noqa: BLE001
                total += len(blob)
    return total


def payload_bytes(content: RecordDict) -> int:
    """All byte-carrying values of a reply (serialised arrays, bytes, strings; scalars as 8 bytes)."""
    total = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    for record in list(content.config_records.values()) + list(content.metric_records.values()):
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else _SCALAR_BYTES
    return total


class TrafficMeter(Grid):
    """A grid that forwards everything to ``grid`` and counts the training replies per client and round."""

    def __init__(self, grid: Grid, recorder: RunRecorder) -> None:
        self._grid = grid
        self.recorder = recorder
        # round -> node -> [update bytes (first update only), total bytes]
        self._rounds: dict[int, dict[int, list[int]]] = defaultdict(dict)
        self._down: dict[int, int] = defaultdict(int)  # round -> bytes sent to clients (all message types)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count_sent(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._count(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._count_sent(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._count(replies)
        return replies

    def _count_sent(self, messages: list[Message]) -> None:
        touched: set[int] = set()
        for msg in messages:
            if msg.metadata.group_id.isdigit():
                server_round = int(msg.metadata.group_id)
                self._down[server_round] += payload_bytes(msg.content)
                touched.add(server_round)
        for server_round in touched:
            self.recorder.record(server_round, download_round_bytes=self._down[server_round])

    def _count(self, replies: list[Message]) -> None:
        touched: set[int] = set()
        for msg in replies:
            meta = msg.metadata
            if msg.has_error() or meta.message_type != MessageType.TRAIN or not meta.group_id.isdigit():
                continue
            server_round = int(meta.group_id)
            entry = self._rounds[server_round].setdefault(meta.src_node_id, [0, 0])
            if entry[0] == 0:
                entry[0] = update_nbytes(msg.content)
            entry[1] += payload_bytes(msg.content)
            touched.add(server_round)
        for server_round in touched:
            nodes = self._rounds[server_round].values()
            updates = [u for u, _ in nodes if u > 0]
            self.recorder.record(
                server_round,
                upload_update_bytes=float(np.mean(updates)) if updates else 0.0,
                upload_total_bytes=float(np.mean([t for _, t in nodes])),
                upload_round_bytes=sum(t for _, t in nodes),
            )
