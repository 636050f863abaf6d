"""Smoke test of bench.py: `--quick` runs every row at tiny sizes. No timing is asserted."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import bench as bench_py
from conftest import english_text

REPO = os.path.dirname(os.path.abspath(__file__))


def bench(*args, timeout=900):
    """bench.py as a user runs it."""
    return subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), *map(str, args)], cwd=REPO,
                          env=os.environ, capture_output=True, text=True, timeout=timeout)


def has_row(row, stdout):
    return re.search(f"^{row} ", stdout, re.MULTILINE) is not None


@pytest.mark.slow
def test_quick_bench_prints_every_row(tmp_path):
    (tmp_path / "text.txt").write_bytes(english_text(100_000))
    result = bench("--quick", "--text", tmp_path / "text.txt")
    assert result.returncode == 0, result.stderr
    for row in ("1 train", "2 decode", "3 prepare", "4 cuda", "5 to loss", "6 tokens", "7 ablate"):
        assert has_row(row, result.stdout), f"no row {row!r} in:\n{result.stdout}"
    assert "ours == HF, 16 greedy tokens: yes" in result.stdout
    assert "peak RSS" in result.stdout


@pytest.mark.slow
def test_gpu_check_on_the_cpu_says_what_it_skips():
    result = bench("--gpu-check", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "gpu-check: skipped, no CUDA device" in result.stdout


# A stand-in for nanoGPT's model.py (its interface: GPTConfig, GPT(config), forward(idx, targets) -> (logits, loss),
# the same parameter names), so that the check's nanoGPT item runs in the suite; nanoGPT itself is never committed.
NANOGPT_STAND_IN = """
from dataclasses import dataclass

import transformer


@dataclass
class GPTConfig:
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    bias: bool


class GPT(transformer.GPT):
    def __init__(self, c):
        super().__init__(transformer.GPTConfig.preset("gpt2", "gpt2", n_layer=c.n_layer, n_head=c.n_head,
                                                      n_embd=c.n_embd, block_size=c.block_size,
                                                      vocab_size=c.vocab_size))
"""


@pytest.mark.slow
def test_gpu_check_quick_runs_every_item_at_a_tiny_size(tmp_path):
    """--gpu-check's code at a tiny size on the CPU (gloo for NCCL, the CLI's CPU defaults): every item reports
    ok, the summary table comes last, and the same summary is written as JSON under --out."""
    (tmp_path / "nanogpt").mkdir()
    (tmp_path / "nanogpt" / "model.py").write_text(NANOGPT_STAND_IN)
    result = bench("--gpu-check", "--quick", "--device", "cpu", "--out", tmp_path / "out", "--nanogpt",
                   tmp_path / "nanogpt", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    items = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["items"]
    assert [(r["item"], r["status"]) for r in items] == [
        ("1 cli", "ok"), ("2 torchrun", "ok"), ("3 attention", "ok"), ("4 bf16/fp32", "ok"),
        ("5 checkpoints", "ok"), ("6 sampling", "ok"), ("7 nanoGPT", "ok")]
    table = result.stdout[result.stdout.index("gpu-check summary"):].splitlines()
    assert [row.split()[:2] for row in table[2:-1]] == [r["item"].split() for r in items]
    assert table[-1] == "gpu-check: all items ok"
    # MFU n/a: a CPU peak timed while the cores were busy can be beaten, and an MFU above 100% is never printed
    assert re.search(r"tiny T=64 B=4: [\d,]+ tok/s, MFU ([\d.]+%|n/a), peak [\d.]+ GiB", result.stdout)


@pytest.mark.slow
def test_rows_runs_only_the_rows_named():
    result = bench("--quick", "--rows", "decode")
    assert result.returncode == 0, result.stderr
    assert has_row("2 decode", result.stdout) and not has_row("1 train", result.stdout)


def test_an_unknown_row_is_one_line_before_any_work():
    result = bench("--rows", "train,sprint", timeout=60)
    assert result.returncode == 2 and "unknown row 'sprint'" in result.stderr and result.stdout == ""


def write_metrics(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_to_target_counts_training_time_only_and_reads_the_crossing_off_the_line_between_evaluations(tmp_path):
    """Each logged step says how fast the steps since the last one ran: 25 steps of B x T tokens at tokens_per_s. An
    evaluation's own time is not in it. The target 2.7205 lies between 2.8 (at 2 s) and 2.6 (at 3 s)."""
    tokens = bench_py.transformer.RECIPE["batch_size"] * 64 * 25
    write_metrics(tmp_path, [{"step": 1, "loss": 5.0}, *[
        {"step": s, "loss": 3.0, "tokens_per_s": tokens / 1.0, "val_bpb": bpb}
        for s, bpb in ((25, 3.0), (50, 2.8), (75, 2.6), (100, 2.5))]])
    (seconds, step), total = bench_py.to_target(tmp_path, 2.7205)
    assert step == 75 and seconds == pytest.approx(2 + (2.8 - 2.7205) / 0.2) and total == pytest.approx(4.0)
    assert bench_py.to_target(tmp_path, 2.0) == ((None, None), pytest.approx(4.0))  # never reached


def test_race_runs_one_at_a_time_in_alternating_order(tmp_path, monkeypatch):
    """Started at once, training runs oversubscribed a 2-core machine: race starts each with subprocess.run, which
    returns when the run has ended, and reverses the order every other round. (bench.py --quick runs it for real.)"""
    started = []

    def run(argv, **kwargs):
        if "--eval" in argv:
            return subprocess.CompletedProcess(argv, 0, stdout="val: loss 1.0 | 2.5000 bits per byte\n")
        out = argv[argv.index("--out-dir") + 1]
        started.append(argv[argv.index("--data") + 1])
        write_metrics(pathlib.Path(out), [{"step": 25, "loss": 1.0, "tokens_per_s": 1e9, "val_bpb": 2.5}])
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(bench_py, "whole_val_iters", lambda data: 3)
    monkeypatch.setattr(bench_py.subprocess, "run", run)
    results = bench_py.race({"A": ("a", []), "B": ("b", ["--mlp", "relu2"])}, 3, torch.device("cpu"), bench_py.FULL)
    assert started == ["a", "b", "b", "a", "a", "b"]
    assert [len(r) for r in results.values()] == [3, 3] and results["A"][0][1:3] == (25, 2.5)
