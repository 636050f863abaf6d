"""--fsdp (transformer.py sections 8 and 10): PyTorch's FSDP2 (fully_shard) over 2 CPU processes with gloo,
started with torchrun as a user would. Two processes with accumulation and clipping equal one process; each
holds half of the weights and of AdamW's state; the checkpoint is a one-process checkpoint (it samples,
evaluates and resumes in one process) and a one-process checkpoint resumes under FSDP; --compile and
--grad-checkpointing run. Four torchrun launches, about a minute and a half on a quiet 2-core machine,
most of it in the compiled one."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import checkpoint
import fsdp
import transformer
from conftest import torchrun_leaving
from test_training import ENV, SCRIPT, TINY, metrics, train

REPO = os.path.dirname(os.path.abspath(__file__))
START_UP_S = 400  # torch's cold start in two processes on a busy 2-core machine, and compiling on a CPU
# The gpt2 arch has a tied head (one parameter in two modules) and 1-D biases; 2 blocks are sharded one by one.
# --grad-clip 0.3 is below every step's gradient norm (0.8 to 1.0), so clipping scales every step here.
FLAGS = [*TINY, "--arch", "gpt2", "--n-layer", "2", "--grad-clip", "0.3", "--lr-decay-steps", "6"]
ONE = ["--batch-size", "8"]  # one process: 8 x 16 tokens a step
FSDP = ["--fsdp", "--batch-size", "2", "--total-batch-tokens", str(8 * 16)]  # 2 processes x 2 x 2 micro-steps


def torchrun(cmd, cwd):
    """cmd under torchrun with 2 processes; the result, after asserting every process exited 0."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *map(str, cmd)], cwd=cwd, capture_output=True, text=True, timeout=START_UP_S, env=ENV)
    assert result.returncode == 0, f"torchrun exited {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    return result


