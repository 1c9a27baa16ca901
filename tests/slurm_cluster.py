"""A one-node SLURM cluster on this machine for the batch-script tests.

`slurm` (the session fixture `slurm_fixture`, registered once in tests/conftest.py) starts munged,
slurmctld and slurmd with every file in one folder (`$TMPDIR/cpt-slurm-<uid>`): slurm.conf,
state, spool, logs, pid files and munge's key and socket. Processes left by an earlier session
that was killed (daemons, job steps, ranks) are found by that folder in their command line or
SLURM_CONF in their environment and stopped first; two sessions at once are serialised by a lock
on the folder. No `slurmctld` on PATH: the tests skip, or fail when CPT_REQUIRE_SLURM=1 (CI).

Timing measured on SLURM 22.05 (2 cores): a requeued job becomes eligible `AuthInfo=cred_expire`
seconds after the requeue (120 by default, 5 at the least: slurmctld refuses smaller values as
invalid), and is then started by the next pass of the main scheduler (every 60 s by
default; no event triggers one). With the defaults a requeued job started again 57-60 s after
its requeue; with cred_expire=5 and SchedulerParameters=sched_interval=1 it starts 6 s after.
A new job starts at once. Job records stay visible to `scontrol show job` for MinJobAge seconds
after they end; with no accounting that is the only record, so it is large.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
CRED_EXPIRE = 5   # seconds a requeued job waits before it may start again (SLURM's default is 120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({path}: {e.strerror})"
    return "\n".join(text[-lines:])


def slurm_conf(root: Path, node: str, ports: tuple[int, int]) -> str:
    """The cluster's slurm.conf: one node of 2 CPUs, one partition, requeue allowed, no accounting."""
    d = root
    return f"""\
ClusterName=cpt
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire={CRED_EXPIRE}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1,sched_min_interval=100000,batch_sched_delay=0
JobRequeue=1
MinJobAge=86400
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
InactiveLimit=0
KillWait=30
MessageTimeout=10
SlurmdTimeout=300
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _cluster_processes(root: Path) -> list[int]:
    """Live processes of the cluster in `root`: its daemons (named by their command lines) and every
    process SLURM started for it (slurmstepd, job shells, ranks: SLURM_CONF in their environment)."""
    marker = f"SLURM_CONF={root / 'slurm.conf'}".encode()
    spared = {os.getpid(), os.getppid()}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(root).encode() in cmdline or marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def stop_processes(root: Path, timeout: float = 5.0) -> None:
    """Stop every process of the cluster in `root` (SIGTERM, then SIGKILL after `timeout`), also those
    an earlier session left running when it was killed."""
    pids = _cluster_processes(root)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while pids and time.time() < deadline:
        time.sleep(0.1)
        pids = [p for p in _cluster_processes(root) if p in pids]
    for pid in _cluster_processes(root):
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class Cluster:
    root: Path
    node: str
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                                 + self.daemon_logs())
        return proc

    def daemon_logs(self, lines: int = 30) -> str:
        return "".join(f"\n--- {name} log (last {lines} lines) ---\n{_tail(self.root / f'{name}.log', lines)}"
                       for name in ("slurmctld", "slurmd"))

    def submit(self, script: Path | str, options: list[str] = (), args: list[str] = (),
               env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """`sbatch --parsable OPTIONS SCRIPT ARGS` in `cwd` with `env` added: the job id (an array's id)."""
        proc = subprocess.run(["sbatch", "--parsable", *options, str(script), *args],
                              env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60, cwd=cwd)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch failed: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
                                 + self.daemon_logs())
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as one dict per job (an array gives one per task)."""
        proc = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False)
        if proc.returncode != 0:
            return []
        out = []
        for line in proc.stdout.splitlines():
            fields: dict[str, str] = {}
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    fields[key] = value
            if fields:
                out.append(fields)
        return out

    def job(self, job_id: str) -> dict[str, str]:
        found = self.jobs(job_id)
        assert len(found) == 1, f"job {job_id}: {len(found)} records\n" + self.daemon_logs()
        return found[0]

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def restarts(self, job_id: str) -> int:
        return int(self.job(job_id)["Restarts"])

    def exit_code(self, job_id: str) -> tuple[int, int]:
        """The batch script's (status, signal), from ExitCode=S:G."""
        status, _, sig = self.job(job_id)["ExitCode"].partition(":")
        return int(status), int(sig or 0)

    def wait(self, job_id: str, timeout: float, log: Path | list[Path] | None = None,
             states: set[str] = FINAL_STATES) -> list[dict[str, str]]:
        """Wait until every job of `job_id` is in one of `states`; their records. Fails with the logs."""
        deadline = time.time() + timeout
        while True:
            found = self.jobs(job_id)
            if found and all(j["JobState"] in states for j in found):
                return found
            if time.time() > deadline:
                raise AssertionError(self.report(job_id, f"job {job_id} not in {sorted(states)} after "
                                                         f"{timeout:.0f} s", log))
            time.sleep(0.5)

    def report(self, job_id: str, what: str, log: Path | list[Path] | None = None) -> str:
        """A failure message: `what`, the job's records, its log's tail and the daemons' log tails."""
        records = "\n".join(" ".join(f"{k}={j.get(k)}" for k in ("JobId", "JobState", "Reason", "Restarts",
                                                                 "ExitCode", "RunTime"))
                            for j in self.jobs(job_id))
        text = f"{what}\n{records}"
        for path in [log] if isinstance(log, Path) else log or []:
            text += f"\n--- job log {path} (last 60 lines) ---\n{_tail(path, 60)}"
        return text + self.daemon_logs()


