"""Data pipeline throughput: `python -m megatron_simreg.bench.data`.

Tokenizes the offline corpus (C4-format gzipped JSON lines) into an indexed dataset with each number of
workers, and encodes the same texts with SentencePiece directly (one process, one thread, texts already
in memory, no output) as the floor. Prints tokens/s, tokens/s per worker, and the overhead per worker:
raw SentencePiece tokens/s over the pipeline's tokens/s per worker (1.00x = no overhead). Each figure is
the best of `--repeats` runs, the usual defence against other work on a shared machine.
"""

import argparse
import gzip
import json
import os
import tempfile
import time

import sentencepiece

from megatron_simreg.data import default_tokenizer_path, prepare_corpus, write_offline_corpus


def raw_sentencepiece_rate(texts: list[str]) -> float:
    processor = sentencepiece.SentencePieceProcessor(model_file=default_tokenizer_path())
    start = time.perf_counter()
    tokens = sum(len(ids) + 1 for ids in processor.encode(texts, num_threads=1))  # + EOD, as the pipeline writes
    return tokens / (time.perf_counter() - start)


def pipeline_rate(corpus: str, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        stats = prepare_corpus([corpus], os.path.join(out, "bench"), workers=workers, progress=False)
    return stats.tokens / stats.seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-dir", default=os.path.join("data", "demo"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    corpus = write_offline_corpus(args.corpus_dir)
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    raw = max(raw_sentencepiece_rate(texts) for _ in range(args.repeats))
    rates = {workers: max(pipeline_rate(corpus, workers) for _ in range(args.repeats)) for workers in args.workers}
    print(f"# {len(texts):,} documents, {sum(map(len, texts)):,} characters, {os.cpu_count()} CPU cores, "
          f"best of {args.repeats}")
    print("| path | tokens/s | tokens/s per worker | overhead per worker vs raw SentencePiece |")
    print("|---|---|---|---|")
    print(f"| raw SentencePiece encode (1 process, in memory) | {raw:,.0f} | {raw:,.0f} | 1.00x |")
    for workers, rate in rates.items():
        print(f"| prepare_corpus, {workers} worker(s) (read gzip + JSON, encode, write .bin/.idx) | {rate:,.0f} "
              f"| {rate / workers:,.0f} | {raw / (rate / workers):.2f}x |")


if __name__ == "__main__":
    main()
