"""`hpml server`: a team tracking server (mlflow server on PostgreSQL, proxied artifacts, basic-auth users)."""
from __future__ import annotations

import http.client
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from hpml.errors import HpmlError, UsageError

# The install line the README and the errors give; hpml never bundles a database of its own.
POSTGRES_INSTALL = "sudo apt-get install -y postgresql"
DEFAULT_DB_URI = "postgresql://hpml@127.0.0.1:5432/hpml"
AUTH_DB_SUFFIX = "_auth"  # the users/permissions database beside the tracking one
ADMIN_USER_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
DEFAULT_ADMIN = "admin"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_CACHE_TTL_S = 60
# One server worker runs each request on a thread of anyio's default pool (40 threads: MLflow mounts its Flask
# app through a WSGI middleware). MLflow's log_batch holds a database session while it opens a second one, so
# SQLAlchemy's default pool (5 + 10 overflow) can run dry with every holder waiting for its second connection:
# a crowd of runs then fails after 30 s with "QueuePool limit of size 5 overflow 10 reached". With more
# connections than threads, some thread can always finish.
REQUEST_THREADS = 40
POOL_ENV = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "5", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(REQUEST_THREADS)}
MIN_PASSWORD = 12  # MLflow's basic-auth password policy (mlflow.utils.validation._validate_password)
# READ: everyone sees every run and model (the report reads the whole store); writing takes EDIT, granted
# per experiment and registered model (docs/team-server.md). The creator of either gets MANAGE.
DEFAULT_PERMISSION = "READ"
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


@dataclass(frozen=True)
class ServerConfig:
    backend_store_uri: str = DEFAULT_DB_URI
    auth_database_uri: str = ""  # empty = the backend's server, database <name>_auth
    artifacts_destination: str = "mlartifacts"  # a local folder or any MLflow artifact URI (s3://, gs://, …)
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 4
    default_permission: str = DEFAULT_PERMISSION
    allowed_hosts: str = ""  # empty = MLflow's default (localhost and private addresses)


def database_name(uri: str) -> str:
    return urlsplit(uri).path.lstrip("/")


def with_database(uri: str, name: str) -> str:
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path="/" + name))


