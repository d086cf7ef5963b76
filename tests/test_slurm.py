"""scripts/slurm/ through a real Slurm (slurmctld, two slurmd, munged: tests/slurm_cluster.py), from a fresh
copy of the repository with no runs/ folder, with GPUS_PER_NODE=0: the tiny LLaMA on the CPU path.

Jobs run two at a time (one per node) to keep the file short. A requeued job waits about two minutes before it
may start again; the tests release it at once (`scontrol update StartTime=now`).
"""

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import pytest
from slurm_cluster import Cluster, missing
from test_training import corpus  # noqa: F401  (a fixture)

TINY = ["model.seq_length=32", "training.micro_batch_size=2", "training.global_batch_size=4",
        "schedule.warmup_steps=2", "adagc.warmup_steps=2", "training.log_interval=1", "training.eval_iters=1",
        "training.save_interval=1000"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the Slurm tests: {why}")
        pytest.skip(why)
    running = Cluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The working tree's files as a fresh clone has them: tracked and new ones, nothing ignored (no runs/)."""
    root = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(os.path.isfile, files):
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        shutil.copy2(name, root / name)
    assert not (root / "runs").exists()
    return root


class Job:
    def __init__(self, cluster, clone, run, iterations, nodes=1, env=None, data=None):
        self.cluster, self.clone, self.run_dir = cluster, clone, clone / "runs" / run
        self.iterations = iterations
        settings = [*TINY, f"data.prefix={data}", f"logging.run_dir=runs/{run}", f"schedule.train_iters={iterations}",
                    f"training.eval_interval={iterations}"]
        environment = {**cluster.env, "GPUS_PER_NODE": "0", "PATH": f"{os.path.dirname(sys.executable)}:"
                       f"{os.environ['PATH']}", **(env or {})}
        submitted = subprocess.run(
            ["scripts/slurm/submit.sh", "tiny-llama", str(nodes), *[word for s in settings for word in ("--set", s)]],
            cwd=clone, env=environment, capture_output=True, text=True)
        assert submitted.returncode == 0, submitted.stderr
        self.id = re.search(r"Submitted batch job (\d+)", submitted.stdout)[1]
        self.started = time.monotonic()

    def info(self) -> dict:
        line = self.cluster.run("scontrol", "show", "job", "--oneliner", self.id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, timeout=600, until=ENDED) -> dict:
        """Poll the job, releasing it from a requeue's hold, until its state is one of `until`."""
        deadline = time.monotonic() + timeout
        held_since = None
        while time.monotonic() < deadline:
            info = self.info()
            if info["JobState"] in until:
                return info
            if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
                held_since = held_since or time.monotonic()
                if time.monotonic() - held_since > 5:  # sooner, Slurm may still revoke the last start's credential
                    self.cluster.run("scontrol", "update", f"JobId={self.id}", "StartTime=now")
            else:
                held_since = None
            time.sleep(0.5)
        raise AssertionError(f"job {self.id} still {self.info()['JobState']} after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        path = self.clone / "runs" / "logs" / f"simreg-tiny-llama-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def metrics(self, split="train") -> dict:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return {}
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == len({(r["split"], r["iteration"]) for r in records}), "an iteration logged twice"
        return {r["iteration"]: r for r in records if r["split"] == split}

    def latest_checkpoint(self) -> int:
        return int((self.run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())

    def assert_finished(self, info):
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, self.log()[-3000:])
        assert sorted(self.metrics()) == list(range(1, self.iterations + 1))
        assert self.latest_checkpoint() == self.iterations


@pytest.fixture(scope="module")
def plain(cluster, clone, corpus):  # noqa: F811
    """`GPUS_PER_NODE=0 submit.sh tiny-llama 1`: one process, started here and waited for by its test."""
    return Job(cluster, clone, "plain", 10, data=corpus)


def test_preempted_with_scancel_saves_requeues_and_resumes_on_two_processes(cluster, clone, corpus, plain):  # noqa: F811
    """`scancel --batch --signal=USR1` (README, preemption) on DP=2: both workers finish the same step and save,
    the job requeues itself and the next start ends the run; `plain` runs beside it on the other node."""
    job = Job(cluster, clone, "preempted", 20, env={"CPU_PROCS_PER_NODE": "2"}, data=corpus)
    deadline = time.monotonic() + 600
    while not job.metrics() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.metrics(), job.log()[-3000:]
    cluster.run("scancel", "--batch", "--signal=USR1", job.id)
    requeued = job.wait(until=("PENDING",) + ENDED)
    saved = job.latest_checkpoint()
    assert requeued["JobState"] == "PENDING" and requeued["Restarts"] == "1", requeued
    assert 1 <= saved < job.iterations
    assert f"received SIGTERM: finished iteration {saved} and saved it" in job.log()
    assert "2 processes" in job.log()
    job.assert_finished(job.wait())


def test_a_fresh_clone_trains_to_the_end(plain):
    plain.assert_finished(plain.wait())
    assert plain.info()["Restarts"] == "0"


def iterations_per_second(job) -> float:
    """The plain run's speed, from its log's step lines (both runs of the next test share its machine)."""
    rates = [float(rate.replace(",", "")) for rate in re.findall(r"\| ([\d,.]+) tokens/s \|", job.log())]
    tokens_per_iteration = 4 * 32
    return statistics.median(rates[1:] or rates) / tokens_per_iteration


def test_time_limit_saves_requeues_and_ends_as_an_uninterrupted_run(cluster, clone, corpus, plain):  # noqa: F811
    """SBATCH_TIMELIMIT=1 on a run longer than a minute: the USR1 before the limit saves and requeues, as often as
    needed, and the run ends exactly as one without a limit (its twin on the other node)."""
    plain.wait()
    # A life trains for at most 59 s (the USR1) less the ~10 s or more that torchrun and the imports take, so 45 s
    # of work at the plain run's speed needs a second life unless this machine gets 3x faster meanwhile. It may get
    # slower (other tests beside these): the waits below leave room for that.
    iterations = math.ceil(45 * iterations_per_second(plain))
    twin = Job(cluster, clone, "unlimited", iterations, data=corpus)
    limited = Job(cluster, clone, "limited", iterations, data=corpus,
                  env={"SBATCH_TIMELIMIT": "1", "SBATCH_SIGNAL": "B:USR1@1"})  # USR1 29-59 s after each start
    twin.assert_finished(twin.wait(timeout=900))
    info = limited.wait(timeout=900)
    limited.assert_finished(info)
    assert int(info["Restarts"]) >= 1 and "train.sbatch: requeueing job" in limited.log()
    a, b = twin.metrics(), limited.metrics()
    assert [a[i]["lm loss"] for i in a] == [b[i]["lm loss"] for i in b]
    assert twin.metrics("valid")[iterations]["lm loss"] == limited.metrics("valid")[iterations]["lm loss"]


def test_two_nodes_meet_at_the_first_node(cluster, clone, corpus):  # noqa: F811
    if len(cluster.nodes) < 2:
        pytest.skip(f"only {cluster.nodes} resolve to this machine: no second slurmd")
    job = Job(cluster, clone, "two-nodes", 6, nodes=2, data=corpus)
    info = job.wait()
    job.assert_finished(info)
    first = cluster.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()[0]
    for rank in (0, 1):
        assert re.search(rf"node {rank} of 2, 1 processes, rendezvous at {first}:\d+", job.log()), job.log()[-3000:]
