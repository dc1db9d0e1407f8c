"""The team layout on one machine: a private PostgreSQL cluster and `mlflow server` on top of it.

PostgreSQL (Debian's `postgresql` package) runs from a data folder of its own, as the `postgres`
user when we are root (PostgreSQL refuses to run as root), on its own port, so it never touches a
system cluster. It holds three databases: `mlflow` (runs and registry, the tracking server's backend
store), `mlflow_auth` (the tracking server's users and permissions) and `animal` (the catalogue). The
tracking server proxies artifacts to a folder or a bucket and lets no one in without a login
(MLflow's basic-auth, team/tracking_auth.py).

Each job has its own PostgreSQL role with a generated password in a 0600 file of its own: the
catalogue's writer (extract, populate) owns the catalogue, its reader (train, score, the page) may
only SELECT, the tracking server's role owns only its two databases. The cluster's superuser is for
`team` alone.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

from steps import defaults

PROJECT = Path(__file__).resolve().parents[1]

USER = "animal"  # the cluster's superuser (initdb's bootstrap role): used by `team` alone
WRITER, READER, TRACKING = "animal_writer", "animal_reader", "mlflow_server"
CATALOGUE_ROLES = {"writer": WRITER, "reader": READER}  # what `team env --role` hands out
# database -> its owner: the tracking server's store and its users, the catalogue
DATABASES = {"mlflow": TRACKING, "mlflow_auth": TRACKING, "animal": WRITER}
ADMIN = "admin"  # the tracking server's admin user, created at its first start
SERVICE_USER = "postgres"


class TeamError(Exception):
    """Something the user can fix; the message is one line that says how."""


@dataclass(frozen=True)
class Layout:
    """Where everything of one team installation lives and listens."""

    home: Path = defaults.TEAM_DIR
    host: str = defaults.TEAM_HOST
    postgres_port: int = defaults.TEAM_POSTGRES_PORT
    tracking_port: int = defaults.TEAM_TRACKING_PORT

    @property
    def postgres_dir(self) -> Path:  # owned by the service user: data, socket, log
        return self.home.resolve() / "postgres"

    @property
    def data(self) -> Path:
        return self.postgres_dir / "data"

    @property
    def password_file(self) -> Path:
        return self.home.resolve() / "postgres.password"

    @property
    def pid_file(self) -> Path:
        return self.home.resolve() / "mlflow-server.pid"

    @property
    def tracking_log(self) -> Path:
        return self.home.resolve() / "mlflow-server.log"

    def role_password_file(self, role: str) -> Path:
        return self.password_file if role == USER else self.home.resolve() / f"postgres-{role}.password"

    def password(self, role: str = USER) -> str:
        return self.role_password_file(role).read_text().strip()

    @property
    def auth_config(self) -> Path:  # basic_auth.ini: MLFLOW_AUTH_CONFIG_PATH of the tracking server
        return self.home.resolve() / "basic_auth.ini"

    @property
    def secret_key_file(self) -> Path:  # the server's Flask secret (CSRF), the same in every worker
        return self.home.resolve() / "tracking-secret.key"

    @property
    def users_dir(self) -> Path:  # <name>.password and <name>.env of each person `team user add` made
        return self.home.resolve() / "users"

    def user_password_file(self, user: str) -> Path:
        return self.home.resolve() / "admin.password" if user == ADMIN else self.users_dir / f"{user}.password"

    def user_password(self, user: str) -> str:
        return self.user_password_file(user).read_text().strip()

    def client_host(self) -> str:
        """The address clients on this machine use (a wildcard bind is reached on loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def database_url(self, database: str, driver: str = "postgresql", password: bool = False, role: str = USER) -> str:
        """Without the password by default: URLs end up in run parameters and logs; libpq takes the
        password from PGPASSWORD (or ~/.pgpass) instead."""
        secret = f":{self.password(role)}" if password else ""
        return f"{driver}://{role}{secret}@{self.client_host()}:{self.postgres_port}/{database}"

    def client_environment(self, catalogue_role: str = "writer", user: str = ADMIN) -> dict[str, str]:
        """What a client process needs in its environment to use this installation: the tracking
        server's login of `user` and the catalogue as `catalogue_role` (writer or reader)."""
        role = CATALOGUE_ROLES[catalogue_role]
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri(),
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.user_password(user),
            "ANIMAL_DB": self.database_url("animal", role=role),
            "PGPASSWORD": self.password(role),
        }

    def tracking_uri(self) -> str:
        return f"http://{self.client_host()}:{self.tracking_port}"


