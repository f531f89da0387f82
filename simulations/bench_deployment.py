"""The Docker deployment, built and run for real: image build, lint, user, compose run.

    python simulations/bench_deployment.py                       # build fedapp:latest, then run
    python simulations/bench_deployment.py --reuse-image fedapp:latest \\
        --build-record /tmp/fedapp-docker-work/build-full.result    # report an earlier build

Measures the image build (seconds; ``--no-cache`` for a build from scratch), the image
size (``docker image inspect``), ``hadolint --failure-threshold warning Dockerfile``,
the user the image runs as (``id -u`` in a container), and one end-to-end run of
compose.yaml: credentials, a TLS SuperLink with SuperNode authentication, registration,
two SuperNodes, ``docker compose run launcher`` on synthetic data. It also starts a
SuperNode with an unregistered key and records whether the SuperLink refused it.
Writes ``simulations/results/deployment.json`` (ending with a ``verdict``); long logs
go to ``--log-dir``. Needs a Docker engine with Compose v2 (here:
``../shared/tools/local-docker start``; found without ``eval`` too, see docker_env;
``FEDAPP_LOCAL_DOCKER`` points at another such script).

The functions are reused by tests/test_docker.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "simulations" / "results" / "deployment.json"
LOCAL_DOCKER = Path(os.environ.get("FEDAPP_LOCAL_DOCKER", ROOT.parent / "shared" / "tools" / "local-docker"))
LOCAL_BASE = "local/python:3.11-slim"
NODES = 2
STATUS_COMPLETED = "finished:completed"


# --- the engine ---------------------------------------------------------------------------


def docker_env() -> dict[str, str]:
    """The environment that reaches a Docker engine: the caller's if ``docker info``
    works with it, else the one ``../shared/tools/local-docker env`` prints (its own
    dockerd socket and Compose plugin), else the caller's unchanged."""
    env = dict(os.environ)
    if _docker_info(env)[0] or not LOCAL_DOCKER.exists():
        return env
    try:
        printed = subprocess.run([str(LOCAL_DOCKER), "env"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return env
    local = dict(env)
    for key, value in re.findall(r"(\w+)=(\S+)", printed):
        local[key] = value.replace("$PATH", env.get("PATH", ""))
    return local if _docker_info(local)[0] else env


def _docker_info(env: dict[str, str]) -> tuple[bool, str]:
    try:
        result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], env=env,
                                capture_output=True, text=True, timeout=30)  # fmt: skip
    except FileNotFoundError:
        return False, "the docker client is not installed"
    except subprocess.TimeoutExpired:
        return False, "`docker info` did not answer within 30 s"
    if result.returncode != 0:
        return False, f"no Docker engine reachable (`docker info`: {(result.stderr or result.stdout).strip()[:300]})"
    return True, result.stdout.strip()


