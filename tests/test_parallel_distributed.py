"""Data parallelism on the CPU with gloo: torchrun jobs of 2 processes, against one process doing the same work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtengine.parallel.distributed import DistributedConfig, World, init_world, wrap_student
from dtengine.runtime.checkpoint import load_checkpoint
from dtengine.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "distributed_run.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def launch(
    ranks: int, *argv: str, timeout: int = 240, runner_flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`tests/distributed_run.py` under torchrun with `ranks` processes (or plain python for 1), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, str(RUNNER), *runner_flags, *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   str(RUNNER), *runner_flags, *argv]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def student_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir)["student"]


def assert_same_training(a: dict, b: dict) -> None:
    """The two students trained alike: within float noise on average, allowing that Adam, which divides each
    gradient by its running RMS, turns last-bit differences of near-zero gradients into lr-sized steps for a few
    elements (3 steps at lr 4e-3: at most ~1e-2 apart). Measured: 6e-9 mean for 2 ranks vs 1, 1e-6 for
    compiled (aot_eager) vs eager DDP."""
    assert a.keys() == b.keys()
    differences = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert differences.mean() < 1e-5, float(differences.mean())  # ranks that did not share work: ~1e-3
    assert (differences > 1e-4).float().mean() < 1e-2 and differences.max() < 1e-2


@pytest.fixture
def base(tiny_run_overrides):
    # Synthetic images are keyed by global sample index: 2 ranks x 2 see exactly the images of 1 rank x 4.
    return [o for o in tiny_run_overrides if not o.startswith(("data.batch_size", "train.steps"))] + [
        "data.loader=synthetic", "train.steps=3", "checkpoint.every=3", "train.tensorboard=false",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_whole_batch(base, tmp_path):
    """2 ranks x batch 2 vs 1 rank x batch 4, 3 steps: the same parameters (BatchNorm on its running statistics:
    with batch statistics each rank normalises by its own half, which is what DDP without SyncBatchNorm does)."""
    frozen = ("--freeze-batchnorm",)
    two = launch(2, *base, "data.batch_size=2", f"out_dir={tmp_path / 'two'}", runner_flags=frozen)
    assert two.returncode == 0, two.stderr[-3000:]
    one = launch(1, *base, "data.batch_size=4", f"out_dir={tmp_path / 'one'}", runner_flags=frozen)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "global batch 4" in two.stdout and "global batch 4" in one.stdout
    assert_same_training(student_state(tmp_path / "two"), student_state(tmp_path / "one"))


@pytest.mark.slow
def test_compiled_ddp_matches_eager_ddp(base, tmp_path):
    frozen = ("--freeze-batchnorm",)
    common = [*base, "data.batch_size=2", "compile.enabled=true", "compile.student=true"]
    eager = launch(2, *common, "compile.enabled=false", f"out_dir={tmp_path / 'eager'}", runner_flags=frozen)
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = launch(2, *common, "compile.backend=aot_eager", f"out_dir={tmp_path / 'compiled'}", runner_flags=frozen)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "DDP over 2 ranks (compiled student inside)" in compiled.stdout
    assert_same_training(student_state(tmp_path / "eager"), student_state(tmp_path / "compiled"))


@pytest.mark.slow
def test_resume_across_world_sizes(base, tmp_path):
    """2 -> 1 and 1 -> 2 ranks: the run continues, keeps its global batch, and says what changed."""
    first = launch(2, *base, "data.batch_size=2", "train.steps=2", "checkpoint.every=1", f"out_dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    longer = ("--resume", "--allow-change", "train.steps")  # each resume goes on for 2 more steps
    down = launch(1, *base, "data.batch_size=2", "train.steps=4", f"out_dir={tmp_path / 'a'}", *longer)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "world size 2 -> 1" in down.stdout and "x 2 accumulated x 1 rank(s) = global batch 4" in down.stdout
    assert load_checkpoint(tmp_path / "a")["step"] == 4
    up = launch(2, *base, "data.batch_size=2", "train.steps=6", f"out_dir={tmp_path / 'a'}", *longer)
    assert up.returncode == 0, up.stderr[-3000:]
    assert "world size 1 -> 2" in up.stdout and load_checkpoint(tmp_path / "a")["step"] == 6


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_quickly(base, tmp_path):
    started = time.monotonic()
    job = launch(2, *base, "data.batch_size=2", f"out_dir={tmp_path / 'f'}", runner_flags=("--fail-on-rank", "1"))
    assert job.returncode != 0 and time.monotonic() - started < 120
    assert "rank 1 failed on purpose at step 1" in job.stdout + job.stderr


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(base, tmp_path):
    run = tmp_path / "stopped"
    args = [*base, "data.batch_size=2", "train.steps=6", f"out_dir={run}"]
    job = launch(2, *args, runner_flags=("--sigterm-on-rank", "1"))
    assert job.returncode != 0  # torchrun reports the ranks' 143 as a failure: the job is not finished
    assert "stopped by SIGTERM after step 2 of 6" in job.stderr
    assert "exitcode  : 143" in job.stderr and "exitcode  : 1\n" not in job.stderr  # no rank crashed or hung
    assert load_checkpoint(run)["step"] == 2
    resumed = launch(2, "--resume", f"out_dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 6


@pytest.mark.slow
def test_torchrun_runs_the_demo_config(tmp_path):
    """The command of the docs, on the demo config: exit 0, one run directory, rank 0 alone speaks."""
    out = tmp_path / "demo"
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dtengine",
         "distill", "--config", "configs/demo.yaml", "train.steps=6", f"out_dir={out}", "train.progress=false"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("run directory:") == 1 and job.stdout.count("world: 2 rank(s)") == 1
    assert "terminate called" not in job.stderr
    assert (out / "backbone.safetensors").is_file() and [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert "global batch 32" in job.stdout  # demo: 16 per rank x 2 ranks


@pytest.mark.slow
def test_fsdp2_trains_checkpoints_shards_and_resumes(base, tmp_path):
    run = tmp_path / "fsdp"
    sharded = [*base, "data.batch_size=2", "distributed.strategy=fsdp2", "train.steps=2", "checkpoint.every=1"]
    first = launch(2, *sharded, f"out_dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "FSDP2 over 2 ranks" in first.stdout and (run / "checkpoints" / "step_00000002.dcp" / "meta.pt").is_file()
    assert (run / "backbone.safetensors").is_file()
    longer = ("--allow-change", "train.steps")
    more = launch(
        2, *[o for o in sharded if o != "train.steps=2"], "train.steps=3", f"out_dir={run}", "--resume", *longer
    )
    assert more.returncode == 0, more.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "step_00000003.dcp" / "meta.pt")["step"] == 3
    # A sharded checkpoint is read with pickle: from another run's folder only when the caller trusts it.
    elsewhere = [*sharded, "train.steps=4", f"out_dir={tmp_path / 'other'}", f"--resume-from={run}", *longer]
    refused = launch(2, *elsewhere)
    assert refused.returncode != 0 and "--trust-checkpoint" in refused.stdout + refused.stderr
    assert launch(2, *elsewhere, "--trust-checkpoint").returncode == 0


def test_without_torchrun_the_run_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = init_world("cpu", DistributedConfig())
    assert (world.rank, world.size, world.main, world.distributed) == (0, 1, True, False)
    assert wrap_student(None, world, DistributedConfig()) == "single process"


def test_config_rejects_unknown_strategies():
    with pytest.raises(ConfigError, match="distributed.strategy"):
        DistributedConfig(strategy="zero3")


def test_sync_batchnorm_is_cuda_only():
    world = World(rank=0, local_rank=0, size=2, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="sync_batchnorm needs CUDA"):
        wrap_student(None, world, DistributedConfig(sync_batchnorm=True))
