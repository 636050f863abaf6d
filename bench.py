"""
bench.py: how fast transformer.py and prepare_data.py run, each beside what it should beat.

    python bench.py                 # the full table: a few minutes on a 2-core CPU
    python bench.py --quick         # every row at tiny sizes in seconds: a smoke test, not a measurement
    python bench.py --rounds 9 --device cuda
    python bench.py --rows decode --rounds 9   # one row (or several: --rows train,decode)
    python bench.py --gpu-check     # one GPU: flash kernel, compile + bf16 + fused AdamW, bf16 tracks fp32

Rows
    1 train     training steps (forward, loss, backward, AdamW) of a 6-layer, 384-wide GPT-2 on
                8 x 256 tokens in fp32: our GPT with transformer.configure_optimizer against HF
                transformers' GPT2LMHeadModel holding the same weights, with torch.optim.AdamW
                and the same hyperparameters; plus our MFU against a matmul peak measured here.
    2 decode    greedy generation of 256 tokens after a 16-token prompt with GPT-2 small's shape
                and random weights: our GPT with its KV cache, HF generate with its cache, and
                our GPT re-encoding the whole prefix every step (no cache; timed on 16 tokens
                from the middle of such a run, see row_decode). Ours and HF must produce the
                same tokens.
    3 prepare   MB/s of text through prepare_data.py (tokenize and write shards) against bare
                tiktoken encode_ordinary_batch on the same text (tiny Shakespeare repeated to
                13 MB); and prepare_data's peak memory on a corpus ten shards long.
    4 cuda      only on CUDA: bf16 autocast training steps of GPT-2 small, torch.compile'd
                against eager, with MFU against the GPU's datasheet peak.
    5 to loss   wall time of the default run (`python transformer.py` in a fresh folder) to its val loss,
                against nanoGPT's CPU recipe run the same way: nanoGPT's own train.py when
                NANOGPT_DIR points at a nanoGPT checkout, else that recipe in our trainer.

Method
    Shared machines drift, by up to ~1.8x over minutes, so contenders are never timed one
    after the other. Within a row they take turns (A, B, A, B, ...), after one untimed
    warm-up call each, all in this one process, and the table gives each contender's min /
    median / max rate over the rounds and the ratio of the medians. A drift then slows every
    contender alike and the ratio holds; min and max show how noisy the machine was.
"""

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

import metrics
import prepare_data
import transformer
from transformer import GPT

REPO = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")  # else input.txt, see corpus()
LR, WEIGHT_DECAY, BETAS = 6e-4, 0.1, (0.9, 0.95)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT2Config defaults to 0.1


@dataclass
class Sizes:
    train_model: dict  # GPT2Config fields of the model trained in row 1
    train_batch: int
    decode_model: dict  # GPT2Config fields of the model sampled in row 2 ({}: GPT-2 small)
    prompt_tokens: int
    new_tokens: int  # generated with a cache
    uncached_tokens: int  # generated without one, mid-run (see row_decode)
    text_mb: float  # size of the corpus for row 3
    cuda_model: dict  # GPTConfig.preset('gpt2', 'gpt2', ...) fields of the model trained in row 4
    cuda_batch: int
    text: str = None  # the text file rows 3 and 5 read (None: tiny Shakespeare, see corpus())
    to_loss_steps: int = None  # row 5: None runs each recipe whole; a number cuts both to that many steps


FULL = Sizes(
    train_model=dict(n_layer=6, n_head=6, n_embd=384, n_positions=256), train_batch=8,
    decode_model={}, prompt_tokens=16, new_tokens=256, uncached_tokens=16,
    text_mb=13, cuda_model=dict(block_size=1024), cuda_batch=16,
)
QUICK = Sizes(
    train_model=dict(n_layer=1, n_head=2, n_embd=64, n_positions=32), train_batch=2,
    decode_model=dict(n_layer=1, n_head=2, n_embd=64), prompt_tokens=16, new_tokens=16, uncached_tokens=4,
    text_mb=1, cuda_model=dict(n_layer=1, n_head=2, n_embd=64, block_size=32), cuda_batch=2, to_loss_steps=20,
)


