"""A throwaway local PostgreSQL server: ``initdb`` a cluster in a temp folder and start it with
``pg_ctl`` on a free port.  For the store tests, the fleet benchmark, and trying cdcca on
PostgreSQL on one machine; production runs its own PostgreSQL and passes ``db_url``.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` (or
``nobody``) user.  Needs Debian's ``postgresql`` package (or any install with pg_ctl on PATH).
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user() -> tuple[list[str], str | None]:
    """Command prefix that drops root, and the user to chown the cluster to."""
    if os.geteuid() != 0:
        return [], None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"], user
    raise RuntimeError("running as root and no unprivileged user to run PostgreSQL as")


class PostgresServer:
    def __init__(self) -> None:
        bindir = _pg_bin()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                                    "install Debian's `postgresql` package (.ci/run does)")
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="cdcca-pg-"))
        self.port = _free_port()
        self.prefix, user = _as_user()
        if user is not None:
            shutil.chown(self.dir, user)
        data, sock = self.dir / "data", self.dir
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        opts = (f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=100")
        self._run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.prefix, str(self.bin / tool), *args], check=True,
                       capture_output=True, cwd=self.dir)

    def new_database(self) -> str:
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
