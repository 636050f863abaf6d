"""
metrics.py: what a training run reports. A companion of transformer.py, which imports it; it never imports
transformer.py.
  - MFU, model FLOPs utilisation: the FLOPs a step needs / the time it took / the device's peak.
  - run_summary: the lines a run prints before its first step; log_line: the line of a logged step.
  - MetricsLog: every step's record as a line of metrics.jsonl (and, with --wandb, in Weights & Biases).
  - plot_metrics: loss.png, drawn from metrics.jsonl at the end of a run (plot_run: against nanoGPT's).
"""

import contextlib
import functools
import json
import math
import os
import time

import numpy as np
import torch

# On a GPU the peak is the datasheet's dense bf16 tensor-core figure (no 2:4 sparsity), matched in
# order against torch.cuda.get_device_name(): the more specific names come first, since
# "NVIDIA H100 PCIe" also contains "H100" and "NVIDIA A100-SXM4-80GB" also contains "A10".
# A GPU not in the table gets no MFU at all rather than a made-up one.
GPU_PEAK_FLOPS = [
    ("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800 PCIe", 756e12), ("H800", 989e12),
    ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("A10G", 125e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 6000 Ada", 364e12), ("RTX A6000", 155e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def gpu_peak_flops(name):
    """Datasheet dense bf16 FLOP/s for a torch.cuda.get_device_name(), or None when the GPU is unknown."""
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)


def matmul_peak_flops(device, dtype=torch.float32, n=512, seconds=1.0):
    """Measured FLOP/s of a square matmul: the CPU's practical peak, used as MFU's denominator there.
    The best of as many short matmuls as fit in `seconds` (at least 5, after one to warm up): on a busy
    machine some of them run while no other process holds the cores, and the fastest is the peak. (Measured
    on a loaded 2-core machine: one 512 x 512 matmul timed 5 times spread 50x, 5.8 to 307 GFLOP/s; larger
    ones fared worse, being preempted more often; 1 s of short ones gave 295-345 GFLOP/s on 2 threads in most
    trials, but 8.3 in one whose whole second was starved: hence mfu's bound below.)
    The matrices are constant, not random: nothing here may draw from the global RNG, whose state a
    resumed run has restored (dropout masks would shift)."""
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    best, start, runs = float("inf"), time.perf_counter(), 0
    while runs < 6 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0) if runs else best  # the first one warms up
        runs += 1
    return 2 * n**3 / best


