"""Smoke test of bench.py: `--quick` runs every row at tiny sizes. No timing is asserted."""

import json
import os
import re
import subprocess
import sys

import pytest

from bench import run_in_turn
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
    for row in ("1 train", "2 decode", "3 prepare", "4 cuda", "6 tokens"):
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


def test_row_6_runs_its_training_runs_one_after_another(tmp_path):
    """Started at once, row 6's four runs oversubscribed a 2-core machine: run_in_turn starts each only once the one
    before has ended. Each command here notes its start and end in one file and prints two lines, which come back
    in order with the seconds from its start; a failed run is an error that names it."""
    notes = tmp_path / "notes"
    script = ("import sys, time\n"
              "note = lambda what: open(sys.argv[2], 'a').write(what + ' ' + sys.argv[1] + '\\n')\n"
              "note('start'); print('first', flush=True); time.sleep(0.3); print('second'); note('end')\n")
    logs = run_in_turn({name: [sys.executable, "-c", script, name, str(notes)] for name in ("A", "B", "C")})
    assert notes.read_text().splitlines() == ["start A", "end A", "start B", "end B", "start C", "end C"]
    assert list(logs) == ["A", "B", "C"]
    for lines in logs.values():
        assert [text for _, text in lines] == ["first\n", "second\n"] and 0 < lines[0][0] <= lines[1][0]
    with pytest.raises(RuntimeError, match="the run on B failed"):
        run_in_turn({"A": [sys.executable, "-c", "pass"], "B": [sys.executable, "-c", "raise SystemExit(3)"]})
