"""
prepare_data.py: turn text into the token shards that transformer.py trains on.

    python prepare_data.py --tokenizer bpe:1024 --out data/shakespeare_bpe1024   # the default run's data
    python prepare_data.py --tokenizer byte --out data/shakespeare_byte         # tiny Shakespeare as bytes
    python prepare_data.py --input my.txt                                       # GPT-2 BPE -> data/my_gpt2
    python prepare_data.py --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb
    python prepare_data.py --dataset json --data-files a.jsonl b.jsonl --out data/mine

Sources
    A text file (--input FILE) is one document. Without --input the file is input.txt,
    and when that is missing tiny Shakespeare is downloaded to it (sha256 checked).
    A dataset (--dataset) is anything datasets.load_dataset can stream: a hub name, or
    json / text / parquet with --data-files. It is a stream of documents, each read from
    its --text-field.

Tokenizers (--tokenizer, see tokenizer.get_tokenizer)
    gpt2     GPT-2's BPE (tiktoken), vocab 50257. Each dataset document is preceded by
             <|endoftext|> (50256), as in build-nanogpt. Any other tiktoken encoding
             (cl100k_base, o200k_base, ...) the same way.
    byte     the UTF-8 bytes, vocab 256. It has no end-of-text token, so each dataset
             document is preceded by two newlines.
    hf:NAME  an HF tokenizer (a folder or a hub name), through transformers' AutoTokenizer;
             documents are preceded by its eos token.
    bpe:N    a byte-level BPE of N tokens (N >= 257) trained on the first
             --tokenizer-train-bytes of the train split, never on the val split (train_bpe),
             saved as tokenizer.json beside the shards; documents are preceded by its
             <|endoftext|>.
    A text file gets no separator: its tokens are exactly the tokens of the whole file
    (for byte: the file's bytes; for bpe:N, of each split, see Splits).

Splits
    A text file's validation split is its last tokens (--val-fraction, default 0.1, or
    --val-tokens), so train shards followed by val shards concatenate to the whole text.
    For bpe:N it is the file's last --val-fraction of bytes (the bytes that byte holds
    out), cut before the BPE learns from the rest; the two parts are tokenized apart.
    A dataset's validation split is its first --val-tokens tokens (default: one shard),
    as in build-nanogpt; its size is unknown until it has been read, so --val-fraction
    does not apply. For bpe:N the stream is read twice: first past the documents that
    hold the val split, to the BPE's training text, then from the start to tokenize.

Output (--out DIR, default data/<source>_<tokenizer>, e.g. data/input_gpt2, data/input_bpe4096)
    train_000000.bin, train_000001.bin, ...  --shard-tokens tokens each (default 100M);
    val_000000.bin, ...                      the last shard of a split may be shorter
    tokenizer.json                           bpe:N only: the trained tokenizer
    meta.json                                tokenizer, vocab_size, each split's tokens, shards
                                             and bytes (the UTF-8 bytes its tokens spell, for
                                             bits per byte), source; written last: its
                                             presence marks a complete dataset
    Each shard is a header of SHARD_HEADER_INTS (256) little-endian int32,
        [SHARD_MAGIC (20241123), SHARD_VERSION (2), vocab_size, n_tokens, bytes per token, 0, ...]
    followed by n_tokens little-endian token ids: uint16 (2 bytes) while the vocabulary
    fits in 65,536 ids, uint32 (4) beyond. shards.load_shard reads a shard back (also
    version 1's, which were uint16 without the width field). Every file is written under a
    .tmp name and renamed once complete, so an interrupted run never leaves a truncated
    shard that looks whole.

Text is tokenized once, and memory stays flat however large the corpus: a text file is
read in 1 MiB pieces and a dataset is streamed, both tokenized about 16 MB of text at a
time on all cores; besides that only the shard being filled (2 or 4 bytes a token) is held,
and for bpe:N the text it trains on.
A text file's val split starts at a token count known only at the end (bpe:N's, cut in bytes,
does not), so all its tokens go to train shards first; then the last ones are read back, one
shard at a time, and written as val shards, and the train split is cut back: the shard the
boundary falls in is rewritten with only its head, and those wholly past it are deleted.
The extra disk this needs is the val split's size.
"""

