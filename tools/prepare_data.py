"""Tokenize text into a Megatron indexed dataset (PREFIX.bin, PREFIX.idx, PREFIX.stats.json).

    # C4 (English), streamed from the Hugging Face hub (pip install datasets), LLaMA-2 tokenizer,
    # 8 workers, shards of 5B tokens (10 GB each in uint16):
    python tools/prepare_data.py --input hf:allenai/c4 --tokenizer /path/to/llama2/tokenizer.model \\
        --output-prefix data/c4/c4-en_text_document --workers 8 --shard-tokens 5000000000
    # local C4-format shards or text files, the default tokenizer:
    python tools/prepare_data.py --input 'c4/en/c4-train.*.json.gz' --output-prefix data/c4/c4-en_text_document
    # the offline Gutenberg corpus the demo uses:
    python tools/prepare_data.py --offline-corpus data/demo --output-prefix data/demo/gutenberg_text_document
    # validation and test sets of >= 70k tokens each, documents drawn from anywhere in it (data/held_out.py):
    python tools/prepare_data.py --held-out-from data/demo/gutenberg_text_document --held-out-tokens 70000 \\
        --output-prefix data/demo/held-out/gutenberg      # writes ..._train, ..._valid, ..._test

Nothing appears under PREFIX until the run is complete; Ctrl-C or SIGTERM (a Slurm time limit) removes
what was written so far.
"""

import argparse
import os

from megatron_simreg.cli import one_line_errors


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", nargs="+", help="files, folders, globs, or hf:NAME (default: hf:allenai/c4)")
    source.add_argument("--offline-corpus", metavar="DIR", help="write the offline Gutenberg corpus to DIR and use it")
    source.add_argument("--held-out-from", metavar="PREFIX",
                        help="tokenize nothing: draw --held-out-tokens from this existing dataset")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    parser.add_argument("--tokenizer",
                        help="SentencePiece .model file or Hugging Face folder (default: LLaMA-style 32k)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--max-documents", type=int)
    parser.add_argument("--max-tokens", type=int, help="stop after the document that reaches this many tokens")
    parser.add_argument("--shard-tokens", type=int, help="write PREFIX-00000, PREFIX-00001, ... of this many tokens")
    parser.add_argument("--dtype", choices=["uint16", "int32", "int64"],
                        help="token type (default: smallest that fits)")
    parser.add_argument("--text-field", default="text", help="JSON field holding the document (C4: text)")
    parser.add_argument("--hf-config", default="en", help="Hugging Face dataset config (C4: en)")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at --output-prefix")
    parser.add_argument("--held-out-tokens", type=int, metavar="N",
                        help="also write PREFIX_train, PREFIX_valid, PREFIX_test: validation and test sets of at least "
                             "N tokens each, whole documents drawn at random (seeded) from anywhere in the data, the "
                             "rest for training (data.prefix, data.valid_prefix, data.test_prefix)")
    parser.add_argument("--held-out-seed", type=int, default=1234, help="seed of the held-out documents' draw")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("prepare_data"):
        if args.held_out_from and args.held_out_tokens is None:
            raise ValueError("--held-out-from needs --held-out-tokens N: the tokens of each held-out set")
        if not args.held_out_from:
            _prepare(args)
        if args.held_out_tokens is not None:
            from megatron_simreg.data.held_out import hold_out

            prefixes = hold_out(args.held_out_from or args.output_prefix, args.output_prefix, args.held_out_tokens,
                                args.held_out_seed, args.overwrite)
            print(f"held out (seed {args.held_out_seed}): {', '.join(prefixes.values())} (.bin/.idx/.stats.json)")


def _prepare(args) -> None:
    try:
        from megatron_simreg.data import prepare_corpus, write_offline_corpus
        from megatron_simreg.data.sources import DEFAULT_HF_DATASET

        sources = [write_offline_corpus(args.offline_corpus)] if args.offline_corpus else args.input
        sources = sources or [DEFAULT_HF_DATASET]
        stats = prepare_corpus(
            sources, args.output_prefix, tokenizer=args.tokenizer, workers=args.workers,
            max_documents=args.max_documents, max_tokens=args.max_tokens, shard_tokens=args.shard_tokens,
            dtype=args.dtype, text_field=args.text_field, hf_config=args.hf_config, hf_split=args.hf_split,
            overwrite=args.overwrite, progress=not args.quiet,
        )
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: prepare_corpus removed its partial files
        stop.args = (f"interrupted; nothing was written under {args.output_prefix} (partial files removed)",)
        raise
    folder = os.path.dirname(args.output_prefix)
    print(
        f"{stats.documents:,} documents, {stats.tokens:,} tokens, {stats.bytes:,} bytes "
        f"({stats.skipped_lines:,} lines skipped) in {stats.seconds:.1f}s "
        f"({stats.tokens / max(stats.seconds, 1e-9):,.0f} tokens/s) -> "
        f"{', '.join(os.path.join(folder, shard) for shard in stats.shards)} (.bin/.idx), "
        f"{args.output_prefix}.stats.json"
    )


if __name__ == "__main__":
    main()
