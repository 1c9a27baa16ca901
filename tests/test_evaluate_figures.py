"""cpt plot and cpt report on a real miniature continual pre-training experiment."""

from __future__ import annotations

import shutil

import pytest

from continual_pt.cli import main
from continual_pt.results.report import load_run, load_runs
from tests import train_support as ts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def exp(world, tmp_path_factory):
    """pre (12 steps on code) -> rewarm-cosine and constant (12 steps on prose); never written to."""
    return ts.continual_experiment(tmp_path_factory.getbasetemp() / "experiment", world)


def in_loop(run_dir, set_name):
    return [r for r in ts.train_records(run_dir, "eval") if r["set"] == set_name]


def test_plot_draws_each_set_and_the_schedule_for_every_run(exp, tmp_path, capsys):
    from matplotlib.image import imread

    from continual_pt.results.plots import draw_runs

    paths = [exp["pre"], exp["cosine"], exp["constant"]]
    assert main(["plot", *map(str, paths), "--out", str(tmp_path / "fig" / "loss.png")]) == 0
    png, svg = tmp_path / "fig" / "loss.png", tmp_path / "fig" / "loss.svg"
    assert f"wrote {png}" in capsys.readouterr().out
    pixels = imread(png)
    assert pixels.shape[1] > 2 * pixels.shape[0] and pixels.std() > 0.05   # three panels side by side
    text = svg.read_text()
    for label in ("code: held-out loss (in-loop eval)", "prose: held-out loss (in-loop eval)",
                  "learning-rate schedule", "tokens seen in the run", "validation loss (nats/token)",
                  "learning rate", "pre", "rewarm-cosine", "constant"):
        assert f">{label}<" in text, label
    # The lines are the runs' numbers: eval loss vs tokens per set, LR vs tokens.
    runs = load_runs([str(p) for p in paths])
    fig = draw_runs(runs, ["code", "prose"])
    code_ax, prose_ax, lr_ax = fig.axes
    for ax, name in ((code_ax, "code"), (prose_ax, "prose")):
        assert [line.get_label() for line in ax.lines] == ["pre", "rewarm-cosine", "constant"]
        for line, path in zip(ax.lines, paths):
            records = in_loop(path, name)
            assert list(line.get_xdata()) == [r["tokens"] for r in records]
            assert list(line.get_ydata()) == [r["loss"] for r in records]
    # The LR panel is each run's schedule from step 0 (warmup included), 64 tokens per step, on which
    # every logged LR lies at the start of the step that used it.
    for line, path in zip(lr_ax.lines, paths):
        records = ts.train_records(path)
        assert list(line.get_xdata()) == [64 * step for step in range(13)]
        assert [line.get_ydata()[r["step"] - 1] for r in records] == [r["lr"] for r in records]
    assert max(lr_ax.lines[1].get_ydata()) == 2.0e-3 and set(lr_ax.lines[2].get_ydata()) == {3.0e-4}
    assert list(lr_ax.lines[1].get_ydata()[:3]) == [0.0, 1.0e-3, 2.0e-3]     # the rewarm's 2-step warmup


def test_scores_replace_in_loop_curves_when_the_run_has_them(world, exp, tmp_path, capsys):
    run = tmp_path / "rewarm"
    shutil.copytree(exp["cosine"], run)
    assert main(["eval", str(run), "--set", f"code={world['code']}", "--set", f"prose={world['prose']}",
                 "--tokens", "64"]) == 0
    scored = load_run(run)
    assert scored.sources == {"code": "scores", "prose": "scores"}
    assert [(p.step, p.tokens) for p in scored.evals["prose"]] == [(4, 256), (8, 512), (12, 768)]
    assert load_run(run, "metrics").sources == {"code": "metrics", "prose": "metrics"}
    assert main(["plot", str(run), str(exp["constant"]), "--sets", "prose", "--out", str(tmp_path / "p")]) == 0
    assert ">prose: held-out loss (cpt eval, in-loop eval)<" in (tmp_path / "p.svg").read_text()
    capsys.readouterr()
    assert main(["plot", str(run), "--sets", "pile", "--out", str(tmp_path / "q")]) == 2
    assert "--sets: pile not evaluated" in capsys.readouterr().err
    assert not (tmp_path / "q.png").exists()


def parse_table(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_report_numbers_come_from_the_metrics(exp, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert main(["report", str(exp["cosine"]), str(exp["constant"]), "--upstream", "code", "--downstream",
                 "prose", "--baseline", str(exp["constant"]), "--out", str(out)]) == 0
    rows = {r["run"]: r for r in parse_table(out.read_text())}
    assert list(rows) == ["rewarm-cosine", "constant"]
    base_final = in_loop(exp["constant"], "prose")[-1]["loss"]
    for name, key in (("rewarm-cosine", "cosine"), ("constant", "constant")):
        row = rows[name]
        for set_name in ("code", "prose"):
            records = in_loop(exp[key], set_name)
            final, best = records[-1], min((r for r in records if r["step"] > 0), key=lambda r: r["loss"])
            assert final["step"] == 12
            assert row[f"{set_name} final loss"] == f"{final['loss']:.4f}"
            assert row[f"{set_name} final ppl"] == f"{final['ppl']:.2f}"
            assert row[f"{set_name} best loss"] == f"{best['loss']:.4f}"
            assert row[f"{set_name} best ppl"] == f"{best['ppl']:.2f}"
        code = in_loop(exp[key], "code")
        assert code[0]["step"] == 0
        assert row["forgetting (Δ code loss from step 0)"] == f"{code[-1]['loss'] - code[0]['loss']:+.4f}"
        gain = base_final - in_loop(exp[key], "prose")[-1]["loss"]
        assert row["gain vs constant (Δ final prose loss)"] == f"{gain:+.4f}"
        assert row["tokens"] == "768"
    assert rows["constant"]["gain vs constant (Δ final prose loss)"] == "+0.0000"
    capsys.readouterr()
    assert main(["report", str(exp["cosine"]), "--downstream", "prose"]) == 2
    err = capsys.readouterr().err
    assert "--upstream is required" in err and "these runs have: code, prose" in err
    assert main(["report", str(exp["cosine"]), "--upstream", "code", "--downstream", "sp"]) == 2
    assert "--downstream 'sp': no run has evaluations" in capsys.readouterr().err
