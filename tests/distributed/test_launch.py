"""Launching `danlu train` as users launch jobs: two torchrun "nodes" on localhost, a rank killed mid-run, and
torchrun's elastic restart (--max-restarts) resuming from the last checkpoint. Tiny random Llama on gloo, as in
test_data_parallel.

A killed process's sockets are closed by the kernel, so the survivor's next collective fails at once; the runs
pass --ddp_timeout 30 all the same, which bounds the wait when a peer vanishes without closing them (its machine
or the network gone, which localhost cannot show), so that a regression fails here instead of hanging for gloo's
default 30 minutes.
"""
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from danlu.cli.main import main
from danlu.distributed.failures import LostProcess, Terminated, lost_process_reason, sigterm_raises
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.checkpoint import latest_checkpoint
from danlu.training.train import TORCHRUN_NOTES, resume_point
from danlu.utils.progress import logger
from tests.distributed.test_data_parallel import (REPO, assert_same_curve, assert_same_weights, logged_losses,
                                                  settings, single_process, torchrun, torchrun_command)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 60  # long enough that the run is still going when the test kills a rank after checkpoint-10
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:11656: "
              "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
              "application. Check the logs of the remote worker before reporting an error. GLHF!")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_run(model_dir, out, **overrides) -> dict:
    """dp=2 for STEPS steps, a checkpoint every 5."""
    return settings(model_dir, out, per_device_train_batch_size=2, parallel="dp=2", max_steps=STEPS, save_steps=5,
                    ddp_timeout=30, **overrides)


_uninterrupted: dict = {}


def uninterrupted(model_dir, tmp_path_factory) -> Path:
    """long_run to its end without a failure (once per module)."""
    if "out" not in _uninterrupted:
        out = tmp_path_factory.mktemp("uninterrupted")
        torchrun(long_run(model_dir, out))
        _uninterrupted["out"] = out
    return _uninterrupted["out"]


def losses_by_step(out: Path) -> dict[int, float]:
    """trainer_log.jsonl's losses by step; a resumed run appends the steps after its checkpoint again, and those
    later rows are the ones kept."""
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


