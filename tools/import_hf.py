"""Import a Hugging Face Llama / Mistral / Mixtral folder as a checkpoint both training loops start from.

    python tools/import_hf.py --input HF_FOLDER --output runs/imported [--config YAML] [--set key=value ...]
    python -m megatron_simreg.train --config runs/imported/config.yaml --set data.prefix=...

See megatron_simreg/import_hf.py for what is written where.
"""

from megatron_simreg.import_hf import main

if __name__ == "__main__":
    main()
