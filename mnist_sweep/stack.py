"""``python -m mnist_sweep.stack start|stop [root=DIR] [host=ADDR] [pg_port=N] [mlflow_port=N]
[mlflow_workers=N]`` (start only): the local stack of shared stores a team runs, behind ``make services``
and ``make services-stop``.

Two servers on this machine: PostgreSQL (the machine's packages), holding the Optuna study in
database ``optuna`` and MLflow's runs in ``mlflow``, and an ``mlflow server`` backed by it that
stores every run's artifacts under ``root`` and serves them (``mlflow-artifacts:``), so any
worker can load any run's model. Both listen on ``host`` only (127.0.0.1 unless told otherwise).
The database role's password lives in a libpq password file (``PGPASSFILE``), never in a URI.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psycopg

from mnist_sweep import cli
from mnist_sweep.config import PROJECT_ROOT, split_args

DEFAULT_ROOT = PROJECT_ROOT / "outputs" / "services"
ROLE = "mnist_sweep"  # the one database role: owner of both databases, password from PGPASSFILE
DATABASES = ("optuna", "mlflow")
MLFLOW_WAIT_S = 60  # the first start creates MLflow's tables, which takes a while on a busy machine
# The tracking server's uvicorn workers: one a core, at most MLflow's own default of 4. Each is a
# whole MLflow process, ~5 CPU-s to start (AMD EPYC), which a restart pays again: more than a core
# each cannot run at once anyway.
MLFLOW_WORKERS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class Stack:
    root: Path
    host: str
    pg_port: int
    mlflow_port: int
    optuna_storage: str  # no password in it: libpq finds it in pgpass
    mlflow_backend: str
    tracking_uri: str
    pgpass: Path
    password: str  # for tests that deliberately put it into a URI
    mlflow_workers: int  # the tracking server's uvicorn workers

    def env(self) -> dict[str, str]:
        """What a worker exports to use these stores (``stores=server`` reads the first two)."""
        return {"OPTUNA_STORAGE": self.optuna_storage, "MLFLOW_TRACKING_URI": self.tracking_uri,
                "PGPASSFILE": str(self.pgpass)}


def postgres_bindir() -> Path:
    """The directory of PostgreSQL's server programs (Debian keeps them off PATH, in
    /usr/lib/postgresql/<version>/bin)."""
    candidates = [Path("/usr/lib/postgresql/15/bin")]
    if shutil.which("pg_config"):  # another version's packages
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        candidates.append(Path(bindir))
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise FileNotFoundError("PostgreSQL's server programs (initdb, pg_ctl) are missing: apt-get install postgresql")


def _paths(root: Path) -> dict[str, Path]:
    return {"root": root, "pgdata": root / "pgdata", "pg_log": root / "postgres.log", "pgpass": root / "pgpass",
            "state": root / "services.json", "mlflow_log": root / "mlflow.log", "mlflow_pid": root / "mlflow.pid",
            "artifacts": root / "mlartifacts"}


def _pg(bindir: Path, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of PostgreSQL's programs; as root, as the user ``postgres``: initdb and pg_ctl refuse root."""
    cmd = [str(bindir / program), *args]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        raise RuntimeError(f"{program}: {lines[-1]}")
    return done


