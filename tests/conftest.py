"""Test-session settings shared by every file."""

# The files that take longest, started first: with `make test`'s `--dist loadfile` each worker takes whole files
# in collection order, and a long file started last keeps the suite waiting on it alone.
LONGEST_FIRST = ("test_slurm.py", "test_docker.py", "test_megatron_training.py", "test_baselines.py",
                 "test_megatron_training_layouts.py", "test_study.py", "test_parallel_training.py",
                 "test_batch_layouts.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
