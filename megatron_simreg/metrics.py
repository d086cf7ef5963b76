"""Run metrics: the JSONL log our CPU loop writes, and reading it or Megatron's TensorBoard events back.

One JSON object a line: `{"split": "train"|"valid"|"test", "iteration": 10, "tokens": 20480, "lm loss": 7.1, ...}`.
Reading gives, per split and metric, the values against tokens seen, which is how the paper compares
runs (convergence speed is measured in tokens).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field

import yaml

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
TENSORBOARD_SUFFIXES = {"valid": " validation", "test": " test"}  # `lm loss validation`: valid/lm loss


class MetricsWriter:
    """Appends one JSON line per logged step; flushed at once so a crash loses nothing logged.

    A run resumed at iteration `resumed_at` (0: started afresh) trains the iterations after it again: their earlier
    records (logged by a run stopped after its last checkpoint) are dropped first, so each iteration keeps one record.
    """

    def __init__(self, run_dir: str, resumed_at: int | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, METRICS_FILE)
        if resumed_at is not None and os.path.isfile(self.path):
            _drop_records_after(self.path, resumed_at)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, split: str, iteration: int, tokens: int, values: dict[str, float]) -> None:
        record = {"split": split, "iteration": iteration, "tokens": tokens}
        record.update({name: float(value) for name, value in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _drop_records_after(path: str, iteration: int) -> None:
    """Rewrite the file (atomically) without the records of later iterations; lines that are not records stay."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if _iteration_of(line) is None or _iteration_of(line) <= iteration]
    if len(kept) == len(lines):
        return
    with open(path + ".partial", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".partial", path)


def _iteration_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Curve:
    tokens: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Run:
    """A run's curves: `curves[split][metric]` (split: "train", "valid" or "test": the end of training only)."""

    name: str
    curves: dict[str, dict[str, Curve]]

    def curve(self, split: str, metric: str) -> Curve | None:
        return self.curves.get(split, {}).get(metric)


def load_run(path: str, seq_length: int | None = None) -> Run:
    """A run folder (or file): our metrics.jsonl, or Megatron's TensorBoard event files.

    TensorBoard logs count samples; `seq_length` (or the run folder's config.yaml) turns them into tokens.
    """
    name = os.path.basename(os.path.normpath(path))
    jsonl = path if path.endswith(".jsonl") else os.path.join(path, METRICS_FILE)
    if os.path.isfile(jsonl):
        return Run(name, _latest_values(_read_jsonl(jsonl)))
    if os.path.isdir(path) and _event_files(path):
        return Run(name, _latest_values(_read_tensorboard(path, seq_length or _seq_length_from_config(path))))
    raise FileNotFoundError(
        f"no metrics in {path!r}: expected {METRICS_FILE} (our training loop) or TensorBoard event files "
        "(megatron.training with --tensorboard-dir); pass the run folder that holds them"
    )


def _read_jsonl(path: str) -> dict[str, dict[str, Curve]]:
    curves: dict[str, dict[str, Curve]] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                split, tokens = record.pop("split"), record.pop("tokens")
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path}:{number}: not a metrics record ({error})") from error
            record.pop("iteration", None)
            for metric, value in record.items():
                curve = curves.setdefault(split, {}).setdefault(metric, Curve())
                curve.tokens.append(float(tokens))
                curve.values.append(float(value))
    return curves


def _latest_values(curves: dict[str, dict[str, Curve]]) -> dict[str, dict[str, Curve]]:
    """One value per token count, the last one written, in token order.

    A run resumed from a checkpoint logs again the steps between that checkpoint and the interruption;
    the resumed run's values replace the interrupted run's, as they would in an uninterrupted run.
    """
    out: dict[str, dict[str, Curve]] = {}
    for split, metrics in curves.items():
        for metric, curve in metrics.items():
            latest = dict(zip(curve.tokens, curve.values))
            tokens = sorted(latest)
            out.setdefault(split, {})[metric] = Curve(tokens, [latest[t] for t in tokens])
    return out


def _event_files(path: str) -> list[str]:
    return [os.path.join(root, f) for root, _, files in os.walk(path) for f in files if "tfevents" in f]


def _read_tensorboard(path: str, seq_length: int | None) -> dict[str, dict[str, Curve]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if seq_length is None:
        raise ValueError(f"{path} holds TensorBoard events counted in samples: "
                         "pass seq_length to turn them into tokens")
    curves: dict[str, dict[str, Curve]] = {}
    for event_dir in sorted({os.path.dirname(f) for f in _event_files(path)}):
        accumulator = EventAccumulator(event_dir, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if not tag.endswith(" vs samples"):
                continue
            metric = tag.removesuffix(" vs samples")
            split, suffix = next(((split, suffix) for split, suffix in TENSORBOARD_SUFFIXES.items()
                                  if metric.endswith(suffix)), ("train", ""))
            curve = curves.setdefault(split, {}).setdefault(metric.removesuffix(suffix), Curve())
            for event in accumulator.Scalars(tag):
                curve.tokens.append(float(event.step * seq_length))
                curve.values.append(float(event.value))
    return curves


def _seq_length_from_config(run_dir: str) -> int | None:
    config = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get("model", {}).get("seq_length")


def tokens_to_reach(curve: Curve, target: float) -> float | None:
    """First token count at which the curve reaches `target` (linear between logged points)."""
    previous = None
    for tokens, value in zip(curve.tokens, curve.values):
        if value <= target:
            if previous is None or math.isclose(previous[1], value):
                return tokens
            fraction = (previous[1] - target) / (previous[1] - value)
            return previous[0] + fraction * (tokens - previous[0])
        previous = (tokens, value)
    return None


def smoothed(curve: Curve, weight: float) -> Curve:
    """Exponential moving average (TensorBoard's smoothing) for noisy training losses."""
    if weight <= 0:
        return curve
    out, average = Curve(tokens=list(curve.tokens)), None
    for value in curve.values:
        average = value if average is None else weight * average + (1 - weight) * value
        out.values.append(average)
    return out


def seed_band(curves: list[Curve]) -> tuple[list[float], list[float], list[float]]:
    """Mean and sample standard deviation (n - 1; 0 for one curve) of runs at the token counts all of them logged."""
    common = sorted(set.intersection(*(set(c.tokens) for c in curves)))
    lookups = [dict(zip(c.tokens, c.values)) for c in curves]
    means, stds = [], []
    for tokens in common:
        values = [lookup[tokens] for lookup in lookups]
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return common, means, stds