import argparse
import contextlib
import glob
import json
import math
import os
import time

import numpy as np
from tqdm import tqdm

from files import atomic_open, download
from flagtypes import ArgumentParser, at_least, in_range
from shards import SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, load_shard, token_dtype
from tokenizer import BPE_SPLIT, EOT_TOKEN, TOKENIZER_JSON, get_tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_INPUT = "input.txt"
DEFAULT_VAL_FRACTION = 0.1
PIECE_BYTES = 1 << 20  # a text file is read and tokenized in pieces of about 1 MiB
BATCH_CHARS = 16 << 20  # characters per tokenizer call, which tiktoken spreads over its threads
SPLITS = ("train", "val")
DECODE_TOKENS = 1 << 20  # a split's tokens are decoded (to count its bytes) a million at a time
TOKENIZER_TRAIN_BYTES = 100_000_000  # a trained BPE learns from the first 100 MB of the text by default


def fail(msg):
    """Stop with one line on stderr and exit status 1: for the user's mistakes, not for bugs."""
    raise SystemExit("prepare_data.py: error: " + " ".join(str(msg).splitlines()))


# -----------------------------------------------------------------------------
# Shards: header + uint16 or uint32 tokens, written atomically


def write_shard(path, tokens, vocab_size):
    """Write tokens (ids < vocab_size) as one shard: the int32 header, then the tokens as uint16 while the
    vocabulary fits in 65,536 ids, else uint32 (shards.token_dtype)."""
    tokens = np.asarray(tokens, dtype=token_dtype(vocab_size))  # a Python int out of the dtype's range raises
    if len(tokens) and tokens.max() >= vocab_size:
        raise ValueError(f"token {tokens.max()} is outside the vocabulary of {vocab_size}")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:5] = SHARD_MAGIC, SHARD_VERSION, vocab_size, len(tokens), tokens.itemsize
    with atomic_open(path) as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


