"""A study's report: per setting, the mean and sample standard deviation over seeds of the final validation
loss and perplexity, the paired difference to the baseline and the tokens saved to reach its final loss
(compare.py's convergence speedup), and the SimReg statistics; PNGs of the same (a heatmap for a 2-D grid,
as the paper's Fig. 4) and of the curves with a band of one standard deviation over seeds.

Only finished cells enter the numbers; the others are named in the report with their state. The report
names the code its numbers come from; cells of more than one code (kept by --allow-mixed-code) are marked
[a], [b], ... in the tables.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass

from megatron_simreg.compare import comparison_curve, convergence_speedup, plot_seed_bands
from megatron_simreg.metrics import Run, load_run
from megatron_simreg.objective import REPORTED_STATS
from megatron_simreg.provenance import describe

SAVED = "tokens saved"


@dataclass
class SeedResult:
    seed: int
    run: Run
    wall_s: float
    values: dict[str, float | None]  # quantity -> value (None: not reached, or no baseline run of this seed)
    codes: list[dict]  # the code that made the run (provenance.code_identity), more than one if resumed by other


@dataclass
class SettingResult:
    setting: object  # study.Setting
    seeds: list[SeedResult]
    planned: int  # seeds the study asks for

    def values(self, quantity: str) -> list[float]:
        return [r.values[quantity] for r in self.seeds if r.values.get(quantity) is not None]

    def mean(self, quantity: str) -> float:
        values = self.values(quantity)
        return statistics.fmean(values) if values else math.nan

    def std(self, quantity: str) -> float | None:
        values = self.values(quantity)
        return statistics.stdev(values) if len(values) > 1 else None


# (quantity, format, column title)
QUANTITIES = [
    ("final valid loss", ".4f", "final valid loss"),
    ("valid perplexity", ".2f", "valid perplexity"),
    ("loss vs baseline", "+.4f", "Δ loss vs baseline (same seed)"),
    ("loss vs baseline", "paired", "Δ loss: 95% CI, paired t-test p"),
    (SAVED, ".1%", "tokens saved to baseline's final loss"),
    ("simreg", ".3g", "SimReg"),
    ("simreg lsr", ".3g", "mean Lsr"),
    ("simreg live anchors", ".3f", "live anchors"),
    ("simreg negative angle", ".1f", "negative angle (°)"),
]


def collect(study, states) -> list[SettingResult]:
    """Results of the finished cells, per setting in the study's order (the baseline first)."""
    runs = {(s.setting, s.seed): (load_run(s.run_dir), s.wall_s, s.codes) for s in states if s.finished}
    results = []
    for setting in study.settings:
        seeds = []
        for seed in study.seeds:
            if (setting, seed) not in runs:
                continue
            run, wall, codes = runs[(setting, seed)]
            run.name = f"{setting.name}/seed{seed}"
            baseline = runs.get((study.baseline, seed), (None, 0))[0] if study.baseline else None
            seeds.append(SeedResult(seed, run, wall, _quantities(run, baseline), codes))
        results.append(SettingResult(setting, seeds, len(study.seeds)))
    return results


def _quantities(run: Run, baseline: Run | None) -> dict[str, float | None]:
    _, loss = comparison_curve(run)
    final = loss.values[-1]
    values: dict[str, float | None] = {"final valid loss": final, "valid perplexity": math.exp(final)}
    for name in REPORTED_STATS:
        curve = run.curve("valid", name) or run.curve("train", name)
        values[name] = curve.values[-1] if curve is not None and curve.values else None
    if baseline is not None:
        values["loss vs baseline"] = loss.values[-1] - comparison_curve(baseline)[1].values[-1]
        values[SAVED] = convergence_speedup(baseline, run).saved
    else:
        values["loss vs baseline"] = values[SAVED] = None
    return values


