"""Tokenizers (tokenizer.py, prepare_data.py --tokenizer): a BPE trained on the train split, vocabularies
beyond uint16, and the byte counts bits per byte divides by. Offline and small: BPEs of a few hundred tokens trained
on a few KB, and tiktoken encodings built here (conftest.register_encoding) where cl100k_base would be downloaded."""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prepare_data
import shards
import tokenizer
import transformer
from conftest import english_text, needs_tiny_shakespeare, write_dataset

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = ["--device", "cpu", "--arch", "gpt2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--seq-len", "16",
        "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2", "--eval-every", "1000", "--eval-iters", "2"]
# Text no training sample below holds: other scripts, emoji, control bytes, CRLF, and <|endoftext|> spelled out.
UNSEEN = "naïve café, Straße; 日本語 🙂\t\x00\x07\x7f\r\nROMEO: 1234567 <|endoftext|> 'tis  end \n\n"


def tokens_of(out, split):
    return np.concatenate([transformer.load_shard(f) for f in transformer.find_shards(str(out), split)])


def prepare(tmp_path, *args):
    """prepare_data.main on args; returns the folder and its meta.json."""
    out = tmp_path / "out"
    prepare_data.main([*args, "--out", str(out)])
    return out, json.loads((out / "meta.json").read_text())


def cli(cwd, *args):
    """prepare_data.py as a user runs it, in cwd."""
    return subprocess.run([sys.executable, os.path.join(REPO, "prepare_data.py"), *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=300)


@pytest.fixture(scope="module")
def bpe():
    """A BPE of 400 tokens trained on 50 KB of play text."""
    return transformer.get_tokenizer("bpe:400", prepare_data.train_bpe([english_text(50_000).decode()], 400))


# -----------------------------------------------------------------------------
# bpe:<N>: trained byte-level BPE


def test_bpe_has_the_size_asked_the_256_bytes_and_one_end_of_text(bpe):
    assert bpe.vocab_size == 400 and bpe.eot == 0
    assert sorted(bpe.decode_bytes([i]) for i in range(400) if len(bpe.decode_bytes([i])) == 1) == [
        bytes([b]) for b in range(256)]
    assert bpe.decode_bytes([bpe.eot]) == b""  # spells no text


def test_bpe_round_trips_text_it_never_saw_exactly(bpe):
    ids = bpe.encode(UNSEEN)
    assert bpe.decode(ids) == UNSEEN and bpe.decode_bytes(ids) == UNSEEN.encode("utf-8")
    assert bpe.eot not in ids  # <|endoftext|> in the text is text, as tiktoken's encode_ordinary treats it
    assert bpe.encode_batch([UNSEEN, "ROMEO:"]) == [ids, bpe.encode("ROMEO:")]


def test_every_byte_sequence_has_ids_that_decode_back_to_it(bpe):
    """Random bytes, invalid UTF-8 included, at the token-id level: each byte's own token, then decode_bytes. A
    model's ids decode to bytes however they split characters."""
    byte_id = {b: bpe.tok.token_to_id(c) for b, c in tokenizer.byte_spelling().items()}
    rng = np.random.default_rng(0)
    for n in (1, 7, 1000):
        data = bytes(rng.integers(0, 256, n, dtype=np.uint8))
        assert bpe.decode_bytes([byte_id[b] for b in data]) == data
    data = b"\xff\xfe\xc0\x80 \xe6\x97 lone \x80 continuation \xf5"  # never valid UTF-8
    assert bpe.decode_bytes([byte_id[b] for b in data]) == data
    ids = rng.integers(0, bpe.vocab_size, 500).tolist()
    assert bpe.decode_bytes(ids) == b"".join(bpe.decode_bytes([i]) for i in ids)


def test_bpe_decodes_as_hf_tokenizers_own_decoder(bpe):
    ids = bpe.encode(UNSEEN + english_text(3000, seed=3).decode())
    assert bpe.tok.decode(ids) == bpe.decode(ids)


def test_bpe_dataset_from_a_text_file_holds_the_files_tokens_and_its_tokenizer(tmp_path, monkeypatch):
    """The val split is the file's last 10% of bytes, as --tokenizer byte holds out (here moved past a character
    cut in two); the BPE learned from the text before it, and each part holds that part's tokens."""
    def text_of(n):  # ends with a cut every 256 bytes or less
        return (english_text(n).decode() + ("ROMEO:\n" + UNSEEN) * 20).encode("utf-8")

    def cut_of(data):  # where --tokenizer byte's val split starts
        return len(data) - round(0.1 * len(data))

    # a length at which that is the second byte of a two-byte character (ï, é or ß: 0b110xxxxx 0b10xxxxxx)
    data = next(d for n in range(10_000, 11_000) if (d := text_of(n))[cut_of(d) - 1] & 0xE0 == 0xC0)
    cut = cut_of(data) + 1  # the val split starts after that character
    text = data.decode("utf-8")
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(prepare_data, "PIECE_BYTES", 256)  # many cuts; none may change a token
    out, meta = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", "bpe:500",
                        "--shard-tokens", "200")
    assert meta["splits"]["train"]["shards"] > 1 and meta["splits"]["val"]["shards"] > 1
    assert (out / "tokenizer.json").exists()
    assert meta["tokenizer"] == "bpe:500" and meta["vocab_size"] == 500 and meta["eot"] == 0
    tok = transformer.get_tokenizer("bpe:500", (out / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok.json == prepare_data.train_bpe([data[:cut].decode()], 500)
    assert meta["tokenizer_trained_on"] == {"split": "train", "bytes": cut}
    train, val = tokens_of(out, "train"), tokens_of(out, "val")
    assert train.tolist() == tok.encode(data[:cut].decode()) and val.tolist() == tok.encode(data[cut:].decode())
    assert meta["splits"]["train"]["bytes"] == cut and meta["splits"]["val"]["bytes"] == len(data) - cut
    assert transformer.read_meta(str(out))["tokenizer_json"] == tok.json


def test_a_text_files_bpe_trains_on_the_first_bytes_of_its_train_split(tmp_path):
    text = english_text(20_000).decode()
    (tmp_path / "in.txt").write_text(text)
    out, meta = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", "bpe:300",
                        "--tokenizer-train-bytes", "5000")
    assert (out / "tokenizer.json").read_text(encoding="utf-8") == prepare_data.train_bpe([text[:5000]], 300)
    assert meta["tokenizer_train_bytes"] == 5000 and meta["tokenizer_trained_on"] == {"split": "train", "bytes": 5000}


def test_bpe_on_a_text_file_refuses_val_tokens_in_one_line(tmp_path):
    """Its val split is cut before the BPE, and so its tokens, exist: in bytes, with --val-fraction."""
    (tmp_path / "in.txt").write_bytes(english_text(5000))
    result = cli(tmp_path, "--input", "in.txt", "--tokenizer", "bpe:300", "--val-tokens", "100")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "prepare_data.py: error: --val-tokens: bpe:300 is trained on a text file's train split, so the file is cut "
        "in two before its tokens exist: give the val split as --val-fraction (of the bytes) (see --help)"]
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