class ShardWriter:
    """Cuts the token stream of one split into {split}_000000.bin, {split}_000001.bin, ...

    Every shard but the split's last holds exactly shard_tokens tokens."""

    def __init__(self, out_dir, split, shard_tokens, vocab_size):
        self.out_dir, self.split, self.shard_tokens, self.vocab_size = out_dir, split, shard_tokens, vocab_size
        self.buf = None  # the shard being filled: allocated by add, freed by close
        self.fill = self.shards = self.tokens = 0

    def path(self, i):
        return os.path.join(self.out_dir, f"{self.split}_{i:06d}.bin")

    def add(self, tokens):
        while len(tokens):
            if self.buf is None:
                self.buf = np.empty(self.shard_tokens, dtype=token_dtype(self.vocab_size))
            n = min(len(tokens), self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + n] = tokens[:n]
            self.fill, tokens = self.fill + n, tokens[n:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self):
        """Write what is buffered: a full shard, or at the end the split's shorter last one."""
        if self.fill:
            write_shard(self.path(self.shards), self.buf[: self.fill], self.vocab_size)
            self.shards, self.tokens, self.fill = self.shards + 1, self.tokens + self.fill, 0

    def close(self):
        """Flush, and free the buffer until tokens are added again."""
        self.flush()
        self.buf = None

    def read_from(self, start):
        """Yield the split's written tokens from position `start` on, one memory-mapped shard at a time."""
        for i in range(start // self.shard_tokens, self.shards):
            yield load_shard(self.path(i))[max(start - i * self.shard_tokens, 0) :]

    def truncate(self, n_tokens):
        """Keep only the split's first n_tokens (> 0): the shard they end in is rewritten with
        only its head, and the shards after it are deleted."""
        shards = -(-n_tokens // self.shard_tokens)  # how many shards n_tokens fill, the last maybe partly
        head = n_tokens - (shards - 1) * self.shard_tokens
        last = load_shard(self.path(shards - 1))
        if head < len(last):
            write_shard(self.path(shards - 1), last[:head], self.vocab_size)  # atomic, like every shard write
        for i in range(shards, self.shards):
            os.remove(self.path(i))
        self.shards, self.tokens = shards, n_tokens


def write_splits(batches, out_dir, first, boundary, shard_tokens, vocab_size):
    """Stream tokens [0, boundary) into split `first` and the rest into the other one.

    batches yields (text bytes, tokens); returns the ShardWriter of each split and the text bytes read."""
    writers = {split: ShardWriter(out_dir, split, shard_tokens, vocab_size) for split in SPLITS}
    (second,) = set(SPLITS) - {first}
    seen = text_bytes = 0
    for n_bytes, tokens in batches:
        head = min(len(tokens), max(boundary - seen, 0))  # how many of these tokens still go to `first`
        writers[first].add(tokens[:head])
        writers[second].add(tokens[head:])
        seen, text_bytes = seen + len(tokens), text_bytes + n_bytes
    for writer in writers.values():
        writer.close()
    return writers, text_bytes


def move_tail_to_val(train, val, n_val):
    """Make the last n_val tokens of the train split the (so far empty) val split: read them
    back from the train shards, write them as val shards, then cut the train split back."""
    keep = train.tokens - n_val
    for tokens in train.read_from(keep):
        val.add(tokens)
    val.close()
    train.truncate(keep)


def remove_dataset(out_dir):
    """Delete what an earlier run wrote (meta.json first, so the folder stops looking complete)."""
    old = [os.path.join(out_dir, "meta.json"), os.path.join(out_dir, TOKENIZER_JSON)]
    old += [p for split in SPLITS for p in glob.glob(os.path.join(out_dir, f"{split}_*.bin"))]
    old += glob.glob(os.path.join(out_dir, "*.tmp"))
    for path in old:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# -----------------------------------------------------------------------------
# Sources: a text file in pieces, or the documents of a streamed dataset


def default_input():
    """input.txt, downloading tiny Shakespeare to it first (checksum verified) if it is missing."""
    if not os.path.exists(DEFAULT_INPUT):
        try:
            hint = "pass --input FILE to use a text file you have"
            download(SHAKESPEARE_URL, DEFAULT_INPUT, hint, SHAKESPEARE_SHA256)
        except ValueError as e:
            fail(e)
    return DEFAULT_INPUT


def piece_end(block):
    """Where to end a piece of `block` so that its tokens are the ones it has inside the whole text.

    A BPE merges only within the pieces its split pattern cuts text into. The patterns of GPT-2,
    cl100k_base, o200k_base and our trained BPE (BPE_SPLIT) all cut a line break that has a visible
    character on each side away from what follows it, and take it with what precedes it in the same
    way whether or not the text goes on. So the piece ends just after the last such line break
    ("speak.\n|All:"). Without one (rare: no line breaks, or only blank lines or non-ASCII around
    them) it ends at a character boundary, where the tokens may differ from the whole text's at that
    one cut; bytes never differ.
    """
    visible = range(0x21, 0x7F)
    i = block.rfind(b"\n", 0, len(block) - 1)
    while i > 0:
        if block[i - 1] in visible and block[i + 1] in visible:
            return i + 1
        i = block.rfind(b"\n", 0, i)
    end = len(block) - 1
    while end > 0 and 0x80 <= block[end] < 0xC0:  # not inside a UTF-8 character
        end -= 1
    return end


def read_text_file(path, start=0, stop=None):
    """Yield the text of a UTF-8 file, or of its bytes [start, stop) (each at a character boundary), in pieces of
    about PIECE_BYTES (see piece_end)."""
    rest = b""
    try:
        with open(path, "rb") as f:
            left = (os.path.getsize(path) if stop is None else stop) - f.seek(start)  # bytes still to read
            while piece := f.read(min(PIECE_BYTES, left)):
                left -= len(piece)
                block = rest + piece
                end = piece_end(block) if left else len(block)
                rest = block[end:]
                yield block[:end].decode("utf-8")
        yield rest.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e.reason})")


