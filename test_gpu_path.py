"""The GPU path, run on the CPU: what a multi-GPU run decides (device per rank, MFU, the peak table, SDPA
kernels, padding, host syncs, DDP options) and the CUDA-only features that have a CPU twin (torch.compile,
bf16 and fp16 autocast with loss scaling, DDP over gloo, several processes == one process with
accumulation across epoch ends). Where a behaviour exists only on CUDA, the logic that decides it is tested."""

import collections
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import metrics as metrics_py
import transformer
from conftest import write_dataset
from test_training import ENV, SCRIPT, TINY, losses, metrics, train
from transformer import GPT, GPTConfig


@pytest.fixture(scope="module")
def short_epochs(tmp_path_factory):
    """So little training data that an epoch is 4 steps of 8 x 17 tokens: runs cross several epoch ends."""
    out = str(tmp_path_factory.mktemp("short") / "d")
    write_dataset(out, {"train": [600], "val": [400]}, seed=3)
    return out


# -----------------------------------------------------------------------------
# What a GPU run decides


def test_a_bare_cuda_device_becomes_the_gpu_of_the_local_rank():
    assert transformer.pick_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert transformer.pick_device("cuda:1", local_rank=3) == torch.device("cuda", 1)  # an explicit index stays
    assert transformer.pick_device("cpu", local_rank=3) == torch.device("cpu")


def test_mfu_is_one_devices_share_of_the_tokens_over_one_devices_peak():
    # 2 processes at 2,000 tokens/s together: 1,000 each x 1e6 FLOPs / 1e9 FLOP/s peak = 100 %
    assert metrics_py.mfu(2000, 1e6, world=2, peak=1e9) == pytest.approx(1.0)
    assert metrics_py.mfu(2000, 1e6, world=1, peak=1e9) is None  # 200%: the peak was wrong, not the step
    assert metrics_py.mfu(2000, 1e6, world=2, peak=None) is None  # an unknown GPU has no MFU


def test_a_run_whose_peak_was_timed_on_busy_cores_prints_no_mfu_above_100_percent(data, tmp_path, monkeypatch,
                                                                                  capsys):
    """A CPU peak measured while other processes held the cores can be far too low: the log then says n/a, never
    an impossible figure. (peak_flops returns a starved measurement here; every other run is its real twin.)"""
    monkeypatch.setattr(transformer, "peak_flops", lambda device: (1e3, "fp32 matmul measured on busy cores"))
    train(data, tmp_path, "--max-steps", "3")
    assert all("mfu" not in r for r in metrics(tmp_path))  # None is left out of metrics.jsonl
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert lines and all(line.endswith("MFU n/a") for line in lines)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989), ("NVIDIA H800", 989),
    ("NVIDIA B200", 2250), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA A10G", 125), ("NVIDIA A10", 125), ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("NVIDIA L40", 181),
    ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA GeForce RTX 3090", 71), ("NVIDIA RTX A6000", 155),
    ("Tesla V100-SXM2-16GB", None), ("NVIDIA GeForce GTX 1080 Ti", None), ("NVIDIA H20", None),
])
def test_the_peak_table_matches_the_most_specific_gpu_name(name, tflops):
    """Names as torch.cuda.get_device_name returns them; datasheet dense bf16."""
    peak = metrics_py.gpu_peak_flops(name)
    assert (peak / 1e12 if peak else None) == tflops


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    assert metrics_py.matmul_peak_flops(torch.device("cpu")) > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_the_cpu_peak_is_measured_once_per_process_and_thread_count(monkeypatch):
    """A second run in one process (bench.py's rows, a notebook, these tests) reuses the first one's figure."""
    timed = []
    monkeypatch.setattr(metrics_py, "matmul_peak_flops", lambda device: timed.append(device) or 1e9 * len(timed))
    metrics_py.cpu_peak_flops.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert metrics_py.peak_flops(cpu)[0] == metrics_py.peak_flops(cpu)[0] == 1e9 and len(timed) == 1
        assert metrics_py.cpu_peak_flops("cpu", torch.get_num_threads() + 1) == 2e9  # another thread count: timed
    finally:
        metrics_py.cpu_peak_flops.cache_clear()  # the next run measures for real