def engine(env: dict[str, str]) -> tuple[bool, str]:
    """(True, server version) or (False, why not), including the Compose v2 plugin."""
    ok, info = _docker_info(env)
    if not ok:
        return ok, info
    compose = subprocess.run(["docker", "compose", "version", "--short"], env=env, capture_output=True, text=True)
    if compose.returncode != 0:
        return False, f"Docker {info} has no Compose v2 plugin (`docker compose version` failed)"
    return True, f"Docker {info}, Compose {compose.stdout.strip()}"


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: float | None = None) -> tuple[int, float, str]:
    """Run ``cmd`` with stdout+stderr into ``log``; (exit code, seconds, stdout+stderr)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                cwd=ROOT).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.monotonic() - start, log.read_text(errors="replace")


# --- the image ----------------------------------------------------------------------------


def default_base_image(env: dict[str, str]) -> str:
    """``local/python:3.11-slim`` where that stand-in exists (no registry here), else the real one."""
    exists = subprocess.run(["docker", "image", "inspect", LOCAL_BASE], env=env, capture_output=True)
    return LOCAL_BASE if exists.returncode == 0 else "python:3.11-slim"


def build_image(tag: str, env: dict[str, str], log: Path, base_image: str, *, no_cache: bool = False,
                torch_index: str = "", timeout: float = 3600) -> dict[str, Any]:  # fmt: skip
    """``docker build`` of the checkout; the record of it (also written beside the log)."""
    cmd = ["docker", "build", "--build-arg", f"BASE_IMAGE={base_image}", "-t", tag]
    if torch_index:
        cmd += ["--build-arg", f"TORCH_INDEX={torch_index}"]
    if no_cache:
        cmd.append("--no-cache")
    started = time.time()
    rc, seconds, _ = run_logged([*cmd, str(ROOT)], {**env, "DOCKER_BUILDKIT": "1"}, log, timeout)
    record = {"rc": rc, "seconds": round(seconds, 1), "start": started, "end": started + seconds, "image": tag,
              "base_image": base_image, "no_cache": no_cache, "torch_index": torch_index, "log": str(log),
              "measured_by": "this script"}  # fmt: skip
    log.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record


def read_build_record(path: Path) -> dict[str, Any]:
    """An earlier build's record: this script's ``build.json`` or ``{"rc", "start", "end"}``."""
    record = json.loads(path.read_text())
    if "seconds" not in record:
        record["seconds"] = round(float(record["end"]) - float(record["start"]), 1)
    record.setdefault("measured_by", f"record {path}")
    return record


def image_info(tag: str, env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(["docker", "image", "inspect", tag], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return {"exists": False}
    info = json.loads(result.stdout)[0]
    return {"exists": True, "id": info["Id"], "size_bytes": info["Size"], "size_gb": round(info["Size"] / 1e9, 2),
            "config_user": info["Config"].get("User", ""), "created": info.get("Created")}  # fmt: skip


def container_user(tag: str, env: dict[str, str]) -> dict[str, Any]:
    """Who a container of ``tag`` runs as by default (no ``--user``)."""
    result = subprocess.run(["docker", "run", "--rm", tag, "sh", "-c", "id -u; id -un; id -g"], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 3:
        return {"rc": result.returncode, "error": (result.stderr or result.stdout)[-500:]}
    return {"rc": 0, "uid": int(lines[0]), "user": lines[1], "gid": int(lines[2])}


def roles(tag: str, env: dict[str, str]) -> dict[str, bool]:
    """Every role's command answers ``--help`` in the image."""
    commands = {"flower-superlink": ["flower-superlink", "--help"], "flower-supernode": ["flower-supernode", "--help"],
                "flwr": ["flwr", "--help"], "fedapp-launch": ["fedapp-launch", "--help"],
                "fedapp": ["fedapp", "--help"],
                "make_credentials": ["python", "-m", "fedapp.deploy.make_credentials", "--help"]}  # fmt: skip
    script = "; ".join(" ".join(c) + f" >/dev/null && echo ok:{name}" for name, c in commands.items())
    out = subprocess.run(["docker", "run", "--rm", tag, "sh", "-c", script], env=env,
                         capture_output=True, text=True, timeout=300).stdout  # fmt: skip
    return {name: f"ok:{name}" in out for name in commands}


