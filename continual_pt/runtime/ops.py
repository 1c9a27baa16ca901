"""DeepSpeed's just-in-time ops, built under a lock that a killed builder cannot leave behind.

DeepSpeed compiles some ops on first use with torch's extension builder: on the CPU its
shared-memory communication op, inside `deepspeed.init_distributed`; with an offloading config
its CPU Adam. Torch guards each build directory with a `lock` file that only its creator removes,
so a process killed while building (a time limit, Ctrl-C, the OOM killer) leaves it, and every
later start waits on it forever, printing nothing.

Here the ops a start needs are built before DeepSpeed asks for them, under an flock of our own
(`cpt-ops.lock` in the extensions root), which the OS releases when its holder dies. Holding it,
a torch `lock` that no live process holds open is a leftover and is removed, whichever op it
guarded. Every wait says what it waits on within seconds and ends, after `CPT_OP_BUILD_TIMEOUT`
seconds (default 900), in an error naming the lock file.

Torch keys its default build folder by the Python version and the accelerator only
(`py311_cpu`), and rebuilds an op whose build commands changed. Two environments sharing a home
directory (two virtualenvs, or one home on a cluster's nodes) compile the op against their own torch
and DeepSpeed install paths, so each one's build was stale to the other and every start after a start
of the other environment rebuilt it (a minute or two). Each environment builds in a folder of its
own, `<python>_<accelerator>-<torch and DeepSpeed versions>-<hash of the environment>` under torch's
root, unless `TORCH_EXTENSIONS_DIR` says where; `use_environment_root` puts it in this process's
environment, so torch, DeepSpeed and the compilers they start all use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from torch.utils.cpp_extension import get_default_build_root

from continual_pt.errors import UserError

LOCK_NAME = "cpt-ops.lock"
ROOT_ENV = "TORCH_EXTENSIONS_DIR"
TIMEOUT_ENV = "CPT_OP_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0
NOTICE_AFTER_S = 3.0
POLL_S = 0.2
# The ops DeepSpeed builds while starting the process group (on the CPU accelerator only).
STARTUP_OPS = ("ShareMemCommBuilder",)

Say = Callable[[str], None]


def say_stderr(message: str) -> None:
    """Print one set-up message at once (it may be the only sign of life for minutes)."""
    print(f"cpt: {message}", file=sys.stderr, flush=True)


def environment_key() -> str:
    """This Python environment, in a folder name: torch's and DeepSpeed's versions, readable, and a
    hash of what an op's build depends on (the interpreter prefix, their versions and install paths).

    It is the same in every process of an environment (every rank of a run, on every node that sees
    the environment at the same path) and differs between environments."""
    identity = [sys.prefix, torch.__version__, os.path.dirname(torch.__file__),
                deepspeed.__version__, os.path.dirname(deepspeed.__file__)]
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:10]
    return "-".join([_tag(f"torch{torch.__version__}"), _tag(f"ds{deepspeed.__version__}"), digest])


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text)


def extensions_root() -> Path:
    """Where this environment's ops are built, one folder per op (without creating it):
    TORCH_EXTENSIONS_DIR as set, else a folder of this environment's own under torch's root."""
    explicit = os.environ.get(ROOT_ENV)
    if explicit is not None:
        return Path(explicit)
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}-{environment_key()}"


def use_environment_root() -> Path:
    """Set TORCH_EXTENSIONS_DIR to `extensions_root()` where the user has not set it, so that torch,
    DeepSpeed and the processes they start build and load this environment's ops there."""
    root = extensions_root()
    os.environ[ROOT_ENV] = str(root)
    return root


def timeout_s() -> float:
    """The longest wait for a lock, from CPT_OP_BUILD_TIMEOUT (seconds)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"environment variable {TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def holders(path: Path) -> list[int] | None:
    """Process ids on this host holding `path` open (None where /proc cannot tell)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(path)
    found = []
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            fds = os.listdir(fd_dir)
        except OSError:   # gone meanwhile, or another user's
            continue
        if target in (_link(fd_dir / fd) for fd in fds):
            found.append(int(fd_dir.parent.name))
    return found