def losses(out_dir):
    return [r["loss"] for r in metrics(out_dir)]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One process for 6 steps ("straight") and for 4 ("one"; "one_sharded" saves sharded); 2 FSDP processes for 4
    ("fsdp", sharded by default); the same schedule."""
    root = tmp_path_factory.mktemp("runs")
    train(data, root / "straight", *FLAGS, *ONE, "--max-steps", "6")
    train(data, root / "one", *FLAGS, *ONE, "--max-steps", "4")
    train(data, root / "one_sharded", *FLAGS, *ONE, "--max-steps", "4", "--ckpt-format", "sharded")
    result, left = torchrun_leaving(["--data", data, "--out-dir", root / "fsdp", *FLAGS, *FSDP, "--max-steps", "4"],
                                    root, ENV, START_UP_S)
    assert result.returncode == 0, f"torchrun exited {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    return root, result, left


# -----------------------------------------------------------------------------
# Training: 2 FSDP processes == 1 process


@pytest.mark.slow
def test_two_fsdp_processes_with_accumulation_and_clipping_equal_one_process(runs):
    root, result, _ = runs
    one, fsdp = metrics(root / "straight")[:4], metrics(root / "fsdp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0.3 for r in one)  # clipping acted on every step
    for key in ("loss", "grad_norm"):  # the norm is the whole gradient's, over both processes' shards
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in one], abs=1e-5)
    assert fsdp[-1]["val_loss"] == pytest.approx(metrics(root / "one")[-1]["val_loss"], abs=1e-5)  # at its end
    assert "2 x 16 tokens x 2 processes x 2 accumulation steps" in result.stdout
    assert "rank 0 holds 17,088 of 34,176 parameters" in result.stdout
    assert result.stdout.count("--- sample ---") == 1  # both processes sample (the weights are split), rank 0 prints


@pytest.mark.slow
def test_a_finished_fsdp_process_ends_before_pythons_shutdown(runs):
    """Under FSDP torch's DTensor keeps the process group, and gloo's worker threads, past destroy_process_group
    (torch 2.13); one of them freeing a tensor during Python's shutdown aborted 1 finished run in 25 to 40. So a
    finished gloo process ends with os._exit(0) once everything is written: there is no shutdown to race."""
    *_, left = runs
    assert [r and r["status"] for r in left] == [0, 0], left


# -----------------------------------------------------------------------------
# Checkpoints: sharded under FSDP, read by any number of processes; the single file when asked for


@pytest.mark.slow
def test_each_fsdp_process_writes_its_own_shards_into_a_complete_step_folder(runs):
    root, *_ = runs
    assert sorted(os.listdir(root / "fsdp")) == ["loss.png", "metrics.jsonl", "step_000004"]  # no ckpt.pt, no .tmp
    assert sorted(os.listdir(root / "fsdp" / "step_000004")) == [".metadata", "COMPLETE", "__0_0.distcp",
                                                                 "__1_0.distcp", "train.pt"]


@pytest.mark.slow
def test_an_fsdp_sharded_checkpoint_reads_in_one_process_as_the_one_process_weights(runs):
    root, *_ = runs
    one = transformer.load_checkpoint(str(root / "one" / "ckpt.pt"))
    fsdp = transformer.load_checkpoint(str(root / "fsdp"))  # a run's --out-dir: its newest complete step folder
    assert sorted(fsdp["model"]) == sorted(one["model"])
    for k, v in fsdp["model"].items():
        assert type(v) is torch.Tensor and v.dtype == one["model"][k].dtype  # no DTensor inside
        torch.testing.assert_close(v, one["model"][k], atol=1e-5, rtol=1e-4)
    assert fsdp["step"] == 4 and fsdp["loader"] == one["loader"] and fsdp["config"] == one["config"]


@pytest.mark.slow
def test_fsdp_with_ckpt_format_file_writes_a_one_process_checkpoint(compiled, runs):
    root, *_ = runs
    one = transformer.load_checkpoint(str(root / "one" / "ckpt.pt"))
    fsdp = transformer.load_checkpoint(str(compiled / "ckpt.pt"))  # 2 steps, gathered to rank 0
    assert list(fsdp["model"]) == list(one["model"])
    assert all(type(v) is torch.Tensor and v.dtype == one["model"][k].dtype for k, v in fsdp["model"].items())
    tied = fsdp["model"]["lm_head.weight"], fsdp["model"]["transformer.wte.weight"]
    assert tied[0].data_ptr() == tied[1].data_ptr()  # one tensor under both names, stored once, as in one's
    # the optimizer's state as torch.optim keys it (ids 0, 1, ...) with the same groups
    groups = [[{**g, "lr": None} for g in c["optimizer"]["param_groups"]] for c in (fsdp, one)]  # lr: its step's
    assert groups[0] == groups[1]
    assert list(fsdp["optimizer"]["state"]) == list(one["optimizer"]["state"])
    for i, state in fsdp["optimizer"]["state"].items():
        assert list(state) == list(one["optimizer"]["state"][i])
        assert all(type(v) is torch.Tensor for v in state.values())
    assert fsdp["step"] == 2 and len(fsdp["rng"]) == 2


@pytest.mark.slow
def test_an_fsdp_checkpoint_samples_in_one_process(runs, capsys):
    root, *_ = runs
    capsys.readouterr()
    transformer.main(["--sample", "--ckpt", str(root / "fsdp"), "--device", "cpu", "--prompt", "ab",
                      "--max-new-tokens", "20"])
    out = capsys.readouterr().out
    assert out.startswith("ab") and out.rstrip().endswith("-" * 40)


@pytest.mark.slow
def test_an_fsdp_checkpoint_evaluates_in_one_process_as_the_one_process_checkpoint(runs, data, capsys):
    root, *_ = runs
    lines = []
    for ckpt in (root / "fsdp" / "step_000004", root / "one" / "ckpt.pt"):  # a step folder or a file, alike
        capsys.readouterr()
        transformer.main(["--eval", "--ckpt", str(ckpt), "--data", data, "--device", "cpu"])
        lines.append(capsys.readouterr().out)
    loss = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert "perplexity" in lines[0] and loss[0] == pytest.approx(loss[1], abs=1e-4)  # the line shows 4 decimals


@pytest.mark.slow
def test_an_fsdp_sharded_checkpoint_resumes_in_one_process_where_it_left_off(runs, data):
    """2 -> 1: each weight and AdamW moment put together from both processes' shards."""
    root, *_ = runs
    out = root / "fsdp_then_one"
    shutil.copytree(root / "fsdp", out)
    train(data, out, *FLAGS, *ONE, "--max-steps", "6", "--resume")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert losses(out) == pytest.approx(losses(root / "straight"), abs=1e-5)
    assert checkpoint.find_checkpoints(str(out)) == [str(out / "ckpt.pt"), str(out / "step_000004")]  # the newest first


