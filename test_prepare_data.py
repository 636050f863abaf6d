"""Tests of prepare_data.py: offline and small. The text is tiny Shakespeare's start where it is here, else made-up
text of the same shape (conftest.english_text); the download's checksum test needs the real bytes."""

import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import tiktoken

import prepare_data
from conftest import english_text, needs_tiny_shakespeare
from transformer import load_shard

REPO = os.path.dirname(os.path.abspath(__file__))

EOT = 50256


def split_tokens(out, split):
    """All tokens of one split, its shards read in order."""
    return np.concatenate([load_shard(p) for p in sorted(glob.glob(os.path.join(out, f"{split}_*.bin")))])


def cli(cwd, *args):
    """Run prepare_data.py as a user would, in cwd."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "prepare_data.py"), *args],
        cwd=cwd, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
    )


def fake_network(monkeypatch, response=None):
    """urllib requests never leave the machine: they fail as if offline, or answer with `response` bytes."""

    def open_url(self, *args, **kwargs):
        if response is None:
            raise urllib.error.URLError("no network in tests")
        return io.BytesIO(response)

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", open_url)


# -----------------------------------------------------------------------------
# Shards


def test_load_shard_reads_back_what_write_shard_wrote(tmp_path):
    path = str(tmp_path / "train_000000.bin")
    tokens = np.array([0, 1, 255, 50256, 1234], dtype=np.uint16)
    prepare_data.write_shard(path, tokens, vocab_size=50257)
    np.testing.assert_array_equal(load_shard(path), tokens)


@pytest.mark.parametrize("vocab_size, width", [(256, 2), (65_536, 2), (65_537, 4), (200_019, 4)])
def test_the_header_records_two_bytes_a_token_while_the_vocab_fits_uint16_else_four(tmp_path, vocab_size, width):
    path = str(tmp_path / "train_000000.bin")
    tokens = np.array([0, 1, 255, vocab_size - 1])
    prepare_data.write_shard(path, tokens, vocab_size)
    header = np.fromfile(path, dtype="<i4", count=5)
    assert header.tolist() == [20241123, 2, vocab_size, 4, width]
    assert os.path.getsize(path) == 1024 + width * 4
    np.testing.assert_array_equal(load_shard(path, vocab_size), tokens)


def write_version_1_shard(path, tokens, vocab_size, version=1):
    """The format before version 2: (magic, version, vocab size, token count, zeros), then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:4] = 20241123, version, vocab_size, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def test_version_1_shards_still_read_as_uint16(tmp_path):
    path = str(tmp_path / "train_000000.bin")
    write_version_1_shard(path, [0, 50256, 65535, 7], 65536)
    shard = load_shard(path, 65536)
    assert shard.dtype == np.dtype("<u2") and shard.tolist() == [0, 50256, 65535, 7]


def test_a_shard_of_an_unknown_version_is_refused_in_one_line(tmp_path, data, one_line_error):
    os.makedirs(tmp_path / "d")
    for name in os.listdir(data):
        os.link(os.path.join(data, name), tmp_path / "d" / name)
    os.remove(tmp_path / "d" / "val_000000.bin")  # a link: the shared dataset's shard stays as it is
    write_version_1_shard(tmp_path / "d" / "val_000000.bin", np.zeros(2000), 256, version=3)
    line = one_line_error(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert line.endswith("val_000000.bin: shard format version 3, this code reads versions 1 and 2: "
                         "update transformer.py, or prepare the data again")
    assert not (tmp_path / "out").exists()


def test_write_shard_refuses_a_token_outside_the_vocab(tmp_path):
    path = tmp_path / "train_000000.bin"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prepare_data.write_shard(str(path), [65, 300], vocab_size=256)
    assert not path.exists()


def test_interrupted_shard_write_leaves_no_shard(tmp_path, monkeypatch):
    def die(fd):  # the process dies with the bytes written but not yet durable or renamed
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "fsync", die)
    path = tmp_path / "train_000000.bin"
    with pytest.raises(OSError, match="simulated crash"):
        prepare_data.write_shard(str(path), np.arange(1000) % 256, vocab_size=256)
    assert not path.exists()
    assert glob.glob(str(tmp_path / "*.bin")) == []  # only a .tmp file, which no reader takes for a shard