# -----------------------------------------------------------------------------
# Timing and the table


def alternate(contenders, rounds):
    """Call each contender once untimed, then `rounds` times each in turn (A, B, ..., A, B, ...).

    contenders: {name: function of no arguments}. Returns ({name: [seconds of each round]},
    {name: what its warm-up call returned}), the latter for checking the results."""
    outputs = {name: fn() for name, fn in contenders.items()}  # warm-up: lazy init, caches, compilation
    seconds = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            synchronize()
            t0 = time.perf_counter()
            fn()
            synchronize()
            seconds[name].append(time.perf_counter() - t0)
    return seconds, outputs


def synchronize():
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # GPU work is asynchronous: wait for it before reading the clock


def rates(seconds, work):
    """{name: [work units per second, each round]}; work: {name: units one call does}."""
    return {name: [work[name] / s for s in times] for name, times in seconds.items()}


COLUMNS = f"{'row':<9} {'contender':<46} {'unit':<7} {'min':>9} {'median':>9} {'max':>9}  ratio of medians"


def line(row, contender, unit="", values=None, ratio=""):
    """One table line: min / median / max of values (or blanks), then a ratio of medians."""
    stats = (min(values), statistics.median(values), max(values)) if values else ()
    cells = "".join(f" {fmt(v):>9}" for v in stats) or " " * 30
    print(f"{row:<9} {contender:<46} {unit:<7}{cells}  {ratio}".rstrip(), flush=True)


def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def median_ratio(a, b):
    return statistics.median(a) / statistics.median(b)


def versus(ours, theirs, name, goal):
    """'ours 1.42x HF (goal >= 1.3x: met)': how the median rates of two contenders compare."""
    ratio = median_ratio(ours, theirs)
    return f"ours {ratio:.2f}x {name} (goal >= {goal}x: {'met' if ratio >= goal else 'MISSED'})"


# -----------------------------------------------------------------------------
# Rows