@pytest.mark.slow
@pytest.mark.parametrize("source, batch", [
    ("one", FSDP),  # 1 -> 2 from a single file: every process reads the whole tensors and keeps its shard
    ("one_sharded", FSDP),  # 1 -> 2 from a sharded folder: every process reads only what its shards need
    ("fsdp", ["--fsdp", "--batch-size", "4"]),  # 2 -> 2 without accumulation (it had 2 micro-steps)
])
def test_a_checkpoint_resumes_under_fsdp_where_it_left_off(runs, data, source, batch):
    root, *_ = runs
    out = root / f"{source}_then_fsdp"
    shutil.copytree(root / source, out)
    result = torchrun([SCRIPT, "--data", data, "--out-dir", out, *FLAGS, *batch, "--max-steps", "6", "--resume"],
                      root)
    assert "resumed" in result.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert losses(out) == pytest.approx(losses(root / "straight"), abs=1e-5)
    straight = transformer.load_checkpoint(str(root / "straight" / "ckpt.pt"))["model"]
    resumed = transformer.load_checkpoint(str(out))["model"]
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# What each process holds, measured from inside: a small program under torchrun that shards a model with
# fsdp.shard, takes one bf16 step, and writes this process's local sizes to rank<N>.json
# (a file per process: two processes printing to one pipe can interleave their lines). It also reports
# meta_init_report for two architectures, which the fast tier runs in one process (test_one_fsdp_process_...).


def meta_init_report(arch, x, **extra):
    """A tiny arch model built on the meta device, sharded over the default group's processes, then initialised
    shard by shard (fsdp.DeferredInit), against a whole build from the same seed: are its weights bit for bit
    those of the whole build, are the same random numbers drawn, is the loss on x the same, is the head tied."""
    config = transformer.GPTConfig.preset("tiny", arch, block_size=16, vocab_size=65, **extra)  # uneven shards
    torch.manual_seed(0)
    whole = transformer.GPT(config)
    rng_after = torch.get_rng_state()
    torch.manual_seed(0)
    with fsdp.DeferredInit() as init:
        meta = transformer.GPT(config)
    fsdp.shard(meta, torch.float32, init, torch.device("cpu"))
    meta.positions.make_tables()
    return {"bit_equal": all(torch.equal(p.full_tensor(), whole.get_parameter(n)) for n, p in meta.named_parameters()),
            "same_rng_after": torch.equal(torch.get_rng_state(), rng_after),
            "same_loss": meta(x, x)[1].item() == whole(x, x)[1].item(),
            "tied": meta.lm_head.weight is meta.transformer.wte.weight}


