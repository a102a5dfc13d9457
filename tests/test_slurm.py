"""slurm/train.sh on a real Slurm cluster started on this machine (tests/slurm_cluster.py).

The cluster needs root and Debian's Slurm packages (installed with apt-get when
missing); elsewhere these tests skip and say why. Each job trains the tiny model on
CPU (gloo): a single-node job, a two-node job (two slurmd on this host) and a job that
gets the warning signal mid-training, checkpoints, requeues and resumes.

Timings are printed and recorded as test properties (``--junitxml``): submit to start,
whole job, and the time a requeue costs from the signal to the first resumed step.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import slurm_cluster
from tests.conftest import REPO, child_env, read_metrics, tiny_args
from tests.slurm_cluster import SlurmCluster, new_root, unavailable

SCRIPT = REPO / "slurm" / "train.sh"
JOB_TIMEOUT = 240  # seconds; the tiny jobs take well under a minute each
STEP_LINE = re.compile(r" INFO step (\d+)/(\d+) ")
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


@pytest.fixture(scope="session")
def slurm() -> SlurmCluster:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    # A SIGTERM (a CI timeout, `timeout pytest ...`) would end pytest without teardown
    # and leave the daemons running: turn it into an interrupt, which pytest cleans up.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    root = new_root()
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Job:
    """A submitted job, its log, and wall-clock times seen from the test."""

    cluster: SlurmCluster
    id: str
    log: Path
    out: Path
    submitted: float
    seen: dict[str, float] = field(default_factory=dict)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def info(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def wait_for_line(
        self, pattern: str, after: str = "", timeout: float = JOB_TIMEOUT
    ) -> float:
        """Wait until ``pattern`` appears in the log (after the first ``after``, if
        given); returns the test's clock at that moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if after:
                start = text.find(after)
                text = text[start:] if start >= 0 else ""
            if re.search(pattern, text):
                return time.monotonic()
            if self.info()["JobState"] in DONE:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"{pattern!r} never appeared in job {self.id}'s log "
            f"({self.info()['JobState']}):\n{self.text()[-4000:]}"
        )

    def finish(self) -> dict[str, str]:
        try:
            info = self.cluster.wait_job(self.id, timeout=JOB_TIMEOUT, poll=0.2)
        except TimeoutError:
            raise AssertionError(
                f"job {self.id} did not finish:\n{self.text()[-4000:]}"
            ) from None
        self.seen["done"] = time.monotonic()
        return info


def submit(
    cluster: SlurmCluster,
    tmp: Path,
    train_args: list[str],
    *sbatch: str,
    env: dict[str, str] | None = None,
) -> Job:
    """sbatch slurm/train.sh on CPU nodes, training flags as script arguments."""
    log = tmp / "job.out"
    out = tmp / "run"
    job_env = {
        **child_env(),
        "PYTHON": sys.executable,
        "NGPU": "0",
        "OUTPUT_DIR": str(out),
        **(env or {}),
    }
    submitted = time.monotonic()
    job_id = cluster.sbatch(
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10",
        f"--output={log}",
        *sbatch,
        str(SCRIPT),
        *train_args,
        env=job_env,
        cwd=REPO,
    )
    return Job(cluster, job_id, log, out, submitted)


def report(record_property, name: str, seconds: float) -> None:
    record_property(name, round(seconds, 1))
    print(f"{name}: {seconds:.1f} s")


def final_test_metrics(out: Path) -> dict:
    """The last line of the run's metrics.jsonl for the test split."""
    tests = [m for m in read_metrics(out) if m["split"] == "test"]
    assert tests, f"no test line in {out / 'metrics.jsonl'}"
    return tests[-1]


def start_seconds(job: Job) -> float:
    """Submit to the batch script's first line, on the test's clock."""
    return job.wait_for_line(r"\[slurm/train.sh .*\] job \d+ run 1 ") - job.submitted


@pytest.fixture(scope="module")
def single_node_job(slurm, tmp_path_factory, tiny_model_dir, tiny_data_dir):
    tmp = tmp_path_factory.mktemp("slurm_single")
    args = tiny_args(tiny_model_dir, tiny_data_dir, tmp / "unused")
    # The run directory comes from OUTPUT_DIR here: drop the one tiny_args adds.
    i = args.index("--output_dir")
    del args[i : i + 2]
    job = submit(slurm, tmp, args)
    job.seen["started"] = job.submitted + start_seconds(job)
    info = job.finish()
    return job, info


