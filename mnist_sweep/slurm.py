"""``python -m mnist_sweep.slurm start|stop [root=DIR]``: a Slurm cluster of one node, this machine,
behind ``make slurm`` and ``make slurm-stop``: where ``hydra/launcher=slurm`` meets the real thing
(``sbatch``, the queue, ``sacct``, ``scancel``, time limits), for a user trying it and for the tests.

Debian's Slurm 22.05 and its companions, started directly (no systemd), every file under ``root``
(``outputs/services/slurm``): ``munged`` with a key of this cluster's own, a MariaDB holding the
accounting that ``sacct`` reads, then ``slurmdbd``, ``slurmctld`` and ``slurmd``. Accounting is not
optional: without it submitit never sees a cancelled or killed job end, and the launcher waits on it
forever. Every daemon listens on 127.0.0.1 only. Slurm's commands, and a sweep that submits jobs
(its jobs inherit it), find the cluster through ``SLURM_CONF``, which ``start`` prints. Run as root,
as on these machines: slurmd starts each job as the user who submitted it.
"""

from __future__ import annotations

from mnist_sweep import cli

cli.defer_collection(__name__)

import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mnist_sweep.config import PROJECT_ROOT, split_args

DEFAULT_ROOT = PROJECT_ROOT / "outputs" / "services" / "slurm"
INSTALL = ("apt-get install -y --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge "
           "mariadb-server-core mariadb-client-core")
PROGRAMS = ("munged", "munge", "mariadb-install-db", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sinfo",
            "squeue", "scancel")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # in start order: each needs the ones before
CLUSTER_NAME = "mnist"  # what sacct and the accounting database call it
PARTITION = "local"  # the one partition, the default: hydra.launcher.partition=null lands here
WAIT_S = 60  # for each daemon to answer; the first start also makes the accounting tables
DEAD_S = 2  # how long a daemon must look dead before its start is given up


class Ports(NamedTuple):
    slurmctld: int = 6817  # the first three: Slurm's own defaults
    slurmd: int = 6818
    slurmdbd: int = 6819
    mariadb: int = 6820  # beside them: 3306 may be a system MariaDB's


