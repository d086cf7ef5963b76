"""Export a checkpoint of our training loop to a Hugging Face folder (LlamaForCausalLM / MixtralForCausalLM).

    python tools/export_hf.py --checkpoint runs/tiny-llama/checkpoints --output runs/tiny-llama/hf
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('runs/tiny-llama/hf')"
"""

import argparse

from megatron_simreg.cli import one_line_errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the run's checkpoint folder (holding iter_NNNNNNN/)")
    parser.add_argument("--output", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--config", help="the run's config.yaml (default: beside the checkpoint folder)")
    parser.add_argument("--iteration", type=int, help="default: the latest")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    args = parser.parse_args(argv)
    with one_line_errors("export_hf"):
        from megatron_simreg.export_hf import export

        print(export(args.checkpoint, args.output, args.config, args.iteration, overwrite=args.overwrite))


if __name__ == "__main__":
    main()
