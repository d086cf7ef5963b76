"""Studies: a base config, a grid of overrides and seeds, run cell by cell, reported with error bars.

    python -m megatron_simreg.study configs/studies/convergence.yaml [--set key=value] [--only SETTING] [--status]
                                                                     [--report-only] [--allow-mixed-code]

A study file (YAML; paths relative to the working directory, as every command of this project):

    name: convergence                  # default: the file's name
    config: configs/tiny-llama.yaml
    set: {simreg.temperature: 0.01}    # overrides every cell gets
    seeds: [11, 22, 33]                # training.seed of each repetition (model init and data order)
    baseline: {simreg.weight: 0}       # the reference setting: tokens saved and loss differences are
                                       # measured against its run with the same seed
    variants: {full: {simreg.mode: full}, chunk32: {simreg.mode: chunk, simreg.chunk_size: 32}}
    grid: {simreg.weight: [1, 2.5], simreg.temperature: [0.01, 0.1]}   # every combination, crossed with the variants
    around_best_of: configs/studies/lambda-tau.yaml   # instead of variants and grid: the row and the column
                                       # through that (finished) study's best setting; config, set, baseline
                                       # and cells folder are inherited, so its finished cells are reused
    out: runs/studies/convergence      # report.md and PNGs (default runs/studies/<name>)
    runs: runs/studies/convergence/runs   # the cells' run folders (default <out>/runs)
    launcher: "{python} -m megatron_simreg.train --config {config}"   # e.g. "scripts/launch.sh {config}" on a GPU node
    plots: [valid/lm loss, train/simreg, train/simreg negative angle]

A study that separates choosing from reporting says `select:` and `report:` instead of seeds, variants and grid:

    baseline: {simreg.weight: 0}       # runs on the report seeds only
    select:
      seeds: [11, 22]                  # every method's grid runs on these
      metric: valid/lm loss            # each method's setting of lowest mean final value is its choice
      methods:
        simreg: {grid: {simreg.weight: [0.5, 1], simreg.temperature: [0.01, 0.05]}}
        simcse: {set: {regularizer.name: simcse}, grid: {regularizer.weight: [0.5, 1]}}
    report:
      seeds: [101, 102, 103]           # fresh: a selection seed here is refused
      metric: test/lm loss             # scored once, after the last iteration
      test_set: data/held-out/x_test   # data.test_prefix of the report's cells only

Once every selection cell is finished, each method's choice and the baseline run on the report seeds, and the
report gives the selection table (every setting, per seed) and each choice's test loss (mean ± sd) with its
paired difference to the baseline (95% CI, paired t-test p, "not resolved" when the interval holds zero);
`<out>/selection.json` records the choice. The selection's cells never score a test set (a split with a test
share is refused); the validation set is `data.valid_prefix`, a held-out sample of the whole corpus
(tools/prepare_data.py --held-out-tokens, data/held_out.py).

Each cell (setting x seed) runs through the normal training entry in its own process (`--set` carries the
overrides, the seed and the run folder `<runs>/<setting>/seed<N>`), so a crash or a kill of one cell loses
nothing of the others. A cell is finished when its latest checkpoint is its last iteration; a half-finished
one resumes from its own checkpoint; one that another process is running (it holds the cell's lock) is left
alone. Stop the study at any time and start the same command again. A cell folder that holds a run of other
settings is refused before anything runs. `--set` on this command reaches every cell without changing what
a cell is (e.g. `--set training.exit_interval=100` to run in slices before a time limit).

Each cell records the code that ran it (provenance.py: a hash of the package's source with the torch and
megatron-core versions, the commit beside it), the machine and its resolved config. A cell, finished or
half-finished, made by other code is rerun from the start: its files move to `made-by-<code>/` in its folder
(`--status` says which will rerun). `--allow-mixed-code` keeps such cells instead; the report names the code
of its numbers and marks each row when they come from more than one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from megatron_simreg.cli import one_line_errors
from megatron_simreg.config import Config, load_config, parse_yaml, resolved_dict, split_shares
from megatron_simreg.progress import progress_bar
from megatron_simreg.provenance import code_identity, describe, same_code
from megatron_simreg.run_plan import train_iters
from megatron_simreg.study_protocol import Choice, choose, protocol_sections, write_selection
from megatron_simreg.study_report import collect, duration, write_report

LOCK_FILE = ".study.lock"
RECORD_FILE = "study.json"
LOG_FILE = "train.log"
DEFAULT_LAUNCHER = "{python} -m megatron_simreg.train --config {config}"
DEFAULT_PLOTS = ("valid/lm loss", "train/simreg", "train/simreg negative angle")
# Settings that say how a cell is run, not what it is: a cell run with other values is the same cell.
RUN_ONLY_KEYS = ("training.exit_interval",)
STUDY_KEYS = ("name", "description", "config", "set", "seeds", "baseline", "variants", "grid", "around_best_of",
              "select", "report", "out", "runs", "launcher", "plots")
SELECT_KEYS, REPORT_KEYS, METHOD_KEYS = ("seeds", "metric", "methods"), ("seeds", "metric", "test_set"), ("set", "grid")


class StudyError(ValueError):
    """A study that cannot run as written, with what to change."""


@dataclass(frozen=True)
class Setting:
    """One point of the study: a name (its folder) and the overrides that make it."""

    name: str
    overrides: tuple[tuple[str, object], ...]

    def value(self, key: str):
        return dict(self.overrides).get(key)


@dataclass
class Protocol:
    """A select/report study: the settings are chosen on the study's seeds, the choices reported on others."""

    methods: dict[str, list[Setting]]  # each method's settings; the best of each is reported
    baseline: dict | None  # its overrides: it runs on the report seeds only
    select_metric: str  # split/metric, e.g. valid/lm loss
    report_seeds: list[int]
    report_metric: str  # e.g. test/lm loss
    test_set: str | None  # data.test_prefix of the report's cells only: the selection's never score it

    def method_of(self) -> dict[Setting, str]:
        return {setting: method for method, settings in self.methods.items() for setting in settings}


