"""megatron.training on two CPU ranks (`megatron_training_on_cpu.py`): tensor parallelism with sequence
parallelism, and data parallelism in bf16 with the distributed optimizer, each against the local loop on the
same layout; AdaGC's state saved at TP=2 + SP resumes on one rank and on two data-parallel ranks.

A file of its own so that `make test`'s workers run these beside test_megatron_training.py's one-rank runs.
"""

import pytest
from test_megatron_training import (
    SAME_ARITHMETIC_REL,
    VALID_LINE,
    WEIGHTS_REL,
    adagc_state,
    exported_weights,
    local_losses,
    local_training,
    megatron_losses,
    megatron_training,
)
from test_training import corpus, read_metrics  # noqa: F401  (corpus is a fixture)

TWO_RANK_LAYOUTS = {  # TP: SimReg gathers the sequence shards, AdaGC reduces norms over the tensor group
    "TP=2 + SP": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    # DP: the paper's precision and optimizer, AdaGC on distributed-optimizer shards
    "DP=2, bf16, distributed optimizer": ["training.precision=bf16", "parallel.distributed_optimizer=true"],
}


def train_on_two_ranks(layout, corpus, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("two_ranks")
    settings = [f"data.prefix={corpus}", "schedule.train_iters=4", *TWO_RANK_LAYOUTS[layout]]
    log = megatron_training(folder / "megatron", *settings, processes=2)
    return folder, settings, log


@pytest.fixture(scope="module")
def tensor_parallel_run(corpus, tmp_path_factory):  # noqa: F811
    return train_on_two_ranks("TP=2 + SP", corpus, tmp_path_factory)


@pytest.fixture(scope="module", params=list(TWO_RANK_LAYOUTS))
def two_rank_run(request, corpus, tmp_path_factory):  # noqa: F811
    if request.param == "TP=2 + SP":
        return request.getfixturevalue("tensor_parallel_run")
    return train_on_two_ranks(request.param, corpus, tmp_path_factory)


def test_megatron_loop_on_two_ranks_matches_the_local_loop(two_rank_run):
    """Megatron saves a sharded torch_dist checkpoint; the exporter merges it into the local loop's weights."""
    folder, settings, log = two_rank_run
    local_training(folder / "local", *settings, processes=2)
    train, expected = megatron_losses(log), local_losses(folder / "local")
    assert sorted(train) == sorted(expected) == [1, 2, 3, 4]
    for iteration in train:
        assert train[iteration] == pytest.approx(expected[iteration], rel=SAME_ARITHMETIC_REL), iteration
    (iteration, valid), = VALID_LINE.findall(log)  # each rank its share of the same fixed validation sample
    local_valid = read_metrics(folder / "local", "valid")[int(iteration)]["lm loss"]
    assert float(valid) == pytest.approx(local_valid, rel=SAME_ARITHMETIC_REL)
    megatron = exported_weights(folder / "megatron", folder / "from_megatron")
    local = exported_weights(folder / "local", folder / "from_local")
    for name in local:
        assert (megatron[name] - local[name]).abs().max() <= WEIGHTS_REL * local[name].abs().max(), name


@pytest.mark.parametrize("processes", [1, 2], ids=["TP=1", "DP=2"])
def test_adagc_state_lives_in_the_checkpoint_and_resumes_on_another_layout(tensor_parallel_run, processes, tmp_path):
    """Saved at TP=2 + SP inside Megatron's checkpoint, keyed by parameter name, and resumed on one rank or on two
    data-parallel ranks with the same threshold for every tensor (the resumed run's first save holds them)."""
    folder, settings, _ = tensor_parallel_run
    saved = adagc_state(folder / "megatron" / "checkpoints", 4)
    assert saved["step"] == 4 and any(".linear_qkv." in name for name in saved["gamma"])
    settings = [s for s in settings if not s.startswith("parallel.")]  # one tensor rank: TP=1, or DP=2 on two
    megatron_training(tmp_path / "resumed", *settings, f"checkpoint.load={folder / 'megatron' / 'checkpoints'}",
                      f"checkpoint.save={tmp_path / 'resumed' / 'checkpoints'}", processes=processes)
    resumed = adagc_state(tmp_path / "resumed" / "checkpoints", 4)
    assert resumed["step"] == 4 and resumed["gamma"] == saved["gamma"]
