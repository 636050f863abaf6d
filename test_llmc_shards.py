"""llm.c's / modded-nanogpt's token shards (transformer.py section 7): a folder of them trains and evaluates as it
is, exactly as the same tokens in this project's own shards; which files belong to a split; the errors a user
sees. The shards are written here by the test's own writer, from random GPT-2 token ids. Offline, on CPU.
"""

import json
import os
import re

import numpy as np
import pytest

import prepare_data
import transformer

VOCAB = 50257  # what llm.c's format implies: GPT-2's tokenizer
TINY = ["--device", "cpu", "--arch", "gpt2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--seq-len", "16",
        "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2", "--eval-iters", "2"]


def write_llmc_shard(path, tokens, version=1, n_tokens=None):
    """llm.c's format: 256 little-endian int32 (20240520, version, token count, zeros), then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, version, len(tokens) if n_tokens is None else n_tokens
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same random tokens twice: in llm.c's shards and names, and in this project's shards with meta.json.
    Returns (llm.c folder, our folder)."""
    rng = np.random.default_rng(0)
    splits = {"train": [rng.integers(0, VOCAB, n) for n in (3000, 2000)], "val": [rng.integers(0, VOCAB, 1500)]}
    llmc, ours = tmp_path_factory.mktemp("llmc"), tmp_path_factory.mktemp("ours")
    for i, tokens in enumerate(splits["train"]):
        write_llmc_shard(llmc / f"fineweb_train_{i + 1:06d}.bin", tokens)  # llm.c numbers train after val
        prepare_data.write_shard(str(ours / f"train_{i:06d}.bin"), tokens, VOCAB)
    write_llmc_shard(llmc / "fineweb_val_000000.bin", splits["val"][0])
    prepare_data.write_shard(str(ours / "val_000000.bin"), splits["val"][0], VOCAB)
    with open(ours / "meta.json", "w") as f:
        json.dump({"format_version": 1, "tokenizer": "gpt2", "vocab_size": VOCAB, "eot": 50256}, f)
    return str(llmc), str(ours)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# Which files are shards of a split


def test_a_split_is_a_whole_word_of_the_file_name(tmp_path):
    names = ["train_000000.bin", "train_000001.bin", "val_000000.bin", "fineweb_train_000001.bin",
             "fineweb_val_000000.bin", "tiny_shakespeare_val.bin", "interval_000000.bin", "trainer_000000.bin",
             "train_000002.bin.tmp", "my_train_data.bin", "val_000000.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    found = {split: [os.path.basename(f) for f in transformer.find_shards(str(tmp_path), split)]
             for split in ("train", "val")}
    assert found == {"train": ["fineweb_train_000001.bin", "train_000000.bin", "train_000001.bin"],
                     "val": ["fineweb_val_000000.bin", "tiny_shakespeare_val.bin", "val_000000.bin"]}


# -----------------------------------------------------------------------------
# Training and evaluation: llm.c's shards == the same tokens in ours


def test_training_on_llmc_shards_logs_exactly_the_losses_of_the_same_tokens_in_our_shards(folders, tmp_path, capsys):
    llmc, ours = folders
    for data, out in ((llmc, "llmc"), (ours, "ours")):
        transformer.main(["--data", data, "--out-dir", str(tmp_path / out), *TINY, "--max-steps", "3",
                          "--eval-every", "2"])
    assert "vocab 50257 (padded to 50304) (gpt2)" in capsys.readouterr().out  # the format implies GPT-2's tokenizer
    a, b = metrics(tmp_path / "llmc"), metrics(tmp_path / "ours")
    assert [r["step"] for r in a] == [1, 2, 3] and [r["step"] for r in a if "val_loss" in r] == [2, 3]
    assert [(r["loss"], r.get("val_loss")) for r in a] == [(r["loss"], r.get("val_loss")) for r in b]  # bit-exact

    # --eval --data on the llm.c folder: its whole val split, as in ours
    ckpt = str(tmp_path / "ours" / "ckpt.pt")
    lines = []
    for data in (llmc, ours):
        transformer.main(["--eval", "--ckpt", ckpt, "--data", data, "--device", "cpu"])
        lines.append(re.sub(r"^.*: loss", "loss", capsys.readouterr().out.strip()))
    assert lines[0] == lines[1] and "1,499 tokens predicted" in lines[0]


# -----------------------------------------------------------------------------
# Bad shards: one clear line


def llmc_folder_with(tmp_path, **bad):
    """An llm.c folder whose val shard is written with the keyword arguments of write_llmc_shard."""
    rng = np.random.default_rng(1)
    write_llmc_shard(tmp_path / "fineweb_train_000001.bin", rng.integers(0, VOCAB, 3000))
    write_llmc_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(0, VOCAB, 1000), **bad)
    return str(tmp_path)


def test_a_truncated_llmc_shard_is_a_one_line_error(tmp_path, one_line_error):
    data = llmc_folder_with(tmp_path, n_tokens=1200)  # the header promises 200 tokens more than the file holds
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path / "out"), *TINY, "--max-steps", "1"])
    assert line.endswith("fineweb_val_000000.bin: header says 1200 tokens but the file holds 1000: "
                         "truncated or corrupt")


def test_an_llmc_shard_of_another_version_is_a_one_line_error(tmp_path, one_line_error):
    data = llmc_folder_with(tmp_path, version=2)
    line = one_line_error(["--data", data, "--out-dir", str(tmp_path / "out"), *TINY, "--max-steps", "1"])
    assert line.endswith("fineweb_val_000000.bin: llm.c shard format version 2, this code reads version 1")


def test_our_shards_without_meta_json_are_still_an_incomplete_dataset(folders, tmp_path, one_line_error):
    _, ours = folders
    os.makedirs(tmp_path / "d")
    os.link(os.path.join(ours, "train_000000.bin"), tmp_path / "d" / "train_000000.bin")
    line = one_line_error(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "out"), *TINY])
    assert "no prepared dataset here (no meta.json)" in line
