"""transformer.py as a file people read: the story runs top to bottom, the companions stand beside it, and the
review's mends hold (a folder's own tokenizer, no exit from library code, one validator of a model's shape, steps
counted as completed, checkpoints loaded without a random init, no in-house jargon)."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import transformer
from test_training import ENV, TINY, metrics

REPO = os.path.dirname(os.path.abspath(__file__))
COMPANIONS = ["checkpoint.py", "convert.py", "distributed.py", "files.py", "flagtypes.py", "fsdp.py", "hellaswag.py",
              "metrics.py", "optimizers.py", "shards.py", "tokenizer.py"]


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def test_every_section_uses_only_what_earlier_sections_define():
    """A name defined at the top level of section N (a line '# N. Title' opens it) is used by sections >= N only."""
    src = read("transformer.py")
    section, current = [], 0
    for line in src.splitlines():
        m = re.match(r"#\s*(\d+)\.\s", line)
        current = int(m.group(1)) if m else current
        section.append(current)
    tree = ast.parse(src)
    defined = {}
    for node in tree.body:
        targets = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [n.id for t in getattr(node, "targets", []) for n in ast.walk(t) if isinstance(n, ast.Name)]
        # (`GPT.generate = generate` in a later section counts as defining GPT there: a class patched later is
        # a class the reader meets only later)
        defined.update({name: section[node.lineno - 1] for name in targets})
    units = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    forward = sorted({f"{node.name} -> {n.id}" for node in units for n in ast.walk(node)
                      if isinstance(n, ast.Name) and n.id in defined and n.id != node.name
                      and defined[n.id] > section[node.lineno - 1]})
    assert forward == []
    assert max(section) == 14


@pytest.mark.parametrize("companion", COMPANIONS)
def test_no_companion_imports_transformer(companion):
    tree = ast.parse(read(companion))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"transformer", "prepare_data", "bench"}


def test_a_one_process_run_never_imports_fsdp_or_dcp(tmp_path, data):
    """Importing transformer loads neither FSDP nor torch.distributed.checkpoint (DCP); training, saving ckpt.pt,
    resuming and sampling in one process then add none of them: they load where --fsdp or a sharded checkpoint
    needs them. NOTE: torch.optim's constructors import torch._dynamo, which imports FSDP itself: that much is
    torch's, loaded first here so that what this project's code loads is what the test sees."""
    out = str(tmp_path / "out")
    code = ("import sys\n"
            "heavy = lambda: {m for m in sys.modules if m.startswith(('torch.distributed.fsdp', "
            "'torch.distributed.checkpoint', 'fsdp'))}\n"
            "import transformer\n"
            "print('on import', sorted(heavy()))\n"
            "import torch._dynamo\n"
            "before = heavy()\n"
            f"transformer.main({['--data', data, '--out-dir', out, *TINY, '--max-steps', '2']!r})\n"
            f"transformer.main({['--data', data, '--out-dir', out, *TINY, '--max-steps', '3', '--resume']!r})\n"
            f"transformer.main({['--sample', '--ckpt', out, '--device', 'cpu', '--max-new-tokens', '3']!r})\n"
            f"transformer.main({['--eval', '--ckpt', out, '--data', data, '--device', 'cpu']!r})\n"
            "print('by the runs', sorted(heavy() - before))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on import []" in result.stdout and "by the runs []" in result.stdout
    assert "resumed" in result.stdout and "perplexity" in result.stdout


@pytest.mark.slow
def test_main_returns_under_a_gloo_process_group(tmp_path, data):
    """Library code never ends its caller's process: transformer.main under torchrun's environment (one gloo
    process) returns to its caller, who prints after it. Only transformer.py run as a program leaves with
    os._exit (conftest's torchrun_leaving runs that path)."""
    code = ("import sys, transformer\n"
            f"transformer.main({['--data', data, '--out-dir', str(tmp_path / 'out'), *TINY, '--max-steps', '2']!r})\n"
            "print('returned', transformer.Distributed.finished_on_gloo)\n")
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("returned True")


def test_gptconfig_is_the_one_judge_of_a_shape(one_line_error):
    with pytest.raises(ValueError, match="n_embd=65 is not divisible by n_head=4"):
        transformer.GPTConfig(n_embd=65, n_head=4)
    assert "--n-embd 65 is not divisible by --n-head 4" in one_line_error(["--n-embd", "65", "--n-head", "4"], status=2)
    assert "multiple of --n-kv-head 3" in one_line_error(["--n-head", "4", "--n-kv-head", "3"], status=2)
    assert "RoPE needs an even head dim" in one_line_error(["--n-embd", "12", "--n-head", "4"], status=2)


def test_the_command_line_leaves_the_shape_to_the_size_preset():
    args = transformer.parse_args(["--size", "tiny", "--n-layer", "3"])
    config = transformer.model_config(args, 256)
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (3, 4, 64, 64)
    assert args.n_head is None and args.seq_len == 64  # no copy of the preset in the flags


def test_steps_are_counted_as_completed_in_the_log_and_metrics(data, tmp_path, capsys):
    transformer.main(["--data", data, "--out-dir", str(tmp_path), *TINY, "--max-steps", "4", "--eval-every", "2"])
    assert [r["step"] for r in metrics(tmp_path) if "val_loss" in r] == [2, 4]
    out = capsys.readouterr().out
    assert re.search(r"step +2 \| loss \S+ \| val", out) and re.search(r"step +4 \| loss \S+ \| val", out)
    assert transformer.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 4


def test_loading_a_checkpoint_draws_no_random_initial_weights(tmp_path, monkeypatch):
    model = transformer.GPT(transformer.GPTConfig.preset("tiny", "llama"))
    ckpt = {"format": transformer.CKPT_FORMAT, "model": model.state_dict(),
            "config": transformer.dataclasses.asdict(model.config)}
    before = torch.get_rng_state()
    loaded = transformer.model_from_checkpoint(ckpt, "ckpt.pt")
    assert torch.equal(torch.get_rng_state(), before)  # GPT's init draws from it: it never ran
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.lm_head.weight is loaded.transformer.wte.weight or not model.config.tie_embeddings


@pytest.mark.parametrize("name", ["transformer.py", *COMPANIONS, "prepare_data.py", "bench.py", "README.md",
                                  "pyproject.toml"])
def test_no_in_house_jargon(name):
    text = read(name).lower()
    assert "main" + " job" not in text and "the course this project follows" not in text
    if name == "pyproject.toml":  # its comment says what .ci/run runs
        assert "ruff format" not in text or "ruff format" in read(".ci/run")


def test_a_missing_optional_package_is_one_line_naming_the_extras(tmp_path, monkeypatch, one_line_error):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when it is missing
    (tmp_path / "hf").mkdir()
    line = one_line_error(["--sample", "--init-from", str(tmp_path / "hf")])
    assert "needs the transformers package: pip install -r requirements-extras.txt" in line


def as_before_positions_were_renamed(out):
    """Rewrite out's checkpoint (ckpt.pt or step folders) as it was written when the learned position table was
    GPT-2's transformer.wpe."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    old = {"positions.weight": "transformer.wpe.weight"}
    if (out / "ckpt.pt").exists():
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        torch.save({**ckpt, "model": {old.get(k, k): v for k, v in ckpt["model"].items()}}, out / "ckpt.pt")
    for folder in out.glob("step_*"):
        dcp_to_torch_save(folder, out / "whole.pt")
        state = torch.load(out / "whole.pt", weights_only=True)
        assert "positions.weight" in state["model"]
        torch.save(checkpoint.renamed(state, old), out / "whole.pt")
        torch_save_to_dcp(out / "whole.pt", out / "old")
        for name in ("train.pt", "COMPLETE"):
            shutil.copy(folder / name, out / "old" / name)
        shutil.rmtree(folder)
        os.replace(out / "old", folder)
        os.remove(out / "whole.pt")


@pytest.mark.parametrize("fmt", ["file", "sharded"])
def test_a_checkpoint_from_before_positions_were_renamed_samples_evaluates_and_resumes(data, tmp_path, capsys, fmt):
    """The learned position table was GPT-2's transformer.wpe until the story named it GPT.positions: a checkpoint
    written then still samples, evaluates and resumes (checkpoint.py maps the old name), to the same numbers."""
    flags = [*TINY, "--arch", "gpt2", "--ckpt-format", fmt]
    new, old = tmp_path / "new", tmp_path / "old"
    transformer.main(["--data", data, "--out-dir", str(new), *flags, "--max-steps", "2"])
    shutil.copytree(new, old)
    as_before_positions_were_renamed(old)
    assert any(b"transformer.wpe.weight" in p.read_bytes() for p in old.rglob("*") if p.is_file())
    loaded = transformer.load_checkpoint(str(old))["model"]
    assert torch.equal(loaded["positions.weight"], transformer.load_checkpoint(str(new))["model"]["positions.weight"])
    outputs = []
    for out in (new, old):
        capsys.readouterr()
        transformer.main(["--sample", "--ckpt", str(out), "--device", "cpu", "--temperature", "0",
                          "--max-new-tokens", "8"])
        transformer.main(["--eval", "--ckpt", str(out), "--data", data, "--device", "cpu"])
        outputs.append(capsys.readouterr().out.replace(str(out), "OUT"))  # the sample and the loss
        transformer.main(["--data", data, "--out-dir", str(out), *flags, "--max-steps", "3", "--resume"])
        assert "resumed" in capsys.readouterr().out
    assert outputs[0] == outputs[1] and "perplexity" in outputs[0]
    assert [(r["loss"], r["grad_norm"]) for r in metrics(new)] == [(r["loss"], r["grad_norm"]) for r in metrics(old)]
