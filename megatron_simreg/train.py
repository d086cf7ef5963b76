"""One entry point: `python -m megatron_simreg.train --config configs/<model>.yaml [--set key=value ...]`.

Under torchrun on GPUs it runs Megatron-LM's own loop (`megatron.training.pretrain`) with our model
provider, forward step, loss and datasets; without CUDA it runs the local loop (same pieces) on CPU,
single- or multi-process over gloo.
"""

import argparse
import contextlib
import logging
import os
import sys
import warnings

import torch

from megatron_simreg.config import ConfigError, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file from configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set simreg.weight=0 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the layout, print sizes, memory per GPU, FLOPs and the exact arguments; "
                             "train nothing")
    parser.add_argument("--world-size", type=int, default=None, help="GPUs for --dry-run (default: WORLD_SIZE or 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="for --dry-run")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as error:
        sys.exit(f"config error: {error}")
    if args.dry_run:
        from megatron_simreg.checkpoint import CheckpointError
        from megatron_simreg.dry_run import report

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        try:
            print(report(cfg, world, args.gpus_per_node))
        except (ValueError, CheckpointError) as error:  # CheckpointError: the run it would resume (run_plan.py)
            sys.exit(f"dry run: {error}")
        return
    with _quiet_megatron_imports():
        if torch.cuda.is_available():
            from megatron_simreg.megatron_entry import pretrain as run
        else:
            from megatron_simreg.local_loop import train as run
    from megatron_simreg.checkpoint import CheckpointError
    from megatron_simreg.failures import Interrupted, TrainingError
    from megatron_simreg.megatron_adagc import AdaGCStateMissing

    try:
        run(cfg)
    except Interrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"training stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except (ConfigError, TrainingError, CheckpointError, AdaGCStateMissing, FileNotFoundError, ValueError) as error:
        sys.exit(f"training stopped: {error}")


@contextlib.contextmanager
def _quiet_megatron_imports():
    """Import megatron-core without its start-up warnings about missing Transformer Engine and apex; say once,
    in our words, which implementation runs instead."""
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU
    level = cpp_extension.level
    cpp_extension.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed")
            from megatron_simreg.model import have_transformer_engine

            yield
    finally:
        cpp_extension.setLevel(level)
    if not torch.cuda.is_available():
        print("megatron-simreg: no GPU here, so the local training loop runs on CPU with megatron-core's local layers "
              "(no Transformer Engine or apex); on GPUs the same command runs megatron.training.", file=sys.stderr)
    elif not have_transformer_engine():
        print("megatron-simreg: Transformer Engine is not installed, so megatron.training runs megatron-core's local "
              "layers without TE's fusions (the NGC PyTorch image has TE).", file=sys.stderr)


if __name__ == "__main__":
    main()
