"""The study tool: cells run through the training entry, a killed study resumes without rerunning finished
cells (a half-finished one from its own checkpoint), mean/std against a hand computation, report and PNGs."""

import glob
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import yaml
from test_training import TINY, corpus  # noqa: F401  (corpus is a fixture)

from megatron_simreg.config import load_config, save_config
from megatron_simreg.metrics import MetricsWriter
from megatron_simreg.provenance import code_identity
from megatron_simreg.study import _state, cell_overrides, load_study, main, run_study

PNG = b"\x89PNG\r\n\x1a\n"
TRACKER = os.path.join("checkpoints", "latest_checkpointed_iteration.txt")


def write_study(path, **fields):
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return str(path)


def saved_iteration(run_dir):
    try:
        with open(os.path.join(run_dir, TRACKER)) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return 0


def records(run_dir, split):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def read(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f) if name.endswith(".json") else f.read()


def attempts(run_dir):
    return read(run_dir, "study.json")["attempts"]


def test_study_resumes_after_a_kill_and_reports_mean_and_std(corpus, tmp_path, capsys):  # noqa: F811
    three_iterations = ["schedule.train_iters=3", "training.save_interval=1", "training.eval_interval=1",
                        "logging.tensorboard=false", f"data.prefix={corpus}"]
    study_file = write_study(
        tmp_path / "mini.yaml", name="mini", config="configs/tiny-llama.yaml", set=TINY + three_iterations,
        seeds=[1, 2], baseline={"simreg.weight": 0}, grid={"simreg.weight": [0, 2.5]}, out=str(tmp_path / "out"),
    )
    study = load_study(study_file)
    assert [s.name for s in study.settings] == ["weight=0", "weight=2.5"] and study.baseline is study.settings[0]
    cells = [study.run_dir(setting, seed) for setting, seed in study.cells()]

    # Kill the whole study (the tool and its training process) once a cell is finished and another half done.
    process = subprocess.Popen([sys.executable, "-m", "megatron_simreg.study", study_file], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline:
        saved = [saved_iteration(cell) for cell in cells]
        if 3 in saved and any(0 < s < 3 for s in saved):
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the study ended before a cell could be caught half-done"
    finished = [cell for cell in cells if saved_iteration(cell) == 3]
    half = [cell for cell in cells if 0 < saved_iteration(cell) < 3]
    assert finished and len(half) == 1
    half, killed_at = half[0], saved_iteration(half[0])
    before = {cell: (read(cell, "metrics.jsonl"), os.stat(os.path.join(cell, TRACKER)).st_mtime_ns)
              for cell in finished}

    resumed = subprocess.run([sys.executable, "-m", "megatron_simreg.study", study_file],
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for cell in finished:  # not run again
        assert (read(cell, "metrics.jsonl"), os.stat(os.path.join(cell, TRACKER)).st_mtime_ns) == before[cell]
        assert len(attempts(cell)) == 1
    assert [a["from_iteration"] for a in attempts(half)] == [0, killed_at]  # resumed from its own checkpoint
    assert [r["iteration"] for r in records(half, "train")].count(1) == 1  # iteration 1 not trained again
    assert all(saved_iteration(cell) == 3 for cell in cells)

    # Nothing left to run: the tool only writes the report (in this process).
    main([study_file])
    assert "4/4 cells done" in capsys.readouterr().err
    assert all(len(attempts(cell)) == (2 if cell == half else 1) for cell in cells)

    # Hand computation from the metrics files: last validation loss per seed, its mean and sample std.
    def final_valid(cell):
        return [r for r in records(cell, "valid") if r["iteration"] == 3][-1]["lm loss"]

    base = {seed: final_valid(study.run_dir(study.settings[0], seed)) for seed in (1, 2)}
    simreg = {seed: final_valid(study.run_dir(study.settings[1], seed)) for seed in (1, 2)}
    assert base[1] != base[2]  # the seeds differ
    report = (tmp_path / "out" / "report.md").read_text()
    for values in (base, simreg):
        mean, std = statistics.fmean(values.values()), statistics.stdev(values.values())
        assert f"{mean:.4f} ± {std:.4f} (2)" in report
        ppl = [math.exp(v) for v in values.values()]
        assert f"{statistics.fmean(ppl):.2f} ± {statistics.stdev(ppl):.2f} (2)" in report
    deltas = [simreg[seed] - base[seed] for seed in (1, 2)]
    assert f"{statistics.fmean(deltas):+.4f} ± {statistics.stdev(deltas):.4f} (2)" in report
    assert "Cells finished: 4 of 4" in report and "Machine:" in report
    for png in ("summary.png", "curves.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == PNG


def fake_cell(study, setting, seed, losses, tokens_per_step=100, simreg=0.5, code=None):
    """A finished cell without training: a validation curve, a checkpoint tracker at the last iteration, a record
    of the code that made it (this code unless `code`)."""
    run_dir = study.run_dir(setting, seed)
    writer = MetricsWriter(run_dir)
    for step, loss in enumerate(losses, 1):
        writer.write("valid", step, step * tokens_per_step,
                     {"lm loss": loss, "simreg": simreg, "simreg negative angle": 80.0})
    writer.close()
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    with open(os.path.join(run_dir, TRACKER), "w") as f:
        f.write(str(len(losses)))
    with open(os.path.join(run_dir, "study.json"), "w") as f:
        json.dump({"attempts": [{"from_iteration": 0, "returncode": 0, "code": code or code_identity()}]}, f)


def grid_study(tmp_path, **extra):
    return write_study(
        tmp_path / "grid.yaml", config="configs/tiny-llama.yaml", set={"schedule.train_iters": 4}, seeds=[1, 2, 3],
        baseline={"simreg.weight": 0}, grid={"simreg.weight": [1, 10], "simreg.temperature": [0.01, 0.1]},
        out=str(tmp_path / "out"), **extra,
    )


def test_grid_report_numbers_heatmap_and_the_follow_up_around_the_best(tmp_path, capsys):
    study = load_study(grid_study(tmp_path))
    assert [s.name for s in study.settings] == ["baseline", "weight=1,temperature=0.01", "weight=1,temperature=0.1",
                                               "weight=10,temperature=0.01", "weight=10,temperature=0.1"]
    baseline_losses = [6.0, 5.0, 4.0, 3.0]
    for seed in (1, 2, 3):
        fake_cell(study, study.baseline, seed, baseline_losses)
        # reaches the baseline's final 3.0 between steps 2 and 3 (interpolated), ends lower
        fake_cell(study, study.settings[1], seed, [6.0, 4.0, 2.0 + 0.1 * seed, 2.0 + 0.1 * seed])
        fake_cell(study, study.settings[2], seed, [6.0, 5.5, 5.0, 3.5])  # never reaches 3.0
        fake_cell(study, study.settings[3], seed, [6.0, 5.0, 4.0, 3.0 - 0.01 * seed])
    # weight=10,temperature=0.1 has only seed 1: named as missing, the others counted
    fake_cell(study, study.settings[4], 1, [6.0, 5.0, 4.0, 2.5])
    main([study.path, "--report-only"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Cells finished: 13 of 15" in report and "weight=10,temperature=0.1/seed2 (not started)" in report
    finals = [2.0 + 0.1 * seed for seed in (1, 2, 3)]
    row = next(line for line in report.splitlines() if line.startswith("| weight=1,temperature=0.01 |"))
    assert f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f} (3)" in row
    # interpolated between steps 2 and 3
    saved = [1 - (200 + 100 * (4.0 - 3.0) / (4.0 - f)) / 400 for f in (2.1, 2.2, 2.3)]
    assert f"{statistics.fmean(saved):.1%} ± {statistics.stdev(saved):.1%} (3)" in row
    never_reached = next(line for line in report.splitlines() if line.startswith("| weight=1,temperature=0.1 |"))
    assert "not reached (0/3)" in never_reached
    single = next(line for line in report.splitlines() if line.startswith("| weight=10,temperature=0.1 |"))
    assert "2.5000 (1)" in single and "1/3" in single
    for png in ("summary.png", "curves.png", "heatmap.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == PNG

    # 3 seeds on the row and column through the best setting, reusing the cells the grid study finished
    follow_up = write_study(tmp_path / "best.yaml", around_best_of=study.path, seeds=[1, 2, 3, 4],
                            out=str(tmp_path / "best"))
    with pytest.raises(SystemExit, match="weight=10,temperature=0.1/seed2"):
        main([follow_up, "--status"])  # the grid study is not finished: refused, naming what is missing
    fake_cell(study, study.settings[4], 2, [6.0, 5.0, 4.0, 2.6])
    fake_cell(study, study.settings[4], 3, [6.0, 5.0, 4.0, 2.7])
    best = load_study(follow_up)
    assert [s.name for s in best.settings] == ["baseline", "weight=1,temperature=0.01", "weight=10,temperature=0.01",
                                             "weight=1,temperature=0.1"]  # best: weight=1,temperature=0.01 (mean 2.2)
    assert best.runs == study.runs and "best setting `weight=1,temperature=0.01`" in best.derived
    capsys.readouterr()
    main([follow_up, "--status"])
    assert "12 of 16 cells finished" in capsys.readouterr().out  # seed 4 is new


def test_every_shipped_study_resolves_each_settings_config():
    """A misspelt key or value in a shipped study file fails here, not hours into a study. A follow-up study
    (`around_best_of`) is read once its parent has run, so only its parent is checked: shipped too."""
    paths = sorted(glob.glob(os.path.join("configs", "studies", "*.yaml")))
    assert len(paths) >= 10
    for path in paths:
        with open(path) as f:
            parent = yaml.safe_load(f).get("around_best_of")
        if parent:
            assert parent in paths, f"{path}: around_best_of names {parent}, not a shipped study"
            continue
        study = load_study(path)
        for setting in study.settings:  # the seed is one override like any other: the first will do
            load_config(study.config, cell_overrides(study, setting, study.seeds[0], []))


def test_bad_studies_are_refused_before_anything_runs(tmp_path):
    unknown = write_study(tmp_path / "a.yaml", config="configs/tiny-llama.yaml", seed=[1])
    with pytest.raises(SystemExit, match="unknown key.*seed.*valid keys"):
        main([unknown])
    bad_key = write_study(tmp_path / "b.yaml", config="configs/tiny-llama.yaml", grid={"simreg.wieght": [1]})
    with pytest.raises(SystemExit, match="did you mean simreg.weight"):
        main([bad_key, "--status"])
    with pytest.raises(SystemExit, match="--only simreg: no such setting; the study has baseline, weight=1"):
        main([grid_study(tmp_path), "--only", "simreg"])
    # a cell folder holding a run of other settings is refused, not mixed in
    study = load_study(grid_study(tmp_path))
    run_dir = study.run_dir(study.baseline, 1)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({"optimizer": {"lr": 1.0}}, f)
    other_settings = r"baseline/seed1: .* holds a run with other settings \(optimizer.lr: 1.0 there"
    with pytest.raises(SystemExit, match=other_settings):
        main([study.path, "--status"])


def test_a_cell_reads_back_as_the_same_settings_whatever_its_regularizer(tmp_path, capsys):
    """A finished run records its weights resolved (lambda's auto, a baseline's default); the study must read
    that record as the settings it asked for, for SimReg and for the Table 1 baselines alike."""
    study = load_study(write_study(
        tmp_path / "regularizers.yaml", config="configs/tiny-llama.yaml", seeds=[1], out=str(tmp_path / "out"),
        baseline={"simreg.weight": 0}, runs=str(tmp_path / "runs"),
        variants={"simreg": {"simreg.weight": "auto"}, "sce": {"regularizer.name": "sce"},
                  "simcse-weighted": {"regularizer.name": "simcse", "regularizer.weight": 0.5}},
    ))
    for setting, seed in study.cells():
        save_config(load_config(study.config, cell_overrides(study, setting, seed, [])), study.run_dir(setting, seed))
    main([study.path, "--status"])
    assert capsys.readouterr().out.count("not started") == 4


def test_a_cell_finished_by_another_study_process_meanwhile_is_not_run_again(tmp_path):
    """Two study processes share the cells (each cell's lock): one that listed a cell as not started, and
    reaches it after the other process finished it, must neither launch it nor overwrite its record."""
    study = load_study(write_study(
        tmp_path / "two.yaml", config="configs/tiny-llama.yaml", set={"schedule.train_iters": 4}, seeds=[1],
        variants={"simreg": {"simreg.weight": 2.5}}, out=str(tmp_path / "out"),
        launcher='{python} -c "raise SystemExit(3)"',  # launching at all fails the cell
    ))
    (setting, seed), = study.cells()
    states = [_state(study, setting, seed, [])]
    assert not states[0].finished and states[0].record == {}

    fake_cell(study, setting, seed, [6.0, 5.5, 5.2, 5.0])  # meanwhile the other process trains it ...
    record = {"setting": setting.name, "seed": seed, "overrides": dict(setting.overrides),
              "attempts": [{"from_iteration": 0, "returncode": 0, "wall_s": 1234.5, "code": code_identity()}]}
    with open(os.path.join(study.run_dir(setting, seed), "study.json"), "w") as f:
        json.dump(record, f)  # ... and records it

    assert run_study(study, states, []) == []
    assert attempts(study.run_dir(setting, seed)) == record["attempts"]
    assert states[0].finished and states[0].wall_s == 1234.5


def test_every_creg_row_is_marked_as_our_reconstruction(tmp_path):
    """docs/baselines.md: CReg is rebuilt from a one-line summary, not the original's code; each of its rows (the
    settings table and per seed) says so with the footnote, and no other row does."""
    study = load_study(write_study(
        tmp_path / "baselines.yaml", config="configs/tiny-llama.yaml", set={"schedule.train_iters": 4}, seeds=[1],
        baseline={"simreg.weight": 0}, out=str(tmp_path / "out"),
        variants={"creg": {"regularizer.name": "creg"}, "simcse": {"regularizer.name": "simcse"}},
    ))
    for setting in study.settings:
        fake_cell(study, setting, 1, [6.0, 5.0, 4.0, 3.0])
    main([study.path, "--report-only"])
    report = (tmp_path / "out" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert [row.split(" |")[0] for row in rows] == ["| baseline", "| creg†", "| simcse"] * 2
    assert report.count("† CReg is this project's reconstruction") == 1