def _give_to_postgres(path: Path) -> None:
    """As root, hand ``path`` to the user ``postgres``, who runs the server (see ``_pg``)."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("no user postgres to run PostgreSQL as (initdb refuses root): "
                           "apt-get install postgresql creates it") from None
    os.chown(path, user.pw_uid, user.pw_gid)
    if subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(path)]).returncode != 0:
        raise RuntimeError(f"the user postgres, who runs PostgreSQL here, cannot reach {path}: pick a root= "
                           "whose parent directories others may enter (chmod o+x), unlike /tmp/pytest-of-root")


def _postgres_running(bindir: Path, pgdata: Path) -> bool:
    return _pg(bindir, "pg_ctl", "status", "-D", str(pgdata), check=False).returncode == 0


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie does not: a killed server that is nobody's child may
    stay one where PID 1 does not reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _mlflow_pid(pid_file: Path) -> int | None:
    """The pid of the MLflow server we started, if it still runs (its command line says so: a pid
    file can outlive its process, and the number go to another)."""
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text())
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    return pid if _alive(pid) and b"\0mlflow\0server\0" in cmdline else None


def _password(pgpass: Path) -> str:
    return pgpass.read_text().strip().rpartition(":")[2]


def _write_pgpass(pgpass: Path, host: str, port: int, password: str) -> None:
    # A new file put in place whole: every start rewrites it, and a worker's libpq reading it just
    # then found it empty ("no password supplied"). mkstemp makes it 0600: libpq ignores a password
    # file that others can read.
    fd, written = tempfile.mkstemp(dir=pgpass.parent, prefix=f".{pgpass.name}.")
    with os.fdopen(fd, "w") as file:
        file.write(f"{host}:{port}:*:{ROLE}:{password}\n")
    os.replace(written, pgpass)


def _init_postgres(bindir: Path, paths: dict[str, Path], password: str) -> None:
    """A new cluster in ``pgdata`` whose superuser is ``ROLE``, with a password for every connection."""
    pgdata = paths["pgdata"]
    pgdata.mkdir(mode=0o700, exist_ok=True)  # empty, if an earlier initdb failed: it takes that
    _give_to_postgres(pgdata)
    pwfile = paths["root"] / "initdb-password"  # initdb reads it as postgres: the pgpass format would not do
    pwfile.touch(mode=0o600)
    pwfile.write_text(password + "\n")
    _give_to_postgres(pwfile)
    try:
        _pg(bindir, "initdb", "-D", str(pgdata), "--username", ROLE, "--pwfile", str(pwfile),
            "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C")
    finally:
        pwfile.unlink()
    # initdb admits TCP from loopback only. Workers on other machines reach a server started with
    # another host=: listen_addresses decides who can connect at all, the password who gets in.
    with (pgdata / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all {ROLE} all scram-sha-256\n")


def _start_postgres(bindir: Path, paths: dict[str, Path], host: str, port: int) -> None:
    paths["pg_log"].touch()
    _give_to_postgres(paths["pg_log"])  # pg_ctl writes it as postgres
    # the socket in the data directory: /var/run/postgresql belongs to the system's own cluster
    options = (f"-c listen_addresses={shlex.quote(host)} -c port={port} "
               f"-c unix_socket_directories={shlex.quote(str(paths['pgdata']))}")
    try:
        _pg(bindir, "pg_ctl", "start", "-w", "-t", "60", "-D", str(paths["pgdata"]), "-l", str(paths["pg_log"]),
            "-o", options)
    except RuntimeError as err:
        raise RuntimeError(f"{err} (see {paths['pg_log']})") from None


def _create_databases(host: str, port: int, pgpass: Path) -> None:
    with psycopg.connect(host=host, port=port, user=ROLE, dbname="postgres", passfile=str(pgpass),
                         autocommit=True) as conn:
        for name in DATABASES:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')


def _start_mlflow(stack: Stack, paths: dict[str, Path]) -> int:
    # No job execution: it runs GenAI jobs (LLM judges, trace archival) in 8 more Python processes
    # beside the uvicorn workers, and this project has none.
    env = {**os.environ, "PGPASSFILE": str(stack.pgpass), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", stack.mlflow_backend,
           "--artifacts-destination", str(paths["artifacts"]), "--serve-artifacts",
           "--host", stack.host, "--port", str(stack.mlflow_port), "--workers", str(stack.mlflow_workers)]
    with paths["mlflow_log"].open("ab") as log:
        # a session of its own: it outlives this process, and stop() ends it with its uvicorn workers
        server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=stack.root, start_new_session=True)
    paths["mlflow_pid"].write_text(str(server.pid))
    return server.pid


def _wait_for_mlflow(stack: Stack, pid: int, log: Path) -> None:
    deadline = time.monotonic() + MLFLOW_WAIT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise RuntimeError(f"the MLflow server exited: see {log}")
        try:
            with urllib.request.urlopen(f"{stack.tracking_uri}/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise RuntimeError(f"no answer from the MLflow server at {stack.tracking_uri} "
                       f"in {MLFLOW_WAIT_S} s: see {log}")


def start(root: Path = DEFAULT_ROOT, host: str = "127.0.0.1", pg_port: int = 5433,
          mlflow_port: int = 5050, mlflow_workers: int | None = None) -> Stack:
    """Start PostgreSQL and the MLflow server with their data under ``root`` (made on the first
    call) and return them. A server that already runs is kept, with the host and port it runs on;
    the MLflow server starts with ``mlflow_workers`` (unsaid: as many as it last had, else
    ``MLFLOW_WORKERS``), so that a restart serves as the server before it.

    As root, PostgreSQL runs as the user ``postgres``, who must be able to reach ``root``.
    """
    bindir, root = postgres_bindir(), Path(root).resolve()
    paths = _paths(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (paths["pgdata"] / "PG_VERSION").exists():
        password = secrets.token_urlsafe(24)
        _init_postgres(bindir, paths, password)
    elif paths["pgpass"].exists():
        password = _password(paths["pgpass"])
    else:
        raise RuntimeError(f"{paths['pgpass']} is missing, and with it the password of {paths['pgdata']}: "
                           f"delete {root} to start afresh")
    saved = json.loads(paths["state"].read_text()) if paths["state"].exists() else {}
    postgres_up = _postgres_running(bindir, paths["pgdata"])
    mlflow_pid = _mlflow_pid(paths["mlflow_pid"])
    if postgres_up:
        host, pg_port = saved["host"], saved["pg_port"]
    if mlflow_pid is not None:  # the running server's
        mlflow_port, mlflow_workers = saved["mlflow_port"], saved.get("mlflow_workers", MLFLOW_WORKERS)
    elif mlflow_workers is None:  # as many as it last had
        mlflow_workers = saved.get("mlflow_workers", MLFLOW_WORKERS)
    paths["state"].write_text(json.dumps({"host": host, "pg_port": pg_port, "mlflow_port": mlflow_port,
                                          "mlflow_workers": mlflow_workers}))
    database = f"postgresql+psycopg://{ROLE}@{host}:{pg_port}"  # psycopg 3, SQLAlchemy 2's PostgreSQL driver
    stack = Stack(root=root, host=host, pg_port=pg_port, mlflow_port=mlflow_port,
                        optuna_storage=f"{database}/optuna", mlflow_backend=f"{database}/mlflow",
                        tracking_uri=f"http://{host}:{mlflow_port}", pgpass=paths["pgpass"], password=password,
                        mlflow_workers=mlflow_workers)
    if not postgres_up:
        _start_postgres(bindir, paths, host, pg_port)
    _write_pgpass(paths["pgpass"], host, pg_port, password)
    _create_databases(host, pg_port, paths["pgpass"])
    if mlflow_pid is None:
        mlflow_pid = _start_mlflow(stack, paths)
    _wait_for_mlflow(stack, mlflow_pid, paths["mlflow_log"])
    return stack


def stop(root: Path = DEFAULT_ROOT) -> None:
    """Stop both servers under ``root``; nothing happens for one that does not run."""
    stop_mlflow(root)
    stop_postgres(root)


def stop_mlflow(root: Path = DEFAULT_ROOT) -> None:
    """Stop the MLflow server under ``root``, if it runs (``start`` starts it again)."""
    paths = _paths(Path(root).resolve())
    pid = _mlflow_pid(paths["mlflow_pid"])
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)  # the server, and the uvicorn workers it started
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)


def stop_postgres(root: Path = DEFAULT_ROOT) -> None:
    """Stop PostgreSQL under ``root``, if it runs, ending its clients' sessions (``start`` starts it again)."""
    paths = _paths(Path(root).resolve())
    if (paths["pgdata"] / "PG_VERSION").exists():
        bindir = postgres_bindir()
        if _postgres_running(bindir, paths["pgdata"]):
            _pg(bindir, "pg_ctl", "stop", "-w", "-m", "fast", "-D", str(paths["pgdata"]))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the system's pick), for a server started next."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _number(key: str, values: list[str], default: int | None, low: int, high: int, what: str) -> int | None:
    """The last of ``key``'s values as a whole number from ``low`` to ``high`` (``what`` says so)."""
    if not values:
        return default
    if not values[-1].isdigit() or not low <= int(values[-1]) <= high:
        raise ValueError(f"{key} must be {what} (got {values[-1]!r})")
    return int(values[-1])


