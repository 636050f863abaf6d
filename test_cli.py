"""The command lines' contract: every bad flag value of transformer.py and prepare_data.py is refused by
argparse with one line on stderr and exit status 2, before any work is done or any file is written."""

import os
import subprocess
import sys

import pytest

import prepare_data
import transformer

REPO = os.path.dirname(os.path.abspath(__file__))

# (flags, bad values): each value is tried alone on top of a command line that is otherwise fine.
TRAINING = [
    ("--batch-size", ["0", "-3", "1.5", "x"]),
    ("--total-batch-tokens", ["0", "-1", "100"]),  # 100: not a multiple of batch x seq-len (12 x 64)
    ("--max-steps", ["0", "-1"]),
    ("--lr", ["0", "-1e-3", "nan", "inf", "x"]),
    ("--min-lr", ["-1", "0.5"]),  # 0.5: above the default --lr
    ("--warmup-steps", ["-1"]),
    ("--lr-decay-steps", ["0"]),
    ("--weight-decay", ["-0.1", "nan"]),
    ("--grad-clip", ["0", "-1"]),
    ("--seed", ["-1", "x", str(2**32)]),
    ("--dropout", ["-0.1", "1", "1.5"]),
    ("--n-layer", ["0"]),
    ("--n-head", ["0", "3"]),  # 3: 128 wide is not divisible by 3 heads
    ("--n-embd", ["0", "130"]),
    ("--n-kv-head", ["0", "3"]),  # 3: 4 heads are not a multiple of 3 kv heads
    ("--seq-len", ["0"]),
    ("--block-size", ["0"]),
    ("--size", ["gpt5"]),
    ("--log-every", ["0"]),
    ("--eval-every", ["0"]),
    ("--eval-iters", ["0"]),
    ("--ckpt-every", ["0"]),
    ("--arch", ["gpt3"]),
    ("--pos", ["sinusoidal"]),
    ("--mlp", ["relu"]),
    ("--norm", ["rmsnorm-weightless"]),
    ("--logit-softcap", ["0", "-15", "nan", "x"]),  # a soft-cap is a bound on |logits|: > 0
    ("--dtype", ["float8"]),
    ("--device", ["gpu", "cuda:x", "tpu"]),
]
SAMPLING = [
    ("--num-samples", ["0"]),
    ("--max-new-tokens", ["0", "-5"]),
    ("--temperature", ["-1", "nan"]),
    ("--top-k", ["0", "-2"]),
    ("--top-p", ["0", "1.5", "-0.5"]),
    ("--prompt", ["FILE:/no/such/file"]),
    ("--block-size", ["0", "-1"]),
]
PREPARE = [
    ("--shard-tokens", ["0", "-1", "x"]),
    ("--val-fraction", ["0", "1", "2", "x"]),
    ("--val-tokens", ["0"]),
    ("--tokenizer", ["bpe", "bpe:256", "bpe:x", "no_such_encoding"]),
]


def cases(table):
    return [(flag, value) for flag, values in table for value in values]