@dataclass
class Study:
    name: str
    path: str
    config: str
    shared: dict[str, object]
    seeds: list[int]
    settings: list[Setting]  # the baseline first when there is one
    baseline: Setting | None
    grid: dict[str, list]
    out: str
    runs: str
    launcher: str
    plots: list[tuple[str, str]]
    description: str = ""
    derived: str = ""  # how around_best_of (or a protocol's selection) chose the settings
    protocol: Protocol | None = None  # select/report: these settings and seeds are the selection's

    def run_dir(self, setting: Setting, seed: int) -> str:
        return os.path.join(self.runs, setting.name, f"seed{seed}")

    def cells(self) -> list[tuple[Setting, int]]:
        return [(setting, seed) for setting in self.settings for seed in self.seeds]


@dataclass
class CellState:
    setting: Setting
    seed: int
    run_dir: str
    config: Config
    iteration: int  # of the latest checkpoint, 0 if none
    running_elsewhere: bool = False
    record: dict = field(default_factory=dict)
    keep_other_code: bool = False  # --allow-mixed-code

    @property
    def finished(self) -> bool:
        return self.iteration >= train_iters(self.config) and (self.keep_other_code or not self.other_code)

    @property
    def codes(self) -> list[dict]:
        """The code of the attempts that made the saved run (those since its last start at iteration 0)."""
        attempts = self.record.get("attempts", [])
        starts = [i for i, attempt in enumerate(attempts) if attempt.get("from_iteration") == 0]
        codes = []
        for attempt in attempts[starts[-1] if starts else 0:]:
            if attempt.get("code", {}) not in codes:
                codes.append(attempt.get("code", {}))
        return codes

    @property
    def other_code(self) -> bool:
        """Saved progress made (in part) by code other than this process's, or by code that was not recorded."""
        return self.iteration > 0 and not all(same_code(code, code_identity()) for code in self.codes or [{}])

    @property
    def label(self) -> str:
        return f"{self.setting.name}/seed{self.seed}"

    @property
    def wall_s(self) -> float:
        return sum(attempt.get("wall_s", 0.0) for attempt in self.record.get("attempts", []))

    def describe(self) -> str:
        if self.finished:
            return "finished"
        if self.running_elsewhere:
            return f"running in another process (iteration {self.iteration} of {train_iters(self.config)} saved)"
        if self.other_code and not self.keep_other_code:
            theirs = "; ".join(describe(code) for code in self.codes or [{}])
            return f"made by other code (will rerun): {theirs}"
        if self.iteration:
            return f"stopped at iteration {self.iteration} of {train_iters(self.config)}"
        failed = [a for a in self.record.get("attempts", []) if a.get("returncode") not in (0, None)]
        if not failed:
            return "not started"
        code = failed[-1]["returncode"]
        return f"interrupted (signal {-code})" if code < 0 else f"failed (exit code {code}, see {LOG_FILE})"


# ---- reading a study file ---------------------------------------------------------------------------------------


