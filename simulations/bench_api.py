"""Control-plane figures: `fedapp serve` under 50 polling dashboards while a run trains, action latency, auth.

    FEDAPP_DATA_ROOT=../shared/data python simulations/bench_api.py [--rounds 6] [--readers 50]
        [--max-train-samples 20000] [--no-interleave] [--quick] [--work DIR] [--out DIR]

One ``fedapp serve`` subprocess (loopback, its own secret file) over one SQLite run
store for the whole benchmark; every run is ``fedapp run`` (Flower's simulation
engine, Hydra overrides) with ``store.url`` on that store. Tokens come from the CLI
(``fedapp tokens create`` / ``revoke``).

1. Readers: while a 10-client MNIST run trains (``dataset.max_train_samples`` sized for
   ~10-20 s rounds), a separate process (``--reader``: keep-alive HTTP/1.1 on asyncio streams) runs 50 readers,
   each polling about once a second with jitter and cycling over GET
   ``/runs/{id}/rounds``, ``/clients``, ``/privacy`` (each reader its own keep-alive
   connection, like 50 dashboards). Figures: p50/p95/p99 latency per endpoint (ms, as the
   client sees it), errors (non-200 answers and exceptions), requests made.
   Targets: p95 <= 100 ms per endpoint, 0 errors.
2. Round time with the readers on against the same run without them (same config and
   seed, ``fedapp serve`` up and idle in the baseline): phases A (baseline), B (readers),
   A, B (``--no-interleave``: A, B); per-round durations from the store's rounds
   (``ended_at - started_at``; round 0 and the first training round skipped as warm-up),
   ratio of the medians over the pooled rounds. Target: <= 1.1.
3. Action latency (a separate run, so blocks do not bias 2): an operator blocks or
   unblocks a client mid-round k (a ``reply`` record of round k in ``progress.jsonl``,
   no ``round`` record of k yet), then reads the action back
   (``GET .../actions/{id}?wait_s=60``). The issued round is the round whose
   [start, end] in ``progress.jsonl`` holds the action's ``requested_at``; latency in
   rounds = ``effective_round - issued_round`` (applied at the boundary after round k:
   effective round k + 1, latency 1). Target: every action applied, max latency 1; the
   store's participants of the effective round lack a blocked client (and hold an
   unblocked one again).
4. Auth matrix against the live server (mid-round of the same run, after its last action
   settled): every endpoint of the app's OpenAPI schema except health/ready, with real
   run and action ids, x {no token, bad signature, expired, revoked, + garbage, alg none,
   wrong audience, never issued}: 401; a viewer's POST: 403. Target: 100 % refused so.
   Malformed bodies and ids (bad JSON, unknown action, wrong types, huge numbers,
   unknown run on every run endpoint, path traversal, bad action ids, oversized body...)
   with an operator token: every answer 4xx, never 5xx.

Results: ``simulations/results/api.json`` (``--quick``: the work folder, unless ``--out``)
and ``api.png``, ending with a ``verdict`` computed from the measurements. Logs of every
process are under the work folder (printed at start).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "simulations" / "results"
RESULTS_NAME = "api.json"
TAG_ENV = "FEDAPP_BENCH_TAG"
ENDPOINTS = ("rounds", "clients", "privacy")
OPEN = {"/api/v1/health", "/api/v1/ready"}
T0 = time.monotonic()


def say(*parts: Any) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s]", *parts, flush=True)


# ---- processes --------------------------------------------------------------------------------------------
class Processes:
    """Every process this benchmark starts (each in its own session), stopped by PID at the end."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[TAG_ENV] = self.tag
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen:
        fh = log.open("w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        fh.close()
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the session this benchmark started for it
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)

    def tagged(self) -> list[int]:
        """PIDs whose environment carries this benchmark's tag (e.g. Ray workers left in other sessions)."""
        needle = f"{TAG_ENV}={self.tag}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def close(self) -> int:
        for proc in self.procs:
            self.stop(proc)
        leftovers = self.tagged()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(leftovers)


