"""Tokenize text into a Megatron indexed dataset (PREFIX.bin, PREFIX.idx, PREFIX.stats.json).

    # C4 (English), streamed from the Hugging Face hub, LLaMA-2 tokenizer, 8 workers, 10 GB shards:
    python tools/prepare_data.py --input hf:allenai/c4 --tokenizer /path/to/llama2/tokenizer.model \\
        --output-prefix data/c4/c4-en_text_document --workers 8 --shard-tokens 5000000000
    # local C4-format shards or text files, the default tokenizer:
    python tools/prepare_data.py --input 'c4/en/c4-train.*.json.gz' --output-prefix data/c4/c4-en_text_document
    # the offline Gutenberg corpus the demo uses:
    python tools/prepare_data.py --offline-corpus data/demo --output-prefix data/demo/gutenberg_text_document
"""

import argparse
import sys

from megatron_simreg.data import prepare_corpus, write_offline_corpus


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="files, folders, globs, or hf:NAME (e.g. hf:allenai/c4)")
    source.add_argument("--offline-corpus", metavar="DIR", help="write the offline Gutenberg corpus to DIR and use it")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer", help="SentencePiece .model file or Hugging Face folder (default: LLaMA-style 32k)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-documents", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--shard-tokens", type=int, help="start a new PREFIX-NNNNN shard every this many tokens")
    parser.add_argument("--dtype", choices=["uint16", "int32", "int64"], help="token type (default: smallest that fits)")
    args = parser.parse_args(argv)
    sources = args.input or [write_offline_corpus(args.offline_corpus)]
    try:
        stats = prepare_corpus(
            sources, args.output_prefix, args.tokenizer, args.workers, args.max_documents, args.max_tokens,
            args.shard_tokens, args.dtype,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"prepare_data: {error}")
    print(
        f"{stats.documents:,} documents, {stats.tokens:,} tokens ({stats.skipped_lines} lines skipped) "
        f"in {stats.seconds:.1f}s -> {', '.join(stats.prefixes)}"
    )


if __name__ == "__main__":
    main()
