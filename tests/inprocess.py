"""A federation in one process, without Ray: the real ServerApp and ClientApp over a threaded grid.

Flower's simulation engine takes ~30 s to start Ray on two cores; fault tests
need many short runs, each with a different fault. :class:`ThreadGrid` is a
:class:`~flwr.server.Grid` whose nodes are threads running the project's own
ClientApp (all mods included) with a per-node ``Context`` that persists across
rounds, as a SuperNode's does. A ClientApp exception becomes an error reply
with its traceback (as Flower's runtimes send it); a reply still being computed
at the deadline simply is not there yet. ``lose(node)`` takes a node off the
grid (its pending replies never come, as when a SuperNode is killed).
"""

from __future__ import annotations

import threading
import traceback
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

from flwr.client import ClientApp
from flwr.common import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.server import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedapp.config import ExperimentConfig


class ThreadGrid(Grid):
    """``num_nodes`` in-process SuperNodes (partition ids 0..n-1) running ``client_app``."""

    def __init__(self, cfg: ExperimentConfig, client_app: ClientApp, *, workers: int = 4) -> None:
        self.cfg = cfg
        self.app = client_app
        n = cfg.partition.num_clients
        self.node_ids = [1000 + i for i in range(n)]
        self.contexts = {
            node: Context(run_id=7, node_id=node, node_config={"partition-id": i, "num-partitions": n},
                          state=RecordDict(), run_config={})  # fmt: skip
            for i, node in enumerate(self.node_ids)
        }
        self.lost: set[int] = set()
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._pending: dict[str, tuple[Message, Future]] = {}
        self._lock = threading.Lock()
        self._run = Run.create_empty(run_id=7)
        # Messages are stamped with the identity of the process that makes them (a ServerApp's, here).
        TaskIdentity.run_id, TaskIdentity.node_id = 7, 0
        if getattr(TaskIdentity, "_task_id", None) is None:
            TaskIdentity.task_id = 0

    # ---- Grid ----------------------------------------------------------------------------
    def set_run(self, run_id: int) -> None:  # noqa: D102 - Grid's
        pass

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_ids if n not in self.lost]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_src_node_id"] = 0
            with self._lock:
                self._pending[msg_id] = (msg, self._pool.submit(self._handle, msg))
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        with self._lock:
            for msg_id in list(message_ids):
                entry = self._pending.get(msg_id)
                if entry is None or not entry[1].done() or entry[0].metadata.dst_node_id in self.lost:
                    continue
                reply = entry[1].result()
                if reply is not None:  # None: the ClientApp's process exited, nothing will ever come
                    del self._pending[msg_id]
                    replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        for msg_id in ids:
            self._pending[msg_id][1].result(timeout=timeout)
        return self.pull_messages(ids)

    # ---- faults ----------------------------------------------------------------------------
    def lose(self, partition_id: int) -> None:
        """The node of ``partition_id`` disconnects: off the node list, its replies never arrive."""
        self.lost.add(self.node_ids[partition_id])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _handle(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        try:
            reply = self.app(msg, self.contexts[node])
        except Exception:  # what a SuperNode sends back when its ClientApp raises
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=traceback.format_exc()), reply_to=msg)
        except SystemExit:  # the ClientApp process exited (faults.kind=exit with os._exit patched to raise this)
            return None
        reply.metadata.__dict__["_src_node_id"] = node
        return reply