def same_weights(hf_fields, device):
    """A random HF GPT2LMHeadModel and our GPT loaded from its saved weights with GPT.from_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**hf_fields, **NO_DROPOUT))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = GPT.from_pretrained(d)
    return ours.to(device), hf.to(device)


def train_step(loss_fn, optimizer):
    """A function doing one training step: loss_fn() (forward and loss), backward, optimizer step."""

    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def random_tokens(shape, vocab_size, device):
    return torch.randint(vocab_size, shape, device=device)


def row_train(sizes, rounds, device):
    ours, hf = same_weights(sizes.train_model, device)
    B, T, V = sizes.train_batch, ours.config.block_size, ours.config.vocab_size
    buf = random_tokens((B, T + 1), V, device)
    x, y = buf[:, :-1], buf[:, 1:]
    ours_opt = transformer.configure_optimizer(ours, LR, WEIGHT_DECAY, device.type, BETAS)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS)
    peak = metrics.matmul_peak_flops(device)  # what training's MFU is measured against
    shape = f"{ours.config.n_layer}L {ours.config.n_embd}w, {B}x{T} fp32"
    names = f"ours GPT ({shape})", f"HF GPT2LMHeadModel ({hf.config._attn_implementation})"
    contenders = {
        names[0]: train_step(lambda: ours(x, y)[1], ours_opt),
        names[1]: train_step(lambda: hf(input_ids=x, labels=x).loss, hf_opt),  # HF shifts the labels itself
    }
    nanogpt = nanogpt_model(ours, device)
    if nanogpt is not None:  # the strongest peer: nanoGPT's own model.py, with its own AdamW set-up
        names += ("nanoGPT's model.py (NANOGPT_DIR)",)
        x_c, y_c = x.contiguous(), y.contiguous()  # its loss views the targets
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter groups
            nano_opt = nanogpt.configure_optimizers(WEIGHT_DECAY, LR, BETAS, device.type)
        contenders[names[2]] = train_step(lambda: nanogpt(x_c, y_c)[1], nano_opt)
    seconds, _ = alternate(contenders, rounds)
    tok_s = rates(seconds, {name: B * T for name in names})
    # an MFU above 100% is a peak measured while the cores were busy: metrics.mfu says None, left out here
    mfu = [100 * u for r in tok_s[names[0]] if (u := metrics.mfu(r, ours.flops_per_token(T), 1, peak)) is not None]
    line("1 train", names[0], "tok/s", tok_s[names[0]])
    line("", names[1], "tok/s", tok_s[names[1]], versus(tok_s[names[0]], tok_s[names[1]], "HF", 1.3))
    if nanogpt is not None:
        line("", names[2], "tok/s", tok_s[names[2]], versus(tok_s[names[0]], tok_s[names[2]], "nanoGPT", 1.0))
    else:
        line("", "(nanoGPT's model.py: set NANOGPT_DIR to a nanoGPT checkout to time it here)")
    line("", f"ours MFU vs {peak / 1e9:,.0f} GFLOP/s fp32 matmul (measured)", "%", mfu)


def nanogpt_model(ours, device):
    """nanoGPT's GPT from $NANOGPT_DIR/model.py holding our weights (same shapes and names but its
    (out, in) Linear layout, as ours), or None when NANOGPT_DIR is not set."""
    folder = os.environ.get("NANOGPT_DIR")
    if not folder:
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(folder, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = ours.config
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        model = module.GPT(module.GPTConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                            n_head=c.n_head, n_embd=c.n_embd, dropout=0.0, bias=True))
    # nanoGPT's GELU is the exact (erf) one, GPT-2's the tanh approximation: equal weights, not equal outputs
    model.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=False)
    return model.to(device)


def row_decode(sizes, rounds, device):
    ours, hf = same_weights(sizes.decode_model, device)
    ours.eval()
    hf.eval()
    V, n, m = ours.config.vocab_size, sizes.new_tokens, sizes.uncached_tokens
    prompt = random_tokens((1, sizes.prompt_tokens), V, device)
    # Without a cache a step re-encodes the whole prefix, so its cost grows with the prefix, and all
    # n tokens would take minutes. The m tokens timed are the middle ones of a run of n: their mean
    # prefix is the whole run's, and so is their rate. (The prefix's content does not matter.)
    prefix = random_tokens((1, sizes.prompt_tokens + n // 2 - m // 2), V, device)
    names = "ours GPT.generate, KV cache", "HF generate, use_cache=True", f"ours GPT.generate, no cache ({m} tokens)"
    seconds, outputs = alternate({
        names[0]: lambda: ours.generate(prompt, n, temperature=0),
        names[1]: lambda: hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), use_cache=True, do_sample=False,
            max_new_tokens=n, min_new_tokens=n, pad_token_id=hf.config.eos_token_id,
        ),
        names[2]: lambda: ours.generate(prefix, m, temperature=0, use_cache=False),
    }, rounds)
    tok_s = rates(seconds, dict(zip(names, (n, n, m))))
    same = torch.equal(outputs[names[0]], outputs[names[1]])
    line("2 decode", names[0], "tok/s", tok_s[names[0]])
    line("", names[1], "tok/s", tok_s[names[1]], versus(tok_s[names[0]], tok_s[names[1]], "HF", 1.3))
    line("", names[2], "tok/s", tok_s[names[2]], versus(tok_s[names[0]], tok_s[names[2]], "uncached", 10))
    first = n // 2 - m // 2 + 1
    line("", f"  (no cache: tokens {first}-{first + m - 1} of {n}, at the run's mean prefix length)")
    line("", f"ours == HF, {n} greedy tokens: {'yes' if same else 'NO, they differ'}")


def corpus(path, mb, source=None):
    """A text (tiny Shakespeare by default) repeated (or cut) to about `mb` MB, written to path."""
    source = source or (SHAKESPEARE if os.path.exists(SHAKESPEARE) else prepare_data.default_input())
    with open(source, "rb") as f:
        text = f.read()
    n = int(mb * 1e6)
    data = (text * (n // len(text) + 1))[:n]
    with open(path, "wb") as f:
        f.write(data[: prepare_data.piece_end(data)])  # end on a line end, as tiny Shakespeare does


# Peak RSS is read from /proc/self/status (VmHWM), not getrusage: Linux's ru_maxrss also counts
# the process that forked the child, here this one with its models, so it would report bench.py.
PEAK_RSS_CHILD = """
import sys

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e6