def redact(uri: str) -> str:
    """The URI with its password replaced, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_uri(uri: str, what: str) -> None:
    parts = urlsplit(uri)
    if not parts.scheme.startswith("postgresql"):
        raise UsageError(f"{what} must be a PostgreSQL URI like {DEFAULT_DB_URI}, got {redact(uri)!r} "
                         "(SQLite locks under concurrent writers: a team server runs on PostgreSQL)")
    name = database_name(uri)
    if not name or "/" in name:
        raise UsageError(f"{what} {redact(uri)!r} names no database: end it with /DBNAME, e.g. {DEFAULT_DB_URI}")


def _connect(uri: str, dbname: str):
    """A psycopg connection to `dbname` on the server of `uri` (libpq reads the URI MLflow's SQLAlchemy does)."""
    try:
        import psycopg
    except ImportError:  # a declared dependency, missing from an environment hpml was copied into
        raise HpmlError("psycopg, the PostgreSQL driver, is not installed: pip install 'psycopg[binary]'") from None

    parts = urlsplit(uri)
    dsn = with_database(urlunsplit(parts._replace(scheme="postgresql")), dbname)  # drop a +driver suffix
    try:
        return psycopg.connect(dsn, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        detail = " ".join(str(exc).split())
        raise HpmlError(f"cannot connect to PostgreSQL at {redact(dsn)} ({detail}): install it "
                        f"({POSTGRES_INSTALL}), start it, and check the user and password in the URI") from None


def database_exists(uri: str) -> bool:
    name = database_name(uri)
    try:
        _connect(uri, name).close()
        return True
    except HpmlError as exc:
        if f'database "{name}" does not exist' not in str(exc):
            raise
        return False


def ensure_database(uri: str) -> bool:
    """Create the URI's database when it is missing (through the `postgres` maintenance database, as
    createdb does). Returns True when it was created. The URI's user needs the CREATEDB right for that."""
    import psycopg
    from psycopg import sql

    name = database_name(uri)
    if database_exists(uri):
        return False
    # autocommit: CREATE DATABASE cannot run inside a transaction
    with _connect(uri, "postgres") as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return False  # another `hpml server` created it meanwhile
        except psycopg.Error as exc:
            user = parts_user(uri)
            raise HpmlError(f"cannot create database {name!r} ({' '.join(str(exc).split())}): create it yourself "
                            f"(sudo -u postgres createdb -O {user} {name}) or grant {user} CREATEDB") from None
    return True


def parts_user(uri: str) -> str:
    return urlsplit(uri).username or "the connecting user"


def admin_exists(auth_uri: str, username: str) -> bool:
    """Does the basic-auth store already hold this user? (False for a fresh database without tables.)"""
    with _connect(auth_uri, database_name(auth_uri)) as conn:
        if not conn.execute("SELECT to_regclass('public.users') IS NOT NULL").fetchone()[0]:
            return False
        return conn.execute("SELECT 1 FROM users WHERE username = %s", (username,)).fetchone() is not None


def auth_ini(auth_uri: str, default_permission: str, admin: str) -> str:
    """The basic-auth configuration MLflow reads from MLFLOW_AUTH_CONFIG_PATH. The admin's password is
    not in it: MLflow takes it from MLFLOW_AUTH_ADMIN_PASSWORD, once, when it creates the admin."""
    return "\n".join([
        "[mlflow]",
        f"default_permission = {default_permission}",
        f"database_uri = {auth_uri}",
        f"admin_username = {admin}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        # Basic auth re-hashes the password (PBKDF2) on every request: a training run makes ~100 requests, and
        # uncached that cost ~1.5 s each on a busy 2-core machine. The price of the cache: a password change
        # or a deleted user reaches the other workers only after this many seconds.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}",
        "",
    ])


def client_uri(cfg: ServerConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    return f"http://{host}:{cfg.port}"


def prepare(cfg: ServerConfig, env: dict[str, str]) -> tuple[list[str], str, str]:
    """Check the inputs, create the databases, write the auth config. Returns (mlflow server command,
    auth config path, admin username). Nothing is started yet."""
    check_uri(cfg.backend_store_uri, "--backend-store-uri")
    auth_uri = cfg.auth_database_uri or with_database(cfg.backend_store_uri,
                                                      database_name(cfg.backend_store_uri) + AUTH_DB_SUFFIX)
    check_uri(auth_uri, "--auth-database-uri")
    if database_name(auth_uri) == database_name(cfg.backend_store_uri) and \
            urlsplit(auth_uri).netloc == urlsplit(cfg.backend_store_uri).netloc:
        raise UsageError("--auth-database-uri must name another database than --backend-store-uri "
                         "(MLflow migrates each schema on its own)")
    if cfg.default_permission not in PERMISSIONS:
        raise UsageError(f"--default-permission must be one of {', '.join(PERMISSIONS)}, got {cfg.default_permission!r}")
    admin = env.get(ADMIN_USER_ENV) or DEFAULT_ADMIN
    # The admin's password is checked before anything is created: a refused start leaves nothing behind.
    if not (database_exists(auth_uri) and admin_exists(auth_uri, admin)):
        password = env.get(ADMIN_PASSWORD_ENV, "")
        if len(password) < MIN_PASSWORD:
            raise UsageError(f"the first start creates the admin user {admin!r}: set {ADMIN_PASSWORD_ENV} to "
                             f"its password (at least {MIN_PASSWORD} characters), e.g. "
                             f"{ADMIN_PASSWORD_ENV}=\"$(openssl rand -base64 18)\"")
    ensure_database(cfg.backend_store_uri)
    ensure_database(auth_uri)
    if "://" not in cfg.artifacts_destination:
        os.makedirs(cfg.artifacts_destination, exist_ok=True)
    fd, ini = tempfile.mkstemp(prefix="hpml-basic-auth-", suffix=".ini")  # 0600: it holds the db password
    with os.fdopen(fd, "w") as f:
        f.write(auth_ini(auth_uri, cfg.default_permission, admin))
    artifacts = cfg.artifacts_destination
    if "://" not in artifacts:
        artifacts = os.path.abspath(artifacts)  # the server's working directory is not the user's concern
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    cmd = [mlflow, "server", "--app-name", "basic-auth", "--backend-store-uri", cfg.backend_store_uri,
           "--artifacts-destination", artifacts, "--host", cfg.host, "--port", str(cfg.port),
           "--workers", str(cfg.workers)]
    if cfg.allowed_hosts:
        cmd += ["--allowed-hosts", cfg.allowed_hosts]
    return cmd, ini, admin


def usage_text(cfg: ServerConfig, admin: str) -> str:
    uri = client_uri(cfg)
    return "\n".join([
        f"hpml server: {uri} (tracking: {redact(cfg.backend_store_uri)}, artifacts: {cfg.artifacts_destination}, "
        f"default permission {cfg.default_permission})",
        "Point clients at it:",
        f"  export MLFLOW_TRACKING_URI={uri}",
        "  export MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password>",
        f"Admin {admin!r} creates users and grants permissions (docs/team-server.md); UI at {uri}",
    ])


def wait_healthy(uri: str, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Wait until the server answers /health (True) or its process ends (False: its own log says why)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (OSError, http.client.HTTPException):  # not listening yet, or a half-started worker
            time.sleep(0.5)
    return proc.poll() is None


def serve(cfg: ServerConfig, echo=print) -> int:
    """Prepare, start `mlflow server`, print how to connect once it answers, and wait; Ctrl-C stops it.
    Returns the server's exit status."""
    env = dict(os.environ)
    cmd, ini, admin = prepare(cfg, env)
    env["MLFLOW_AUTH_CONFIG_PATH"] = ini
    # The auth app's CSRF protection needs one secret shared by all workers; a fresh one per start only
    # logs UI users out on a restart (set it yourself to keep their sessions).
    env.setdefault(SECRET_KEY_ENV, secrets.token_urlsafe(32))
    # MLflow's background job runner serves GenAI scorers, which hpml does not use: it would only cost
    # worker processes and CPU. Set it to true to have them anyway.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    for name, value in POOL_ENV.items():  # yours win when set
        env.setdefault(name, value)
    try:
        # Same process group: Ctrl-C in the terminal, or a kill of the group, reaches the server's workers too.
        proc = subprocess.Popen(cmd, env=env)

        def forward(signum, _frame):  # a signal sent to hpml alone: pass it on, then wait for the exit
            if proc.poll() is None:
                proc.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        try:
            if wait_healthy(client_uri(cfg), proc):
                echo(usage_text(cfg, admin))
            return proc.wait()
        finally:
            if proc.poll() is None:  # hpml itself failed: never leave a server without its config behind
                proc.terminate()
                proc.wait()
    finally:
        os.unlink(ini)
