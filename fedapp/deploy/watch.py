"""What the launcher does while ``flwr run`` is going: echo the run's progress and carry out node faults.

The ServerApp runs in a process the launcher did not start (the SuperLink's
SuperExec), so the launcher learns how the run is going from the file the
ServerApp appends to, ``<output_dir>/progress.jsonl``
(:class:`~fedapp.rounds.progress.RoundProgress`), and prints its round, wait and
failure lines as they are written. When that folder is not readable here (a
run submitted to another machine's SuperLink), it echoes ``flwr run --stream``'s
output instead, which carries the ServerApp's log.

``faults.node_schedule`` is carried out here too: when round r starts, the
SuperNodes scheduled for round r are killed (SIGKILL to their process group,
ClientApp processes included) or started again with the same command and
node config (a restarted node gets a new node id; its privacy ledger, kept in
``privacy.client.ledger_dir``, is what carries its spent budget over).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Callable

from flwr.common import log

from fedapp.deploy.diagnose import diagnose_file
from fedapp.deploy.processes import Launch, Proc, start
from fedapp.faults.plan import NodeAction
from fedapp.rounds.progress import ProgressReader, progress_line


@dataclass
class NodeSpec:
    """How SuperNode ``partition_id`` was started, so that it can be started again."""

    partition_id: int
    name: str
    command: list[str]


@dataclass
class RunWatcher:
    """Called by the launcher's wait loop (:meth:`tick`) about twice a second."""

    launch: Launch
    env: dict[str, str]
    logs: Path
    progress: Path | None
    schedule: list[NodeAction] = field(default_factory=list)
    nodes: dict[int, NodeSpec] = field(default_factory=dict)
    emit: Callable[[str], None] = field(default=lambda line: log(INFO, "%s", line))
    stream_log: Path | None = None
    done_actions: list[dict[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = ProgressReader(self.progress) if self.progress is not None else None
        self._stream_offset = 0
        self._explained: set[tuple[str, str | None]] = set()

    def tick(self) -> None:
        if self._reader is not None:
            for record in self._reader.new_records():
                if record.get("kind") == "start":
                    self._round_started(int(record["round"]))
                line = progress_line(record)
                if line:
                    self.emit(line)
                if record.get("kind") == "waiting":
                    self.explain_missing_nodes()
        elif self.stream_log is not None:
            self._echo_stream()

    def explain_missing_nodes(self) -> None:
        """The server is short of nodes: say why, from each SuperNode's log, once per cause and node."""
        for proc in self.launch.procs:
            if not proc.name.startswith("supernode") or getattr(proc, "expected_exit", False):
                continue
            cause = diagnose_file(proc.log_path)
            key = (proc.name, cause)
            if cause and key not in self._explained:
                self._explained.add(key)
                self.emit(f"{proc.name}: {cause} (log: {proc.log_path})")

    def _round_started(self, server_round: int) -> None:
        for action in [a for a in self.schedule if a.round == server_round]:
            self.schedule.remove(action)
            spec = self.nodes.get(action.partition_id)
            if spec is None:
                continue
            if action.action == "kill":
                self._kill(spec, server_round)
            else:
                self._restart(spec, server_round)

    def _kill(self, spec: NodeSpec, server_round: int) -> None:
        for proc in self.launch.procs:
            if proc.name == spec.name and proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(timeout=10)
                proc.expected_exit = True
        self.done_actions.append({"action": "kill", "partition_id": spec.partition_id, "round": server_round})
        self.emit(f"Round {server_round}: killed SuperNode {spec.name} (faults.node_schedule)")

    def _restart(self, spec: NodeSpec, server_round: int) -> None:
        restarted: Proc = start(self.launch, spec.name, self.logs, self.env, spec.command, append=True)
        self.done_actions.append({"action": "restart", "partition_id": spec.partition_id, "round": server_round,
                                  "pid": restarted.popen.pid})  # fmt: skip
        self.emit(f"Round {server_round}: restarted SuperNode {spec.name} (faults.node_schedule)")

    def _echo_stream(self) -> None:
        assert self.stream_log is not None
        try:
            with self.stream_log.open("rb") as fh:
                fh.seek(self._stream_offset)
                chunk = fh.read()
        except OSError:
            return
        complete, newline, _ = chunk.rpartition(b"\n")
        if not newline:
            return
        self._stream_offset += len(complete) + 1
        for line in complete.decode(errors="replace").splitlines():
            if line.strip():
                self.emit(line.rstrip())


def report_node_exit(proc: Proc) -> None:
    """A SuperNode that died is a lost node, not a lost run: say so once; the ServerApp accounts for it."""
    if getattr(proc, "reported", False):
        return
    proc.reported = True
    if not getattr(proc, "expected_exit", False):
        cause = diagnose_file(proc.log_path)
        log(WARNING, "%s exited with code %s%s; the run goes on without it (log: %s)", proc.name,
            proc.popen.returncode, f": {cause}" if cause else "", proc.log_path)  # fmt: skip
