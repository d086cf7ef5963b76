"""megatron-simreg: SimReg embedding-similarity regularization for Megatron-Core pretraining."""

from setuptools import find_packages, setup

setup(
    name="megatron-simreg",
    version="0.1.0",
    description="SimReg (arXiv 2605.08809) and AdaGC for LLaMA/Mixtral pretraining on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_simreg", "megatron_simreg.*"]),
    package_data={"megatron_simreg": ["**/*.yaml", "**/*.jsonl"]},
    python_requires=">=3.12",
    install_requires=[
        "torch==2.14.1",
        "megatron-core==0.19.2",
        "numpy",
        "PyYAML",
        "tqdm",
        "sentencepiece",
        "mistral-common",
        "matplotlib",
        "tensorboard",
        "xxhash",
        "psutil",  # megatron_simreg.launch passes stop signals to the workers; gpu_check kills process trees
    ],
    extras_require={
        "data": ["datasets"],
        "eval": ["transformers", "safetensors", "lm-eval[hf]"],
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "ruff"],
    },
)
