"""lm-evaluation-harness end to end on the shipped offline task, the paper's tables, and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from distributed import run_distributed
from tiny_checkpoints import save_tiny_checkpoint

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from megatron_simreg.eval_tables import paper_table, score, side_by_side_table  # noqa: E402
from megatron_simreg.evaluate import SHIPPED_TASKS, EvaluationError, load_tasks, main, task_manager  # noqa: E402


def reference_accuracy(folder: str) -> float:
    """Zero-shot multiple choice by hand: the choice with the highest summed log-likelihood after the prompt."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with open(os.path.join(SHIPPED_TASKS, "simreg_mc.jsonl"), encoding="utf-8") as f:
        questions = [json.loads(line) for line in f]
    correct = 0
    for q in questions:
        context = f"Question: {q['question']}\nAnswer:"
        prompt = tokenizer(context).input_ids
        scores = []
        for choice in q["choices"]:
            whole = tokenizer(context + " " + choice).input_ids
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(prompt), len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
    return correct / len(questions)


def test_lm_eval_on_the_offline_task_matches_a_hand_computed_accuracy(tmp_path):
    tokens = torch.zeros(1, 16, dtype=torch.long)
    for seed, name in ((0, "baseline"), (1, "simreg")):
        run_distributed(save_tiny_checkpoint, 1, "tiny-llama", str(tmp_path / name), tokens, "torch", (), seed)
    output = tmp_path / "eval"
    results = main([
        "--checkpoint", str(tmp_path / "baseline" / "checkpoints"), str(tmp_path / "simreg" / "checkpoints"),
        "--tasks", "offline", "--output", str(output), "--batch-size", "4",
    ])
    accuracy = {}
    for name in ("baseline", "simreg"):
        with open(output / name / "results.json") as f:
            written = json.load(f)
        accuracy[name] = written["results"]["simreg_mc"]["acc,none"]
        assert accuracy[name] == results[name]["results"]["simreg_mc"]["acc,none"]
        # a share of 60 questions computed from the same argmaxes: equal up to float formatting
        assert accuracy[name] == pytest.approx(reference_accuracy(str(output / name / "hf")), abs=1e-9)
    report = (output / "results.md").read_text()
    difference = 100 * (accuracy["simreg"] - accuracy["baseline"])
    assert f"| baseline | {100 * accuracy['baseline']:.2f} | {100 * accuracy['baseline']:.2f} |" in report
    assert f"| simreg | {100 * accuracy['simreg']:.2f} ({difference:+.2f}) |" in report
    assert f"| SimReg-MC | acc | {100 * accuracy['baseline']:.2f} ± " in report
    assert report.rstrip().endswith(f"| {difference:+.2f} |")  # the side-by-side average row


def lm_eval_results(**tasks):
    return {"results": {task: metrics for task, metrics in tasks.items()}}


def test_paper_table_takes_the_paper_metrics_and_averages():
    baseline = lm_eval_results(
        hellaswag={"acc,none": 0.30, "acc_norm,none": 0.40, "acc_norm_stderr,none": 0.01},
        squadv2={"exact,none": 20.0, "f1,none": 30.0},
        my_task={"alias": "my_task", "bleu,none": 0.5, "bleu_stderr,none": "N/A"},
    )
    simreg = lm_eval_results(hellaswag={"acc_norm,none": 0.43}, squadv2={"f1,none": 33.0})
    tasks = ["hellaswag", "squadv2", "my_task"]
    assert score(baseline, "hellaswag").value == pytest.approx(40.0)
    assert score(baseline, "squadv2").value == pytest.approx(30.0)  # already in percent
    assert score(baseline, "my_task").value == pytest.approx(50.0) and score(baseline, "my_task").stderr is None
    assert score(simreg, "my_task") is None
    table = paper_table({"baseline": baseline, "simreg": simreg}, tasks)
    assert "| Model | HellaS. | SQuADv2 | my_task | Avg. |" in table
    assert "| baseline | 40.00 | 30.00 | 50.00 | 40.00 |" in table
    assert "| simreg | 43.00 (+3.00) | 33.00 (+3.00) | – | 38.00 (-2.00) |" in table
    side = side_by_side_table({"baseline": baseline, "simreg": simreg}, tasks)
    assert "| HellaS. | acc_norm | 40.00 ± 1.00 | 43.00 | +3.00 |" in side


def test_code_tasks_need_consent_and_missing_checkpoints_are_named(tmp_path):
    manager = task_manager(["simreg_mc"], SHIPPED_TASKS)
    with pytest.raises(EvaluationError, match="--allow-code-execution"):
        load_tasks(manager, ["humaneval"], allow_code_execution=False)
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--checkpoint", str(tmp_path / "nowhere"), "--tasks", "offline", "--output", str(tmp_path)])


def test_unknown_and_unreachable_tasks_are_explained(tmp_path):
    command = [sys.executable, "-m", "megatron_simreg.evaluate",
               "--checkpoint", str(tmp_path), "--output", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    unknown = subprocess.run(command + ["--tasks", "offline,arc_eazy"], env=env, capture_output=True, text=True)
    assert unknown.returncode != 0
    assert "unknown lm-eval task 'arc_eazy'" in unknown.stderr and "arc_easy" in unknown.stderr
    hub = subprocess.run(command + ["--tasks", "sciq"], env=env, capture_output=True, text=True)
    assert hub.returncode != 0
    assert "task 'sciq' needs its data set from the Hugging Face Hub" in hub.stderr
