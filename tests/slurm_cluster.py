"""A real Slurm cluster on this machine, for tests: munge, slurmctld and two slurmd.

Debian's Slurm (22.05) is built with MULTIPLE_SLURMD, so one host can run two slurmd,
``node1`` and ``node2``, each on its own port; a job with ``-N 2`` then gets two "nodes"
that are really the same machine. Everything lives in one private directory (config,
state, spool, logs, pid files, a private munge key and socket), so a system Slurm or
munge, if any, is left alone. The node names are added to /etc/hosts while the cluster
runs: torch's c10d rendezvous resolves the first node's name.

Needs root (slurmd runs jobs as their user, munged must run as the munge user) and the
Debian packages; :func:`unavailable` says why a machine cannot run it, and installs the
packages with apt-get when it can. Daemons are stopped through their pid files.

By hand: ``python -m tests.slurm_cluster up DIR`` (prints the SLURM_CONF to export),
``python -m tests.slurm_cluster down DIR``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
BINARIES = (
    "/usr/sbin/munged",
    "/usr/sbin/slurmctld",
    "/usr/sbin/slurmd",
    "/usr/bin/sbatch",
)
HOSTS = Path("/etc/hosts")
HOSTS_TAG = "# mtl_dist test Slurm cluster"
# Terminal job states: a job in one of these has left the machine.
DONE_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def _apt_get(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", "-qq", "-o", "Dpkg::Use-Pty=0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def unavailable() -> str | None:
    """Why a Slurm cluster cannot run here (None when it can), installing the Debian
    packages first if they are missing and apt-get works."""
    if sys.platform != "linux":
        return "a local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd, munged as the munge user)"
    if all(Path(b).exists() for b in BINARIES):
        return None
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed and there is no apt-get to install {PACKAGES}"
    install = ("install", "-y", "--no-install-recommends", *PACKAGES)
    try:
        result = _apt_get(*install)
        if result.returncode != 0:  # a fresh machine may have no package lists yet
            _apt_get("update")
            result = _apt_get(*install)
    except subprocess.TimeoutExpired:
        return "apt-get install of the Slurm packages timed out"
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        return f"apt-get could not install {' '.join(PACKAGES)}: {' '.join(tail)}"
    missing = [b for b in BINARIES if not Path(b).exists()]
    return f"Slurm binaries missing after install: {missing}" if missing else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _daemon(args: list[str], log: Path) -> None:
    """Start a daemon that forks into the background; its failure names its log."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        tail = log.read_text()[-1500:] if log.exists() else ""
        raise RuntimeError(
            f"{args[0] if args[0] != 'runuser' else args[4]} failed to start "
            f"({result.returncode}): {result.stderr.strip()}\n{log}:\n{tail}"
        )


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class SlurmCluster:
    """One slurmctld and a slurmd per node name, all on 127.0.0.1, rooted in ``root``."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("node1", "node2")) -> None:
        self.root = Path(root)
        self.nodes = nodes
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"

    # ---- environment for clients -------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def cmd(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(args), capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip()}"
            )
        return result

    # ---- start ---------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._write_config()
            self._add_hosts()
            self._start_munge()
            self._start_slurm()
        except BaseException:
            self.stop()
            raise

    def _write_config(self) -> None:
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (as munge) must reach its directory
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
        r = self.root
        lines = [
            "ClusterName=mtltest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start
            # again (120 s by default); 10 s keeps the requeue test short.
            f"AuthInfo=socket={self.munge_dir / 'munge.socket'},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'run'}/slurmctld.pid",
            f"SlurmdPidFile={r / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log'}/slurmctld.log",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r / 'log'}/jobcomp.txt",
            "AccountingStorageType=accounting_storage/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "MinJobAge=600",
            "SchedulerParameters=sched_interval=10,bf_interval=5",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        node_mem = mem_mb * 9 // 10 // len(self.nodes)
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 "
                f"Port={free_port()} CPUs={cpus} RealMemory={node_mem} State=UNKNOWN"
            )
        lines.append(
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
        )
        self.conf.write_text("\n".join(lines) + "\n")

    def _add_hosts(self) -> None:
        text = HOSTS.read_text()
        missing = [n for n in self.nodes if not re.search(rf"\s{n}(\s|$)", text, re.M)]
        if missing:
            tail = "" if text.endswith("\n") else "\n"
            HOSTS.write_text(f"{text}{tail}127.0.0.1 {' '.join(missing)} {HOSTS_TAG}\n")

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(exist_ok=True)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        # Clients of every user must reach the socket; only munge may read the key.
        self.munge_dir.chmod(0o755)
        key.chmod(0o400)
        d = self.munge_dir
        # As root munged refuses its directories; it runs as the munge user.
        _daemon(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "/usr/sbin/munged",
                f"--socket={d / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
            d / "munged.log",
        )
        _wait_for(lambda: (d / "munge.socket").exists(), 10, "the munge socket")

    def _start_slurm(self) -> None:
        _daemon(
            ["/usr/sbin/slurmctld", "-f", str(self.conf)],
            self.log_dir / "slurmctld.log",
        )
        for node in self.nodes:
            _daemon(
                ["/usr/sbin/slurmd", "-f", str(self.conf), "-N", node],
                self.log_dir / f"slurmd-{node}.log",
            )
        _wait_for(self._nodes_idle, 60, "the Slurm nodes to become idle", poll=0.5)

    def _nodes_idle(self) -> bool:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n, "").startswith("idle") for n in self.nodes)

    # ---- jobs ----------------------------------------------------------------------
    def sbatch(
        self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> str:
        """Submit; returns the job id. ``env`` is the environment sbatch (and the job,
        through --export=ALL) sees; SLURM_CONF is added."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            env=self.env(env),
            cwd=cwd,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (kept by slurmctld for MinJobAge seconds)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def wait_job(
        self,
        job_id: str,
        states: set[str] = DONE_STATES,
        timeout: float = 240,
        poll: float = 0.5,
    ) -> dict[str, str]:
        return _wait_for(
            lambda: (j := self.job(job_id))["JobState"] in states and j,
            timeout,
            f"job {job_id} to reach {sorted(states)}",
            poll,
        )

    def cancel_all(self) -> None:
        self.cmd("scancel", "--full", "--user", "root", check=False)

    # ---- stop ----------------------------------------------------------------------
    def _pid_files(self) -> list[Path]:
        slurmd = [self.run_dir / f"slurmd-{n}.pid" for n in self.nodes]
        return [*slurmd, self.run_dir / "slurmctld.pid", self.munge_dir / "munged.pid"]

    def stop(self, timeout: float = 20) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged by their pid files."""
        if self.conf.exists() and (self.run_dir / "slurmctld.pid").exists():
            try:
                self.cancel_all()
                _wait_for(
                    lambda: not self.cmd("squeue", "-h", check=False).stdout.strip(),
                    timeout,
                    "the jobs to end",
                )
            except (TimeoutError, subprocess.TimeoutExpired, OSError):
                pass
        for pid_file in self._pid_files():
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            try:
                _wait_for(lambda p=pid: not _alive(p), timeout, f"pid {pid} to exit")
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
        self._remove_hosts()

    def _remove_hosts(self) -> None:
        try:
            text = HOSTS.read_text()
        except OSError:
            return
        kept = [
            line for line in text.splitlines(keepends=True) if HOSTS_TAG not in line
        ]
        if len(kept) != len(text.splitlines()):
            HOSTS.write_text("".join(kept))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.slurm_cluster up|down DIR", file=sys.stderr)
        return 2
    cluster = SlurmCluster(Path(argv[1]))
    if argv[0] == "up":
        reason = unavailable()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


def new_root() -> Path:
    """A fresh directory for a cluster (not under a 0700 pytest directory: munged,
    running as the munge user, must be able to reach its socket and key)."""
    return Path(tempfile.mkdtemp(prefix="mtl-slurm-"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
