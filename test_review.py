"""The ten wrong answers to users of issue #25, each pinned by the behaviour a user sees: through the command line
(transformer.main or a subprocess) wherever it can be, so the tests survive the file's restructuring. Offline, on CPU.
"""

import os
import re
import shutil

import numpy as np
import pytest

import flagtypes
import prepare_data
import transformer
from conftest import english_text

REPO = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# #25.8: the names the other programs point at exist in transformer.py


def test_names_prepare_data_and_bench_point_at_in_transformer_are_defined_there():
    with open(os.path.join(REPO, "transformer.py")) as f:
        defined = set(re.findall(r"^(?:def |class )?([A-Za-z_]\w*)\b", f.read(), re.M))
    for program in ("prepare_data.py", "bench.py"):
        with open(os.path.join(REPO, program)) as f:
            named = set(re.findall(r"(?<![.\w])transformer\.([A-Za-z_]\w*)", f.read())) - {"py"}
        assert named <= defined, f"{program} names transformer.{sorted(named - defined)}, not defined there"


# -----------------------------------------------------------------------------
# #25.6: files.write_json writes a whole file or leaves the old one


def test_write_json_that_fails_halfway_leaves_the_old_file_whole(tmp_path):
    import json

    import files

    path = str(tmp_path / "config.json")
    files.write_json(path, {"old": 1})
    with pytest.raises(TypeError):  # json.dump has written '{"new": 2, ' when it meets the object
        files.write_json(path, {"new": 2, "bad": object()})
    with open(path) as f:
        assert json.load(f) == {"old": 1}
    assert os.listdir(tmp_path) == ["config.json"]


# -----------------------------------------------------------------------------
# #25.3: --resume on data of another BPE of the same name says the BPE was trained on another text


TINY = ["--device", "cpu", "--arch", "gpt2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--seq-len", "16",
        "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2", "--eval-every", "1000", "--eval-iters", "2"]


def test_resume_on_data_of_a_same_size_bpe_trained_on_another_text_says_so(tmp_path, one_line_error):
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / f"{name}.txt").write_bytes(english_text(20_000, seed=seed)[:: 1 if name == "a" else -1])
        prepare_data.main(["--input", str(tmp_path / f"{name}.txt"), "--tokenizer", "bpe:300",
                           "--out", str(tmp_path / name)])
    run = ["--out-dir", str(tmp_path / "run"), *TINY]
    transformer.main(["--data", str(tmp_path / "a"), *run, "--max-steps", "1"])
    line = one_line_error(["--data", str(tmp_path / "b"), *run, "--max-steps", "2", "--resume"])
    assert line.endswith("was trained on bpe:300 tokens; this --data's bpe:300 was trained on another text: "
                         "resume on data made with the same tokenizer")


# -----------------------------------------------------------------------------
# #25.1: a run that diverges names the checkpoint that is on disk, or says there is none


def diverge(data, out_dir, one_line_error, *flags):
    """A run whose --lr sends the loss to nan at step 2: its one error line."""
    return one_line_error(["--data", data, "--out-dir", out_dir, *TINY, "--lr", "1e30", "--warmup-steps", "0",
                           "--max-steps", "5", *flags])


def test_a_run_that_diverges_before_any_save_says_no_checkpoint_was_saved(data, tmp_path, one_line_error):
    line = diverge(data, str(tmp_path / "run"), one_line_error)
    assert os.listdir(tmp_path / "run") == ["metrics.jsonl"]
    assert "loss is nan at step 2: stopping before the update; no checkpoint was saved yet" in line
    assert "ckpt.pt" not in line


def test_a_run_that_diverges_after_a_save_names_that_checkpoint(data, tmp_path, one_line_error):
    line = diverge(data, str(tmp_path / "run"), one_line_error, "--ckpt-every", "1")
    assert f"stopping before the update; {tmp_path / 'run' / 'ckpt.pt'} keeps step 1's state (try a lower --lr)" in line


# -----------------------------------------------------------------------------
# #25.2: resuming a run that has finished says so, writes nothing and samples nothing