def load_study(path: str) -> Study:
    if not os.path.isfile(path):
        raise StudyError(f"study file {path!r} not found; the shipped ones are in configs/studies/")
    with open(path, encoding="utf-8") as f:
        raw = parse_yaml(f, f"study {path!r}") or {}
    if not isinstance(raw, dict):
        raise StudyError(f"study {path!r} must be a mapping (config, seeds, grid, ...)")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"study {path!r}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(STUDY_KEYS)}")
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    if raw.get("around_best_of"):
        return _around_best(path, name, raw)
    if "config" not in raw:
        raise StudyError(f"study {path!r} names no base config: add e.g. `config: configs/tiny-llama.yaml`")
    if "select" in raw or "report" in raw:
        return _select_and_report(path, name, raw)
    grid = _grid(raw.get("grid"), path, "grid")
    variants = _mapping(raw.get("variants"), path, "variants")
    settings = _cross(variants, grid, default=os.path.splitext(os.path.basename(raw["config"]))[0])
    return _finish(Study(**_file_fields(path, name, raw), shared=_overrides(raw.get("set"), path, "set"),
                         seeds=_seeds(raw.get("seeds"), path), settings=settings, baseline=None, grid=grid),
                   _baseline(path, raw))


def _file_fields(path: str, name: str, raw: dict) -> dict:
    """The Study fields a plain and a select/report study file give alike."""
    out = str(raw.get("out") or os.path.join("runs", "studies", name))
    return dict(name=name, path=path, config=str(raw["config"]), out=out,
                runs=str(raw.get("runs") or os.path.join(out, "runs")),
                launcher=str(raw.get("launcher") or DEFAULT_LAUNCHER), plots=_plots(raw.get("plots"), path),
                description=str(raw.get("description") or "").strip())


def _baseline(path: str, raw: dict) -> dict | None:
    """The baseline's overrides; None without one (`baseline:` absent or null)."""
    return None if raw.get("baseline") is None else _overrides(raw["baseline"], path, "baseline")


def _select_and_report(path: str, name: str, raw: dict) -> Study:
    """`select:` (seeds, metric, each method's grid) and `report:` (fresh seeds, metric): the study's cells are
    the selection's; report_phase() makes the report's once every selection cell is finished."""
    if "select" not in raw or "report" not in raw:
        raise StudyError(f"study {path!r}: `select:` and `report:` go together (choose on some seeds, report on "
                         "others)")
    misplaced = sorted({"seeds", "grid", "variants"} & set(raw))
    if misplaced:
        raise StudyError(f"study {path!r}: {', '.join(misplaced)} belong in `select:` (its seeds, each method's grid) "
                         "in a select/report study")
    select = _known(_mapping(raw["select"], path, "select"), SELECT_KEYS, path, "select")
    report = _known(_mapping(raw["report"], path, "report"), REPORT_KEYS, path, "report")
    methods = {}
    for method, spec in _mapping(select.get("methods"), path, "select.methods").items():
        spec = _known(_mapping(spec, path, f"select.methods.{method}"), METHOD_KEYS, path, f"select.methods.{method}")
        grid = _grid(spec.get("grid"), path, f"select.methods.{method}.grid")
        overrides = _overrides(spec.get("set"), path, f"select.methods.{method}.set")
        methods[str(method)] = _cross({str(method): overrides}, grid, default=str(method))
    if not methods:
        raise StudyError(f"study {path!r}: select.methods names no method, e.g. "
                         "{simreg: {grid: {simreg.weight: [1, 2.5]}}, simcse: {set: {regularizer.name: simcse}}}")
    seeds, report_seeds = _seeds(select.get("seeds"), path), _seeds(report.get("seeds"), path)
    reused = sorted(set(seeds) & set(report_seeds))
    if reused:
        raise StudyError(f"study {path!r}: report seeds {reused} are also selection seeds: report on fresh seeds, "
                         "not on those the choice was made on")
    select_metric = _metric(select.get("metric", "valid/lm loss"), path, "select.metric", ("valid",))
    report_metric = _metric(report.get("metric", "test/lm loss"), path, "report.metric", ("valid", "test"))
    shared = _overrides(raw.get("set"), path, "set")
    if "data.test_prefix" in shared:
        raise StudyError(f"study {path!r}: name the test set in report.test_set, not in `set`, so that only the "
                         "report's cells score it")
    test_set = report.get("test_set")
    if report_metric.startswith("test/") and test_set is None:
        raise StudyError(f"study {path!r}: report.metric {report_metric!r} needs report.test_set: a held-out test set "
                         "(tools/prepare_data.py --held-out-tokens), scored by the report's cells only")
    return Study(
        **_file_fields(path, name, raw), shared=shared, seeds=seeds,
        settings=[setting for settings in methods.values() for setting in settings], baseline=None, grid={},
        protocol=Protocol(methods, _baseline(path, raw), select_metric, report_seeds, report_metric,
                          None if test_set is None else str(test_set)),
    )


