"""Compare training runs: `python tools/compare_runs.py BASELINE_RUN OTHER_RUN ... [--out DIR]`.

Reads each run's metrics (our metrics.jsonl, or megatron.training's TensorBoard events), writes a PNG of
training/validation loss and the SimReg term against tokens, and prints a Markdown table with the
convergence speedup of every run over the first: the share of tokens saved to reach its final loss.
"""

import argparse
import os

from megatron_simreg.cli import one_line_errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files); the first is the baseline")
    parser.add_argument("--out", default="runs/compare", help="folder for comparison.png and comparison.md")
    parser.add_argument("--metric", default="lm loss")
    parser.add_argument("--seq-length", type=int, help="tokens per sample, for TensorBoard logs without config.yaml")
    args = parser.parse_args(argv)
    with one_line_errors("compare_runs"):
        from megatron_simreg.compare import markdown_report, plot_runs
        from megatron_simreg.metrics import load_run

        runs = [load_run(path, args.seq_length) for path in args.runs]
        report = markdown_report(runs, args.metric)
        os.makedirs(args.out, exist_ok=True)
        png = plot_runs(runs, os.path.join(args.out, "comparison.png"))
        with open(os.path.join(args.out, "comparison.md"), "w", encoding="utf-8") as f:
            f.write(report + "\n![curves](comparison.png)\n")
    print(report)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
