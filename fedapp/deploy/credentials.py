"""Key material for a TLS SuperLink and authenticated SuperNodes, written as files.

Flower's processes take certificates and keys only as file paths, so these helpers
write PEM/OpenSSH files instead of returning key objects. They start no process and
need nothing but ``cryptography`` (imported lazily: plain runs never load it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Sequence


LOOPBACK = ("127.0.0.1", "localhost")
"""Always in a server certificate: the SuperLink's own SuperExec (which runs the ServerApp)
dials the Runtime API at 127.0.0.1 over the same TLS port, so a certificate that names only
the host's public address stops every run from starting."""


def subject_name(host: str):  # -> cryptography.x509.GeneralName
    """``host`` as an IP-address SAN when it parses as one, else as a DNS-name SAN."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def server_hosts(hosts: str | Sequence[str]) -> list[str]:
    """The SANs of a server certificate: ``hosts`` (a list, or one comma-separated string) plus loopback, no repeats."""
    names = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    return list(dict.fromkeys([*(h.strip() for h in names if h.strip()), *LOOPBACK]))


def generate_certificates(
    directory: str | Path, host: str | Sequence[str] = "127.0.0.1", *, days: int = 30
) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for ``host``, written as PEM files.

    gRPC checks the server's subject alternative names, so the server certificate
    names every entry of ``host`` (one name, a comma-separated string or a list; IPs
    or DNS names) plus the loopback names (:data:`LOOPBACK`). Returns
    ``(ca.crt, server.pem, server.key)``; the key is mode 0600. A CA per deployment
    for tests and small federations; use your organisation's CA where there is one.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    hosts = server_hosts(host)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid = {"not_valid_before": now - dt.timedelta(minutes=5), "not_valid_after": now + dt.timedelta(days=days)}

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedapp deployment CA")])
    ca_cert = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)  # fmt: skip
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
            public_key=server_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.SubjectAlternativeName([subject_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = (folder / "ca.crt", folder / "server.pem", folder / "server.key")
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(server_cert.public_bytes(pem))
    paths[2].write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


def generate_node_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """An EC (NIST P-384) key pair for one SuperNode, in OpenSSH format.

    The SuperNode signs its requests with the private key
    (``--auth-supernode-private-key``); the SuperLink admits it only after the public
    key was registered (``flwr supernode register``, see
    :func:`fedapp.deploy.flwr_cli.register_node`). Returns ``(private, public)``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public