def _port(key: str, values: list[str], default: int) -> int:
    return _number(key, values, default, 1, 65535, "a port number, 1 to 65535")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command not in ("start", "stop"):
        raise ValueError(f"say start or stop (got {command!r})")
    args, unknown = split_args(argv[1:], ("root", "host", "pg_port", "mlflow_port", "mlflow_workers"))
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}: the arguments are root=DIR host=ADDR "
                         "pg_port=N mlflow_port=N mlflow_workers=N")
    root = Path(args["root"][-1]) if args["root"] else DEFAULT_ROOT
    if command == "stop":
        stop(root)
        print(f"stopped the stack under {root}")
        return 0
    stack = start(root, args["host"][-1] if args["host"] else "127.0.0.1",
                  _port("pg_port", args["pg_port"], 5433), _port("mlflow_port", args["mlflow_port"], 5050),
                  _number("mlflow_workers", args["mlflow_workers"], None, 1, sys.maxsize,
                          "a whole number, at least 1"))
    print(f"PostgreSQL on {stack.host}:{stack.pg_port}: databases {', '.join(DATABASES)}, role {ROLE}, "
          f"its password in {stack.pgpass}")
    print(f"MLflow tracking server on {stack.tracking_uri} ({stack.mlflow_workers} workers): artifacts in "
          f"{stack.root / 'mlartifacts'}, log in {stack.root / 'mlflow.log'}")
    print("Export these, then sweep with: python -m mnist_sweep -m stores=server")
    print("export " + " ".join(f"{key}={shlex.quote(value)}" for key, value in stack.env().items()))
    return 0


if __name__ == "__main__":
    cli.run(main)
