"""
hellaswag.py: the HellaSwag benchmark (Zellers et al. 2019), scored as build-nanogpt does. A companion of
transformer.py (--eval --hellaswag, --hellaswag-every), which imports it; it never imports transformer.py.

HellaSwag asks which of four endings continues a short scene: "A man is sitting on a roof. He ..."
The model is never shown the choices side by side. As in build-nanogpt ("completion style"), each
ending is scored as a continuation of the context: the loss of its own tokens, summed, and the
lowest loss is the model's answer (acc). Longer endings pile up more loss, so acc_norm compares the
mean loss per ending token instead. Random guessing scores 0.25.

The functions take any model with GPT's interface (model(idx) -> (logits, loss), model.config.block_size)
and any tokenizer with encode(); they run in the caller's autocast.
"""

import json
import sys

import torch
import torch.nn.functional as F

from files import cached_download

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def read_examples(path):
    """The examples of a HellaSwag jsonl file, the official format: one JSON object a line, with
    ctx (text), endings (4 texts) and label (0-3, the right ending). Other fields are ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read a HellaSwag file ({getattr(e, 'strerror', None) or e})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(example, dict) or not {"ctx", "endings", "label"} <= set(example):
            raise ValueError(f"{where}: a HellaSwag example needs the fields ctx, endings and label")
        ctx, endings, label = example["ctx"], example["endings"], example["label"]
        if not isinstance(ctx, str) or not ctx:
            raise ValueError(f"{where}: ctx must be a non-empty text")
        if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
            raise ValueError(f"{where}: endings must be a list of 4 texts")
        if type(label) is not int or not 0 <= label < 4:
            raise ValueError(f"{where}: label must be 0, 1, 2 or 3, not {label!r}")
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no HellaSwag examples in this file")
    return examples


def render(example, tokenizer, block_size):
    """(4 token rows, 4 ending lengths): the context's tokens followed by each ending's.

    Context and ending are tokenized apart and joined, with the space between them at the start of the
    ending, where GPT-2's BPE puts it (" roof" is one token). NOTE: when context + longest ending exceed
    block_size, the context loses its oldest tokens, the same ones for all four rows, so the endings
    still compete on the same context (the official val set fits GPT-2's 1024 tokens: nothing is cut).
    An ending that leaves no room for even one context token is refused."""
    ctx = tokenizer.encode(example["ctx"])
    endings = [tokenizer.encode(" " + ending) for ending in example["endings"]]
    longest = max(len(e) for e in endings)
    if longest >= block_size:
        raise ValueError(f"HellaSwag example {example['ctx'][:30]!r}...: an ending of {longest} tokens does not fit "
                         f"the model's context of {block_size} tokens after at least one context token")
    ctx = ctx[max(0, len(ctx) + longest - block_size) :]
    return [ctx + e for e in endings], [len(e) for e in endings]


@torch.no_grad()
def losses(model, rendered, device):
    """The loss of each ending, for examples rendered by render (a list of (rows, ending lengths)),
    all in one forward -> (summed, mean), each (examples, 4): summed over the ending's tokens, and per token."""
    rows = [row for r, _ in rendered for row in r]
    n_ending = [n for _, ns in rendered for n in ns]
    R, L = len(rows), max(len(r) for r in rows)  # R = 4 x examples
    tokens = torch.zeros(R, L, dtype=torch.long)  # (R, L), right-padded with token 0
    in_ending = torch.zeros(R, L, dtype=torch.bool)  # (R, L): True on the ending's tokens
    for i, (row, n) in enumerate(zip(rows, n_ending)):
        tokens[i, : len(row)] = torch.tensor(row)
        in_ending[i, len(row) - n : len(row)] = True
    tokens, in_ending = tokens.to(device), in_ending.to(device)
    logits, _ = model(tokens)  # (R, L, vocab); causal, so the padding on the right changes nothing before it
    scored = in_ending[:, 1:]  # (R, L-1): position t predicts token t+1, which must be an ending's
    token_loss = torch.zeros(R, L - 1, device=device)  # (R, L-1), zero outside the endings
    token_loss[scored] = F.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored], reduction="none")
    summed = token_loss.sum(dim=1).view(-1, 4)  # (examples, 4)
    return summed, summed / scored.sum(dim=1).view(-1, 4)  # and the mean per ending token, (examples, 4)


def scores(model, examples, tokenizer, device, rank=0, world=1, batch_size=8, progress=False):
    """Score examples[rank::world] -> (n_correct, n_correct_norm, n): this process's share, so a caller
    under torchrun adds the three counts up over processes (Distributed.sum). batch_size examples, 4 rows
    each, go through the model at once. The model is scored in eval mode and left in the mode it came in;
    nothing draws random numbers. Pass the plain model, not a DDP or compiled wrapper: each process runs
    its own shapes, and a compiled model would recompile for each new one."""
    from tqdm import tqdm

    mine = examples[rank::world]
    # Tokenize everything first, so a bad example stops the run before any scoring.
    rendered = [render(e, tokenizer, model.config.block_size) for e in mine]
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    for first in tqdm(range(0, len(mine), batch_size), desc="hellaswag", unit="batch", disable=not progress,
                      file=sys.stderr):
        summed, mean = losses(model, rendered[first : first + batch_size], device)  # (b, 4) each
        labels = torch.tensor([e["label"] for e in mine[first : first + batch_size]], device=device)  # (b,)
        correct += (summed.argmin(dim=1) == labels).sum().item()
        correct_norm += (mean.argmin(dim=1) == labels).sum().item()
    model.train(was_training)
    return correct, correct_norm, len(mine)


def local_copy(path):
    """path itself, or for URL the official validation set (10,042 examples), downloaded once into
    ~/.cache/transformer.py/."""
    return cached_download(path, hint="pass a local copy: --hellaswag FILE") if path == URL else path


def examples(path, dist):
    """The examples of a HellaSwag file, or of the official val set when path is URL: downloaded once into the
    cache, by the master process alone while the others wait (dist: transformer.py's Distributed)."""
    if dist.master:
        local_copy(path)
    dist.barrier()
    return read_examples(local_copy(path))


def accuracy(model, examples, tokenizer, device, dist, batch_size, progress=False):
    """(acc, acc_norm, n) over all examples: each process scores its share, dist.sum adds up the counts."""
    counts = scores(model, examples, tokenizer, device, dist.rank, dist.world, batch_size, progress)
    correct, correct_norm, n = dist.sum(torch.tensor(counts, device=device)).tolist()
    return correct / n, correct_norm / n, n
