"""The specification of training (transformer.py sections 7 to 11): the data loader, the lr schedule,
the optimizer, checkpoints, resuming, gradient accumulation, DDP, signals, fine-tuning HF weights and the
errors a user sees. Offline, on CPU, with tiny models and small data: about a minute on a busy 2-core machine,
most of it in the two subprocess tests (torchrun, SIGINT).

Most runs call transformer.main([...]) in this process and read OUT_DIR/metrics.jsonl; a subprocess is
used only where the process itself is the subject (torchrun, SIGINT, the real command line).
"""

import contextlib
import importlib.machinery
import importlib.util
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import types
from importlib.util import find_spec

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import prepare_data
import transformer
from conftest import english_text, signal_after, write_dataset
from transformer import GPT, DataLoaderLite, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))

SCRIPT = os.path.join(REPO, "transformer.py")
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
# A model small enough for a 2-core CPU: every training run below takes well under a second of steps.
TINY = ["--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
        "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2", "--eval-every", "1000", "--eval-iters", "2"]
SEED = 1337  # transformer.py's default --seed


# -----------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True)
def fast_and_tidy(monkeypatch):
    """Give back whatever signal handlers a run installs in this process."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


def tiny_without(*flags):
    """TINY less some of its flags (and their values)."""
    pairs = dict(zip(TINY[::2], TINY[1::2], strict=True))
    return [x for flag, value in pairs.items() if flag not in flags for x in (flag, value)]


def train(data_dir, out_dir, *flags):
    transformer.main(["--data", str(data_dir), "--out-dir", str(out_dir), *TINY, *flags])


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return [r["loss"] for r in metrics(out_dir)]


def cli(cwd, *args, timeout=120, env=ENV):
    """transformer.py as a user runs it."""
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def tiny_state(**extra):
    """A minimal valid checkpoint dict."""
    return {"format": transformer.CKPT_FORMAT, "step": 0, **extra}


def inject_into_training_forward(monkeypatch, at_call, change):
    """Wrap GPT.forward: on the at_call-th training forward (1-based; eval forwards are not counted),
    replace the loss with change(loss)."""
    real = GPT.forward
    calls = [0]

    def forward(self, idx, targets=None, cache=None):
        logits, loss = real(self, idx, targets, cache)
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] == at_call:
                loss = change(loss)
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


# -----------------------------------------------------------------------------
# The lr schedule and the optimizer


def test_lr_warms_up_linearly_then_decays_on_a_cosine_to_min_lr():
    lr, min_lr, warmup, decay = 1.0, 0.1, 10, 110
    at = [transformer.lr_at(s, lr, min_lr, warmup, decay) for s in range(200)]
    # warmup: lr/warmup, 2 lr/warmup, ..., lr; a straight line through zero
    assert at[:warmup] == pytest.approx([lr * (s + 1) / warmup for s in range(warmup)])
    assert at[warmup] == pytest.approx(lr)
    # cosine from lr to min_lr between warmup and decay
    for s in (10, 35, 60, 85, 109):
        progress = (s - warmup) / (decay - warmup)
        assert at[s] == pytest.approx(min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert at[60] == pytest.approx((lr + min_lr) / 2)  # halfway down
    assert all(a >= b for a, b in zip(at[warmup:decay], at[warmup + 1 : decay + 1]))
    # at decay_steps and after: min_lr
    assert at[decay:] == [min_lr] * (200 - decay)
    # no warmup starts at the peak
    assert transformer.lr_at(0, lr, min_lr, 0, decay) == pytest.approx(lr)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_weight_decay_only_on_matrices(arch):
    model = GPT(GPTConfig.preset("tiny", arch))
    opt = transformer.configure_optimizer(model, lr=1e-3, weight_decay=0.1, device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter once (tied: once)
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)].endswith("c_attn.weight") for p in decay["params"])
    assert any("ln_" in names[id(p)] for p in no_decay["params"])  # norm weights are not decayed
    if arch == "gpt2":
        assert any(names[id(p)].endswith(".bias") for p in no_decay["params"])


# -----------------------------------------------------------------------------
# DataLoaderLite


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Two short train shards, so epochs are a few batches long: (dir, train shards)."""
    out = str(tmp_path_factory.mktemp("small") / "d")
    tokens = write_dataset(out, {"train": [500, 300], "val": [200]}, seed=1)
    return out, tokens["train"]