def test_interrupted_run_writes_no_meta_json(tmp_path, monkeypatch):
    (tmp_path / "in.txt").write_bytes(english_text(5000))
    calls = []
    real_write_shard = prepare_data.write_shard

    def fail_on_second_shard(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write_shard(*args)

    monkeypatch.setattr(prepare_data, "write_shard", fail_on_second_shard)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main(["--input", str(tmp_path / "in.txt"), "--tokenizer", "byte", "--out", str(out),
                           "--shard-tokens", "1000"])
    assert (out / "train_000000.bin").exists()
    assert not (out / "meta.json").exists()


# -----------------------------------------------------------------------------
# Text files


def test_byte_shards_concatenate_to_the_file_bytes(tmp_path):
    text = english_text(20_000).decode() + "naïve café, Straße, 日本語, 🙂\n" * 100
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    prepare_data.main(["--input", str(src), "--tokenizer", "byte", "--out", str(out),
                       "--shard-tokens", "1000", "--val-fraction", "0.1"])
    train, val = split_tokens(out, "train"), split_tokens(out, "val")
    assert bytes(np.concatenate([train, val]).astype(np.uint8)) == src.read_bytes()
    assert len(val) == round(0.1 * len(src.read_bytes()))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["shards"] > 1 and meta["splits"]["val"]["shards"] > 1
    assert meta["splits"]["train"]["tokens"] == len(train) and meta["vocab_size"] == 256


def test_gpt2_tokens_equal_tiktoken_on_the_whole_text(tmp_path, monkeypatch):
    # Blank lines, CRLF, trailing spaces and non-ASCII, read in small pieces: many cuts, none may change a token.
    text = english_text(20_000).decode() + "end  \r\n\r\n  indented\t\n\n\n'tis naïve\n日本語\nlast line"
    src = tmp_path / "in.txt"
    src.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(prepare_data, "PIECE_BYTES", 256)
    out = tmp_path / "out"
    prepare_data.main(["--input", str(src), "--tokenizer", "gpt2", "--out", str(out)])
    tokens = np.concatenate([split_tokens(out, "train"), split_tokens(out, "val")])
    assert tokens.tolist() == tiktoken.get_encoding("gpt2").encode_ordinary(text)


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
@pytest.mark.parametrize("cut", ["mid-shard", "shard-edge"])
def test_val_split_over_several_shards_round_trips(tmp_path, tokenizer, cut):
    # The val split is moved out of the train shards at the end: several whole shards of it, and
    # a train shard cut in two (mid-shard) or none (shard-edge, where no train shard is rewritten).
    src = tmp_path / "in.txt"
    src.write_bytes(english_text(40_000) + "naïve café 🙂\n".encode() * 50)
    enc = tiktoken.get_encoding("gpt2")
    total = len(src.read_bytes()) if tokenizer == "byte" else len(enc.encode_ordinary(src.read_text(encoding="utf-8")))
    shard = 1000
    n_val = 3 * shard + (total % shard) + (shard // 2 if cut == "mid-shard" else 0)
    out = tmp_path / "out"
    prepare_data.main(["--input", str(src), "--tokenizer", tokenizer, "--out", str(out),
                       "--shard-tokens", str(shard), "--val-tokens", str(n_val)])
    train, val = split_tokens(out, "train"), split_tokens(out, "val")
    decode = bytes if tokenizer == "byte" else enc.decode_bytes
    assert decode(np.concatenate([train, val]).tolist()) == src.read_bytes()
    assert len(val) == n_val and (len(train) % shard != 0) == (cut == "mid-shard")
    meta = json.loads((out / "meta.json").read_text())
    for split, tokens in (("train", train), ("val", val)):
        shards = sorted(glob.glob(str(out / f"{split}_*.bin")))
        assert meta["splits"][split] == {"tokens": len(tokens), "shards": len(shards),
                                         "bytes": len(decode(tokens.tolist()))}
        assert shards[-1].endswith(f"{split}_{len(shards) - 1:06d}.bin")  # numbered 0, 1, ... without gaps
        assert all(len(load_shard(p)) == shard for p in shards[:-1])
    assert meta["splits"]["val"]["shards"] >= 4
    assert not glob.glob(str(out / "*.tmp"))


def test_too_few_tokens_for_the_val_split_is_refused_and_leaves_no_shards(tmp_path):
    (tmp_path / "in.txt").write_bytes(english_text(2000))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="has 2000 tokens: too few to hold out 2000"):
        prepare_data.main(["--input", str(tmp_path / "in.txt"), "--tokenizer", "byte", "--out", str(out),
                           "--shard-tokens", "500", "--val-tokens", "2000"])
    assert os.listdir(out) == []


def test_empty_input_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit, match="empty"):
        prepare_data.main(["--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")])


