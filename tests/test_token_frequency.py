"""Token-frequency analysis: per-chunk positive/negative sets against a brute-force count, and the CLI."""

import subprocess
import sys

import numpy
import pytest
from test_training import corpus  # noqa: F401  (a fixture)

from megatron_simreg.token_frequency import chunk_stats


def test_chunk_stats_match_a_brute_force_count():
    labels = numpy.random.default_rng(0).integers(0, 3, size=4 * 16 + 5)  # 3 labels: some chunks hold one only
    labels[:8] = 1  # a chunk of 8 equal labels: every anchor has an empty N_i
    for chunk in (2, 4, 8, 16):
        stats = chunk_stats(labels, 16, chunk)
        used = labels[: 4 * 16].reshape(-1, chunk)
        positives = [(row == row[i]).sum() for row in used for i in range(chunk)]
        assert stats.anchors == 64
        assert stats.empty_negatives == sum(p == chunk for p in positives)
        assert stats.self_only == pytest.approx(numpy.mean([p == 1 for p in positives]))
        assert stats.mean_positives == pytest.approx(numpy.mean(positives))
        assert stats.groups_per_chunk == pytest.approx(numpy.mean([len(set(row)) for row in used]))
    assert chunk_stats(labels, 16, 8).empty_negatives >= 8
    with pytest.raises(ValueError, match="does not divide"):
        chunk_stats(labels, 16, 5)


def test_cli_writes_table_and_plot(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "freq"
    result = subprocess.run([sys.executable, "-m", "megatron_simreg.token_frequency", "--data", corpus,
                             "--seq-length", "64", "--out", str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (out / "token_frequency.md").read_text()
    assert "| 64 |" in table and "| 8 |" in table and "distinct labels seen" in table
    assert (out / "token_frequency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
