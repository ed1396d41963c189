"""A SQLite tracking store's first use, made safe for several processes starting at once (a file lock)."""
from __future__ import annotations

import os
import sqlite3

from hpml.errors import HpmlError

_READY: set[str] = set()


def sqlite_path(uri: str) -> str:
    """The database file of a sqlite:/// URI ('' for an in-memory store)."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    return path.split("?", 1)[0]


def init_sqlite(uri: str) -> None:
    """Create or migrate the store's schema while holding `<db>.lock`.

    MLflow creates the tables on a store's first open with Alembic migrations that are not safe to run
    concurrently: four runs started at once on a fresh mlflow.db all crashed inside the migration. Here the
    first process migrates under an exclusive lock; the others wait (flock blocks), then find the schema
    complete and skip migrating. Costs one store open per process and URI.
    """
    import fcntl

    path = sqlite_path(uri)
    if not path or uri in _READY:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise HpmlError(f"tracking store {uri}: folder {folder} does not exist; create it or fix MLFLOW_TRACKING_URI")
    try:
        lock = open(path + ".lock", "a")
    except OSError as exc:
        raise HpmlError(f"tracking store {uri}: cannot write next to it ({exc.strerror}); use a writable folder "
                        "or a tracking server") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _schema_complete(path):
            from mlflow.tracking._tracking_service.utils import _get_store

            _get_store(uri)  # opening the store runs MLflow's migrations (tracking and registry tables)
    _READY.add(uri)


def _schema_complete(path: str) -> bool:
    """True when the file already holds MLflow's tables (a quick read; no MLflow import)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as con:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error:
        return False
    return {"alembic_version", "experiments", "runs", "registered_models", "model_versions"} <= names
