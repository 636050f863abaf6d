"""
flagtypes.py: argparse that checks every value before any work. A companion of transformer.py and
prepare_data.py, whose command lines use it; it never imports either.

Each type below turns a bad value into one line ("must be >= 1, got 0"), and ArgumentParser prints it
as 'PROG: error: ...' with exit status 2, without argparse's usage block. At the end, transformer.py's
commands: which flags each reads (READS, command) and the flags that must agree (check_flags).
"""

import argparse
import importlib.util
import math
import os


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block): 'transformer.py: error: ...', exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(low, high=None):
    """An argparse type: an integer >= low (and <= high, when given)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be >= {low}{f' and <= {high}' if high else ''}, got {value}")
        return value

    return parse


def in_range(low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a finite number between low and high, each end included unless it is open."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            if high == math.inf:
                interval = f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text}")
        return value

    return parse


def device_name(text):
    """An argparse type: 'auto' or a device torch knows and this machine has (cpu, cuda, cuda:1, mps)."""
    import torch  # here, not at the top: prepare_data.py reads flags with this file and never needs torch (~1 s)

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine")
    return text


# transformer.py's commands and what each reads, in one place: any other flag given to it is refused (check_flags),
# never ignored. The commands: training (the default), --sample, --eval over --data or --text, --eval --hellaswag,
# and the exports, which write a checkpoint (or HF weights) as it is, on the CPU.
ARCH_FLAGS = ("pos", "norm", "mlp", "n_kv_head", "tie_embeddings", "embed_norm", "qk_norm", "logit_softcap",
              "zero_init_proj", "value_embeds", "x0_lambdas")  # override the --arch preset: GPTConfig's fields
LOADING = ("ckpt", "init_from", "block_size", "device", "dtype")  # what --sample and --eval run, and where
READS = {
    "training": ("data", "arch", *ARCH_FLAGS, "size", "n_layer", "n_head", "n_embd",
                 "block_size", "seq_len", "dropout", "init_from", "batch_size", "total_batch_tokens", "max_steps",
                 "optimizer", "lr", "muon_lr", "min_lr", "warmup_steps", "lr_decay_steps", "weight_decay",
                 "grad_clip", "seed", "out_dir", "log_every", "eval_every", "eval_iters", "ckpt_every", "ckpt_format",
                 "keep_checkpoints", "async_save", "resume", "hellaswag_every", "hellaswag", "wandb", "device",
                 "dtype", "compile", "grad_checkpointing", "fsdp"),
    "--sample": (*LOADING, "sample", "seed", "compile", "prompt", "num_samples", "max_new_tokens", "temperature",
                 "top_k", "top_p", "no_stop", "no_cache", "interactive"),
    "--eval": (*LOADING, "eval", "batch_size", "data", "text"),
    "--eval --hellaswag": (*LOADING, "eval", "hellaswag", "batch_size"),
    "--export-hf/--export-gguf": ("ckpt", "init_from", "export_hf", "export_gguf", "gguf_dtype"),
}


# What --resume takes from its checkpoint's command line when not given: the data, the model and the optimization,
# so that `--resume` alone continues the run as it was started, whatever today's defaults are. Not the machine's
# flags (device, dtype, compile, --fsdp, the checkpoint format): a run resumes on another machine or process count.
RESUMED = ("data", "arch", *ARCH_FLAGS, "size", "n_layer", "n_head", "n_embd", "block_size", "seq_len", "dropout",
           "batch_size", "total_batch_tokens", "max_steps", "optimizer", "lr", "muon_lr", "min_lr", "warmup_steps",
           "lr_decay_steps", "weight_decay", "grad_clip", "seed", "log_every", "eval_every", "eval_iters",
           "ckpt_every", "hellaswag_every", "hellaswag")


def command(args):
    """Which of READS's commands a command line runs."""
    if args.export_hf or args.export_gguf:
        return "--export-hf/--export-gguf"
    if args.sample:
        return "--sample"
    if args.eval:
        return "--eval --hellaswag" if args.hellaswag is not None else "--eval"
    return "training"


def check_flags(p, args, given):
    """What no single flag can check, bar the model's shape (transformer.py's check_args): flags the command does not
    read (given: the flags typed on the command line, by name), and flags that must agree with each other."""
    what = command(args)
    for name in given:
        if name not in READS[what]:
            p.error(f"--{name.replace('_', '-')} is not read by {what}: drop it")
    if "ckpt" in given and "init_from" in given:
        p.error("give --ckpt or --init-from, not both")
    if "data" in given and "text" in given:
        p.error("--eval reads --data or --text, not both")
    if "gguf_dtype" in given and not args.export_gguf:
        p.error("--gguf-dtype is for --export-gguf")
    # FSDP: each process holds a shard of every weight, which only a training run under torchrun can use
    if args.fsdp and "RANK" not in os.environ:  # what Distributed reads: set by torchrun
        p.error("--fsdp shards the model over processes: start it with torchrun --nproc_per_node=N transformer.py "
                "--fsdp ...")
    args.ckpt_format = args.ckpt_format or ("sharded" if args.fsdp else "file")
    if args.ckpt_format == "file" and (args.async_save or args.keep_checkpoints > 1):  # refused, not ignored
        p.error("--async-save and --keep-checkpoints are for --ckpt-format sharded (the default under --fsdp)")
    if args.optimizer == "muon" and args.ckpt_format == "sharded":  # and the Optimizers pair DCP does not know
        p.error("--optimizer muon needs whole matrices (Newton-Schulz on a shard is another update): use DDP, ckpt.pt")
    if args.fsdp and args.hellaswag_every:
        p.error("--hellaswag-every under --fsdp is not supported: each process scores its own share of the "
                "examples, and FSDP needs every process in every forward")
    # Sampling, evaluation and export need weights to start from, and none of the training flags below
    exporting = args.export_hf or args.export_gguf
    if args.sample or args.eval or exporting:
        if not (args.ckpt or args.init_from):
            what = "--sample" if args.sample else "--eval" if args.eval else "--export-hf/--export-gguf"
            p.error(f"{what} needs --ckpt PATH or --init-from gpt2|<HF dir>")
        if args.prompt.startswith("FILE:") and not os.path.isfile(args.prompt[5:]):
            p.error(f"--prompt {args.prompt}: no such file")
        return
    # Training: optional packages and the flags that must agree, checked before any data or model is touched
    if args.wandb and importlib.util.find_spec("wandb") is None:
        p.error("--wandb needs the wandb package: pip install wandb")
    if args.hellaswag is not None and args.hellaswag_every is None:
        p.error("--hellaswag goes with --eval or --hellaswag-every")
    if args.optimizer == "muon":
        import torch

        if not hasattr(torch.optim, "Muon"):
            p.error(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
    if args.min_lr > args.lr:
        p.error(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}")