def locate(row, shards):
    """(shard, start) of the window `row` in the shards; asserts it is found exactly once."""
    hits = []
    for s, shard in enumerate(shards):
        windows = np.lib.stride_tricks.sliding_window_view(shard, len(row))
        hits += [(s, int(i)) for i in np.flatnonzero((windows == row).all(axis=1))]
    assert len(hits) == 1, f"window found {len(hits)} times"
    return hits[0]


def test_loader_yields_shifted_windows_each_used_once_per_epoch(small_data):
    data_dir, shards = small_data
    T = 8
    loader = DataLoaderLite(data_dir, "train", B=3, T=T, seed=5)
    windows = {}  # epoch -> (shard, start) of every window read in it
    for _ in range(80):  # two whole epochs of about 33 batches, and part of a third
        buf = loader.next_batch()
        assert buf.shape == (3, T + 1) and buf.dtype == torch.long  # x = buf[:, :-1], y = buf[:, 1:]
        for row in buf.numpy():
            windows.setdefault(loader.epoch, []).append(locate(row, shards))  # a T + 1 slice of a shard
    assert sorted(windows) == [0, 1, 2]
    for epoch in (0, 1):
        seen = windows[epoch]
        assert len(set(seen)) == len(seen)  # no window twice in an epoch
        assert len({start % T for _, start in seen}) == 1  # one offset per epoch, windows T apart
        assert len(seen) > (500 + 300) / T - 2 * 3 - 2  # all of the data but a window per shard and a batch
    assert windows[0] != windows[1]


def test_ranks_read_disjoint_slices_that_make_up_the_one_process_batch(small_data):
    data_dir, _ = small_data
    one = DataLoaderLite(data_dir, "train", B=6, T=8, seed=3)
    ranks = [DataLoaderLite(data_dir, "train", B=3, T=8, process_rank=r, num_processes=2, seed=3) for r in (0, 1)]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch
    for _ in range(3 * one.steps_per_epoch + 1):  # across epoch boundaries
        both = one.next_batch()
        b0, b1 = (r.next_batch() for r in ranks)
        assert torch.equal(torch.cat([b0, b1]), both)
        assert not any(torch.equal(a, b) for a in b0 for b in b1)  # disjoint: no window on both ranks


def test_loader_state_restores_the_next_batches(small_data):
    data_dir, _ = small_data
    loader = DataLoaderLite(data_dir, "train", B=4, T=8, seed=9)
    for _ in range(loader.steps_per_epoch - 3):  # so that the next 10 batches cross into epoch 1
        loader.next_batch()
    state = loader.state_dict()
    assert all(isinstance(v, int) for v in state.values())  # plain ints: a weights_only checkpoint holds them
    expected = [loader.next_batch() for _ in range(10)]
    restored = DataLoaderLite(data_dir, "train", B=4, T=8, seed=9)
    restored.load_state_dict(state)
    for buf, again in zip(expected, (restored.next_batch() for _ in range(10))):
        assert torch.equal(buf, again)
    other = DataLoaderLite(data_dir, "train", B=2, T=8, seed=9)
    with pytest.raises(ValueError, match="step_windows"):
        other.load_state_dict(state)


def test_shuffle_differs_across_epochs_and_is_determined_by_the_seed(small_data):
    data_dir, _ = small_data

    def epochs(seed, n=2):
        loader = DataLoaderLite(data_dir, "train", B=4, T=8, seed=seed)
        return [torch.cat([loader.next_batch() for _ in range(loader.steps_per_epoch)]) for _ in range(n)]

    first, second = epochs(seed=0)
    assert not torch.equal(first, second)
    again = epochs(seed=0)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)
    assert not torch.equal(epochs(seed=1)[0], first)


def test_a_split_too_small_for_one_batch_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, {"train": [40], "val": [40]})
    with pytest.raises(ValueError, match=r"train split has 40 tokens, too few for one step of 4 x 17"):
        DataLoaderLite(str(tmp_path), "train", B=4, T=16)
    DataLoaderLite(str(tmp_path), "train", B=1, T=16)  # one window of 17 fits at any offset
    with pytest.raises(ValueError, match="too few for one step of 2 x 17"):  # the whole step counts: processes
        DataLoaderLite(str(tmp_path), "train", B=1, T=16, process_rank=1, num_processes=2)
    with pytest.raises(ValueError, match="too few for one step of 2 x 17"):  # ... and accumulation
        DataLoaderLite(str(tmp_path), "train", B=1, T=16, grad_accum=2)
    with pytest.raises(ValueError, match="no test_.*bin shards"):
        DataLoaderLite(str(tmp_path), "test", B=1, T=16)


# -----------------------------------------------------------------------------
# The training loop: metrics, resuming, accumulation, DDP


