"""Downstream-task rows (cpt eval --lm-eval) in cpt report and cpt plot, on hand-made runs (no training):
a column or curve per task holds one configuration, the loss columns do not change."""

from __future__ import annotations

import json

from continual_pt.cli import main
from continual_pt.results.plots import draw_runs
from continual_pt.results.report import load_run, load_runs
from continual_pt.schedules import build
from tests.test_results_runs import COSINE, TOKENS_PER_STEP, make_run, parse_table, trained

EVALS = [("code", 0, 4.0), ("prose", 0, 5.0), ("code", 20, 4.25), ("prose", 20, 3.5)]


def loss_row(run, step, name, loss):
    """A held-out loss row as cpt eval writes it."""
    return {"run": run, "checkpoint": f"/runs/{run}/checkpoints/global_step{step}", "kind": "checkpoint",
            "tag": f"global_step{step}", "step": step, "tokens_seen": TOKENS_PER_STEP * step, "set": name,
            "split": "val", "budget": None, "selection": "spread", "seq_len": 16, "dtype": "fp32", "loss": loss,
            "ppl": 2.0 ** loss, "tokens": 1024}


def task_row(run, step, task, metrics, stderr, better, *, harness="lm-eval 0.4.13", num_fewshot=None, n_shot=0,
             limit=None):
    """A task row as cpt eval --lm-eval appends it."""
    return {"run": run, "checkpoint": f"/runs/{run}/checkpoints/global_step{step}", "kind": "checkpoint",
            "tag": f"global_step{step}", "step": step, "tokens_seen": TOKENS_PER_STEP * step, "task": task,
            "request": task, "request_version": 1.0, "harness": harness, "task_version": 1.0,
            "num_fewshot": num_fewshot, "n_shot": n_shot, "limit": limit, "dtype": "fp32", "samples": 20,
            "metrics": metrics, "stderr": stderr, "higher_is_better": better, "world_size": 1, "seconds": 1.0,
            "time": "2026-12-06T10:40:00+00:00"}


def mc(run, step, acc, acc_err, norm, norm_err, **config):
    return task_row(run, step, "tiny_mc", {"acc": acc, "acc_norm": norm}, {"acc": acc_err, "acc_norm": norm_err},
                    {"acc": True, "acc_norm": True}, **config)


def ppl(run, step, value):
    return task_row(run, step, "tiny_ppl", {"word_perplexity": value}, {"word_perplexity": None},
                    {"word_perplexity": False})