import prepare_data  # and with it transformer and torch
imported = peak_mb()
prepare_data.main(sys.argv[1:])
print(imported, peak_mb())
"""


def peak_rss_mb(argv):
    """prepare_data.main(argv) in a fresh process: (peak RSS after its imports, peak RSS at the end) in MB."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, *argv], cwd=REPO, capture_output=True,
                            text=True, check=True)
    return [float(v) for v in result.stdout.splitlines()[-1].split()]


def row_prepare(sizes, rounds, device):
    import tiktoken

    with tempfile.TemporaryDirectory() as d:
        path, out = os.path.join(d, "corpus.txt"), os.path.join(d, "out")
        corpus(path, sizes.text_mb, sizes.text)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        mb = len(text.encode("utf-8")) / 1e6
        pieces = [text[i : i + prepare_data.PIECE_BYTES] for i in range(0, len(text), prepare_data.PIECE_BYTES)]
        enc = tiktoken.get_encoding("gpt2")

        def prepare():
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                prepare_data.main(["--input", path, "--tokenizer", "gpt2", "--out", out, "--overwrite"])

        names = f"prepare_data.main, gpt2 ({mb:.1f} MB)", "tiktoken encode_ordinary_batch, 1 MB pieces"
        seconds, _ = alternate({
            names[0]: prepare,
            names[1]: lambda: enc.encode_ordinary_batch(pieces, num_threads=os.cpu_count()),
        }, rounds)
        mb_s = rates(seconds, {name: mb for name in names})
        line("3 prepare", names[0], "MB/s", mb_s[names[0]])
        line("", names[1], "MB/s", mb_s[names[1]], versus(mb_s[names[0]], mb_s[names[1]], "raw", 0.8))

        with open(os.path.join(out, "meta.json")) as f:
            tokens = sum(split["tokens"] for split in json.load(f)["splits"].values())
        shard = tokens // 10
        if not os.path.exists("/proc/self/status"):
            line("", "peak RSS: skipped, it is read from Linux's /proc")
            return
        imported, peak = peak_rss_mb(["--input", path, "--out", out, "--overwrite", "--shard-tokens", str(shard)])
        line("", f"prepare_data peak RSS {peak:.0f} MB ({imported:.0f} MB after importing torch),")
        line("", f"  in a fresh process, on {tokens:,} tokens in shards of {shard:,}")