def _cell(result: SettingResult, quantity: str, spec: str, has_baseline: bool) -> str:
    values = result.values(quantity)
    if spec == "paired":
        return paired_difference(values)
    if quantity == SAVED and has_baseline:
        paired = sum(1 for r in result.seeds if r.values.get("loss vs baseline") is not None)
        if not values:
            return f"not reached (0/{paired})" if paired else "-"
        note = f", {len(values)}/{paired} reached" if len(values) < paired else ""
    else:
        note = ""
        if not values:
            return "-"
    std = result.std(quantity)
    text = format(result.mean(quantity), spec) + ("" if std is None else f" ± {format(std, spec.lstrip('+'))}")
    return f"{text} ({len(values)}{note})"


def code_marks(results: list[SettingResult]) -> list[dict]:
    """The distinct codes of the finished runs, in order of first appearance: [a] is the first."""
    codes = []
    for r in (r for result in results for r in result.seeds):
        codes += [code for code in r.codes if code not in codes]
    return codes


def _marks(seeds: list[SeedResult], codes: list[dict]) -> str:
    """` [a][b]`: which of the codes made these runs, when there is more than one; else nothing."""
    if len(codes) < 2:
        return ""
    used = [i for i, code in enumerate(codes) if any(code in r.codes for r in seeds)]
    return " " + "".join(f"[{chr(ord('a') + i)}]" for i in used)