def test_bpe_trains_on_a_dataset_after_the_documents_of_its_val_split(tmp_path):
    """The first 500 tokens are the val split; the BPE learns from the first 2,000 bytes of the documents after
    those that hold it (skip_val_documents: at most a few train documents more), and every document is
    tokenized once, in order."""
    docs = [english_text(700, seed=i).decode() for i in range(12)] + ["naïve 🙂", UNSEEN]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out, meta = prepare(tmp_path, "--dataset", "json", "--data-files", str(tmp_path / "docs.jsonl"),
                        "--tokenizer", "bpe:300", "--tokenizer-train-bytes", "2000", "--shard-tokens", "500")
    tok = transformer.get_tokenizer("bpe:300", (out / "tokenizer.json").read_text(encoding="utf-8"))
    skipped = meta["tokenizer_trained_on"]["after_documents"]
    assert tok.json == prepare_data.train_bpe(prepare_data.first_bytes(iter(docs[skipped:]), 2000), 300)
    assert meta["tokenizer_trained_on"] == {"split": "train", "bytes": 2000, "after_documents": skipped}
    stream = [[tok.eot] + tok.encode(d) for d in docs]  # every document once, in order
    val = tokens_of(out, "val").tolist()
    assert len(val) == 500 and val + tokens_of(out, "train").tolist() == sum(stream, [])
    assert sum(len(d) for d in stream[:skipped]) >= 500  # the val split ends within the documents skipped
    assert meta["tokenizer_train_bytes"] == 2000
    assert meta["splits"]["val"]["bytes"] + meta["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in docs)


def test_a_dataset_too_small_for_its_val_split_leaves_the_bpe_nothing_to_learn_in_one_line(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": english_text(700, seed=i).decode()}) + "\n"
                                                 for i in range(3)))
    result = cli(tmp_path, "--dataset", "json", "--data-files", "docs.jsonl", "--tokenizer", "bpe:300",
                 "--val-tokens", "100000")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "prepare_data.py: error: --tokenizer bpe:300: the train split has no text to learn from after the 3 "
        "documents that hold the val split's 100,000 tokens; hold out fewer with --val-tokens"]
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]


