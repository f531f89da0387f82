"""Name the cause of a SuperNode that cannot join, from the lines Flower writes to its log.

Flower's own messages for TLS and node-authentication refusals are scattered
over retries and say "connection"; the launcher reads each SuperNode's log
when the server is short of nodes (or a node exits) and prints the cause and
the fix in one line. Signatures measured with Flower 1.41 (docs/deployment.md,
troubleshooting table).
"""

from __future__ import annotations

import re
from pathlib import Path

_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"CERTIFICATE_VERIFY_FAILED.*(IP address mismatch|Hostname mismatch|doesn't match)"),
     "the SuperLink's certificate is not issued for the address this node dials (subject alternative name); "
     "reissue it for that host or IP (fedapp.deploy.generate_certificates(dir, host))"),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED"),
     "TLS verification failed: --root-certificates is not the CA that signed the SuperLink's certificate; "
     "ship the SuperLink's ca.crt to the node"),
    (re.compile(r"\[code: 2004\]|Failed to activate SuperNode"),
     "node authentication: this node's public key is not registered; run "
     "`flwr supernode register <node>.pub <connection>` before starting it"),
    (re.compile(r"\[code: 2001\]|SuperNode authentication is enabled"),
     "the SuperLink requires node authentication: start the node with --auth-supernode-private-key and "
     "register its public key"),
    (re.compile(r"Option `--insecure` was set[\s\S]*Connection attempt failed"),
     "a plain (--insecure) node cannot reach the SuperLink: if it serves TLS, drop --insecure and pass "
     "--root-certificates; else check the address and port"),
    (re.compile(r"Connection attempt failed"),
     "the node cannot reach the SuperLink (address, port, firewall, or TLS on one side only)"),
)


def diagnose(log_text: str) -> str | None:
    """The cause and fix for a node log's connection failure, or None when it shows none."""
    clean = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", log_text)
    for pattern, cause in _CAUSES:
        if pattern.search(clean):
            return cause
    return None


def diagnose_file(path: Path, tail_bytes: int = 200_000) -> str | None:
    """:func:`diagnose` on the end of a log file (missing file: None)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - tail_bytes))
            return diagnose(fh.read().decode(errors="replace"))
    except OSError:
        return None
