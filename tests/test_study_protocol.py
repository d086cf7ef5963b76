"""Choosing apart from reporting: held-out evaluation sets drawn from anywhere in the corpus (disjoint from
training, the same documents for the same seed), a test evaluation at the end of both training loops, and a
study's select/report protocol (the best of each method on the selection seeds, reported on fresh seeds by
the test loss, with paired intervals against scipy)."""

import json
import os

import numpy
import pytest
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDataset
from scipy import stats
from test_data_prepare import DOCUMENTS, prepare_data
from test_megatron_training import SAME_ARITHMETIC_REL, megatron_training
from test_training import TINY, corpus  # noqa: F401  (corpus is a fixture)

from megatron_simreg.data import build_gpt_datasets, build_tokenizer
from megatron_simreg.data.held_out import draw_held_out, hold_out
from megatron_simreg.metrics import MetricsWriter, load_run
from megatron_simreg.provenance import code_identity
from megatron_simreg.study import _state, cell_command, cell_overrides, load_study, main, report_phase
from megatron_simreg.study_protocol import choose
from megatron_simreg.study_report import collect

HELD_OUT_TOKENS = 1500  # of the corpus fixture's ~10k: 4 sequences of 32 (TINY's one evaluation) many times over


def documents(prefix):
    dataset = IndexedDataset(prefix, mmap=True)
    bounds = dataset.document_indices
    return [numpy.concatenate([dataset[s] for s in range(bounds[d], bounds[d + 1])]).tolist()
            for d in range(len(bounds) - 1)]


@pytest.fixture(scope="module")
def held_out(corpus, tmp_path_factory):  # noqa: F811
    return hold_out(corpus, str(tmp_path_factory.mktemp("held_out") / "corpus"), HELD_OUT_TOKENS, seed=7)


def test_held_out_sets_are_disjoint_seeded_documents_excluded_from_training(corpus, held_out, tmp_path):  # noqa: F811
    source = documents(corpus)
    chosen = {}
    for split in ("valid", "test"):
        with open(held_out[split] + ".stats.json") as f:
            chosen[split] = json.load(f)["source_documents"]
        assert documents(held_out[split]) == [source[d] for d in chosen[split]]  # whole documents, in file order
        tokens = sum(len(source[d]) for d in chosen[split])
        assert HELD_OUT_TOKENS <= tokens < HELD_OUT_TOKENS + max(map(len, source))  # stops at the one that reaches it
    assert not set(chosen["valid"]) & set(chosen["test"])
    rest = [d for d in range(len(source)) if d not in chosen["valid"] + chosen["test"]]
    assert documents(held_out["train"]) == [source[d] for d in rest]  # training keeps every other document

    again = hold_out(corpus, str(tmp_path / "again"), HELD_OUT_TOKENS, seed=7)
    for split, prefix in again.items():  # the same seed draws the same documents: the same files
        for suffix in (".bin", ".idx"):
            with open(prefix + suffix, "rb") as a, open(held_out[split] + suffix, "rb") as b:
                assert a.read() == b.read()
    other = hold_out(corpus, str(tmp_path / "other"), HELD_OUT_TOKENS, seed=8)
    assert documents(other["valid"]) != documents(held_out["valid"])


def test_prepare_data_writes_held_out_sets_that_read_back(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS[:60]))
    prefix = str(tmp_path / "data")
    prepare_data.main(["--input", str(source), "--output-prefix", prefix, "--held-out-tokens", "300",
                       "--held-out-seed", "3", "--quiet"])
    assert "held out (seed 3)" in capsys.readouterr().out
    parts = {split: documents(f"{prefix}_{split}") for split in ("train", "valid", "test")}
    assert sorted(sum(parts.values(), [])) == sorted(documents(prefix))  # every document in exactly one set
    for split in ("valid", "test"):
        with open(f"{prefix}_{split}.stats.json") as f:
            record = json.load(f)
        assert record["seed"] == 3 and record["held_out_tokens"] == 300 and record["held_out_from"] == prefix
        assert [documents(prefix)[d] for d in record["source_documents"]] == parts[split]
        assert sum(map(len, parts[split])) >= 300

    again = str(tmp_path / "again")  # from the dataset already written: the same draw
    prepare_data.main(["--held-out-from", prefix, "--held-out-tokens", "300", "--held-out-seed", "3",
                       "--output-prefix", again, "--quiet"])
    assert documents(f"{again}_valid") == parts["valid"] and documents(f"{again}_test") == parts["test"]
    with pytest.raises(SystemExit, match="prepare_data: --held-out-from needs --held-out-tokens N"):
        prepare_data.main(["--held-out-from", prefix, "--output-prefix", again])
    with pytest.raises(SystemExit, match="already exist: pass --overwrite"):
        prepare_data.main(["--held-out-from", prefix, "--held-out-tokens", "300", "--output-prefix", again])
    with pytest.raises(SystemExit, match="too few to hold out 100,000 tokens twice"):
        prepare_data.main(["--held-out-from", prefix, "--held-out-tokens", "100000", "--output-prefix",
                           str(tmp_path / "more")])