def test_metrics_log_every_step_with_val_loss_at_eval_steps(data, tmp_path, capsys):
    train(data, tmp_path, "--max-steps", "5", "--eval-every", "2")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    # evaluated after 2 and 4 steps and at the end, each logged on the step just taken
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 5]
    assert all(math.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    defaults = transformer.parse_args([])
    expected = [transformer.lr_at(s, defaults.lr, defaults.min_lr, 2, 5) for s in range(5)]
    assert [r["lr"] for r in rows] == pytest.approx(expected)
    out = capsys.readouterr().out
    assert "step     5 | loss" in out and "--- sample ---" in out
    ckpt = transformer.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 5 and ckpt["val_loss"] == pytest.approx(rows[-1]["val_loss"])


def test_resume_continues_exactly_as_an_uninterrupted_run(data, tmp_path):
    flags = ["--dropout", "0.2", "--lr-decay-steps", "8", "--eval-every", "4"]  # dropout: the RNG must be restored
    train(data, tmp_path / "straight", *flags, "--max-steps", "8")
    train(data, tmp_path / "resumed", *flags, "--max-steps", "4")
    assert transformer.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))["step"] == 4
    train(data, tmp_path / "resumed", *flags, "--max-steps", "8", "--resume")
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 9))  # one line per step
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # exactly
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in straight]
    a = transformer.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = transformer.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"]


def test_dropout_makes_a_difference(data, tmp_path):
    """Guards the test above: with dropout the losses depend on the RNG, so resuming exercises its restore."""
    train(data, tmp_path / "a", "--max-steps", "2", "--dropout", "0.2")
    train(data, tmp_path / "c", "--max-steps", "2", "--dropout", "0.0")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_gradient_accumulation_equals_the_large_batch(data, tmp_path):
    train(data, tmp_path / "big", "--batch-size", "8", "--max-steps", "4")
    train(data, tmp_path / "accum", "--batch-size", "2", "--total-batch-tokens", str(8 * 16), "--max-steps", "4")
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "big"), abs=1e-5)
    big = transformer.load_checkpoint(str(tmp_path / "big" / "ckpt.pt"))["model"]
    accum = transformer.load_checkpoint(str(tmp_path / "accum" / "ckpt.pt"))["model"]
    for k in big:
        torch.testing.assert_close(accum[k], big[k], atol=1e-5, rtol=1e-4)


def test_total_batch_tokens_must_be_a_multiple_of_the_micro_batch(data, tmp_path, capsys, one_line_error):
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path), *TINY, "--total-batch-tokens", "100"], status=2)
    assert "not a multiple of batch x seq-len x processes = 64" in line


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one_process(data, tmp_path):
    train(data, tmp_path / "one", "--batch-size", "8", "--max-steps", "4")
    out = tmp_path / "two"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
         "--data", data, "--out-dir", str(out), *TINY, "--batch-size", "4", "--max-steps", "4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 x 16 tokens" not in result.stdout and "4 x 16 tokens x 2 processes" in result.stdout
    assert result.stdout.count("--- sample ---") == 1  # only rank 0 speaks
    one, two = metrics(tmp_path / "one"), metrics(out)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], abs=1e-5)
    ckpt = transformer.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2  # both processes' RNG states


# -----------------------------------------------------------------------------
# Checkpoints


def test_an_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, tiny_state(step=1, w=torch.arange(1000.0)))
    before = read_bytes(path)
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half the bytes reach the file, then the crash
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_checkpoint(path, tiny_state(step=2, w=torch.zeros(1000)))
    monkeypatch.undo()
    assert read_bytes(path) == before  # nothing written at the final path
    ckpt = transformer.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))
    # and a first checkpoint that never completed leaves no ckpt at all
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(str(tmp_path / "first.pt"), tiny_state())
    assert not (tmp_path / "first.pt").exists()


def test_a_crash_before_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, tiny_state(step=1))
    before = read_bytes(path)

    def power_cut(fd):
        raise OSError("simulated crash before the data is durable")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_checkpoint(path, tiny_state(step=2))
    monkeypatch.undo()
    assert read_bytes(path) == before and transformer.load_checkpoint(path)["step"] == 1


