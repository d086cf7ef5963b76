"""How the next-token labels of a corpus are distributed (the paper's Fig. 2a), and what that leaves SimReg
inside a sequence or chunk: `python -m megatron_simreg.token_frequency --data PREFIX --out DIR`.

Read from a Megatron indexed dataset, documents concatenated in file order as GPTDataset reads them (no
shuffling, which changes neither count): the frequency of every label, sorted (the long tail), and how much
of the text the most frequent labels cover. Then the label stream is cut into sequences of `seq_length`
and those into chunks of C tokens, and per chunk size the tool counts, over anchors i: N_i empty (every
label of the chunk is the anchor's: no negative, a SimReg term of zero), P_i = {i} (the label occurs once
in the chunk, the positive is the anchor itself), the mean size of P_i, and the number of label groups.
Writes `token_frequency.md` and `token_frequency.png`; plain numpy, since no library counts these.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import numpy

from megatron_simreg.cli import one_line_errors
from megatron_simreg.data import check_indexed_dataset, dataset_prefixes

DEFAULT_CHUNKS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def read_labels(data_prefix, max_tokens: int, tokenizer) -> numpy.ndarray:
    """The first `max_tokens` tokens of the dataset (all of its shards or blended parts, in order), as int64;
    each part checked as training checks it (files there and whole, ids within the tokenizer's vocabulary)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    pieces, left = [], max_tokens
    for prefix in dataset_prefixes(data_prefix)[0]:
        check_indexed_dataset(prefix, tokenizer)
        dataset = IndexedDataset(prefix, mmap=True)
        count = min(int(dataset.sequence_lengths.sum()), left)
        pieces.append(numpy.asarray(dataset.bin_reader.read(dataset.index.dtype, count, 0), dtype=numpy.int64))
        left -= count
        if left <= 0:
            break
    return numpy.concatenate(pieces)


@dataclass
class ChunkStats:
    chunk_size: int
    anchors: int
    empty_negatives: int  # anchors with N_i empty
    self_only: float  # share of anchors with P_i = {i}
    mean_positives: float  # mean |P_i|, the anchor included
    groups_per_chunk: float  # distinct labels per chunk


def chunk_stats(labels: numpy.ndarray, seq_length: int, chunk_size: int) -> ChunkStats:
    """Positive and negative sets of every anchor when pairs are restricted to chunks of `chunk_size` tokens."""
    if seq_length % chunk_size:
        raise ValueError(f"chunk size {chunk_size} does not divide the sequence length {seq_length}")
    sequences = len(labels) // seq_length
    chunks = labels[: sequences * seq_length].reshape(-1, chunk_size)
    # the label's count inside its own chunk, for every anchor: one sort of (chunk, label) keys
    keys = chunks + numpy.arange(len(chunks), dtype=numpy.int64)[:, None] * (int(labels.max()) + 1)
    _, inverse, counts = numpy.unique(keys.ravel(), return_inverse=True, return_counts=True)
    positives = counts[inverse]
    groups = len(counts) / len(chunks)
    return ChunkStats(chunk_size, positives.size, int(numpy.sum(positives == chunk_size)),
                      float(numpy.mean(positives == 1)), float(positives.mean()), groups)


def frequency_table(counts: numpy.ndarray, tokenizer=None, top: int = 10) -> list[str]:
    """The long tail in numbers: vocabulary used, coverage of the most frequent labels, the rare ones."""
    total = counts.sum()
    order = numpy.argsort(-counts, kind="stable")
    ranked = counts[order]
    seen = int((counts > 0).sum())
    lines = ["| quantity | value |", "|---|---|",
             f"| labels (tokens) | {total:,} |",
             f"| distinct labels seen | {seen:,} of {len(counts):,} ({seen / len(counts):.1%}) |"]
    for k in (10, 100, 1000):
        lines.append(f"| share of labels that are the {k} most frequent | {ranked[:k].sum() / total:.1%} |")
    for threshold in (10, 100):
        rare = (counts > 0) & (counts < threshold)
        lines.append(f"| labels seen fewer than {threshold} times | "
                     f"{int(rare.sum()):,} ({rare.sum() / seen:.1%} of those seen), "
                     f"{counts[rare].sum() / total:.2%} of the text |")
    lines.append(f"| most / median frequency of a seen label | {ranked[0]:,} / {int(numpy.median(ranked[:seen])):,} |")
    if tokenizer is not None:
        shown = ", ".join(f"`{tokenizer.detokenize([int(t)])!r}` {counts[t] / total:.1%}" for t in order[:top])
        lines.append(f"| the {top} most frequent | {shown} |")
    return lines


def plot(counts: numpy.ndarray, stats: list[ChunkStats], seq_length: int, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = numpy.sort(counts[counts > 0])[::-1]
    share = ranked / ranked.sum()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ranks = numpy.arange(1, len(ranked) + 1)
    axes[0].loglog(ranks, share)
    axes[0].set(title="label frequency by rank (the long tail)", xlabel="rank", ylabel="share of labels")
    axes[1].semilogx(ranks, numpy.cumsum(share))
    axes[1].set(title="share of the text covered by the top-k labels", xlabel="k", ylabel="cumulative share")
    sizes = [s.chunk_size for s in stats]
    axes[2].semilogx(sizes, [100 * s.self_only for s in stats], "o-", label="P_i = {i} (label once in the chunk)")
    axes[2].semilogx(sizes, [100 * s.empty_negatives / s.anchors for s in stats], "s-",
                     label="N_i empty (one label in the chunk)")
    axes[2].set(title=f"anchors per chunk size (sequences of {seq_length})", xlabel="chunk size C (tokens)",
                ylabel="share of anchors (%)")
    axes[2].set_xticks(sizes, [str(s) for s in sizes])
    axes[2].legend(fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="indexed dataset prefix(es), as data.prefix")
    parser.add_argument("--out", required=True, help="folder for token_frequency.md and token_frequency.png")
    parser.add_argument("--seq-length", type=int, default=2048, help="tokens per sequence (the paper's 2048)")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=None,
                        help=f"chunk sizes dividing the sequence length (default: those of {DEFAULT_CHUNKS} that do)")
    parser.add_argument("--max-tokens", type=int, default=100_000_000, help="read at most this many tokens")
    parser.add_argument("--tokenizer", default=None, help="to show the most frequent labels (default: the project's)")
    args = parser.parse_args(argv)
    with one_line_errors("token_frequency"):
        write_report(args)


def write_report(args) -> None:
    """token_frequency.md and its PNG for the parsed command line."""
    from megatron_simreg.data import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer)
    tokens = read_labels(args.data, args.max_tokens, tokenizer)
    if len(tokens) < args.seq_length + 1:
        raise SystemExit(f"token_frequency: {len(tokens)} tokens, fewer than one sequence of {args.seq_length} + 1")
    labels = tokens[1:]  # next-token labels
    counts = numpy.bincount(labels, minlength=tokenizer.vocab_size)
    sizes = args.chunk_sizes or [c for c in DEFAULT_CHUNKS if c <= args.seq_length and args.seq_length % c == 0]
    stats = [chunk_stats(labels, args.seq_length, size) for size in sizes]
    os.makedirs(args.out, exist_ok=True)
    png = plot(counts, stats, args.seq_length, os.path.join(args.out, "token_frequency.png"))
    command = (f"python -m megatron_simreg.token_frequency --data {' '.join(args.data)} --seq-length {args.seq_length} "
               f"--out {args.out}")
    lines = [
        "# Token frequency and SimReg's positive/negative sets", "",
        (f"Data: {', '.join(args.data)} ({len(labels):,} next-token labels); sequences of {args.seq_length} tokens; "
         f"command: `{command}`."), "",
        "## The long tail", "", *frequency_table(counts, tokenizer), "",
        "## Anchors per chunk size", "",
        (f"Chunk size {args.seq_length} is full SimReg. Shares are over all anchors (every label is an anchor: the "
         "datasets mask no loss)."), "",
        "| chunk size | anchors | N_i empty | P_i = {i} only | mean size of P_i | label groups per chunk |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {s.chunk_size} | {s.anchors:,} | {s.empty_negatives:,} ({s.empty_negatives / s.anchors:.4%}) "
              f"| {s.self_only:.1%} | {s.mean_positives:.2f} | {s.groups_per_chunk:.1f} |" for s in stats]
    lines += ["", f"![token frequency]({os.path.basename(png)})", ""]
    report = os.path.join(args.out, "token_frequency.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"written: {report}, {png}")


if __name__ == "__main__":
    main()
