"""A throwaway PostgreSQL cluster for the team-server tests: Debian's binaries, a temp dir, a free port."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time


def pg_bindir() -> str | None:
    """Folder of initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (not on PATH)."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(dirs[-1]) if dirs else None


class Cluster:
    """initdb + pg_ctl in a temp dir, listening on 127.0.0.1:port only, trust auth for the superuser
    `postgres` (loopback, a test). PostgreSQL refuses to run as root: as root the binaries run as the
    `postgres` account the Debian package creates."""

    def __init__(self, port: int):
        self.port = port
        self.bindir = pg_bindir()
        self.root = tempfile.mkdtemp(prefix="hpml-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "postgres.log")
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")  # KeyError: the postgresql package is not installed
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        out = subprocess.run(self.as_user + [os.path.join(self.bindir, args[0]), *args[1:]], capture_output=True,
                             text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stdout[-1500:]}{out.stderr[-1500:]}")

    def start(self) -> str:
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        # fsync off: a test cluster that dies with its temp dir need not survive a crash (saves seconds).
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", "start")
        return f"postgresql://postgres@127.0.0.1:{self.port}/hpml"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            time.sleep(0.1)
            shutil.rmtree(self.root, ignore_errors=True)
