"""Zero-shot lm-evaluation-harness on our checkpoints, reported as the paper's tables.

    python -m megatron_simreg.evaluate --checkpoint runs/baseline/checkpoints runs/simreg/checkpoints \\
        --tasks general --output runs/eval

Each checkpoint (ours or megatron.training's, or an already exported Hugging Face folder) is exported
with `export_hf`, then scored by lm-eval's `hf` model. `--tasks` takes the paper's groups (`general`,
`domain`), our offline task (`simreg_mc`, group `offline`), and any lm-eval task name, comma-separated.
Written: lm-eval's JSON per checkpoint, and `results.md` with the paper's columns and average, plus a
side-by-side table with differences to the first checkpoint when several are given.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os

import yaml

from megatron_simreg.cli import one_line_errors
from megatron_simreg.eval_tables import paper_table, side_by_side_table

TASK_GROUPS = {
    "general": ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "mmlu", "winogrande", "sciq"],
    "domain": ["gsm8k", "drop", "race", "squadv2", "nq_open", "humaneval", "mbpp"],
    "offline": ["simreg_mc"],
}
CODE_TASKS = ("humaneval", "mbpp")  # their metric runs the model's code
SHIPPED_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_tasks")


class EvaluationError(Exception):
    """Bad input for an evaluation, with the fix in its message."""


def requested_tasks(spec: str) -> list[str]:
    """Task names from a comma-separated list of names and group names, in order, without repeats."""
    names: list[str] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        for name in TASK_GROUPS.get(item, [item]):
            if name not in names:
                names.append(name)
    if not names:
        raise EvaluationError(
            f"no task in --tasks {spec!r}: give task names or one of the groups {sorted(TASK_GROUPS)}"
        )
    return names


def write_offline_tasks(folder: str) -> str:
    """Copy the shipped task YAMLs into `folder` with their local data files made absolute (lm-eval reads
    `data_files` relative to the working directory)."""
    os.makedirs(folder, exist_ok=True)
    for file in sorted(os.listdir(SHIPPED_TASKS)):
        if not file.endswith(".yaml"):
            continue
        with open(os.path.join(SHIPPED_TASKS, file), encoding="utf-8") as f:
            task = yaml.safe_load(f)
        files = task["dataset_kwargs"]["data_files"]
        task["dataset_kwargs"]["data_files"] = {
            split: os.path.join(SHIPPED_TASKS, path) for split, path in files.items()
        }
        with open(os.path.join(folder, file), "w", encoding="utf-8") as f:
            yaml.safe_dump(task, f, sort_keys=False)
    return folder


def task_manager(tasks: list[str], offline_folder: str):
    """lm-eval's task index with our offline tasks; indexing lm-eval's ~15k built-in tasks takes ~20 s, so
    it is skipped when only our tasks are asked for."""
    from lm_eval.tasks import TaskManager

    ours = set(TASK_GROUPS["offline"])
    manager = TaskManager(include_path=offline_folder, include_defaults=not set(tasks) <= ours)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        hints = "; ".join(
            f"{name!r}: nearest {difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6) or 'none'}"
            for name in unknown
        )
        raise EvaluationError(
            f"unknown lm-eval task {hints}. Use lm-eval task names (`lm-eval ls tasks` lists them) "
            f"or the groups {sorted(TASK_GROUPS)}"
        )
    return manager


def load_tasks(manager, tasks: list[str], allow_code_execution: bool) -> list:
    """lm-eval Task/Group objects, one name at a time so a data set that cannot be had names its task."""
    code = [name for name in tasks if name in CODE_TASKS]
    if code and not allow_code_execution:
        raise EvaluationError(
            f"{code} execute the code the model writes: pass --allow-code-execution to run them (in a sandbox)"
        )
    loaded = []
    for name in tasks:
        try:
            result = manager.load([name])
        except ConnectionError as error:
            raise EvaluationError(
                f"task {name!r} needs its data set from the Hugging Face Hub, which could not be reached ({error}). "
                "Run it once with internet access to fill the datasets cache (HF_HOME), then offline with "
                "HF_DATASETS_OFFLINE=1; or evaluate on the shipped offline task: --tasks offline"
            ) from error
        loaded.append(result["groups"].get(name) or result["tasks"].get(name) or list(result["tasks"].values()))
    return [item for entry in loaded for item in (entry if isinstance(entry, list) else [entry])]


def hugging_face_folder(checkpoint: str, folder: str, config: str | None) -> str:
    """The checkpoint itself when it is already a Hugging Face folder, else its export into `folder`."""
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        return checkpoint
    from megatron_simreg.checkpoint import Choice
    from megatron_simreg.export_hf import export

    # evaluate scores a run's latest iteration; another one is exported first and evaluated as a Hugging Face folder
    another = Choice("--iteration {}", "export it with tools/export_hf.py --iteration {} and evaluate its folder")
    return export(checkpoint, folder, config, overwrite=True, choice=another)  # our folder from an earlier evaluation


def run_name(checkpoint: str) -> str:
    """`runs/simreg/checkpoints` -> `simreg`: the run's folder names the row."""
    path = os.path.normpath(os.path.abspath(checkpoint))
    return os.path.basename(os.path.dirname(path) if os.path.basename(path) in ("checkpoints", "hf") else path)