@dataclass(frozen=True)
class Cluster:
    root: Path
    conf: Path  # slurm.conf, what SLURM_CONF names
    node: str  # the one node: this machine's short host name
    ports: Ports

    def env(self) -> dict[str, str]:
        """What a Slurm command, or a sweep that submits jobs, exports to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}


def programs() -> dict[str, str]:
    """Where each program the cluster needs lies (Debian keeps the daemons in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = {name: shutil.which(name, path=path) for name in PROGRAMS}
    missing = [name for name, where in found.items() if where is None]
    if missing:
        raise FileNotFoundError(f"Slurm's programs are missing ({', '.join(missing)}): {INSTALL}")
    return found  # type: ignore[return-value]


def _paths(root: Path) -> dict[str, Path]:
    return {"root": root, "state": root / "cluster.json", "conf": root / "slurm.conf",
            "dbd_conf": root / "slurmdbd.conf", "munge": root / "munge", "key": root / "munge" / "munge.key",
            "socket": root / "munge" / "munge.socket", "mariadb": root / "mariadb", "log": root / "log",
            "spool": root / "spool", "saved": root / "slurmctld-state"}


def _pid_file(paths: dict[str, Path], daemon: str) -> Path:
    folder = {"munged": paths["munge"], "mariadbd": paths["mariadb"]}.get(daemon, paths["root"])
    return folder / f"{daemon}.pid"


def _pid(pid_file: Path, daemon: str) -> int | None:
    """The pid of ``daemon`` if it runs (its command line says so: a pid file can outlive its
    process, and the number go to another). A zombie does not run: PID 1 may not reap it here."""
    try:
        pid = int(pid_file.read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except (FileNotFoundError, ValueError):
        return None
    return pid if stat.rpartition(")")[2].split()[0] != "Z" and Path(os.fsdecode(argv0)).name == daemon else None


def _node(slurmd: str) -> dict[str, str]:
    """This machine as ``slurmd -C`` sees it (name, CPUs and their layout, memory in MB)."""
    line = subprocess.run([slurmd, "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return dict(item.split("=", 1) for item in line.split())


def _slurm_conf(paths: dict[str, Path], ports: Ports, node: dict[str, str], user: str) -> str:
    layout = " ".join(f"{key}={node[key]}" for key in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                       "ThreadsPerCore"))
    memory = int(int(node["RealMemory"]) * 0.95)  # below what slurmd finds, or it drains the node
    return f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost={node['NodeName']}(127.0.0.1)
SlurmctldPort={ports.slurmctld}
SlurmdPort={ports.slurmd}
# the daemons and job steps bind to the node's address (127.0.0.1), not to every interface
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
# cred_expire: a requeued job (a trial's near its time limit, or pre-empted) starts again after this
# many seconds; Slurm's 120 are for step credentials on a slow, loaded cluster, not one local node
AuthInfo=socket={paths['socket']},cred_expire=10
CredType=cred/munge
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={paths['saved']}
SlurmdSpoolDir={paths['spool']}
SlurmctldPidFile={_pid_file(paths, 'slurmctld')}
SlurmdPidFile={_pid_file(paths, 'slurmd')}
SlurmctldLogFile={paths['log'] / 'slurmctld.log'}
SlurmdLogFile={paths['log'] / 'slurmd.log'}
# no cgroup plugins: they need a cgroup hierarchy of Slurm's own, which containers rarely give
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# a cancelled job's processes get SIGKILL this long after SIGTERM (submitit ignores SIGTERM)
KillWait=5
# a job runs at the niceness it was submitted with (`nice python -m mnist_sweep -m ...`): on a node that
# is also the desk, trials can take only the cores nothing else wants
PropagatePrioProcess=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports.slurmdbd}
# the munge socket for slurmdbd too: without it Slurm asks the system's munged
AccountingStoragePass={paths['socket']}
JobAcctGatherType=jobacct_gather/none
NodeName={node['NodeName']} NodeAddr=127.0.0.1 {layout} RealMemory={memory} State=UNKNOWN
PartitionName={PARTITION} Nodes={node['NodeName']} Default=YES MaxTime=INFINITE State=UP
"""


def _slurmdbd_conf(paths: dict[str, Path], ports: Ports, user: str, password: str) -> str:
    return f"""\
AuthType=auth/munge
# cred_expire: a requeued job (a trial's near its time limit, or pre-empted) starts again after this
# many seconds; Slurm's 120 are for step credentials on a slow, loaded cluster, not one local node
AuthInfo=socket={paths['socket']},cred_expire=10
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports.slurmdbd}
CommunicationParameters=NoInAddrAny
SlurmUser={user}
PidFile={_pid_file(paths, 'slurmdbd')}
LogFile={paths['log'] / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports.mariadb}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
"""


def _write_private(path: Path, text: str | bytes) -> None:
    """A file only its owner reads (munged and slurmdbd refuse a key or password others can)."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def _create(found: dict[str, str], paths: dict[str, Path], ports: Ports) -> None:
    """The cluster's key, accounting database and configuration, once per ``root``."""
    for folder in ("root", "munge", "mariadb", "log", "spool", "saved"):
        paths[folder].mkdir(parents=True, exist_ok=True)
    paths["munge"].chmod(0o755)  # munged insists that every user may reach its socket
    _write_private(paths["key"], secrets.token_bytes(128))  # munge's own key size
    data = paths["mariadb"] / "data"
    done = subprocess.run([found["mariadb-install-db"], "--no-defaults", f"--datadir={data}", *_mariadb_user(),
                           "--skip-test-db"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mariadb-install-db: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    password, user, node = secrets.token_urlsafe(24), pwd.getpwuid(os.geteuid()).pw_name, _node(found["slurmd"])
    _write_private(paths["mariadb"] / "init.sql", (  # run at each start of mariadbd: idempotent
        f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';\n"))
    _write_private(paths["dbd_conf"], _slurmdbd_conf(paths, ports, user, password))
    paths["conf"].write_text(_slurm_conf(paths, ports, node, user))
    paths["state"].write_text(json.dumps({"ports": ports._asdict(), "node": node["NodeName"]}))


def _mariadb_user() -> list[str]:
    return ["--user=root"] if os.geteuid() == 0 else []  # as root, mariadbd wants to be told so


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _wait(ready: Callable[[], bool], alive: Callable[[], bool], what: str, log: Path) -> None:
    """Until ``ready()``; an error naming ``log`` if ``what`` stays dead for DEAD_S (a daemon's pid
    file is empty for a moment while it is written, and names the parent before it forks) or
    silent past WAIT_S."""
    deadline, dead_since = time.monotonic() + WAIT_S, None
    while not ready():
        now = time.monotonic()
        dead_since = None if alive() else dead_since or now
        if dead_since is not None and now - dead_since > DEAD_S:
            raise RuntimeError(f"{what} exited: see {log}")
        if now > deadline:
            raise RuntimeError(f"{what} not ready after {WAIT_S} s: see {log}")
        time.sleep(0.2)


def _start_munge(found: dict[str, str], paths: dict[str, Path]) -> None:
    pid_file = _pid_file(paths, "munged")
    if _pid(pid_file, "munged") is not None:
        return
    log = paths["munge"] / "munged.log"
    done = subprocess.run([found["munged"], f"--key-file={paths['key']}", f"--socket={paths['socket']}",
                           f"--pid-file={pid_file}", f"--log-file={log}",
                           f"--seed-file={paths['munge'] / 'munged.seed'}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"munged: {done.stderr.strip()} (see {log})")
    _wait(lambda: subprocess.run([found["munge"], "-n", "-S", str(paths["socket"])],
                                 capture_output=True).returncode == 0,
          lambda: _pid(pid_file, "munged") is not None, "munged", log)


def _start_mariadb(found: dict[str, str], paths: dict[str, Path], port: int) -> None:
    folder, pid_file = paths["mariadb"], _pid_file(paths, "mariadbd")
    if _pid(pid_file, "mariadbd") is not None:
        return
    log = folder / "mariadbd.log"
    # native AIO fails under gVisor's kernel; the socket is for an administrator's mariadb client
    cmd = [found["mariadbd"], "--no-defaults", f"--datadir={folder / 'data'}", *_mariadb_user(),
           "--bind-address=127.0.0.1", f"--port={port}", f"--socket={folder / 'mariadbd.sock'}",
           f"--pid-file={pid_file}", f"--log-error={log}", f"--init-file={folder / 'init.sql'}",
           "--skip-name-resolve", "--innodb-use-native-aio=0"]
    # a session of its own: it outlives this process (it does not fork by itself)
    server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    _wait(lambda: _listening(port), lambda: server.poll() is None, "mariadbd", log)


def _start_slurm(found: dict[str, str], paths: dict[str, Path], daemon: str, env: dict[str, str],
                 ready: Callable[[], bool]) -> None:
    """Start ``slurmdbd``, ``slurmctld`` or ``slurmd`` (each forks and writes its pid file) unless it runs."""
    pid_file = _pid_file(paths, daemon)
    if _pid(pid_file, daemon) is not None:
        return
    pid_file.unlink(missing_ok=True)  # a dead daemon's: it would pass for this one dying
    log = paths["log"] / f"{daemon}.log"
    done = subprocess.run([found[daemon]], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{daemon}: {(done.stderr or done.stdout).strip()} (see {log})")
    _wait(ready, lambda: not pid_file.exists() or _pid(pid_file, daemon) is not None, daemon, log)


def _node_up(found: dict[str, str], cluster: Cluster, env: dict[str, str]) -> bool:
    done = subprocess.run([found["sinfo"], "-h", "-n", cluster.node, "-o", "%T"], env=env, capture_output=True,
                          text=True)
    return done.stdout.strip() in ("idle", "mixed", "allocated", "completing")  # a * would mean not responding


def _load(paths: dict[str, Path]) -> Cluster:
    state = json.loads(paths["state"].read_text())
    return Cluster(root=paths["root"], conf=paths["conf"], node=state["node"], ports=Ports(**state["ports"]))


def start(root: Path = DEFAULT_ROOT, ports: Ports = Ports()) -> Cluster:
    """Start the cluster with its state under ``root`` (made on the first call, with ``ports``)
    and return it. A daemon that already runs is kept; a cluster keeps the ports it was made with."""
    found, paths = programs(), _paths(Path(root).resolve())
    if not paths["state"].exists():
        _create(found, paths, ports)
    cluster = _load(paths)
    env = {**os.environ, **cluster.env()}
    _start_munge(found, paths)
    _start_mariadb(found, paths, cluster.ports.mariadb)
    _start_slurm(found, paths, "slurmdbd", env, lambda: _listening(cluster.ports.slurmdbd))
    _start_slurm(found, paths, "slurmctld", env, lambda: _listening(cluster.ports.slurmctld))
    _start_slurm(found, paths, "slurmd", env, lambda: _listening(cluster.ports.slurmd))
    _wait(lambda: _node_up(found, cluster, env), lambda: True, f"node {cluster.node}", paths["log"] / "slurmd.log")
    return cluster


def _cancel_jobs(cluster: Cluster) -> None:
    """Cancel every job, and wait for them to end: a job step outlives a stopped slurmd."""
    found, env = programs(), {**os.environ, **cluster.env()}
    subprocess.run([found["scancel"], f"--partition={PARTITION}"], env=env, capture_output=True)
    deadline = time.monotonic() + 30  # KillWait (5 s) and the node's report
    while time.monotonic() < deadline:
        done = subprocess.run([found["squeue"], "-h"], env=env, capture_output=True, text=True)
        if done.returncode != 0 or not done.stdout.strip():
            return
        time.sleep(0.5)


def _end(pid: int, pid_file: Path, daemon: str) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _pid(pid_file, daemon) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid(pid_file, daemon) is not None:
        os.kill(pid, signal.SIGKILL)


def running(root: Path = DEFAULT_ROOT) -> dict[str, int]:
    """The pid of each of the cluster's daemons that runs."""
    paths = _paths(Path(root).resolve())
    pids = {daemon: _pid(_pid_file(paths, daemon), daemon) for daemon in DAEMONS}
    return {daemon: pid for daemon, pid in pids.items() if pid is not None}


def stop(root: Path = DEFAULT_ROOT) -> None:
    """Cancel the cluster's jobs and stop its daemons; nothing happens for one that does not run."""
    paths = _paths(Path(root).resolve())
    if not paths["state"].exists():
        return
    pids = running(paths["root"])
    if "slurmctld" in pids:
        _cancel_jobs(_load(paths))
    for daemon in reversed(DAEMONS):
        if daemon in pids:
            _end(pids[daemon], _pid_file(paths, daemon), daemon)
    for pid in _strays(paths["conf"]):  # a Slurm daemon whose start was given up left no pid file
        os.kill(pid, signal.SIGKILL)


def _strays(conf: Path) -> list[int]:
    """The Slurm daemons started with this cluster's ``SLURM_CONF`` that still run (only daemons: a
    user's shell that exported it is no stray)."""
    marker = f"SLURM_CONF={conf}".encode()
    strays = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv0 = Path(os.fsdecode(proc.joinpath("cmdline").read_bytes().split(b"\0")[0])).name
            if argv0 in DAEMONS and marker in proc.joinpath("environ").read_bytes().split(b"\0"):
                strays.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return strays


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command not in ("start", "stop"):
        raise ValueError(f"say start or stop (got {command!r})")
    args, unknown = split_args(argv[1:], ("root",))
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}: the one argument is root=DIR")
    root = Path(args["root"][-1]) if args["root"] else DEFAULT_ROOT
    if command == "stop":
        stop(root)
        print(f"stopped the Slurm cluster under {root}")
        return 0
    cluster = start(root)
    print(f"Slurm cluster {CLUSTER_NAME}: node {cluster.node}, partition {PARTITION}, on 127.0.0.1 "
          f"(ports {', '.join(map(str, cluster.ports))}); logs in {cluster.root / 'log'}")
    print("Export this, then sweep with: python -m mnist_sweep -m stores=server hydra/launcher=slurm")
    print(f"export SLURM_CONF={shlex.quote(str(cluster.conf))}")
    return 0


if __name__ == "__main__":
    cli.run(main)