def row_cuda(sizes, rounds, device):
    if device.type != "cuda":
        line("4 cuda", f"skipped: needs a CUDA device, this run is on {device.type}")
        return
    torch.backends.cuda.matmul.allow_tf32 = True  # for the few fp32 matmuls outside autocast, as in training
    model = GPT(transformer.GPTConfig.preset("gpt2", "gpt2", **sizes.cuda_model)).to(device)
    compiled = torch.compile(model)
    B, T = sizes.cuda_batch, model.config.block_size
    buf = random_tokens((B, T + 1), model.config.vocab_size, device)
    x, y = buf[:, :-1], buf[:, 1:]
    optimizer = transformer.configure_optimizer(model, LR, WEIGHT_DECAY, device.type, BETAS)

    def loss_of(m):
        with transformer.autocast(device, torch.bfloat16):
            return m(x, y)[1]

    shape = f"{model.config.n_layer}L {model.config.n_embd}w, {B}x{T} bf16"
    names = f"ours GPT + torch.compile ({shape})", "ours GPT, eager"
    seconds, _ = alternate({
        names[0]: train_step(lambda: loss_of(compiled), optimizer),
        names[1]: train_step(lambda: loss_of(model), optimizer),
    }, rounds)
    tok_s = rates(seconds, {name: B * T for name in names})
    peak, source = metrics.peak_flops(device)
    line("4 cuda", names[0], "tok/s", tok_s[names[0]])
    speedup = median_ratio(tok_s[names[0]], tok_s[names[1]])
    line("", names[1], "tok/s", tok_s[names[1]], f"compiled {speedup:.2f}x eager")
    if peak:
        mfu = [100 * u for r in tok_s[names[0]] if (u := metrics.mfu(r, model.flops_per_token(T), 1, peak)) is not None]
        line("", f"compiled MFU vs {peak / 1e12:,.0f} TFLOP/s", "%", mfu)
    line("", f"  (peak: {source})")


# -----------------------------------------------------------------------------
# --gpu-check: is this GPU running the fast path?


