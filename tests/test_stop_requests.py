"""Stop requests by file (`<run dir>/STOP`), their answer, `cpt stop` and `cpt launch`'s own checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from continual_pt import cli, layout
from continual_pt.cli import main
from continual_pt.config.load import load_source
from continual_pt.sweep.options import SweepOptions
from continual_pt.training import stop as stops
from continual_pt.training.lock import RunLock
from continual_pt.training.supervise import config_source


def test_a_watched_stop_file_becomes_a_request_at_the_next_look(tmp_path):
    request = stops.StopRequest()
    request.watch(tmp_path / layout.STOP)
    assert request.current() == 0
    stops.request_stop(tmp_path, "t1", "test")
    assert request.current() == 0            # looked less than a second ago
    time.sleep(stops.POLL_SECONDS + 0.05)
    assert request.current() == stops.FILE_REQUEST
    assert request.seconds_since() is not None
    assert stops.describe(stops.FILE_REQUEST) == "a stop request (STOP in the run dir)"
    assert stops.describe(int(signal.SIGUSR1)) == "SIGUSR1"


def test_a_signal_is_not_replaced_by_a_later_file_request(tmp_path):
    request = stops.StopRequest()
    request.install()
    try:
        request.watch(tmp_path / layout.STOP)
        stops.request_stop(tmp_path, "t", "test")
        signal.raise_signal(signal.SIGTERM)
        assert request.current() == signal.SIGTERM
    finally:
        request.uninstall()
    assert request.current() == 0            # uninstall forgets the file as well


def test_the_answer_names_the_request_step_and_status_and_removes_the_request(tmp_path):
    assert stops.answer(tmp_path, 7, 75) is None                       # nothing asked: nothing answered
    assert not (tmp_path / layout.STOP_DONE).exists()
    stops.request_stop(tmp_path, "tok", "cpt stop")
    done = stops.answer(tmp_path, 7, 75)
    assert not (tmp_path / layout.STOP).exists()
    on_disk = json.loads((tmp_path / layout.STOP_DONE).read_text())
    assert on_disk == done and done["step"] == 7 and done["exit"] == 75
    assert done["request"]["token"] == "tok" and done["request"]["why"] == "cpt stop"


def test_an_unreadable_request_is_still_answered(tmp_path):
    (tmp_path / layout.STOP).write_text("stop please")             # `touch STOP` by hand works too
    assert stops.read_record(tmp_path / layout.STOP) == {}
    assert stops.answer(tmp_path, 3, 75)["request"] == {}


def test_the_run_dir_is_found_from_the_training_arguments_of_any_launcher(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"name: base\nout_dir: {tmp_path / 'runs'}\ntrain: {{max_steps: 10}}\n"
                   "model: {config: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4}}\n"
                   f"data: {{train: {{corpus: {{path: {tmp_path}}}}}}}\n")
    for command in (["deepspeed", "--num_gpus", "2", "--module", "continual_pt.train", "--config", str(cfg),
                     "name=x", "--local_rank=0"],
                    ["torchrun", "--nproc_per_node", "2", "-m", "continual_pt.train", f"--config={cfg}", "name=x"],
                    ["mpirun", "-np", "2", "python", "-m", "continual_pt.train", "-c", str(cfg), "name=x"],
                    ["srun", "python", "/opt/site/continual_pt/train.py", "--config", str(cfg), "name=x"]):
        assert load_source(config_source(command)).run_dir == tmp_path / "runs" / "x", command


def test_cpt_launch_refuses_a_command_without_training_or_without_a_command(capfd):
    assert main(["launch", "--", "deepspeed", "--num_gpus", "2", "other.py"]) == 2
    assert "cannot find continual_pt.train" in capfd.readouterr().err
    assert main(["launch"]) == 2
    assert "no launcher command" in capfd.readouterr().err


def test_a_launcher_that_is_not_there_is_named_and_nothing_starts(tmp_path, capfd):
    run_dir = tmp_path / "runs" / "x"
    assert main(["launch", "--run-dir", str(run_dir), "--", "no-such-launcher", "-m", "continual_pt.train"]) == 2
    err = capfd.readouterr().err
    assert err == ("cpt launch: error: cannot run the launcher command: 'no-such-launcher' is not an executable "
                   "file nor a command on PATH (e.g. deepspeed, torchrun, mpirun; activate the environment that "
                   "has it)\n"), err
    assert not run_dir.exists()


def test_an_error_of_cpt_launch_names_the_subcommand_not_the_launcher_command(capfd):
    """The launcher command's words are an option of cpt launch: they never stand for the subcommand."""
    assert main(["launch", "--", "sleep", "1"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("cpt launch: error: cannot find continual_pt.train in the command 'sleep 1'"), err


def test_cpt_launch_clears_a_stale_request_and_exits_with_the_commands_status(tmp_path, capfd):
    """In this process, beside a child of its own that outlives the command: only the launcher's processes
    are waited for."""
    stops.request_stop(tmp_path, "old", "cpt stop")
    other = subprocess.Popen(["sleep", "60"])
    started = time.monotonic()
    try:
        assert main(["launch", "--run-dir", str(tmp_path), "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    finally:
        other.kill()
        other.wait()
    assert time.monotonic() - started < 20
    assert "removed a stop request left by an earlier start (cpt stop" in capfd.readouterr().err
    assert not (tmp_path / layout.STOP).exists()


def test_cpt_launch_refuses_a_run_dir_another_run_holds(tmp_path, capfd):
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        stops.request_stop(tmp_path, "theirs", "cpt stop")
        assert main(["launch", "--run-dir", str(tmp_path), "--", sys.executable, "-c", "pass"]) == 2
        assert "is in use" in capfd.readouterr().err
        assert stops.read_record(tmp_path / layout.STOP)["token"] == "theirs"   # not ours to clear
    finally:
        lock.release()


def test_a_stop_signal_to_cpt_launch_reports_a_launcher_that_never_answered(tmp_path):
    """A command that ignores the request: the job exits with its status, and the request is withdrawn."""
    proc = subprocess.Popen([sys.executable, "-m", "continual_pt.cli", "launch", "--run-dir", str(tmp_path), "--",
                             sys.executable, "-c", "import time; time.sleep(3)"], stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGTERM: asked every rank to save" in err
    assert "before the run answered the stop request" in err
    assert not (tmp_path / layout.STOP).exists()


def test_cpt_stop_needs_a_live_run_and_leaves_a_request_for_it(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("name: x\n")
    assert main(["stop", str(tmp_path)]) == 2
    assert "no run is running" in capsys.readouterr().err
    assert not (tmp_path / layout.STOP).exists()
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        assert main(["stop", str(tmp_path)]) == 0
        assert stops.read_record(tmp_path / layout.STOP)["why"] == "cpt stop"
    finally:
        lock.release()
    assert main(["stop", str(tmp_path.parent / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("status", [0, 75])
def test_cpt_stop_wait_reports_the_answer(tmp_path, capsys, status, monkeypatch):
    (tmp_path / "config.yaml").write_text("name: x\n")
    lock = RunLock(tmp_path)
    lock.acquire()
    real = stops.request_stop

    def request_and_answer(run_dir, token, why):
        path = real(run_dir, token, why)
        stops.answer(run_dir, 12, status)
        return path

    monkeypatch.setattr(stops, "request_stop", request_and_answer)
    try:
        assert main(["stop", str(tmp_path), "--wait", "5"]) == 0
    finally:
        lock.release()
    assert f"the run exited with status {status} at step 12" in capsys.readouterr().out


def test_a_ctrl_c_outside_training_ends_a_command_with_130_and_one_line(monkeypatch, capsys):
    def interrupted(opts: SweepOptions) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "target_function", lambda target: interrupted)
    assert main(["sweep", "--grid", "g.yaml", "--local"]) == 130
    assert capsys.readouterr().err == "cpt sweep: interrupted\n"