def _link(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:   # closed meanwhile (the listing's own descriptor, for one)
        return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def _unheld(batons: list[Path]) -> list[Path]:
    """Batons nobody holds at two looks POLL_S apart: torch closes a baton just before deleting it."""
    first = {b: _identity(b) for b in batons if holders(b) == []}
    if not first:
        return []
    time.sleep(POLL_S)
    return [b for b, ident in first.items() if ident is not None and _identity(b) == ident and holders(b) == []]


def _remove_leftovers(root: Path, say: Say) -> list[Path]:
    """Delete the torch batons under `root` that no live process holds; return the ones still held."""
    batons = sorted(root.glob("*/lock"))
    for baton in _unheld(batons):
        try:
            baton.unlink()
        except FileNotFoundError:
            continue
        say(f"removed {baton}: a build was killed holding it (no live process has it open)")
    return [b for b in batons if b.exists()]


def wait_out_loud(blocker: Callable[[], str | None], timeout: float, say: Say, advice: str,
                  why: str = "") -> None:
    """Poll until `blocker()` is None; it names what is waited on. Say so (with `why`) after
    NOTICE_AFTER_S and give up after `timeout` seconds with a UserError naming it and `advice`."""
    start = time.monotonic()
    noticed = False
    while (what := blocker()) is not None:
        waited = time.monotonic() - start
        if waited >= timeout:
            raise UserError(f"gave up after {waited:.0f} s waiting for {what}; {advice}")
        if not noticed and waited >= NOTICE_AFTER_S:
            say(f"waiting for {what}{why}")
            noticed = True
        time.sleep(POLL_S)


def settle_batons(root: Path, timeout: float, say: Say = say_stderr) -> None:
    """Remove leftover torch build locks under `root`; wait, saying so, for ones a live process holds."""
    def blocker() -> str | None:
        held = _remove_leftovers(root, say)
        if not held:
            return None
        who = ", ".join(f"{b} (pids {holders(b) or 'unknown'})" for b in held)
        return f"the torch extension build lock {who}"

    wait_out_loud(blocker, timeout, say, "end that process (or, if none is building, delete the file), "
                                         f"or raise {TIMEOUT_ENV}", " (another process is building a DeepSpeed op)")


def _acquire(f: IO[str], path: Path, timeout: float, say: Say) -> None:
    def blocker() -> str | None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return f"{path}, held by {path.read_text(errors='replace').strip() or 'another process'}"

    wait_out_loud(blocker, timeout, say, f"end that process if it is stuck (its lock goes with it), or raise "
                                         f"{TIMEOUT_ENV}")


@contextmanager
def build_lock(root: Path, timeout: float, say: Say = say_stderr) -> Iterator[None]:
    """Hold `root`/cpt-ops.lock, noting who holds it; the OS releases it if this process dies."""
    path = root / LOCK_NAME
    with open(path, "a+", encoding="utf-8") as f:
        _acquire(f, path, timeout, say)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                    "building DeepSpeed ops\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def environment_ninja() -> Iterator[None]:
    """Build with the ninja installed beside this Python, whatever PATH says.

    Two ninja versions (say /usr/bin's 1.11 and the virtualenv's 1.13) hash commands differently,
    so each one's build looks stale to the other: starts with different PATHs would rebuild the op
    (minutes on a busy machine, a wide window for a kill) every time they alternate.
    """
    bin_dir = str(Path(sys.executable).parent)
    if not (Path(bin_dir) / "ninja").is_file():
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([bin_dir, before]) if before else bin_dir
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def _builders(names: tuple[str, ...]) -> list:
    """DeepSpeed's builders of `names` that this accelerator has and can build, not yet loaded."""
    found = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or builder.name in builder._loaded_ops:
            continue
        if deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            found.append(builder)
    return found


def prepare(names: tuple[str, ...] = STARTUP_OPS, timeout: float | None = None, say: Say = say_stderr) -> None:
    """Clear killed builds' locks and build or load the ops `names` under our lock, before DeepSpeed does."""
    timeout = timeout_s() if timeout is None else timeout
    root = use_environment_root()
    builders = _builders(names)
    if not builders and not root.is_dir():
        return
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root, timeout, say), environment_ninja():
        settle_batons(root, timeout, say)
        for builder in builders:
            if not (root / builder.name / f"{builder.name}.so").exists():
                say(f"building DeepSpeed op {builder.name} in {root / builder.name} "
                    "(once per environment and machine)")
            # Loaded here, DeepSpeed's own load later returns this module without touching torch's lock.
            builder.load(verbose=False)
