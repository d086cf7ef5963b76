"""Data pipeline throughput: `python -m megatron_simreg.bench.data`.

Tokenizes the offline corpus (C4-format gzipped JSON lines) into an indexed dataset with 1 and 2
workers, and encodes the same texts with SentencePiece directly (one process, no I/O) as the floor.
Prints tokens/s, tokens/s per worker, and the pipeline's overhead per worker against raw encoding.
"""

import argparse
import gzip
import json
import os
import tempfile
import time

import sentencepiece

from megatron_simreg.data import default_tokenizer_path, prepare_corpus, write_offline_corpus


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-dir", default=os.path.join("data", "demo"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    corpus = write_offline_corpus(args.corpus_dir)
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    processor = sentencepiece.SentencePieceProcessor(model_file=default_tokenizer_path())
    start = time.perf_counter()
    raw_tokens = sum(len(ids) + 1 for ids in processor.encode(texts, num_threads=1))  # + EOD, as the pipeline writes
    raw_rate = raw_tokens / (time.perf_counter() - start)
    print(f"# {len(texts):,} documents, {raw_tokens:,} tokens, {os.cpu_count()} CPU cores")
    print("| path | tokens/s | tokens/s per worker | overhead per worker vs raw SentencePiece |")
    print("|---|---|---|---|")
    print(f"| raw SentencePiece encode (1 process, in memory) | {raw_rate:,.0f} | {raw_rate:,.0f} | 1.00x |")
    with tempfile.TemporaryDirectory() as out:
        for workers in args.workers:
            stats = prepare_corpus([corpus], os.path.join(out, f"w{workers}"), workers=workers, progress=False)
            rate = stats.tokens / stats.seconds
            print(f"| prepare_data, {workers} worker(s) (read gzip + JSON, encode, write .bin/.idx) | {rate:,.0f} "
                  f"| {rate / workers:,.0f} | {raw_rate / (rate / workers):.2f}x |")


if __name__ == "__main__":
    main()