class RunsShellCommand:
    """Unpickling this runs `touch SENTINEL`: what a malicious checkpoint does."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def make_sentinel(path):
    with open(path, "w"):
        pass


class CallsModuleFunction:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return make_sentinel, (self.sentinel,)


@pytest.mark.parametrize("payload", [RunsShellCommand, CallsModuleFunction])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, payload):
    sentinel = tmp_path / "SENTINEL"
    evil = str(tmp_path / "evil.pt")
    torch.save(tiny_state(model={}, config={}, tokenizer="byte", extra=payload(str(sentinel))), evil)
    with pytest.raises(ValueError, match="refused to load"):
        transformer.load_checkpoint(evil)
    assert not sentinel.exists()


def test_the_cli_refuses_a_checkpoint_that_would_run_code(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    torch.save(tiny_state(model={}, config={}, tokenizer="byte", extra=RunsShellCommand(str(sentinel))),
               str(tmp_path / "evil.pt"))
    result = cli(tmp_path, "--sample", "--ckpt", "evil.pt", "--device", "cpu")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transformer.py: error: evil.pt: refused to load"), lines
    assert result.stdout == ""
    assert not sentinel.exists()
    # the test's payload is real: unpickling without weights_only runs it
    torch.load(str(tmp_path / "evil.pt"), weights_only=False)
    assert sentinel.exists()


def test_a_checkpoint_from_another_tool_is_a_clear_error(data, tmp_path, capsys, one_line_error):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": GPT(GPTConfig.preset("tiny", "gpt2")).state_dict()}, str(path))
    before = read_bytes(path)
    with pytest.raises(ValueError, match="not a transformer.py checkpoint"):
        transformer.load_checkpoint(str(path))
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path), *TINY, "--max-steps", "2", "--resume"])
    assert "not a transformer.py checkpoint" in line
    assert read_bytes(path) == before
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="refused to load"):
        transformer.load_checkpoint(str(tmp_path / "junk.pt"))


# -----------------------------------------------------------------------------
# Signals


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resume_continues_from_it(data, tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--data", data, "--out-dir", str(out), *TINY, "--max-steps", "100000",
         "--ckpt-every", "100000"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    stdout, stderr = signal_after(proc, out / "metrics.jsonl", 3, signal.SIGINT, 120)
    assert proc.returncode == 0, stderr
    said = re.search(r"interrupted: saved (\S+) at step (\d+); continue with --resume", stdout)
    assert said, stdout[-2000:]
    step = int(said[2])
    ckpt = transformer.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == step >= 3
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))  # every step taken, logged once
    assert "Traceback" not in stderr

    train(data, out, "--max-steps", str(step + 3), "--resume")
    assert f"resumed {out / 'ckpt.pt'} at step {step}" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 4))
    assert transformer.load_checkpoint(str(out / "ckpt.pt"))["step"] == step + 3


def test_training_in_process_leaves_the_signal_handlers_as_it_found_them(data, tmp_path):
    """main() is a library entry point too (these tests, notebooks): after it returns, Ctrl-C must
    interrupt the caller again instead of setting a flag nobody reads."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    train(data, tmp_path, "--max-steps", "1")
    assert {s: signal.getsignal(s) for s in before} == before


# -----------------------------------------------------------------------------
# Fine-tuning HF weights


@pytest.fixture(scope="module")
def hf_finetune(data, tmp_path_factory):
    """A random tiny GPT2LMHeadModel saved with save_pretrained, then one training step from it with
    --init-from on byte data. Returns (hf model, metrics rows, exit status, stderr)."""
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("hf")
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(str(tmp / "hf"))
    status, err = 0, io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            no_shape = tiny_without("--n-layer", "--n-head", "--n-embd")
            transformer.main(["--data", str(data), "--out-dir", str(tmp / "out"), *no_shape, "--init-from",
                              str(tmp / "hf"), "--max-steps", "1"])  # the HF folder brings its own shape
        except SystemExit as e:
            status = e.code
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
    return hf, metrics(tmp / "out"), status, err.getvalue()


def test_finetuning_from_a_local_hf_dir_starts_at_the_loss_transformers_computes(data, hf_finetune):
    hf, rows, _, _ = hf_finetune
    buf = DataLoaderLite(data, "train", 4, 16, seed=SEED).next_batch()  # the first batch training saw
    x, y = buf[:, :-1], buf[:, 1:]
    with torch.no_grad():
        logits = hf(x).logits  # HF would shift labels itself; we compare against y directly
    expected = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).item()
    assert rows[0]["step"] == 1
    assert rows[0]["loss"] == pytest.approx(expected, abs=1e-5)


def test_finetuning_a_model_whose_vocab_is_larger_than_the_data_tokenizer_finishes(hf_finetune):
    """The byte data (vocab 256) fits the HF model's 300 tokens, so training is allowed; the sample printed
    at the end must then cope with ids 256..299, which the byte tokenizer cannot decode."""
    _, rows, status, err = hf_finetune
    assert len(rows) == 1
    assert status == 0, err.strip().splitlines()[-1:]