def peak_flops(device):
    """(FLOP/s or None, where the figure comes from) for one device: a GPU's datasheet bf16 peak, or a CPU's
    measured fp32 matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        return flops, f"{name}: " + ("bf16 datasheet peak" if flops else "not in GPU_PEAK_FLOPS, so MFU is unknown")
    return cpu_peak_flops(device.type, torch.get_num_threads()), f"fp32 matmul measured at start-up on {device.type}"


@functools.cache
def cpu_peak_flops(device_type, threads):
    """matmul_peak_flops, measured once per process for a device type and thread count: a second run in the same
    process (bench.py's rows, a notebook, the tests) does not spend another second on the same figure."""
    return matmul_peak_flops(torch.device(device_type))


def mfu(tokens_per_s, flops_per_token, world, peak):
    """MFU of one device: its share of the tokens (all processes' tokens/s / world) x FLOPs per token / its peak.
    None when it is unknown: no peak, or a figure above 100%. A datasheet peak cannot be beaten, so only a
    measured one can be (a CPU whose cores were busy while it was timed): the peak is wrong then, not the step,
    and no MFU is better than an impossible one."""
    if peak is None:
        return None
    utilisation = tokens_per_s / world * flops_per_token / peak
    return utilisation if utilisation <= 1.0 else None


class MetricsLog:
    """Every step's record, as one line of metrics.jsonl and, with --wandb PROJECT, in Weights & Biases.
    Rank 0 writes; a resumed run at `step` first drops the lines of the steps it is about to redo."""

    def __init__(self, path, step, master, wandb_project=None, config=None):
        self.path, self.master, self.wandb = path, master, None
        if not master:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        keep_metrics_until(path, step)
        if wandb_project:
            import wandb  # only --wandb needs it

            self.wandb = wandb.init(project=wandb_project, config=config, dir=os.path.dirname(path) or ".")

    def write(self, record):
        if self.master:
            record = {k: v for k, v in record.items() if v is not None}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log(record, step=record["step"])

    def close(self):
        if self.wandb:
            self.wandb.finish()


def run_summary(model, meta, args, dist, device, dtype, grad_accum, peak, peak_source):
    """The lines a run prints before its first step: the model, the batch, the sharding, the MFU's yardstick
    (transformer.py's GPT, its data's meta.json, its flags, its Distributed)."""
    c, B, T = model.config, args.batch_size, args.seq_len
    vocab = f"vocab {meta['vocab_size']}"
    vocab += f" (padded to {c.vocab_size})" if c.vocab_size != meta["vocab_size"] else ""
    lines = [f"model: {model.num_params():,} parameters | {c.pos} positions, {c.norm}, {c.mlp}, "
             f"{c.n_layer} layers x {c.n_head} heads x {c.n_embd} wide | {vocab} ({meta['tokenizer']})",
             f"batch: {B} x {T} tokens x {dist.world} processes x {grad_accum} accumulation steps = "
             f"{B * T * dist.world * grad_accum:,} tokens/step | device {device}, {str(dtype).removeprefix('torch.')}"
             f"{', compiled' if args.compile else ''}"]
    if args.fsdp:
        local = sum(p.to_local().numel() for p in model.parameters())
        lines.append(f"FSDP: weights, gradients and AdamW state sharded over {dist.world} processes; "
                     f"rank 0 holds {local:,} of {model.num_params():,} parameters")
    lines.append("MFU per device, against " + (f"{peak / 1e12:.3g} TFLOP/s ({peak_source})" if peak else peak_source))
    return lines


def log_line(r):
    val = f" | val {r['val_loss']:.4f}" if "val_loss" in r else ""
    val += f" ({r['val_bpb']:.4f} bits/byte)" if "val_bpb" in r else ""
    val += f" | hellaswag {r['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in r else ""
    mfu_text = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    return (f"step {r['step']:5d} | loss {r['loss']:.4f}{val} | lr {r['lr']:.2e} | norm {r['grad_norm']:.3f} | "
            f"{r['tokens_per_s']:,.0f} tok/s | MFU {mfu_text}")


def keep_metrics_until(path, step):
    """Keep the metrics.jsonl lines of the first `step` steps (none for a fresh run) and drop the rest, atomically:
    a resumed run redoes those. A line cut short by a kill -9 is dropped too. A line's "step" counts the steps
    completed, as the log does: 1 for the first."""
    lines = []
    if step > 0 and os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    if line.endswith("\n") and json.loads(line)["step"] <= step:
                        lines.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


NANOGPT_CPU_VAL_LOSS = 1.8857  # nanoGPT's README: train_shakespeare_char's val loss with its CPU flags


def plot_run(out_dir, meta):
    """loss.png of the run in out_dir, on the data that meta describes. On tiny Shakespeare (1,115,394 bytes, any
    tokenizer) nanoGPT's CPU recipe is the loss to beat, per byte."""
    shakespeare = sum(s.get("bytes", 0) for s in meta.get("splits", {}).values()) == 1115394
    return plot_metrics(os.path.join(out_dir, "metrics.jsonl"),
                        NANOGPT_CPU_VAL_LOSS / math.log(2) if shakespeare else None, "nanoGPT CPU recipe")


def plot_metrics(path, target_bpb=None, target_label="target"):
    """loss.png beside metrics.jsonl, when matplotlib is installed; returns its path (None without matplotlib).

    One step's loss is one batch's: noisy. So every step's train loss is drawn faint, and over it a
    moving average centred on each step, which shows the trend without lagging behind it; val loss,
    measured every --eval-every steps on the same batches, is drawn as points joined by a line. The left
    panel is the whole run; the right one zooms in on its second half, where the curves are close together
    and the differences that matter (train vs val, val vs target) are a few hundredths. Linear axes.

    Where the run logs val_bpb (its dataset counted bytes), a right-hand axis reads every loss in bits per
    byte, at the val split's tokens per byte (val_bpb / val_loss, the same on every line), and `target_bpb`
    (a loss to beat in bits per byte, named target_label) is a horizontal line: so runs with different
    tokenizers meet the same target. Without byte counts there is no such axis and no target line."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend needed
    except ImportError:
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    if not rows:  # nothing logged yet
        return None
    steps, loss = np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    bits = [r["val_bpb"] / r["val_loss"] for r in rows if r.get("val_bpb") and r["val_loss"] > 0]  # per nat/token
    bits = bits[-1] if bits else None
    target = target_bpb / bits if target_bpb is not None and bits else None  # the target as a loss per token
    # Moving average over 2h+1 steps (fewer at the ends), from a running sum: smooth[i] = mean(loss[lo:hi]).
    n, h = len(loss), max(1, len(loss) // 80)
    total = np.concatenate([[0.0], np.cumsum(loss)])  # (n + 1,)
    lo, hi = np.maximum(np.arange(n) - h, 0), np.minimum(np.arange(n) + h + 1, n)
    smooth = (total[hi] - total[lo]) / (hi - lo)  # (n,)

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    whole, tail = fig.subplots(1, 2)
    for ax in (whole, tail):
        ax.plot(steps, loss, color="tab:blue", alpha=0.2, linewidth=0.8, label="train loss, each step")
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train loss, mean of {2 * h + 1} steps")
        if val:
            in_bits = f", {val[-1][1] * bits:.4f} bits/byte" if bits else ""
            ax.plot(*zip(*val), "o-", color="tab:orange", markersize=4, linewidth=1.5,
                    label=f"val loss (last {val[-1][1]:.4f}{in_bits})")
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle="--", linewidth=1.2,
                       label=f"{target_label} {target_bpb:.4f} bits/byte ({target:.4f} per token)")
        if bits:
            right = ax.secondary_yaxis("right", functions=(lambda loss: loss * bits, lambda bpb: bpb / bits))
            right.set_ylabel("bits per byte (at the val split's bytes per token)")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    margin = 0.02 * (steps[-1] - steps[0]) + 0.5  # so the last val point is drawn whole
    whole.set(ylabel="loss (cross-entropy per token)", title="whole run", xlim=(steps[0], steps[-1] + margin))
    # The zoom: the second half's steps, and a y range that holds its average, val points and the target.
    first = steps[n // 2]
    near = [*smooth[n // 2 :], *(v for s, v in val if s >= first), *([target] if target is not None else [])]
    pad = 0.15 * (max(near) - min(near)) + 1e-3
    tail.set(title="second half, zoomed in", xlim=(first, steps[-1] + margin), ylim=(min(near) - pad, max(near) + pad))
    whole.legend(loc="upper right")
    fig.suptitle(f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}: {n} steps")
    out = os.path.join(os.path.dirname(path), "loss.png")
    fig.savefig(out, dpi=110)
    return out


def small_png(png, out, colors=64):
    """A copy of a picture small enough to commit (docs/img/loss.png): the same pixels on a palette of `colors`
    (Pillow's octree, which keeps the few flat colours of a plot exact), compressed. loss.png's faint
    every-step line blends into thousands of colours; on a palette the file is about a fifth as large."""
    from PIL import Image  # matplotlib's own dependency: present wherever plot_metrics drew `png`

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with Image.open(png) as image:
        image.convert("RGB").quantize(colors, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)
    return out
