"""Choosing apart from reporting (a study's `select:` and `report:`): each method's best setting is chosen by
its mean selection metric (final validation loss) over the selection seeds, then reported on fresh seeds by a
metric the choice never saw (the test set's loss, scored once at the end of training).

This module does the choosing and the report's two tables; study.py runs the cells of both phases.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

from megatron_simreg.metrics import Run
from megatron_simreg.study_report import SettingResult, paired_difference


@dataclass
class Choice:
    method: str
    setting: object  # study.Setting
    mean: float  # of the selection metric over the selection seeds
    seeds: int


def final_value(run: Run, metric: str) -> float | None:
    """The last logged value of `split/metric` (e.g. valid/lm loss); None when the run logged none."""
    split, _, name = metric.partition("/")
    curve = run.curve(split, name)
    return curve.values[-1] if curve is not None and curve.values else None


def mean_final(result: SettingResult, metric: str) -> float:
    values = [final_value(r.run, metric) for r in result.seeds]
    return statistics.fmean(values) if values and None not in values else math.nan


def choose(methods: dict[str, list], results: list[SettingResult], metric: str) -> list[Choice]:
    """Each method's setting of lowest mean `metric` over its seeds (the results of the selection cells only)."""
    by_setting = {result.setting: result for result in results}
    choices = []
    for method, settings in methods.items():
        scored = [(mean_final(by_setting[s], metric), s) for s in settings if by_setting[s].seeds]
        scored = [(mean, s) for mean, s in scored if not math.isnan(mean)]
        if not scored:
            raise ValueError(f"method {method}: no finished selection cell logged {metric}")
        mean, best = min(scored, key=lambda item: item[0])
        choices.append(Choice(method, best, mean, len(by_setting[best].seeds)))
    return choices


def selection_table(methods: dict[str, list], results: list[SettingResult], metric: str,
                    choices: list[Choice]) -> str:
    """Every selection setting's final `metric` per seed and mean; each method's choice in bold."""
    chosen = {choice.setting for choice in choices}
    seeds = sorted({r.seed for result in results for r in result.seeds})
    by_setting = {result.setting: result for result in results}
    lines = [f"| method | setting | {' | '.join(f'seed {seed}' for seed in seeds)} | mean |",
             "|---" * (len(seeds) + 3) + "|"]
    for method, settings in methods.items():
        for setting in settings:
            values = {r.seed: final_value(r.run, metric) for r in by_setting[setting].seeds}
            shown = [_number(values.get(seed), ".4f") for seed in seeds]
            mean = _number(mean_final(by_setting[setting], metric), ".4f")
            name = f"**{setting.name}** (chosen)" if setting in chosen else setting.name
            lines.append(f"| {method} | {name} | {' | '.join(shown)} | {mean} |")
    return "\n".join(lines)


def report_table(results: list[SettingResult], baseline, metric: str, methods: dict[str, object]) -> str:
    """Per reported setting: the final `metric`'s mean ± sd over the fresh seeds, and its paired difference to the
    baseline run of the same seed with the 95% confidence interval and the paired t-test's p."""
    base = next((result for result in results if result.setting is baseline), None)
    base_values = {r.seed: final_value(r.run, metric) for r in base.seeds} if base else {}
    lines = [f"| method | setting | seeds | final {metric} | Δ vs baseline (same seed) | Δ: 95% CI, paired t-test p |",
             "|---|---|---|---|---|---|"]
    for result in results:
        values = {r.seed: final_value(r.run, metric) for r in result.seeds}
        values = {seed: value for seed, value in values.items() if value is not None}
        differences = [value - base_values[seed] for seed, value in values.items()
                       if base_values.get(seed) is not None]
        is_baseline = result.setting is baseline
        lines.append(
            f"| {'baseline' if is_baseline else methods.get(result.setting, '-')} | {result.setting.name} | "
            f"{len(values)}/{result.planned} | {_spread(list(values.values()), '.4f')} | "
            f"{'-' if is_baseline else _spread(differences, '+.4f')} | "
            f"{'-' if is_baseline else paired_difference(differences)} |"
        )
    return "\n".join(lines)


def protocol_sections(study, selected: list[SettingResult], reported, results: list[SettingResult],
                      choices: list[Choice]) -> list[str]:
    """The report's Selection and Report sections (markdown lines): what was chosen on what (`selected`: the
    selection's results), and how it fared (`results`: the report's)."""
    protocol = study.protocol
    selection, seeds = protocol.select_metric, ", ".join(map(str, study.seeds))
    return [
        "## Selection", "",
        f"Each method's settings ran on the selection seeds {seeds}; the setting of lowest mean final {selection} "
        "(in bold) is the method's choice. These runs enter no number below.", "",
        selection_table(protocol.methods, selected, selection, choices), "",
        "## Report", "",
        f"The choices and the baseline on fresh seeds {', '.join(map(str, reported.seeds))}, scored by the final "
        f"{protocol.report_metric}, which the selection never saw. Mean ± sample standard deviation over seeds (n in "
        "brackets); Δ pairs each run with the baseline run of the same seed; the 95% confidence interval of the mean "
        "Δ and the two-sided p are Student's t over the pairs; 'not resolved' when the interval holds zero. The "
        "Results below are the same cells on the validation set, for reference.", "",
        report_table(results, reported.baseline, protocol.report_metric,
                     protocol.method_of()), "",
    ]


def write_selection(path: str, choices: list[Choice], metric: str) -> None:
    """The choice as data (`<out>/selection.json`), beside the report that shows it."""
    record = {"metric": metric, "chosen": {c.method: {"setting": c.setting.name, "overrides": dict(c.setting.overrides),
                                                      "mean": c.mean, "seeds": c.seeds} for c in choices}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def _spread(values: list[float], spec: str) -> str:
    if not values:
        return "-"
    text = format(statistics.fmean(values), spec)
    if len(values) > 1:
        text += f" ± {format(statistics.stdev(values), spec.lstrip('+'))}"
    return f"{text} ({len(values)})"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)