def secret_file(path: Path) -> str:
    """The secret in `path`, generated (and the file created 0600, before anything is in it) if
    there is none yet."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


# --- PostgreSQL ---------------------------------------------------------------------------------


def postgres_bin(program: str) -> str:
    """A PostgreSQL server program: Debian keeps them off PATH, under /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return found[-1]
    if shutil.which(program):
        return shutil.which(program)
    raise TeamError(f"PostgreSQL's {program} is not installed: run `make postgres` (apt-get install postgresql) and try again")


def _as_service_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the postgres user."""
    if os.geteuid() != 0:
        return command
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise TeamError("running as root needs the `postgres` user that Debian's postgresql package creates: run `make postgres`") from None
    return ["runuser", "-u", SERVICE_USER, "--", *command]


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(_as_service_user(command), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise TeamError(f"{what} failed: {detail[-1] if detail else f'exit code {result.returncode}'}")
    return result.stdout


def _give_to_service_user(folder: Path) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(SERVICE_USER)
    for path in (folder, *folder.rglob("*")):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    # The service user must be able to reach its folder: every parent must be searchable.
    for parent in folder.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise TeamError(
                f"the postgres user cannot enter {parent} (mode {oct(os.stat(parent).st_mode)[-3:]}): "
                "put the team folder elsewhere, e.g. TEAM_DIR=/var/lib/animal-team"
            )


def init_postgres(layout: Layout) -> None:
    """Create the cluster once: password authentication on TCP, listening where the layout says."""
    if (layout.data / "PG_VERSION").is_file():
        return
    layout.home.mkdir(parents=True, exist_ok=True)
    secret_file(layout.password_file)
    layout.postgres_dir.mkdir(mode=0o700, exist_ok=True)
    (layout.postgres_dir / "run").mkdir(exist_ok=True)
    password_copy = layout.postgres_dir / "initdb.password"
    password_copy.write_text(layout.password() + "\n")
    _give_to_service_user(layout.postgres_dir)
    try:
        _run(
            [
                postgres_bin("initdb"),
                "-D",
                str(layout.data),
                "-U",
                USER,
                f"--pwfile={password_copy}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            "initdb",
        )
    finally:
        password_copy.unlink(missing_ok=True)
    settings = {
        "listen_addresses": f"'{layout.host}'",
        "port": str(layout.postgres_port),
        "unix_socket_directories": f"'{layout.postgres_dir / 'run'}'",
        "max_connections": "200",  # tracking-server workers, tune workers and populates all connect
    }
    conf = layout.data / "postgresql.conf"
    _append_as_service_user(conf, "".join(f"{k} = {v}\n" for k, v in settings.items()))
    if not _loopback(layout.host):
        # Other machines: password (scram) authentication from anywhere the firewall lets through.
        _append_as_service_user(layout.data / "pg_hba.conf", "host all all all scram-sha-256\n")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _append_as_service_user(file: Path, text: str) -> None:
    with file.open("a") as handle:  # root may write it; ownership stays with the service user
        handle.write(text)


def postgres_running(layout: Layout) -> bool:
    if not (layout.data / "PG_VERSION").is_file():
        return False
    command = _as_service_user([postgres_bin("pg_ctl"), "status", "-D", str(layout.data)])
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (binding it fails)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT left by a stopped server is not "in use"
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def running_port(layout: Layout) -> int | None:
    """The port the cluster's running postmaster listens on (line 4 of postmaster.pid), if known."""
    try:
        return int((layout.data / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, IndexError, ValueError):
        return None


def start_postgres(layout: Layout) -> None:
    if postgres_running(layout):
        port = running_port(layout)
        if port is not None and port != layout.postgres_port:
            raise TeamError(
                f"PostgreSQL of {layout.home} is already running on port {port}, not {layout.postgres_port}: "
                f"stop it first (make team-down), then make team-up TEAM_ARGS='--postgres-port {layout.postgres_port}'"
            )
    else:
        if port_in_use(layout.host, layout.postgres_port):
            # pg_ctl would only say "Examine the log output".
            raise TeamError(
                f"port {layout.postgres_port} on {layout.host} is in use (another PostgreSQL?): choose a free one, "
                f"e.g. make team-up TEAM_ARGS='--postgres-port {layout.postgres_port + 1}'"
            )
        init_postgres(layout)
        # -p on the command line wins over the port written into postgresql.conf when the cluster
        # was created, so --postgres-port is honoured by a cluster that already exists.
        _run(
            [
                postgres_bin("pg_ctl"),
                "start",
                "-D",
                str(layout.data),
                "-l",
                str(layout.postgres_dir / "postgres.log"),
                "-o",
                f"-p {layout.postgres_port}",
                "-w",
                "-t",
                "60",
            ],
            f"starting PostgreSQL (log: {layout.postgres_dir / 'postgres.log'})",
        )
    _create_databases(layout)


def _create_databases(layout: Layout) -> None:
    """The roles (passwords from their files) and the databases, each owned by its job's role; on a
    cluster made before the roles existed, what the superuser owned there is handed over."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(layout.database_url("postgres", password=True), autocommit=True, connect_timeout=10) as conn:
        existing = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
        for role in (WRITER, READER, TRACKING):
            if role not in existing:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            # The SCRAM verifier, computed here (as psql's \password does): the password itself never
            # reaches the server, so no statement in its log can show it.
            verifier = conn.pgconn.encrypt_password(secret_file(layout.role_password_file(role)).encode(), role.encode(), b"scram-sha-256")
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier.decode())))
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for database, owner in DATABASES.items():
            # Names are our constants; CREATE DATABASE takes no parameters, hence sql.Identifier.
            if database not in existing:
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(owner)))
            else:
                conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), sql.Identifier(owner)))
            # No one else may connect: not the catalogue's roles to the tracking store, nor the reverse.
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
    for database, owner in DATABASES.items():
        _hand_over(layout, database, owner)
    catalogue_database(layout, "animal")


def catalogue_database(layout: Layout, name: str) -> str:
    """A catalogue database (created if missing) owned by the writer, readable by the reader,
    including the tables the writer creates later; its URL for the writer (password from PGPASSWORD)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(layout.database_url("postgres", password=True), autocommit=True, connect_timeout=10) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(WRITER)))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(sql.Identifier(name), sql.Identifier(WRITER), sql.Identifier(READER))
        )
    with psycopg.connect(layout.database_url(name, password=True), autocommit=True, connect_timeout=10) as conn:
        reader, writer = sql.Identifier(READER), sql.Identifier(WRITER)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(reader))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(reader))
        conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public GRANT SELECT ON TABLES TO {}").format(writer, reader))
    return layout.database_url(name, role=WRITER)


