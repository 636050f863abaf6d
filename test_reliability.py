"""What a cluster job does to a training run, done to the real command line with nothing stubbed: kill -9 at
random moments then --resume, SIGTERM to the torchrun launcher, and every rank of a finished torchrun run
exiting cleanly. Each test runs transformer.py in subprocesses, as a user or a scheduler would."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import transformer
from conftest import complete_lines, gloo_threads, signal_after, torchrun_leaving

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(REPO, "transformer.py")
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
# A cold start of torch on a busy 2-core machine can take tens of seconds: every wait below allows for that.
START_UP_S = 180
# Dropout on, so a resumed run is only exact if every process's RNG continues where it was.
RUN = ["--device", "cpu", "--arch", "llama", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
       "--batch-size", "4", "--dropout", "0.1", "--warmup-steps", "5", "--log-every", "25", "--eval-every", "40",
       "--eval-iters", "2"]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def failure(proc_or_result, what):
    """The message of a failed assertion: what went wrong and the end of the child's stderr."""
    err = proc_or_result.stderr if isinstance(proc_or_result.stderr, str) else ""
    return f"{what}; exit status {proc_or_result.returncode}; stderr:\n{err[-3000:]}"


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_ends_bit_identical_to_an_uninterrupted_run(data, tmp_path):
    steps = 120
    flags = ["--data", data, *RUN, "--max-steps", str(steps), "--ckpt-every", "7"]
    straight = subprocess.run([sys.executable, SCRIPT, *flags, "--out-dir", str(tmp_path / "straight")],
                              capture_output=True, text=True, timeout=START_UP_S + 120, env=ENV)
    assert straight.returncode == 0, failure(straight, "the uninterrupted run failed")

    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    while True:
        resume = ["--resume"] if (out / "ckpt.pt").exists() else []  # killed before its first checkpoint: start over
        proc = subprocess.Popen([sys.executable, SCRIPT, *flags, "--out-dir", str(out), *resume],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
        if kills < 5:
            # kill -9 once the run has logged a random number of further steps, at a random moment inside a
            # step (sometimes in the middle of writing a checkpoint or a metrics line)
            log = out / "metrics.jsonl"
            target = min(steps - 1, complete_lines(log) + rng.randint(1, 30))
            deadline = time.monotonic() + START_UP_S
            while proc.poll() is None and complete_lines(log) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.02))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=START_UP_S + 120)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, f"a restarted run failed with {proc.returncode}:\n{err[-3000:]}"
    assert kills >= 3
    a, b = metrics(tmp_path / "straight"), metrics(out)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # bit for bit
    assert [r.get("val_loss") for r in b] == [r.get("val_loss") for r in a]
    final_a = transformer.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))["model"]
    final_b = transformer.load_checkpoint(str(out / "ckpt.pt"))["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


@pytest.mark.slow
def test_sigterm_to_torchrun_leaves_one_complete_checkpoint_and_every_rank_exits_0(data, tmp_path):
    """What a cluster scheduler does at the end of a time slot. Each rank runs inside a small shell that
    records its exit status (torchrun itself reports the signal it got, not its workers' statuses)."""
    out = tmp_path / "run"
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text(f'trap ":" TERM\n"{sys.executable}" "$@"\ns=$?\necho $s > "{tmp_path}/status_$RANK"\nexit $s\n')
    proc = subprocess.Popen(
        torchrun("--no-python", "sh", str(wrapper), SCRIPT, "--data", data, *RUN, "--out-dir", str(out),
                 "--max-steps", "100000", "--ckpt-every", "100000"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    stdout, stderr = signal_after(proc, out / "metrics.jsonl", 5, signal.SIGTERM, START_UP_S)
    assert [(tmp_path / f"status_{r}").read_text().strip() for r in (0, 1)] == ["0", "0"], stderr[-3000:]
    assert "interrupted: saved" in stdout
    ckpt = transformer.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] >= 5 and len(ckpt["rng"]) == 2
    assert [r["step"] for r in metrics(out)] == list(range(1, ckpt["step"] + 1))
    assert not (out / "ckpt.pt.tmp").exists()


@pytest.mark.slow
def test_a_finished_torchrun_run_exits_0_on_every_rank(data, tmp_path):
    """The real command line, nothing wrapped (the twin of the tests below, whose os._exit records first)."""
    result = subprocess.run(torchrun(SCRIPT, "--data", data, *RUN, "--out-dir", str(tmp_path), "--max-steps", "3"),
                            capture_output=True, text=True, timeout=START_UP_S + 120, env=ENV)
    assert result.returncode == 0, failure(result, "a finished torchrun job")
    assert "terminate called" not in result.stderr


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 2-process torchrun run (DDP over gloo): (the subprocess, how each process left)."""
    cwd = tmp_path_factory.mktemp("finished")
    return torchrun_leaving(["--data", data, *RUN, "--out-dir", cwd / "out", "--max-steps", "3"], cwd, ENV,
                            START_UP_S + 120)


@pytest.mark.slow
def test_a_finished_torchrun_run_ends_every_process_before_pythons_shutdown(finished):
    """The SIGABRT one finished run in 20 to 40 ended with came from Python's shutdown: a gloo worker thread
    freeing a tensor once it had begun. A finished gloo process skips it: os._exit(0) after the group is gone."""
    result, left = finished
    assert result.returncode == 0, failure(result, "a finished torchrun job")
    assert [r and r["status"] for r in left] == [0, 0], left


@pytest.mark.slow
def test_a_finished_torchrun_run_frees_its_process_group(finished):
    """No late import of torch's FSDP module keeps the group alive: gloo's threads end with it."""
    result, left = finished
    assert all(r is not None and not gloo_threads(r) for r in left), left


def workers(launcher):
    """The pids of a torchrun launcher's worker processes (its children) right now."""
    try:
        with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_torchrun_max_restarts_with_resume_auto_survives_kill_9_of_a_worker_bit_identical(data, tmp_path):
    """What a cluster does: a worker dies (kill -9 of one rank, at random moments timed by training progress,
    sometimes in the middle of a save). torchrun --max-restarts starts every worker again with the same command
    line, and --resume auto continues from the last complete checkpoint (or starts fresh before the first one).
    The end is the uninterrupted run's, bit for bit: the same losses and the same final weights. Under --fsdp with
    sharded, asynchronous saves: a kill can land while a step folder is being written (never read then)."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux's /proc to find torchrun's workers")
    steps = 24
    flags = [SCRIPT, "--data", data, *RUN, "--max-steps", str(steps), "--ckpt-every", "4", "--resume", "auto",
             "--fsdp", "--async-save", "--keep-checkpoints", "2"]
    straight = subprocess.run(torchrun(*flags, "--out-dir", str(tmp_path / "straight")), capture_output=True,
                              text=True, timeout=START_UP_S + 120, env=ENV)
    assert straight.returncode == 0, failure(straight, "the uninterrupted run failed")

    out, rng, killed = tmp_path / "killed", random.Random(), set()
    launcher = subprocess.Popen(torchrun("--max-restarts=3", *flags, "--out-dir", str(out)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for _ in range(3):
            deadline = time.monotonic() + START_UP_S
            while launcher.poll() is None and len(set(workers(launcher)) - killed) < 2:  # this attempt's workers
                assert time.monotonic() < deadline, "torchrun did not restart its workers"
                time.sleep(0.01)
            pids = sorted(set(workers(launcher)) - killed)
            target = min(steps - 1, complete_lines(out / "metrics.jsonl") + rng.randint(2, 6))
            while launcher.poll() is None and complete_lines(out / "metrics.jsonl") < target:
                assert time.monotonic() < deadline, "training made no progress"
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            if launcher.poll() is not None:
                break
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            killed.update(pids)
        stdout, stderr = launcher.communicate(timeout=START_UP_S + 240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, f"torchrun exited {launcher.returncode} after {len(killed) // 2} kills:\n" \
                                     f"{stderr[-3000:]}"
    assert len(killed) == 6 and "resumed" in stdout
    a, b = metrics(tmp_path / "straight"), metrics(out)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # bit for bit
    final_a = transformer.load_checkpoint(str(tmp_path / "straight"))["model"]  # the newest step folder
    final_b = transformer.load_checkpoint(str(out))["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


# -----------------------------------------------------------------------------
# A save that cannot be written: one line, on every process, and the previous checkpoint intact


def on_small_tmpfs(size, out, cmd, tmp_path):
    """cmd run with `out` a fresh tmpfs of `size` (a real full disk), in a user and mount namespace of its own (no
    root needed); what it left in out is copied to tmp_path/left. Skips where the kernel does not allow that."""
    os.makedirs(out)
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip("no user namespaces with tmpfs mounts here (unshare --user --mount)")
    script = f'mount -t tmpfs -o size={size} tmpfs "{out}" || exit 99; "$@"; s=$?; cp -a "{out}/." "{tmp_path}/left"'
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script + "; exit $s", "sh",
                             *map(str, cmd)], capture_output=True, text=True, timeout=START_UP_S + 120, env=ENV)
    assert result.returncode != 99, result.stderr
    return result


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays(data, tmp_path):
    """The first checkpoint (0.4 MB) fits the 640 KB disk; the second cannot sit beside it while it is written."""
    out = tmp_path / "run"
    result = on_small_tmpfs("640k", out, [sys.executable, SCRIPT, "--data", data, *RUN, "--n-layer", "1", "--out-dir",
                                          out, "--max-steps", "6", "--ckpt-every", "2"], tmp_path)
    assert result.returncode == 1, failure(result, "a full disk")
    assert "Traceback" not in result.stderr
    assert re.fullmatch(rf"transformer.py: error: cannot save a checkpoint to {out}/ckpt.pt: No space left on device "
                        r"\(this save needs 0\.\d MiB or more, 0\.\d MiB free\)", result.stderr.strip()), result.stderr
    left = tmp_path / "left"
    assert sorted(os.listdir(left)) == ["ckpt.pt", "metrics.jsonl"]  # no half-written ckpt.pt.tmp
    assert transformer.load_checkpoint(str(left / "ckpt.pt"))["step"] == 2


@pytest.mark.slow
def test_a_full_disk_during_a_sharded_save_under_torchrun_ends_every_rank_with_one_line(data, tmp_path):
    """The first step folder (0.85 MB, DCP's files) fits the 1200 KB disk, the second does not: said before it is
    written (free space against this save's tensors), on both ranks; each exits 1."""
    out = tmp_path / "run"
    wrapper = tmp_path / "rank.sh"
    # each rank's exit status, recorded by a shell that outlives torchrun's SIGTERM to the other rank once one fails
    wrapper.write_text(f'trap ":" TERM\n"{sys.executable}" "$@"\ns=$?\necho $s > "{tmp_path}/status_$RANK"\nexit $s\n')
    result = on_small_tmpfs("1200k", out, torchrun("--no-python", "sh", wrapper, SCRIPT, "--data", data, *RUN,
                                                  "--arch", "gpt2", "--fsdp", "--out-dir", out, "--max-steps", "6",
                                                  "--ckpt-every", "2"), tmp_path)
    assert result.returncode != 0
    status = [(tmp_path / f"status_{r}").read_text().strip() if (tmp_path / f"status_{r}").exists() else None
              for r in (0, 1)]
    # Both ranks raise the same error; whichever exits first makes torchrun SIGTERM the other (143) if it has not
    # exited yet, so a rank says the line and exits 1, or is ended by torchrun: never 0, never a hang.
    assert "1" in status and set(status) <= {"1", "143"}, (status, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if "cannot save" in line]
    assert status.count("1") <= len(lines) <= 2 and len(set(lines)) == 1, result.stderr[-3000:]  # the same line
    assert re.fullmatch(rf"transformer.py: error: cannot save a checkpoint to {out}/step_000004.tmp: No space left on "
                        r"device \(this save needs 0\.\d MiB per process or more, 0\.\d MiB free\)", lines[0]), lines[0]
    assert 'transformer.py", line' not in result.stderr  # no traceback from a worker (torchrun prints its own)
    left = tmp_path / "left"
    assert sorted(os.listdir(left)) == ["metrics.jsonl", "step_000002"]  # the partial step_000004.tmp is gone
    assert transformer.load_checkpoint(str(left))["step"] == 2


def test_a_folder_that_refuses_the_write_is_one_line_naming_it(data, tmp_path, monkeypatch, one_line_error):
    """The mocked twin of the full disks above, for what root cannot be refused on a real disk: EACCES."""
    def refused(obj, f, *args, **kwargs):
        raise PermissionError(13, "Permission denied", f.name)

    monkeypatch.setattr(torch, "save", refused)
    line = one_line_error(["--data", data, *RUN, "--out-dir", str(tmp_path), "--max-steps", "2"])
    assert line.startswith(f"transformer.py: error: cannot save a checkpoint to {tmp_path}/ckpt.pt: Permission denied "
                           "(this save needs 0.")