def open_dataset(args):
    """Start streaming a dataset; return an iterator over the text of its documents."""
    try:
        import datasets  # only this source needs it
    except ImportError:
        fail("--dataset needs the datasets package: pip install datasets")
    try:
        ds = datasets.load_dataset(
            args.dataset, name=args.name, split=args.split, data_files=args.data_files, streaming=True
        )
    except Exception as e:  # an unknown name, missing files, no network: one line that says which
        fail(f"could not open dataset {args.dataset!r}: {e}")
    return (document_text(doc, args) for doc in ds)


def document_text(doc, args):
    """The text of one document, or a clear error naming the fields it does have."""
    if args.text_field not in doc:
        fail(f"documents of {args.dataset!r} have no field {args.text_field!r} (fields: {', '.join(doc)}); "
             "choose one with --text-field")
    return doc[args.text_field]


# -----------------------------------------------------------------------------
# Tokenizing in batches


def batches_of(texts, max_chars):
    """Group texts into lists of about max_chars characters."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize(texts, tokenizer, separator, desc):
    """Yield (text bytes, tokens) per batch of texts, each text's tokens preceded by `separator`. The bytes
    count what the tokens spell: the texts, and the separator's own bytes ('\n\n': 2, <|endoftext|>: 0).

    encode_batch spreads a batch over threads (tiktoken and HF tokenizers release the GIL)."""
    dtype, separator_bytes = token_dtype(tokenizer.vocab_size), len(tokenizer.decode_bytes(separator))
    with tqdm(desc=desc, unit="tok", unit_scale=True) as bar:
        for batch in batches_of(texts, BATCH_CHARS):
            ids = tokenizer.encode_batch(batch)
            tokens = np.concatenate([np.array(separator + doc, dtype=dtype) for doc in ids])
            bar.update(len(tokens))
            yield sum(len(text.encode("utf-8")) + separator_bytes for text in batch), tokens


def split_bytes(writer, tokenizer):
    """The UTF-8 bytes a written split's tokens spell (what bits per byte divides by), decoded DECODE_TOKENS at
    a time. Exact for byte-level tokenizers; an hf: tokenizer that is not counts through text (HFTokenizer)."""
    return sum(len(tokenizer.decode_bytes(tokens[i : i + DECODE_TOKENS].tolist()))
               for tokens in writer.read_from(0) for i in range(0, len(tokens), DECODE_TOKENS))


# -----------------------------------------------------------------------------
# Training a byte-level BPE on the train split ('bpe:<N>')
#
# Whatever is fitted is fitted on train only: the BPE's merges are statistics of the text it learns from, and a val
# split it had seen would compress better than unseen text does (bpe:4096 on tiny Shakespeare: 8% fewer tokens,
# and words only the val split holds became tokens). A val split counted in tokens ends where the BPE's own
# tokens say, so where it lies is settled before the BPE exists:
#   - a text file's val split is its tail, cut in bytes (text_val_start); the BPE learns from the head;
#   - a dataset's val split is its first tokens; every token lies within one piece of BPE_SPLIT, so the
#     documents that hold that many pieces hold the val split, whatever the merges (skip_val_documents), and the
#     BPE learns from the documents after them.


def text_val_start(path, fraction):
    """Where bpe:N's val split of a text file starts: its last `fraction` of bytes, the bytes that `--tokenizer byte`
    holds out, moved forward to a character boundary. The train split before it is tokenized on its own."""
    size = os.path.getsize(path)
    start = size - round(size * fraction)
    with open(path, "rb") as f:
        f.seek(start)
        head = f.read(3)
    return start + next((i for i, b in enumerate(head) if not 0x80 <= b < 0xC0), len(head))  # not mid-character


def bpe_split():
    """The pre-tokenizer that cuts text into the pieces (BPE_SPLIT) a trained BPE merges within."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(BPE_SPLIT), behavior="isolated")


