"""`cpt checkpoint info` and `cpt checkpoint convert`, in-process on checkpoints of a stand-in engine
(the conversion itself, on real DeepSpeed checkpoints, is tested in test_elastic.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from continual_pt import cli, layout
from continual_pt.checkpoint import checkpointer

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FakeEngine:
    device = torch.device("cpu")

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / MODEL).write_bytes(b"w" * 1234)
        if client_state["zero_stage"]:
            (path / OPTIM).write_bytes(b"not a torch file")


def saved_run(tmp_path: Path, zero_stage: int = 2) -> Path:
    """A run dir with committed steps 2 and 4 and an interrupted save of step 6."""
    root = tmp_path / "run" / "checkpoints"
    ckpt = checkpointer.Checkpointer(root, keep_last=5, rank=0, world_size=1)
    for step in (2, 4):
        ckpt.save(FakeEngine(), step, {"tokens_seen": step * 512, "zero_stage": zero_stage, "precision": "bf16"},
                  {"step": step}, {"run": lambda p: (p.mkdir(), (p / "config.yaml").write_text("name: run\n"))})
    (root / "global_step6").mkdir()
    (root / "global_step6" / MODEL).write_bytes(b"half")
    return tmp_path / "run"


def test_info_on_a_run_lists_its_checkpoints_and_details_the_newest_committed(tmp_path, capsys):
    run = saved_run(tmp_path)
    assert cli.main(["checkpoint", "info", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    tag = run / "checkpoints" / "global_step4"
    saved = json.loads((tag / layout.MARKER).read_text())["time"]
    rank0 = (tag / "rank0.pt").stat().st_size
    assert out == [
        f"3 checkpoint folders under {run / 'checkpoints'}:",
        "  global_step2: committed",
        "  global_step4: committed",
        "  global_step6: NOT committed",
        "",
        f"checkpoint {tag}: committed, every file matches its size and checksum",
        f"step 4, tokens 2048, world size 1, ZeRO stage 2, precision bf16, saved "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(saved))}",
        "universal conversion: none (made on the first resume with another world size or ZeRO stage)",
        f"files: 4, {1234 + 16 + 10 + rank0:,} bytes ({(1234 + 16 + 10 + rank0) / 1e6:.1f} MB)",
        f"  {'1,234':>14}  {MODEL}",
        f"  {f'{rank0:,}':>14}  rank0.pt",
        f"  {'10':>14}  run/config.yaml",
        f"  {'16':>14}  {OPTIM}",
    ]


def test_info_on_an_uncommitted_or_damaged_checkpoint_says_so(tmp_path, capsys):
    run = saved_run(tmp_path)
    assert cli.main(["checkpoint", "info", str(run / "checkpoints" / "global_step6")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("global_step6: NOT committed (no COMMITTED.json: an interrupted save, never resumed)")
    assert out[1:] == ["step 6 (from its name; no marker records the rest)", "files: 1, 4 bytes (0.0 MB)",
                       f"  {'4':>14}  {MODEL}"]
    tag = run / "checkpoints" / "global_step2"
    (tag / MODEL).write_bytes(b"w" * 1000)
    assert cli.main(["checkpoint", "info", str(tag)]) == 0
    assert (f"checkpoint {tag}: committed but damaged: is corrupt: {MODEL} has 1000 bytes, the commit marker "
            "recorded 1234") in capsys.readouterr().out


def test_info_and_convert_name_a_missing_path_or_a_checkpoint_that_needs_no_conversion(tmp_path, capsys):
    assert cli.main(["checkpoint", "info", str(tmp_path / "nowhere")]) == 2
    assert f"cpt checkpoint: error: checkpoint info: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert cli.main(["checkpoint", "info", str(tmp_path)]) == 2
    assert f"no checkpoint folders (global_step<N>) under {tmp_path}" in capsys.readouterr().err
    run = saved_run(tmp_path, zero_stage=0)
    assert cli.main(["checkpoint", "convert", str(run)]) == 2
    err = capsys.readouterr().err
    assert "was saved with ZeRO stage 0: its optimizer state is not partitioned, so it resumes on any world size" \
        in err and "Traceback" not in err
    assert not (run / "checkpoints" / layout.UNIVERSAL).exists()


def test_convert_of_a_checkpoint_deepspeed_cannot_read_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    run = saved_run(tmp_path)   # its optimizer shard is not a torch file
    assert cli.main(["checkpoint", "convert", str(run)]) == 2
    err = capsys.readouterr().err
    assert (f"could not convert checkpoint {run / 'checkpoints' / 'global_step4'} to DeepSpeed's universal "
            "format (") in err and "Traceback" not in err
    assert not list((run / "checkpoints" / layout.UNIVERSAL).iterdir())


def test_help_lists_the_checkpoint_commands(capsys):
    try:
        cli.main(["checkpoint", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "convert" in out
