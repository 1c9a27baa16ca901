"""The deepspeed launcher's multi-node path on one machine: a hostfile of two hosts (127.0.0.1 and
127.0.0.2, one rank each) reached by pdsh over a private loopback sshd, started by launch/deepspeed.sh,
trains exactly what two ranks on one node train."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from continual_pt.checkpoint import refs
from tests import train_support as ts
from tests.helpers import REPO
from tests.ssh_loopback import HOSTS, require, ssh_loopback  # noqa: F401  (the fixture)

SCRIPT = REPO / "launch" / "deepspeed.sh"
ECHO_ARGS = '#!/bin/sh\nprintf "%s\\n" "$(basename "$0")" "$@"\n'


def fake_commands(bin_dir: Path, *names: str) -> Path:
    """Commands that print their own name and arguments, one per line, instead of running."""
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        (bin_dir / name).write_text(ECHO_ARGS)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def script_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("HOSTFILE", "CONFIG", "MASTER_ADDR", "MASTER_PORT", "CPT_LAUNCH")}
    e["PATH"] = os.pathsep.join([str(bin_dir), e.get("PATH", "")])
    return {**e, **extra}


def launched(hostfile: Path, config: str, addr: str, port: str, *overrides: str) -> list[str]:
    return ["deepspeed", "--hostfile", str(hostfile), "--master_addr", addr, "--master_port", port,
            "--module", "continual_pt.train", "--config", config, *overrides]


def test_script_runs_deepspeed_under_cpt_launch_with_the_first_host_as_master(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\n\n  node-a slots=8\nnode-b slots=8\n")
    env = script_env(fake_commands(tmp_path / "bin", "cpt", "deepspeed"))
    proc = run_script([str(hostfile), "run.yaml", "train.max_steps=4", "name=a b"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["cpt", "launch", "--", *launched(
        hostfile, "run.yaml", "node-a", "29500", "train.max_steps=4", "name=a b")]


def test_script_takes_hostfile_config_and_master_from_the_environment(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    env = script_env(fake_commands(tmp_path / "bin", "cpt", "deepspeed"), HOSTFILE=str(hostfile),
                     CONFIG="run.yaml", MASTER_ADDR="10.1.2.3", MASTER_PORT="4567", CPT_LAUNCH="")
    proc = run_script(["train.max_steps=4"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == launched(hostfile, "run.yaml", "10.1.2.3", "4567",
                                                "train.max_steps=4")
    other = tmp_path / "other"
    other.write_text("node-c slots=1\n")
    proc = run_script([str(other), "b.yaml", "x=1"], {**env, "MASTER_ADDR": ""}, tmp_path)
    assert proc.stdout.splitlines() == launched(other, "b.yaml", "node-c", "4567", "x=1")


def test_the_example_hostfile_parses_and_names_the_master(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    example = REPO / "launch" / "hostfile.example"
    assert fetch_hostfile(str(example)) == {"node1": 8, "node2": 8}
    assert "launch/deepspeed.sh launch/hostfile run.yaml" in example.read_text()
    proc = run_script([str(example), "run.yaml"], script_env(fake_commands(tmp_path / "bin", "cpt", "deepspeed")),
                      tmp_path)
    assert proc.stdout.splitlines() == ["cpt", "launch", "--", *launched(example, "run.yaml", "node1", "29500")]


@pytest.mark.parametrize("args, extra, needle", [
    (["HOSTFILE"], {}, "no run config"),
    ([], {"HOSTFILE": "HOSTFILE"}, "no run config"),
    (["nowhere", "run.yaml"], {}, "no hostfile at nowhere"),
    (["EMPTY", "run.yaml"], {}, "names no host"),
])
def test_script_refuses_what_it_cannot_launch(tmp_path, args, extra, needle):
    (tmp_path / "HOSTFILE").write_text("node-a slots=1\n")
    (tmp_path / "EMPTY").write_text("# nobody\n\n")
    env = script_env(fake_commands(tmp_path / "bin", "cpt", "deepspeed"), **extra)
    proc = run_script(args, env, tmp_path)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("error: ") and needle in proc.stderr and proc.stderr.count("\n") == 1


def home_ssh_state() -> dict[str, int]:
    home_ssh = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
    return {str(p): p.stat().st_mtime_ns for p in [home_ssh, *home_ssh.rglob("*")] if p.exists()}


def test_loopback_ssh_reaches_each_host_by_its_key_only_and_leaves_home_alone(ssh_loopback, tmp_path):  # noqa: F811
    before = home_ssh_state()
    for host in HOSTS:
        got = ssh_loopback.ssh(host, "echo $SSH_CONNECTION")
        assert got.returncode == 0, got.stderr
        assert got.stdout.split()[2:] == [host, str(ssh_loopback.port)]
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    refused = subprocess.run(["/usr/bin/ssh", "-F", "/dev/null", "-i", str(stranger), "-o", "IdentitiesOnly=yes",
                              "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                              "UserKnownHostsFile=/dev/null", "-p", str(ssh_loopback.port), HOSTS[0], "true"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 255 and "Permission denied (publickey)." in refused.stderr, refused.stderr
    assert home_ssh_state() == before


STEPS = 60


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = ts.train_records(a), ts.train_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "tokens"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    ea, eb = ([(r["step"], r["set"], r["loss"]) for r in ts.train_records(d, "eval")] for d in (a, b))
    assert len(ea) == 4 and ea == eb   # steps 0 and 60, two sets each
    wa, wb = ts.final_weights(a), ts.final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
def test_two_hosts_over_ssh_stop_resume_and_train_what_two_ranks_on_one_node_train(world, tmp_path, monkeypatch,
                                                                                    ssh_loopback):  # noqa: F811
    """Through launch/deepspeed.sh: pdsh over ssh, one rank per host. A SIGTERM to the script (cpt launch)
    mid-run reaches the rank on the other host too: both save at the same step, the job exits 75, and the
    same command resumes on both hosts to the one-node run's numbers."""
    require(shutil.which("pdsh") is not None, "pdsh is not installed (Debian: pdsh)")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", eval={
        "sets": {"code": str(world["code"]), "prose": str(world["prose"])}, "tokens": 256, "every_steps": 0},
        train={"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32",
               "ds_config": "zero2", "log_every": 1})
    ts.train(cfg, ["name=one-node"], world_size=2)

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    (tmp_path / "ds_env").write_text("OMP_NUM_THREADS=1\n")   # the remote shells get only what is exported
    env = ts.env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env = {**ssh_loopback.env(env), "DS_ENV_FILE": str(tmp_path / "ds_env")}
    env.pop("MASTER_ADDR", None)   # the script's default: the hostfile's first host
    env.pop("CPT_LAUNCH", None)    # the script's default: under `cpt launch --`
    run = tmp_path / "runs" / "two-nodes"
    job = subprocess.Popen(["bash", str(SCRIPT), str(hostfile), str(cfg), "name=two-nodes"], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ts.wait_for_step(run, 2, job)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=300)
    out = stdout + stderr
    assert job.returncode == 75, out[-8000:]
    assert "cpt launch: SIGTERM: asked every rank to save" in out
    stopped_at = ts.train_records(run)[-1]["step"]
    assert 2 <= stopped_at < STEPS
    assert f"cmd = pdsh -S -f 1024 -w {','.join(HOSTS)} " in out
    assert "--master_addr=127.0.0.1 --master_port=" + env["MASTER_PORT"] in out
    for rank, host in enumerate(HOSTS):   # pdsh labels each line with the host that printed it
        assert f"{host}: " in out and f"nnodes=2, num_local_procs=1, node_rank={rank}" in out
    assert "world size 2 (deepspeed)" in out
    assert [r.step for r in refs.list_committed(run / "checkpoints")] == [stopped_at]
    assert "received a stop request" in out
    proc = run_script([str(hostfile), str(cfg), "name=two-nodes"], env, tmp_path, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    assert_same_run(tmp_path / "runs" / "one-node", run)