def evaluate(folder: str, tasks: list, args) -> dict:
    """lm-eval's results for one Hugging Face folder."""
    import torch
    from lm_eval import simple_evaluate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return simple_evaluate(
        model="hf", model_args={"pretrained": folder, "dtype": dtype}, tasks=tasks, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, device=device, limit=args.limit, log_samples=False,
        confirm_run_unsafe_code=args.allow_code_execution, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed,
    )


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="checkpoint folders (ours, megatron.training's) or Hugging Face folders; "
                             "the first is the baseline")
    parser.add_argument("--names", nargs="+", help="row names (default: each run's folder name)")
    parser.add_argument("--config", nargs="+", help="each run's config.yaml (default: beside its checkpoint folder)")
    parser.add_argument("--tasks", default="general",
                        help=f"comma-separated task names and groups {sorted(TASK_GROUPS)}")
    parser.add_argument("--output", default=os.path.join("runs", "eval"))
    parser.add_argument("--num-fewshot", type=int, default=0, help="the paper evaluates zero-shot")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction when below 1), for quick checks")
    parser.add_argument("--batch-size", default="8", help="a number or 'auto'")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--allow-code-execution", action="store_true", help="needed by humaneval and mbpp")
    args = parser.parse_args(argv)
    args.limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    with one_line_errors("evaluate"):
        return run(args)


def run(args) -> dict[str, dict]:
    names = args.names or [run_name(path) for path in args.checkpoint]
    configs = args.config or [None] * len(args.checkpoint)
    if len(names) != len(args.checkpoint) or len(configs) != len(args.checkpoint) or len(set(names)) != len(names):
        raise EvaluationError(f"--names {names} and --config must give one distinct entry per --checkpoint")
    for path in args.checkpoint:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    task_names = requested_tasks(args.tasks)
    manager = task_manager(task_names, write_offline_tasks(os.path.join(args.output, "tasks")))
    tasks = load_tasks(manager, task_names, args.allow_code_execution)
    results = {}
    for name, checkpoint, config in zip(names, args.checkpoint, configs):
        folder = hugging_face_folder(checkpoint, os.path.join(args.output, name, "hf"), config)
        print(f"== {name}: {folder}")
        results[name] = evaluate(folder, tasks, args)
        os.makedirs(os.path.join(args.output, name), exist_ok=True)
        with open(os.path.join(args.output, name, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results[name], f, indent=2, default=str)
    report = paper_table(results, task_names)
    if len(results) > 1:
        report += "\n\n" + side_by_side_table(results, task_names)
    with open(os.path.join(args.output, "results.md"), "w", encoding="utf-8") as f:
        f.write(report + "\n")
    print("\n" + report + f"\n\nwritten: {os.path.join(args.output, 'results.md')}")
    return results


if __name__ == "__main__":
    main()