def test_without_data_the_main_job_prepares_input_txt_as_a_bpe_learned_from_its_train_split(tmp_path, monkeypatch):
    """The real path, no stubs: prepare_data.py runs as a program (bpe:1024 on input.txt's train split), then
    training reads its shards."""
    (tmp_path / "input.txt").write_bytes(english_text(20_000))
    monkeypatch.chdir(tmp_path)
    transformer.main(["--out-dir", "out", *TINY, "--max-steps", "2"])
    meta = json.loads((tmp_path / "data" / "shakespeare_bpe1024" / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe:1024" and meta["vocab_size"] <= 1024 and len(metrics(tmp_path / "out")) == 2
    assert meta["splits"]["val"]["bytes"] == round(20_000 * 0.1)  # the tail `byte` holds out, never learned from


def test_without_data_and_offline_the_main_job_stops_with_prepare_datas_one_line(tmp_path, monkeypatch, capfd):
    # No input.txt, and no way out: every https request goes to a closed local port (urllib reads https_proxy),
    # so the download fails here as it would offline, without the test ever touching the network.
    for name, value in [("https_proxy", "http://127.0.0.1:9"), ("HTTPS_PROXY", "http://127.0.0.1:9"), ("no_proxy", "")]:
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        transformer.main(["--out-dir", "out", *TINY, "--max-steps", "2"])
    out, err = capfd.readouterr()  # prepare_data.py's, a program of its own: on the file descriptors
    assert exc.value.code == 1 and out == ""
    assert err.count("\n") == 1 and "prepare_data.py: error: could not download" in err
    assert not (tmp_path / "input.txt").exists() and not (tmp_path / "out").exists()


def saved_config(out_dir):
    return transformer.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["config"]


def test_the_cli_defaults_are_the_mini_size_preset():
    """One source of defaults: what the flags leave open is GPTConfig.preset's."""
    args = transformer.parse_args([])
    config = transformer.model_config(args, vocab_size=256)
    assert config == GPTConfig.preset("mini", transformer.RECIPE["arch"], vocab_size=256)
    assert args.seq_len == config.block_size == 64


def test_size_sets_the_shape_and_single_flags_override_it(data, tmp_path):
    flags = tiny_without("--n-layer", "--n-embd")  # --n-head 2 stays
    for out, extra in (("tiny", []), ("deeper", ["--n-layer", "3"])):
        transformer.main(["--data", data, "--out-dir", str(tmp_path / out), *flags, "--size", "tiny", *extra,
                          "--max-steps", "1"])
    config = saved_config(tmp_path / "tiny")
    assert (config["n_layer"], config["n_head"], config["n_embd"]) == (2, 2, 64)  # tiny's depth and width
    assert saved_config(tmp_path / "deeper")["n_layer"] == 3


def test_block_size_is_the_models_context_and_seq_len_the_training_windows(data, tmp_path, capsys):
    train(data, tmp_path / "out", *TINY, "--block-size", "32", "--max-steps", "2")  # TINY trains on --seq-len 16
    assert saved_config(tmp_path / "out")["block_size"] == 32
    assert "4 x 16 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_eval_reads_past_the_trained_context_with_rope_and_alibi(data, tmp_path, capsys, pos):
    train(data, tmp_path / "out", *TINY, "--arch", "llama", "--pos", pos, "--max-steps", "2")  # trained on 16
    losses = {}
    for block_size in ("16", "64"):
        capsys.readouterr()
        transformer.main(["--eval", "--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--data", data, "--device", "cpu",
                          "--block-size", block_size])
        line = capsys.readouterr().out
        assert f"in windows of {block_size}" in line
        losses[block_size] = float(line.split("loss ")[1].split()[0])
    assert all(math.isfinite(v) for v in losses.values()) and losses["16"] != losses["64"]


def test_learned_positions_refuse_a_longer_context_in_one_line(data, tmp_path, one_line_error):
    train(data, tmp_path / "out", *TINY, "--arch", "gpt2", "--max-steps", "1")
    line = one_line_error(["--eval", "--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--data", data, "--device", "cpu",
                           "--block-size", "17"])
    assert "learned position embeddings end at 16" in line


# -----------------------------------------------------------------------------
# Bad input: one clear line, a non-zero exit, nothing damaged


def test_missing_data_dir_is_a_one_line_error(tmp_path):
    result = cli(tmp_path, "--data", "no_such_dir", "--out-dir", "out", *TINY)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "transformer.py: error: no_such_dir: no prepared dataset here (no meta.json); make one with prepare_data.py"
    )
    assert not (tmp_path / "out").exists()


def test_empty_data_dir_is_a_one_line_error(tmp_path, capsys, one_line_error):
    (tmp_path / "empty").mkdir()
    line = one_line_error(["--data", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "out"), *TINY])
    assert "no prepared dataset here" in line and "prepare_data.py" in line