# A word of letter pairs that no train text below holds (the tests check), repeated so that its pairs would be
# among the most frequent merges of any BPE that saw it.
VAL_ONLY_WORD = "zqxjv"
VAL_ONLY_PAIRS = [VAL_ONLY_WORD[i : i + 2].encode() for i in range(len(VAL_ONLY_WORD) - 1)]


def learned_pairs(out, pairs):
    """The pairs among `pairs` that some token of the folder's trained BPE spells: merges it learned."""
    tok = transformer.get_tokenizer(json.loads((out / "meta.json").read_text())["tokenizer"],
                                    (out / "tokenizer.json").read_text(encoding="utf-8"))
    return [p for p in pairs if any(p in piece for piece in tok.pieces)]


def test_a_text_files_bpe_never_learns_a_word_only_its_val_split_holds(tmp_path):
    train = english_text(18_500).decode()
    assert not any(p.decode() in train for p in VAL_ONLY_PAIRS)
    text = train + (VAL_ONLY_WORD + " ") * 250  # 1,500 bytes, all in the last 10% (2,000 bytes)
    (tmp_path / "in.txt").write_text(text)
    out, meta = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", "bpe:300")
    assert learned_pairs(out, VAL_ONLY_PAIRS) == []
    assert meta["tokenizer_trained_on"] == {"split": "train", "bytes": 18_000}


def test_a_datasets_bpe_never_learns_a_word_only_its_val_documents_hold(tmp_path):
    """The val split is the stream's first tokens (by default one shard): here the first document, all of
    VAL_ONLY_WORD (at most 601 tokens, whatever the BPE), and the head of the second."""
    docs = [(VAL_ONLY_WORD + " ") * 100] + [english_text(700, seed=i).decode() for i in range(20)]
    assert not any(p.decode() in d for p in VAL_ONLY_PAIRS for d in docs[1:])
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out, meta = prepare(tmp_path, "--dataset", "json", "--data-files", str(tmp_path / "docs.jsonl"),
                        "--tokenizer", "bpe:300", "--tokenizer-train-bytes", "3000", "--shard-tokens", "1000")
    assert meta["splits"]["val"]["bytes"] > len(docs[0])  # the val split holds the first document whole
    assert learned_pairs(out, VAL_ONLY_PAIRS) == []


def test_bpe_beyond_what_the_text_supports_is_one_line_saying_what_it_reached(tmp_path):
    (tmp_path / "in.txt").write_text("to be or not to be\n" * 50)
    result = cli(tmp_path, "--input", "in.txt", "--tokenizer", "bpe:5000")
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("prepare_data.py: error: --tokenizer bpe:5000: the text has no more pairs to merge at ")
    reached = int(line.split(" merge at ")[1].split()[0])
    assert 257 < reached < 300 and f"use bpe:{reached} or fewer" in line
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]  # nothing written


def test_bpe_training_time_on_tiny_shakespeare_is_seconds():
    """The README's number: bpe:4096 on tiny Shakespeare (1.1 MB) in seconds."""
    text = needs_tiny_shakespeare().decode()
    start = time.perf_counter()
    tok = transformer.get_tokenizer("bpe:4096", prepare_data.train_bpe([text], 4096))
    seconds = time.perf_counter() - start
    assert tok.vocab_size == 4096 and seconds < 20
    assert len(tok.encode(text)) < 0.3 * len(text)  # about 3.6 bytes a token


