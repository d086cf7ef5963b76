"""Provenance of a study's cells (issue 29): each cell records the code that made it, a cell made by other code
is rerun rather than reused (kept and marked only with --allow-mixed-code), the report names its code, and
one code and config give bitwise the same metrics, in one process and under torchrun with DP = 2."""

import ast
import json
import os
import subprocess

import pytest
from distributed import run_distributed
from test_study import fake_cell, read, write_study
from test_training import TINY, config, corpus, train_worker  # noqa: F401  (corpus is a fixture)

from megatron_simreg.provenance import code_identity, describe, source_identity
from megatron_simreg.study import load_study, main

OTHER_CODE = {**code_identity(), "source": "0" * 64, "commit": "0123456789" * 4, "uncommitted": False}
THREE_ITERATIONS = ["schedule.train_iters=3", "training.eval_interval=3", "training.save_interval=3",
                    "logging.tensorboard=false"]


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_code_identity_is_the_source_that_runs_with_the_commit_beside_it(tmp_path):
    package = tmp_path / "megatron_simreg"
    package.mkdir()
    (package / "model.py").write_text("WIDTH = 64\n")
    (tmp_path / "README.md").write_text("# readme\n")
    (tmp_path / ".gitignore").write_text("__pycache__/\n")  # as this repository's
    installed = source_identity(str(package))  # outside a git checkout, as an installed wheel
    assert "commit" not in installed and "version" in installed
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first")
    first = source_identity(str(package))
    assert first["commit"] == git(tmp_path, "rev-parse", "HEAD") and not first["uncommitted"]

    (tmp_path / "README.md").write_text("# readme, reworded\n")  # a docs edit: the same code
    assert source_identity(str(package)) == first
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"\0")  # what Python caches
    (package / ".model.py.swp").write_bytes(b"\0")  # an editor's
    assert source_identity(str(package))["source"] == first["source"]

    (package / "model.py").write_text("WIDTH = 128\n")  # an uncommitted edit of what runs: other code
    edited = source_identity(str(package))
    assert edited["source"] != first["source"] and edited["commit"] == first["commit"] and edited["uncommitted"]
    assert "with uncommitted changes" in describe({**edited, "torch": "2", "megatron-core": "0.19"})


def test_the_report_module_does_not_import_the_study_tool():
    """study.py runs cells and calls the report; study_report.py must not reach back into it."""
    source = open(os.path.join(os.path.dirname(__file__), "..", "megatron_simreg", "study_report.py")).read()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert "megatron_simreg.study" not in imported


