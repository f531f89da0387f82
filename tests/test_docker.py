"""The image and compose.yaml, built and run on a real Docker engine (``pytest -m docker``).

Off by default (pyproject's addopts deselect the ``docker`` marker) and skipped, with the
reason, when no engine answers ``docker info`` (here: ``../shared/tools/local-docker
start``; the test finds that engine's socket without ``eval``). Building the image from
scratch takes 5-20 minutes and ~7 GB; ``FEDAPP_DOCKER_IMAGE=fedapp:latest`` reuses an
image built from this checkout instead of building ``fedapp:test`` (cached layers make
that rebuild seconds when only code changed). The compose run itself takes ~3 minutes
on 2 cores: credentials, TLS SuperLink with node authentication, registration, two
SuperNodes, ``docker compose run launcher`` for two rounds on synthetic data.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "bench_deployment.py"
spec = importlib.util.spec_from_file_location("bench_deployment", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)

pytestmark = pytest.mark.docker

ROUNDS = 2


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    env = bench.docker_env()
    ok, why = bench.engine(env)
    if not ok:
        pytest.skip(f"needs a Docker engine with Compose v2: {why}")
    return env


@pytest.fixture(scope="module")
def image(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """FEDAPP_DOCKER_IMAGE if set (must exist), else ``fedapp:test`` built from the checkout."""
    tag = os.environ.get("FEDAPP_DOCKER_IMAGE")
    if tag:
        assert bench.image_info(tag, env)["exists"], f"FEDAPP_DOCKER_IMAGE={tag} does not exist on the engine"
        return tag
    tag = "fedapp:test"
    log = tmp_path_factory.mktemp("docker") / "build.log"
    record = bench.build_image(tag, env, log, bench.default_base_image(env))
    assert record["rc"] == 0, f"docker build failed; see {log}:\n{log.read_text()[-3000:]}"
    return tag


def test_image_runs_every_role_as_non_root(env: dict[str, str], image: str) -> None:
    user = bench.container_user(image, env)
    assert user["rc"] == 0, user
    assert user["uid"] != 0 and user["user"] != "root"
    assert bench.image_info(image, env)["config_user"] not in ("", "root", "0", "0:0")
    assert bench.roles(image, env) == dict.fromkeys(
        ["flower-superlink", "flower-supernode", "flwr", "fedapp-launch", "fedapp", "make_credentials"], True
    )


def test_compose_tls_node_auth_federation_completes_a_run(
    env: dict[str, str], image: str, tmp_path: Path
) -> None:
    # Execute: up (credentials, superlink, register, 2 supernodes), run launcher, an
    # unregistered supernode, down -v
    run = bench.compose_run(image, env, tmp_path, project="fedapp-pytest", rounds=ROUNDS)

    # Assert
    logs = f"logs in {tmp_path}"
    assert run["up_rc"] == 0, logs
    assert run["launcher_rc"] == 0, f"{logs}:\n{(tmp_path / 'launcher.log').read_text()[-3000:]}"
    assert run["run_status"] == bench.STATUS_COMPLETED and run["summary_status"] == "completed", logs
    assert run["rounds"] == ROUNDS and run["failures"]["trained"] == ROUNDS * bench.NODES, run
    assert run["credentials_exit_0"] and run["register_exit_0"], logs
    assert run["superlink_https"] and not run["superlink_auth_disabled_message"], logs
    assert run["nodes_registered"] == bench.NODES and run["nodes_activated"] == bench.NODES, run
    assert run["unregistered_node"]["refused"], f"an unregistered SuperNode was not refused; {logs}"
    assert run["down_rc"] == 0