def test_training_and_sampling_read_a_bpe_dataset_and_its_tokenizer(tmp_path, capsys):
    (tmp_path / "in.txt").write_bytes(english_text(20_000))
    out, _ = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", "bpe:300")
    transformer.main(["--data", str(out), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2"])
    printed = capsys.readouterr().out
    assert "vocab 300 (padded to 320) (bpe:300)" in printed and "--- sample ---" in printed


def test_a_bpe_dataset_prepared_before_the_bpe_learned_from_train_only_still_trains(tmp_path, capsys):
    """Such a dataset's BPE learned from the whole file (val split included) and its meta.json does not say what
    the BPE learned from; its shards and tokenizer.json are as they are now, so it trains and samples as before."""
    text = english_text(20_000).decode()
    (tmp_path / "in.txt").write_text(text)
    out, meta = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", "bpe:300")
    old = transformer.get_tokenizer("bpe:300", prepare_data.train_bpe([text], 300))  # as it was trained before
    tokens = old.encode(text)
    n_val = round(0.1 * len(tokens))
    for split, part in (("train", tokens[:-n_val]), ("val", tokens[-n_val:])):
        prepare_data.write_shard(str(out / f"{split}_000000.bin"), part, 300)
        meta["splits"][split] = {"tokens": len(part), "shards": 1, "bytes": len(old.decode_bytes(part))}
    del meta["tokenizer_trained_on"]
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "tokenizer.json").write_text(old.json, encoding="utf-8")
    transformer.main(["--data", str(out), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2"])
    printed = capsys.readouterr().out
    assert "vocab 300 (padded to 320) (bpe:300)" in printed and "--- sample ---" in printed


def test_a_bpe_checkpoint_samples_on_its_own_once_its_dataset_is_gone(tmp_path, capsys):
    """The tokenizer travels with the model: the checkpoint holds the trained BPE's tokenizer.json."""
    (tmp_path / "in.txt").write_bytes(english_text(20_000))
    out, _ = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", "bpe:300")
    transformer.main(["--data", str(out), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2"])
    shutil.rmtree(out)
    capsys.readouterr()
    transformer.main(["--sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--prompt", "the king",
                      "--max-new-tokens", "5", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("the king")


def test_a_dataset_whose_tokenizer_json_is_missing_is_one_line_before_anything_is_written(tmp_path,
                                                                                          one_line_error):
    (tmp_path / "in.txt").write_bytes(english_text(5000))
    out, _ = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", "bpe:300")
    os.remove(out / "tokenizer.json")
    line = one_line_error(["--data", str(out), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "1"])
    assert line.endswith("meta.json names tokenizer bpe:300, but its tokenizer.json is missing; "
                         "prepare the dataset again")
    assert not (tmp_path / "run").exists()


def test_a_dataset_naming_an_unknown_tokenizer_is_one_line_before_anything_is_written(tmp_path, data,
                                                                                      one_line_error):
    os.makedirs(tmp_path / "d")
    for name in os.listdir(data):
        os.link(os.path.join(data, name), tmp_path / "d" / name)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    os.remove(tmp_path / "d" / "meta.json")  # a link: the shared dataset's file stays as it is
    (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, "tokenizer": "no_such_encoding"}))
    line = one_line_error(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "run"), *TINY])
    assert "unknown tokenizer 'no_such_encoding'" in line
    assert not (tmp_path / "run").exists()


def test_a_trained_bpe_without_its_tokenizer_json_is_refused():
    with pytest.raises(ValueError, match="bpe:300 was trained by prepare_data.py and needs its tokenizer.json"):
        transformer.get_tokenizer("bpe:300")


# -----------------------------------------------------------------------------
# Vocabularies beyond uint16


def test_a_tiktoken_vocabulary_over_65536_prepares_uint32_shards_and_trains(tmp_path, register_encoding, capsys):
    name = register_encoding(70_001)  # as cl100k_base (100,277) would, offline
    text = english_text(20_000).decode()
    (tmp_path / "in.txt").write_text(text)
    out, meta = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", name)
    assert meta["vocab_size"] == 70_001 and meta["format_version"] == 2
    shard = transformer.find_shards(str(out), "train")[0]
    _, vocab, n, dtype, _ = shards.shard_header(shard)
    assert (vocab, dtype) == (70_001, np.dtype("<u4")) and os.path.getsize(shard) == 1024 + 4 * n
    tokens = np.concatenate([tokens_of(out, "train"), tokens_of(out, "val")])
    assert tokens.max() > 65_535  # ids a uint16 would have cut
    enc = transformer.get_tokenizer(name)
    assert tokens.tolist() == enc.encode(text) and enc.decode(tokens.tolist()) == text
    transformer.main(["--data", str(out), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2"])
    assert "vocab 70001 (padded to 70016)" in capsys.readouterr().out
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_data_loader_batches_are_int64_from_uint32_shards(tmp_path):
    rng = np.random.default_rng(0)
    tokens = {s: rng.integers(0, 128_256, n) for s, n in (("train", 3000), ("val", 1000))}
    for split, t in tokens.items():
        prepare_data.write_shard(str(tmp_path / f"{split}_000000.bin"), t, 128_256)
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 128_256}))
    shard = transformer.load_shard(str(tmp_path / "train_000000.bin"), 128_256)
    assert isinstance(shard, np.memmap) and shard.dtype == np.dtype("<u4")  # read in place, not copied
    loader = transformer.DataLoaderLite(str(tmp_path), "train", B=4, T=16)
    batch = loader.next_batch()
    assert batch.dtype == torch.int64 and batch.shape == (4, 17)
    row = batch[0].numpy()
    starts = [i for i in range(len(tokens["train"]) - 16) if tokens["train"][i] == row[0]]
    assert any((tokens["train"][i : i + 17] == row).all() for i in starts)


# -----------------------------------------------------------------------------
# Bits per byte


def test_bits_per_byte_equals_total_bits_over_the_val_texts_bytes(tmp_path):
    """--eval's path: a model's mean loss over the whole val split, converted with meta.json's counts, equals
    its total bits (summed here from its logits) over the UTF-8 bytes of the val text (decoded here by HF
    tokenizers itself)."""
    from tokenizers import Tokenizer

    text = english_text(20_000).decode()
    (tmp_path / "in.txt").write_text(text)
    out, meta = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", "bpe:300",
                        "--val-fraction", "0.004")  # 80 bytes: one window of at most 80 tokens
    val = tokens_of(out, "val")
    torch.manual_seed(0)
    model = transformer.GPT(transformer.GPTConfig(block_size=80, vocab_size=320, n_layer=1, n_head=2, n_embd=16))
    loss, n = transformer.evaluate_tokens(model, val, 1, torch.device("cpu"), torch.float32, progress=False)
    bpb = transformer.bits_per_byte(loss, n, meta["splits"]["val"]["bytes"])

    ids = torch.from_numpy(val.astype(np.int64))[None]  # (1, n)
    with torch.no_grad():
        logits = model(ids[:, :-1])[0]  # (1, n - 1, 320): every row, as --eval scores
    total_bits = F.cross_entropy(logits.flatten(0, 1), ids[0, 1:], reduction="sum").item() / math.log(2)
    val_text = Tokenizer.from_file(str(out / "tokenizer.json")).decode(val.tolist())
    assert text.endswith(val_text)
    assert bpb == pytest.approx(total_bits / len(val_text.encode("utf-8")), rel=1e-5)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A bpe:300 dataset of play text, two training steps on it (val loss at the second), and what they printed.
    Returns (folder, its meta.json, the run's folder, its stdout)."""
    tmp = tmp_path_factory.mktemp("bpe_run")
    (tmp / "in.txt").write_text(english_text(20_000).decode())
    out, meta = prepare(tmp, "--input", str(tmp / "in.txt"), "--tokenizer", "bpe:300", "--val-fraction", "0.05")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        transformer.main(["--data", str(out), "--out-dir", str(tmp / "run"), *TINY, "--max-steps", "2",
                          "--eval-every", "2"])
    return out, meta, tmp / "run", printed.getvalue()


def test_training_logs_val_bits_per_byte_at_the_val_splits_bytes_per_token(bpe_run):
    _, meta, run, printed = bpe_run
    with open(run / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    val = meta["splits"]["val"]
    assert last["val_bpb"] == pytest.approx(last["val_loss"] * val["tokens"] / val["bytes"] / math.log(2), rel=1e-9)
    assert f"val {last['val_loss']:.4f} ({last['val_bpb']:.4f} bits/byte)" in printed


def test_a_dataset_without_byte_counts_logs_no_bits_per_byte(tmp_path, capsys):
    """llm.c's shards and datasets prepared before byte counts: the val loss alone."""
    write_dataset(tmp_path / "data", {"train": [3000], "val": [1000]})
    transformer.main(["--data", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2",
                      "--eval-every", "2"])
    step_2 = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step     2"))
    assert "| val " in step_2 and "bits/byte" not in step_2
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert not any("val_bpb" in json.loads(line) for line in f)


def eval_line(capsys, *args):
    capsys.readouterr()
    transformer.main(["--eval", "--device", "cpu", *map(str, args)])
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_eval_of_a_text_prints_bits_per_byte_of_the_bytes_it_predicts(bpe_run, tmp_path, capsys):
    """A text of one window: the total bits of every token after the first, summed here from the model's logits,
    over the UTF-8 bytes those tokens spell (decoded here by HF tokenizers itself)."""
    from tokenizers import Tokenizer

    data, _, run, _ = bpe_run
    text = "the king and café"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ckpt = transformer.load_checkpoint(str(run / "ckpt.pt"))
    model = transformer.model_from_checkpoint(ckpt).eval()
    ids = transformer.get_tokenizer(ckpt["tokenizer"], ckpt["tokenizer_json"]).encode(text)
    assert 2 < len(ids) <= model.config.block_size + 1  # one window
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0][0]  # every row, as --eval scores
    bits = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item() / math.log(2)
    n_bytes = len(Tokenizer.from_file(str(data / "tokenizer.json")).decode(ids[1:]).encode("utf-8"))
    line = eval_line(capsys, "--ckpt", run / "ckpt.pt", "--text", tmp_path / "t.txt")
    assert line.endswith(f"| {bits / n_bytes:.4f} bits per byte")


def test_eval_of_a_val_split_prints_bits_per_byte_from_its_byte_count(bpe_run, capsys):
    data, meta, run, _ = bpe_run
    ckpt = transformer.load_checkpoint(str(run / "ckpt.pt"))
    model = transformer.model_from_checkpoint(ckpt).eval()
    val = tokens_of(data, "val")
    loss, n = transformer.evaluate_tokens(model, val, 8, torch.device("cpu"), torch.float32, progress=False)
    first = transformer.get_tokenizer(ckpt["tokenizer"], ckpt["tokenizer_json"]).decode_bytes([int(val[0])])
    expected = loss * n / (meta["splits"]["val"]["bytes"] - len(first)) / math.log(2)
    assert eval_line(capsys, "--ckpt", run / "ckpt.pt", "--data", data).endswith(f"| {expected:.4f} bits per byte")


def test_eval_without_byte_counts_prints_no_bits_per_byte(tmp_path, capsys):
    write_dataset(tmp_path / "data", {"train": [3000], "val": [1000]})
    transformer.main(["--data", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "1"])
    line = eval_line(capsys, "--ckpt", tmp_path / "run" / "ckpt.pt", "--data", tmp_path / "data")
    assert "loss" in line and "bits per byte" not in line


def test_byte_datasets_count_one_byte_a_token():
    meta_bytes = prepare_data.tokenize(["ab", "c"], transformer.get_tokenizer("byte"), list(b"\n\n"), "test")
    assert [(n, len(t)) for n, t in meta_bytes] == [(7, 7)]  # the separators' bytes count as text


# -----------------------------------------------------------------------------
# hf:<folder>


def test_an_hf_tokenizer_folder_prepares_its_tokens_and_a_missing_one_is_one_line(tmp_path, bpe):
    """A tiny HF tokenizer saved to a folder as transformers saves one (tokenizer.json, tokenizer_config.json)."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(bpe.json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    text = english_text(8000).decode() + UNSEEN.replace("<|endoftext|>", "")
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    out, meta = prepare(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", f"hf:{folder}")
    assert meta["tokenizer"] == f"hf:{folder}" and meta["vocab_size"] == 400 and meta["eot"] == 0
    assert np.concatenate([tokens_of(out, "train"), tokens_of(out, "val")]).tolist() == bpe.encode(text)
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(text.encode("utf-8"))

    result = cli(tmp_path, "--input", "in.txt", "--tokenizer", "hf:no_such_folder", "--out", "out2")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("prepare_data.py: error: cannot load tokenizer hf:no_such_folder: ")
    assert not (tmp_path / "out2").exists()


def test_a_bpe_model_refuses_data_of_another_bpe_of_the_same_size(tmp_path, one_line_error):
    """Two bpe:300 trained on different texts share a name, not their ids: --eval and --resume on the other one's
    data are one line each."""
    (tmp_path / "a.txt").write_bytes(english_text(20_000, seed=1))
    (tmp_path / "b.txt").write_bytes(english_text(20_000, seed=2)[::-1])  # the same letters, other pairs
    a, _ = prepare(tmp_path / "a", "--input", str(tmp_path / "a.txt"), "--tokenizer", "bpe:300")
    b, _ = prepare(tmp_path / "b", "--input", str(tmp_path / "b.txt"), "--tokenizer", "bpe:300")
    transformer.main(["--data", str(a), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "1"])
    line = one_line_error(["--eval", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--data", str(b)])
    assert line.endswith("was tokenized with bpe:300, the model uses bpe:300 trained on another text")
    line = one_line_error(["--data", str(b), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2",
                           "--resume"])
    assert "was trained on bpe:300 tokens; this --data's bpe:300 was trained on another text" in line