def _start_munge(root: Path) -> None:
    munge = root / "munge"
    munge.mkdir(mode=0o700)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    subprocess.run(["munged", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
                    f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                    f"--seed-file={munge}/munged.seed"], check=True, capture_output=True, timeout=30)


def _wait_ready(cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        proc = cluster.run("sinfo", "--noheader", "--Node", "--format=%T", check=False, timeout=15)
        if proc.returncode == 0 and proc.stdout.strip() in ("idle", "mixed", "allocated"):
            return
        time.sleep(0.3)
    raise AssertionError(f"the cluster did not become ready in {timeout} s" + cluster.daemon_logs(60))


def start(root: Path) -> Cluster:
    """Start munged, slurmctld and slurmd with everything under `root` (emptied first)."""
    stop_processes(root)
    for child in root.iterdir():
        if child.name != "lock":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    (root / "plugstack.conf").write_text("")
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node, (_free_port(), _free_port())))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        env.pop(key)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)   # set in this process by in-process training tests; jobs rendezvous on their own
    cluster = Cluster(root, node, env)
    _start_munge(root)
    subprocess.run(["slurmctld", "-c", "-i", "-f", str(conf)], env=env, check=True, capture_output=True,
                   timeout=60)
    subprocess.run(["slurmd", "-N", node, "-f", str(conf)], env=env, check=True, capture_output=True, timeout=60)
    _wait_ready(cluster)
    return cluster


def cluster_root() -> Path:
    return Path(tempfile.gettempdir()) / f"cpt-slurm-{os.getuid()}"


@pytest.fixture(scope="session", name="slurm")
def slurm_fixture():
    """A running one-node cluster (see the module doc); stopped at the session's end."""
    if shutil.which("slurmctld") is None:
        reason = "SLURM is not installed (no slurmctld on PATH; apt-get install slurm-wlm munge)"
        if os.environ.get("CPT_REQUIRE_SLURM") == "1":
            pytest.fail(reason + " and CPT_REQUIRE_SLURM=1")
        pytest.skip(reason)
    root = cluster_root()
    root.mkdir(mode=0o700, exist_ok=True)
    with open(root / "lock", "w") as lock:
        _lock(lock, timeout=600)
        try:
            yield start(root)
        finally:
            stop_processes(root)


def _lock(lock, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.time() > deadline:
                raise AssertionError(f"another test session holds {lock.name} for over {timeout} s") from None
            time.sleep(1)