def t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer degrees of freedom (Abramowitz & Stegun 26.7.3-4), exact
    without scipy, which this package does not depend on."""
    theta = math.atan(t / math.sqrt(df))
    cos2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    for k in range(2 if df % 2 else 1, df - 1, 2):  # odd df: 2/3 cos², 2·4/(3·5) cos⁴ ...; even: 1/2 cos² ...
        term *= cos2 * k / (k + 1)
        total += term
    if df % 2:
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    return math.sin(theta) * total


def t_quantile(probability: float, df: int) -> float:
    """The t with P(T < t) = probability (> 0.5), by bisection of t_central."""
    low, high = 0.0, 1.0
    while t_central(high, df) < 2 * probability - 1:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_central(middle, df) < 2 * probability - 1 else (low, middle)
    return (low + high) / 2


def paired_difference(differences: list[float]) -> str:
    """The mean paired difference's 95% confidence interval and two-sided paired t-test p; "not resolved" when
    the interval holds zero: these seeds cannot tell the setting from the baseline."""
    if len(differences) < 2 or not any(differences):
        return "-"
    df = len(differences) - 1
    mean, error = statistics.fmean(differences), statistics.stdev(differences) / math.sqrt(len(differences))
    if error == 0:
        return f"{mean:+.4f} on every seed"
    half = t_quantile(0.975, df) * error
    p = 1 - t_central(abs(mean) / error, df)
    text = f"[{mean - half:+.4f}, {mean + half:+.4f}], p = {p:.2g}"
    return text + (", not resolved" if mean - half <= 0 <= mean + half else "")


def results_table(study, results: list[SettingResult]) -> str:
    columns = [q for q in QUANTITIES if study.baseline or q[0] not in ("loss vs baseline", SAVED)]
    codes = code_marks(results)
    lines = ["| setting | overrides | seeds | " + " | ".join(title for _, _, title in columns) + " |",
             "|---" * (len(columns) + 3) + "|"]
    for result in results:
        overrides = ", ".join(f"{k}={v}" for k, v in result.setting.overrides) or "-"
        cells = [_cell(result, q, spec, study.baseline is not None) for q, spec, _ in columns]
        seeds_done = f"{len(result.seeds)}/{result.planned}"
        name = result.setting.name + reconstruction_mark(study, result.setting) + _marks(result.seeds, codes)
        lines.append(f"| {name} | `{overrides}` | {seeds_done} | " + " | ".join(cells) + " |")
    if any(reconstruction_mark(study, r.setting) for r in results):
        lines += ["", RECONSTRUCTION]
    return "\n".join(lines)


RECONSTRUCTION = ("† CReg is this project's reconstruction from the paper's one-line summary and the original's "
                  "abstract (no public code or full text): see docs/baselines.md.")


def reconstruction_mark(study, setting) -> str:
    """"†" for a setting that trains CReg (docs/baselines.md: our reconstruction, not the original's code)."""
    return "†" if {**study.shared, **dict(setting.overrides)}.get("regularizer.name") == "creg" else ""


def seeds_table(study, results: list[SettingResult]) -> str:
    lines = ["| setting | seed | final valid loss | Δ loss vs baseline | tokens saved | SimReg "
             "| negative angle (°) | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    codes = code_marks(results)
    for result in results:
        for r in result.seeds:
            saved = _show(r.values, SAVED, ".1%")
            if r.values.get("loss vs baseline") is not None and r.values.get(SAVED) is None:
                saved = "not reached"
            name = result.setting.name + reconstruction_mark(study, result.setting) + _marks([r], codes)
            lines.append(f"| {name} | {r.seed} | {_show(r.values, 'final valid loss', '.4f')} | "
                         f"{_show(r.values, 'loss vs baseline', '+.4f')} | {saved} | "
                         f"{_show(r.values, 'simreg', '.3g')} | "
                         f"{_show(r.values, 'simreg negative angle', '.1f')} | {r.wall_s / 60:.1f} min |")
    return "\n".join(lines)


def _show(values: dict, key: str, spec: str) -> str:
    return "-" if values.get(key) is None else format(values[key], spec)


def seed_phrase(seed_counts: list[int]) -> str:
    """What a summary plot's error bars are, from each setting's number of seeds."""
    low, high = min(seed_counts), max(seed_counts)
    if high == 1:
        return "one seed each (no error bars)"
    counts = f"{low}" if low == high else f"{low}-{high}"
    return f"mean ± std over {counts} seeds" + (" (a setting of one seed has no bar)" if low == 1 else "")


def plot_summary(study, results: list[SettingResult], path: str) -> str:
    """Final validation loss per setting, mean ± one standard deviation, the baseline's as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.seeds]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(shown) + 2), 4))
    xs = range(len(shown))
    ax.errorbar(xs, [r.mean("final valid loss") for r in shown], yerr=[r.std("final valid loss") or 0 for r in shown],
                fmt="o", capsize=4)
    baseline = next((r for r in shown if r.setting is study.baseline), None)
    if baseline is not None:
        mean, std = baseline.mean("final valid loss"), baseline.std("final valid loss") or 0
        ax.axhline(mean, color="gray", linestyle="--", label=f"baseline {mean:.4f}")
        ax.axhspan(mean - std, mean + std, color="gray", alpha=0.15)
        ax.legend(fontsize="small")
    crowded = len(shown) > 4
    ax.set_xticks(list(xs), [r.setting.name for r in shown], rotation=45 if crowded else 0,
                  ha="right" if crowded else "center", fontsize="small")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"{study.name}: {seed_phrase([len(r.seeds) for r in shown])}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(study, results: list[SettingResult], path: str) -> str | None:
    """For a 2-D grid (Fig. 4 style): mean final validation loss and mean tokens saved over the two keys."""
    keys = [key for key, values in study.grid.items() if len(values) > 1]
    if len(keys) != 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy

    rows, cols = study.grid[keys[0]], study.grid[keys[1]]
    by_point = {(r.setting.value(keys[0]), r.setting.value(keys[1])): r for r in results if r.seeds}
    panels = [("final valid loss", "mean final validation loss", "viridis_r", ".3f")]
    if study.baseline is not None:
        panels.append((SAVED, "mean tokens saved to the baseline's final loss (%)", "RdYlGn", ".0f"))
    figsize = (1.1 * len(cols) * len(panels) + 3, 0.6 * len(rows) + 2.5)
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    for ax, (quantity, title, cmap, spec) in zip(axes[0], panels):
        scale = 100 if quantity == SAVED else 1
        grid = numpy.full((len(rows), len(cols)), numpy.nan)
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                result = by_point.get((row, col))
                if result is not None and result.values(quantity):
                    grid[i, j] = result.mean(quantity) * scale
                elif result is not None and quantity == SAVED:
                    ax.text(j, i, "not\nreached", ha="center", va="center", fontsize="small", color="gray")
        image = ax.imshow(numpy.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
        fig.colorbar(image, ax=ax)
        for i in range(len(rows)):
            for j in range(len(cols)):
                if not numpy.isnan(grid[i, j]):
                    ax.text(j, i, format(grid[i, j], spec), ha="center", va="center", fontsize="small")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_xlabel(keys[1])
        ax.set_ylabel(keys[0])
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


EXPLAINED = (
    "Mean ± sample standard deviation over seeds (n in brackets). Final values are the last validation of each run. "
    "The Δ loss and the tokens saved pair every run with the baseline run of the same seed; tokens saved = 1 - "
    "(tokens the run needed to reach the baseline's final validation loss) / (tokens the baseline used), "
    "interpolated between validations; a run that never reached it counts as not reached and the mean is over "
    "the seeds that did. The 95% confidence interval of the mean Δ loss and the two-sided p are Student's t over "
    "the paired seeds (a paired t-test); 'not resolved' when the interval holds zero. SimReg statistics are the "
    "last validation's."
)
CURVES_EXPLAINED = ("Curves: mean over seeds, band of one standard deviation; training curves smoothed per run "
                    "(exponential moving average, weight 0.9) before averaging.")


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def write_report(study, states, sections: list[str] = (), results: list[SettingResult] | None = None) -> str:
    """`<out>/report.md` with summary.png, curves.png and (2-D grids) heatmap.png beside it; `sections` (markdown
    lines) go before the results (`collect(study, states)`, read here unless given)."""
    os.makedirs(study.out, exist_ok=True)
    results = collect(study, states) if results is None else results
    finished = [s for s in states if s.finished]
    missing = [s for s in states if not s.finished]
    machines = sorted({a["machine"] for s in finished for a in s.record.get("attempts", []) if a.get("machine")})
    walls = [s.wall_s for s in finished if s.wall_s]
    shared = ", ".join(f"{k}={v}" for k, v in study.shared.items()) or "none"
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description, ""]
    lines += [
        f"- Command: `python -m megatron_simreg.study {study.path}`",
        f"- Base config: `{study.config}`; overrides of every cell: `{shared}`",
        f"- Settings: {len(study.settings)}"
        + (f", compared with `{study.baseline.name}` run with the same seed" if study.baseline else ""),
        f"- Seeds (`training.seed`: initialisation and data order): {', '.join(map(str, study.seeds))}",
    ]
    if study.derived:
        lines.append(f"- Settings chosen as {study.derived}")
    lines.append(f"- Cells finished: {len(finished)} of {len(states)}")
    if missing:
        unfinished = ", ".join(f"{s.label} ({s.describe()})" for s in missing)
        lines.append(f"- Not finished (not in the numbers below): {unfinished}")
    if walls:
        lines.append(f"- Wall time: {duration(sum(walls))} over {len(walls)} cells, "
                     f"{duration(statistics.fmean(walls))} per cell on average")
    lines += [f"- Machine: {m}" for m in machines]
    codes = code_marks(results)
    if len(codes) == 1:
        lines.append(f"- Code of every number below: {describe(codes[0])}")
    elif codes:
        lines.append("- Code: MIXED (kept by --allow-mixed-code), each row marked with the code that made it:")
        lines += [f"  - [{chr(ord('a') + i)}] {describe(code)}" for i, code in enumerate(codes)]
    lines += ["", *sections, "## Results", "", EXPLAINED, "", results_table(study, results), ""]
    if any(r.seeds for r in results):
        summary = plot_summary(study, results, os.path.join(study.out, "summary.png"))
        lines += [f"![summary]({os.path.basename(summary)})", ""]
        heatmap = plot_heatmap(study, results, os.path.join(study.out, "heatmap.png"))
        if heatmap:
            lines += [f"![heatmap]({os.path.basename(heatmap)})", ""]
        groups = {r.setting.name: [s.run for s in r.seeds] for r in results if r.seeds}
        curves = plot_seed_bands(groups, os.path.join(study.out, "curves.png"), study.plots, train_smoothing=0.9)
        lines += [CURVES_EXPLAINED, "", f"![curves]({os.path.basename(curves)})", "",
                  "## Per seed", "", seeds_table(study, results), ""]
    path = os.path.join(study.out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
