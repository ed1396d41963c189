"""hpml's MLflow plugin: `mlflow run` of the hpml project fails in seconds, in one line, on a dead tracking server.

`mlflow run` talks to the tracking server before hpml's own code starts (it looks up or creates the
experiment, then creates the run), and MLflow's client retries a dead server for about four minutes and
then prints a traceback. Of MLflow's plugin points, only a request header provider
(`mlflow.request_header_provider`, declared in pyproject.toml) runs inside every HTTP request before it is
sent, `get_experiment_by_name` included; run context providers run later, at run creation. Its
`in_context()` is where this one checks /health once per server (5 s, no retries) and exits with hpml's
one-line error. It never adds a header.

It acts only in a process whose running click command is `mlflow run` on a local folder whose MLproject is
named hpml: any other program in the same environment (a notebook, `mlflow server`, another project's
`mlflow run`, hpml itself) sees no change. A git URI is fetched after the first request, so it is not
recognised; the entry point's own `tracking.connect` check still applies there.
"""
from __future__ import annotations

import os
import sys
import tempfile

from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

_checked: set[str] = set()  # servers that answered /health in this process: one check per server
_is_hpml_run: bool | None = None  # decided once per process (the first request comes from the command)


def lost_marker(mlflow_run_pid: int) -> str:
    """A file the entry point writes when it ends because the server was lost (hpml.outage): the `mlflow
    run` process that started it then exits at its next request, instead of retrying the dead server for
    minutes to mark the run FAILED (the entry point's one line already said what happened)."""
    return os.path.join(tempfile.gettempdir(), f"hpml-server-lost-{mlflow_run_pid}")


def _started() -> float:
    import psutil

    return psutil.Process().create_time()


def _hpml_mlflow_run() -> bool:
    global _is_hpml_run
    if _is_hpml_run is None:
        _is_hpml_run = False
        cli = sys.modules.get("mlflow.cli")
        if cli is None:  # mlflow's CLI is not even imported: not `mlflow run`
            return False
        import click

        ctx = click.get_current_context(silent=True)
        if ctx is None or ctx.command is not getattr(cli, "run", None):
            return False
        folder = str(ctx.params.get("uri") or "")
        _is_hpml_run = os.path.isfile(os.path.join(folder, "MLproject")) and _project_name(folder) == "hpml"
    return _is_hpml_run


def _project_name(folder: str) -> str:
    import yaml

    try:
        with open(os.path.join(folder, "MLproject")) as f:
            return str((yaml.safe_load(f) or {}).get("name", ""))
    except (OSError, yaml.YAMLError):
        return ""


class FailFastTrackingServer(RequestHeaderProvider):
    """Adds no header; under `mlflow run` of hpml, checks the tracking server before MLflow's first request."""

    def in_context(self) -> bool:
        if not _hpml_mlflow_run():
            return False
        import mlflow

        uri = mlflow.get_tracking_uri().rstrip("/")
        if not uri.startswith(("http://", "https://")):
            return False
        if uri in _checked:
            marker = lost_marker(os.getpid())
            if os.path.exists(marker):  # the entry point lost the server and said so: end quietly
                fresh = os.path.getmtime(marker) >= _started()  # not left behind by an earlier process of this PID
                os.remove(marker)
                if fresh:
                    raise SystemExit(3)
            return False
        from hpml import tracking
        from hpml.errors import HpmlError

        try:
            tracking.check_health(uri)
        except HpmlError as exc:
            # SystemExit, not an exception: MLflow logs and ignores a provider's exceptions
            print(f"hpml: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(exc.exit_code) from None
        _checked.add(uri)
        return False

    def request_headers(self) -> dict:
        return {}