@pytest.mark.slow
@pytest.mark.slurm
def test_single_node_job_trains_to_completion(single_node_job, record_property):
    job, info = single_node_job
    log = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "0"
    assert "world size 1 | device cpu" in log
    assert "training ended with status 0" in log and "requeueing" not in log
    line = final_test_metrics(job.out)
    assert 0.0 <= line["topic/accuracy"] <= 1.0 and line["step"] == 24
    assert list((job.out / "tensorboard").rglob("events.out.tfevents.*")), "no events"
    assert (job.out / "model" / "mtl_model.json").is_file()
    report(
        record_property,
        "single node: submit to start",
        job.seen["started"] - job.submitted,
    )
    report(
        record_property, "single node: submit to end", job.seen["done"] - job.submitted
    )


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_job_has_world_size_two(
    slurm, tmp_path, tiny_model_dir, tiny_data_dir, record_property
):
    # Flags through TRAIN_ARGS this time; the --output_dir there wins over OUTPUT_DIR.
    args = tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "run")
    job = submit(
        slurm,
        tmp_path,
        [],
        "-N",
        "2",
        env={"TRAIN_ARGS": " ".join(args), "OUTPUT_DIR": str(tmp_path / "nope")},
    )
    started = start_seconds(job)
    info = job.finish()
    log = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    assert "2 node(s) x 1 worker(s), rendezvous node1:" in log
    assert "world size 2 | device cpu" in log
    assert "global batch 8 = micro-batch 4 x accumulation 1 x world size 2" in log
    assert final_test_metrics(job.out)["step"] == 24
    assert not (tmp_path / "nope").exists()
    report(record_property, "two nodes: submit to start", started)
    report(
        record_property, "two nodes: submit to end", job.seen["done"] - job.submitted
    )


@pytest.mark.slow
@pytest.mark.slurm
def test_warning_signal_checkpoints_requeues_and_resumes(
    slurm, single_node_job, tmp_path, tiny_model_dir, tiny_data_dir, record_property
):
    reference, _ = single_node_job
    args = tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "run")
    # Steps slowed to 0.4 s so the signal lands mid-training; the numbers do not change.
    job = submit(
        slurm,
        tmp_path,
        args,
        env={"TRAIN_MODULE": "tests.slurm_worker", "MTL_TEST_STEP_SLEEP": "0.4"},
    )

    # The warning signal goes to the batch shell only, as --signal=B:USR1@... does.
    job.wait_for_line(r" INFO step 4/24 ")
    signalled = time.monotonic()
    slurm.cmd("scancel", "--batch", "--signal=USR1", job.id)

    # The job requeues itself. A requeued job may start again only after cred_expire
    # (10 s on this cluster, 120 s by default); release it should that be ignored.
    requeued = job.wait_for_line(r"requeueing job")
    second_run = f"] job {job.id} run 2 "
    release_at = requeued + 20
    while second_run not in job.text():
        info = job.info()
        assert info["JobState"] not in DONE, job.text()[-4000:]
        if info["JobState"] == "PENDING" and time.monotonic() > release_at:
            slurm.cmd("scontrol", "update", f"JobId={job.id}", "StartTime=now+2")
            release_at = float("inf")
        time.sleep(0.1)
    restarted = time.monotonic()
    resumed = job.wait_for_line(STEP_LINE.pattern, after=second_run)
    info = job.finish()

    log = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "1", "SLURM_RESTART_COUNT of the second run must be 1"
    first, second = log.split(f"job {job.id} run 2 ", 1)
    assert "got SIGUSR1" in first and "requeueing job" in first
    assert "run 3 " not in second and "requeueing" not in second
    assert "training ended with status 0" in second
    assert "resumed from" in second, second[-4000:]
    assert (job.out / "checkpoints" / "latest").is_file()
    assert not (job.out / "REQUEUE").exists()
    # The first run stopped mid-training: the resumed run logs only later steps.
    first_steps = [int(m.group(1)) for m in STEP_LINE.finditer(first)]
    second_steps = [int(m.group(1)) for m in STEP_LINE.finditer(second)]
    assert first_steps and max(first_steps) < 24 and second_steps
    assert min(second_steps) > max(first_steps) and max(second_steps) == 24

    # Same result as the uninterrupted job.
    expected, got = final_test_metrics(reference.out), final_test_metrics(job.out)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        else:
            assert got[key] == value, key

    report(
        record_property,
        "requeue: signal to requeue (checkpoint + exit)",
        requeued - signalled,
    )
    report(
        record_property, "requeue: requeue to second run starting", restarted - requeued
    )
    report(
        record_property,
        "requeue: second run start to first resumed step",
        resumed - restarted,
    )
    report(
        record_property, "requeue: signal to first resumed step", resumed - signalled
    )


# ---- why the cluster tests skip: checked without root or Slurm ----------------------


def test_skips_without_root(monkeypatch):
    monkeypatch.setattr(slurm_cluster.sys, "platform", "linux")
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    assert "needs root" in unavailable()


def test_skips_without_slurm_or_apt(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm_cluster.sys, "platform", "linux")
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster, "BINARIES", (str(tmp_path / "slurmd"),))
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)
    reason = unavailable()
    assert "Slurm is not installed" in reason and "apt-get" in reason