def test_a_held_out_set_smaller_than_one_evaluation_is_refused(held_out):
    tokenizer = build_tokenizer()
    sequences = (json.load(open(held_out["valid"] + ".stats.json"))["tokens"] - 1) // 32
    build_gpt_datasets(held_out["train"], tokenizer, 32, (8, sequences, 4), valid_prefix=held_out["valid"],
                       test_prefix=held_out["test"])  # one evaluation that scores all of it: fine
    with pytest.raises(ValueError, match=f"the held-out valid set .* {sequences} sequences of 32, fewer than the "
                                         f"{sequences + 1} one evaluation scores"):
        build_gpt_datasets(held_out["train"], tokenizer, 32, (8, sequences + 1, 4), valid_prefix=held_out["valid"],
                           test_prefix=held_out["test"])


def test_held_out_documents_come_from_everywhere_in_the_file_not_its_tail():
    lengths = numpy.full(10_000, 100)
    drawn = draw_held_out(lengths, 50_000, seed=1234)
    for split in ("valid", "test"):
        assert len(drawn[split]) == 500
        assert (drawn[split] < 1_000).any() and (drawn[split] >= 9_000).any()  # the first and the last tenth
    assert sorted(numpy.concatenate(list(drawn.values())).tolist()) == list(range(10_000))
    with pytest.raises(ValueError, match="too few to hold out 600,000 tokens twice"):
        draw_held_out(lengths, 600_000, seed=1234)


def test_a_tiny_protocol_end_to_end_and_megatron_scores_its_report_cell_alike(held_out, tmp_path, capsys):
    """The selection recorded (two settings on one seed: training them would only cost time), the report's cell
    trained for two iterations by the study tool and scored on the held-out test set; then megatron.training runs
    that cell's config and scores the same fixed validation sample at every evaluation and the same test sample
    at the end (the same weights, the same batches)."""
    cell = TINY + [f"data.prefix={held_out['train']}", f"data.valid_prefix={held_out['valid']}",
                   "schedule.train_iters=2", "schedule.warmup_steps=1", "adagc.warmup_steps=1",
                   "training.eval_interval=1", "logging.tensorboard=false"]
    study = load_study(protocol_study(tmp_path, set=cell, baseline=None, select={"seeds": [1], "methods": {
        "simreg": {"grid": {"simreg.weight": [0, 100]}}}}, report={"seeds": [2], "test_set": held_out["test"]}))
    chosen, other = study.settings
    recorded_cell(study, chosen, 1, valid=3.0)
    recorded_cell(study, other, 1, valid=4.0)
    main([study.path])
    assert "report:" in capsys.readouterr().out
    with open(tmp_path / "out" / "selection.json") as f:
        assert json.load(f)["chosen"]["simreg"]["setting"] == chosen.name == "simreg_weight=0"
    reported = load_run(study.run_dir(chosen, 2))
    test = reported.curve("test", "lm loss")
    assert test.tokens == [2 * 4 * 32]  # once, after the last of two global batches of 4 sequences of 32
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"| simreg | {chosen.name} | 1/1 | {test.values[0]:.4f} (1) |" in report
    assert not os.path.exists(study.run_dir(other, 2))  # only the choice is reported

    overrides = [o for o in cell_overrides(study, chosen, 2, []) if not o.startswith("logging.run_dir=")]
    log = megatron_training(tmp_path / "megatron", *overrides, f"data.test_prefix={held_out['test']}",
                            "logging.tensorboard=true")
    megatron = load_run(str(tmp_path / "megatron"))
    valid = reported.curve("valid", "lm loss").values
    assert len(valid) == 2  # both loops score the same fixed validation sample at every evaluation
    assert megatron.curve("valid", "lm loss").values == pytest.approx(valid, rel=SAME_ARITHMETIC_REL)
    assert megatron.curve("test", "lm loss").values == [pytest.approx(test.values[0], rel=SAME_ARITHMETIC_REL)]
    assert "validation loss at iteration 2 on test set" in log
    assert test.values[0] != valid[-1]  # another set than the last validation's, logged under its own name


