"""The benchmarks run end to end and print one ratio row per variant (their figures are in docs/performance.md)."""

import os
import re

import pytest
import torch

from megatron_simreg.bench import checksum as bench_checksum
from megatron_simreg.bench import simreg as bench_simreg
from megatron_simreg.bench import step as bench_step
from megatron_simreg.simreg import simreg_loss


def _rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows of `text` by their variant column, header and rule left out."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[1].strip() if len(cells) == 6 else cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def test_simreg_bench_prints_every_ratio_and_goal(capsys):
    bench_simreg.main(["--shapes", "1,64,32", "--chunk", "32", "--block", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {"attention", "full", "chunk-32"}
    assert rows["attention"][3] == "1.00x"
    for name in ("full", "chunk-32"):
        assert re.fullmatch(r"\d+\.\d\dx", rows[name][3]) and float(rows[name][2]) > 0
    assert len(re.findall(r"goal <= 0\.\d+x: (?:met|NOT met)", out)) == 2


def test_step_bench_times_each_variant_with_the_clock_asked_for():
    calls = []

    def clock():
        calls.append(None)
        return float(len(calls))  # every step "takes" one tick

    variants = {"no SimReg": ["simreg.enabled=false"], "full SimReg": ["simreg.mode=full"]}
    seconds = bench_step.measure("configs/tiny-llama.yaml", ["model.seq_length=32", "training.global_batch_size=2",
                                                             "training.micro_batch_size=2"],
                                 variants, steps=2, memory=False, clock=clock)
    assert seconds == {"no SimReg": [1.0, 1.0], "full SimReg": [1.0, 1.0]} and len(calls) == 2 * 2 * 2


def test_step_bench_ratio_quartiles_pair_each_round():
    """A machine twice as slow in round 2 moves both variants alike: every paired ratio is the true 1.1."""
    low, middle, high = bench_step.paired_ratio_quartiles([1.1, 2.2, 1.1, 2.2], [1.0, 2.0, 1.0, 2.0])
    assert low == pytest.approx(1.1) and middle == pytest.approx(1.1) and high == pytest.approx(1.1)
    assert bench_step.paired_ratio_quartiles([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == pytest.approx((1.0, 2.0, 3.0))


def test_simreg_bench_embeddings_are_the_regimes_they_are_named_after():
    """random: every anchor saturated (gradient weight ~1e-40); anisotropic: every anchor live."""
    live = {}
    for embeddings in bench_simreg.EMBEDDINGS:
        (hidden, labels), _ = bench_simreg.make_inputs("full", (1, 256, 1024), torch.float32, "cpu", 64,
                                                      embeddings=embeddings)
        live[embeddings] = float(simreg_loss(hidden.detach(), labels, sequence_first=True).live_fraction)
    assert live == {"random": 0.0, "anisotropic": 1.0}


def test_checksum_bench_prints_each_rate_against_the_save(capsys):
    bench_checksum.main(["--megabytes", "1", "--repeats", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row[0].split(" (")[0].strip() for row in rows[1:]] == ["torch.save", "xxh3-64", "zlib CRC32"]
    assert rows[1][2].strip() == "1.00x" and all(float(row[1]) > 0 for row in rows[1:])


def test_step_bench_baselines_are_the_settings_their_rows_name():
    """`--baselines` rows name the regularizer and the option they time ("SimCSE (views: forward)" must be what
    the config gives, the default when the overrides leave it out)."""
    from megatron_simreg.config import load_config

    for row, overrides in bench_step.BASELINES.items():
        regularizer = load_config("configs/tiny-llama.yaml", overrides).regularizer
        assert regularizer.name == row.split(" ")[0].lower(), row
        option = re.search(r"\((\w+): (\w+)\)", row)
        assert option is None or getattr(regularizer.settings, option[1]) == option[2], row


def test_import_memory_bench_reads_a_childs_peak_anonymous_and_resident_memory():
    """A child that holds 200 MB of written bytes for a moment: both peaks see them, the baseline interpreter not."""
    import sys

    from megatron_simreg.bench import import_memory

    idle = import_memory.peaks([sys.executable, "-c", "pass"], import_memory.HERE)
    held = import_memory.peaks([sys.executable, "-c", "import time; b = bytearray(200_000_000); time.sleep(0.2)"],
                               import_memory.HERE)
    for name in ("RssAnon", "VmHWM"):
        assert held[name] - idle[name] == pytest.approx(200e6, rel=0.1), name


def test_import_memory_bench_writes_a_sharded_llama_the_importer_reads(tmp_path):
    """The model the bench imports: its size is the shards' tensors, in several shards the importer accepts."""
    from megatron_simreg.bench import import_memory
    from megatron_simreg.import_hf import read_folder

    size = import_memory.write_model(str(tmp_path), hidden=64, layers=2, shard_mb=2)
    shards = [name for name in os.listdir(tmp_path) if name.endswith(".safetensors")]
    hf = read_folder(str(tmp_path))
    assert len(shards) > 1 and len(set(hf.files.values())) == len(shards)
    assert hf.config.dtype == torch.bfloat16 and hf.config.num_hidden_layers == 2
    assert size == sum(os.path.getsize(tmp_path / name) for name in shards) - sum(
        8 + int.from_bytes((tmp_path / name).read_bytes()[:8], "little") for name in shards)  # less each header