def test_resuming_a_finished_run_says_it_is_complete_and_writes_nothing(data, tmp_path, capsys):
    run = ["--data", data, "--out-dir", str(tmp_path), *TINY, "--max-steps", "2"]
    transformer.main(run)
    before = {f: (os.stat(tmp_path / f).st_mtime_ns, (tmp_path / f).read_bytes()) for f in os.listdir(tmp_path)}
    capsys.readouterr()
    transformer.main([*run, "--resume"])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'ckpt.pt'} is at step 2 of --max-steps 2: the run is already complete" in out
    assert "saved" not in out and "--- sample ---" not in out
    assert {f: (os.stat(tmp_path / f).st_mtime_ns, (tmp_path / f).read_bytes()) for f in os.listdir(tmp_path)} == before


# -----------------------------------------------------------------------------
# #25.10: a shard holding an id outside its vocabulary is refused when it is opened, naming the file and the id


def corrupt_copy(data, out, split):
    """A copy of the dataset data whose first `split` shard has every 500th id set to 300, outside the byte
    vocabulary (256). Returns (the copy, that shard's path)."""
    shutil.copytree(data, out)
    shard = os.path.join(out, f"{split}_000000.bin")
    tokens = np.memmap(shard, dtype="<u2", mode="r+", offset=1024)
    tokens[::500] = 300
    tokens.flush()
    del tokens
    return str(out), shard