def _hand_over(layout: Layout, database: str, owner: str) -> None:
    """Tables, sequences, views and types the superuser owns in `database` (a cluster from before the
    roles) to `owner`. Tables first: a table takes the sequences of its columns along."""
    import psycopg
    from psycopg import sql

    owned = {
        "TABLE": "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
        "AND c.relkind IN ('r', 'p') AND pg_get_userbyid(c.relowner) = %s",
        "VIEW": "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
        "AND c.relkind = 'v' AND pg_get_userbyid(c.relowner) = %s",
        "SEQUENCE": "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
        "AND c.relkind = 'S' AND pg_get_userbyid(c.relowner) = %s",
        "TYPE": "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = 'public' "
        "AND t.typtype = 'e' AND pg_get_userbyid(t.typowner) = %s",
    }
    with psycopg.connect(layout.database_url(database, password=True), autocommit=True, connect_timeout=10) as conn:
        for kind, query in owned.items():
            for (name,) in conn.execute(query, (USER,)).fetchall():
                statement = sql.SQL("ALTER {} {} OWNER TO {}").format(sql.SQL(kind), sql.Identifier(name), sql.Identifier(owner))
                conn.execute(statement)


def stop_postgres(layout: Layout) -> None:
    if postgres_running(layout):
        _run([postgres_bin("pg_ctl"), "stop", "-D", str(layout.data), "-m", "fast", "-w", "-t", "60"], "stopping PostgreSQL")


# --- the tracking server ------------------------------------------------------------------------