def report_phase(study: Study, choices: list[Choice]) -> Study:
    """The report's cells: the baseline and each method's chosen setting on the report seeds."""
    protocol = study.protocol
    chosen = ", ".join(f"{c.method}: `{c.setting.name}`" for c in choices)
    derived = (f"each method's best by mean final {protocol.select_metric} over the selection seeds "
               f"{', '.join(map(str, study.seeds))} ({chosen}; see Selection), reported on fresh seeds")
    shared = {**study.shared, **({"data.test_prefix": protocol.test_set} if protocol.test_set else {})}
    return _finish(dataclasses.replace(study, shared=shared, seeds=protocol.report_seeds,
                                       settings=[c.setting for c in choices], derived=derived, protocol=None),
                   protocol.baseline)


def _known(spec: dict, keys: tuple[str, ...], path: str, where: str) -> dict:
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise StudyError(f"study {path!r}: unknown key(s) {', '.join(map(str, unknown))} in {where}; "
                         f"valid keys: {', '.join(keys)}")
    return spec


def _metric(value, path: str, where: str, splits: tuple[str, ...]) -> str:
    split, _, metric = str(value).partition("/")
    if split not in splits or not metric:
        shapes = " or ".join(f"{s}/<metric>" for s in splits)
        why = " (choosing on the test set would report on what chose)" if where == "select.metric" else ""
        raise StudyError(f"study {path!r}: {where} {value!r} must be {shapes}{why}, e.g. {splits[-1]}/lm loss")
    return str(value)


def _grid(value, path: str, where: str) -> dict:
    grid = _mapping(value, path, where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"study {path!r}: {where}.{key} must be a non-empty list of values, got {values!r}")
    return grid


def _finish(study: Study, baseline: dict | None) -> Study:
    """Put the baseline first: a setting with the same overrides is the baseline, else it is one more setting."""
    if baseline is None:
        return study
    key = tuple(sorted(baseline.items(), key=lambda item: item[0]))
    for setting in study.settings:
        if tuple(sorted(setting.overrides)) == key:
            study.baseline = setting
            study.settings = [setting] + [s for s in study.settings if s is not setting]
            return study
    study.baseline = Setting("baseline", tuple(baseline.items()))
    study.settings = [study.baseline] + study.settings
    return study


def _cross(variants: dict, grid: dict, default: str) -> list[Setting]:
    names = _short_names(list(grid))
    axes = ([(key, v) for v in values] for key, values in grid.items())
    points = [()] if not grid else list(itertools.product(*axes))
    settings = []
    for variant, variant_overrides in (variants.items() or [(None, {})]):
        if not isinstance(variant_overrides, dict):
            raise StudyError(f"variant {variant!r} must be a mapping of overrides, got {variant_overrides!r}")
        for point in points:
            label = ",".join(f"{names[key]}={_show(value)}" for key, value in point)
            name = "_".join(part for part in (variant, label) if part) or default
            settings.append(Setting(name, tuple(variant_overrides.items()) + tuple(point)))
    return settings


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key (`simreg.weight` -> `weight`), the whole key where two would clash."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def _show(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _around_best(path: str, name: str, raw: dict) -> Study:
    """The row and column through the best setting of a finished study (lowest mean final validation loss)."""
    parent = load_study(str(raw["around_best_of"]))
    if len(parent.grid) < 2:
        raise StudyError(f"around_best_of: {parent.path} has no 2-D grid to take a row and a column from")
    states = [_state(parent, setting, seed, []) for setting, seed in parent.cells()]
    missing = [state.label for state in states if not state.finished]
    if missing:
        raise StudyError(
            f"around_best_of: {parent.path} has {len(missing)} cells not finished ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); finish it first: python -m megatron_simreg.study {parent.path}"
        )
    results = [r for r in collect(parent, states) if r.setting is not parent.baseline]
    best = min(results, key=lambda result: result.mean("final valid loss"))
    chosen = []
    for key, values in parent.grid.items():
        for value in values:
            overrides = dict(best.setting.overrides)
            overrides[key] = value
            match = next(s for s in parent.settings if dict(s.overrides) == overrides)
            if match not in chosen:
                chosen.append(match)
    unexpected = sorted(set(raw) - {"name", "description", "around_best_of", "seeds", "out", "launcher", "plots"})
    if unexpected:
        raise StudyError(f"study {path!r}: {', '.join(unexpected)} come from around_best_of's study; remove them here")
    study = dataclasses.replace(
        parent, name=name, path=path, seeds=_seeds(raw.get("seeds"), path) if "seeds" in raw else parent.seeds,
        settings=([parent.baseline] if parent.baseline else []) + chosen,
        out=str(raw.get("out") or os.path.join("runs", "studies", name)),
        launcher=str(raw.get("launcher") or parent.launcher),
        plots=_plots(raw.get("plots"), path) if "plots" in raw else parent.plots,
        description=str(raw.get("description") or "").strip(),
        derived=(f"the row and column of {parent.path}'s grid through its best setting `{best.setting.name}` "
                 f"(lowest mean final validation loss, {best.mean('final valid loss'):.4f} over "
                 f"{len(best.seeds)} seed(s)); cells shared with that study are reused from {parent.runs}"),
    )
    return study