def test_cells_of_other_code_are_kept_only_when_allowed_and_then_marked(tmp_path, capsys):
    study = load_study(write_study(
        tmp_path / "mixed.yaml", config="configs/tiny-llama.yaml", set={"schedule.train_iters": 3}, seeds=[1],
        baseline={"simreg.weight": 0}, grid={"simreg.weight": [2.5]}, out=str(tmp_path / "out"),
    ))
    baseline, simreg = study.settings
    fake_cell(study, baseline, 1, [6.0, 5.0, 4.0])
    fake_cell(study, simreg, 1, [6.0, 4.5, 3.5], code=OTHER_CODE)

    main([study.path, "--report-only"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Cells finished: 1 of 2" in report
    assert "weight=2.5/seed1 (made by other code (will rerun): commit 0123456789, source sha256 000000000000" in report
    assert f"Code of every number below: {describe(code_identity())}" in report and "3.5000" not in report

    main([study.path, "--report-only", "--allow-mixed-code"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Cells finished: 2 of 2" in report and "Code: MIXED (kept by --allow-mixed-code)" in report
    assert f"[a] {describe(code_identity())}" in report and f"[b] {describe(OTHER_CODE)}" in report
    assert "| baseline [a] | `simreg.weight=0` |" in report and "| weight=2.5 [b] | `simreg.weight=2.5` |" in report
    assert "| weight=2.5 [b] | 1 | 3.5000 |" in report  # the per-seed table too
    capsys.readouterr()
    main([study.path, "--status", "--allow-mixed-code"])
    assert "2 of 2 cells finished" in capsys.readouterr().out


@pytest.fixture(scope="module")
def one_cell_study(corpus, tmp_path_factory):  # noqa: F811
    """A one-cell study of the tiny model, trained once (3 iterations, the local loop)."""
    folder = tmp_path_factory.mktemp("provenance")
    path = write_study(folder / "one.yaml", config="configs/tiny-llama.yaml", seeds=[7], out=str(folder / "out"),
                       set=TINY + THREE_ITERATIONS + [f"data.prefix={corpus}"], grid={"simreg.weight": [2.5]})
    main([path])
    study = load_study(path)
    return study, study.run_dir(*study.cells()[0])


def test_a_cell_made_by_other_code_is_rerun_not_reused_and_comes_out_bitwise_the_same(one_cell_study, capsys):
    study, cell = one_cell_study
    record = read(cell, "study.json")
    assert [a["code"] for a in record["attempts"]] == [code_identity()]
    assert record["config"]["training"]["seed"] == 7 and "Machine:" in read(study.out, "report.md")
    assert f"Code of every number below: {describe(code_identity())}" in read(study.out, "report.md")
    first = read(cell, "metrics.jsonl")

    record["attempts"][0]["code"] = OTHER_CODE  # as if a commit changed the numerics since it ran
    with open(os.path.join(cell, "study.json"), "w") as f:
        json.dump(record, f)
    capsys.readouterr()
    main([study.path, "--status"])
    status = capsys.readouterr().out
    assert "weight=2.5/seed7" in status and "made by other code (will rerun): commit 0123456789" in status
    assert "0 of 1 cells finished" in status

    main([study.path])
    aside = os.path.join(cell, "made-by-000000000000")
    said = capsys.readouterr()
    assert f"made by other code; its files moved to {aside}, rerunning it from the start" in said.out + said.err
    assert read(aside, "metrics.jsonl") == first  # nothing lost
    assert read(aside, "study.json")["attempts"][0]["code"] == OTHER_CODE
    attempts = read(cell, "study.json")["attempts"]
    assert [(a["code"], a["from_iteration"]) for a in attempts] == [(code_identity(), 0)]
    assert read(cell, "metrics.jsonl") == first  # one code and config: bitwise the same metrics


def test_two_runs_with_data_parallel_two_give_identical_metrics(corpus, tmp_path):  # noqa: F811
    runs = [tmp_path / "first", tmp_path / "second"]
    for run_dir in runs:  # two ranks, as torchrun starts them
        run_distributed(train_worker, 2, config(corpus, run_dir, *THREE_ITERATIONS, "training.seed=7"))
    first, second = (read(run_dir, "metrics.jsonl") for run_dir in runs)
    assert first == second and '"split": "valid"' in first


def test_the_report_gives_each_difference_a_paired_t_test_and_says_when_it_is_not_resolved(tmp_path):
    stats = pytest.importorskip("scipy.stats")  # the trusted reference; the package computes t without scipy
    study = load_study(write_study(
        tmp_path / "paired.yaml", config="configs/tiny-llama.yaml", set={"schedule.train_iters": 3}, seeds=[1, 2, 3],
        baseline={"simreg.weight": 0}, grid={"simreg.weight": [1, 2.5]}, out=str(tmp_path / "out"),
    ))
    deltas = {"weight=1": [-0.03, 0.02, -0.04], "weight=2.5": [-0.03, -0.02, -0.04]}
    for seed in (1, 2, 3):
        fake_cell(study, study.baseline, seed, [6.0, 5.0, 4.0 + 0.1 * seed])
        for setting in study.settings[1:]:
            fake_cell(study, setting, seed, [6.0, 5.0, 4.0 + 0.1 * seed + deltas[setting.name][seed - 1]])
    main([study.path, "--report-only"])
    report = (tmp_path / "out" / "report.md").read_text()
    for name, resolved in (("weight=1", False), ("weight=2.5", True)):
        test = stats.ttest_1samp(deltas[name], 0)
        interval = test.confidence_interval(0.95)
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        expected = f"[{interval.low:+.4f}, {interval.high:+.4f}], p = {test.pvalue:.2g}"
        assert expected + ("" if resolved else ", not resolved") + " |" in row
