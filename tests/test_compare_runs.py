"""The run comparison: the convergence speedup on logs with a known answer, plots and reports written."""

import math
import subprocess
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from megatron_simreg.compare import convergence_speedup
from megatron_simreg.metrics import Curve, MetricsWriter, load_run, tokens_to_reach


def baseline_loss(tokens):
    return 3.0 + 4.0 * math.exp(-tokens / 300.0)


def write_run(run_dir, speed, total=1000, every=10):
    """A run whose loss at t tokens is the baseline's at t * speed: it needs 1/speed of the tokens."""
    writer = MetricsWriter(str(run_dir))
    for step, tokens in enumerate(range(every, total + 1, every), 1):
        train_loss = baseline_loss(tokens * speed) + 0.05 * math.sin(step)
        writer.write("train", step, tokens, {"lm loss": train_loss, "simreg": 0.1 / step})
        if step % 10 == 0:
            writer.write("valid", step, tokens, {"lm loss": baseline_loss(tokens * speed)})
    writer.close()
    return run_dir


def test_speedup_of_a_run_reaching_the_baseline_at_70_percent(tmp_path):
    baseline = load_run(str(write_run(tmp_path / "baseline", 1.0)))
    simreg = load_run(str(write_run(tmp_path / "simreg", 1 / 0.7)))
    speedup = convergence_speedup(baseline, simreg)
    assert speedup.target_loss == pytest.approx(baseline_loss(1000))
    assert speedup.saved == pytest.approx(0.30, abs=0.005)  # linear interpolation between the logged points
    assert convergence_speedup(baseline, baseline).saved == pytest.approx(0.0)
    slower = load_run(str(write_run(tmp_path / "slower", 0.8)))
    assert convergence_speedup(baseline, slower).saved is None  # never reaches the target


def test_interpolates_between_logged_points():
    curve = Curve(tokens=[0, 100, 200], values=[5.0, 4.0, 2.0])
    assert tokens_to_reach(curve, 3.0) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 1.0) is None


def test_tensorboard_events_read_as_megatron_writes_them(tmp_path):
    writer = SummaryWriter(str(tmp_path / "tb"))
    for samples in range(8, 81, 8):
        writer.add_scalar("lm loss vs samples", baseline_loss(samples * 16), samples)
        writer.add_scalar("lm loss validation vs samples", baseline_loss(samples * 16) + 0.1, samples)
    writer.close()
    run = load_run(str(tmp_path / "tb"), seq_length=16)
    assert run.curve("train", "lm loss").tokens[-1] == 80 * 16
    # stored as fp32
    assert run.curve("valid", "lm loss").values[0] == pytest.approx(baseline_loss(128) + 0.1, rel=1e-6)


def test_cli_writes_plot_and_table(tmp_path):
    write_run(tmp_path / "baseline", 1.0)
    write_run(tmp_path / "simreg", 1 / 0.7)
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "tools/compare_runs.py", str(tmp_path / "baseline"), str(tmp_path / "simreg"),
         "--out", str(out)],
        capture_output=True, text=True, check=True,
    )
    assert "| simreg |" in result.stdout and "30.0%" in result.stdout
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "30.0%" in (out / "comparison.md").read_text()


def test_any_number_of_runs_with_their_baseline_terms(tmp_path):
    """Table 1's comparison: the reference and several runs, each baseline's own logged term in the table."""
    from megatron_simreg.compare import markdown_report

    runs = [load_run(str(write_run(tmp_path / name, speed))) for name, speed in
            (("baseline", 1.0), ("simcse", 1.05), ("cpretrain", 0.9), ("simreg", 1 / 0.7))]
    with open(tmp_path / "cpretrain" / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "iteration": 100, "tokens": 1000, "cpretrain": 0.25}\n')
    runs[2] = load_run(str(tmp_path / "cpretrain"))
    rows = [line for line in markdown_report(runs).splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| baseline", "| simcse", "| cpretrain", "| simreg"]
    assert "| cpretrain 0.25 |" in rows[2] and rows[0].count(" - ") == 1
    assert "not reached" in rows[2] and "30.0%" in rows[3]


def test_missing_metrics_are_explained(tmp_path):
    result = subprocess.run([sys.executable, "tools/compare_runs.py", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and "metrics.jsonl" in result.stderr


def test_a_resumed_run_reads_as_one_run(tmp_path):
    """Steps logged again after a resume from a checkpoint replace the interrupted run's, in token order."""
    writer = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3):  # killed after logging step 3; the last checkpoint was step 2
        writer.write("train", step, 10 * step, {"lm loss": 5.0 - step})
    for step in (3, 4):
        writer.write("train", step, 10 * step, {"lm loss": 4.0 - step})
    writer.close()
    curve = load_run(str(tmp_path)).curve("train", "lm loss")
    assert curve.tokens == [10, 20, 30, 40] and curve.values == [4.0, 3.0, 1.0, 0.0]


def test_loss_axes_show_the_gaps_after_the_first_fall():
    """Curves falling from 10 to 5.20 and 5.25: the axis spans the later values, so a 0.05 gap fills a fifth of
    it instead of a hundredth."""
    from megatron_simreg.compare import zoomed_range

    tokens = [100.0 * i for i in range(1, 11)]
    falling = [10.0, 7.0, 6.0, 5.6, 5.4, 5.3, 5.25, 5.22, 5.21, 5.20]
    curves = [Curve(tokens, falling), Curve(tokens, [v + 0.05 for v in falling])]
    low, high = zoomed_range(curves)  # values from 200 tokens on (the first 20% of 1000 skipped)
    assert low == pytest.approx(5.20 - 0.05 * (7.05 - 5.20)) and high == pytest.approx(7.05 + 0.05 * (7.05 - 5.20))
    assert 0.05 / (high - low) > 0.02
    assert zoomed_range([Curve(tokens, [5.0] * 10)]) == pytest.approx((4.75, 5.25))  # flat: 5% of its value


def test_summary_titles_say_what_the_error_bars_are():
    from megatron_simreg.study_report import seed_phrase

    assert seed_phrase([1, 1, 1]) == "one seed each (no error bars)"
    assert seed_phrase([3, 3]) == "mean ± std over 3 seeds"
    assert seed_phrase([1, 3, 5]) == "mean ± std over 1-5 seeds (a setting of one seed has no bar)"
