"""llm.c's / modded-nanogpt's token shards (transformer.py section 7): a folder of them trains and evaluates as it
is, exactly as the same tokens in this project's own shards; which files belong to a split; the errors a user
sees. The shards are written here by the test's own writer, from random GPT-2 token ids (uint16) or Llama 3 ones
(uint32). Offline, on CPU.
"""

import json
import os
import re

import numpy as np
import pytest

import prepare_data
import transformer

VOCAB = 50257  # what llm.c's format implies: GPT-2's tokenizer
LLAMA3_VOCAB = 128256  # what its Llama 3 format implies
TINY = ["--device", "cpu", "--arch", "gpt2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--seq-len", "16",
        "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2", "--eval-iters", "2"]


def write_llmc_shard(path, tokens, version=1, n_tokens=None, llama3=False):
    """llm.c's format (its dev/data/data_common.py): 256 little-endian int32 (magic, version, token count, zeros),
    then the tokens: GPT-2's as uint16 under magic 20240520 version 1, Llama 3's as uint32 under 20240801 version 7.
    """
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240801 if llama3 else 20240520, version, len(tokens) if n_tokens is None else n_tokens
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u4" if llama3 else "<u2").tobytes())


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


@pytest.fixture(scope="module")
def llama3_folders(tmp_path_factory):
    """The same random Llama 3 ids twice: in llm.c's uint32 shards (no meta.json), and in ours. Returns them."""
    rng = np.random.default_rng(2)
    splits = {"train": rng.integers(0, LLAMA3_VOCAB, 4000), "val": rng.integers(0, LLAMA3_VOCAB, 1500)}
    llmc, ours = tmp_path_factory.mktemp("llmc3"), tmp_path_factory.mktemp("ours3")
    for split, tokens in splits.items():
        write_llmc_shard(llmc / f"fineweb_{split}_000000.bin", tokens, version=7, llama3=True)
        prepare_data.write_shard(str(ours / f"{split}_000000.bin"), tokens, LLAMA3_VOCAB)
    return str(llmc), str(ours), splits


def test_llmc_llama3_shards_read_as_uint32_memmaps_of_the_same_tokens_as_ours(llama3_folders):
    llmc, ours, splits = llama3_folders
    assert transformer.read_meta(llmc) == {"tokenizer": "hf:meta-llama/Meta-Llama-3.1-8B", "vocab_size": 128256}
    for split, tokens in splits.items():
        for folder in (llmc, ours):
            (path,) = transformer.find_shards(folder, split)
            shard = transformer.load_shard(path, LLAMA3_VOCAB)
            assert isinstance(shard, np.memmap) and shard.dtype == np.dtype("<u4")
            np.testing.assert_array_equal(shard, tokens)


@pytest.mark.slow
def test_training_on_llmc_llama3_shards_logs_exactly_the_losses_of_the_same_tokens_in_ours(llama3_folders, tmp_path,
                                                                                         register_encoding):
    """A meta.json names the tokenizer (here a 128,256-token tiktoken encoding made for the test: Meta's is gated),
    beside llm.c's shards as beside ours."""
    llmc, ours, _ = llama3_folders
    name = register_encoding(LLAMA3_VOCAB)
    for data, out in ((llmc, "llmc"), (ours, "ours")):
        os.makedirs(tmp_path / out)
        for f in os.listdir(data):
            os.link(os.path.join(data, f), tmp_path / out / f)
        with open(tmp_path / out / "meta.json", "w") as f:
            json.dump({"tokenizer": name, "vocab_size": LLAMA3_VOCAB}, f)
        transformer.main(["--data", str(tmp_path / out), "--out-dir", str(tmp_path / out / "run"), *TINY,
                          "--max-steps", "3", "--eval-every", "2"])
    a, b = metrics(tmp_path / "llmc" / "run"), metrics(tmp_path / "ours" / "run")
    assert [r["step"] for r in a] == [1, 2, 3] and [r["step"] for r in a if "val_loss" in r] == [2, 3]
    assert [(r["loss"], r.get("val_loss")) for r in a] == [(r["loss"], r.get("val_loss")) for r in b]  # bit-exact


def test_an_llmc_llama3_shard_of_another_version_is_a_one_line_error(tmp_path):
    write_llmc_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3], version=8, llama3=True)
    with pytest.raises(ValueError, match=r"fineweb_val_000000.bin: llm.c shard format version 8, this code reads "
                                         r"version 7$"):
        transformer.load_shard(str(tmp_path / "fineweb_val_000000.bin"))


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
