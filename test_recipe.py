"""Issue #24's default run: a trained BPE by default, and what keeps working when the default changes: `--resume`
alone continues the run its checkpoint holds (its data, model and optimization, not today's defaults), and an old
default run's checkpoint (bytes, the llama recipe) samples and resumes. Offline, on CPU, tiny models."""

import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import prepare_data
import shards
import transformer
from conftest import english_text

TINY = ["--device", "cpu", "--arch", "gpt2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--seq-len", "16",
        "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2", "--eval-every", "1000", "--eval-iters", "2"]


def saved_args(out_dir):
    return checkpoint.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["args"]


def test_resume_alone_continues_the_run_its_checkpoint_holds_not_todays_defaults(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    transformer.main(["--data", data, "--out-dir", out, *TINY, "--lr", "1e-3", "--optimizer", "muon",
                      "--max-steps", "2"])
    first = saved_args(out)
    transformer.main(["--resume", "--out-dir", out, "--max-steps", "4"])  # no --data, --arch, --lr ...: the run's
    assert f"resumed {os.path.join(out, 'ckpt.pt')} at step 2" in capsys.readouterr().out
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 4
    resumed = ckpt["args"]
    for name in ("data", "arch", "n_layer", "n_embd", "seq_len", "batch_size", "lr", "optimizer", "warmup_steps"):
        assert resumed[name] == first[name], name
    assert resumed["max_steps"] == 4  # a flag given wins over the checkpoint's


def test_resume_continued_that_way_equals_the_run_uninterrupted(data, tmp_path):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run = ["--data", data, *TINY, "--lr", "1e-3", "--lr-decay-steps", "4"]  # the schedule does not hang on --max-steps
    transformer.main([*run, "--out-dir", whole, "--max-steps", "4"])
    transformer.main([*run, "--out-dir", cut, "--max-steps", "2"])
    transformer.main(["--resume", "--out-dir", cut, "--max-steps", "4"])
    a, b = (checkpoint.load_checkpoint(os.path.join(d, "ckpt.pt"))["model"] for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_the_old_default_run_on_bytes_samples_and_resumes_with_no_flags(tmp_path, monkeypatch,
                                                                                        capsys):
    """Before #24 the default run trained on data/shakespeare_byte; its checkpoints name that folder in their
    args, and `--resume` alone goes on reading it, though today's default data is a BPE."""
    (tmp_path / "input.txt").write_bytes(english_text(20_000))
    monkeypatch.chdir(tmp_path)
    prepare_data.main(["--tokenizer", "byte", "--out", "data/shakespeare_byte"])
    transformer.main(["--data", "data/shakespeare_byte", "--out-dir", "checkpoints", *TINY, "--max-steps", "2"])
    capsys.readouterr()
    transformer.main(["--resume", "--out-dir", "checkpoints", "--max-steps", "3"])
    out = capsys.readouterr().out
    assert "resumed checkpoints/ckpt.pt at step 2" in out
    assert not os.path.exists(shards.DEFAULT_DATA)  # today's default data was never made nor read
    ckpt = checkpoint.load_checkpoint("checkpoints/ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["tokenizer"] == "byte" and ckpt["args"]["data"] == "data/shakespeare_byte"
    transformer.main(["--sample", "--ckpt", "checkpoints/ckpt.pt", "--prompt", "ROMEO:", "--max-new-tokens", "8",
                      "--device", "cpu"])
    assert capsys.readouterr().out.count("ROMEO:") == 1


def test_resume_of_a_run_from_init_from_takes_its_shape_from_the_weights_again(data, tmp_path, capsys):
    """A run from --init-from saved the shape of the weights it loaded among its args (block_size); resuming it
    with --init-from again must not read that back as a shape flag, which --init-from refuses."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "hf"))
    out = str(tmp_path / "ft")
    run = ["--init-from", str(tmp_path / "hf"), "--out-dir", out, "--device", "cpu", "--seq-len", "16",
           "--batch-size", "4", "--eval-every", "1000", "--eval-iters", "1", "--warmup-steps", "1"]
    transformer.main(["--data", data, *run, "--max-steps", "2", "--lr", "1e-4", "--min-lr", "1e-5"])
    transformer.main([*run, "--resume", "--max-steps", "3"])
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 3 and ckpt["args"]["data"] == data and ckpt["args"]["lr"] == 1e-4


@pytest.mark.parametrize("argv, named", [
    (["--sample", "--ckpt", "x.pt", "--lr", str(transformer.RECIPE["lr"])], "--lr is not read by --sample"),
    (["--export-hf", "out", "--ckpt", "x.pt", "--arch", transformer.RECIPE["arch"]], "--arch is not read by --export"),
])
def test_a_flag_typed_at_its_default_value_is_still_refused_by_a_command_that_does_not_read_it(argv, named, capsys):
    """Flags are told apart by being typed, not by differing from their defaults: `--export-hf --arch llama` would
    otherwise pass for an export of any architecture, and `--resume --optimizer adamw` for not asking at all."""
    with pytest.raises(SystemExit) as exc:
        transformer.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and named in err and err.count("\n") == 1


def test_prepare_data_never_imports_torch():
    """The default run's first start runs prepare_data.py as a program: torch's import would add ~1 s to it."""
    code = "import sys, prepare_data; assert 'torch' not in sys.modules, 'prepare_data imported torch'"
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