def test_positions_keep_nothing_that_changes_after_the_first_forward():
    """What a compiled graph reads must not change under it: ALiBi's slopes exist from the start, and RoPE's
    cos/sin are computed from the positions, so generating far past block_size grows no table."""
    assert GPT(GPTConfig.preset("tiny", "gpt2", pos="alibi", n_head=4)).positions.alibi.shape == (4,)
    model = GPT(GPTConfig.preset("tiny", "llama", block_size=16)).eval()
    transformer.generate(model, torch.zeros(1, 1, dtype=torch.long), 40, temperature=0)
    assert dict(model.named_buffers()) == {}


def sdpa_calls(monkeypatch):
    """Record the key heads and enable_gqa of every SDPA call, then run the real kernel."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.size(1), k.size(1), kwargs["attn_mask"] is not None, kwargs["enable_gqa"]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("pos, masked", [("alibi", True), ("rope", False)])
def test_gqa_with_a_float_mask_repeats_kv_and_without_one_keeps_enable_gqa(monkeypatch, pos, masked):
    """On CUDA, enable_gqa with a float mask leaves only SDPA's math kernel ((B, nh, T, T) scores in memory);
    repeated k/v run the memory-efficient kernel. The maskless (flash) path keeps enable_gqa: no copy."""
    model = GPT(GPTConfig.preset("tiny", "gpt2", pos=pos, n_head=4, n_kv_head=2))
    calls = sdpa_calls(monkeypatch)
    model(torch.randint(0, 256, (2, 10)))
    expected = (4, 4, True, False) if masked else (4, 2, False, True)  # (q heads, k heads, mask, enable_gqa)
    assert calls == [expected] * model.config.n_layer


def test_new_models_pad_the_vocab_to_a_multiple_of_64_and_hf_models_keep_theirs():
    args = transformer.parse_args([])
    assert transformer.model_config(args, 50257).vocab_size == 50304
    assert transformer.model_config(args, 256).vocab_size == 256


def test_perplexity_counts_every_row_of_the_head_the_padded_ids_too():
    """As the training loss, transformers and lm-eval do (issue #25.7): the same weights, the same loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=320)).eval()  # a tokenizer of 300 ids, padded
    tokens = np.random.default_rng(0).integers(0, 300, 200)
    loss, _ = transformer.evaluate_tokens(model, tokens, 4, torch.device("cpu"), torch.float32, progress=False)
    with torch.no_grad():
        rows = torch.from_numpy(tokens)
        logits = torch.cat([model(rows[i: i + 65][None, :-1])[0][0] for i in range(0, 199, 64)])  # all 320 rows
    expected = F.cross_entropy(logits, rows[1:200]).item()
    assert loss == pytest.approx(expected, abs=1e-5)


def test_a_training_step_waits_for_the_device_once(data, tmp_path, monkeypatch):
    """Each host read of a tensor (item, tolist, bool, float) is a sync on a GPU; a step has one. Measured on
    the real loop: 6 steps read 3 times more than 3 steps (set-up, the first step and the last, which log,
    evaluate and save, are the same in both)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: (reads.append(_name),
                                                                                           _real(self, *a))[1])

    def run(steps):
        reads.clear()
        train(data, tmp_path / str(steps), "--max-steps", str(steps), "--log-every", "1000")
        return collections.Counter(reads)

    three, six = run(3), run(6)
    assert six - three == collections.Counter(tolist=3) and not three - six


def test_ddp_keeps_gradients_in_its_buckets_and_does_not_broadcast_buffers(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        dist = transformer.Distributed()
        dist.enabled = True
        args = transformer.parse_args(["--no-compile"])
        ddp = transformer.wrap_model(GPT(GPTConfig.preset("tiny", "llama")), args, dist, torch.device("cpu"),
                                        torch.float32)
        assert ddp.gradient_as_bucket_view and not ddp.broadcast_buffers
    finally:
        torch.distributed.destroy_process_group()


def test_resuming_maps_the_checkpoint_instead_of_reading_it_into_memory(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, {"format": transformer.CKPT_FORMAT, "w": torch.zeros(4)})
    seen, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: (seen.append(kw), real(*a, **kw))[1])
    transformer.load_checkpoint(path)
    assert seen[0]["mmap"] is True and seen[0]["weights_only"] is True


# -----------------------------------------------------------------------------
# CUDA's features, on the CPU


@pytest.mark.slow
def test_compiled_training_with_gradient_checkpointing_equals_eager(data, tmp_path):
    train(data, tmp_path / "eager", "--max-steps", "3")
    train(data, tmp_path / "compiled", "--max-steps", "3", "--compile", "--grad-checkpointing")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.05), ("float16", 0.01)])
def test_autocast_tracks_fp32_and_keeps_fp32_weights(data, tmp_path, dtype, tolerance):
    train(data, tmp_path / "fp32", "--max-steps", "5")
    train(data, tmp_path / dtype, "--max-steps", "5", "--dtype", dtype)
    assert losses(tmp_path / dtype) == pytest.approx(losses(tmp_path / "fp32"), abs=tolerance)
    assert losses(tmp_path / dtype) != losses(tmp_path / "fp32")  # it did run in lower precision
    ckpt = transformer.load_checkpoint(str(tmp_path / dtype / "ckpt.pt"))
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())  # master weights
    assert (ckpt["scaler"] != {}) == (dtype == "float16")  # fp16 alone scales the loss


def test_fp16_loss_scaling_skips_a_step_with_inf_gradients_and_carries_on(data, tmp_path, monkeypatch):
    """GradScaler's contract, on the CPU, in the real loop: an inf gradient at step 2 leaves the weights as they
    were and halves the scale, and training carries on. The hook is added through configure_optimizer (a
    wrapper of the real one); test_autocast_tracks_fp32_and_keeps_fp32_weights is the run without it."""
    real, seen = transformer.configure_optimizer, {"backward": 0}

    def poison_second_step(model, *args, **kwargs):
        def hook(grad):
            seen["backward"] += 1
            return grad * float("inf") if seen["backward"] == 2 else grad
        model.transformer.wte.weight.register_hook(hook)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(transformer, "configure_optimizer", poison_second_step)
    train(data, tmp_path, "--max-steps", "4", "--dtype", "float16")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert not np.isfinite(rows[1]["grad_norm"]) and all(np.isfinite(r["grad_norm"]) for r in rows if r is not rows[1])
    assert transformer.load_checkpoint(str(tmp_path / "ckpt.pt"))["scaler"]["scale"] == 2.0**15  # halved once


def torchrun(data, out, *flags):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
         "--data", data, "--out-dir", str(out), *TINY, *flags],
        capture_output=True, text=True, timeout=400, env=ENV,
    )
    assert result.returncode == 0, f"torchrun exited {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_any_split_of_the_batch_trains_alike_across_epoch_ends_and_resumes_under_another(short_epochs, tmp_path):
    """2 processes x B 4 == 1 process x B 4 x 2 accumulation steps == 1 process x B 8, over 3 epochs of 4 steps;
    and a checkpoint of one split resumes under another, continuing exactly (dropout 0)."""
    steps = ["--max-steps", "12", "--eval-every", "6", "--lr-decay-steps", "16"]
    train(short_epochs, tmp_path / "one", "--batch-size", "8", *steps)
    train(short_epochs, tmp_path / "accum", "--batch-size", "4", "--total-batch-tokens", str(8 * 16), *steps)
    run = torchrun(short_epochs, tmp_path / "two", "--batch-size", "4", *steps)
    one, accum, two = (metrics(tmp_path / name) for name in ("one", "accum", "two"))
    for other in (accum, two):
        assert [r["loss"] for r in other] == pytest.approx([r["loss"] for r in one], abs=1e-5)
        assert [r.get("val_loss", 0) for r in other] == pytest.approx([r.get("val_loss", 0) for r in one], abs=1e-5)
    assert all(r["mfu"] <= 1 for r in two if "mfu" in r) and "MFU per device" in run.stdout
    # the 2-process run's checkpoint at step 12, continued by one process with accumulation
    (tmp_path / "two_then_one").mkdir()
    (tmp_path / "two_then_one" / "ckpt.pt").write_bytes((tmp_path / "two" / "ckpt.pt").read_bytes())
    train(short_epochs, tmp_path / "two_then_one", "--batch-size", "4", "--total-batch-tokens", str(8 * 16),
          "--max-steps", "16", "--eval-every", "6", "--lr-decay-steps", "16", "--resume")
    train(short_epochs, tmp_path / "one_16", "--batch-size", "8", "--max-steps", "16", "--eval-every", "6",
          "--lr-decay-steps", "16")
    resumed = [r["loss"] for r in metrics(tmp_path / "two_then_one")]
    assert resumed == pytest.approx([r["loss"] for r in metrics(tmp_path / "one_16")][12:], abs=1e-5)


@pytest.mark.slow
def test_compiled_ddp_with_gradient_checkpointing_equals_one_eager_process(data, tmp_path):
    train(data, tmp_path / "one", "--batch-size", "8", "--max-steps", "3")
    torchrun(data, tmp_path / "two", "--batch-size", "4", "--max-steps", "3", "--compile", "--grad-checkpointing")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