class CpuMonitor:
    """CPU seconds per role while a phase runs: the run (fedapp run + Ray), fedapp serve, the readers, the rest.

    Every 0.5 s: ``/proc/stat`` (the machine's busy time) and utime + stime of every process
    carrying this benchmark's tag; ``foreign`` is the machine's busy time minus ours (other
    users of a shared machine). A process that exits between samples loses < 0.5 s of ticks.
    ``other``: the machine's busy time not charged to our processes: other users of a shared
    machine, and kernel time no process is charged for (e.g. some loopback networking).
    """

    def __init__(self, procs: Processes, roles: dict[int, str], interval: float = 0.5) -> None:
        import threading

        self.procs, self.roles, self.interval = procs, roles, interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.last: dict[int, int] = {}
        self.totals: dict[str, float] = {}
        self.tagged: dict[int, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _busy() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def _ours(self) -> dict[int, int]:
        needle = f"{TAG_ENV}={self.procs.tag}".encode()
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                if pid not in self.tagged:
                    self.tagged[pid] = needle in (entry / "environ").read_bytes().split(b"\0")
                if self.tagged[pid]:
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    out[pid] = int(stat[11]) + int(stat[12])
            except OSError:
                continue
        return out

    def _sample(self, first: bool = False) -> None:
        for pid, ticks in self._ours().items():
            before = self.last.get(pid, ticks if first else 0)
            role = self.roles.get(pid, "run")
            self.totals[role] = self.totals.get(role, 0.0) + (ticks - before) / self.tick
            self.last[pid] = ticks

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "CpuMonitor":
        self.t0, (self.busy0, _) = time.monotonic(), self._busy()
        self.bench0 = sum(os.times()[:2])
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.monotonic() - self.t0
        busy = (self._busy()[0] - self.busy0) / self.tick
        self.totals["bench (this process)"] = sum(os.times()[:2]) - self.bench0
        ours = sum(self.totals.values())
        self.result = {
            "wall_s": round(wall, 1),
            "cpu_s": {k: round(v, 1) for k, v in sorted(self.totals.items())},
            "mean_cores": {k: round(v / wall, 3) for k, v in sorted(self.totals.items())},
            "machine_busy_cores": round(busy / wall, 3),
            "other_cores": round(max(0.0, busy - ours) / wall, 3),
        }


def fedapp(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedapp.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def cli_token(procs: Processes, store_url: str, secret: Path, role: str, expires: str, subject: str, log: Path) -> str:
    done = subprocess.run(fedapp("tokens", "create", "--role", role, "--expires", expires, "--subject", subject,
                                 "--store", store_url, "--secret-file", str(secret)),
                          cwd=ROOT, env=procs.env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    with log.open("a") as fh:
        fh.write(f"$ fedapp tokens create --role {role} --expires {expires} --subject {subject}\n{done.stderr}\n")
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"fedapp tokens create failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[-1]


def cli_revoke(procs: Processes, store_url: str, token_id: str, log: Path) -> None:
    done = subprocess.run(fedapp("tokens", "revoke", token_id, "--store", store_url), cwd=ROOT, env=procs.env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    with log.open("a") as fh:
        fh.write(f"$ fedapp tokens revoke {token_id}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise RuntimeError(f"fedapp tokens revoke failed: {done.stderr.strip()[-500:]}")


def jwt_claims(token: str) -> dict[str, Any]:
    import jwt

    return dict(jwt.decode(token, options={"verify_signature": False}))


class Server:
    """``fedapp serve`` as a subprocess on a loopback port."""

    def __init__(self, procs: Processes, store_url: str, secret: Path, port: int, log: Path, log_level: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = procs.start(fedapp("serve", "--store", store_url, "--port", str(port), "--secret-file", str(secret),
                                       "--log-level", log_level), log)  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fedapp serve exited ({self.proc.returncode}):\n{tail(self.log)}")
            try:
                if httpx.get(self.url + "/api/v1/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"fedapp serve not ready after {timeout} s:\n{tail(self.log)}")


# ---- runs -------------------------------------------------------------------------------------------------
def base_overrides(args: argparse.Namespace, num_rounds: int) -> list[str]:
    if args.quick:
        data = ["dataset=synthetic_mnist", f"dataset.synthetic_train_size={args.synthetic_train_size}",
                "dataset.synthetic_test_size=1000"]  # fmt: skip
    else:
        data = [f"dataset.max_train_samples={args.max_train_samples}"]
    return ["+experiment=fedavg_mnist_iid", f"num_rounds={num_rounds}", f"seed={args.seed}",
            f"partition.num_clients={args.clients}", f"strategy.min_available_clients={args.clients}",
            "strategy.min_fit_clients=2", f"runtime.num_cpus_per_client={args.cpus_per_client}", *data]  # fmt: skip


def start_run(procs: Processes, args: argparse.Namespace, work: Path, store_url: str, run_id: str,
              num_rounds: int) -> tuple[subprocess.Popen, Path, Path]:
    out = work / run_id
    log = work / "logs" / f"{run_id}.log"
    overrides = [*base_overrides(args, num_rounds), f"name={run_id}", f"runtime.output_dir={out}",
                 f"hydra.run.dir={out}", f"store.url={store_url}", f"store.run_id={run_id}"]  # fmt: skip
    say(f"[{run_id}] fedapp run {' '.join(overrides[:8])} ... (log {log})")
    return procs.start(fedapp("run", *overrides), log), out, log


def wait_run(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        Processes.stop(proc)
        raise RuntimeError(f"run did not end within {timeout} s:\n{tail(log)}") from None


def wait_run_record(api: str, token: str, run_id: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until the API knows the run (the ServerApp has created its record)."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"run {run_id} exited ({proc.returncode}) before it was recorded:\n{tail(log)}")
            try:
                if http.get(f"/api/v1/runs/{run_id}").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"run {run_id} not recorded after {timeout} s:\n{tail(log)}")


def round_durations(store_url: str, run_id: str) -> dict[int, float]:
    from fedapp.store.db import RunStore

    with RunStore(store_url) as store:
        return {r.round: round(r.ended_at - r.started_at, 3) for r in store.rounds(run_id, effective_only=True)}


# ---- 1 + 2: readers and round time -------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def latency_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ENDPOINTS:
        mine = [s for s in samples if s["endpoint"] == name]
        ok = [s["ms"] for s in mine if s.get("status") == 200]
        errors = [s for s in mine if s.get("status") != 200]
        out[name] = {
            "requests": len(mine), "ok": len(ok), "errors": len(errors),
            "errors_by_kind": _count(str(s.get("status") or s.get("error")) for s in errors),
            "p50_ms": _r(percentile(ok, 50)), "p95_ms": _r(percentile(ok, 95)), "p99_ms": _r(percentile(ok, 99)),
            "max_ms": _r(max(ok) if ok else None), "mean_ms": _r(statistics.mean(ok) if ok else None),
        }
    return out


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(float(x), nd)


def phase(procs: Processes, args: argparse.Namespace, work: Path, store_url: str, api: str, viewer: str,
          name: str, readers: bool, serve_pid: int) -> dict[str, Any]:
    run_id = f"api-{name}"
    started = time.monotonic()
    code_at_start = code_state()["fedapp_sources_sha256"]
    roles = {serve_pid: "serve"}
    monitor = CpuMonitor(procs, roles).__enter__()
    proc, out, log = start_run(procs, args, work, store_url, run_id, args.rounds)
    reader = None
    stop_file = work / f"{name}.stop"
    samples_file = work / f"{name}.samples.json"
    if readers:
        wait_run_record(api, viewer, run_id, proc, log)
        token_file = work / "viewer.token"
        reader_log = work / "logs" / f"{name}-readers.log"
        reader = procs.start([sys.executable, str(Path(__file__).resolve()), "--reader", "--url", api, "--token-file",
                              str(token_file), "--run-id", run_id, "--readers", str(args.readers), "--interval-s",
                              str(args.interval_s), "--stop-file", str(stop_file), "--samples-file", str(samples_file)],
                             reader_log)  # fmt: skip
        roles[reader.pid] = "readers"
        say(f"[{run_id}] {args.readers} readers polling (pid {reader.pid}, log {reader_log})")
    code = wait_run(proc, log, args.run_timeout_s)
    wall = time.monotonic() - started
    result: dict[str, Any] = {"run_id": run_id, "readers": readers, "exit_code": code, "wall_s": round(wall, 1),
                              "log": str(log), "code_at_start": code_at_start}
    if reader is not None:
        stop_file.touch()
        try:
            reader.wait(60)
        except subprocess.TimeoutExpired:
            Processes.stop(reader)
        samples = json.loads(samples_file.read_text()) if samples_file.exists() else {"samples": [], "loop_lag_ms": []}
        result["reader_exit_code"] = reader.returncode
        result["reader_samples"] = samples["samples"]
        result["reader_loop_lag_ms"] = samples["loop_lag_ms"]
        result["reader_window_s"] = samples.get("window_s")
        result["reader_cpu"] = samples.get("cpu_s")
    monitor.__exit__()
    result["cpu"] = monitor.result
    if code != 0:
        say(f"[{run_id}] fedapp run exited {code}:\n{tail(log)}")
    durations = round_durations(store_url, run_id)
    result["round_duration_s"] = durations
    result["measured_rounds"] = {r: d for r, d in durations.items() if r >= 2}
    say(f"[{run_id}] done in {wall:.0f} s; round durations {durations}; mean cores {monitor.result['mean_cores']}, "
        f"other {monitor.result['other_cores']}")
    if readers:
        stats = latency_stats(result["reader_samples"])
        say(f"[{run_id}] latency " + ", ".join(
            f"{k}: p50 {v['p50_ms']} p95 {v['p95_ms']} p99 {v['p99_ms']} ms, {v['requests']} req, {v['errors']} err"
            for k, v in stats.items()))
    return result


# ---- the reader process ------------------------------------------------------------------------------------
class _KeepAlive:
    """One dashboard's connection: HTTP/1.1 keep-alive GETs on raw asyncio streams.

    The readers stand in for fifty browsers on other machines; here they share the
    two cores with the run and the server, so the load generator itself must cost
    little (httpx spent twice the server's CPU per request; this costs a fraction).
    It parses exactly what the server sends: a status line, headers with
    Content-Length, a body.
    """

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.head = f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        try:
            writer.write(f"GET {path} HTTP/1.1\r\n{self.head}".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await asyncio.wait_for(reader.readexactly(int(fields.get("content-length", "0"))), 10.0)
            if fields.get("connection", "").lower() == "close":
                await self.close()
            return status, body
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def _readers(url: str, token: str, run_id: str, n: int, interval: float, stop_file: Path) -> dict[str, Any]:
    from urllib.parse import urlsplit

    samples: list[dict[str, Any]] = []
    lags: list[float] = []
    stop = asyncio.Event()
    where = urlsplit(url)
    paths = {name: f"/api/v1/runs/{run_id}/{name}" for name in ENDPOINTS}

    async def watch() -> None:
        while not stop_file.exists():
            await asyncio.sleep(0.2)
        stop.set()

    async def lag_probe() -> None:  # how late the client's own event loop wakes (client-side share of latency)
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.1)
            lags.append(round((time.perf_counter() - t - 0.1) * 1000, 2))

    async def reader(i: int) -> None:
        rng = random.Random(i)
        http = _KeepAlive(where.hostname or "127.0.0.1", where.port or 80, token)
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(0, interval))  # staggered start
            return
        except asyncio.TimeoutError:
            pass
        k = i % len(ENDPOINTS)
        while not stop.is_set():
            name = ENDPOINTS[k % len(ENDPOINTS)]
            k += 1
            t_wall, t = time.time(), time.perf_counter()
            sample: dict[str, Any] = {"endpoint": name, "t": round(t_wall, 3), "reader": i}
            try:
                status, body = await http.get(paths[name])
                sample["status"] = status
                if status == 200:
                    json.loads(body)
            except Exception as err:  # noqa: BLE001 - counted as an error
                sample["error"] = type(err).__name__
            sample["ms"] = round((time.perf_counter() - t) * 1000, 3)
            samples.append(sample)
            wait = interval * rng.uniform(0.75, 1.25) - (time.perf_counter() - t)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, wait))
            except asyncio.TimeoutError:
                pass
        await http.close()

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(watch(), lag_probe(), *(reader(i) for i in range(n)))
    return {"samples": samples, "loop_lag_ms": lags, "window_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(time.process_time() - cpu, 2)}


def reader_main(args: argparse.Namespace) -> None:
    token = Path(args.token_file).read_text().strip()
    result = asyncio.run(_readers(args.url, token, args.run_id, args.readers, args.interval_s, Path(args.stop_file)))
    Path(args.samples_file).write_text(json.dumps(result))
    print(f"readers: {len(result['samples'])} requests in {result['window_s']} s", flush=True)


# ---- 3 + 4: actions, auth matrix, malformed input ------------------------------------------------------------
class Progress:
    """``progress.jsonl`` of a run, read incrementally (fedapp.rounds.progress.ProgressReader)."""

    def __init__(self, out: Path, proc: subprocess.Popen) -> None:
        from fedapp.rounds.progress import ProgressReader

        self.reader = ProgressReader(out / "progress.jsonl")
        self.proc = proc
        self.seen: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        self.seen += self.reader.new_records()
        return self.seen

    def ended(self, k: int) -> bool:
        return any(r.get("kind") == "round" and r.get("round") == k for r in self.poll())

    def wait_mid_round(self, k: int, timeout: float = 300) -> bool:
        """True once round k's first reply is in and round k has not ended; False if round k ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.poll()
            if any(r.get("kind") == "reply" and r.get("round") == k for r in seen):
                return not self.ended(k)
            if any(r.get("kind") == "round" and r.get("round") == k for r in seen) or self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def round_of(self, t: float) -> int | None:
        """The round running at time ``t`` (between its ``start`` and ``round`` records)."""
        starts = {r["round"]: r["time"] for r in self.poll() if r.get("kind") == "start"}
        ends = {r["round"]: r["time"] for r in self.seen if r.get("kind") == "round"}
        for k, s in starts.items():
            if s <= t < ends.get(k, float("inf")):
                return k
        return None


def action_schedule(num_rounds: int, clients: int) -> list[tuple[int, str, str]]:
    """Block client X mid-round k, unblock it mid-round k+1, block another mid-round k+2, ... (k from 2)."""
    labels = [str(c) for c in (3, 7, 5, 1, 8, 2) if c < clients]
    rows = []
    for i, k in enumerate(range(2, num_rounds - 1)):  # the round before the last is left for the auth matrix
        rows.append((k, "block" if i % 2 == 0 else "unblock", labels[(i // 2) % len(labels)]))
    return rows


def actions_run(procs: Processes, args: argparse.Namespace, work: Path, store_url: str, api: str,
                tokens: dict[str, str], secret: bytes) -> dict[str, Any]:
    import httpx

    run_id = "api-actions"
    num_rounds = args.action_rounds
    proc, out, log = start_run(procs, args, work, store_url, run_id, num_rounds)
    progress = Progress(out, proc)
    ops = {"Authorization": f"Bearer {tokens['operator']}"}
    view = {"Authorization": f"Bearer {tokens['viewer']}"}
    rows: list[dict[str, Any]] = []
    matrix: dict[str, Any] = {}
    malformed: dict[str, Any] = {}
    with httpx.Client(base_url=api, timeout=90) as http:
        for k, kind, client in action_schedule(num_rounds, args.clients):
            row: dict[str, Any] = {"round_targeted": k, "action": kind, "client": client}
            if not progress.wait_mid_round(k):
                row["error"] = f"missed: round {k} ended before its first reply was seen (or the run ended)"
                rows.append(row)
                say(f"[{run_id}] {row['error']}")
                continue
            t = time.time()
            answer = http.post(f"/api/v1/runs/{run_id}/actions", headers=ops,
                               json={"action": kind, "client": client, "reason": f"bench_api mid-round {k}"})
            row["post_status"], row["post_ms"] = answer.status_code, round((time.time() - t) * 1000, 1)
            if answer.status_code != 202:
                row["error"] = f"POST answered {answer.status_code}: {answer.text[:300]}"
                rows.append(row)
                say(f"[{run_id}] {row['error']}")
                continue
            queued = answer.json()
            row["id"] = queued["id"]
            row["requested_at"] = queued["requested_at"]
            row["round_ended_before_answer"] = progress.ended(k)
            settled = http.get(f"/api/v1/runs/{run_id}/actions/{queued['id']}", params={"wait_s": 60}, headers=view)
            got = settled.json() if settled.status_code == 200 else {}
            row.update({"status": got.get("status"), "boundary_round": got.get("boundary_round"),
                        "effective_round": got.get("effective_round"), "applied_at": got.get("applied_at"),
                        "result": got.get("result")})  # fmt: skip
            row["issued_round"] = progress.round_of(float(queued["requested_at"]))
            if row["effective_round"] is not None and row["issued_round"] is not None:
                row["latency_rounds"] = row["effective_round"] - row["issued_round"]
            if got.get("applied_at"):
                row["latency_s"] = round(got["applied_at"] - queued["requested_at"], 2)
            if got.get("status") == "applied":  # how soon GET /clients shows what the action read back as applied
                expected, t_settled, first = ("blocked" if kind == "block" else "active"), time.time(), None
                while time.time() - t_settled < 5:  # bounded: the next mid-round action must not be missed
                    listed = http.get(f"/api/v1/runs/{run_id}/clients", headers=view).json().get("clients", [])
                    seen = next((c["status"] for c in listed if c["client"] == client), None)
                    first = seen if first is None else first
                    if seen == expected:
                        break
                    time.sleep(0.1)
                row["api_client_status_first_read"] = first
                row["api_client_status_expected"] = expected
                row["api_client_status_visible_after_s"] = round(time.time() - t_settled, 2) if seen == expected else None
            rows.append(row)
            say(f"[{run_id}] {kind} {client}: issued in round {row['issued_round']}, {row['status']} at boundary "
                f"{row['boundary_round']}, effective round {row['effective_round']} "
                f"(latency {row.get('latency_rounds')} round(s), {row.get('latency_s')} s); GET /clients first said "
                f"{row.get('api_client_status_first_read')}, {row.get('api_client_status_expected')} after "
                f"{row.get('api_client_status_visible_after_s')} s")
        k = num_rounds - 1
        if progress.wait_mid_round(k):
            status_before = http.get(f"/api/v1/runs/{run_id}", headers=view).json().get("status")
            action_id = rows[0]["id"] if rows and rows[0].get("id") else 1
            matrix = auth_matrix(http, api, run_id, action_id, tokens, secret)
            malformed = malformed_inputs(http, run_id, "api-A1", action_id, tokens["operator"])
            status_after = http.get(f"/api/v1/runs/{run_id}", headers=view).json().get("status")
            matrix["run_status_during"] = malformed["run_status_during"] = [status_before, status_after]
            matrix["round"] = malformed["round"] = k
            say(f"[{run_id}] auth matrix: {matrix['refused_as_expected']}/{matrix['requests']} refused as expected; "
                f"malformed: {malformed['requests']} requests, {malformed['counts_by_class']}")
        else:
            say(f"[{run_id}] round {k} ended before the auth matrix could run mid-round; running it after the run")
        code = wait_run(proc, log, args.run_timeout_s)
        if not matrix:  # the run ended: still measure (POSTs then meet a finished run)
            action_id = rows[0]["id"] if rows and rows[0].get("id") else 1
            matrix = auth_matrix(http, api, run_id, action_id, tokens, secret)
            malformed = malformed_inputs(http, run_id, "api-A1", action_id, tokens["operator"])
            matrix["run_status_during"] = malformed["run_status_during"] = ["finished", "finished"]
        listed = http.get(f"/api/v1/runs/{run_id}/actions", headers=view).json().get("actions", [])
    from fedapp.store.db import RunStore

    with RunStore(store_url) as store:
        rounds = {r.round: r for r in store.rounds(run_id, effective_only=True)}
        record = store.get_run(run_id)
    for row in rows:
        eff, issued = row.get("effective_round"), row.get("issued_round")
        if eff in rounds:
            inside = row["client"] in rounds[eff].participants
            row["in_participants_of_effective_round"] = inside
            row["store_check"] = (not inside) if row["action"] == "block" else inside
        if issued in rounds:
            row["in_participants_of_issued_round"] = row["client"] in rounds[issued].participants
    ours = {r.get("id") for r in rows}
    return {
        "run_id": run_id, "num_rounds": num_rounds, "exit_code": code, "status": record.status, "log": str(log),
        "schedule": [list(s) for s in action_schedule(num_rounds, args.clients)],
        "rows": rows,
        "participants": {r: rounds[r].participants for r in sorted(rounds)},
        "round_duration_s": {r: round(v.ended_at - v.started_at, 3) for r, v in sorted(rounds.items())},
        "actions_in_store": len(listed),
        "refused_requests_on_record": len([a for a in listed if a["id"] not in ours and a["status"] == "refused"]),
        "unexpected_actions_queued": [a for a in listed if a["id"] not in ours and a["status"] != "refused"],
        "auth": matrix, "malformed": malformed,
    }


def forged_tokens(procs: Processes, store_url: str, secret_path: Path, secret: bytes, viewer: str,
                  log: Path, api: str) -> dict[str, str]:
    """One token per way of being refused with 401 (expired and revoked ones made with the CLI)."""
    import jwt

    claims = jwt_claims(viewer)
    expired = cli_token(procs, store_url, secret_path, "operator", "1s", "bench-expired", log)
    revoked = cli_token(procs, store_url, secret_path, "operator", "1h", "bench-revoked", log)
    cli_revoke(procs, store_url, jwt_claims(revoked)["jti"], log)
    used = cli_token(procs, store_url, secret_path, "operator", "1h", "bench-revoked-after-use", log)
    import httpx

    first_use = httpx.get(api + "/api/v1/whoami", headers={"Authorization": f"Bearer {used}"}, timeout=10).status_code
    cli_revoke(procs, store_url, jwt_claims(used)["jti"], log)
    time.sleep(1.5)  # the server re-checks a token that passed against the store after 1 s (docs/control_plane.md)
    op_claims = {**claims, "role": "operator", "sub": "bench-operator"}
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(op_claims).encode()).rstrip(b"=").decode()
    forged = {
        "no token": "",
        "bad signature": jwt.encode(op_claims, b"another secret of at least thirty-two bytes", algorithm="HS256"),
        "expired": expired,
        "revoked": revoked,
        f"revoked after use (first use answered {first_use})": used,
        "garbage": "not-a-jwt",
        "alg none": f"{header}.{body}.",
        "wrong audience": jwt.encode({**claims, "aud": "another-api"}, secret, algorithm="HS256"),
        "never issued": jwt.encode({**claims, "jti": uuid.uuid4().hex}, secret, algorithm="HS256"),
    }
    time.sleep(max(0.0, jwt_claims(expired)["exp"] + 1.5 - time.time()))
    return forged


REQUIRED_FORGERIES = ("no token", "bad signature", "expired", "revoked")
HARMLESS_ACTION = {"action": "unblock", "client": "0", "reason": "auth matrix (never meant to be accepted)"}


def schema_endpoints(http: Any, run_id: str, action_id: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(method, concrete path) of every endpoint in the server's OpenAPI schema but health/ready; the raw paths."""
    schema = http.get("/openapi.json").json()
    found, raw = [], []
    for path, methods in schema["paths"].items():
        if path in OPEN:
            continue
        raw.append(path)
        concrete = path.replace("{run_id}", run_id).replace("{action_id}", str(action_id))
        found += [(m.upper(), concrete) for m in methods if m.lower() in ("get", "post", "put", "patch", "delete")]
    return found, raw


def auth_matrix(http: Any, api: str, run_id: str, action_id: int, tokens: dict[str, str], secret: bytes) -> dict[str, Any]:
    routes, raw = schema_endpoints(http, run_id, action_id)
    cells: list[dict[str, Any]] = []
    texts: list[str] = []
    for name, token in tokens["forged"].items():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for method, path in routes:
            cells.append(_cell(http, name, method, path, headers, 401, texts))
    viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
    for method, path in routes:
        if method != "GET":
            cells.append(_cell(http, "viewer calling an action", method, path, viewer, 403, texts))
    failures = [c for c in cells if not c["ok"]]
    per_kind = {}
    for c in cells:
        entry = per_kind.setdefault(c["token"], {"requests": 0, "refused_as_expected": 0})
        entry["requests"] += 1
        entry["refused_as_expected"] += int(c["ok"])
    required = [c for c in cells if c["token"] in (*REQUIRED_FORGERIES, "viewer calling an action")]
    return {
        "endpoints": [f"{m} {p}" for m, p in routes], "schema_paths": raw,
        "requests": len(cells), "refused_as_expected": len(cells) - len(failures),
        "refused_fraction": (len(cells) - len(failures)) / len(cells) if cells else None,
        "required_kinds_refused_fraction": sum(c["ok"] for c in required) / len(required) if required else None,
        "per_token_kind": per_kind,
        "www_authenticate_on_every_401": all(c["www_authenticate"] for c in cells if c["status"] == 401),
        "secret_in_any_answer": any(secret.decode() in t for t in texts),
        "failures": failures[:50],
    }


def _cell(http: Any, name: str, method: str, path: str, headers: dict[str, str], expected: int,
          texts: list[str]) -> dict[str, Any]:
    body = HARMLESS_ACTION if method == "POST" else None
    try:
        answer = http.request(method, path, headers=headers, json=body, timeout=30)
        status, text, www = answer.status_code, answer.text, answer.headers.get("www-authenticate") == "Bearer"
    except Exception as err:  # noqa: BLE001 - counted as a failure
        status, text, www = None, f"{type(err).__name__}: {err}", False
    texts.append(text)
    cell = {"token": name, "method": method, "path": path, "status": status, "expected": expected,
            "ok": status == expected, "www_authenticate": www}
    if not cell["ok"]:
        cell["answer"] = text[:200]
    return cell


def malformed_cases(run_id: str, finished_run: str, action_id: int, run_paths: list[str]) -> list[tuple[str, str, str, Any]]:
    """(name, method, path, body): bodies as JSON-able objects, or bytes sent raw as application/json."""
    act = f"/api/v1/runs/{run_id}/actions"
    cases: list[tuple[str, str, str, Any]] = [
        ("bad JSON", "POST", act, b"{not json"),
        ("empty body", "POST", act, b""),
        ("JSON null", "POST", act, b"null"),
        ("JSON string", "POST", act, "block"),
        ("JSON list", "POST", act, [1, 2, 3]),
        ("truncated JSON", "POST", act, b'{"action": "block", "client": "3"'),
        ("non-UTF-8 body", "POST", act, b'{"action": "\xff\xfe"}'),
        ("deeply nested JSON (60 kB)", "POST", act, b"[" * 30000 + b"]" * 30000),
        ("oversized body (200 kB)", "POST", act, b'{"action": "resume", "reason": "' + b"x" * 200_000 + b'"}'),
        ("unknown action", "POST", act, {"action": "detonate"}),
        ("action of wrong type", "POST", act, {"action": 7}),
        ("block without client", "POST", act, {"action": "block"}),
        ("resume with a client", "POST", act, {"action": "resume", "client": "1"}),
        ("client of wrong type", "POST", act, {"action": "block", "client": 3}),
        ("client as list", "POST", act, {"action": "block", "client": ["3"]}),
        ("client markup", "POST", act, {"action": "block", "client": "<script>alert(1)</script>"}),
        ("client path traversal", "POST", act, {"action": "block", "client": "../../etc/passwd"}),
        ("client too long", "POST", act, {"action": "block", "client": "1" * 41}),
        ("client empty", "POST", act, {"action": "block", "client": ""}),
        ("client never took part", "POST", act, {"action": "block", "client": "99"}),
        ("rule injection", "POST", act, {"action": "set_rule", "rule": "__import__('os')"}),
        ("rule of wrong type", "POST", act, {"action": "set_rule", "rule": {"a": 1}}),
        ("clients_per_round negative", "POST", act, {"action": "set_clients_per_round", "clients_per_round": -3}),
        ("clients_per_round zero", "POST", act, {"action": "set_clients_per_round", "clients_per_round": 0}),
        ("clients_per_round string", "POST", act, {"action": "set_clients_per_round", "clients_per_round": "many"}),
        ("clients_per_round 1e300", "POST", act, {"action": "set_clients_per_round", "clients_per_round": 1e300}),
        ("clients_per_round 2**64", "POST", act, {"action": "set_clients_per_round", "clients_per_round": 2**64}),
        ("clients_per_round 10**400", "POST", act, b'{"action": "set_clients_per_round", "clients_per_round": 1' + b"0" * 400 + b"}"),
        ("clients_per_round NaN literal", "POST", act, b'{"action": "set_clients_per_round", "clients_per_round": NaN}'),
        ("clients_per_round Infinity literal", "POST", act, b'{"action": "set_clients_per_round", "clients_per_round": Infinity}'),
        ("clients_per_round 2.5", "POST", act, {"action": "set_clients_per_round", "clients_per_round": 2.5}),
        ("clients_per_round true", "POST", act, {"action": "set_clients_per_round", "clients_per_round": True}),
        ("clients_per_round above the run's clients", "POST", act, {"action": "set_clients_per_round", "clients_per_round": 999}),
        ("extra field", "POST", act, {"action": "resume", "extra": True}),
        ("reason too long", "POST", act, {"action": "resume", "reason": "x" * 10_000}),
        ("reason of wrong type", "POST", act, {"action": "resume", "reason": ["x"]}),
        ("set_rule to the rule in force", "POST", act, {"action": "set_rule", "rule": "fedavg"}),
        ("POST to a finished run", "POST", f"/api/v1/runs/{finished_run}/actions", {"action": "resume"}),
        ("POST to an unknown run", "POST", "/api/v1/runs/no-such-run/actions", {"action": "resume"}),
        ("run id path traversal (encoded)", "GET", "/api/v1/runs/..%2F..%2Fetc%2Fpasswd/rounds", None),
        ("run id path traversal (dots)", "GET", "/api/v1/runs/../../etc/passwd", None),
        ("run id with NUL", "GET", "/api/v1/runs/a%00b/privacy", None),
        ("run id with spaces and quotes", "GET", "/api/v1/runs/a%20'%22;--/clients", None),
        ("run id 300 characters", "GET", "/api/v1/runs/" + "r" * 300 + "/rounds", None),
        ("run id unicode", "GET", "/api/v1/runs/%E2%98%83/rounds", None),
        ("action id 0", "GET", f"{act}/0", None),
        ("action id -1", "GET", f"{act}/-1", None),
        ("action id 2**31", "GET", f"{act}/{2**31}", None),
        ("action id 99999999999999", "GET", f"{act}/99999999999999", None),
        ("action id 10**30", "GET", f"{act}/{10**30}", None),
        ("action id unknown", "GET", f"{act}/123456", None),
        ("action id of another run", "GET", f"/api/v1/runs/{finished_run}/actions/{action_id}", None),
        ("action id non-numeric", "GET", f"{act}/abc", None),
        ("action id float", "GET", f"{act}/1.5", None),
        ("action id path traversal", "GET", f"{act}/..%2F1", None),
        ("wait_s 1e9", "GET", f"{act}/{action_id}?wait_s=1e9", None),
        ("wait_s negative", "GET", f"{act}/{action_id}?wait_s=-1", None),
        ("wait_s nan", "GET", f"{act}/{action_id}?wait_s=nan", None),
        ("wait_s inf", "GET", f"{act}/{action_id}?wait_s=inf", None),
        ("runs limit -1", "GET", "/api/v1/runs?limit=-1", None),
        ("runs limit abc", "GET", "/api/v1/runs?limit=abc", None),
        ("runs limit 10**30", "GET", f"/api/v1/runs?limit={10**30}", None),
        ("events after -5", "GET", f"/api/v1/runs/{run_id}/events?after=-5", None),
        ("events after 2**63", "GET", f"/api/v1/runs/{run_id}/events?after={2**63}", None),
        ("events limit 100000", "GET", f"/api/v1/runs/{run_id}/events?limit=100000", None),
        ("events limit 0", "GET", f"/api/v1/runs/{run_id}/events?limit=0", None),
    ]
    for path in run_paths:  # an unknown run on every endpoint that takes one
        concrete = path.replace("{run_id}", "no-such-run").replace("{action_id}", "1")
        cases.append((f"unknown run: GET {path}", "GET", concrete, None))
    return cases


def malformed_inputs(http: Any, run_id: str, finished_run: str, action_id: int, operator: str) -> dict[str, Any]:
    _, raw = schema_endpoints(http, run_id, action_id)
    run_paths = [p for p in raw if "{run_id}" in p]
    headers = {"Authorization": f"Bearer {operator}"}
    rows = []
    for name, method, path, body in malformed_cases(run_id, finished_run, action_id, run_paths):
        row: dict[str, Any] = {"case": name, "method": method, "path": path[:120]}
        try:
            if isinstance(body, bytes):
                answer = http.request(method, path, headers={**headers, "content-type": "application/json"},
                                      content=body, timeout=30)
            elif body is None and method == "GET":
                answer = http.request(method, path, headers=headers, timeout=30)
            else:
                answer = http.request(method, path, headers=headers, json=body, timeout=30)
            row["status"] = answer.status_code
            try:
                row["detail"] = str(answer.json().get("detail"))[:160]
            except Exception:  # noqa: BLE001 - a non-JSON answer is reported as such
                row["detail"] = f"(not JSON) {answer.text[:120]}"
        except Exception as err:  # noqa: BLE001 - counted
            row["status"] = None
            row["error"] = f"{type(err).__name__}: {err}"[:200]
        rows.append(row)
    # a malformed body without any token: refused too (which status is reported, not judged)
    unauth = http.post(f"/api/v1/runs/{run_id}/actions", content=b"{not json",
                       headers={"content-type": "application/json"})
    classes = _count(("exception" if r["status"] is None else f"{r['status'] // 100}xx") for r in rows)
    return {
        "requests": len(rows),
        "counts_by_status": _count(str(r["status"]) for r in rows),
        "counts_by_class": classes,
        "n_4xx": classes.get("4xx", 0), "n_5xx": classes.get("5xx", 0),
        "non_4xx": [r for r in rows if r["status"] is None or not 400 <= r["status"] < 500],
        "bad_json_without_token_status": unauth.status_code,
        "cases": rows,
    }


# ---- verdict, plot ----------------------------------------------------------------------------------------
def summarize(results: dict[str, Any], phases: list[dict[str, Any]]) -> None:
    base = [d for p in phases if not p["readers"] for d in p["measured_rounds"].values()]
    load = [d for p in phases if p["readers"] for d in p["measured_rounds"].values()]
    results["round_time"] = {
        "per_phase": [{"phase": p["run_id"], "readers": p["readers"], "exit_code": p["exit_code"], "wall_s": p["wall_s"],
                       "round_duration_s": p["round_duration_s"],
                       "median_measured_s": _r(statistics.median(p["measured_rounds"].values()), 3)
                       if p["measured_rounds"] else None} for p in phases],
        "baseline_rounds_s": base, "readers_rounds_s": load,
        "median_baseline_s": _r(statistics.median(base), 3) if base else None,
        "median_readers_s": _r(statistics.median(load), 3) if load else None,
        "ratio_of_medians": _r(statistics.median(load) / statistics.median(base), 4) if base and load else None,
        "mean_ratio": _r(statistics.mean(load) / statistics.mean(base), 4) if base and load else None,
        "rounds_used": "round >= 2 of each phase (round 0: initial evaluation; round 1: warm-up, Ray actors start)",
        "cpu_per_phase": {p["run_id"]: p.get("cpu") for p in phases},
        "noisy_phases": [p["run_id"] for p in phases if (p.get("cpu") or {}).get("other_cores", 0) > 0.25],
        "noise_note": "a phase is noisy when other processes of the shared machine (or uncharged kernel time) kept "
                      "more than 0.25 cores busy on average (cpu_per_phase.*.other_cores)",
        "reader_process_cpu_s": {p["run_id"]: p.get("reader_cpu") for p in phases if p["readers"]},
    }
    samples = [s for p in phases if p["readers"] for s in p.get("reader_samples", [])]
    lags = [x for p in phases if p["readers"] for x in p.get("reader_loop_lag_ms", [])]
    window = sum(p.get("reader_window_s") or 0 for p in phases if p["readers"])
    errors = [s for s in samples if s.get("status") != 200]
    results["readers"] = {
        "per_endpoint": latency_stats(samples),
        "per_phase": {p["run_id"]: latency_stats(p.get("reader_samples", [])) for p in phases if p["readers"]},
        "requests": len(samples), "errors": len(errors),
        "errors_by_kind": _count(f"{s['endpoint']}: {s.get('status') or s.get('error')}" for s in errors),
        "window_s": _r(window, 1), "rate_req_per_s": _r(len(samples) / window, 1) if window else None,
        "client_loop_lag_ms": {"p50": _r(percentile(lags, 50)), "p95": _r(percentile(lags, 95)),
                               "p99": _r(percentile(lags, 99)), "max": _r(max(lags) if lags else None)},
        "note": "latency as the reader process sees it (send to body read); client_loop_lag_ms is how late the "
                "readers' own event loop woke from a 100 ms sleep: the client-side share of a latency on 2 cores",
    }


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    readers = results.get("readers") or {"per_endpoint": {}, "requests": 0, "errors": None}
    rt = results.get("round_time") or {}
    per = readers["per_endpoint"]
    p95s = [v["p95_ms"] for v in per.values()]
    p95 = max(p95s) if p95s and None not in p95s else None
    ratio = rt.get("ratio_of_medians")
    act = results.get("actions", {})
    rows = act.get("rows", [])
    lat = [r.get("latency_rounds") for r in rows]
    all_applied = bool(rows) and all(r.get("status") == "applied" for r in rows)
    max_lat = max(lat) if lat and None not in lat else None
    auth = act.get("auth", {})
    mal = act.get("malformed", {})
    blocks = [r for r in rows if r["action"] == "block"]
    return {
        "p95_latency_ms": {"value": p95, "target": 100, "met": p95 is not None and p95 <= 100,
                           "per_endpoint": {k: v["p95_ms"] for k, v in per.items()}},
        "reader_errors": {"value": readers["errors"], "target": 0,
                          "met": readers["requests"] > 0 and readers["errors"] == 0, "requests": readers["requests"]},
        "round_time_ratio": {"value": ratio, "target": 1.1, "met": ratio is not None and ratio <= 1.1,
                             "median_baseline_s": rt.get("median_baseline_s"), "median_readers_s": rt.get("median_readers_s")},
        "action_latency_rounds": {"value": max_lat, "target": 1, "met": all_applied and max_lat == 1,
                                  "actions": len(rows), "all_applied": all_applied,
                                  "all_issued_mid_round": all(r.get("issued_round") == r["round_targeted"] for r in rows)},
        "blocked_client_absent_from_effective_round": {
            "value": sum(bool(r.get("store_check")) for r in blocks), "target": len(blocks),
            "met": bool(blocks) and all(r.get("store_check") for r in blocks),
            "unblocked_back_in_effective_round": all(r.get("store_check") for r in rows if r["action"] == "unblock")},
        "auth_refused_fraction": {"value": auth.get("refused_fraction"), "target": 1.0,
                                  "met": auth.get("refused_fraction") == 1.0, "requests": auth.get("requests"),
                                  "failures": len(auth.get("failures", []))},
        "malformed_5xx": {"value": mal.get("n_5xx"), "target": 0,
                          "met": mal.get("n_5xx") == 0 and not mal.get("non_4xx"),
                          "requests": mal.get("requests"), "non_4xx": len(mal.get("non_4xx", [])) if mal else None},
    }


def plot(results: dict[str, Any], samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_rt, ax_cpu) = plt.subplots(1, 3, figsize=(17, 4.5), gridspec_kw={"width_ratios": [1.1, 1, 0.8]})
    for name in ENDPOINTS:
        ms = sorted(s["ms"] for s in samples if s["endpoint"] == name and s.get("status") == 200)
        if ms:
            st = results["readers"]["per_endpoint"][name]
            ax_lat.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))],
                        label=f"/{name}: p50 {st['p50_ms']:.1f}, p95 {st['p95_ms']:.1f}, p99 {st['p99_ms']:.1f} ms")
    ax_lat.axvline(100, color="red", lw=1, ls="--", label="target p95 100 ms")
    ax_lat.axhline(0.95, color="grey", lw=0.6, ls=":")
    ax_lat.set_xscale("log")
    ax_lat.set(xlabel="latency (ms, log)", ylabel="fraction of requests",
               title=f"{results['config']['readers']} readers, ~1 req/s each, while the run trains")
    ax_lat.legend(fontsize=7, loc="lower right")
    ax_lat.grid(alpha=0.3)
    phases = results["round_time"]["per_phase"]
    labels, data = [], []
    for p in phases:
        labels.append(f"{p['phase'].removeprefix('api-')}\n{'readers' if p['readers'] else 'baseline'}")
        data.append([d for r, d in p["round_duration_s"].items() if int(r) >= 2])
    labels += ["baseline\npooled", "readers\npooled"]
    data += [results["round_time"]["baseline_rounds_s"], results["round_time"]["readers_rounds_s"]]
    colors = ["tab:blue" if "baseline" in lab else "tab:orange" for lab in labels]
    for i, (d, c) in enumerate(zip(data, colors)):
        if d:
            ax_rt.boxplot([d], positions=[i], widths=0.5, patch_artist=True,
                          boxprops={"facecolor": c, "alpha": 0.35}, medianprops={"color": c})
            ax_rt.scatter([i + random.uniform(-0.12, 0.12) for _ in d], d, s=12, color=c, zorder=3)
    ax_rt.axvline(len(phases) - 0.5, color="grey", lw=0.8, ls=":")
    ax_rt.set_xticks(range(len(labels)), labels, fontsize=8)
    ax_rt.set(ylabel="round duration (s, store: ended_at - started_at)",
              title=f"Round time, rounds >= 2: ratio of medians {results['round_time']['ratio_of_medians']}")
    ax_rt.grid(alpha=0.3, axis="y")
    cpu = results["round_time"].get("cpu_per_phase") or {}
    roles = ["run", "serve", "readers", "bench (this process)", "other"]
    bottom = [0.0] * len(cpu)
    for role, color in zip(roles, ["tab:green", "tab:red", "tab:purple", "tab:grey", "black"]):
        vals = [((c or {}).get("other_cores", 0.0) if role == "other" else (c or {}).get("mean_cores", {}).get(role, 0.0))
                for c in cpu.values()]
        ax_cpu.bar(range(len(cpu)), vals, bottom=bottom, color=color, alpha=0.7, label=role)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_cpu.axhline(results["environment"]["cpus"], color="black", lw=0.8, ls="--")
    ax_cpu.set_xticks(range(len(cpu)), [k.removeprefix("api-") for k in cpu], fontsize=8)
    ax_cpu.set(ylabel="mean cores busy during the phase", title="CPU by process (machine: dashed line)")
    ax_cpu.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def code_state() -> dict[str, Any]:
    """The product's code as this benchmark ran it: git HEAD (read only) and a digest of fedapp/**/*.py."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "fedapp").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
    except OSError:
        head = None
    return {"git_head": head, "fedapp_sources_sha256": digest.hexdigest()[:16]}


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in ("fedapp", "flwr", "fastapi", "starlette", "uvicorn", "httpx", "pydantic", "sqlalchemy", "PyJWT",
                "torch", "ray"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "load_average_at_start": list(os.getloadavg()), "code_at_start": code_state(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


# ---- main -------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each measured run (figures 1, 2)")
    parser.add_argument("--action-rounds", type=int, default=7, help="rounds of the action-latency run (figure 3)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--max-train-samples", type=int, default=20000, help="MNIST subset: ~13 s rounds on 2 cores")
    parser.add_argument("--synthetic-train-size", type=int, default=6000, help="--quick only")
    parser.add_argument("--cpus-per-client", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--interval-s", type=float, default=1.0, help="each reader's mean polling period")
    parser.add_argument("--no-interleave", action="store_true", help="phases A, B instead of A, B, A, B")
    parser.add_argument("--skip-actions", action="store_true", help="figures 1 and 2 only")
    parser.add_argument("--serve-log-level", default="info", help="fedapp serve --log-level (info: access log on)")
    parser.add_argument("--run-timeout-s", type=float, default=900)
    parser.add_argument("--quick", action="store_true",
                        help="synthetic data, 4 rounds, 10 readers, A, B: checks the benchmark itself")
    parser.add_argument("--work", type=Path, default=None, help="folder for the store, runs and logs")
    parser.add_argument("--out", type=Path, default=None, help="where api.json/api.png go")
    # the reader process (internal)
    parser.add_argument("--reader", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token-file", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--stop-file", help=argparse.SUPPRESS)
    parser.add_argument("--samples-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        reader_main(args)
        return
    if args.quick:
        args.rounds, args.action_rounds, args.readers, args.no_interleave = 4, 5, 10, True
    work = (args.work or Path(tempfile.mkdtemp(prefix="fedapp-bench-api-"))).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out_dir = (args.out or (work if args.quick else RESULTS)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"work folder (store, runs, logs): {work}; results to {out_dir}")
    store_url = f"sqlite:///{work / 'store.db'}"
    secret_path = work / "api-secret"
    procs = Processes(uuid.uuid4().hex)
    started = time.monotonic()
    results: dict[str, Any] = {
        "config": {"runs": "fedapp run (simulation engine), " + " ".join(base_overrides(args, args.rounds)),
                   "rounds": args.rounds, "action_rounds": args.action_rounds, "clients": args.clients,
                   "max_train_samples": None if args.quick else args.max_train_samples, "readers": args.readers,
                   "interval_s": args.interval_s, "endpoints": [f"GET /api/v1/runs/{{id}}/{e}" for e in ENDPOINTS],
                   "phases": "A B" if args.no_interleave else "A B A B", "seed": args.seed, "quick": args.quick,
                   "serve_log_level": args.serve_log_level, "store": "SQLite (WAL), one file for every run",
                   "work": str(work)},
        "environment": environment(),
    }
    tokens: dict[str, Any] = {}
    phases: list[dict[str, Any]] = []
    leftovers = 0
    try:
        port = free_port()
        server = Server(procs, store_url, secret_path, port, work / "logs" / "serve.log", args.serve_log_level)
        server.wait_ready()
        say(f"fedapp serve up at {server.url} (pid {server.proc.pid})")
        token_log = work / "logs" / "tokens.log"
        tokens["viewer"] = cli_token(procs, store_url, secret_path, "viewer", "2h", "bench-readers", token_log)
        tokens["operator"] = cli_token(procs, store_url, secret_path, "operator", "2h", "bench-operator", token_log)
        fd = os.open(work / "viewer.token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(tokens["viewer"])
        secret = secret_path.read_text().strip().encode()
        order = ["A1", "B1"] if args.no_interleave else ["A1", "B1", "A2", "B2"]
        for name in order:
            phases.append(phase(procs, args, work, store_url, server.url, tokens["viewer"], name, name.startswith("B"),
                                server.proc.pid))
        results["phases"] = [{k: v for k, v in p.items() if k not in ("reader_samples", "reader_loop_lag_ms")}
                             for p in phases]
        summarize(results, phases)
        if not args.skip_actions:
            tokens["forged"] = forged_tokens(procs, store_url, secret_path, secret, tokens["viewer"], token_log,
                                             server.url)
            results["actions"] = actions_run(procs, args, work, store_url, server.url, tokens, secret)
        if server.proc.poll() is not None:
            say(f"fedapp serve exited early ({server.proc.returncode}):\n{tail(server.log)}")
        results["serve"] = {"pid": server.proc.pid, "alive_at_end": server.proc.poll() is None, "log": str(server.log),
                            "tracebacks_in_log": server.log.read_text(errors="replace").count("Traceback"),
                            "status_500_in_access_log": server.log.read_text(errors="replace").count('" 500')}
    except Exception as err:  # noqa: BLE001 - what was measured is still written, with the error
        import traceback

        results["error"] = f"{type(err).__name__}: {err}"
        say("benchmark error:\n" + traceback.format_exc())
    finally:
        leftovers = procs.close()
    samples = [s for p in phases for s in p.get("reader_samples", []) if p["readers"]]
    if "readers" in results:
        raw = work / "reader_samples.json"
        raw.write_text(json.dumps(samples))
        results["readers"]["raw_samples"] = str(raw)
    results["environment"]["load_average_at_end"] = list(os.getloadavg())
    results["environment"]["code_at_end"] = code_state()
    results["environment"]["code_changed_during_run"] = (
        results["environment"]["code_at_end"] != results["environment"]["code_at_start"])
    if results["environment"]["code_changed_during_run"]:
        say("WARNING: the product's code changed while the benchmark ran; its figures mix two versions")
    results["environment"]["leftover_processes_killed"] = leftovers
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["verdict"] = verdict(results)
    (out_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if "round_time" in results:
        plot(results, samples, out_dir / "api.png")
    say(f"results: {out_dir / RESULTS_NAME}, {out_dir / 'api.png'}")
    print(json.dumps(results["verdict"], indent=2))


if __name__ == "__main__":
    main()