def test_data_dir_without_val_shards_is_a_one_line_error(tmp_path, capsys, one_line_error):
    write_dataset(tmp_path / "d", {"train": [5000]})
    line = one_line_error(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "out"), *TINY])
    assert "no val_*.bin shards" in line


def test_data_too_small_for_a_batch_is_a_one_line_error(tmp_path, capsys, one_line_error):
    write_dataset(tmp_path / "d", {"train": [40], "val": [40]})
    line = one_line_error(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "out"), *TINY])
    assert "too few for one step" in line


def test_resume_with_another_model_config_is_refused_and_keeps_the_checkpoint(data, tmp_path, capsys, one_line_error):
    train(data, tmp_path, "--max-steps", "2")
    ckpt, rows = read_bytes(tmp_path / "ckpt.pt"), read_bytes(tmp_path / "metrics.jsonl")
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path), *TINY, "--n-embd", "48",
                                   "--max-steps", "4", "--resume"])
    assert "trained with another model config" in line and "n_embd=32 (now 48)" in line
    assert read_bytes(tmp_path / "ckpt.pt") == ckpt and read_bytes(tmp_path / "metrics.jsonl") == rows


def test_an_existing_checkpoint_is_not_overwritten_without_resume(data, tmp_path, capsys, one_line_error):
    train(data, tmp_path, "--max-steps", "2")
    ckpt, rows = read_bytes(tmp_path / "ckpt.pt"), read_bytes(tmp_path / "metrics.jsonl")
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path), *TINY, "--max-steps", "2"])
    assert "exists: pass --resume" in line
    assert read_bytes(tmp_path / "ckpt.pt") == ckpt and read_bytes(tmp_path / "metrics.jsonl") == rows


def test_resume_without_a_checkpoint_is_a_one_line_error(data, tmp_path, capsys, one_line_error):
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path), *TINY, "--resume"])
    assert "no such checkpoint" in line


def test_resume_auto_starts_fresh_without_a_checkpoint_and_continues_with_one(data, tmp_path, capsys):
    """What a requeued job runs every time: the same command line, --resume auto."""
    train(data, tmp_path / "straight", "--max-steps", "4", "--dropout", "0.1")
    out = tmp_path / "requeued"
    os.makedirs(out / "step_000002.tmp")  # a save a kill cut short: never read
    train(data, out, "--max-steps", "2", "--lr-decay-steps", "4", "--dropout", "0.1", "--resume", "auto")
    assert "resumed" not in capsys.readouterr().out
    train(data, out, "--max-steps", "4", "--dropout", "0.1", "--resume", "auto")
    assert f"resumed {out / 'ckpt.pt'} at step 2" in capsys.readouterr().out
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(tmp_path / "straight")]


def test_resume_auto_falls_back_past_a_truncated_newest_sharded_checkpoint(data, tmp_path, capsys):
    flags = ["--ckpt-format", "sharded", "--keep-checkpoints", "2", "--ckpt-every", "2", "--dropout", "0.1"]
    train(data, tmp_path / "straight", *flags, "--max-steps", "6")
    out = tmp_path / "run"
    train(data, out, *flags, "--max-steps", "4", "--lr-decay-steps", "6")
    assert sorted(os.listdir(out)) == ["loss.png", "metrics.jsonl", "step_000002", "step_000004"]  # the newest 2
    shard = out / "step_000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a disk that lost the end of a file
    capsys.readouterr()
    train(data, out, *flags, "--max-steps", "6", "--resume", "auto")
    said = capsys.readouterr().out
    assert f"{out / 'step_000004'}: unreadable checkpoint (" in said
    assert f"resuming from {out / 'step_000002'} instead" in said and f"resumed {out / 'step_000002'} at step 2" in said
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(tmp_path / "straight")]  # exactly
    assert sorted(os.listdir(out)) == ["loss.png", "metrics.jsonl", "step_000004", "step_000006"]  # rewritten


