"""Atomic outputs: a target holds its old content or a whole new one, never a mix, and no temporary
is left behind; JSON lines carry null for non-finite floats."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from continual_pt import files

REPO = Path(__file__).resolve().parents[1]
WRITES = 50
PAYLOAD_BYTES = 256 * 1024


def payload(writer: int, index: int) -> bytes:
    """A distinct payload per (writer, write), whose header says which it must be in full."""
    header = f"{writer}:{index}:".encode()
    fill = bytes([(writer * WRITES + index) % 251 + 1])
    return header + fill * (PAYLOAD_BYTES - len(header))


def check_whole(data: bytes) -> tuple[int, int]:
    parts = data.split(b":", 2)
    assert len(parts) == 3, f"torn content: {len(data)} bytes without a whole header"
    writer, index, _ = parts
    expected = payload(int(writer), int(index))
    assert data == expected, f"mixed or torn content: {len(data)} bytes, header {writer!r}:{index!r}"
    return int(writer), int(index)


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, **kwargs)


def test_write_text_creates_parents_and_replaces_content(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    files.atomic_write_text(target, "first\n")
    assert target.read_text() == "first\n"
    files.atomic_write_text(target, "σ second")
    assert target.read_bytes() == "σ second".encode()
    files.atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_writer_raising_midway_leaves_the_old_content_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content")
    seen = []
    with pytest.raises(error, match="disk on fire"):
        with files.atomic_output(target) as tmp:
            seen.append(tmp)
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
            assert tmp.read_bytes() == b"half of the new"
            raise error("disk on fire")
    assert target.read_bytes() == b"old content"
    assert not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_writer_raising_before_writing_leaves_no_target(tmp_path):
    target = tmp_path / "never.txt"
    with pytest.raises(ValueError, match="nothing yet"):
        with files.atomic_output(target):
            raise ValueError("nothing yet")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_replaces_an_empty_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    with files.atomic_output(out) as tmp:
        tmp.mkdir()
        (tmp / "sub").mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "sub" / "w.bin").write_bytes(b"123")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["config.json", "sub", "sub/w.bin"]
    assert (out / "sub" / "w.bin").read_bytes() == b"123"
    other = tmp_path / "other"
    with pytest.raises(OSError):
        with files.atomic_output(other) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("a")
            other.mkdir()
            (other / "keep").write_text("mine")  # a non-empty folder cannot be replaced
    assert sorted(p.name for p in other.iterdir()) == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "other"]


def test_temporary_names_differ_per_call_and_per_process(tmp_path):
    target = tmp_path / "out.json"
    names = []
    for _ in range(2):
        with files.atomic_output(target) as tmp:
            names.append(tmp.name)
            assert tmp.parent == tmp_path
            tmp.write_text("x")
    names.append(files.temp_path_for(target).name)
    child = python("""
        import sys
        from continual_pt import files
        print(files.temp_path_for(sys.argv[1]).name)
    """, str(target), stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    names.append(out.strip())
    assert len(set(names)) == 4
    for name in names:
        assert name.startswith(".out.json.") and name.endswith(".tmp")
    assert all(f".{os.getpid()}-" in name for name in names[:3])
    assert f".{child.pid}-" in names[3]


def test_two_processes_writing_one_target_never_mix(tmp_path):
    target = tmp_path / "shared.bin"
    files.atomic_write_bytes(target, payload(9, 0))
    code = """
        import sys
        from continual_pt import files
        from tests.test_files import WRITES, payload
        writer, target = int(sys.argv[1]), sys.argv[2]
        for index in range(WRITES):
            files.atomic_write_bytes(target, payload(writer, index))
    """
    writers = [python(code, str(w), str(target)) for w in (0, 1)]
    reads = 0
    while any(w.poll() is None for w in writers):
        check_whole(target.read_bytes())  # a concurrent reader never sees a torn file either
        reads += 1
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    writer, index = check_whole(target.read_bytes())
    assert writer in (0, 1) and index == WRITES - 1
    assert reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.bin"]


def test_json_line_writes_null_for_non_finite_floats_at_any_depth():
    record = {"loss": math.nan, "ppl": math.inf, "lr": 1.5e-4, "step": 3, "name": "pile",
              "curve": [1.0, -math.inf], "nested": {"x": math.nan, "y": (2, "z")}, "ok": True}
    line = files.json_line(record)
    assert line == ('{"loss": null, "ppl": null, "lr": 0.00015, "step": 3, "name": "pile", '
                    '"curve": [1.0, null], "nested": {"x": null, "y": [2, "z"]}, "ok": true}\n')
    assert json.loads(line)["curve"] == [1.0, None]
    assert files.json_safe(math.nan) is None and files.json_safe(2.5) == 2.5