def _mapping(value, path: str, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(f"study {path!r}: {key} must be a mapping, got {value!r}")
    return value


def _overrides(value, path: str, key: str) -> dict[str, object]:
    """`{simreg.weight: 0}` or `[simreg.weight=0]`, as a mapping of dotted keys to values."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(item, str) and "=" in item for item in value):
        return {k.strip(): parse_yaml(v, f"study {path!r}: {key} {item!r}")
                for item in value for k, v in [item.split("=", 1)]}
    raise StudyError(f"study {path!r}: {key} must be a mapping {{key: value}} or a list of key=value, got {value!r}")


def _seeds(value, path: str) -> list[int]:
    if value is None:
        return [1234]
    if (not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value)
            or len(set(value)) < len(value)):
        raise StudyError(f"study {path!r}: seeds must be a list of distinct integers, got {value!r}")
    return value


def _plots(value, path: str) -> list[tuple[str, str]]:
    panels = []
    for item in value or DEFAULT_PLOTS:
        split, _, metric = str(item).partition("/")
        if split not in ("train", "valid") or not metric:
            raise StudyError(f"study {path!r}: plot {item!r} must be train/<metric> or valid/<metric>")
        panels.append((split, metric))
    return panels


# ---- cells --------------------------------------------------------------------------------------------------------


def _as_override(key: str, value) -> str:
    """key=value as `--set` reads it back (YAML): strings as they are, anything else as JSON."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def cell_overrides(study: Study, setting: Setting, seed: int, extra: list[str]) -> list[str]:
    pairs = list(study.shared.items()) + list(setting.overrides)
    run_dir = study.run_dir(setting, seed)
    fixed = [f"training.seed={seed}", f"logging.run_dir={run_dir}", f"name={setting.name}"]
    return [_as_override(k, v) for k, v in pairs] + fixed + list(extra)


def cell_command(study: Study, setting: Setting, seed: int, extra: list[str]) -> list[str]:
    template = study.launcher.format(python=shlex.quote(sys.executable), config=shlex.quote(study.config))
    command = shlex.split(template)
    for override in cell_overrides(study, setting, seed, extra):
        command += ["--set", override]
    return command


def _state(study: Study, setting: Setting, seed: int, extra: list[str], keep_other_code=False) -> CellState:
    try:
        config = load_config(study.config, cell_overrides(study, setting, seed, extra))
    except ValueError as error:
        raise StudyError(f"cell {setting.name}/seed{seed} of {study.path}: {error}") from error
    run_dir = study.run_dir(setting, seed)
    _check_same_settings(config, run_dir, f"{setting.name}/seed{seed}")
    state = CellState(setting, seed, run_dir, config, 0, running_elsewhere=_locked_elsewhere(run_dir),
                      keep_other_code=keep_other_code)
    _reload(state)
    return state


def _reload(state: CellState) -> None:
    """The cell's saved iteration and record as they are on disk now (another study process may have run it)."""
    from megatron_simreg.checkpoint import latest_iteration

    checkpoints = state.config.checkpoint.save or os.path.join(state.run_dir, "checkpoints")
    state.iteration = latest_iteration(checkpoints) or 0
    state.record = _read_record(state.run_dir)


def _check_same_settings(config: Config, run_dir: str, label: str) -> None:
    """Refuse a cell folder whose run was made with other settings: its numbers would be mixed in silently."""
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        return
    with open(saved_path, encoding="utf-8") as f:
        saved = yaml.safe_load(f) or {}
    wanted = resolved_dict(config)
    differences = []
    for section, values in wanted.items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            dotted = section if key is None else f"{section}.{key}"
            there = saved if key is None else saved.get(section)
            if dotted in RUN_ONLY_KEYS or not isinstance(there, dict) or (key or section) not in there:
                continue  # a key the run's version of this code did not write
            if there[key or section] != value:
                differences.append(f"{dotted}: {there[key or section]!r} there, {value!r} now")
    if differences:
        raise StudyError(
            f"cell {label}: {run_dir} holds a run with other settings ({'; '.join(differences[:3])}); "
            "move that folder away to run the cell anew, or point the study's `runs` at another folder"
        )


def _read_record(run_dir: str) -> dict:
    path = os.path.join(run_dir, RECORD_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_record(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, RECORD_FILE)
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".partial", path)


def _set_aside(state: CellState) -> str:
    """Move the cell's files (all but its lock) to `made-by-<code>/` in its folder, to start it anew."""
    checkpoints = state.config.checkpoint.save or os.path.join(state.run_dir, "checkpoints")
    if os.path.commonpath([os.path.abspath(checkpoints), os.path.abspath(state.run_dir)]) != os.path.abspath(
            state.run_dir):
        raise StudyError(f"cell {state.label} was made by other code and saves to {checkpoints}, outside its "
                         "folder: move that away to rerun it, or keep it with --allow-mixed-code")
    code = state.codes[-1] if state.codes else {}
    name = f"made-by-{code['source'][:12]}" if code.get("source") else "made-by-unknown-code"
    aside = os.path.join(state.run_dir, name)
    suffix = 1
    while os.path.exists(aside):
        suffix += 1
        aside = os.path.join(state.run_dir, f"{name}-{suffix}")
    os.makedirs(aside)
    for entry in os.listdir(state.run_dir):
        if entry != LOCK_FILE and not entry.startswith("made-by-"):
            os.replace(os.path.join(state.run_dir, entry), os.path.join(aside, entry))
    _reload(state)
    return aside


def _locked_elsewhere(run_dir: str) -> bool:
    path = os.path.join(run_dir, LOCK_FILE)
    if not os.path.isfile(path):
        return False
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def machine() -> str:
    """This node in a line: the CPU model and the vector extensions matmuls use (lscpu), cores, GPUs if any."""
    model, flags = "unknown CPU", set()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if f in flags]
    text = f"{model}, {os.cpu_count()} cores, {' '.join(shown) or 'no AVX2'}"
    if os.environ.get("OMP_NUM_THREADS"):
        text += f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    if shutil.which("nvidia-smi"):
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, check=False)
        if gpus.returncode == 0 and gpus.stdout.strip():
            names = gpus.stdout.strip().splitlines()
            text += f"; {len(names)} x {names[0]}"
    return text