def test_a_sharded_checkpoint_reads_in_one_process_as_the_file_checkpoint_of_the_same_run(data, tmp_path):
    """What --sample, --eval and the exports read of a --ckpt-format sharded run: its newest step folder's weights,
    whole, with no process group (fsdp.newest, fsdp.read_model_state); test_fsdp.py does it for 2 FSDP processes."""
    train(data, tmp_path / "file", "--max-steps", "2")
    train(data, tmp_path / "sharded", "--max-steps", "2", "--ckpt-format", "sharded")
    file = transformer.load_checkpoint(str(tmp_path / "file" / "ckpt.pt"))["model"]
    sharded = transformer.load_checkpoint(str(tmp_path / "sharded"))["model"]  # a run's --out-dir
    assert file.keys() == sharded.keys() and all(torch.equal(file[k], sharded[k]) for k in file)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    data, tmp_path, capsys, monkeypatch, one_line_error
):
    train(data, tmp_path, "--max-steps", "4")
    good = read_bytes(tmp_path / "ckpt.pt")
    inject_into_training_forward(monkeypatch, at_call=1, change=lambda loss: loss * float("nan"))
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path), *TINY, "--max-steps", "8",
                                   "--ckpt-every", "1", "--resume"])
    assert "loss is nan at step 5" in line and "ckpt.pt keeps step 4's state" in line
    assert read_bytes(tmp_path / "ckpt.pt") == good


def test_a_huge_lr_diverges_with_a_clear_error(data, tmp_path, capsys, one_line_error):
    train(data, tmp_path, "--max-steps", "2")
    good = read_bytes(tmp_path / "ckpt.pt")
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path), *TINY, "--max-steps", "50",
                                   "--lr", "1e6", "--warmup-steps", "0", "--resume"])
    assert re.search(r"(loss|gradient norm) is (nan|inf|-inf) at step \d+: stopping", line)
    assert read_bytes(tmp_path / "ckpt.pt") == good  # the run died before its next checkpoint


def test_nonfinite_gradients_stop_before_the_update_so_no_checkpoint_holds_nan(data, tmp_path, capsys, monkeypatch):
    """A finite loss can still have an inf gradient (an overflow in backward). Stepping with it puts NaN
    into every weight; the checkpoint that follows must not be written from such weights."""

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    inject_into_training_forward(monkeypatch, at_call=3, change=InfGrad.apply)
    with pytest.raises(SystemExit):
        train(data, tmp_path, "--max-steps", "6", "--ckpt-every", "1")
    ckpt = transformer.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values()), f"step {ckpt['step']} saved NaN weights"


def test_a_resumed_run_after_a_crash_logs_each_step_once(data, tmp_path, monkeypatch):
    """Steps after the last checkpoint were logged, then lost in the crash: the resumed run redoes them and
    metrics.jsonl must hold each step once, with the values of the redone steps."""
    inject_into_training_forward(monkeypatch, at_call=6, change=lambda loss: loss * float("nan"))
    with pytest.raises(SystemExit):
        train(data, tmp_path, "--max-steps", "8", "--ckpt-every", "4")
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]  # step 5 logged, not checkpointed
    monkeypatch.undo()
    train(data, tmp_path, "--max-steps", "8", "--ckpt-every", "4", "--resume")
    train(data, tmp_path / "straight", "--max-steps", "8")
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 9))
    assert losses(tmp_path) == losses(tmp_path / "straight")


# -----------------------------------------------------------------------------
# End to end on real text


def test_prepare_data_then_train_learns_shakespeare(tmp_path, capsys):
    (tmp_path / "input.txt").write_bytes(english_text(50_000))
    prepare_data.main(["--input", str(tmp_path / "input.txt"), "--tokenizer", "byte", "--out", str(tmp_path / "data")])
    train(tmp_path / "data", tmp_path / "out", "--max-steps", "40", "--lr", "1e-2", "--batch-size", "8",
          "--eval-every", "20")
    rows = metrics(tmp_path / "out")
    assert len(rows) == 40
    assert rows[0]["loss"] == pytest.approx(math.log(256), abs=0.1)  # starts near uniform over bytes
    assert np.mean([r["loss"] for r in rows[-5:]]) < rows[0]["loss"] - 1.5
    assert rows[-1]["val_loss"] < rows[19]["val_loss"] < math.log(256)
    out = capsys.readouterr().out
    assert "--- sample ---" in out and "vocab 256 (byte)" in out


# -----------------------------------------------------------------------------
# Weights & Biases


