"""Compare runs as the paper does: loss curves against tokens, and the convergence speedup.

Convergence speedup of a run over the baseline: the tokens it needs to reach the baseline's final loss,
as a share of the tokens the baseline used; `saved = 1 - candidate_tokens / baseline_tokens`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_simreg.metrics import Curve, Run, seed_band, smoothed, tokens_to_reach
from megatron_simreg.regularizers import REGISTRY

PLOTTED = (("train", "lm loss"), ("valid", "lm loss"), ("train", "simreg"))
LINE_STYLES = ("-", "--", ":", "-.")
BASELINE_TERMS = tuple(name for name in REGISTRY if name != "simreg")  # each baseline logs its value by name


@dataclass
class Speedup:
    candidate: str
    target_loss: float  # the baseline's final loss
    baseline_tokens: float
    candidate_tokens: float | None  # None: never reached the target

    @property
    def saved(self) -> float | None:
        if self.candidate_tokens is None:
            return None
        return 1.0 - self.candidate_tokens / self.baseline_tokens


def comparison_curve(run: Run, metric: str = "lm loss", train_smoothing: float = 0.9) -> tuple[str, Curve]:
    """Validation loss when the run logged one; else the training loss, smoothed."""
    valid = run.curve("valid", metric)
    if valid is not None and valid.values:
        return "validation", valid
    train = run.curve("train", metric)
    if train is None or not train.values:
        raise ValueError(f"run {run.name!r} logged no {metric!r}: nothing to compare")
    return "training (smoothed)", smoothed(train, train_smoothing)


def convergence_speedup(baseline: Run, candidate: Run, metric: str = "lm loss") -> Speedup:
    _, base = comparison_curve(baseline, metric)
    _, other = comparison_curve(candidate, metric)
    target = base.values[-1]
    return Speedup(candidate.name, target, base.tokens[-1], tokens_to_reach(other, target))


def markdown_report(runs: list[Run], metric: str = "lm loss") -> str:
    """A table of final values per run and, against the first run, the convergence speedup."""
    baseline = runs[0]
    kind, _ = comparison_curve(baseline, metric)
    lines = [
        f"Baseline: `{baseline.name}`; compared on {kind} `{metric}`.",
        "",
        "| run | final train loss | final valid loss | final SimReg | final baseline term | tokens "
        "| tokens to baseline's final loss | saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        speedup = convergence_speedup(baseline, run, metric)
        reached = "not reached" if speedup.candidate_tokens is None else f"{speedup.candidate_tokens:,.0f}"
        saved = "-" if speedup.saved is None else f"{100 * speedup.saved:.1f}%"
        _, curve = comparison_curve(run, metric)
        lines.append(
            f"| {run.name} | {_final(run, 'train', metric)} | {_final(run, 'valid', metric)} "
            f"| {_final(run, 'train', 'simreg', '.3g')} | {_baseline_term(run)} | {curve.tokens[-1]:,.0f} "
            f"| {reached} | {saved} |"
        )
    return "\n".join(lines) + "\n"


def _baseline_term(run: Run) -> str:
    """The final value of the Table 1 baseline the run trained with (SimCSE, CPretrain, CReg, SCE), if any."""
    for name in BASELINE_TERMS:
        if run.curve("train", name) is not None:
            return f"{name} {_final(run, 'train', name, '.3g')}"
    return "-"


def _final(run: Run, split: str, metric: str, spec: str = ".4f") -> str:
    curve = run.curve(split, metric)
    return "-" if curve is None or not curve.values else format(curve.values[-1], spec)


def zoomed_range(curves: list[Curve], skip: float = 0.2) -> tuple[float, float]:
    """An axis range for loss curves: their values after the first `skip` of the tokens, padded by 5%. The first
    fall (from ~10 to ~6 in a few steps) would otherwise set the axis and flatten the gaps of a few hundredths
    that a comparison is about; the start is cut off the plot, not hidden in it (the range says where)."""
    end = max(c.tokens[-1] for c in curves)
    late = [v for c in curves for t, v in zip(c.tokens, c.values) if t >= skip * end]
    low, high = min(late), max(late)
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - pad, high + pad


def plot_runs(runs: list[Run], path: str) -> str:
    """One PNG: training loss, validation loss and the SimReg term against tokens, a line per run."""
    return plot_seed_bands({run.name: [run] for run in runs}, path)


def plot_seed_bands(groups: dict[str, list[Run]], path: str, panels=PLOTTED, train_smoothing: float = 0.0) -> str:
    """One PNG, a panel per (split, metric): for each group of runs (seeds of one setting) the mean against
    tokens and a band of one standard deviation; a group of one run is its plain curve. The legend stands beside
    the panels, not over the lines; up to 20 groups get their own colour (then line styles tell them apart); loss
    axes span the curves after their first fall (`zoomed_range`).

    Training curves are first smoothed per run with `train_smoothing` (TensorBoard's EMA weight).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for ax, (split, metric) in zip(axes[0], panels):
        shown = []
        for index, (name, runs) in enumerate(groups.items()):
            curves = [run.curve(split, metric) for run in runs]
            curves = [c for c in curves if c is not None and c.values]
            if not curves:
                continue
            if split == "train":
                curves = [smoothed(c, train_smoothing) for c in curves]
            tokens, mean, std = seed_band(curves)
            color, style = colors(index % 20), LINE_STYLES[index // 20 % len(LINE_STYLES)]
            ax.plot(tokens, mean, style, color=color,
                    label=name if len(runs) == 1 else f"{name} ({len(runs)} seeds)")
            lower, upper = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            if len(curves) > 1:
                ax.fill_between(tokens, lower, upper, color=color, alpha=0.2, linewidth=0)
            shown += [Curve(tokens, lower), Curve(tokens, upper)]
        ax.set_title(f"{'validation' if split == 'valid' else 'training'} {metric}")
        ax.set_xlabel("tokens")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        if metric == "simreg":
            ax.set_yscale("log")
        elif shown:
            ax.set_ylim(*zoomed_range(shown))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend beside the panels included
    plt.close(fig)
    return path
