"""What can be checked of the deployment files without a Docker engine.

compose.yaml parses and describes one SuperLink plus SuperNodes with consistent
partitions; every command the Dockerfile and compose file run is a console script
of the installed project; the FAB that ``flwr run`` ships holds the app and nothing
else; the launcher's small helpers (CLI overrides, certificates) do what they say.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from fedapp.config import ConfigError, ExperimentConfig
from fedapp.deploy import generate_certificates, generate_node_keys, load_experiment, project_root, stage_app

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_compose_has_superlink_and_consistent_supernodes() -> None:
    services = compose()["services"]
    link = services["superlink"]["command"]
    assert link[0] == "flower-superlink"
    assert "--disable-runtime-dependency-installation" in link
    nodes = {name: svc for name, svc in services.items() if name.startswith("supernode")}
    assert len(nodes) == 2
    partitions = set()
    for svc in nodes.values():
        command = svc["command"]
        assert command[0] == "flower-supernode"
        assert command[command.index("--superlink") + 1] == f"superlink:{link[link.index('--port') + 1]}"
        node_config = dict(kv.split("=") for kv in command[command.index("--node-config") + 1].split())
        assert int(node_config["num-partitions"]) == len(nodes)
        partitions.add(int(node_config["partition-id"]))
        assert svc["environment"]["FEDAPP_DATA_ROOT"] == "/data"
        assert any(v.endswith(":/data:ro") for v in svc["volumes"])
    assert partitions == set(range(len(nodes)))


def test_compose_launcher_experiment_is_valid() -> None:
    command = compose()["services"]["launcher"]["command"]
    assert command[:3] == ["fedapp-launch", "--superlink", "superlink:9092"]
    cfg = load_experiment(None, command[3:])
    assert cfg.partition.num_clients == 2


def test_every_deployment_command_is_an_installed_console_script() -> None:
    commands = {svc["command"][0] for svc in compose()["services"].values()}
    cmd = [args for word, args in dockerfile_instructions() if word == "CMD"]
    assert len(cmd) == 1
    commands.add(json.loads(cmd[0])[0])
    documented = re.findall(r"\b(flower-superlink|flower-supernode|fedapp-launch|flwr)\b", (ROOT / "Dockerfile").read_text())
    commands.update(documented)
    for command in commands:
        assert (VENV_BIN / command).exists(), f"{command} is not a console script in {VENV_BIN}"


def test_dockerfile_installs_project_as_non_root() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert "pip install" in runs and re.search(r"pip install [^&]*\.(\s|$)", runs)
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(args for word, args in instructions if word == "ENV")
    assert "FEDAPP_DATA_ROOT=/data" in env and "FLWR_TELEMETRY_ENABLED=0" in env
    copied = " ".join(args for word, args in instructions if word == "COPY")
    for path in ("pyproject.toml", "fedapp"):
        assert path in copied and (ROOT / path).exists()


def test_dockerignore_keeps_venv_and_outputs_out_of_the_build_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "outputs", "data"} <= set(ignored)


def test_staged_fab_holds_only_the_app(tmp_path: Path) -> None:
    # Prepare
    from flwr.cli.build import build_fab_from_disk

    pyproject_before = (project_root() / "pyproject.toml").read_bytes()

    # Execute
    app_dir = stage_app(project_root(), tmp_path)
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir))).namelist()

    # Assert
    assert app_dir.name == "fedapp"
    assert (project_root() / "pyproject.toml").read_bytes() == pyproject_before
    assert "pyproject.toml" in names and "fedapp/server_app.py" in names and "fedapp/client_app.py" in names
    assert all(n in ("pyproject.toml", ".info/CONTENT") or re.fullmatch(r"fedapp/[\w/]+\.py", n) for n in names), names
    staged = tomllib.loads((app_dir / "pyproject.toml").read_text())
    assert "federations" not in staged["tool"]["flwr"]
    assert ExperimentConfig.from_dict(staged["tool"]["flwr"]["app"]["config"]) == ExperimentConfig()


@pytest.mark.slow
def test_fab_of_the_checkout_excludes_venv_and_outputs() -> None:
    """What `flwr run .` from the checkout would ship (walks .venv: a few seconds)."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE
    assert not [n for n in names if n.startswith((".venv/", "outputs/", ".git/", "data/"))]
    assert "fedapp/server_app.py" in names


def test_cli_overrides_are_toml_values(tmp_path: Path) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text('num_rounds = 4\n[dataset]\nname = "synthetic-mnist"\n')

    cfg = load_experiment(exp, ["partition.num_clients=3", "runtime.tls=true", "client.lr=0.1", "name=smoke"])

    assert (cfg.num_rounds, cfg.dataset.name, cfg.partition.num_clients) == (4, "synthetic-mnist", 3)
    assert cfg.runtime.tls is True and cfg.client.lr == 0.1 and cfg.name == "smoke"
    assert cfg.runtime.mode == "processes"
    with pytest.raises(ConfigError):
        load_experiment(None, ["partition.no_such_key=1"])
    with pytest.raises(ConfigError):
        load_experiment(None, ["num_rounds"])


def test_cli_reads_a_pyproject_app_config() -> None:
    cfg = load_experiment(project_root() / "pyproject.toml", [])
    assert cfg.partition.num_clients == ExperimentConfig().partition.num_clients


def test_server_certificate_names_loopback_and_is_signed_by_the_ca(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_path, cert_path, key_path = generate_certificates(tmp_path, "127.0.0.1")

    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.issuer == ca.subject
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert key_path.stat().st_mode & 0o077 == 0


def test_node_keys_are_openssh_p384(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    private, public = generate_node_keys(tmp_path, "supernode-0")

    assert load_ssh_public_key(public.read_bytes()).curve.name == "secp384r1"
    assert load_ssh_private_key(private.read_bytes(), password=None).curve.name == "secp384r1"
