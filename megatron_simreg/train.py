"""One entry point: `python -m megatron_simreg.train --config configs/<model>.yaml [--set key=value ...]`.

Under torchrun on GPUs it runs Megatron-LM's own loop (`megatron.training.pretrain`) with our model
provider, forward step, loss and datasets; without CUDA it runs the local loop (same pieces) on CPU,
single- or multi-process over gloo.
"""

import argparse
import sys

import torch

from megatron_simreg.config import ConfigError, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file from configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set simreg.weight=0 (repeatable)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as error:
        sys.exit(f"config error: {error}")
    if torch.cuda.is_available():
        from megatron_simreg.megatron_entry import pretrain

        pretrain(cfg)
        return
    from megatron_simreg.local_loop import TrainingError, train

    try:
        train(cfg)
    except (ConfigError, TrainingError, FileNotFoundError, ValueError) as error:
        sys.exit(f"training stopped: {error}")


if __name__ == "__main__":
    main()