def refused(capsys, main, argv):
    """Run main(argv); assert exit status 2 and one line on stderr, nothing on stdout; return the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in err and out == ""
    return lines[0]


@pytest.mark.parametrize("flag, value", cases(TRAINING))
def test_a_bad_training_flag_is_one_line_before_any_work(tmp_path, capsys, flag, value):
    out_dir = tmp_path / "out"
    line = refused(capsys, transformer.main, ["--data", str(tmp_path / "data"), "--out-dir", str(out_dir), flag, value])
    assert line.startswith("transformer.py: error: ") and flag in line
    assert os.listdir(tmp_path) == []  # no data prepared, no output directory


@pytest.mark.parametrize("mode", ["--sample", "--eval"])
@pytest.mark.parametrize("flag, value", cases(SAMPLING))
def test_a_bad_sampling_or_eval_flag_is_one_line_before_loading_anything(tmp_path, capsys, mode, flag, value):
    line = refused(capsys, transformer.main, [mode, "--ckpt", str(tmp_path / "missing.pt"), flag, value])
    assert line.startswith("transformer.py: error: ") and flag in line


@pytest.mark.parametrize("argv, message", [
    (["--sample"], "--sample needs --ckpt"),
    (["--eval", "--text", "x.txt"], "--eval needs --ckpt"),
    (["--sample", "--eval", "--ckpt", "c.pt"], "not allowed with argument"),
    (["--arch", "llama", "--n-embd", "12", "--n-head", "4"], "RoPE needs an even head dim"),
    (["--seq-len", "128", "--block-size", "64"], "--seq-len 128 is longer than the model's context, --block-size 64"),
    (["--size", "gpt2", "--n-head", "5"], "--n-embd 768 is not divisible by --n-head 5"),
    (["--init-from", "gpt2", "--block-size", "2048"], "--init-from gpt2 brings its own shape: drop --block-size"),
    (["--init-from", "gpt2", "--size", "gpt2-xl"], "--init-from gpt2 brings its own shape: drop --size"),
    (["--init-from", "gpt2", "--no-qk-norm"], "--init-from gpt2 brings its own shape: drop --qk-norm"),
    (["--unknown-flag"], "unrecognized arguments"),
])
def test_flags_that_disagree_are_one_line(tmp_path, capsys, argv, message):
    assert message in refused(capsys, transformer.main, argv)


def test_the_architecture_flags_override_the_presets_switches():
    def config(*flags):
        return transformer.model_config(transformer.parse_args(["--arch", "nanochat", *flags]), vocab_size=256)

    switches = ("mlp", "norm", "tie_embeddings", "embed_norm", "qk_norm", "logit_softcap", "zero_init_proj")
    assert [getattr(config(), k) for k in switches] == ["relu2", "rmsnorm-noweight", False, True, True, 15.0, True]
    flags = ["--mlp", "gelu", "--norm", "rmsnorm", "--tie-embeddings", "--no-embed-norm", "--no-qk-norm",
             "--logit-softcap", "30", "--no-zero-init-proj"]
    assert [getattr(config(*flags), k) for k in switches] == ["gelu", "rmsnorm", True, False, False, 30.0, False]
    assert (config().value_embeds, config("--value-embeds", "--x0-lambdas").x0_lambdas) == (False, True)


def test_total_batch_tokens_counts_the_processes_torchrun_starts(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # 2 x 12 x 64 = 1536 tokens per micro-step
    line = refused(capsys, transformer.main, ["--total-batch-tokens", str(12 * 64 * 3)])
    assert "multiple of batch x seq-len x processes = 1536" in line


@pytest.mark.parametrize("flag, value", cases(PREPARE))
def test_a_bad_prepare_data_flag_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, prepare_data.main, ["--input", "in.txt", "--out", "out", flag, value])
    assert line.startswith("prepare_data.py: error: ") and flag in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [["--name", "x"], ["--dataset", "json", "--val-fraction", "0.1"]])
def test_prepare_data_flags_that_disagree_are_one_line(tmp_path, capsys, argv):
    assert refused(capsys, prepare_data.main, argv).startswith("prepare_data.py: error: ")


@pytest.mark.parametrize("script, argv", [
    ("transformer.py", ["--batch-size", "0"]),
    ("transformer.py", ["--sample", "--ckpt", "c.pt", "--top-k", "0"]),
    ("prepare_data.py", ["--shard-tokens", "0"]),
])
def test_the_real_command_line_prints_one_line_and_exits_2(tmp_path, script, argv):
    """The tests above call main() in this process; this is the same contract from a real shell."""
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"{script}: error: ")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--fsdp", "--optimizer", "muon"], "--optimizer muon needs whole matrices"),
    (["--ckpt-format", "sharded", "--optimizer", "muon"], "--optimizer muon needs whole matrices"),
    (["--fsdp", "--hellaswag-every", "10"], "--hellaswag-every under --fsdp is not supported"),
    (["--async-save"], "--async-save and --keep-checkpoints are for --ckpt-format sharded"),
    (["--keep-checkpoints", "3"], "--async-save and --keep-checkpoints are for --ckpt-format sharded"),
])
def test_what_fsdp_cannot_combine_with_is_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.setenv("RANK", "0")  # as under torchrun
    assert message in refused(capsys, transformer.main, argv)
