"""
shards.py: the token shard format, and a prepared dataset's meta.json. A companion of transformer.py (which
reads shards) and prepare_data.py (which writes them); it never imports either.

A shard is a 1 KiB header of 256 little-endian int32 (magic, format version, vocab size, token count, bytes
per token, then zeros) followed by the tokens: uint16 while the vocabulary fits in 65,536 ids, uint32 beyond
(cl100k_base, o200k_base, Llama 3). Version 1 shards had no width field and hold uint16; they still read.
llm.c and modded-nanogpt write FineWeb as shards of the same shape under other magic numbers: (magic,
version, token count, zeros), no meta.json, the tokenizer implied by the magic: GPT-2 (uint16) or Llama 3
(uint32). A folder of them is read as it is; shard_header tells the formats apart. Every width is
memory-mapped as it lies on disk: no copy. At the end, the default run's data (prepare_default_data).
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np

from tokenizer import TOKENIZER_JSON

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20241123, 2, 256


TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}  # bytes per token -> how the shard stores it


# llm.c's magic numbers (its dev/data/data_common.py): version, token dtype, what a folder's missing meta.json
# would say. Its Llama 3 shards were tokenized with Meta-Llama-3.1-8B's tokenizer (gated: needs an HF login).
LLMC_FORMATS = {
    20240520: (1, TOKEN_DTYPES[2], {"tokenizer": "gpt2", "vocab_size": 50257}),
    20240801: (7, TOKEN_DTYPES[4], {"tokenizer": "hf:meta-llama/Meta-Llama-3.1-8B", "vocab_size": 128256}),
}


def token_dtype(vocab_size):
    """How shards store the ids of a vocabulary: uint16 while they fit, else uint32."""
    return TOKEN_DTYPES[2] if vocab_size <= 2**16 else TOKEN_DTYPES[4]


def shard_header(path):
    """(format, vocab_size, token count, token dtype, implied meta) from a shard's header, checked against the
    file. The magic number decides the format: this project's ('transformer.py', implied meta None) or llm.c's
    ('llm.c': the vocab and tokenizer its magic implies, LLMC_FORMATS)."""
    try:
        header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    except OSError as e:
        raise ValueError(f"{path}: cannot read shard ({e.strerror})") from None
    magic = header[0] if header.size == SHARD_HEADER_INTS else None
    if magic == SHARD_MAGIC:
        if header[1] not in (1, SHARD_VERSION):
            raise ValueError(f"{path}: shard format version {header[1]}, this code reads versions 1 and "
                             f"{SHARD_VERSION}: update transformer.py, or prepare the data again")
        width = 2 if header[1] == 1 else int(header[4])  # version 1 had no width field: uint16
        if width not in TOKEN_DTYPES:
            raise ValueError(f"{path}: header says {width} bytes per token; shards hold 2 or 4")
        fmt, vocab_size, n, dtype, implied = "transformer.py", int(header[2]), int(header[3]), TOKEN_DTYPES[width], None
    elif magic in LLMC_FORMATS:
        version, dtype, implied = LLMC_FORMATS[magic]
        if header[1] != version:
            raise ValueError(f"{path}: llm.c shard format version {header[1]}, this code reads version {version}")
        fmt, vocab_size, n = "llm.c", implied["vocab_size"], int(header[2])
    else:
        raise ValueError(f"{path}: not a token shard (bad magic); make shards with prepare_data.py")
    held = (os.path.getsize(path) - 4 * SHARD_HEADER_INTS) / dtype.itemsize
    if held != n:
        raise ValueError(f"{path}: header says {n} tokens but the file holds {held:g}: truncated or corrupt")
    return fmt, vocab_size, n, dtype, implied


def load_shard(path, vocab_size=None):
    """Memory-map a shard's tokens (uint16 or uint32 as stored, shape (n,)) after checking its header against
    the file, and its ids against its vocabulary: zero-copy, whatever the width. An id past the vocabulary would
    otherwise train until a batch drew it, then end in an IndexError (on a GPU, a device-side assert)."""
    _, shard_vocab, n, dtype, _ = shard_header(path)
    if vocab_size is not None and shard_vocab != vocab_size:
        raise ValueError(f"{path}: shard vocab_size {shard_vocab} does not match the dataset's {vocab_size}")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=4 * SHARD_HEADER_INTS, shape=(n,))
    if n and tokens.max() >= shard_vocab:  # one pass over the file; where, only for the error line
        at = int(np.argmax(tokens >= shard_vocab))
        raise ValueError(f"{path}: id {tokens[at]} at token {at:,} is outside its vocabulary of {shard_vocab} ids: "
                         "a corrupt shard, or one written for another tokenizer")
    return tokens


def find_shards(data_dir, split):
    """The shards of one split, in name order. The rule: a file <split>.bin, <prefix>_<split>.bin or either
    with _<number> before .bin, so the split is a whole word of the name: this project's train_000000.bin,
    llm.c's fineweb_train_000001.bin and tiny_shakespeare_val.bin, but not interval_000000.bin."""

    def of_split(file):  # 'fineweb_train_000001.bin' -> ['fineweb', 'train', '000001']
        words = os.path.basename(file).removesuffix(".bin").split("_")
        return words[-1] == split or (len(words) > 1 and words[-2] == split and words[-1].isdigit())

    files = sorted(f for f in glob.glob(os.path.join(data_dir, "*.bin")) if of_split(f))
    if not files:
        raise ValueError(f"{data_dir}: no {split}_*.bin shards (nor llm.c's *_{split}_*.bin); "
                         "make them with prepare_data.py")
    return files