def hadolint(path: str | None) -> dict[str, Any]:
    """``hadolint --failure-threshold warning Dockerfile`` (``available: False`` if not installed)."""
    exe = path or shutil.which("hadolint")
    if exe is None or not Path(exe).exists():
        return {"available": False}
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    result = subprocess.run([exe, "--no-color", "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)  # fmt: skip
    findings = [ln for ln in result.stdout.splitlines() if re.search(r" DL\d+|SC\d+", ln)]
    serious = [ln for ln in findings if re.search(r"\b(warning|error)\b", ln)]
    return {"available": True, "version": version, "rc": result.returncode, "passed": result.returncode == 0,
            "findings": findings, "warning_or_worse": len(serious)}  # fmt: skip


# --- compose ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_cmd(project: str) -> list[str]:
    return ["docker", "compose", "-f", str(ROOT / "compose.yaml"), "--project-directory", str(ROOT), "-p", project]


def compose_env(env: dict[str, str], image: str, rounds: int) -> dict[str, str]:
    return {**env, "FEDAPP_IMAGE": image, "FEDAPP_ROUNDS": str(rounds), "FEDAPP_DATASET": "synthetic-mnist",
            "FEDAPP_SUPERLINK_PORT": str(free_port())}  # fmt: skip


def launcher_result(output: str) -> dict[str, Any] | None:
    """The JSON object fedapp-launch prints last (``run_id``, ``status``, ``summary``)."""
    starts = [m.start() for m in re.finditer(r"^\{\s*$", output, re.MULTILINE)]
    for start in reversed(starts):
        try:
            return json.JSONDecoder().raw_decode(output[start:])[0]
        except json.JSONDecodeError:
            continue
    return None


def compose_run(image: str, env: dict[str, str], log_dir: Path, *, project: str = "fedapp-bench", rounds: int = 2,
                check_unregistered: bool = True, timeout: float = 1800) -> dict[str, Any]:  # fmt: skip
    """``up -d``, ``run launcher``, an unregistered SuperNode, logs; always ``down -v``."""
    cenv = compose_env(env, image, rounds)
    base = compose_cmd(project)
    out: dict[str, Any] = {"project": project, "image": image, "rounds_requested": rounds,
                           "dataset": cenv["FEDAPP_DATASET"], "supernodes": NODES}  # fmt: skip
    start = time.monotonic()
    try:
        run_logged([*base, "down", "-v", "--remove-orphans"], cenv, log_dir / "compose-down-before.log", 300)
        # up -d returns once `register` completed and the SuperNodes started (depends_on conditions)
        rc, seconds, _ = run_logged([*base, "up", "-d", "--no-build"], cenv, log_dir / "compose-up.log", 600)
        out["up_seconds"] = round(seconds, 1)
        out["up_rc"] = rc
        if rc == 0:
            rc, seconds, text = run_logged([*base, "run", "--rm", "-T", "launcher"], cenv, log_dir / "launcher.log",
                                           timeout)  # fmt: skip
            out.update(launcher_rc=rc, launcher_seconds=round(seconds, 1))
            result = launcher_result(text) or {}
            summary = result.get("summary", {})
            out.update(run_id=result.get("run_id"), run_status=result.get("status"),
                       summary_status=summary.get("status"), rounds=summary.get("rounds"),
                       final_test_accuracy=summary.get("final_test_accuracy"),
                       mean_round_time_s=summary.get("mean_round_time_s"),
                       failures=summary.get("failures"))  # fmt: skip
            if check_unregistered:
                out["unregistered_node"] = unregistered_node(base, cenv, log_dir)
        _, _, logs = run_logged([*base, "logs", "--no-color"], cenv, log_dir / "compose-logs.log", 300)
        _, _, ps = run_logged([*base, "ps", "-a"], cenv, log_dir / "compose-ps.log", 60)
        out["superlink_https"] = "Uvicorn running on https://" in logs
        out["superlink_auth_disabled_message"] = "authentication is disabled" in logs.lower()
        # distinct keys: `run launcher` starts the one-shot steps again (idempotent: "already registered")
        out["nodes_registered"] = len(set(re.findall(r"(supernode-\d+)\.pub: (?:already )?registered", logs)))
        out["nodes_activated"] = len(set(re.findall(r"Activated node_id=(\d+)", logs)))
        out["credentials_exit_0"] = bool(re.search(r"credentials-1\s.*Exited \(0\)", ps))
        out["register_exit_0"] = bool(re.search(r"register-1\s.*Exited \(0\)", ps))
    finally:
        rc, _, _ = run_logged([*base, "down", "-v", "--remove-orphans"], cenv, log_dir / "compose-down.log", 300)
        out["down_rc"] = rc
    out["wall_seconds"] = round(time.monotonic() - start, 1)
    out["completed"] = (out.get("launcher_rc") == 0 and out.get("run_status") == STATUS_COMPLETED
                        and out.get("summary_status") == "completed" and out.get("rounds") == rounds)  # fmt: skip
    return out


def unregistered_node(base: list[str], cenv: dict[str, str], log_dir: Path) -> dict[str, Any]:
    """A SuperNode whose key the SuperLink never saw must be refused (exit != 0)."""
    extra = NODES  # supernode-2: written now, never registered
    run_logged([*base, "run", "--rm", "--no-deps", "-T", "credentials", "python", "-m",
                "fedapp.deploy.make_credentials", "--out", "/credentials", "--nodes", str(extra + 1)],
               cenv, log_dir / "credentials-extra.log", 120)  # fmt: skip
    rc, seconds, text = run_logged([*base, "run", "--rm", "--no-deps", "-T", "supernode-0", "flower-supernode",
                                    "--superlink", "superlink:9092", "--root-certificates", "/credentials/ca.crt",
                                    "--auth-supernode-private-key", f"/credentials/supernode-{extra}",
                                    "--node-config", f"partition-id=0 num-partitions={NODES}",
                                    "--max-retries", "2", "--max-wait-time", "30"],
                                   cenv, log_dir / "unregistered-node.log", 180)  # fmt: skip
    refused = rc not in (0, 124) and "Failed to activate SuperNode" in text
    return {"rc": rc, "seconds": round(seconds, 1), "refused": refused}


# --- the report ---------------------------------------------------------------------------


def verdict(build: dict[str, Any], image: dict[str, Any], lint: dict[str, Any], user: dict[str, Any],
            run: dict[str, Any]) -> dict[str, dict[str, Any]]:  # fmt: skip
    unregistered = run.get("unregistered_node", {})
    node_auth_enforced = (run.get("nodes_registered") == NODES and not run.get("superlink_auth_disabled_message")
                          and unregistered.get("refused", True))  # fmt: skip
    return {
        "image builds": {"value": build.get("seconds"),
                         "target": "success (exit 0, image present; value: build seconds)",
                         "met": build.get("rc") == 0 and image.get("exists", False)},  # fmt: skip
        "hadolint warning-level clean": {
            "value": lint.get("warning_or_worse") if lint.get("available") else "hadolint not installed",
            "target": 0, "met": bool(lint.get("available") and lint.get("passed"))},  # fmt: skip
        "runs as non-root": {"value": user.get("uid"), "target": "uid != 0",
                             "met": user.get("rc") == 0 and user.get("uid") not in (None, 0)},  # fmt: skip
        "compose TLS + node-auth run completes": {
            "value": {"launcher_exit": run.get("launcher_rc"), "status": run.get("run_status"),
                      "rounds": run.get("rounds"), "https": run.get("superlink_https"),
                      "nodes_registered": run.get("nodes_registered"),
                      "unregistered_node_refused": unregistered.get("refused")},
            "target": {"launcher_exit": 0, "status": STATUS_COMPLETED, "rounds": run.get("rounds_requested"),
                       "https": True, "nodes_registered": NODES, "unregistered_node_refused": True},
            "met": bool(run.get("completed") and run.get("superlink_https") and node_auth_enforced)},  # fmt: skip
    }


def versions(env: dict[str, str]) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        return (result.stdout or result.stderr).strip().splitlines()[0] if result.returncode == 0 else "?"

    return {"docker": first_line(["docker", "version", "--format", "{{.Server.Version}}"]),
            "compose": first_line(["docker", "compose", "version", "--short"])}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="fedapp:latest", help="tag to build (default fedapp:latest)")
    parser.add_argument("--reuse-image", metavar="TAG", help="do not build; measure and run this existing tag")
    parser.add_argument("--build-record", type=Path,
                        help="with --reuse-image: JSON record of that tag's real build (seconds or start/end, rc)")
    parser.add_argument("--base-image", help=f"BASE_IMAGE build argument (default {LOCAL_BASE} where it exists)")
    parser.add_argument("--torch-index", default="", help="TORCH_INDEX build argument (default: none, PyPI torch)")
    parser.add_argument("--no-cache", action="store_true", help="build from scratch (docker build --no-cache)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the compose run (default 3)")
    parser.add_argument("--hadolint", help="hadolint executable (default: on PATH)")
    parser.add_argument("--skip-unregistered-check", action="store_true")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "outputs" / "deployment-bench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    env = docker_env()
    ok, why = engine(env)
    if not ok:
        print(f"bench_deployment: {why}", file=sys.stderr)
        return 2
    args.log_dir.mkdir(parents=True, exist_ok=True)
    base_image = args.base_image or default_base_image(env)
    if args.reuse_image:
        tag = args.reuse_image
        no_record = {"rc": None, "seconds": None, "measured_by": "not measured"}
        build = read_build_record(args.build_record) if args.build_record else no_record
        build["reused_tag"] = tag
    else:
        tag = args.image
        print(f"building {tag} on {base_image} (log: {args.log_dir / 'build.log'}) ...", flush=True)
        build = build_image(tag, env, args.log_dir / "build.log", base_image, no_cache=args.no_cache,
                            torch_index=args.torch_index)  # fmt: skip
    image = image_info(tag, env)
    if not image["exists"]:
        print(f"bench_deployment: image {tag} missing (build rc {build.get('rc')})", file=sys.stderr)
    lint = hadolint(args.hadolint)
    user = container_user(tag, env) if image["exists"] else {"rc": None}
    role_check = roles(tag, env) if image["exists"] else {}
    print(f"image {tag}: {image.get('size_gb')} GB, uid {user.get('uid')}, hadolint passed={lint.get('passed')}; "
          f"compose run ({args.rounds} rounds) ...", flush=True)  # fmt: skip
    run = compose_run(tag, env, args.log_dir, rounds=args.rounds,
                      check_unregistered=not args.skip_unregistered_check) if image["exists"] else {}  # fmt: skip
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "engine": {**versions(env), "docker_host": env.get("DOCKER_HOST", "default")},
        "build": {**build, "base_image": build.get("base_image", base_image)},
        "image": {**image, "tag": tag},
        "roles": role_check,
        "hadolint": lint,
        "container_user": user,
        "compose": run,
        "logs": str(args.log_dir.resolve().relative_to(ROOT) if args.log_dir.resolve().is_relative_to(ROOT)
                    else args.log_dir),
    }
    report["verdict"] = verdict(build, image, lint, user, run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["verdict"], indent=2))
    return 0 if all(v["met"] for v in report["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
