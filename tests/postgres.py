"""A throwaway PostgreSQL server for tests: the store is tested on the real thing, not a mock.

:func:`running_postgres` starts a private server from the distribution's
binaries (``/usr/lib/postgresql/<version>/bin``) in a temporary folder on a free
port, and removes it afterwards; or uses ``$FEDAPP_TEST_POSTGRES_URL`` when set
(a server someone else runs). What is missing (binaries, the ``postgres`` user
needed to run them as root, the driver) raises :class:`PostgresUnavailable`
with the reason, for ``pytest.skip``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

URL_ENV = "FEDAPP_TEST_POSTGRES_URL"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be had here; the message says why."""


def _bin_dir() -> Path:
    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parents[1].name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresUnavailable("not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_postgres() -> Iterator[str]:
    """Yield the SQLAlchemy URL of a PostgreSQL server that is up for the duration.

    The server trusts local connections of user ``fedapp`` and runs with
    ``fsync=off`` (its data is thrown away). Its folder is made under ``/tmp``
    because initdb, run as ``postgres`` when we are root, must be able to reach
    it (pytest's ``tmp_path`` sits under root's 0700 folders).
    """
    external = os.environ.get(URL_ENV)
    if external:
        yield external
        return
    if importlib.util.find_spec("psycopg") is None:
        raise PostgresUnavailable("the PostgreSQL driver is not installed (pip install 'psycopg[binary]')")
    bin_dir = _bin_dir()
    as_user: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server") from None
        runuser = shutil.which("runuser")
        if runuser is None:
            raise PostgresUnavailable("running as root and runuser is missing (needed to start PostgreSQL)")
        as_user = [runuser, "-u", "postgres", "--"]

    folder = Path(tempfile.mkdtemp(prefix="fedapp-pg-", dir="/tmp"))
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data = folder / "data"
    log = folder / "server.log"
    port = _free_port()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, check=False)

    started = False
    try:
        done = run(str(bin_dir / "initdb"), "-D", str(data), "-U", "fedapp", "--auth=trust", "--no-sync", "-E", "UTF8")
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(done.stderr or done.stdout).strip()[-500:]}")
        options = f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -c fsync=off -c full_page_writes=off"
        done = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-500:] if log.exists() else done.stderr
            raise PostgresUnavailable(f"PostgreSQL did not start: {tail.strip()}")
        started = True
        yield f"postgresql+psycopg://fedapp@127.0.0.1:{port}/postgres"
    finally:
        if started:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
