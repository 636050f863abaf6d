"""
bench.py: how fast transformer.py and prepare_data.py run, each beside what it should beat.

    python bench.py                 # the full table: a few minutes on a 2-core CPU
    python bench.py --quick         # every row at tiny sizes in seconds: a smoke test, not a measurement
    python bench.py --rounds 9 --device cuda
    python bench.py --rows decode --rounds 9   # one row (or several: --rows train,decode)
    python bench.py --gpu-check --out DIR   # one GPU, every command (<= 8 min); summary last and in DIR
    python bench.py --gpu-check --quick     # the same code at a tiny size on the CPU (the test suite runs it)

Rows
    1 train     training steps (forward, loss, backward, AdamW) of a 6-layer, 384-wide GPT-2 on
                8 x 256 tokens in fp32: our GPT with transformer.configure_optimizer against HF
                transformers' GPT2LMHeadModel holding the same weights, with torch.optim.AdamW
                and the same hyperparameters; plus our MFU against a matmul peak measured here.
    2 decode    greedy generation of 256 tokens after a 16-token prompt with GPT-2 small's shape
                and random weights: our GPT with its KV cache, eager and with its decode step
                compiled (and how long the first compiled call spent compiling), HF generate
                with its cache, and our GPT re-encoding the whole prefix every step (no cache;
                timed on 16 tokens from the middle of such a run, see decode_speeds). All must
                produce the same tokens.
    3 prepare   MB/s of text through prepare_data.py (tokenize and write shards) against bare
                tiktoken encode_ordinary_batch on the same text (tiny Shakespeare repeated to
                13 MB); and prepare_data's peak memory on a corpus ten shards long.
    4 cuda      only on CUDA: bf16 autocast training steps of GPT-2 small, torch.compile'd
                against eager, with MFU against the GPU's datasheet peak.
    5 to loss   wall time of the default run (`python transformer.py` in a fresh folder) to its val loss,
                against nanoGPT's CPU recipe run the same way: nanoGPT's own train.py when
                NANOGPT_DIR points at a nanoGPT checkout, else that recipe in our trainer. Twice
                each, one at a time, in alternating order (ours, theirs, theirs, ours).
    6 tokenizers  the default run's model and budget on tiny Shakespeare tokenized as bytes and as
                BPEs learned from its train split (bpe:512 ... bpe:4096): seconds of training to
                nanoGPT's CPU target, 1.8857 nats per character = 2.7205 bits per byte, on the
                whole val split (evaluated every 25 steps), and the end. Runs one at a time.
    7 ablation  the default run with each switch of SWITCHES alone, then together (nanochat's
                block), and Muon: bytes and bpe:1024, measured as row 6.
    Rows 5-7 run each contender twice (--rounds N: N times), one run at a time, in
    alternating order (forward, then backward): two torch runs at once oversubscribe a small
    CPU, and alternating lets a drift fall on every contender alike. Minutes each.

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
import math
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

import convert
import distributed
import files
import metrics
import prepare_data
import shards
import transformer
from transformer import GPT

REPO = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")  # else input.txt, see corpus()
LR, WEIGHT_DECAY, BETAS = 6e-4, 0.1, (0.9, 0.95)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT2Config defaults to 0.1


# Row 7's switches, each alone on top of the default run, then all together ("nanochat's block") and Muon.
SWITCHES = {
    "the default run": [],
    "relu2 MLP": ["--mlp", "relu2"],
    "qk-norm": ["--qk-norm"],
    "tied head": ["--tie-embeddings"],
    "logit soft-cap 15": ["--logit-softcap", "15"],
    "zero-init projections": ["--zero-init-proj"],
    "embedding norm": ["--embed-norm"],
    "weightless RMSNorm": ["--norm", "rmsnorm-noweight"],
    "value embeddings": ["--value-embeds"],
    "x0 lambdas": ["--x0-lambdas"],
    "--arch nanochat": ["--arch", "nanochat"],
    "nanochat + value emb. + x0": ["--arch", "nanochat", "--value-embeds", "--x0-lambdas"],
    "Muon": ["--optimizer", "muon"],
}


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
    race: tuple = ("byte", "bpe:512", "bpe:1024", "bpe:2048", "bpe:4096")  # row 6: the tokenizers raced
    race_every: int = 25  # rows 6 and 7 evaluate on the whole val split every this many steps
    race_rounds: int = 2  # rows 6 and 7 run each contender this many times (--rounds overrides)
    ablation: tuple = tuple(SWITCHES)  # row 7: the switches tried, alone and together
    ablation_tokenizers: tuple = ("byte", "bpe:1024")  # row 7: bytes and the best train-split BPE of row 6


FULL = Sizes(
    train_model=dict(n_layer=6, n_head=6, n_embd=384, n_positions=256), train_batch=8,
    decode_model={}, prompt_tokens=16, new_tokens=256, uncached_tokens=16,
    text_mb=13, cuda_model=dict(block_size=1024), cuda_batch=16,
)
QUICK = Sizes(
    train_model=dict(n_layer=1, n_head=2, n_embd=64, n_positions=32), train_batch=2,
    decode_model=dict(n_layer=1, n_head=2, n_embd=64), prompt_tokens=16, new_tokens=16, uncached_tokens=4,
    text_mb=1, cuda_model=dict(n_layer=1, n_head=2, n_embd=64, block_size=32), cuda_batch=2, to_loss_steps=20,
    race=("byte", "bpe:300"), race_every=10, race_rounds=1, ablation=("the default run", "relu2 MLP"),
    ablation_tokenizers=("byte",),
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


def nanogpt_model(ours, device, folder=None):
    """nanoGPT's GPT from FOLDER/model.py (default $NANOGPT_DIR) holding our weights (same shapes and names but
    its (out, in) Linear layout, as ours), or None when there is no folder."""
    folder = folder or os.environ.get("NANOGPT_DIR")
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


def decode_speeds(hf_fields, prompt_tokens, n, rounds, device, uncached=0):
    """Greedy decoding of n tokens after a random prompt, on the same random weights: ours eager with its KV cache,
    ours with its decode step compiled (transformer.generate(compile=True): one fixed-shape step, compiled once), HF
    generate with its cache, and (uncached > 0) ours re-encoding the prefix for `uncached` tokens from the middle
    of such a run. Returns ({name: [tok/s of each round]}, seconds the compiled one's first call took over its
    median, {name: its tokens == ours eager's})."""
    ours, hf = same_weights(hf_fields, device)
    ours.eval()
    hf.eval()
    V, m = ours.config.vocab_size, uncached
    prompt = random_tokens((1, prompt_tokens), V, device)
    names = "ours generate, KV cache", "ours generate, KV cache, compiled", "HF generate, use_cache=True"
    contenders = {
        names[0]: lambda: transformer.generate(ours, prompt, n, temperature=0),
        names[1]: lambda: transformer.generate(ours, prompt, n, temperature=0, compile=True),
        names[2]: lambda: hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), use_cache=True, do_sample=False,
            max_new_tokens=n, min_new_tokens=n, pad_token_id=hf.config.eos_token_id,
        ),
    }
    work = {name: n for name in names}
    if m:
        # Without a cache a step re-encodes the whole prefix, so its cost grows with the prefix, and all
        # n tokens would take minutes. The m tokens timed are the middle ones of a run of n: their mean
        # prefix is the whole run's, and so is their rate. (The prefix's content does not matter.)
        prefix = random_tokens((1, prompt_tokens + n // 2 - m // 2), V, device)
        name = f"ours generate, no cache ({m} tokens)"
        contenders[name], work[name] = lambda: transformer.generate(ours, prefix, m, temperature=0, use_cache=False), m
    synchronize()
    t0 = time.perf_counter()
    contenders[names[1]]()  # the first compiled call compiles: timed apart, before alternate's warm-up
    synchronize()
    first = time.perf_counter() - t0
    seconds, outputs = alternate(contenders, rounds)
    same = {name: torch.equal(outputs[name], outputs[names[0]]) for name in names[1:]}
    return rates(seconds, work), first - statistics.median(seconds[names[1]]), same


def row_decode(sizes, rounds, device):
    n, m = sizes.new_tokens, sizes.uncached_tokens
    tok_s, compile_s, same = decode_speeds(sizes.decode_model, sizes.prompt_tokens, n, rounds, device, uncached=m)
    (eager, compiled, hf, uncached), rate = tok_s, list(tok_s.values())
    line("2 decode", eager, "tok/s", rate[0])
    line("", compiled, "tok/s", rate[1], f"compiled {median_ratio(rate[1], rate[0]):.2f}x eager, "
         f"{median_ratio(rate[1], rate[2]):.2f}x HF")
    line("", hf, "tok/s", rate[2], versus(rate[0], rate[2], "HF", 1.3))
    line("", uncached, "tok/s", rate[3], versus(rate[0], rate[3], "uncached", 10))
    first = n // 2 - m // 2 + 1
    line("", f"  (compiled: its first call took {compile_s:.1f} s longer, compiling; once for all {n} tokens)")
    line("", f"  (no cache: tokens {first}-{first + m - 1} of {n}, at the run's mean prefix length)")
    line("", f"ours == HF, {n} greedy tokens: {'yes' if same[hf] else 'NO, they differ'}")
    line("", f"compiled == eager, {n} greedy tokens: {'yes' if same[compiled] else 'NO, they differ'}")


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
# --gpu-check: every command, on this GPU, in one run
# About one session in five is lent a GPU for a few minutes, so the check runs everything in one call and
# says everything in one go: each item runs inside try/except (one failure is reported, the rest still run),
# prints its line as it ends, and a summary table comes last (and as JSON under --out). --quick runs the same
# code at a tiny size on the CPU (gloo for NCCL, fp32, no compile where the CLI's CPU defaults say so) in the
# test suite, so the check cannot rot between the turns that have a GPU.


@dataclass
class CheckSizes:
    size: str  # the CLI's --size (the model trained by items 1, 2 and 5; GPT-2's architecture)
    seq_len: int  # T
    batch: int  # B
    vocab: int  # the tokenizer's (the check writes a byte-level BPE of this many tokens)
    steps: int  # training steps of the CLI runs (items 1, 2)
    compare_steps: int  # bf16 vs fp32 steps (item 4)
    decode_model: dict  # GPT2Config fields of the model decoded in item 6
    new_tokens: int
    rounds: int  # alternating rounds of items 6 and 7


CHECK_FULL = CheckSizes(size="gpt2", seq_len=1024, batch=16, vocab=50257, steps=30, compare_steps=20,
                        decode_model={}, new_tokens=256, rounds=3)
CHECK_QUICK = CheckSizes(size="tiny", seq_len=64, batch=4, vocab=512, steps=8, compare_steps=3,
                         decode_model=dict(n_layer=1, n_head=2, n_embd=64), new_tokens=16, rounds=1)


@dataclass
class Check:
    """What the items share: the sizes, the device, a scratch folder, and what item 1 leaves for the others."""
    sizes: CheckSizes
    device: torch.device
    work: str
    nanogpt: str = None  # a folder holding nanoGPT's model.py, or None
    data: str = None  # item 1's random-token shards
    run: str = None  # item 1's --out-dir: ckpt.pt and metrics.jsonl
    losses: list = None  # item 1's losses, step by step

    def config(self, **overrides):
        return transformer.GPTConfig.preset(self.sizes.size, "gpt2", block_size=self.sizes.seq_len,
                                            vocab_size=self.sizes.vocab, **overrides)

    def train_flags(self, out, device=None, *more):
        """The CLI's training flags of items 1, 2 and 5: its defaults (on CUDA: bf16, compile, fused AdamW,
        pinned memory), the check's shape, a val loss at the end."""
        s = self.sizes
        return ["--data", self.data, "--out-dir", out, "--size", s.size, "--arch", "gpt2", "--seq-len", str(s.seq_len),
                "--batch-size", str(s.batch), "--max-steps", str(s.steps), "--warmup-steps", "2", "--lr", "1e-3",
                "--log-every", "5", "--eval-every", str(s.steps), "--eval-iters", "2",
                "--device", str(device or self.device.type), *more]


# The CLI as a user runs it, inside a wrapper that prints the process's peak memory at its exit: the GPU's
# allocator peak on CUDA, the peak RSS otherwise. runpy runs transformer.py as __main__, as `python transformer.py`.
PEAK_MEMORY_WRAPPER = """
import atexit, runpy, sys, torch

def peak():
    if torch.cuda.is_initialized():
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU)", flush=True)
    else:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(f"peak memory {kb / 2**20:.2f} GiB (RSS)", flush=True)

atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cli(*argv, torchrun=False, timeout=600):
    """`python transformer.py ARGV` (under `torchrun --nproc_per_node=1` if asked): its stdout; a failure raises
    with the last line of its stderr."""
    script = os.path.join(REPO, "transformer.py")
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script]
              if torchrun else [sys.executable, "-c", PEAK_MEMORY_WRAPPER, script])
    result = subprocess.run([*launch, *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"exit {result.returncode}: {last}")
    return result.stdout


def run_losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f)]


def write_check_data(c):
    """Random-token shards (train and val) with a byte-level BPE tokenizer of sizes.vocab tokens, written here
    (no download: a GPU machine may have no network, nor tiktoken's files). Tokens come from the first vocab/50
    ids only, so the loss has somewhere to fall to."""
    import numpy as np

    import prepare_data

    s, folder = c.sizes, os.path.join(c.work, "data")
    tok_dir = os.path.join(c.work, "tokenizer")
    os.makedirs(folder)
    os.makedirs(tok_dir)
    spelled = [convert.byte_spelling()[b] for b in range(256)]
    tokens = spelled + [f"<{i}>" for i in range(s.vocab - 257)] + ["<|endoftext|>"]  # no merges: ids stay apart
    convert.byte_level_tokenizer(tokens, [], s.vocab - 1).save(os.path.join(tok_dir, "tokenizer.json"))
    files.write_json(os.path.join(tok_dir, "tokenizer_config.json"),
                     {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    rng = np.random.default_rng(0)
    counts = {"train": (s.steps + 4) * s.batch * (s.seq_len + 1), "val": 4 * s.batch * (s.seq_len + 1)}
    for split, n in counts.items():
        prepare_data.write_shard(os.path.join(folder, f"{split}_000000.bin"),
                                 rng.integers(0, s.vocab // 50, n).astype(np.uint16), s.vocab)
    files.write_json(os.path.join(folder, "meta.json"), {
        "format_version": 1, "tokenizer": "hf:" + tok_dir, "vocab_size": s.vocab, "eot": s.vocab - 1,
        "splits": {split: {"tokens": n, "shards": 1} for split, n in counts.items()}})
    return folder


def check_cli(c):
    """1. The real CLI with its defaults at the check's shape: tokens/s, the MFU it prints, peak memory, loss falls."""
    c.data, c.run = write_check_data(c), os.path.join(c.work, "one")
    out = cli(*c.train_flags(c.run))
    tok_s, mfu_text = re.findall(r"([\d,]+) tok/s \| MFU (\S+)", out)[-1]
    memory = re.search(r"peak memory (.*)", out)[1]
    c.losses = run_losses(c.run)
    falls = c.losses[-1] < c.losses[0] - 0.5
    compiled = ", compiled" in out
    summary = (f"{c.sizes.size} T={c.sizes.seq_len} B={c.sizes.batch}{' compiled' if compiled else ''}: {tok_s} tok/s, "
               f"MFU {mfu_text}, peak {memory}, loss {c.losses[0]:.2f} -> {c.losses[-1]:.2f}")
    return falls, summary, dict(tokens_per_s=float(tok_s.replace(",", "")), mfu=mfu_text, peak_memory=memory,
                                compiled=compiled, losses=c.losses)


def check_torchrun(c):
    """2. torchrun --nproc_per_node=1 (NCCL on a GPU, gloo on the CPU): DDP and --fsdp finish and track item 1."""
    worst, details = {}, {}
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        folder = os.path.join(c.work, name)
        cli(*c.train_flags(folder, None, *flags), torchrun=True)
        losses = run_losses(folder)
        worst[name] = max(abs(a - b) for a, b in zip(losses, c.losses))
        details[name] = dict(losses=losses, largest_difference=worst[name])
    ok = all(w < 0.05 for w in worst.values())
    return ok, "largest loss difference to one process: " + ", ".join(
        f"{name} {w:.4f}" for name, w in worst.items()) + " (tolerance 0.05)", details


def check_attention_kernels(c):
    """3. Which SDPA kernels take a bf16 training step (forward and backward) of each attention path, and which one
    runs when SDPA may choose. The plain causal path must run on flash on a GPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    paths = {"causal": {}, "GQA (RoPE, enable_gqa)": dict(pos="rope", n_kv_head=c.config().n_head // 2),
             "ALiBi (float mask)": dict(pos="alibi")}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    x = random_tokens((2, c.sizes.seq_len), c.sizes.vocab, c.device)
    results = {}
    for path, overrides in paths.items():
        model = GPT(c.config(**overrides)).to(c.device)

        def step(model=model):
            with transformer.autocast(c.device, torch.bfloat16):
                model(x, x)[1].backward()

        runs = []
        for name, backend in backends.items():
            with contextlib.suppress(RuntimeError), sdpa_kernel(backend):
                step()
                runs.append(name)
        with torch.profiler.profile() as prof:
            step()
        chosen = sorted({e.key.removeprefix("aten::_scaled_dot_product_") for e in prof.key_averages()
                         if e.key.startswith("aten::_scaled_dot_product_")})
        results[path] = dict(runs_on=runs, chosen=chosen)
    ok = "flash" in results["causal"]["runs_on"] or c.device.type != "cuda"
    return ok, " | ".join(f"{p}: {'/'.join(r['runs_on']) or 'none'} (chosen: {', '.join(r['chosen'])})"
                          for p, r in results.items()), results


def check_bf16_tracks_fp32(c):
    """4. compare_steps training steps in bf16 autocast and in fp32 from the same weights on the same batches."""
    steps, B, T = c.sizes.compare_steps, c.sizes.batch, c.sizes.seq_len
    torch.manual_seed(0)
    batches = [random_tokens((B, T + 1), c.sizes.vocab // 50, c.device) for _ in range(steps)]

    def run(dtype):
        torch.manual_seed(0)
        model = GPT(c.config()).to(c.device)
        optimizer = transformer.configure_optimizer(model, 3e-4, 0.1, c.device.type)
        losses = []
        for buf in batches:
            with transformer.autocast(c.device, dtype):
                loss = model(buf[:, :-1], buf[:, 1:])[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    bf16, fp32 = run(torch.bfloat16), run(torch.float32)
    worst = max(abs(a - b) for a, b in zip(bf16, fp32))
    return worst < 0.05, f"{steps} steps, largest loss difference {worst:.4f} (tolerance 0.05)", dict(
        bf16=bf16, fp32=fp32)


def check_checkpoints_travel(c):
    """5. Item 1's checkpoint samples and resumes on the CPU, and the checkpoint that CPU run writes resumes on the
    device: both directions, each one step further (with --quick on the CPU, the one leg is both)."""
    folder = os.path.join(c.work, "travel")
    shutil.copytree(c.run, folder)
    text = cli("--sample", "--ckpt", os.path.join(folder, "ckpt.pt"), "--device", "cpu", "--max-new-tokens", "8")
    steps = []
    legs = [("cpu", 1), (c.device.type, 2)] if c.device.type != "cpu" else [("cpu", 1)]  # --quick: one leg is both
    for device, more in legs:
        cli(*c.train_flags(folder, device, "--resume", "--max-steps", str(c.sizes.steps + more)))
        steps.append(json.loads(open(os.path.join(folder, "metrics.jsonl")).read().splitlines()[-1])["step"])
    ok = steps == [c.sizes.steps + more for _, more in legs] and bool(text.strip())  # steps completed
    return ok, (f"{c.device.type} checkpoint sampled on cpu; resumed "
                + ", then its checkpoint ".join(f"on {device} to step {step}" for (device, _), step in zip(legs, steps))
                ), dict(steps=steps, sample=text)


def check_sampling(c):
    """6. On the device: the KV cache gives the uncached tokens; decode tok/s eager, compiled and HF generate."""
    torch.manual_seed(0)
    model = GPT(c.config()).eval()
    with torch.no_grad():  # weights wider than GPT-2's init: spread-out logits, no near-ties for rounding to flip
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.2)
    model.to(c.device)
    prompt = random_tokens((1, 8), c.sizes.vocab, c.device)
    n = min(32, c.sizes.seq_len - 8)
    cached = transformer.generate(model, prompt, n, temperature=0)
    uncached = transformer.generate(model, prompt, n, temperature=0, use_cache=False)
    tok_s, compile_s, same = decode_speeds(c.sizes.decode_model, 16, c.sizes.new_tokens, c.sizes.rounds, c.device)
    medians = {name: statistics.median(r) for name, r in tok_s.items()}
    eager, compiled, hf = medians.values()
    same_compiled, same_hf = same.values()  # HF's tokens are reported, not required: its kernels round otherwise
    ok = torch.equal(cached, uncached) and same_compiled
    return ok, (f"cache == no cache: {'yes' if torch.equal(cached, uncached) else 'NO'}; decode "
                f"{c.sizes.new_tokens} tokens: eager {eager:,.0f}, compiled {compiled:,.0f} "
                f"({compiled / eager:.2f}x, compile {compile_s:.0f} s), HF {hf:,.0f} tok/s (ours {eager / hf:.2f}x, "
                f"compiled {compiled / hf:.2f}x); same tokens as eager: compiled {'yes' if same_compiled else 'NO'}, "
                f"HF {'yes' if same_hf else 'no'}"), dict(tokens_per_s=medians, compile_seconds=compile_s,
                                                           same_tokens=same)


def check_nanogpt(c):
    """7. A compiled bf16 training step beside nanoGPT's model.py (--nanogpt DIR or NANOGPT_DIR) at the same shapes."""
    if not c.nanogpt:
        return None, "nanoGPT's model.py not at hand (--nanogpt DIR or NANOGPT_DIR)", {}
    B, T = c.sizes.batch, c.sizes.seq_len
    ours = GPT(c.config()).to(c.device)
    theirs = nanogpt_model(ours, c.device, c.nanogpt)
    buf = random_tokens((B, T + 1), c.sizes.vocab, c.device)
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
    contenders = {}
    for name, model in (("ours", ours), ("nanoGPT", theirs)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
                                      fused=c.device.type == "cuda")
        compiled = torch.compile(model) if c.device.type == "cuda" else model

        def loss(compiled=compiled):
            with transformer.autocast(c.device, torch.bfloat16):
                return compiled(x, y)[1]

        contenders[name] = train_step(loss, optimizer)
    seconds, _ = alternate(contenders, c.sizes.rounds + 2)
    tok_s = {name: statistics.median(r) for name, r in rates(seconds, {n: B * T for n in contenders}).items()}
    return True, (f"ours {tok_s['ours']:,.0f}, nanoGPT {tok_s['nanoGPT']:,.0f} tok/s: "
                  f"ours {tok_s['ours'] / tok_s['nanoGPT']:.2f}x"), dict(tokens_per_s=tok_s)


GPU_CHECKS = {"1 cli": check_cli, "2 torchrun": check_torchrun, "3 attention": check_attention_kernels,
              "4 bf16/fp32": check_bf16_tracks_fp32, "5 checkpoints": check_checkpoints_travel,
              "6 sampling": check_sampling, "7 nanoGPT": check_nanogpt}


def gpu_check(quick, device, out=None, nanogpt=None):
    """Run every item of GPU_CHECKS, each to its end or its exception; print a line as each ends and the
    summary table last; write it to OUT/gpu_check.json. Returns the number of items that failed."""
    import traceback

    results = []
    with tempfile.TemporaryDirectory() as work:
        c = Check(CHECK_QUICK if quick else CHECK_FULL, device, work, nanogpt or os.environ.get("NANOGPT_DIR"))
        for name, item in GPU_CHECKS.items():
            t0 = time.perf_counter()
            try:
                ok, summary, details = item(c)
                status = "not at hand" if ok is None else "ok" if ok else "FAILED"
            except Exception as e:  # one item's failure is a finding: report it and run the rest
                status, summary = "FAILED", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
                details = dict(traceback=traceback.format_exc())
            seconds = time.perf_counter() - t0
            results.append(dict(item=name, status=status, seconds=round(seconds, 1), summary=summary,
                                details=details))
            print(f"gpu-check {name}: {status} ({seconds:.0f} s): {summary}", flush=True)
    failed = [r["item"] for r in results if r["status"] == "FAILED"]
    print(f"\ngpu-check summary | {machine(device)}{' | --quick' if quick else ''}")
    print(f"{'item':<14} {'status':<12} {'seconds':>7}  result")
    for r in results:
        print(f"{r['item']:<14} {r['status']:<12} {r['seconds']:>7.0f}  {r['summary']}")
    print(f"gpu-check: {'all items ok' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(dict(machine=machine(device), quick=quick, items=results), f, indent=1, default=str)
    return len(failed)


# nanoGPT's README recipe for a CPU (train_shakespeare_char with its CPU flags), as nanoGPT's own train.py runs
# it, and the same recipe in our trainer: the stand-in when nanoGPT is not at hand.
NANOGPT_CPU_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                     "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                     "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_RECIPE_HERE = ["--data", "data/shakespeare_byte", "--arch", "gpt2", "--n-layer", "4", "--n-head", "4",
                       "--n-embd", "128", "--seq-len", "64",
                       "--batch-size", "12", "--max-steps", "2000", "--lr", "1e-3", "--min-lr", "1e-4",
                       "--warmup-steps", "100", "--eval-every", "250"]


def row_to_loss(sizes, rounds, device):
    """Time to a loss, start to end as a user runs it: `python transformer.py` in a fresh folder (data
    preparation, start-up and the closing sample included) against nanoGPT's CPU recipe run the same way
    (nanoGPT's own prepare.py and train.py from $NANOGPT_DIR, else its recipe in our trainer). Our val loss
    is measured on the whole val split (--eval); nanoGPT's is the last one its train.py prints (20 batches).
    sizes.race_rounds runs each, one at a time, in alternating order (ours, theirs, theirs, ours, ...): minutes."""
    steps = sizes.to_loss_steps
    source = sizes.text or (SHAKESPEARE if os.path.exists(SHAKESPEARE) else prepare_data.default_input())
    contenders = {"ours: python transformer.py (the default run)": [],
                  "nanoGPT's CPU recipe, its own train.py" if os.environ.get("NANOGPT_DIR")
                  else "nanoGPT's CPU recipe in our trainer (no NANOGPT_DIR)": NANOGPT_RECIPE_HERE}
    results = {name: [] for name in contenders}
    for r in range(sizes.race_rounds):
        for name in list(contenders) if r % 2 == 0 else list(contenders)[::-1]:
            with tempfile.TemporaryDirectory() as folder:
                shutil.copy(source, os.path.join(folder, "input.txt"))
                if name.endswith("its own train.py"):
                    results[name].append(run_nanogpt(folder, steps))
                else:
                    results[name].append(run_ours(folder, contenders[name] + (["--max-steps", str(steps)] if steps
                                                                              else [])))
    (ours, ours_runs), (theirs, theirs_runs) = results.items()
    t_ours, t_theirs = ([t for t, _ in runs] for runs in (ours_runs, theirs_runs))
    loss_ours, loss_theirs = (statistics.median(loss for _, loss in runs) for runs in (ours_runs, theirs_runs))
    target = metrics.NANOGPT_CPU_VAL_LOSS
    line("5 to loss", ours, "s", t_ours, f"val {loss_ours:.4f} = {loss_ours / math.log(2):.4f} bits/byte "
         "(whole val split)")
    ratio = median_ratio(t_ours, t_theirs)
    line("", theirs, "s", t_theirs, f"val {loss_theirs:.4f} | ours {ratio:.2f}x its time (goal <= 0.33x to "
         f"{target}: {'met' if ratio <= 0.33 and loss_ours <= target else 'MISSED'})")


def run_ours(folder, flags):
    """(wall seconds of `python transformer.py FLAGS` in folder, its val loss on the whole val split in nats per
    byte, which on ASCII text is nats per character). With --data in flags, tiny Shakespeare's bytes are prepared
    there first (and timed: nanoGPT's prepare.py is); without, the default run prepares its own data."""
    data = flags[flags.index("--data") + 1] if "--data" in flags else shards.DEFAULT_DATA
    t0 = time.perf_counter()
    if "--data" in flags:
        subprocess.run([sys.executable, os.path.join(REPO, "prepare_data.py"), "--tokenizer", "byte", "--out", data],
                       cwd=folder, check=True, capture_output=True)
    subprocess.run([sys.executable, os.path.join(REPO, "transformer.py"), *flags], cwd=folder, check=True,
                   capture_output=True)
    seconds = time.perf_counter() - t0
    result = subprocess.run([sys.executable, os.path.join(REPO, "transformer.py"), "--eval", "--ckpt",
                             "checkpoints/ckpt.pt", "--data", data], cwd=folder, check=True, capture_output=True,
                            text=True)
    return seconds, float(re.search(r"(\d+\.\d+) bits per byte", result.stdout)[1]) * math.log(2)


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


def default_window():
    """(B, T) of the default run: the windows a step of rows 6 and 7 reads."""
    return transformer.RECIPE["batch_size"], transformer.SIZES[transformer.RECIPE["size"]]["block_size"]


def whole_val_iters(data_dir):
    """--eval-iters with which the default run's val estimate reads every val window of its cut once: the whole
    val split but for fewer than B x (T + 1) tokens at its ends, as many as an epoch's offset leaves out."""
    B, T = default_window()
    n = sum(len(shards.load_shard(f)) for f in shards.find_shards(data_dir, "val"))
    return max(1, (n - T) // T // B)  # the windows of the worst offset (T - 1), whole steps of B of them


def to_target(folder, target):
    """(seconds of training to target bits per byte, the step of the first val estimate at or under it) from a
    run's metrics.jsonl, or (None, None); and the run's training seconds. The time is interpolated linearly between
    that estimate and the one before. Training time only: each logged step says
    how fast the steps since the last one ran (tokens_per_s), which leaves out start-up, the evaluations and
    saving, so the time does not depend on how often the run evaluates."""
    B, T = default_window()
    seconds, last, reached, before = 0.0, 0, (None, None), None
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        records = [json.loads(text) for text in f]
    for record in records:
        if "tokens_per_s" in record:
            seconds += (record["step"] - last) * B * T / record["tokens_per_s"]
            last = record["step"]
        if "val_bpb" not in record or reached[0] is not None:
            continue
        if record["val_bpb"] <= target:  # crossed since the evaluation before: the time read off the line between
            t0, bpb0 = before or (seconds, record["val_bpb"])
            reached = (t0 + (seconds - t0) * (bpb0 - target) / max(bpb0 - record["val_bpb"], 1e-9), record["step"])
        before = (seconds, record["val_bpb"])
    return reached, seconds


def race(runs, rounds, device, sizes):
    """The default run once per entry of runs, {name: (prepared data folder, extra flags)}, at the default run's
    budget (or sizes.to_loss_steps), evaluated every sizes.race_every steps on the whole val split: one run at a
    time (two torch runs at once oversubscribe a small CPU), `rounds` times, in alternating order (forward,
    backward, ...) so that a drift of the machine's speed falls on every run alike. Returns {name: [(seconds of
    training to nanoGPT's CPU target or None, its step or None, the end's bits per byte on the whole val split
    by --eval, seconds of training), one per round]}."""
    target = metrics.NANOGPT_CPU_VAL_LOSS / math.log(2)  # nats per character; ASCII: a character is a byte
    steps = ["--max-steps", str(sizes.to_loss_steps)] if sizes.to_loss_steps else []
    results = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        for r in range(rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                data, flags = runs[name]
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run([sys.executable, os.path.join(REPO, "transformer.py"), "--data", data, "--out-dir", out,
                                "--device", device.type, "--eval-every", str(sizes.race_every), "--log-every",
                                str(sizes.race_every), "--eval-iters", str(whole_val_iters(data)), *steps, *flags],
                               check=True, capture_output=True)
                (reached, step), seconds = to_target(out, target)
                ended = subprocess.run([sys.executable, os.path.join(REPO, "transformer.py"), "--eval", "--ckpt",
                                        os.path.join(out, "ckpt.pt"), "--data", data], check=True, capture_output=True,
                                       text=True)
                bpb = float(re.search(r"(\d+\.\d+) bits per byte", ended.stdout)[1])
                results[name].append((reached, step, bpb, seconds))
    return results


def race_lines(row, results, target_name="2.7205 bits/byte"):
    """One table line per contender: seconds of training to the target (min / median / max over the rounds),
    then the median step it was reached at, the median end on the whole val split, and the time against the
    first contender's."""
    first = None
    for i, (name, runs) in enumerate(results.items()):
        times = [t for t, _, _, _ in runs if t is not None]
        steps = [s for _, s, _, _ in runs if s is not None]
        end = statistics.median(b for _, _, b, _ in runs)
        total = statistics.median(s for _, _, _, s in runs)
        whole = len(times) == len(runs)
        reach = (f"at step {statistics.median(steps):.0f}" if whole else
                 f"reached in {len(times)} of {len(runs)} runs" if times else "not reached")
        ratio = ""
        if whole and first:
            ratio = f" | {statistics.median(times) / first:.2f}x the first's time"
        first = first or (statistics.median(times) if whole else None)
        line(row if i == 0 else "", f"{name}: to {target_name}", "s", times if whole else None,
             f"{reach} | end {end:.4f} bits/byte in {total:.0f} s of training{ratio}")


def prepare_race_data(d, tokenizers, source):
    """{tokenizer: folder}: source prepared with each, in d; a BPE learns from the train split only."""
    folders = {}
    for name in tokenizers:
        folders[name] = os.path.join(d, name.replace(":", "-"))
        subprocess.run([sys.executable, os.path.join(REPO, "prepare_data.py"), "--input", source, "--tokenizer", name,
                        "--out", folders[name]], check=True, capture_output=True)
    return folders


def row_tokenizers(sizes, rounds, device):
    """The default run (its model and steps) on tiny Shakespeare tokenized each way in sizes.race (a BPE trained on
    the train split only), raced one at a time (race). Each line: seconds of training to nanoGPT's CPU target in
    bits per byte, the whole val split measured every sizes.race_every steps, and the end by --eval."""
    source = sizes.text or (SHAKESPEARE if os.path.exists(SHAKESPEARE) else prepare_data.default_input())
    with tempfile.TemporaryDirectory() as d:
        folders = prepare_race_data(d, sizes.race, source)
        race_lines("6 tokens", race({name: (folders[name], []) for name in sizes.race}, sizes.race_rounds or rounds,
                                    device, sizes))


def row_ablation(sizes, rounds, device):
    """Each of sizes.ablation's SWITCHES on the default run, with each tokenizer of sizes.ablation_tokenizers,
    raced one at a time in alternating order (race): seconds of training to nanoGPT's CPU target on the whole
    val split, and the end."""
    source = sizes.text or (SHAKESPEARE if os.path.exists(SHAKESPEARE) else prepare_data.default_input())
    with tempfile.TemporaryDirectory() as d:
        folders = prepare_race_data(d, sizes.ablation_tokenizers, source)
        runs = {f"{tok}, {name}": (folders[tok], SWITCHES[name]) for tok in sizes.ablation_tokenizers
                for name in sizes.ablation}
        results = race(runs, sizes.race_rounds or rounds, device, sizes)
        for tok in sizes.ablation_tokenizers:
            race_lines("7 ablate" if tok == sizes.ablation_tokenizers[0] else "",
                       {name: results[name] for name in runs if name.startswith(tok + ",")})


ROWS = {"train": row_train, "decode": row_decode, "prepare": row_prepare, "cuda": row_cuda, "to-loss": row_to_loss,
        "tokenizers": row_tokenizers, "ablation": row_ablation}


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


def parse_args(argv=None):
    """The command line (test_docs.py parses every bench.py command the documents show)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: checks that every row runs")
    p.add_argument("--rounds", type=int, help="timed rounds per contender (default 5, --quick 2)")
    p.add_argument("--device", default="auto", help="auto: cuda > mps > cpu")
    p.add_argument("--rows", type=row_names, default=list(ROWS), help=f"rows to run, comma-separated: {','.join(ROWS)}")
    p.add_argument("--text", help="the UTF-8 text row 3 tokenizes (default: tiny Shakespeare, downloaded if missing)")
    p.add_argument("--gpu-check", action="store_true",
                   help="instead of the table, check every command on the GPU: the CLI (GPT-2 124M, T=1024, bf16, "
                   "compile), torchrun DDP and FSDP, attention kernels, bf16 vs fp32, checkpoints between GPU and "
                   "CPU, sampling and decode speed, nanoGPT's step; at most 8 minutes on one H100/H200")
    p.add_argument("--out", metavar="DIR", help="--gpu-check: also write its summary to DIR/gpu_check.json")
    p.add_argument("--nanogpt", metavar="DIR", help="--gpu-check: a folder with nanoGPT's model.py (default "
                   "$NANOGPT_DIR) to time our training step beside")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.gpu_check:
        device = distributed.pick_device(args.device)
        if device.type != "cuda" and not args.quick:
            print(f"gpu-check: skipped, no CUDA device (this is {device.type}); --quick runs its code at a tiny size")
            return
        quiet_transformers()
        sys.exit(1 if gpu_check(args.quick, device, args.out, args.nanogpt) else 0)
    sizes, rounds = (QUICK, args.rounds or 2) if args.quick else (FULL, args.rounds or 5)
    sizes = dataclasses.replace(sizes, text=args.text, race_rounds=args.rounds or sizes.race_rounds)
    device = distributed.pick_device(args.device)
    torch.manual_seed(0)
    quiet_transformers()
    print(machine(device))
    print(f"{rounds} alternating rounds per row, {sizes.race_rounds} runs each in rows 5-7"
          f"{' (--quick: tiny sizes, not a measurement)' if args.quick else ''}\n")
    print(COLUMNS)
    for name in args.rows:
        ROWS[name](sizes, rounds, device)


if __name__ == "__main__":
    main()