def write_scores(run_dir, rows):
    with open(run_dir / "scores.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def two_runs(tmp_path, with_tasks=True):
    """warm (from a checkpoint) and const, in-loop evals of code and prose, cpt eval losses of prose, and
    (with_tasks) task rows: warm's 0-shot tiny_mc at steps 10 and 20, then a 5-shot row and a row of another
    harness version at step 20 that must not enter its column."""
    lr_at = build(COSINE, 20)
    warm = make_run(tmp_path, "warm", trained([10, 20], lr_at, EVALS), init=str(tmp_path / "pre"))
    const = make_run(tmp_path, "const", trained([10, 20], lr_at, EVALS))
    write_scores(warm, [loss_row("warm", 10, "prose", 3.75), loss_row("warm", 20, "prose", 3.25)])
    write_scores(const, [loss_row("const", 20, "prose", 3.5)])
    if with_tasks:
        write_scores(warm, [mc("warm", 10, 0.3, 0.1051, 0.4, 0.1124), ppl("warm", 10, 13.0),
                            mc("warm", 20, 0.45, 0.1141, 0.6, 0.1124), ppl("warm", 20, 12.5),
                            mc("warm", 20, 0.9, 0.0688, 0.95, 0.05, num_fewshot=5, n_shot=5),
                            mc("warm", 20, 0.8, 0.0918, 0.85, 0.0819, harness="lm-eval 0.4.12")])
        write_scores(const, [mc("const", 20, 0.35, 0.1094, 0.5, 0.1147), ppl("const", 20, 14.0)])
    return warm, const


def report(capsys, *args):
    assert main(["report", *map(str, args), "--upstream", "code", "--downstream", "prose"]) == 0
    out = capsys.readouterr().out
    return {r["run"]: r for r in parse_table(out)}, out


def test_report_shows_each_task_metric_at_the_last_task_checkpoint_with_its_gain(tmp_path, capsys):
    warm, const = two_runs(tmp_path)
    rows, out = report(capsys, warm, const, "--baseline", const)
    task_heads = [h for h in rows["warm"] if "tiny" in h or h == "tasks at step"]
    assert task_heads == ["tasks at step", "tiny_mc acc (0-shot)", "tiny_mc acc_norm (0-shot)",
                          "tiny_ppl word_perplexity (0-shot)", "gain vs const (Δ tiny_mc acc (0-shot))",
                          "gain vs const (Δ tiny_mc acc_norm (0-shot))",
                          "gain vs const (Δ tiny_ppl word_perplexity (0-shot))"]
    assert {h: rows["warm"][h] for h in task_heads} == {
        "tasks at step": "20", "tiny_mc acc (0-shot)": "0.4500 ± 0.1141",
        "tiny_mc acc_norm (0-shot)": "0.6000 ± 0.1124", "tiny_ppl word_perplexity (0-shot)": "12.5000",
        "gain vs const (Δ tiny_mc acc (0-shot))": "+0.1000", "gain vs const (Δ tiny_mc acc_norm (0-shot))": "+0.1000",
        # lower perplexity is better: 14.0 -> 12.5 is a gain of +1.5, as a lower loss is
        "gain vs const (Δ tiny_ppl word_perplexity (0-shot))": "+1.5000"}
    assert rows["const"]["tiny_mc acc (0-shot)"] == "0.3500 ± 0.1094"
    assert rows["const"]["gain vs const (Δ tiny_mc acc (0-shot))"] == "+0.0000"
    # The 5-shot row and the other harness's row of step 20 are other measurements: no column, no cell.
    assert "5-shot" not in out and "0.9000" not in out and "0.8000" not in out and "0.4.12" not in out
    assert "- tiny_mc (0-shot): lm-eval 0.4.13, task version 1.0, asked for as tiny_mc (version 1.0), " \
           "num_fewshot not given (each task's own), all documents, fp32" in out
    assert main(["report", str(warm), str(const), "--upstream", "code", "--downstream", "prose",
                 "--task-metric", "acc_norm"]) == 0
    heads = list(parse_table(capsys.readouterr().out)[0])
    assert heads[-2:] == ["tasks at step", "tiny_mc acc_norm (0-shot)"]
    assert main(["report", str(warm), "--upstream", "code", "--downstream", "prose", "--task-metric", "f1"]) == 2
    assert "--task-metric f1: no task row of these runs has that metric; known: acc, acc_norm, word_perplexity" \
        in capsys.readouterr().err


def test_runs_measured_in_other_configurations_get_columns_of_their_own(tmp_path, capsys):
    warm, const = two_runs(tmp_path, with_tasks=False)
    # warm: a 0-shot checkpoint at limit 20, one at limit 10, and a 5-shot series at two checkpoints (the
    # most checkpoints win); const: one 0-shot checkpoint at limit 20 and one at limit 10 (the larger wins).
    write_scores(warm, [mc("warm", 10, 0.1, 0.1, 0.1, 0.1, limit=20), mc("warm", 20, 0.2, 0.1, 0.2, 0.1, limit=10),
                        mc("warm", 10, 0.3, 0.1, 0.3, 0.1, num_fewshot=5, n_shot=5),
                        mc("warm", 20, 0.4, 0.1, 0.4, 0.1, num_fewshot=5, n_shot=5)])
    write_scores(const, [mc("const", 20, 0.5, 0.1, 0.5, 0.1, limit=20), mc("const", 20, 0.6, 0.1, 0.6, 0.1, limit=10)])
    assert load_run(warm).tasks["tiny_mc"].label() == "5-shot"
    assert load_run(const).tasks["tiny_mc"].label() == "0-shot, limit 20"
    rows, _ = report(capsys, warm, const, "--baseline", const, "--task-metric", "acc")
    assert {h: (rows["warm"][h], rows["const"][h]) for h in rows["warm"] if "tiny_mc" in h} == {
        "tiny_mc acc (0-shot, limit 20)": ("n/a", "0.5000 ± 0.1000"),
        "tiny_mc acc (5-shot)": ("0.4000 ± 0.1000", "n/a"),
        "gain vs const (Δ tiny_mc acc (0-shot, limit 20))": ("n/a", "+0.0000"),
        "gain vs const (Δ tiny_mc acc (5-shot))": ("n/a", "n/a")}
    # Same shots and limit, another harness: the heads say how the configurations differ.
    write_scores(warm, [mc("warm", s, 0.7, 0.1, 0.7, 0.1, limit=20, harness="lm-eval 0.4.12") for s in (0, 10, 20)])
    rows, _ = report(capsys, warm, const, "--task-metric", "acc")
    assert {h: (rows["warm"][h], rows["const"][h]) for h in rows["warm"] if "tiny_mc" in h} == {
        "tiny_mc acc (0-shot, limit 20; harness=lm-eval 0.4.12)": ("0.7000 ± 0.1000", "n/a"),
        "tiny_mc acc (0-shot, limit 20; harness=lm-eval 0.4.13)": ("n/a", "0.5000 ± 0.1000")}


def test_task_rows_leave_the_loss_columns_as_they_were(tmp_path, capsys):
    bare = tmp_path / "bare"
    warm, const = two_runs(bare, with_tasks=False)
    before, out = report(capsys, warm, const, "--baseline", const)
    assert "tasks at step" not in out and "Tasks" not in out
    full = tmp_path / "full"
    warm2, const2 = two_runs(full)
    # A task row never counts as a loss, even one that carries every field of a loss row of its checkpoint.
    write_scores(warm2, [{**loss_row("warm", 20, "prose", 0.0), **mc("warm", 20, 0.5, 0.1, 0.5, 0.1)}])
    after, _ = report(capsys, warm2, const2, "--baseline", const2)
    for name in ("warm", "const"):
        assert {h: after[name][h] for h in before[name]} == before[name]
    assert before["warm"]["prose final loss"] == "3.2500"
    for a, b in zip(load_runs([str(warm), str(const)]), load_runs([str(warm2), str(const2)])):
        assert a.evals == b.evals and a.sources == b.sources and not a.tasks and b.tasks


def test_plot_draws_a_panel_per_task_metric_with_a_line_per_run(tmp_path, capsys):
    warm, const = two_runs(tmp_path)
    out = tmp_path / "fig"
    assert main(["plot", str(warm), str(const), "--sets", "prose", "--task", "tiny_mc:acc", "--task", "tiny_ppl",
                 "--out", str(out)]) == 0
    svg = (tmp_path / "fig.svg").read_text()
    for label in ("prose: held-out loss (cpt eval)", "tiny_mc: acc (0-shot)", "acc (higher is better)",
                  "tiny_ppl: word_perplexity (0-shot)", "word_perplexity (lower is better)", "learning-rate schedule"):
        assert f">{label}<" in svg, label
    runs = load_runs([str(warm), str(const)])
    fig = draw_runs(runs, ["prose"], tasks=[("tiny_mc", "acc"), ("tiny_ppl", "word_perplexity")])
    prose_ax, mc_ax, ppl_ax, lr_ax = fig.axes
    assert [line.get_label() for line in mc_ax.lines] == ["warm", "const"]
    (warm_x, warm_y), (const_x, const_y) = ((list(ln.get_xdata()), list(ln.get_ydata())) for ln in mc_ax.lines)
    assert (warm_x, warm_y) == ([640, 1280], [0.3, 0.45])   # the 0-shot series only
    assert (const_x, const_y) == ([1280], [0.35])
    assert [list(ln.get_ydata()) for ln in ppl_ax.lines] == [[13.0, 12.5], [14.0]]
    assert lr_ax.get_title() == "learning-rate schedule"
    capsys.readouterr()
    assert main(["plot", str(warm), "--task", "tiny_mc:f1", "--out", str(tmp_path / "q")]) == 2
    assert "--task tiny_mc:f1: tiny_mc has no metric 'f1'; its metrics: acc, acc_norm" in capsys.readouterr().err
    assert main(["plot", str(warm), "--task", "hellaswag", "--out", str(tmp_path / "q")]) == 2
    assert "--task hellaswag: no run has task rows of 'hellaswag'; known tasks: tiny_mc, tiny_ppl" \
        in capsys.readouterr().err
    assert not (tmp_path / "q.png").exists()