def skip_val_documents(texts, n_tokens):
    """Read past the documents of the iterator texts that hold a dataset's first n_tokens tokens, in any BPE's
    tokens: a document takes its <|endoftext|> and at least one token per piece of BPE_SPLIT (merges never cross
    pieces), so once the documents read hold n_tokens of those, the val split ends among them. Returns how many
    documents were read: the val split's, and maybe a few of the train split's (their tokens go to train)."""
    split, n_docs, held = bpe_split(), 0, 0
    for text in texts:
        n_docs, held = n_docs + 1, held + 1 + len(split.pre_tokenize_str(text))
        if held >= n_tokens:
            break
    return n_docs


def first_bytes(texts, n_bytes):
    """Read texts from the iterator texts until they hold n_bytes of UTF-8, and return them cut at n_bytes: what a
    tokenizer trains on."""
    sample = []
    for text in texts:
        data = text.encode("utf-8")[:n_bytes]
        sample.append(data.decode("utf-8", errors="ignore"))  # a character cut in two at the limit is dropped
        n_bytes -= len(data)
        if n_bytes <= 0:
            break
    return sample


def train_bpe(sample, vocab_size):
    """A byte-level BPE of vocab_size tokens trained on the texts of sample with HF tokenizers' BpeTrainer, as
    the text of its tokenizer.json (tokenizer.get_tokenizer builds it back).

    Byte-level: text is cut by BPE_SPLIT, each piece's UTF-8 bytes are spelled as printable characters
    (GPT-2's spelling), and all 256 bytes are in the vocabulary from the start, so every byte sequence
    has tokens, whatever the training text held. Then merges of the most frequent neighbouring pair up
    to vocab_size tokens. NOTE: one special token, <|endoftext|> (id 0), as nanochat keeps a <|bos|>: a
    dataset's documents are separated by it (one token where bytes need two newlines), the model learns
    where a document ends, and sampling stops there. A text file's tokens never include it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        bpe_split(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample, trainer)
    if tok.get_vocab_size() < vocab_size:
        fail(f"--tokenizer bpe:{vocab_size}: the text has no more pairs to merge at {tok.get_vocab_size()} tokens; "
             f"use bpe:{tok.get_vocab_size()} or fewer, or more text (--tokenizer-train-bytes)")
    return tok.to_str()


# -----------------------------------------------------------------------------
# CLI


def tokenizer_name(name):
    """--tokenizer's value, checked before any work; get_tokenizer (or train_bpe) makes the tokenizer later."""
    import tiktoken

    if name.startswith("bpe:"):
        if not name[4:].isdigit():
            raise argparse.ArgumentTypeError(f"{name}: bpe:<N> needs a whole number of tokens, e.g. bpe:4096")
        if int(name[4:]) < 257:
            raise argparse.ArgumentTypeError(f"{name}: a BPE needs at least 257 tokens (256 bytes and {EOT_TOKEN})")
        return f"bpe:{int(name[4:])}"
    if name != "byte" and not name.startswith("hf:") and name not in tiktoken.list_encoding_names():
        raise argparse.ArgumentTypeError(f"unknown tokenizer {name!r}: use byte, a tiktoken encoding "
                                         f"({', '.join(tiktoken.list_encoding_names())}), hf:<folder or hub name> "
                                         "or bpe:<N>")
    return name


