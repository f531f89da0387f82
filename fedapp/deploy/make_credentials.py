"""Key material for a TLS SuperLink with authenticated SuperNodes, and its registration.

Two one-shot steps of a deployment (compose.yaml runs both as services):

``python -m fedapp.deploy.make_credentials --out /credentials --host superlink --nodes 2``
    writes ``ca.crt``, ``server.pem`` and ``server.key`` (a self-signed CA and a server
    certificate whose SANs are ``--host``, comma-separated, plus 127.0.0.1 and localhost,
    which the SuperLink's own SuperExec dials) and one EC key pair per SuperNode
    (``supernode-<i>`` and ``supernode-<i>.pub``). Idempotent: files that exist and fit
    are kept, so re-running it leaves a running federation's credentials alone.

``python -m fedapp.deploy.make_credentials --out /credentials --nodes 2 --register superlink:9092``
    registers every SuperNode's public key with the SuperLink (``flwr supernode
    register``, over TLS with ``ca.crt``), retrying until the SuperLink answers. A key
    that is already registered counts as registered. The SuperNodes must start after it:
    with ``--enable-supernode-auth`` the SuperLink admits registered keys only.

The files belong to whoever runs this (uid 10001 in the image); ``--owner UID:GID``
hands them to another user when run as root. Private keys are mode 0600.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from fedapp.deploy.credentials import generate_certificates, generate_node_keys, server_hosts, subject_name
from fedapp.deploy.errors import LaunchError
from fedapp.deploy.flwr_commands import register_node, write_connection
from fedapp.deploy.processes import environment

SERVER_FILES = ("ca.crt", "server.pem", "server.key")


def node_name(index: int) -> str:
    """File name of SuperNode ``index``'s private key (``.pub``: its public key)."""
    return f"supernode-{index}"


def certificate_fits(cert_path: Path, hosts: Sequence[str]) -> bool:
    """Whether the server certificate at ``cert_path`` names every host and is valid > 1 day."""
    import datetime as dt

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    fresh = cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    return fresh and all(subject_name(h) in san for h in hosts)


def create(out: Path, host: str, nodes: int, owner: tuple[int, int] | None = None) -> list[Path]:
    """Write what is missing (or stale) of the server's certificates and the node keys."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    server = [out / name for name in SERVER_FILES]
    hosts = server_hosts(host)
    if not (all(p.is_file() for p in server) and certificate_fits(server[1], hosts)):
        written += generate_certificates(out, hosts, days=90)
    for i in range(nodes):
        private, public = out / node_name(i), out / f"{node_name(i)}.pub"
        if not (private.is_file() and public.is_file()):
            written += generate_node_keys(out, node_name(i))
    for path in [out, *out.iterdir()] if owner else []:
        os.chown(path, *owner)
    return written


def register(out: Path, superlink: str, nodes: int, timeout_s: float = 120.0) -> list[str]:
    """Register ``supernode-0.pub`` ... with ``superlink`` (TLS, CA ``out/ca.crt``)."""
    home = Path(tempfile.mkdtemp(prefix="fedapp-register-"))
    write_connection(home, superlink, (out / "ca.crt").resolve())
    env = environment(home, marker="register")
    outcomes = []
    for i in range(nodes):
        public = out / f"{node_name(i)}.pub"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                register_node(env, public, home)
                outcomes.append(f"{public.name}: registered")
                break
            except LaunchError as err:
                if "already in use" in str(err).lower():
                    outcomes.append(f"{public.name}: already registered")
                    break
                if time.monotonic() > deadline or not public.is_file():
                    raise
            time.sleep(2.0)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedapp.deploy.make_credentials", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="/credentials", help="folder of the credentials (default /credentials)")
    parser.add_argument("--host", default="superlink",
                        help="the SuperLink's names as nodes and CLI reach it, comma-separated (SANs; loopback added)")
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (keys supernode-0 ...)")
    parser.add_argument("--owner", metavar="UID:GID", help="chown the files (when run as root)")
    parser.add_argument("--register", metavar="HOST:PORT",
                        help="instead of writing files, register the node keys with this SuperLink")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=120.0, help="with --register: seconds to wait per key")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.register:
            for line in register(out, args.register, args.nodes, args.timeout):
                print(line)
        else:
            owner = tuple(int(v) for v in args.owner.split(":")) if args.owner else None
            written = create(out, args.host, args.nodes, owner)  # type: ignore[arg-type]
            kept = sorted({p.name for p in out.iterdir()} - {p.name for p in written})
            print(f"wrote {sorted(p.name for p in written)}; kept {kept} in {out}")
    except (LaunchError, OSError, ValueError) as err:
        print(f"make_credentials: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