def read_meta(data_dir):
    """meta.json of a prepared dataset: tokenizer, vocab_size, each split's token and byte counts. Written last,
    so it marks a complete dataset. A trained BPE's tokenizer.json comes back in meta['tokenizer_json'], for
    get_tokenizer. A folder of llm.c shards has no meta.json: its magic implies one (LLMC_FORMATS)."""
    path = os.path.join(data_dir, "meta.json")
    if os.path.isfile(path):
        with open(path) as f:
            meta = json.load(f)
        if meta["tokenizer"].startswith("bpe:"):
            try:
                with open(os.path.join(data_dir, TOKENIZER_JSON), encoding="utf-8") as f:
                    meta["tokenizer_json"] = f.read()
            except FileNotFoundError:
                raise ValueError(f"{data_dir}: meta.json names tokenizer {meta['tokenizer']}, but its "
                                 f"{TOKENIZER_JSON} is missing; prepare the dataset again") from None
        return meta
    shards = sorted(glob.glob(os.path.join(data_dir, "*.bin")))
    implied = shard_header(shards[0])[4] if shards else None
    if implied is not None:
        return dict(implied)
    raise ValueError(f"{data_dir}: no prepared dataset here (no meta.json); make one with prepare_data.py")


# The default run's data: tiny Shakespeare as a byte-level BPE of 1,024 tokens that prepare_data.py learns from its
# train split in a fraction of a second (HF tokenizers). Against bytes it reaches nanoGPT's loss in a third of the
# time (docs/results.md, "Tokenizers"): a token holds ~2.4 characters, so each step reads ~2.4x the text.
DEFAULT_TOKENIZER = "bpe:1024"
DEFAULT_DATA = os.path.join("data", "shakespeare_bpe1024")  # where the default run prepares its data


def prepare_default_data(dist):
    """The default run's data, prepared on first use by rank 0 running prepare_data.py as a program (a companion
    never imports it) on tiny Shakespeare (input.txt, downloaded if missing), while the others wait."""
    if dist.master and not os.path.exists(os.path.join(DEFAULT_DATA, "meta.json")):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
        done = subprocess.run([sys.executable, script, "--tokenizer", DEFAULT_TOKENIZER, "--out", DEFAULT_DATA,
                               "--overwrite"])
        if done.returncode != 0:
            raise SystemExit(done.returncode)  # prepare_data.py has said why, in one line
    dist.barrier()
    return DEFAULT_DATA
