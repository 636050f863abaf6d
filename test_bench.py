"""Smoke test of bench.py: `--quick` runs every row at tiny sizes. No timing is asserted."""

import os
import re
import subprocess
import sys

from conftest import english_text

REPO = os.path.dirname(os.path.abspath(__file__))


def test_quick_bench_prints_every_row(tmp_path):
    (tmp_path / "text.txt").write_bytes(english_text(100_000))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench.py"), "--quick", "--text", str(tmp_path / "text.txt")],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for row in ("1 train", "2 decode", "3 prepare", "4 cuda"):
        assert re.search(f"^{row} ", result.stdout, re.MULTILINE), f"no row {row!r} in:\n{result.stdout}"
    assert "ours == HF, 16 greedy tokens: yes" in result.stdout
    assert "peak RSS" in result.stdout


def test_gpu_check_on_the_cpu_says_what_it_skips():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench.py"), "--gpu-check", "--device", "cpu"],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "gpu-check: skipped, no CUDA device" in result.stdout


def test_gpu_check_quick_runs_its_code_at_a_tiny_size():
    """On the CPU: bf16 autocast + fused AdamW steps, tokens/s and MFU, bf16 tracking fp32 (no flash, no compile)."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench.py"), "--gpu-check", "--quick", "--device", "cpu"],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"bf16 autocast, fused AdamW: [\d,]+ tok/s, MFU [\d.]+%", result.stdout), result.stdout
    assert "gpu-check: all checks passed" in result.stdout


def test_rows_runs_only_the_rows_named():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench.py"), "--quick", "--rows", "decode"],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert re.search("^2 decode ", result.stdout, re.MULTILINE) and not re.search(
        "^1 train ", result.stdout, re.MULTILINE
    )


def test_an_unknown_row_is_one_line_before_any_work():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench.py"), "--rows", "train,sprint"],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "unknown row 'sprint'" in result.stderr and result.stdout == ""
