"""Smoke test of bench.py: `--quick` runs every row at tiny sizes. No timing is asserted."""

import os
import re
import subprocess
import sys

from conftest import english_text

REPO = os.path.dirname(os.path.abspath(__file__))


def bench(*args, timeout=900):
    """bench.py as a user runs it."""
    return subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), *map(str, args)], cwd=REPO,
                          env=os.environ, capture_output=True, text=True, timeout=timeout)


def has_row(row, stdout):
    return re.search(f"^{row} ", stdout, re.MULTILINE) is not None


def test_quick_bench_prints_every_row(tmp_path):
    (tmp_path / "text.txt").write_bytes(english_text(100_000))
    result = bench("--quick", "--text", tmp_path / "text.txt")
    assert result.returncode == 0, result.stderr
    for row in ("1 train", "2 decode", "3 prepare", "4 cuda"):
        assert has_row(row, result.stdout), f"no row {row!r} in:\n{result.stdout}"
    assert "ours == HF, 16 greedy tokens: yes" in result.stdout
    assert "peak RSS" in result.stdout


def test_gpu_check_on_the_cpu_says_what_it_skips():
    result = bench("--gpu-check", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "gpu-check: skipped, no CUDA device" in result.stdout


def test_gpu_check_quick_runs_its_code_at_a_tiny_size():
    """On the CPU: bf16 autocast + fused AdamW steps, tokens/s and MFU, bf16 tracking fp32 (no flash, no compile)."""
    result = bench("--gpu-check", "--quick", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    # n/a: a CPU peak timed while the cores were busy can be beaten, and an MFU above 100% is never printed
    assert re.search(r"bf16 autocast, fused AdamW: [\d,]+ tok/s, MFU ([\d.]+%|n/a)", result.stdout), result.stdout
    assert "gpu-check: all checks passed" in result.stdout


def test_rows_runs_only_the_rows_named():
    result = bench("--quick", "--rows", "decode")
    assert result.returncode == 0, result.stderr
    assert has_row("2 decode", result.stdout) and not has_row("1 train", result.stdout)


def test_an_unknown_row_is_one_line_before_any_work():
    result = bench("--rows", "train,sprint", timeout=60)
    assert result.returncode == 2 and "unknown row 'sprint'" in result.stderr and result.stdout == ""