def test_missing_input_is_a_one_line_error(tmp_path):
    result = cli(tmp_path, "--input", "nope.txt", "--tokenizer", "byte")
    assert result.returncode != 0
    assert result.stderr.strip() == "prepare_data.py: error: --input nope.txt: no such file"
    assert not (tmp_path / "input.txt").exists()  # a file the user named is never downloaded


def test_default_input_is_downloaded_verified_and_kept(tmp_path, monkeypatch):
    real = needs_tiny_shakespeare()  # the checksum must match the real file
    fake_network(monkeypatch, response=real)
    monkeypatch.chdir(tmp_path)
    prepare_data.main(["--tokenizer", "byte", "--out", "out"])
    assert (tmp_path / "input.txt").read_bytes() == real
    assert sorted(os.listdir(tmp_path)) == ["input.txt", "out"]


def test_the_download_is_kept_when_its_checksum_matches(tmp_path, monkeypatch):
    """The same path without the real bytes: made-up text, and the checksum that text has."""
    text = english_text(3000, seed=7)
    monkeypatch.setattr(prepare_data, "SHAKESPEARE_SHA256", hashlib.sha256(text).hexdigest())
    fake_network(monkeypatch, response=text)
    monkeypatch.chdir(tmp_path)
    prepare_data.main(["--tokenizer", "byte", "--out", "out"])
    assert (tmp_path / "input.txt").read_bytes() == text


def test_download_with_wrong_checksum_leaves_no_input_txt(tmp_path, monkeypatch):
    fake_network(monkeypatch, response=b"not Shakespeare")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="sha256"):
        prepare_data.main(["--tokenizer", "byte", "--out", "out"])
    assert os.listdir(tmp_path) == []


def test_default_input_offline_is_a_one_line_error_naming_input(tmp_path, monkeypatch):
    fake_network(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        prepare_data.main(["--tokenizer", "byte"])
    message = str(exc.value.code)
    assert message.startswith("prepare_data.py: error: ") and "\n" not in message
    assert "--input FILE" in message
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# Datasets


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))


def test_dataset_documents_are_preceded_by_eot_and_the_first_shard_is_val(tmp_path):
    docs = ["First document.", "Second one, café.", "Third"]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    out = tmp_path / "out"
    prepare_data.main(["--dataset", "json", "--data-files", str(tmp_path / "docs.jsonl"), "--out", str(out),
                       "--shard-tokens", "4"])
    enc = tiktoken.get_encoding("gpt2")
    stream = [t for d in docs for t in [EOT] + enc.encode_ordinary(d)]
    assert split_tokens(out, "val").tolist() == stream[:4]
    assert split_tokens(out, "train").tolist() == stream[4:]
    assert json.loads((out / "meta.json").read_text())["splits"]["val"]["shards"] == 1


def test_dataset_without_the_text_field_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [{"body": "some text"}])
    with pytest.raises(SystemExit, match="no field 'text' .*fields: body.*--text-field"):
        prepare_data.main(["--dataset", "json", "--data-files", str(tmp_path / "docs.jsonl"),
                           "--out", str(tmp_path / "out")])


# -----------------------------------------------------------------------------
# Refusals and the output folder


def test_existing_out_dir_is_refused_without_overwrite(tmp_path, monkeypatch):
    (tmp_path / "in.txt").write_bytes(english_text(2000))
    args = ["--input", "in.txt", "--tokenizer", "byte", "--out", "out"]
    monkeypatch.chdir(tmp_path)
    prepare_data.main(args)
    result = cli(tmp_path, *args)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "prepare_data.py: error: out already holds a complete dataset; pass --overwrite to replace it"
    )


def test_overwrite_removes_the_old_shards(tmp_path):
    (tmp_path / "in.txt").write_bytes(english_text(2000))
    args = ["--input", str(tmp_path / "in.txt"), "--tokenizer", "byte", "--out", str(tmp_path / "out")]
    prepare_data.main(args + ["--shard-tokens", "100"])
    prepare_data.main(args + ["--overwrite"])
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train_000000.bin", "val_000000.bin"]
