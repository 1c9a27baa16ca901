"""A private sshd on loopback, so a launcher's multi-node path (pdsh over ssh) runs on this one machine.

`ssh_loopback` starts `sshd -f <temp config>` on a free port of 127.0.0.1 and 127.0.0.2 with host and
client keys made in a temp dir (key login only, no password) and stops it at the session's end. Nothing
is written under any home dir: OpenSSH finds ~/.ssh through the passwd entry, not $HOME, so the client
gets its options from an `ssh` wrapper (`exec /usr/bin/ssh -F <temp config> "$@"`) that `env()` puts
first on PATH; pdsh and DeepSpeed's runner both exec `ssh` from PATH. sshd needs its privilege
separation dir /run/sshd, which the fixture creates when missing, as the service would.

Without an OpenSSH server the fixture skips, naming what is missing, unless CPT_REQUIRE_SSHD=1 (CI).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOSTS = ("127.0.0.1", "127.0.0.2")
SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")


def require(ok: bool, reason: str) -> None:
    """Skip when `ok` is false, or fail where CPT_REQUIRE_SSHD=1 says the machine must have it."""
    if ok:
        return
    if os.environ.get("CPT_REQUIRE_SSHD") == "1":
        pytest.fail(f"{reason} (CPT_REQUIRE_SSHD=1)")
    pytest.skip(reason)


@dataclasses.dataclass(frozen=True)
class SshLoopback:
    port: int
    hosts: tuple[str, ...]
    bin_dir: Path       # holds the `ssh` wrapper
    log: Path           # sshd's own log (-e)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) with the `ssh` wrapper first on PATH."""
        e = dict(os.environ if base is None else base)
        e["PATH"] = os.pathsep.join([str(self.bin_dir), e.get("PATH", "")])
        return e

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", host, command], env=self.env(), capture_output=True, text=True, timeout=30)


def free_port_on_all(hosts: tuple[str, ...]) -> int:
    """A port no one listens on at any of `hosts` right now."""
    while True:
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue


def keygen(path: Path) -> list[str]:
    """A new passphrase-less ed25519 key at `path`; its public half as [type, base64]."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cpt-test", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().split()[:2]


def write_files(root: Path, port: int, user: str) -> Path:
    """Keys, sshd_config, ssh_config, known_hosts and the `ssh` wrapper under `root`; the sshd config."""
    host_key = keygen(root / "host_ed25519")
    client_key = keygen(root / "client_ed25519")
    (root / "authorized_keys").write_text(" ".join(client_key) + "\n")
    (root / "known_hosts").write_text(",".join(f"[{h}]:{port}" for h in HOSTS) + " " + " ".join(host_key) + "\n")
    sshd_config = root / "sshd_config"
    sshd_config.write_text("".join(f"ListenAddress {h}:{port}\n" for h in HOSTS) + f"""\
HostKey {root / 'host_ed25519'}
PidFile {root / 'sshd.pid'}
AuthorizedKeysFile {root / 'authorized_keys'}
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
""")   # StrictModes would refuse key files under the world-writable /tmp
    (root / "ssh_config").write_text(f"""\
Host {' '.join(HOSTS)}
  Port {port}
  User {user}
  IdentityFile {root / 'client_ed25519'}
  IdentitiesOnly yes
  UserKnownHostsFile {root / 'known_hosts'}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  PasswordAuthentication no
  LogLevel ERROR
""")
    wrapper = root / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {root / "ssh_config"} "$@"\n')
    wrapper.chmod(0o755)
    return sshd_config


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 20.0) -> bool:
    """True once sshd accepts connections on every host; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            for host in HOSTS:
                socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"sshd did not listen on port {port} within {timeout:.0f} s")


def start_sshd(root: Path, user: str) -> tuple[subprocess.Popen, SshLoopback]:
    """sshd on a free port; a port taken between the choice and sshd's bind is tried again."""
    for attempt in range(3):
        run_dir = root / f"try{attempt}"
        run_dir.mkdir()
        port = free_port_on_all(HOSTS)
        config = write_files(run_dir, port, user)
        log = run_dir / "sshd.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        if wait_listening(proc, port):
            return proc, SshLoopback(port, HOSTS, run_dir / "bin", log)
    raise RuntimeError(f"sshd exited at start three times; its last log:\n{log.read_text()}")


def check_tools() -> None:
    for tool in ("ssh", "ssh-keygen"):
        require(shutil.which(tool) is not None, f"`{tool}` is not installed (Debian: openssh-client)")
    require(SSHD.is_file(), f"{SSHD} is not installed (Debian: openssh-server)")
    if not PRIVSEP_DIR.is_dir():
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
        except OSError as err:
            require(False, f"sshd needs its privilege separation dir {PRIVSEP_DIR}, which cannot be made: {err}")


@pytest.fixture(scope="session")
def ssh_loopback(tmp_path_factory):
    """A running private sshd reachable as HOSTS by key; stopped at the session's end."""
    check_tools()
    user = pwd.getpwuid(os.getuid()).pw_name
    proc, server = start_sshd(tmp_path_factory.mktemp("sshd"), user)
    try:
        for host in HOSTS:
            got = server.ssh(host, "echo ok")
            assert got.stdout == "ok\n", f"ssh {host}: exit {got.returncode}\n{got.stderr}\n{server.log.read_text()}"
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)