# ---- running ------------------------------------------------------------------------------------------------------


class CellRunner:
    """Runs one cell's training process at a time, holding the cell's lock for as long as that process lives."""

    def __init__(self):
        self.process: subprocess.Popen | None = None

    def run(self, state: CellState, command: list[str], say=print) -> int | None:
        """The training process's exit code; None when another process holds the cell."""
        os.makedirs(state.run_dir, exist_ok=True)
        with open(os.path.join(state.run_dir, LOCK_FILE), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            _reload(state)  # what this process listed may be stale: another one may have run the cell since
            if state.finished:
                return 0
            if state.other_code and not state.keep_other_code:
                aside = _set_aside(state)
                say(f"{state.label}: made by other code; its files moved to {aside}, rerunning it from the start")
            attempt = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                       "code": code_identity(), "command": shlex.join(command), "from_iteration": state.iteration,
                       "returncode": None}
            record = state.record or {"setting": state.setting.name, "seed": state.seed,
                                      "overrides": dict(state.setting.overrides),
                                      "config": resolved_dict(state.config), "attempts": []}
            record["attempts"].append(attempt)
            state.record = record
            _write_record(state.run_dir, record)
            start = time.perf_counter()
            try:
                with open(os.path.join(state.run_dir, LOG_FILE), "a", encoding="utf-8") as log:
                    log.write(f"\n=== {attempt['started']}: {attempt['command']}\n")
                    log.flush()
                    # The lock's descriptor goes to the child: the cell stays locked while training runs, even
                    # if this process is killed.
                    self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                    pass_fds=(lock.fileno(),),
                                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
                    while attempt["returncode"] is None:
                        try:
                            attempt["returncode"] = self.process.wait(timeout=60)
                        except subprocess.TimeoutExpired:  # the wall time so far survives a kill of this process
                            attempt["wall_s"] = round(time.perf_counter() - start, 1)
                            _write_record(state.run_dir, record)
                        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (cli.Stopped): the cell saves first
                            signum = getattr(stop, "signum", signal.SIGINT)
                            self.process.send_signal(signum)  # a signal to the study alone reaches it too
                            attempt["returncode"] = self.process.wait()
                            stop.args = (f"interrupted by {signal.Signals(signum).name}; {state.label} stopped with "
                                         f"exit code {attempt['returncode']} (its {LOG_FILE} says why); run the "
                                         "same command to resume",)
                            raise
            finally:
                if attempt["returncode"] is None and self.process is not None:  # stopped by a signal to this process
                    attempt["returncode"] = self.process.poll()
                self.process = None
                attempt["wall_s"] = round(time.perf_counter() - start, 1)
                _write_record(state.run_dir, record)
            return attempt["returncode"]