class Launched:
    """A torchrun started in the background, its output going to files (a pipe nobody reads while the test waits
    could fill up and stall the run)."""

    def __init__(self, command: list[str], logs: Path, **env: str):
        self.stdout_path, self.stderr_path = logs.with_suffix(".stdout"), logs.with_suffix(".stderr")
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(command, cwd=REPO, env={**ENV, **env}, stdout=stdout, stderr=stderr)
        self.pid = self.process.pid

    def poll(self):
        return self.process.poll()

    def wait(self, timeout: float) -> tuple[int, str, str]:
        """The exit code, stdout and stderr, once torchrun has ended."""
        code = self.process.wait(timeout=timeout)
        return code, self.stdout_path.read_text(), self.stderr_path.read_text()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def workers(launcher: Launched) -> dict[int, int]:
    """The worker processes torchrun started, by rank (their parent and RANK, read from /proc)."""
    found = {}
    for pid in children(launcher.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        rank = [entry[5:] for entry in environ if entry.startswith(b"RANK=")]
        if rank:
            found[int(rank[0])] = pid
    return found


def kill_a_rank_after_a_checkpoint(launcher: Launched, out: Path, rank: int, step: int = 10) -> float:
    """SIGKILL the worker of `rank` once checkpoint-`step` is complete; returns when (time.monotonic())."""
    deadline = time.monotonic() + 60
    while not (out / f"checkpoint-{step}" / "trainer_state.json").is_file():
        assert launcher.poll() is None, f"torchrun ended before checkpoint-{step}:\n{launcher.wait(1)[2][-4000:]}"
        assert time.monotonic() < deadline, f"no checkpoint-{step} after 60 s"
        time.sleep(0.01)
    pid = workers(launcher)[rank]
    assert launcher.poll() is None and not (out / "model.safetensors").exists(), "the run ended before the kill"
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def error_lines(stderr: str) -> list[str]:
    """The one-line reports of `danlu train` (a progress bar may precede one on its line)."""
    return re.findall(r"danlu train: error: [^\n]*", stderr)


def assert_checkpoints_complete(out: Path) -> None:
    """Every checkpoint-N is complete, and the latest is the highest N (temporary directories are hidden)."""
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and all((c / "trainer_state.json").is_file() for c in checkpoints), checkpoints
    assert latest_checkpoint(out) == checkpoints[-1]


def assert_same_curve_as(out: Path, reference: Path, resumed_after: int) -> None:
    """The whole curve (the steps after the resume point from the resumed run) equals the uninterrupted one."""
    ours, straight = losses_by_step(out), losses_by_step(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    resumed = [ours[step] for step in range(resumed_after + 1, STEPS + 1)]
    assert resumed == pytest.approx([straight[step] for step in range(resumed_after + 1, STEPS + 1)], rel=1e-6)
    assert_same_curve([ours[s] for s in sorted(ours)], [straight[s] for s in sorted(straight)], steps=STEPS)


# ---------------------------------------------------------------- two nodes on localhost


def test_two_nodes_on_localhost_train_as_one_process_with_the_whole_batch(model_dir, tmp_path, tmp_path_factory):
    """Two torchrun invocations, --nnodes 2 --nproc_per_node 1 with a c10d rendezvous, as on two machines."""
    out = tmp_path / "run"
    launch = ("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
              "--rdzv-id", "two-nodes")
    command = torchrun_command(settings(model_dir, out, per_device_train_batch_size=2, parallel="dp=2",
                                        ddp_timeout=30), nproc=1, launch=launch)
    nodes = [Launched(command, tmp_path / f"node{i}") for i in range(2)]
    done = [node.wait(timeout=120) for node in nodes]
    for code, _, stderr in done:
        assert code == 0, stderr[-4000:]
    assert sum(stdout.count("trained 10 steps") for _, stdout, _ in done) == 1  # rank 0's node speaks for the run
    single = single_process(model_dir, tmp_path_factory)
    assert_same_curve(logged_losses(out), logged_losses(single))
    assert_same_weights(out, single, "model.safetensors")


# ---------------------------------------------------------------- a rank killed mid-run


def test_a_killed_rank_ends_the_job_in_one_line_and_its_last_checkpoint_resumes_the_curve(model_dir, tmp_path,
                                                                                         tmp_path_factory):
    out = tmp_path / "run"
    launcher = Launched(torchrun_command(long_run(model_dir, out)), tmp_path / "torchrun")
    killed = kill_a_rank_after_a_checkpoint(launcher, out, rank=0)
    code, _, stderr = launcher.wait(timeout=60)
    print(f"torchrun ended {time.monotonic() - killed:.1f} s after the kill")
    assert code != 0 and time.monotonic() - killed < 30
    assert_checkpoints_complete(out)
    last = latest_checkpoint(out)
    # rank 1 survives: one line naming what happened and where to resume, not gloo's traceback
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-4000:]
    assert re.fullmatch(r"danlu train: error: rank 1: (lost contact with the other processes \(a peer died or the "
                        r"network failed\): \S.*|stopped by SIGTERM \(torchrun stops every process of the job when "
                        r"one of them fails\)); the last complete checkpoint is " + re.escape(str(last))
                        + r"; resume with --resume_from_checkpoint latest", lines[0]), lines[0]
    assert "RuntimeError" not in stderr and "[rank1]: Traceback" not in stderr

    resumed_after = int(last.name.split("-")[1])
    torchrun(long_run(model_dir, out, resume_from_checkpoint="latest"))
    assert_same_curve_as(out, uninterrupted(model_dir, tmp_path_factory), resumed_after)
    assert (out / "model.safetensors").is_file()


def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(model_dir, tmp_path, tmp_path_factory):
    """--max-restarts 1: the restart resumes from the latest checkpoint (overwrite_output_dir, given for the first
    attempt, does not remove it) and the job ends as if nothing had happened.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the README says: torch 2.13's torchrun hands the restarted workers the
    store of the first attempt, whose stale gloo addresses made 2 of 9 restarts measured without it fail to connect
    (pytorch#135712); none of 6 with it."""
    out = tmp_path / "run"
    command = torchrun_command(long_run(model_dir, out, overwrite_output_dir=True),
                               launch=("--standalone", "--max-restarts", "1"))
    launcher = Launched(command, tmp_path / "torchrun", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    kill_a_rank_after_a_checkpoint(launcher, out, rank=1)
    code, stdout, stderr = launcher.wait(timeout=120)
    assert code == 0, stderr[-4000:]
    assert stdout.count(f"trained {STEPS} steps") == 1
    resumed_from = re.findall(r"torchrun restarted the job: resuming from (\S+)", stderr)
    assert len(resumed_from) == 1, stderr[-4000:]
    assert re.search(r"rank 0: .*; the last complete checkpoint is \S+; torchrun restarts the job from it "
                     r"\(--max-restarts\)", stderr), error_lines(stderr)
    assert_checkpoints_complete(out)
    assert_same_curve_as(out, uninterrupted(model_dir, tmp_path_factory), int(resumed_from[0].split("-")[-1]))


# ---------------------------------------------------------------- the report of a lost process, in one process


@pytest.fixture
def rank_1_of_2(monkeypatch, tmp_path):
    """The environment of rank 1 of a 2-process torchrun job, and an output_dir holding checkpoint-5."""
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", TORCHELASTIC_RESTART_COUNT="0",
                            TORCHELASTIC_MAX_RESTARTS="0").items():
        monkeypatch.setenv(name, value)
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-5" / "trainer_state.json").write_text("{}")
    previous = signal.getsignal(signal.SIGTERM)
    yield tmp_path / "run"
    signal.signal(signal.SIGTERM, previous)  # sigterm_raises leaves SIGTERM ignored once the process is ending


def run_train_cli(monkeypatch, output_dir, failing_train) -> int:
    """`danlu train` in this process with `failing_train` for train(); the log handler it sets up on the captured
    stderr is taken away afterwards."""
    monkeypatch.setattr("danlu.training.train.train", failing_train)
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    level = logger.level
    try:
        return main(["train", "--dataset", "identity", "--output_dir", str(output_dir)])
    finally:
        logger.setLevel(level)


def test_a_collective_failing_for_a_lost_peer_is_reported_in_one_line(rank_1_of_2, monkeypatch, capsys):
    def train(args):
        raise RuntimeError(GLOO_RESET)

    assert run_train_cli(monkeypatch, rank_1_of_2, train) == 2
    assert capsys.readouterr().err == (
        f"danlu train: error: rank 1: lost contact with the other processes (a peer died or the network failed): Read "
        f"error [127.0.0.1]:11656: Connection reset by peer; the last complete checkpoint is "
        f"{rank_1_of_2 / 'checkpoint-5'}; resume with --resume_from_checkpoint latest\n")


def test_torchruns_sigterm_is_reported_in_one_line(rank_1_of_2, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")

    def train(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises here

    assert run_train_cli(monkeypatch, rank_1_of_2, train) == 2
    assert capsys.readouterr().err == (
        f"danlu train: error: rank 1: stopped by SIGTERM (torchrun stops every process of the job when one of them "
        f"fails); the last complete checkpoint is {rank_1_of_2 / 'checkpoint-5'}; torchrun restarts the job from it "
        f"(--max-restarts)\n")


def test_other_errors_pass_through_and_sigterm_is_restored_after_a_run(rank_1_of_2, monkeypatch, capsys):
    def train(args):
        raise RuntimeError("something else")

    assert run_train_cli(monkeypatch, rank_1_of_2, train) == 1  # not a lost process: an internal error
    assert "internal error: RuntimeError: something else" in capsys.readouterr().err
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_raises():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_lost_peer_is_recognised_through_the_chain_and_by_type():
    import torch.distributed as dist

    try:
        try:
            raise RuntimeError(GLOO_RESET)
        except RuntimeError:
            raise Terminated("SIGTERM")  # torchrun's SIGTERM landing while gloo's error unwinds
    except Terminated as e:
        assert lost_process_reason(e).startswith("lost contact with the other processes")
    assert lost_process_reason(dist.DistNetworkError("Broken pipe")).endswith(": Broken pipe")
    assert lost_process_reason(RuntimeError(
        "Gloo connectFullMesh failed with [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.h:311] "
        "Connect timeout [none]")).endswith(": Gloo connectFullMesh failed with Connect timeout [none]")
    assert lost_process_reason(RuntimeError("CUDA out of memory")) is None
    assert lost_process_reason(ValueError(GLOO_RESET)) is None
    assert issubclass(LostProcess, RuntimeError)


# ---------------------------------------------------------------- resume_point under torchrun, in one process


def write_run(output_dir: Path, *steps: int) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "trainer_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for step in steps:
        (output_dir / f"checkpoint-{step}").mkdir()
        (output_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


@pytest.fixture
def job(monkeypatch):
    """Under torchrun (job 'job-1'; this process's parent plays torchrun): `as_rank(r)` sets RANK. A second call of
    resume_point for a rank is then a restart by the same torchrun."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # what a node whose workers did not fail sees on a restart

    def as_rank(rank: int) -> None:
        monkeypatch.setenv("RANK", str(rank))

    as_rank(0)
    return as_rank


def test_a_restart_resumes_its_own_latest_checkpoint_and_never_removes_it(job, tmp_path):
    out = tmp_path / "run"
    args = TrainArguments(dataset="identity", output_dir=str(out), overwrite_output_dir=True)
    assert resume_point(args, out) is None  # the first attempt: ranks 0 and 1 note their torchrun
    job(1)
    assert resume_point(args, out, remove_old_outputs=False) is None
    assert sorted(p.name for p in (out / TORCHRUN_NOTES).iterdir()) == ["rank-0", "rank-1"]
    write_run(out, 5, 10)  # what the first attempt left, and a write it did not finish
    (out / ".checkpoint-15.0123456789ab.tmp").mkdir()
    assert resume_point(args, out, remove_old_outputs=False) == out / "checkpoint-10"  # the restart
    job(0)
    assert resume_point(args, out) == out / "checkpoint-10"
    assert sorted(p.name for p in out.iterdir()) == [TORCHRUN_NOTES, "checkpoint-10", "checkpoint-5",
                                                     "trainer_log.jsonl"]


def test_a_restart_without_a_checkpoint_starts_over(job, tmp_path):
    out = tmp_path / "run"
    args = TrainArguments(dataset="identity", output_dir=str(out))
    assert resume_point(args, out) is None
    write_run(out)
    assert resume_point(args, out) is None
    assert sorted(p.name for p in out.iterdir()) == [TORCHRUN_NOTES]


def test_a_new_torchrun_does_not_take_an_earlier_runs_outputs_for_its_own(job, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = TrainArguments(dataset="identity", output_dir=str(out))
    assert resume_point(args, out) is None
    write_run(out, 5)  # job-1 ran here; the same job id (a static launch's is "none") under another torchrun
    (out / TORCHRUN_NOTES / "rank-0").write_text("job-1 otherhost 4242")
    for _ in range(2):  # its first attempt refuses, and so does its restart
        with pytest.raises(ArgumentError, match="already holds a run"):
            resume_point(args, out)
    assert (out / "checkpoint-5" / "trainer_state.json").is_file()


def test_a_run_outside_torchrun_removes_the_notes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / TORCHRUN_NOTES).mkdir(parents=True)
    (out / TORCHRUN_NOTES / "rank-0").write_text("job-1 host 1")  # notes alone are no run
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert resume_point(TrainArguments(dataset="identity", output_dir=str(out)), out) is None
    assert not (out / TORCHRUN_NOTES).exists()