# ---- the select/report protocol, on recorded metrics ---------------------------------------------------------------


def protocol_study(tmp_path, report_seeds=(3, 4, 5), **extra):
    fields = dict(
        name="fair", config="configs/tiny-llama.yaml", out=str(tmp_path / "out"),
        set={"schedule.train_iters": 4, "data.valid_prefix": "data/held-out_valid"},
        baseline={"simreg.weight": 0},
        select={"seeds": [1, 2], "methods": {
            "simreg": {"grid": {"simreg.weight": [1, 10]}},
            "simcse": {"set": {"regularizer.name": "simcse"}, "grid": {"regularizer.weight": [0.5, 1]}},
        }},
        report={"seeds": list(report_seeds), "test_set": "data/held-out_test"},
    )
    fields.update(extra)
    fields = {key: value for key, value in fields.items() if value is not None}  # None: leave the key out
    path = tmp_path / "fair.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return str(path)


def recorded_cell(study, setting, seed, valid, test=None):
    """A finished cell without training: its final validation (and test) loss, a checkpoint tracker at its last
    iteration, this code on record."""
    run_dir = study.run_dir(setting, seed)
    writer = MetricsWriter(run_dir)
    for step, loss in enumerate([valid + 3, valid + 1, valid + 0.5, valid], 1):
        writer.write("valid", step, step * 100, {"lm loss": loss})
    if test is not None:
        writer.write("test", 4, 400, {"lm loss": test})
    writer.close()
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    with open(os.path.join(run_dir, "checkpoints", "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("4")
    with open(os.path.join(run_dir, "study.json"), "w") as f:
        json.dump({"attempts": [{"from_iteration": 0, "returncode": 0, "code": code_identity()}]}, f)


def test_the_best_of_each_method_is_chosen_on_selection_seeds_and_reported_on_fresh_ones(tmp_path, capsys):
    study = load_study(protocol_study(tmp_path))
    names = [s.name for s in study.settings]
    assert names == ["simreg_weight=1", "simreg_weight=10", "simcse_weight=0.5", "simcse_weight=1"]
    assert study.seeds == [1, 2] and study.baseline is None  # the baseline runs on the report seeds only
    settings = dict(zip(names, study.settings))
    selection = {  # final validation loss on seeds 1 and 2
        "simreg_weight=1": (2.0, 4.0),  # the best single run, not the best mean (3.0)
        "simreg_weight=10": (2.5, 2.9),  # mean 2.7: chosen
        "simcse_weight=0.5": (3.1, 3.3),  # mean 3.2: chosen
        "simcse_weight=1": (3.0, 3.5),
    }
    main([study.path, "--status"])
    assert "wait for the selection: 8 of its 8 cells not finished" in capsys.readouterr().out
    for name, values in selection.items():
        for seed, value in zip((1, 2), values):
            recorded_cell(study, settings[name], seed, value)
    capsys.readouterr()
    main([study.path, "--status"])
    out = capsys.readouterr().out
    assert "chosen on the selection seeds: simreg: simreg_weight=10, simcse: simcse_weight=0.5" in out
    for label in ("baseline/seed3", "simreg_weight=10/seed5", "simcse_weight=0.5/seed4"):
        assert f"{label} " in out  # the report's cells: fresh seeds
    assert "simreg_weight=1/seed3" not in out and "seed1" not in out.split("chosen on")[1]

    states = [_state(study, setting, seed, []) for setting, seed in study.cells()]
    reported = report_phase(study, choose(study.protocol.methods, collect(study, states), "valid/lm loss"))
    assert [s.name for s in reported.settings] == ["baseline", "simreg_weight=10", "simcse_weight=0.5"]
    assert reported.seeds == [3, 4, 5] and reported.baseline is reported.settings[0]
    command = cell_command(reported, settings["simreg_weight=10"], 4, [])
    assert "training.seed=4" in command and "simreg.weight=10" in command
    # what each phase evaluates: the selection's cells have no test set, the report's score the held-out one
    assert {s.config.data.test_prefix for s in states} == {None}
    assert not any("test_prefix" in part for setting, seed in study.cells()
                   for part in cell_command(study, setting, seed, []))
    report_states = [_state(reported, setting, seed, []) for setting, seed in reported.cells()]
    assert {s.config.data.test_prefix for s in report_states} == {"data/held-out_test"}

    test = {"baseline": (5.00, 5.10, 4.90), "simreg_weight=10": (4.90, 5.05, 4.70),
            "simcse_weight=0.5": (5.01, 5.08, 4.93)}
    for setting in reported.settings:
        for seed, value in zip((3, 4, 5), test[setting.name]):
            # the report's validation losses would choose otherwise: the report reads the test loss only
            recorded_cell(reported, setting, seed, valid=1.0 if setting.name == "simcse_weight=0.5" else 3.0,
                          test=value)
    main([study.path, "--report-only"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| simreg | **simreg_weight=10** (chosen) | 2.5000 | 2.9000 | 2.7000 |" in report
    assert "| simcse | **simcse_weight=0.5** (chosen) | 3.1000 | 3.3000 | 3.2000 |" in report
    assert "| simreg | simreg_weight=1 | 2.0000 | 4.0000 | 3.0000 |" in report
    for name in ("simreg_weight=10", "simcse_weight=0.5"):
        differences = numpy.subtract(test[name], test["baseline"])
        interval = stats.ttest_1samp(differences, 0).confidence_interval(0.95)
        p = stats.ttest_1samp(differences, 0).pvalue
        row = next(line for line in report.splitlines() if line.startswith(f"| {name.split('_')[0]} | {name} |"))
        mean, sd = numpy.mean(test[name]), numpy.std(test[name], ddof=1)
        assert f"{mean:.4f} ± {sd:.4f} (3)" in row
        assert f"[{interval.low:+.4f}, {interval.high:+.4f}], p = {p:.2g}" in row
        assert ("not resolved" in row) == (interval.low <= 0 <= interval.high)
    assert "not resolved" in report.split("## Results")[0]  # simcse's interval holds zero
    with open(tmp_path / "out" / "selection.json") as f:
        assert json.load(f)["chosen"]["simreg"]["setting"] == "simreg_weight=10"
    assert "Cells finished: 9 of 9" in report  # the report's cells, in the standard tables below


def test_protocols_that_would_mix_choosing_and_reporting_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"report seeds \[2\] are also selection seeds: report on fresh seeds"):
        main([protocol_study(tmp_path, report_seeds=(2, 3)), "--status"])
    with pytest.raises(SystemExit, match="select.metric 'test/lm loss' must be valid/<metric>"):
        main([protocol_study(tmp_path, select={"seeds": [1], "metric": "test/lm loss",
                                              "methods": {"simreg": {}}}), "--status"])
    with pytest.raises(SystemExit, match="seeds belong in `select:`"):
        main([protocol_study(tmp_path, seeds=[1]), "--status"])
    with pytest.raises(SystemExit, match="name the test set in report.test_set, not in `set`"):
        main([protocol_study(tmp_path, set={"data.valid_prefix": "v", "data.test_prefix": "t"}), "--status"])
    with pytest.raises(SystemExit, match="report.metric 'test/lm loss' needs report.test_set"):
        main([protocol_study(tmp_path, report={"seeds": [3, 4]}), "--status"])
    with pytest.raises(SystemExit, match="report.test_set needs data.valid_prefix"):
        main([protocol_study(tmp_path, set={"data.split": "95,5,0"}), "--status"])
    with pytest.raises(SystemExit, match="data.split '98,1,1' gives the selection's cells a test share"):
        main([protocol_study(tmp_path, set={"data.split": "98,1,1"}, report={"seeds": [3], "metric": "valid/lm loss"}),
              "--status"])
    with pytest.raises(SystemExit, match="unknown key.* tests in report; valid keys: seeds, metric, test_set"):
        main([protocol_study(tmp_path, report={"seeds": [3], "tests": "t"}), "--status"])