def start_tracking_server(
    layout: Layout, artifacts: str, allowed_hosts: str | None = None, workers: int = 2, timeout: float = 120
) -> subprocess.Popen | None:
    """`mlflow server --app-name basic-auth` on the cluster's `mlflow` database, its users in
    `mlflow_auth`, proxying artifacts to `artifacts` (a folder or s3://bucket/prefix). Returns the
    process it started, or None if one was already answering."""
    if tracking_server_answers(layout.tracking_uri()):
        return None
    if port_in_use(layout.host, layout.tracking_port):
        raise TeamError(
            f"port {layout.tracking_port} on {layout.host} is in use by something that is not an MLflow tracking server: "
            f"choose a free one, e.g. make team-up TEAM_ARGS='--port {layout.tracking_port + 1}'"
        )
    if not artifacts.startswith("s3://"):
        artifacts = str(Path(artifacts).resolve())
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        layout.database_url("mlflow", "postgresql+psycopg", role=TRACKING),
        "--artifacts-destination",
        artifacts,
        "--host",
        layout.host,
        "--port",
        str(layout.tracking_port),
        "--workers",
        str(workers),
        "--app-name",
        "basic-auth",
    ]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    log = layout.tracking_log.open("ab")
    bin_dir = str(Path(sys.executable).parent)  # the server starts uvicorn/gunicorn by name
    write_auth_config(layout)
    # Secrets reach the server in its environment and in 0600 files, never on its command line
    # (visible in `ps`). Its workers import team.tracking_auth: the project goes on their path.
    env = {
        **os.environ,
        "PGPASSWORD": layout.password(TRACKING),
        "MLFLOW_AUTH_CONFIG_PATH": str(layout.auth_config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_file(layout.secret_key_file),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT), os.environ.get("PYTHONPATH")) if p),
    }
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        env.pop(name, None)  # the server's admin is the one in its ini, not whoever started it
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    log.close()
    layout.pid_file.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TeamError(f"mlflow server exited with code {process.returncode}; see {layout.tracking_log}")
        if tracking_server_answers(layout.tracking_uri()):
            return process
        time.sleep(0.5)
    stop_tracking_server(layout)
    raise TeamError(f"mlflow server did not answer within {timeout:.0f} s; see {layout.tracking_log}")


def write_auth_config(layout: Layout) -> None:
    """basic_auth.ini (0600: it holds the admin's first password): users and permissions in the
    cluster's `mlflow_auth` database, nothing open to a user without a grant, the admin created at
    the first start with the generated password of `admin.password`, and team.tracking_auth's rule
    that only MANAGE on a model moves its production."""
    admin_password = secret_file(layout.user_password_file(ADMIN))
    text = (
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {layout.database_url('mlflow_auth', 'postgresql+psycopg', role=TRACKING)}\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = team.tracking_auth:authenticate\n"
    )
    layout.auth_config.touch(mode=0o600)
    layout.auth_config.chmod(0o600)
    layout.auth_config.write_text(text)


def tracking_server_answers(uri: str, timeout: float = 3) -> bool:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (URLError, OSError):
        return False


def stop_tracking_server(layout: Layout, timeout: float = 10) -> bool:
    """Stop the server this layout started (by its pid file, and only if that pid is still it)."""
    if not layout.pid_file.is_file():
        return False
    pid = int(layout.pid_file.read_text().strip() or 0)
    layout.pid_file.unlink()
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"mlflow" not in b" ".join(cmdline) or b"server" not in cmdline:
        return False  # the pid was reused by something else: leave it alone
    os.killpg(pid, signal.SIGTERM)  # the server and its workers (it leads its own session)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
    return True


# --- both ---------------------------------------------------------------------------------------


def up(layout: Layout, artifacts: str | None = None, allowed_hosts: str | None = None, workers: int = 2) -> None:
    start_postgres(layout)
    start_tracking_server(layout, artifacts or str(layout.home / "artifacts"), allowed_hosts, workers)


def down(layout: Layout) -> None:
    stop_tracking_server(layout)
    stop_postgres(layout)


def upgrade_schema(layout: Layout) -> str:
    """`mlflow db upgrade` on the tracking database (after installing a newer MLflow); its output."""
    env = {**os.environ, "PGPASSWORD": layout.password(TRACKING)}
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "db", "upgrade", layout.database_url("mlflow", "postgresql+psycopg", role=TRACKING)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise TeamError(f"mlflow db upgrade failed: {detail[-1] if detail else result.returncode}")
    return result.stdout + result.stderr


def upgrade(layout: Layout, artifacts: str | None = None, allowed_hosts: str | None = None, workers: int = 2) -> None:
    """Stop the tracking server, migrate its database to this MLflow's schema, start it again."""
    stop_tracking_server(layout)
    start_postgres(layout)
    upgrade_schema(layout)
    start_tracking_server(layout, artifacts or str(layout.home / "artifacts"), allowed_hosts, workers)


def exports(layout: Layout, catalogue_role: str = "writer", user: str = ADMIN) -> str:
    """What a client exports to use this installation as `user` with the catalogue's `catalogue_role`
    (team up writes the admin's, with the writer role, to <home>/team.env)."""
    environment = layout.client_environment(catalogue_role, user)
    return "".join(f"export {name}={value}\n" for name, value in environment.items())