def test_training_refuses_a_shard_with_an_id_outside_its_vocabulary_before_any_step(data, tmp_path, capsys,
                                                                                    one_line_error):
    bad, shard = corrupt_copy(data, tmp_path / "bad", "train")
    line = one_line_error(["--data", bad, "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2"])
    assert line.endswith(f"{shard}: id 300 at token 0 is outside its vocabulary of 256 ids: a corrupt shard, "
                         "or one written for another tokenizer")
    assert capsys.readouterr().out == "" and not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_eval_refuses_a_val_shard_with_an_id_outside_its_vocabulary(data, tmp_path, one_line_error):
    transformer.main(["--data", data, "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "1"])
    bad, shard = corrupt_copy(data, tmp_path / "bad", "val")
    line = one_line_error(["--eval", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--data", bad, "--device", "cpu"])
    assert line.endswith(f"{shard}: id 300 at token 0 is outside its vocabulary of 256 ids: a corrupt shard, "
                         "or one written for another tokenizer")


def test_training_refuses_an_llmc_shard_with_an_id_outside_gpt2s_vocabulary(tmp_path, one_line_error):
    from test_llmc_shards import write_llmc_shard

    tokens = np.random.default_rng(0).integers(0, 50257, 3000)
    tokens[1234] = 60000
    write_llmc_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    write_llmc_shard(tmp_path / "fineweb_val_000000.bin", tokens[:1500])
    line = one_line_error(["--data", str(tmp_path), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2"])
    assert line.endswith(f"{tmp_path / 'fineweb_train_000001.bin'}: id 60000 at token 1,234 is outside its "
                         "vocabulary of 50257 ids: a corrupt shard, or one written for another tokenizer")


# -----------------------------------------------------------------------------
# #25.9: llm.c's Llama 3 shards train without Llama 3's tokenizer (gated on the hub; offline here), and say what
# will need it


@pytest.fixture
def llama3_shards(tmp_path):
    """A folder of llm.c's Llama 3 shards (no meta.json): the tokenizer they imply cannot be loaded offline."""
    from test_llmc_shards import write_llmc_shard

    rng = np.random.default_rng(3)
    for split, n in (("train", 3000), ("val", 1000)):
        write_llmc_shard(tmp_path / f"fineweb_{split}_000000.bin", rng.integers(0, 128256, n), version=7, llama3=True)
    return str(tmp_path)


NEEDS_LLAMA3 = ("tokenizer hf:meta-llama/Meta-Llama-3.1-8B cannot be loaded here: training needs only the ids, but "
                "the sample at the end, --hellaswag-every and the exports need it: put a copy in a folder and a "
                'meta.json naming it beside the shards, {"tokenizer": "hf:<folder>", "vocab_size": 128256}')


def test_llmc_llama3_shards_train_without_their_tokenizer_and_say_what_needs_it(llama3_shards, tmp_path, capsys):
    transformer.main(["--data", llama3_shards, "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2"])
    out = capsys.readouterr().out
    assert out.startswith(NEEDS_LLAMA3 + " (")  # the reason follows, then the run
    assert f"saved {tmp_path / 'run' / 'ckpt.pt'}" in out and os.path.isfile(tmp_path / "run" / "ckpt.pt")
    assert out.rstrip().endswith("no sample: the tokenizer hf:meta-llama/Meta-Llama-3.1-8B could not be loaded")
    assert "--- sample ---" not in out


def test_hellaswag_every_without_the_tokenizer_is_refused_before_training(llama3_shards, tmp_path, capsys,
                                                                          one_line_error):
    line = one_line_error(["--data", llama3_shards, "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2",
                           "--hellaswag-every", "1", "--hellaswag", str(tmp_path / "hs.jsonl")])
    assert "--hellaswag-every needs the tokenizer hf:meta-llama/Meta-Llama-3.1-8B, which cannot be loaded here (" \
        in line
    assert capsys.readouterr().out == "" and not os.path.exists(tmp_path / "run")


# -----------------------------------------------------------------------------
# #25.7: --eval's loss is transformers' loss: the softmax over every row of the head, not the tokenizer's ids only


def test_eval_of_an_hf_folder_with_more_rows_than_its_tokenizer_is_transformers_loss(tmp_path, capsys):
    """A random GPT2LMHeadModel with 1,000 rows and a 256-token byte tokenizer beside it: transformers scores the
    text over all 1,000, and so must --eval (perplexity and bits per byte follow from the loss)."""
    import torch
    import transformers

    from test_export import byte_tokenizer_files

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=1000, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    byte_tokenizer_files(tmp_path / "hf")
    text = english_text(63).decode()  # 62 tokens to predict: two windows of 31, each 32 tokens in transformers
    (tmp_path / "t.txt").write_text(text)
    ids = torch.tensor([list(text.encode())])
    with torch.no_grad():  # each window's mean loss, over the same number of tokens
        expected = sum(hf(input_ids=w, labels=w).loss.item() for w in (ids[:, :32], ids[:, 31:])) / 2
    capsys.readouterr()
    transformer.main(["--eval", "--init-from", str(tmp_path / "hf"), "--text", str(tmp_path / "t.txt"),
                      "--block-size", "31", "--device", "cpu"])
    loss = float(re.search(r"loss (\d+\.\d+)", capsys.readouterr().out)[1])
    assert abs(loss - expected) < 2e-4, (loss, expected)
    assert expected > 6.5  # near ln(1000), far from ln(256) = 5.5: the rows past the tokenizer count


# -----------------------------------------------------------------------------
# #25.5: generation with the KV cache gives the logits of generation without it, wherever it can


def step_logits(model, idx, n, use_cache, monkeypatch):
    """The logits (B, vocab) each of n greedy generation steps from the prompt idx picks its token from."""
    import torch

    seen, real = [], transformer.sample_next
    monkeypatch.setattr(transformer, "sample_next", lambda logits, *a, **k: (seen.append(logits), real(logits, *a,
                                                                                                     **k))[1])
    transformer.generate(model, idx, n, temperature=0, use_cache=use_cache)
    monkeypatch.undo()
    return torch.stack(seen)  # (n, B, vocab)


def tiny_model(pos, n_layer, block_size=32):
    """A random model with its matrices drawn wider than GPT-2's init, so the logits are spread out."""
    import torch

    torch.manual_seed(0)
    model = transformer.GPT(transformer.GPTConfig.preset("tiny", "gpt2", pos=pos, n_layer=n_layer, n_embd=32,
                                                         block_size=block_size, vocab_size=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("n_layer", [1, 3])
def test_learned_positions_under_a_shorter_block_size_cached_equals_uncached_everywhere(n_layer, monkeypatch):
    """--block-size below the trained length: past it both paths re-encode the last block_size tokens."""
    import torch

    model = tiny_model("learned", n_layer)
    model.set_block_size(16)
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    cached, uncached = (step_logits(model, idx, 40, use_cache, monkeypatch) for use_cache in (True, False))
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_any_depth_cached_equals_uncached_up_to_block_size(pos, monkeypatch):
    import torch

    model = tiny_model(pos, 3, block_size=16)
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    cached, uncached = (step_logits(model, idx, 12, use_cache, monkeypatch) for use_cache in (True, False))
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)  # the last step sees 16 tokens


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_one_layer_rope_and_alibi_cached_equals_uncached_past_block_size(pos, monkeypatch):
    """A one-layer cached key depends on its token and position only, and RoPE and ALiBi see distances only."""
    import torch

    model = tiny_model(pos, 1, block_size=16)
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    cached, uncached = (step_logits(model, idx, 40, use_cache, monkeypatch) for use_cache in (True, False))
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# #25.4: every command refuses a flag it does not read (refused, not ignored), and accepts those it reads


CKPT = ["--ckpt", "c.pt"]
NOT_READ = [  # (command line, the flag it names): each a command with one flag it would ignore
    (["--export-hf", "out", *CKPT, "--arch", "olmo"], "--arch", "--export-hf/--export-gguf"),
    (["--export-gguf", "m.gguf", *CKPT, "--device", "cpu"], "--device", "--export-hf/--export-gguf"),
    (["--export-hf", "out", *CKPT, "--dtype", "bfloat16"], "--dtype", "--export-hf/--export-gguf"),
    (["--export-hf", "out", *CKPT, "--block-size", "8"], "--block-size", "--export-hf/--export-gguf"),
    (["--export-hf", "out", *CKPT, "--lr", "0.1"], "--lr", "--export-hf/--export-gguf"),
    (["--export-hf", "out", *CKPT, "--seed", "3"], "--seed", "--export-hf/--export-gguf"),
    (["--export-hf", "out", *CKPT, "--sample"], "--sample", "--export-hf/--export-gguf"),
    (["--export-hf", "out", *CKPT, "--eval"], "--eval", "--export-hf/--export-gguf"),
    (["--export-hf", "out", *CKPT, "--temperature", "0.5"], "--temperature", "--export-hf/--export-gguf"),
    (["--sample", *CKPT, "--lr", "0.1"], "--lr", "--sample"),
    (["--sample", *CKPT, "--max-steps", "10"], "--max-steps", "--sample"),
    (["--sample", *CKPT, "--arch", "gpt2"], "--arch", "--sample"),
    (["--sample", *CKPT, "--n-layer", "2"], "--n-layer", "--sample"),
    (["--sample", *CKPT, "--data", "d"], "--data", "--sample"),
    (["--sample", *CKPT, "--batch-size", "4"], "--batch-size", "--sample"),
    (["--sample", *CKPT, "--text", "t.txt"], "--text", "--sample"),
    (["--sample", *CKPT, "--dropout", "0.1"], "--dropout", "--sample"),
    (["--sample", *CKPT, "--out-dir", "o"], "--out-dir", "--sample"),
    (["--sample", *CKPT, "--resume"], "--resume", "--sample"),
    (["--sample", *CKPT, "--grad-checkpointing"], "--grad-checkpointing", "--sample"),
    (["--sample", *CKPT, "--gguf-dtype", "f32"], "--gguf-dtype", "--sample"),
    (["--sample", *CKPT, "--fsdp"], "--fsdp", "--sample"),
    (["--eval", *CKPT, "--text", "t.txt", "--temperature", "0.5"], "--temperature", "--eval"),
    (["--eval", *CKPT, "--text", "t.txt", "--prompt", "hi"], "--prompt", "--eval"),
    (["--eval", *CKPT, "--text", "t.txt", "--seed", "1"], "--seed", "--eval"),
    (["--eval", *CKPT, "--text", "t.txt", "--compile"], "--compile", "--eval"),
    (["--eval", *CKPT, "--text", "t.txt", "--num-samples", "2"], "--num-samples", "--eval"),
    (["--eval", *CKPT, "--text", "t.txt", "--max-new-tokens", "9"], "--max-new-tokens", "--eval"),
    (["--eval", *CKPT, "--text", "t.txt", "--no-cache"], "--no-cache", "--eval"),
    (["--eval", *CKPT, "--data", "d", "--lr", "0.1"], "--lr", "--eval"),
    (["--eval", *CKPT, "--data", "d", "--arch", "olmo"], "--arch", "--eval"),
    (["--eval", *CKPT, "--data", "d", "--seq-len", "8"], "--seq-len", "--eval"),
    (["--eval", *CKPT, "--hellaswag", "--data", "d"], "--data", "--eval --hellaswag"),
    (["--eval", *CKPT, "--hellaswag", "--text", "t.txt"], "--text", "--eval --hellaswag"),
    (["--eval", *CKPT, "--hellaswag", "--seed", "1"], "--seed", "--eval --hellaswag"),
    (["--temperature", "0.5"], "--temperature", "training"),
    (["--ckpt", "c.pt"], "--ckpt", "training"),
    (["--prompt", "hi"], "--prompt", "training"),
    (["--top-k", "5"], "--top-k", "training"),
    (["--no-cache"], "--no-cache", "training"),
    (["--text", "t.txt"], "--text", "training"),
    (["--num-samples", "2"], "--num-samples", "training"),
    (["--interactive"], "--interactive", "training"),
    (["--gguf-dtype", "f32"], "--gguf-dtype", "training"),
]


@pytest.mark.parametrize("argv, flag, command", NOT_READ, ids=[" ".join(case[0]) for case in NOT_READ])
def test_a_flag_the_command_does_not_read_is_refused_with_one_line_naming_it(tmp_path, monkeypatch, capsys,
                                                                             one_line_error, argv, flag, command):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(argv, status=2)
    assert line.startswith(f"transformer.py: error: {flag} is not read by {command}: drop it")
    assert capsys.readouterr().out == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--sample", *CKPT, "--init-from", "gpt2"], "give --ckpt or --init-from, not both"),
    (["--export-hf", "out", *CKPT, "--init-from", "gpt2"], "give --ckpt or --init-from, not both"),
    (["--eval", *CKPT, "--text", "t.txt", "--data", "d"], "--eval reads --data or --text, not both"),
    (["--export-hf", "out", *CKPT, "--gguf-dtype", "f32"], "--gguf-dtype is for --export-gguf"),
])
def test_flags_of_one_command_that_cannot_act_together_are_refused(tmp_path, monkeypatch, one_line_error, argv,
                                                                   message):
    monkeypatch.chdir(tmp_path)
    assert f"error: {message}" in one_line_error(argv, status=2)


def test_every_flag_is_read_by_some_command():
    args = transformer.parse_args([])
    assert set(vars(args)) == set().union(*flagtypes.READS.values())


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_ckpt")
    from conftest import write_dataset

    write_dataset(str(tmp / "data"), {"train": [3000], "val": [1000]})
    transformer.main(["--data", str(tmp / "data"), "--out-dir", str(tmp / "run"), *TINY, "--max-steps", "1"])
    (tmp / "t.txt").write_text("ROMEO: what light through yonder window breaks")
    return tmp


def test_each_command_accepts_the_flags_it_shares_with_others(tiny_ckpt, tmp_path, capsys):
    """--device, --dtype, --seed, --compile, --block-size, --batch-size where each command reads them."""
    ckpt = str(tiny_ckpt / "run" / "ckpt.pt")
    system = ["--device", "cpu", "--dtype", "float32"]
    capsys.readouterr()
    transformer.main(["--sample", "--ckpt", ckpt, *system, "--seed", "3", "--no-compile", "--block-size", "8",
                      "--max-new-tokens", "20", "--prompt", "RO", "--top-p", "0.9", "--num-samples", "2", "--no-stop"])
    assert capsys.readouterr().out.count("-" * 40) == 2
    transformer.main(["--eval", "--ckpt", ckpt, *system, "--batch-size", "2", "--block-size", "8",
                      "--text", str(tiny_ckpt / "t.txt")])
    assert "in windows of 8" in capsys.readouterr().out
    transformer.main(["--eval", "--ckpt", ckpt, "--data", str(tiny_ckpt / "data"), *system, "--batch-size", "3"])
    assert "(val split): loss" in capsys.readouterr().out
    transformer.main(["--export-hf", str(tmp_path / "hf"), "--export-gguf", str(tmp_path / "m.gguf"),
                      "--gguf-dtype", "f32", "--ckpt", ckpt])
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "m.gguf").is_file()


def test_the_commands_of_transformer_pys_docstring_parse(monkeypatch):
    """The usage lines at the top of transformer.py, as a user would copy them (torchrun's own flags dropped)."""
    monkeypatch.setenv("RANK", "0")  # torchrun's lines
    lines = [line.split("#")[0] for line in transformer.__doc__.splitlines() if "transformer.py --" in line]
    assert len(lines) >= 4
    for line in lines:
        argv = [w.strip('"') for w in line.split("transformer.py", 1)[1].split() if w != "..."]
        transformer.parse_args(argv)
