"""A user's clone has nothing beside it: the tests that use shipped fixtures pass in a fresh clone
whose parent folder holds no `shared/` (or anything else)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

# The tests that read the Pythia tokenizer fixture.
FIXTURE_TESTS = ["tests/test_data_tokenizer.py", "tests/test_data_reader.py"]


def clone_alone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A clone of the repository in a folder of its own (no ../shared beside it), and the environment
    that imports the package from it."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "alone" / "continual-pt"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["continual-pt"]
    return clone, {**os.environ, "PYTHONPATH": str(clone)}


@pytest.mark.slow
def test_fixture_tests_pass_in_a_clone_with_nothing_beside_it(tmp_path):
    clone, env = clone_alone(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-m", "not slow",
                           *FIXTURE_TESTS], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # pytest's last line counts the outcomes (the slowest-tests list above it names tests, not outcomes)
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ passed(, \d+ warnings?)? in [\d.]+s( \([\d:]+\))? ?=*", summary), proc.stdout[-4000:]


# Each benchmark's arguments parse (--help) and the fixtures it defaults to are in the clone.
BENCHMARKS = ("import runpy, sys\nfrom pathlib import Path\n"
              "for path in sorted(Path('benchmarks').glob('*.py')):\n"
              "    sys.argv = [str(path), '--help']\n"
              "    try:\n"
              "        found = runpy.run_path(str(path), run_name='__main__')\n"
              "    except SystemExit as exc:\n"
              "        assert exc.code in (0, None), (path, exc.code)\n"
              "    found = runpy.run_path(str(path))\n"
              "    missing = [str(v) for k, v in found.items() if k.isupper() and isinstance(v, Path) and not v.exists()]\n"
              "    assert not missing, (path, missing)\n"
              "    print('ok', path.name)\n")


@pytest.mark.slow
def test_the_benchmarks_parse_their_arguments_and_find_their_fixtures_in_a_clone_alone(tmp_path):
    clone, env = clone_alone(tmp_path)
    proc = subprocess.run([sys.executable, "-c", BENCHMARKS], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")] == names


def test_no_test_reads_outside_the_repository():
    """What the clone test cannot reach: no test module names a folder beside the repository."""
    beside = re.compile(r"\.\./shared|parents?\b.*[\"']shared[\"']|/ [\"']shared[\"']|REPO\.parent")
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "tests").rglob("*.py"))
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if beside.search(line) and path.name != "test_clone.py"]
    assert offenders == []