def gpu_check(quick, device):
    """Checks, not timings to compare: the training attention runs on SDPA's flash kernel; GPT-2 124M at
    T = 1024 trains with torch.compile, bf16 autocast and fused AdamW (tokens/s, MFU, peak memory); and
    20 bf16 steps track 20 fp32 steps from the same weights on the same batches. Returns the failures.
    --quick runs it at a tiny size (on the CPU too, without compile and the flash check) to test this code."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = device.type == "cuda"
    failures = []
    size = dict(n_layer=2, n_head=2, n_embd=64, block_size=64) if quick else dict(block_size=1024)
    B, steps = (4, 3) if quick else (16, 20)
    config = transformer.GPTConfig.preset("gpt2", "gpt2", **size)
    T = config.block_size
    torch.manual_seed(0)
    batches = [random_tokens((B, T + 1), config.vocab_size, device) for _ in range(steps)]
    if cuda:  # 1. flash: with SDPA restricted to its flash kernel, a bf16 forward and backward must run
        model = GPT(config).to(device)
        x, y = batches[0][:, :-1], batches[0][:, 1:]
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), transformer.autocast(device, torch.bfloat16):
                model(x, y)[1].backward()
            print("gpu-check: training attention runs on the flash kernel: yes")
        except RuntimeError as e:
            failures.append(f"the flash kernel refused the training attention: {str(e).splitlines()[0]}")
    else:
        print(f"gpu-check: on {device.type}: the flash-kernel check and torch.compile are skipped")

    def run(dtype, compile_it):
        """`steps` training steps from the same initial weights -> (losses, seconds per step after the first)."""
        torch.manual_seed(0)
        model = GPT(config).to(device)
        optimizer = transformer.configure_optimizer(model, 3e-4, 0.1, device.type)
        step_model = torch.compile(model) if compile_it else model
        losses, t0 = [], None
        for i, buf in enumerate(batches):
            if i == 1:
                synchronize()
                t0 = time.perf_counter()  # the first step compiles
            with transformer.autocast(device, dtype):
                loss = step_model(buf[:, :-1], buf[:, 1:])[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        synchronize()
        return losses, (time.perf_counter() - t0) / (steps - 1)

    # 2. the fast path's speed
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    bf16, seconds = run(torch.bfloat16, compile_it=cuda)
    tok_s = B * T / seconds
    peak, source = metrics.peak_flops(device)
    mfu = metrics.mfu(tok_s, GPT(config).flops_per_token(T), 1, peak)
    memory = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
    mfu_text = f"{mfu:.1%}" if mfu else "n/a"
    print(f"gpu-check: {config.n_layer}L {config.n_embd}w GPT-2, {B} x {T} tokens, bf16 autocast, fused AdamW"
          f"{', compiled' if cuda else ''}: {tok_s:,.0f} tok/s, MFU {mfu_text} ({source}){memory}")
    # 3. bf16 tracks fp32
    fp32, _ = run(torch.float32, compile_it=False)
    worst = max(abs(a - b) for a, b in zip(bf16, fp32))
    print(f"gpu-check: {steps} bf16 steps vs fp32: largest loss difference {worst:.4f} (tolerance 0.05)")
    if not worst < 0.05:
        failures.append(f"bf16 losses drift from fp32 by {worst:.4f}")
    return failures


# nanoGPT's README recipe for a CPU (train_shakespeare_char with its CPU flags), as nanoGPT's own train.py runs
# it, and the same recipe in our trainer: the stand-in when nanoGPT is not at hand.
NANOGPT_CPU_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                     "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                     "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_RECIPE_HERE = ["--arch", "gpt2", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--seq-len", "64",
                       "--batch-size", "12", "--max-steps", "2000", "--lr", "1e-3", "--min-lr", "1e-4",
                       "--warmup-steps", "100", "--eval-every", "250"]


def row_to_loss(sizes, rounds, device):
    """Time to a loss, start to end as a user runs it: `python transformer.py` in a fresh folder (data
    preparation, start-up and the closing sample included) against nanoGPT's CPU recipe run the same way
    (nanoGPT's own prepare.py and train.py from $NANOGPT_DIR, else its recipe in our trainer). Our val loss
    is measured on the whole val split (--eval); nanoGPT's is the last one its train.py prints (20 batches).
    One run each, in turn: minutes, not rounds."""
    steps = sizes.to_loss_steps
    with tempfile.TemporaryDirectory() as d:
        source = sizes.text or (SHAKESPEARE if os.path.exists(SHAKESPEARE) else prepare_data.default_input())
        contenders = {"ours: python transformer.py (the default run)": [],
                      "nanoGPT's CPU recipe, its own train.py" if os.environ.get("NANOGPT_DIR")
                      else "nanoGPT's CPU recipe in our trainer (no NANOGPT_DIR)": NANOGPT_RECIPE_HERE}
        results = {}
        for name, flags in contenders.items():
            folder = os.path.join(d, str(len(results)))
            os.makedirs(folder)
            shutil.copy(source, os.path.join(folder, "input.txt"))
            if flags == NANOGPT_RECIPE_HERE or not name.startswith("nanoGPT"):
                results[name] = run_ours(folder, flags + (["--max-steps", str(steps)] if steps else []))
            else:
                results[name] = run_nanogpt(folder, steps)
        (ours, (t_ours, loss_ours)), (theirs, (t_theirs, loss_theirs)) = results.items()
        line("5 to loss", ours, "s", [t_ours], f"val {loss_ours:.4f} (whole val split)")
        ratio = t_ours / t_theirs
        line("", theirs, "s", [t_theirs], f"val {loss_theirs:.4f} | ours {ratio:.2f}x its time (goal <= 0.33x: "
             f"{'met' if ratio <= 0.33 and loss_ours <= 1.8857 else 'MISSED'})")


def run_ours(folder, flags):
    """(wall seconds of `python transformer.py FLAGS` in folder, its val loss on the whole val split)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO, "transformer.py"), *flags], cwd=folder, check=True,
                   capture_output=True)
    seconds = time.perf_counter() - t0
    result = subprocess.run([sys.executable, os.path.join(REPO, "transformer.py"), "--eval", "--ckpt",
                             "checkpoints/ckpt.pt", "--data", "data/shakespeare_byte"],
                            cwd=folder, check=True, capture_output=True, text=True)
    return seconds, float(re.search(r"loss (\d+\.\d+)", result.stdout)[1])