def test_wandb_receives_every_record_of_metrics_jsonl(data, tmp_path, monkeypatch):
    """A stand-in wandb module records what training hands it (the real package's twin is the next test)."""
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.logged, fake.runs = [], []

    class Run:
        def log(self, record, step):
            fake.logged.append((step, record))

        def finish(self):
            fake.runs[-1]["finished"] = True

    def init(**kwargs):
        fake.runs.append(kwargs)
        return Run()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(data, tmp_path, "--max-steps", "3", "--wandb", "my-project")
    assert fake.runs[0]["project"] == "my-project" and fake.runs[0]["finished"]
    assert fake.runs[0]["config"]["max_steps"] == 3
    assert fake.logged == [(r["step"], r) for r in metrics(tmp_path)]


@pytest.mark.slow
def test_wandb_offline_run_with_the_real_package(data, tmp_path):
    pytest.importorskip("wandb")
    result = cli(tmp_path, "--data", data, "--out-dir", tmp_path / "out", *TINY, "--max-steps", "3", "--wandb", "p")
    env_note = "WANDB_MODE=offline is set by cli(): nothing leaves the machine"
    assert result.returncode == 0, f"{env_note}\n{result.stderr[-3000:]}"
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"grad_norm" in runs[0].read_bytes()  # our records are in wandb's own log


def test_wandb_without_the_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    with pytest.raises(SystemExit) as exc:
        transformer.main(["--wandb", "p", "--out-dir", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--wandb needs the wandb package" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Muon


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    model = GPT(GPTConfig.preset("tiny", "llama"))
    optimizer = transformer.configure_optimizer(model, 1e-3, 0.1, "cpu", muon_lr=0.02)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    to_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    assert to_muon == sorted(n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in to_muon)
    to_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert to_adamw == set(names.values()) - set(to_muon)  # wte, lm_head, norms: every other parameter once
    assert (muon.defaults["lr"], adamw.defaults["lr"]) == (0.02, 1e-3)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """Bytes of play-like text (learnable, unlike the random tokens of `data`)."""
    tmp = tmp_path_factory.mktemp("text")
    (tmp / "input.txt").write_bytes(english_text(30_000))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare_data.main(["--input", str(tmp / "input.txt"), "--tokenizer", "byte", "--out", str(tmp / "data")])
    return str(tmp / "data")


def test_muon_training_lowers_the_loss_and_both_lrs_follow_the_schedule(text_data, tmp_path):
    train(text_data, tmp_path, "--optimizer", "muon", "--max-steps", "30", "--lr", "3e-3", "--muon-lr", "0.02")
    rows = metrics(tmp_path)
    assert np.mean([r["loss"] for r in rows[-5:]]) < rows[0]["loss"] - 1.0
    ckpt = transformer.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert set(ckpt["optimizer"]) == {"Muon", "AdamW"}  # both optimizers' state in the one checkpoint
    muon_lr = ckpt["optimizer"]["Muon"]["param_groups"][0]["lr"]
    adamw_lr = ckpt["optimizer"]["AdamW"]["param_groups"][0]["lr"]
    assert muon_lr / 0.02 == pytest.approx(adamw_lr / 3e-3) == pytest.approx(rows[-1]["lr"] / 3e-3)


def test_muon_resume_continues_exactly_as_an_uninterrupted_run(data, tmp_path):
    flags = ["--optimizer", "muon", "--dropout", "0.2", "--lr-decay-steps", "8"]
    train(data, tmp_path / "straight", *flags, "--max-steps", "8")
    train(data, tmp_path / "resumed", *flags, "--max-steps", "4")
    train(data, tmp_path / "resumed", *flags, "--max-steps", "8", "--resume")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a = transformer.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))["model"]
    b = transformer.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_another_optimizer_is_a_one_line_error(data, tmp_path, one_line_error):
    train(data, tmp_path, "--optimizer", "muon", "--max-steps", "2")
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path), *TINY, "--max-steps", "4", "--resume",
                           "--optimizer", "adamw"])  # typed, though at its default: not the checkpoint's muon
    assert "was trained with --optimizer muon" in line


def test_muon_on_a_torch_without_it_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(SystemExit) as exc:
        transformer.parse_args(["--optimizer", "muon"])
    assert exc.value.code == 2 and "--optimizer muon needs torch >= 2.9" in capsys.readouterr().err


@pytest.mark.slow
def test_muon_under_torchrun_equals_one_process(data, tmp_path):
    train(data, tmp_path / "one", "--optimizer", "muon", "--batch-size", "8", "--max-steps", "4")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, "--data", data,
         "--out-dir", str(tmp_path / "two"), *TINY, "--optimizer", "muon", "--batch-size", "4", "--max-steps", "4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=400, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    # 1e-4, not AdamW's 1e-5: the all-reduced gradient differs from one process's in its last bits, and
    # Muon's orthogonalised update (every direction scaled to about 1) does not shrink that difference
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
