"""The paper's evaluation tables from lm-eval results: one row per model, and tasks side by side.

Scores are in percent. The metric per task follows common zero-shot practice for the paper's tasks
(length-normalised accuracy where answers differ in length); other tasks use their first reported metric.
"""

from __future__ import annotations

from dataclasses import dataclass

# task: (column title, lm-eval result key, factor to percent), in the paper's column order
PAPER_COLUMNS = {
    "arc_easy": ("Arc-E", "acc,none", 100),
    "arc_challenge": ("Arc-C", "acc_norm,none", 100),
    "boolq": ("BoolQ", "acc,none", 100),
    "hellaswag": ("HellaS.", "acc_norm,none", 100),
    "openbookqa": ("Obqa", "acc_norm,none", 100),
    "piqa": ("Piqa", "acc_norm,none", 100),
    "mmlu": ("Mmlu", "acc,none", 100),
    "winogrande": ("WinoG.", "acc,none", 100),
    "sciq": ("Sciq", "acc,none", 100),
    "gsm8k": ("GSM8K", "exact_match,strict-match", 100),
    "drop": ("DROP", "f1,none", 100),
    "race": ("RACE", "acc,none", 100),
    "squadv2": ("SQuADv2", "f1,none", 1),  # lm-eval's SQuAD v2 metric is already in percent
    "nq_open": ("NQ-Open", "exact_match,remove_whitespace", 100),
    "humaneval": ("HumanEval", "pass_at_k,create_test", 100),
    "mbpp": ("MBPP", "pass_at_1,none", 100),
    "simreg_mc": ("SimReg-MC", "acc,none", 100),
}


@dataclass
class Score:
    value: float  # percent
    stderr: float | None  # percent
    metric: str


def score(results: dict, task: str) -> Score | None:
    """The task's score in one lm-eval result (None when lm-eval did not report the task)."""
    reported = results["results"].get(task)
    if not reported:
        return None
    _, key, factor = PAPER_COLUMNS.get(task, (task, None, 100))
    if key not in reported:  # another task, or another lm-eval version's naming: its first metric
        key = next(
            (k for k, v in reported.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))), None
        )
        if key is None:
            return None
    name, _, filter_name = key.partition(",")
    stderr = reported.get(f"{name}_stderr,{filter_name}")
    return Score(reported[key] * factor, stderr * factor if isinstance(stderr, (int, float)) else None, name)


def column_title(task: str) -> str:
    return PAPER_COLUMNS.get(task, (task,))[0]


def paper_table(results: dict[str, dict], tasks: list[str]) -> str:
    """Rows of models, columns of tasks and their average, as the paper prints them: each row after the
    first shows its difference to the first (the baseline)."""
    scores = {name: [score(result, task) for task in tasks] for name, result in results.items()}
    averages = {name: _average(row) for name, row in scores.items()}
    baseline = next(iter(results))
    lines = [
        "| Model | " + " | ".join(column_title(task) for task in tasks) + " | Avg. |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for name, row in scores.items():
        cells = [_with_difference(s, b, name != baseline) for s, b in zip(row, scores[baseline])]
        cells.append(_with_difference(averages[name], averages[baseline], name != baseline))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    metrics = ", ".join(f"{column_title(t)} {s.metric}" for t, s in zip(tasks, scores[baseline]) if s)
    return "\n".join(lines) + f"\n\nZero-shot scores in %. Metrics: {metrics}. Avg. is over the tasks shown."


def side_by_side_table(results: dict[str, dict], tasks: list[str]) -> str:
    """Tasks as rows, models as columns (score ± standard error), and each model's difference to the first."""
    names = list(results)
    baseline = names[0]
    header = ["Task", "Metric", *names, *(f"{name} − {baseline}" for name in names[1:])]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for task in tasks + ["Avg."]:
        if task == "Avg.":
            row = {name: _average([score(results[name], t) for t in tasks]) for name in names}
        else:
            row = {name: score(results[name], task) for name in names}
        metric = next((s.metric for s in row.values() if s), "–") if task != "Avg." else ""
        cells = [_with_stderr(row[name]) for name in names]
        cells += [_difference(row[name], row[baseline]) for name in names[1:]]
        title = column_title(task) if task != "Avg." else "**Avg.**"
        lines.append(f"| {title} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _average(row: list[Score | None]) -> Score | None:
    values = [s.value for s in row if s]
    return Score(sum(values) / len(values), None, "mean") if values else None


def _with_difference(s: Score | None, base: Score | None, show: bool) -> str:
    if s is None:
        return "–"
    return f"{s.value:.2f}" + (f" ({s.value - base.value:+.2f})" if show and base else "")


def _with_stderr(s: Score | None) -> str:
    if s is None:
        return "–"
    return f"{s.value:.2f}" + (f" ± {s.stderr:.2f}" if s.stderr is not None else "")


def _difference(s: Score | None, base: Score | None) -> str:
    return f"{s.value - base.value:+.2f}" if s and base else "–"
