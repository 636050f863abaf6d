"""loss.png (metrics.plot_metrics): drawn from a synthetic metrics.jsonl with a train loss every step
and a val loss every 50, with and without a target line; and training still finishes, without a picture, when
matplotlib is missing. Offline, on CPU.
"""

import json
import math
import os
import sys

import numpy as np
import pytest

import metrics
import prepare_data
import transformer

TARGET_RGB = (0xD6 / 255, 0x27 / 255, 0x28 / 255)  # matplotlib's tab:red, the target line's colour


def synthetic_run(out_dir, steps=850, val_every=50, seed=0, bytes_per_token=1.0):
    """metrics.jsonl as a run of `steps` steps logs it: a loss falling from ln(256) with noise on every step,
    and a val loss a little above the trend on every val_every-th step and the last, with its bits per byte
    at bytes_per_token (1: a byte-level run; None: a dataset without byte counts, so no val_bpb)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = os.path.join(out_dir, "metrics.jsonl")
    with open(path, "w") as f:
        for s in range(steps):
            trend = 1.85 + (math.log(256) - 1.85) * math.exp(-s / 60) + 0.35 * math.exp(-s / 400)
            row = {"step": s, "loss": trend + rng.normal(0, 0.06), "lr": 2e-3}
            if (s + 1) % val_every == 0 or s == steps - 1:
                row["val_loss"] = trend + 0.04
                if bytes_per_token:
                    row["val_bpb"] = row["val_loss"] / bytes_per_token / math.log(2)
            f.write(json.dumps(row) + "\n")
    return path


def target_pixels(png):
    """How many pixels of the picture have the target line's colour."""
    matplotlib_image = pytest.importorskip("matplotlib.image")
    rgb = matplotlib_image.imread(png)[..., :3]  # (H, W, 3) floats in 0..1
    return int((np.abs(rgb - TARGET_RGB).max(axis=-1) < 0.15).sum())  # antialiasing blends the line's edges


def test_a_png_of_every_steps_loss_with_val_points_and_the_target_line(tmp_path):
    pytest.importorskip("matplotlib")
    path = synthetic_run(tmp_path / "with")
    png = metrics.plot_metrics(path, target_bpb=1.8857 / math.log(2), target_label="nanoGPT CPU recipe")
    assert png == str(tmp_path / "with" / "loss.png")
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert (width, height) == (1320, 528)  # two panels, 12 x 4.8 inches at 110 dpi
    without = metrics.plot_metrics(synthetic_run(tmp_path / "without"))
    assert target_pixels(png) > 1000 and target_pixels(without) == 0  # the dashed red line, in both panels


def test_the_target_in_bits_per_byte_needs_a_run_that_logs_bits_per_byte(tmp_path):
    """A run on a dataset without byte counts has no bits-per-byte scale: no place for the target line."""
    pytest.importorskip("matplotlib")
    for name, bytes_per_token in (("bpe", 1.2), ("unknown", None)):
        path = synthetic_run(tmp_path / name, bytes_per_token=bytes_per_token)
        png = metrics.plot_metrics(path, target_bpb=1.8857 / math.log(2), target_label="nanoGPT CPU recipe")
        assert (target_pixels(png) > 1000) == (bytes_per_token is not None), name


def test_a_run_of_one_step_still_draws(tmp_path):
    pytest.importorskip("matplotlib")
    assert os.path.exists(metrics.plot_metrics(synthetic_run(tmp_path, steps=1)))


@pytest.fixture
def tiny_data(tmp_path):
    out = str(tmp_path / "data")
    os.makedirs(out)
    tokens = np.random.default_rng(0).integers(0, 256, 3000)
    prepare_data.write_shard(os.path.join(out, "train_000000.bin"), tokens[:2500], 256)
    prepare_data.write_shard(os.path.join(out, "val_000000.bin"), tokens[2500:], 256)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"format_version": 1, "tokenizer": "byte", "vocab_size": 256, "eot": None}, f)
    return out


TINY = ["--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--seq-len", "16", "--batch-size", "4",
        "--max-steps", "3", "--log-every", "1", "--eval-every", "2", "--eval-iters", "1", "--warmup-steps", "1"]


def test_training_draws_loss_png_beside_metrics(tiny_data, tmp_path):
    pytest.importorskip("matplotlib")
    transformer.main(["--data", tiny_data, "--out-dir", str(tmp_path / "out"), *TINY])
    assert os.path.exists(tmp_path / "out" / "loss.png")


def test_a_run_on_tiny_shakespeare_draws_nanogpts_target_and_another_text_does_not(tiny_data, tmp_path):
    """Tiny Shakespeare is known by its length, 1,115,394 bytes over the splits, whatever the tokenizer."""
    pytest.importorskip("matplotlib")
    path = os.path.join(tiny_data, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    for name, train_bytes in (("shakespeare", 1_115_394 - 500), ("other", 2500)):
        meta["splits"] = {"train": {"tokens": 2500, "bytes": train_bytes}, "val": {"tokens": 500, "bytes": 500}}
        with open(path, "w") as f:
            json.dump(meta, f)
        transformer.main(["--data", tiny_data, "--out-dir", str(tmp_path / name), *TINY])
        assert (target_pixels(str(tmp_path / name / "loss.png")) > 0) == (name == "shakespeare"), name


def test_small_png_keeps_the_picture_and_its_colours_in_a_fifth_of_the_bytes(tmp_path):
    """docs/img/loss.png is loss.png through metrics.small_png: same size in pixels, a palette, far fewer
    bytes, and the target line still in its own red (a palette that blended it away would show no target)."""
    image = pytest.importorskip("PIL.Image")
    png = metrics.plot_metrics(synthetic_run(tmp_path / "run"), target_bpb=1.8857 / math.log(2))
    out = metrics.small_png(png, str(tmp_path / "docs" / "img" / "loss.png"))  # makes the folder
    with image.open(png) as big, image.open(out) as small:
        assert small.size == big.size and small.mode == "P"
    assert os.path.getsize(out) < os.path.getsize(png) / 3
    assert target_pixels(out) > 0.9 * target_pixels(png) > 1000


def test_without_matplotlib_training_finishes_without_a_picture(tiny_data, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    assert metrics.plot_metrics(synthetic_run(tmp_path / "synthetic")) is None
    transformer.main(["--data", tiny_data, "--out-dir", str(tmp_path / "out"), *TINY])
    assert os.path.exists(tmp_path / "out" / "ckpt.pt") and not os.path.exists(tmp_path / "out" / "loss.png")