def run_nanogpt(folder, steps):
    """(wall seconds of nanoGPT's prepare.py + train.py with its CPU recipe, the last val loss it prints).
    Its files are copied into folder, so nothing is written into the checkout."""
    nano = os.environ["NANOGPT_DIR"]
    for part in ("train.py", "model.py", "configurator.py", "config", "data/shakespeare_char/prepare.py"):
        target = os.path.join(folder, part)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        (shutil.copytree if os.path.isdir(os.path.join(nano, part)) else shutil.copy)(os.path.join(nano, part), target)
    os.replace(os.path.join(folder, "input.txt"), os.path.join(folder, "data", "shakespeare_char", "input.txt"))
    cut = [f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--eval_interval={steps}"] if steps else []
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=folder, check=True, capture_output=True)
    result = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU_FLAGS, *cut],
                            cwd=folder, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return seconds, float(re.findall(r"val loss (\d+\.\d+)", result.stdout)[-1])


ROWS = {"train": row_train, "decode": row_decode, "prepare": row_prepare, "cuda": row_cuda, "to-loss": row_to_loss}


def row_names(text):
    """--rows: comma-separated names of ROWS, in the table's order."""
    names = text.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown row {unknown[0]!r}: choose from {', '.join(ROWS)}")
    return [n for n in ROWS if n in names]


def quiet_transformers():
    """No progress bars or advice from transformers on stderr, between the table's lines."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


# -----------------------------------------------------------------------------
# CLI


def machine(device):
    """One line: the CPU (and GPU), torch's threads, the library versions, the date."""
    import tiktoken
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((entry.split(":", 1)[1].strip() for entry in f if entry.startswith("model name")), cpu)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu} | device {device}, {torch.get_num_threads()} torch threads | "
            f"torch {torch.__version__}, transformers {transformers.__version__}, tiktoken {tiktoken.__version__} | "
            f"{datetime.datetime.now().isoformat(' ', 'seconds')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: checks that every row runs")
    p.add_argument("--rounds", type=int, help="timed rounds per contender (default 5, --quick 2)")
    p.add_argument("--device", default="auto", help="auto: cuda > mps > cpu")
    p.add_argument("--rows", type=row_names, default=list(ROWS), help=f"rows to run, comma-separated: {','.join(ROWS)}")
    p.add_argument("--text", help="the UTF-8 text row 3 tokenizes (default: tiny Shakespeare, downloaded if missing)")
    p.add_argument("--gpu-check", action="store_true",
                   help="instead of the table, check the GPU path (flash kernel, compile + bf16 + fused AdamW on GPT-2 "
                        "124M at T=1024, bf16 tracking fp32); about 5 minutes on one GPU")
    args = p.parse_args(argv)
    if args.gpu_check:
        device = transformer.pick_device(args.device)
        if device.type != "cuda" and not args.quick:
            print(f"gpu-check: skipped, no CUDA device (this is {device.type}); --quick runs its code at a tiny size")
            return
        failures = gpu_check(args.quick, device)
        print("gpu-check: " + ("all checks passed" if not failures else "FAILED: " + "; ".join(failures)))
        sys.exit(1 if failures else 0)
    sizes, rounds = (QUICK, args.rounds or 2) if args.quick else (FULL, args.rounds or 5)
    sizes = dataclasses.replace(sizes, text=args.text)
    device = transformer.pick_device(args.device)
    torch.manual_seed(0)
    quiet_transformers()
    print(machine(device))
    print(f"{rounds} alternating rounds per row{' (--quick: tiny sizes, not a measurement)' if args.quick else ''}\n")
    print(COLUMNS)
    for name in args.rows:
        ROWS[name](sizes, rounds, device)


if __name__ == "__main__":
    main()