def _time_left(states: list[CellState]) -> str:
    done = [s.wall_s for s in states if s.finished and s.wall_s]
    if not done:
        return "time left unknown until a cell finishes"
    per_cell = sum(done) / len(done)
    left = sum(per_cell * (1 - s.iteration / train_iters(s.config)) for s in states if not s.finished)
    return f"about {duration(left)} left"


def run_study(study: Study, states: list[CellState], extra: list[str]) -> list[CellState]:
    """Run every cell not finished, in order; return the cells that failed."""
    runner = CellRunner()
    failed = []
    bar = progress_bar(total=len(states), initial=sum(s.finished for s in states), unit="cell", desc=study.name,
                       bar_format="{desc}: {n}/{total} cells done |{bar}| {elapsed} in this session{postfix}")
    try:
        for state in states:
            if state.finished:
                continue
            if state.running_elsewhere:
                bar.write(f"{state.label}: another process is running it; left alone")
                continue
            status = f"running {state.label}, {_time_left(states)}"
            if bar.disable:  # no bar in a log file: the status as a line of its own
                bar.write(status)
            else:
                bar.set_postfix_str(status)
            command = cell_command(study, state.setting, state.seed, extra)
            returncode = runner.run(state, command, say=bar.write)
            if returncode is None:
                bar.write(f"{state.label}: another process took it; left alone")
                continue
            _reload(state)
            if returncode != 0:
                failed.append(state)
                bar.write(f"{state.label}: FAILED with exit code {returncode}: {_last_line(state.run_dir)}")
            elif state.finished:
                bar.update(1)
                bar.write(f"{state.label}: finished ({duration(state.wall_s)} in all)")
            else:
                bar.write(f"{state.label}: {state.describe()}")
    finally:
        if bar.disable:  # no bar in a log file: where the study got to, as a line
            print(f"{study.name}: {sum(s.finished for s in states)}/{len(states)} cells done", file=sys.stderr)
        bar.close()
    return failed


