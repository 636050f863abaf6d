"""
tokenizer.py: text to token ids and back. A companion of transformer.py and prepare_data.py, which import it;
it never imports either.

A tokenizer is named by a string, which datasets (meta.json) and checkpoints record:
  - 'byte': UTF-8 bytes as ids (256 of them): on ASCII text, characters;
  - a tiktoken encoding: 'gpt2' (50,257 ids), 'cl100k_base', 'o200k_base', ...;
  - 'hf:<folder or hub name>': an HF tokenizer, as a checkpoint from the hub brings it;
  - 'bpe:<N>': a byte-level BPE of N ids that prepare_data.py trained on a dataset's train split, saved as
    tokenizer.json beside the shards; built from that file's text, which a checkpoint can carry.
Every tokenizer has encode, encode_batch, decode, decode_bytes (ids -> the bytes they spell, special tokens
none), vocab_size, eot (the end-of-text id, or None) and json (a trained BPE's tokenizer.json text, or None).
"""

import os

import numpy as np

TOKENIZER_JSON = "tokenizer.json"  # a trained BPE ('bpe:<N>'), beside its dataset's meta.json


EOT_TOKEN = "<|endoftext|>"  # the end-of-text token of a trained BPE, as GPT-2 spells it
# GPT-4's split pattern as Llama 3's tokenizer.json writes it (tiktoken's cl100k_base has it with possessive
# quantifiers): what a trained BPE cuts text into before merging, so no token spans two words, a letter and a
# digit, or more than 3 digits. llama.cpp implements the same split (convert.gguf_pre_tokenizer).
BPE_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
             r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def byte_spelling():
    """GPT-2's printable spelling of the 256 bytes, {byte: character}, which byte-level BPE files (GPT-2's HF
    files, ours) use: printable Latin-1 bytes stand for themselves, the others (control bytes, space, ...) take
    the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(0x100 + i) for i, b in enumerate(others)}}


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). On ASCII text such as tiny Shakespeare this is character level."""

    name, vocab_size, eot, json = "byte", 256, None, None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return bytes(ids)


class TiktokenTokenizer:
    """OpenAI's BPE through tiktoken ('gpt2': 50,257 tokens, <|endoftext|> = 50256 separates documents;
    'cl100k_base': 100,277; 'o200k_base': 200,019)."""

    json = None

    def __init__(self, name):
        import tiktoken

        self.enc, self.name = tiktoken.get_encoding(name), name
        self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token
        self.specials = np.array(sorted(self.enc.encode_single_token(s) for s in self.enc.special_tokens_set))

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_bytes(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        return self.enc.decode_bytes(ids[~np.isin(ids, self.specials)].tolist())  # <|endoftext|> spells no text


class BPETokenizer:
    """A byte-level BPE that prepare_data.py trained ('bpe:<N>'), built from its tokenizer.json text with HF
    tokenizers. Every byte is a token of its own, so any byte sequence has ids, and ids decode to bytes."""

    def __init__(self, name, tokenizer_json):
        from tokenizers import Tokenizer

        self.tok, self.name, self.json = Tokenizer.from_str(tokenizer_json), name, tokenizer_json
        self.tok.encode_special_tokens = True  # '<|endoftext|>' in a text is text (tiktoken's encode_ordinary)
        self.vocab_size, self.eot = self.tok.get_vocab_size(), self.tok.token_to_id(EOT_TOKEN)
        spelled = {c: b for b, c in byte_spelling().items()}  # character -> byte
        specials = set(self.tok.get_added_tokens_decoder())
        pieces = sorted((i, t) for t, i in self.tok.get_vocab().items())
        self.pieces = [b"" if i in specials else bytes(spelled[c] for c in t) for i, t in pieces]  # id -> bytes

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]  # on all cores

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return b"".join(self.pieces[i] for i in ids)


class TokenizerUnavailable(ValueError):
    """A tokenizer that exists but cannot be loaded here: offline, a gated hub repo, a folder not on this machine."""


class HFTokenizer:
    """An HF tokenizer: the one saved beside an HF checkpoint (for Llama-family models loaded with --init-from),
    or any hub name transformers can load."""

    json = None

    def __init__(self, path):
        from transformers import AutoTokenizer

        try:
            self.tok, self.name = AutoTokenizer.from_pretrained(path), "hf:" + path
        except OSError as e:  # no such folder, not on the hub, offline, gated
            raise TokenizerUnavailable(f"cannot load tokenizer hf:{path}: {str(e).splitlines()[0]}") from None
        self.vocab_size, self.eot = len(self.tok), self.tok.eos_token_id

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return self.tok.decode(ids)

    def decode_bytes(self, ids):
        # NOTE: through text, so a character cut in two at either end of ids counts as U+FFFD (3 bytes).
        return self.tok.decode(ids, skip_special_tokens=True).encode("utf-8")


def get_tokenizer(name, tokenizer_json=None):
    """'byte'; a tiktoken encoding ('gpt2', 'cl100k_base', 'o200k_base', ...); 'hf:<folder or hub name>'; or
    'bpe:<N>', a BPE prepare_data.py trained, built from the text of its tokenizer.json: read_meta puts it in
    meta['tokenizer_json'], and a checkpoint can carry it (every tokenizer's .json is that text, or None)."""
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("bpe:"):
        if tokenizer_json is None:
            raise ValueError(f"tokenizer {name} was trained by prepare_data.py and needs its {TOKENIZER_JSON}")
        return BPETokenizer(name, tokenizer_json)
    if name.startswith("hf:"):
        return HFTokenizer(name[3:])
    try:
        return TiktokenTokenizer(name)
    except ValueError:
        raise ValueError(f"unknown tokenizer {name!r}: use 'byte', a tiktoken encoding ('gpt2', 'cl100k_base', "
                         "'o200k_base', ...), 'hf:<folder or hub name>' or 'bpe:<N>'") from None
    except OSError as e:  # tiktoken downloads an encoding's file the first time
        raise TokenizerUnavailable(f"cannot load tiktoken's {name}: {str(e).splitlines()[0]}") from None
