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

from megatron_simreg.cli import one_line_errors


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
    with one_line_errors("training stopped"):  # from here on: Ctrl-C while torch and megatron-core load included
        from megatron_simreg.config import load_config

        with one_line_errors("config error"):
            cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from megatron_simreg.dry_run import report

            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            with one_line_errors("dry run"):
                print(report(cfg, world, args.gpus_per_node))
            return
        with _quiet_megatron_imports() as cuda:
            if cuda:
                from megatron_simreg.megatron_entry import pretrain as run
            else:
                from megatron_simreg.local_loop import train as run
        with one_line_errors("config error"):
            _check_this_node_runs(cfg)
        run(cfg)


def _check_this_node_runs(cfg) -> None:
    """What the config asks of this node's software, before either loop starts."""
    from megatron_simreg.config import ConfigError
    from megatron_simreg.model import have_transformer_engine

    if cfg.parallel.context > 1 and not have_transformer_engine():
        raise ConfigError(f"parallel.context={cfg.parallel.context} needs Transformer Engine's attention on GPUs "
                          "(megatron-core's local attention splits no sequence): set parallel.context=1 here, or "
                          "run where Transformer Engine is installed (the NGC PyTorch image)")


@contextlib.contextmanager
def _quiet_megatron_imports():
    """Import megatron-core without its start-up warnings about missing Transformer Engine and apex; say once,
    in our words, which implementation runs instead."""
    import torch

    cpp_extension = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU
    level = cpp_extension.level
    cpp_extension.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed")
            from megatron_simreg.model import have_transformer_engine

            yield torch.cuda.is_available()
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