def parse_args(argv):
    p = ArgumentParser(  # transformer.py's: one-line errors
        prog="prepare_data.py",  # also when transformer.py calls main()
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="FILE",
                        help=f"a UTF-8 text file (default: {DEFAULT_INPUT}, "
                             "where tiny Shakespeare is downloaded if missing)")
    source.add_argument("--dataset", metavar="NAME",
                        help="a dataset to stream with datasets.load_dataset: a hub name such as "
                             "HuggingFaceFW/fineweb-edu, or json / text / parquet with --data-files")
    p.add_argument("--name", help="the dataset's configuration, e.g. sample-10BT")
    p.add_argument("--split", default="train", help="which split of the dataset to read (default: train)")
    p.add_argument("--data-files", nargs="+", metavar="FILE", help="local files for --dataset json / text / parquet")
    p.add_argument("--text-field", default="text", help="the field holding a document's text (default: text)")
    p.add_argument("--tokenizer", type=tokenizer_name, default="gpt2",
                   help="byte (UTF-8 bytes, vocab 256); a tiktoken encoding: gpt2 (the default, vocab 50257), "
                        "cl100k_base, o200k_base, ...; hf:<folder or hub name> (an HF tokenizer); or bpe:<N>, "
                        "a byte-level BPE of N tokens trained on the train split and saved as tokenizer.json")
    p.add_argument("--tokenizer-train-bytes", type=at_least(1), default=TOKENIZER_TRAIN_BYTES, metavar="N",
                   help=f"bpe:<N> trains on the first N bytes of the train split (default: {TOKENIZER_TRAIN_BYTES})")
    p.add_argument("--out", metavar="DIR", help="output folder (default: data/<source>_<tokenizer>)")
    p.add_argument("--shard-tokens", type=at_least(1), default=100_000_000, metavar="N",
                   help="tokens per shard (default: 100000000)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=in_range(0, 1, low_open=True, high_open=True), metavar="F",
                     help="text file: hold out the last F of its tokens for validation (for bpe:<N>, of its "
                          f"bytes) (default: {DEFAULT_VAL_FRACTION})")
    val.add_argument("--val-tokens", type=at_least(1), metavar="N",
                     help="hold out N tokens for validation: a text file's last N (not for bpe:<N>), a dataset's "
                          "first N (default for a dataset: --shard-tokens, one shard)")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out folder")
    args = p.parse_args(argv)
    if not args.dataset and (args.name or args.data_files):
        p.error("--name and --data-files need --dataset")
    if args.dataset and args.val_fraction is not None:
        p.error("--val-fraction needs the total token count, unknown while a dataset streams: use --val-tokens")
    if not args.dataset and args.tokenizer.startswith("bpe:") and args.val_tokens:
        p.error(f"--val-tokens: {args.tokenizer} is trained on a text file's train split, so the file is cut in two "
                "before its tokens exist: give the val split as --val-fraction (of the bytes)")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    if args.tokenizer.startswith("bpe:"):
        name, tokenizer = args.tokenizer, None  # trained below, once the text is open
    else:
        try:
            tokenizer = get_tokenizer(args.tokenizer)
        except ValueError as e:
            fail(e)
        name = tokenizer.name
    if args.dataset:
        source_name = args.dataset.rstrip("/").split("/")[-1] + (f"_{args.name}" if args.name else "")
    else:
        source_name = os.path.splitext(os.path.basename(args.input or DEFAULT_INPUT))[0]
    folder_name = name.replace(":", "").replace("/", "_").strip("_")  # bpe:4096 -> bpe4096
    out = args.out or os.path.join("data", f"{source_name}_{folder_name}")
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        held = "a complete dataset" if os.path.exists(os.path.join(out, "meta.json")) else "files but no meta.json"
        fail(f"{out} already holds {held}; pass --overwrite to replace it")

    if args.dataset:
        texts = open_dataset(args)
        source = {k: getattr(args, k) for k in ("dataset", "name", "split", "data_files", "text_field")}
        # Documents are streamed; the val split is the first --val-tokens tokens.
        first, boundary = "val", args.val_tokens or args.shard_tokens
    else:
        path = args.input or default_input()
        if not os.path.isfile(path):
            fail(f"--input {path}: no such file")
        if os.path.getsize(path) == 0:
            fail(f"{path} is empty")
        texts, source = read_text_file(path), {"input": path}
        # The file is one document; the val split is its last tokens, which move there at the end.
        first, boundary = "train", math.inf  # all to train for now
    val_texts = trained_on = None  # bpe:N on a text file: the text of its val split, cut in bytes
    if tokenizer is None:  # bpe:N learns from the train split only (see text_val_start)
        if args.dataset:
            skipped = skip_val_documents(texts, boundary)
            sample = first_bytes(texts, args.tokenizer_train_bytes)
            texts = open_dataset(args)  # the stream again, from its first document, to be tokenized
            trained_on = {"split": "train", "after_documents": skipped}
        else:
            cut = text_val_start(path, args.val_fraction or DEFAULT_VAL_FRACTION)
            sample = first_bytes(read_text_file(path, stop=cut), args.tokenizer_train_bytes)
            texts, val_texts = read_text_file(path, stop=cut), read_text_file(path, start=cut)
            trained_on = {"split": "train"}
        trained_on["bytes"] = sum(len(t.encode("utf-8")) for t in sample)
        if not trained_on["bytes"]:
            fail(f"--tokenizer {name}: the train split has no text to learn from" + (
                f" after the {skipped:,} documents that hold the val split's {boundary:,} tokens; hold out fewer "
                "with --val-tokens" if args.dataset else ""))
        trained = time.perf_counter()
        tokenizer_json = train_bpe(sample, int(name[4:]))
        tokenizer = get_tokenizer(name, tokenizer_json)
        trained = time.perf_counter() - trained
        print(f"trained {name} on {trained_on['bytes']:,} bytes of the train split in {trained:.1f} s")
    if args.dataset:  # each document is preceded by the end-of-text token, or two newlines
        separator = [tokenizer.eot] if tokenizer.eot is not None else tokenizer.encode("\n\n")
    else:
        separator = []

    if args.overwrite:
        remove_dataset(out)
    os.makedirs(out, exist_ok=True)
    if tokenizer.json is not None:  # a trained BPE travels with its dataset
        with atomic_open(os.path.join(out, TOKENIZER_JSON)) as f:
            f.write(tokenizer.json.encode("utf-8"))
    batches = tokenize(texts, tokenizer, separator, "tokenizing")
    writers, text_bytes = write_splits(batches, out, first, boundary, args.shard_tokens, tokenizer.vocab_size)
    if val_texts is not None:  # the val text after the cut, tokenized on its own
        batches = tokenize(val_texts, tokenizer, separator, "tokenizing val")
        written, val_text_bytes = write_splits(batches, out, "val", math.inf, args.shard_tokens, tokenizer.vocab_size)
        writers["val"], text_bytes = written["val"], text_bytes + val_text_bytes
    total = sum(w.tokens for w in writers.values())
    if args.dataset:
        n_val = boundary
    elif val_texts is not None:
        n_val = writers["val"].tokens
    else:
        n_val = args.val_tokens or round(total * (args.val_fraction or DEFAULT_VAL_FRACTION))
    if not 0 < n_val < total:
        remove_dataset(out)  # leave the folder as empty as it was
        fail(f"{args.dataset or path} has {total} tokens: too few to hold out {n_val} for validation "
             "and train on the rest")
    if not args.dataset and val_texts is None:  # the file's length is known: its last n_val tokens become val
        move_tail_to_val(writers["train"], writers["val"], n_val)
    val_bytes = split_bytes(writers["val"], tokenizer)
    n_bytes = {"train": text_bytes - val_bytes, "val": val_bytes}

    meta = {
        "format_version": SHARD_VERSION,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot": tokenizer.eot,
        "document_separator": separator,
        "shard_tokens": args.shard_tokens,
        # bytes: the UTF-8 bytes each split's tokens spell, for bits per byte (transformer.bits_per_byte)
        "splits": {split: {"tokens": w.tokens, "shards": w.shards, "bytes": n_bytes[split]}
                   for split, w in writers.items()},
        "source": source,
    }
    if trained_on is not None:  # what the BPE learned from: --tokenizer-train-bytes asked, the text it had
        meta["tokenizer_train_bytes"] = args.tokenizer_train_bytes
        meta["tokenizer_trained_on"] = trained_on
    with atomic_open(os.path.join(out, "meta.json")) as f:  # last: marks the dataset complete
        f.write(json.dumps(meta, indent=2).encode())

    seconds = time.perf_counter() - start
    print(
        f"{out}: " + ", ".join(f"{split} {w.tokens:,} tokens / {w.shards} shards" for split, w in writers.items())
        + f"; {seconds:.1f} s, {text_bytes / 1e6 / seconds:.1f} MB/s of text"
    )


if __name__ == "__main__":
    main()