SHARDS = """
import json, sys
import torch
import fsdp
import transformer
from test_fsdp import meta_init_report

data, out = sys.argv[1], sys.argv[2]
dist, device, dtype = transformer.Distributed(), torch.device("cpu"), torch.bfloat16
with dist.running(device):
    torch.manual_seed(0)
    model = transformer.GPT(transformer.GPTConfig.preset("tiny", "gpt2", block_size=16))
    total = model.num_params()
    fsdp.shard(model, dtype)
    optimizer = transformer.configure_optimizer(model, 1e-3, 0.1, device.type)
    forward_dtypes = []  # the head's weight as the forward uses it
    model.lm_head.register_forward_pre_hook(lambda module, args: forward_dtypes.append(str(module.weight.dtype)))
    buf = transformer.DataLoaderLite(data, "train", 2, 16, dist.rank, dist.world).next_batch()
    with transformer.autocast(device, dtype):
        _, loss = model(buf[:, :-1], buf[:, 1:])
    loss.backward()
    optimizer.step()
    report = {
        "total": total,
        "params": sum(p.to_local().numel() for p in model.parameters()),
        "adamw": sum(v.to_local().numel() for s in optimizer.state.values() for k, v in s.items() if k != "step"),
        "stored_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "forward_dtypes": sorted(set(forward_dtypes)),
        "tied": model.lm_head.weight is model.transformer.wte.weight,
    }
    for arch, extra in (("gpt2", {}), ("llama", {}), ("nanochat", dict(value_embeds=True, x0_lambdas=True))):
        # a tied head and learned positions; an untied head, RoPE tables, SwiGLU; value embeddings and x0 lambdas
        report[f"{arch}_meta_init"] = meta_init_report(arch, buf[:, :-1] % 65, **extra)
    with open(f"{out}/rank{dist.rank}.json", "w") as f:
        json.dump(report, f)
"""


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory):
    """Each process's report, in rank order."""
    root = tmp_path_factory.mktemp("shards")
    (root / "holdings.py").write_text(SHARDS)
    torchrun([root / "holdings.py", data, root], root)
    return [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_each_fsdp_process_holds_half_of_the_weights_and_of_the_adamw_state(shards):
    total = shards[0]["total"]
    assert sum(r["params"] for r in shards) == total  # every parameter in exactly one shard
    for r in shards:
        assert r["params"] == pytest.approx(total / 2, rel=0.05)
        assert r["adamw"] == 2 * r["params"]  # exp_avg and exp_avg_sq for this process's shard only


@pytest.mark.slow
def test_a_model_built_on_the_meta_device_gets_the_initial_weights_of_a_whole_build_bit_for_bit(shards):
    """fsdp.DeferredInit: no process ever holds the whole model, and the same seed gives the same start."""
    for r in shards:
        for arch in ("gpt2", "llama", "nanochat"):
            got = r[f"{arch}_meta_init"]
            assert got["bit_equal"] and got["same_rng_after"] and got["same_loss"], (arch, got)
        assert r["gpt2_meta_init"]["tied"]


@pytest.mark.slow
def test_the_tied_head_stays_one_parameter_when_sharded(shards):
    assert all(r["tied"] for r in shards)


@pytest.mark.slow
def test_fsdp_bf16_gathers_bf16_weights_for_the_forward_and_keeps_fp32_shards(shards):
    for r in shards:
        assert r["forward_dtypes"] == ["torch.bfloat16"] and r["stored_dtypes"] == ["torch.float32"]


@pytest.fixture
def one_process_group():
    """A gloo process group of one process, in this process (what torchrun's first process joins, world size 1)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("arch, extra", [("gpt2", {}), ("llama", {}),
                                         ("nanochat", dict(value_embeds=True, x0_lambdas=True))])
def test_one_fsdp_process_built_on_the_meta_device_starts_at_the_weights_of_a_whole_build(one_process_group, arch,
                                                                                          extra):
    """The fast tier's twin of the torchrun check above: fsdp.DeferredInit and fsdp.shard in one process."""
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    assert meta_init_report(arch, x, **extra) == {"bit_equal": True, "same_rng_after": True, "same_loss": True,
                                         "tied": arch == "gpt2"}


# -----------------------------------------------------------------------------
# The GPU path's features, on the CPU


@pytest.fixture(scope="module")
def compiled(runs, data):
    """2 FSDP processes, compiled, with gradient checkpointing, for 2 steps; saving the single file."""
    root, *_ = runs
    out = root / "compiled"
    torchrun([SCRIPT, "--data", data, "--out-dir", out, *FLAGS, *FSDP, "--max-steps", "2", "--compile",
              "--grad-checkpointing", "--ckpt-format", "file"], root)
    return out


@pytest.mark.slow
def test_compiled_fsdp_with_gradient_checkpointing_equals_one_eager_process(runs, compiled):
    root, *_ = runs
    assert losses(compiled) == pytest.approx(losses(root / "straight")[:2], abs=1e-4)


# -----------------------------------------------------------------------------
# HSDP: 2 "nodes" (two torchrun launchers on this machine) x 2 processes


@pytest.mark.slow
def test_hsdp_on_two_nodes_of_two_processes_equals_one_process(runs, data):
    """--fsdp hsdp: each weight sharded over a node's 2 processes, replicated across the 2 nodes."""
    root, *_ = runs
    out = root / "hsdp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=hsdp", SCRIPT, "--data", data, "--out-dir", str(out), *FLAGS,
         "--fsdp", "hsdp", "--batch-size", "2", "--max-steps", "4"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    results = [p.communicate(timeout=START_UP_S) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(err[-2000:] for _, err in results)
    said = "".join(stdout for stdout, _ in results)
    assert "2 x 16 tokens x 4 processes" in said and "rank 0 holds 17,088 of 34,176 parameters" in said  # a half
    assert losses(out) == pytest.approx(losses(root / "straight")[:4], abs=1e-5)


# -----------------------------------------------------------------------------
# What --fsdp refuses


def test_fsdp_without_torchrun_is_a_one_line_error(monkeypatch, one_line_error):
    monkeypatch.delenv("RANK", raising=False)
    line = one_line_error(["--fsdp"], status=2)
    assert "start it with torchrun" in line


@pytest.mark.parametrize("mode", ["--sample", "--eval"])
def test_fsdp_is_for_training_only(monkeypatch, one_line_error, mode):
    monkeypatch.setenv("RANK", "0")
    assert f"--fsdp is not read by {mode}" in one_line_error([mode, "--ckpt", "c.pt", "--fsdp"], status=2)


def test_fsdp_refuses_float16(monkeypatch):
    """fp16 needs a GradScaler that finds an inf in any process's shard; bf16 does not scale the loss at all."""
    monkeypatch.setenv("RANK", "0")
    args = transformer.parse_args(["--fsdp", "--no-compile"])
    model = transformer.GPT(transformer.GPTConfig.preset("tiny", "gpt2"))
    with pytest.raises(ValueError, match="not float16"):
        transformer.wrap_model(model, args, transformer.Distributed(), torch.device("cpu"), torch.float16)