def _last_line(run_dir: str) -> str:
    with open(os.path.join(run_dir, LOG_FILE), encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _prepare_data(states: list[CellState]) -> None:
    """The shipped studies train on the demo corpus: write it when missing (offline, ~1 min); any other
    missing data is an error naming the prefix, before anything runs."""
    from megatron_simreg.data import dataset_prefixes
    from megatron_simreg.demo import PREFIX, prepare_demo_data

    for prefix in sorted({p for s in states for p in s.config.data.prefix}):
        if os.path.normpath(prefix) == os.path.normpath(PREFIX) and not os.path.isfile(PREFIX + ".stats.json"):
            prepare_demo_data()
        for shard in dataset_prefixes(prefix)[0]:
            if not (os.path.isfile(shard + ".bin") and os.path.isfile(shard + ".idx")):
                raise StudyError(f"data {shard}.bin/.idx not found: write it with tools/prepare_data.py "
                                 "or set data.prefix (the study's `set`) to where it is")
    for prefix in sorted({p for s in states for p in (s.config.data.valid_prefix, s.config.data.test_prefix) if p}):
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            raise StudyError(f"held-out data {prefix}.bin/.idx not found: write it with tools/prepare_data.py "
                             "--held-out-from PREFIX --held-out-tokens N (see the study's description)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="a study file, e.g. configs/studies/convergence.yaml")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every cell, not part of what a cell is (e.g. training.exit_interval=100)")
    parser.add_argument("--only", action="append", default=[], metavar="SETTING",
                        help="run only the cells of this setting (repeatable), e.g. --only baseline; "
                             "the report covers all")
    parser.add_argument("--status", action="store_true", help="list the cells and their state; run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the finished cells; run nothing")
    parser.add_argument("--allow-mixed-code", action="store_true",
                        help="keep cells made by other code instead of rerunning them; the report marks them")
    args = parser.parse_args(argv)
    with one_line_errors("study"):
        study = load_study(args.study)
        states = _states(study, args)
        names = [s.name for s in study.settings] + (["baseline"] if study.protocol and study.protocol.baseline else [])
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise StudyError(f"--only {', '.join(unknown)}: no such setting; the study has {', '.join(names)}")
        if study.protocol is not None:
            _check_held_out(study, states)
        failed = [] if args.status or args.report_only else _run(study, states, args)
        if args.status:
            _print_status(states)
        report_study, report_states, sections, results = study, states, [], None
        if study.protocol is not None:
            report_study, report_states, sections, results = _report_phase(study, states, args, failed)
        if args.status:
            return
        report = write_report(report_study, report_states, sections, results)
    print(f"report: {report}")
    everything = states + (report_states if report_study is not study else [])
    missing = [s for s in everything if not s.finished]
    if missing:
        print(f"{len(missing)} of {len(everything)} cells not finished; "
              f"continue with: python -m megatron_simreg.study {study.path}")
    if failed:
        sys.exit(f"study: {len(failed)} cell(s) failed: {', '.join(s.label for s in failed)} (see their {LOG_FILE})")


def _states(study: Study, args) -> list[CellState]:
    return [_state(study, setting, seed, args.extra, args.allow_mixed_code) for setting, seed in study.cells()]


def _run(study: Study, states: list[CellState], args) -> list[CellState]:
    chosen = [s for s in states if not args.only or s.setting.name in args.only]
    _prepare_data(chosen)
    return run_study(study, chosen, args.extra)


def _print_status(states: list[CellState]) -> None:
    for state in states:
        print(f"{state.label:40s} {state.describe()}")
    print(f"{sum(s.finished for s in states)} of {len(states)} cells finished; {_time_left(states)}")


def _report_phase(study: Study, states: list[CellState], args, failed: list):
    """A select/report study once its selection is finished: the choices, the report's cells (run here unless
    --status or --report-only), the report's sections and its cells' results (None: not read yet); before that,
    a section saying what it waits for. Each cell's metrics are read once."""
    unfinished = [s for s in states if not s.finished]
    if unfinished:
        waiting = (f"The report's cells (each method's best setting on seeds "
                   f"{', '.join(map(str, study.protocol.report_seeds))}) wait for the selection: {len(unfinished)} "
                   f"of its {len(states)} cells not finished.")
        if args.status:
            print(waiting)
        return study, states, ["## Report", "", waiting, ""], None
    selected = collect(study, states)
    choices = choose(study.protocol.methods, selected, study.protocol.select_metric)
    reported = report_phase(study, choices)
    report_states = _states(reported, args)
    if args.status:
        print("chosen on the selection seeds: " + ", ".join(f"{c.method}: {c.setting.name}" for c in choices))
        _print_status(report_states)
        return reported, report_states, [], None
    if not args.report_only:
        failed += _run(reported, report_states, args)
    os.makedirs(study.out, exist_ok=True)
    write_selection(os.path.join(study.out, "selection.json"), choices, study.protocol.select_metric)
    results = collect(reported, report_states)
    return reported, report_states, protocol_sections(study, selected, reported, results, choices), results


def _check_held_out(study: Study, states: list[CellState]) -> None:
    """Before anything runs: the selection's cells score no test set (a split's test share included), and the
    report's test set comes with a held-out validation set (one without the other leaves a split unscored)."""
    data = states[0].config.data
    shares = split_shares(data.split)
    if data.valid_prefix is None and len(shares) > 2 and shares[2] > 0:
        raise StudyError(f"study {study.path!r}: data.split {data.split!r} gives the selection's cells a test share: "
                         "set its third share to 0, or data.valid_prefix (tools/prepare_data.py --held-out-tokens)")
    if study.protocol.test_set is not None and data.valid_prefix is None:
        raise StudyError(f"study {study.path!r}: report.test_set needs data.valid_prefix in the study's `set`, the "
                         "validation set held out with it")


if __name__ == "__main__":
    main()
