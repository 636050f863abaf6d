"""The documents' commands run as written: every shell command in a bash block of README.md and docs/*.md, and
every Python block. Each transformer.py, prepare_data.py and bench.py command goes through its program's own
argument parser; the ones that train, sample, evaluate, prepare a local text or export run end to end at a tiny
size (WHY_ONLY_PARSED names why the others are only parsed), in a folder of their own, in the documents' order.
Every relative link of the documents points at a file that exists, and every #anchor at one of its headings.
Offline, on CPU: a few seconds of tiny training runs in all.
"""

import contextlib
import glob
import io
import math
import os
import re
import shlex
import shutil
import sys

import pytest

import bench
import conftest
import prepare_data
import shards
import transformer

REPO = os.path.dirname(os.path.abspath(__file__))
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
DEFAULT_RUN = ["python", "transformer.py"]  # the README's first command; the other documents start from its output
# Pictures drawn from a real run on a quiet machine at release time (docs/results.md says how): absent until then.
DRAWN_AT_RELEASE = {"docs/img/loss.png"}

# Why a command is only parsed, never run here. Every such command is still parsed by its program's parser.
WHY_ONLY_PARSED = {
    "torchrun": "starts several processes; test_training.py, test_fsdp.py and test_reliability.py run torchrun",
    "init-from": "needs HF weights from the hub (the network); test_transformer.py loads local HF folders",
    "hub-tokenizer": "needs an HF tokenizer from the hub (the network); test_prepare_data.py uses local ones",
    "dataset": "streams a dataset with `datasets`; test_prepare_data.py runs --dataset on local files",
    "hellaswag": "downloads HellaSwag; test_hellaswag.py scores a local file",
    "fineweb": "needs FineWeb (10B tokens: hours to tokenize, or 20 GB to download)",
    "bench": "times rows for minutes (bench.py --quick runs every row in test_bench.py)",
    "gpu-check": "needs a GPU (test_bench.py runs --gpu-check --quick on the CPU)",
    "pipeline": "transformers' pipeline; test_export.py reads every export back with transformers",
    "its checkpoint": "reads the checkpoint of a run above that was only parsed",
}
# Programs this project does not ship, and shell built-ins: named, never run.
EXTERNAL = {
    "llama-cli": "llama.cpp's program (test_export.py runs GGUFs in llama.cpp through llama-cpp-python)",
    "ollama": "ollama, not installed here",
    "lm_eval": "lm-evaluation-harness, not installed here",
    "echo": "writes a file for ollama", "cd": "a shell built-in",
    ".ci/run": "CI itself: builds a venv (checked: it exists and is executable)",
}
STEP_FLAGS = {f"--{k.replace('_', '-')}": transformer.RECIPE[k] for k in ("max_steps", "warmup_steps", "eval_every",
                                                                          "log_every", "ckpt_every")}
STEP_FLAGS["--lr-decay-steps"] = None  # None: only when the command gives it
TINY_MODEL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32"]


# -----------------------------------------------------------------------------
# Reading the documents


def code_blocks(doc):
    """[(language, text)] of the fenced blocks of a markdown file."""
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        return re.findall(r"^```(\w*)\n(.*?)^```", f.read(), flags=re.M | re.S)


def shell_commands(block):
    """The commands of a bash block, each as (env, argv): lines joined where they end in a backslash or a quote
    is still open, then cut at &&, ||, ;, |, ( and ); comments, redirections and VAR=value prefixes taken off."""
    lines, line = [], ""
    for raw in block.splitlines():
        line += raw
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        try:
            shlex.split(line, comments=True)
        except ValueError:  # an open quote: the command goes on (python -c "...")
            line += "\n"
            continue
        lines.append(line)
        line = ""
    assert not line.strip(), f"an unfinished command: {line!r}"
    commands = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens, argv = list(lexer), []
        for token in [*tokens, ";"]:
            if token in ("&&", "||", ";", "|", "(", ")"):
                if argv:
                    commands.append(argv)
                argv = []
            else:
                argv.append(token)
    result = []
    for argv in commands:
        if ">" in argv:  # a redirection: the command is what comes before it
            argv = argv[: argv.index(">")]
        env = {}
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        result.append((env, argv))
    return result


def commands_of(doc):
    """[(kind, payload)]: ("shell", (env, argv)) and ("python", code), in the document's order."""
    out = []
    for language, text in code_blocks(doc):
        if language in ("bash", "sh", "shell"):
            out += [("shell", command) for command in shell_commands(text)]
        elif language == "python":
            out.append(("python", text))
    return out


# -----------------------------------------------------------------------------
# Scaling a command down, and parsing it with its program's parser


def value_of(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


def replaced(argv, flag, value):
    """argv with flag's value set to value (appended when absent)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def tiny_training(argv):
    """A training command at a tiny size: step counts divided by 100 (rounded up, so their order stays) and at
    most 10 (--resume to 4000 still trains on after the default run's few steps); a 2-layer, 32-wide model,
    16-token windows of 2 sequences, one val batch, on the CPU."""
    for flag, default in STEP_FLAGS.items():
        given = value_of(argv, flag)
        if given is not None or default is not None:
            argv = replaced(argv, flag, str(min(math.ceil(int(given or default) / 100), 10)))
    for flag, value in zip(TINY_MODEL[::2], TINY_MODEL[1::2]):
        argv = replaced(argv, flag, value)
    for flag, value in (("--seq-len", "16"), ("--batch-size", "2"), ("--eval-iters", "1"), ("--device", "cpu")):
        argv = replaced(argv, flag, value)
    return argv


def tiny_bpe(argv):
    """prepare_data.py at a tiny size: a BPE of 300 tokens (a small text supports few merges)."""
    tokenizer = value_of(argv, "--tokenizer")
    return replaced(argv, "--tokenizer", "bpe:300") if tokenizer and tokenizer.startswith("bpe:") else argv


@contextlib.contextmanager
def torchrun_env(nproc):
    """The environment torchrun gives one of its processes, for check_args (it reads RANK and WORLD_SIZE)."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(RANK="0", WORLD_SIZE=str(nproc), LOCAL_RANK="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def nproc_of(torchrun_argv):
    """The processes a torchrun line starts on one node (--nproc_per_node=N or --nproc_per_node N)."""
    for i, a in enumerate(torchrun_argv):
        if a.startswith("--nproc_per_node"):
            return int(a.split("=", 1)[1] if "=" in a else torchrun_argv[i + 1])
    return 1


def plan(env, argv, unmade=()):
    """What to do with one shell command: ("run", program, argv) or ("parse", program, argv, reason) or
    ("external", reason). Parsing happens here, so every command is parsed whatever is then done with it.
    `unmade`: the --out-dir of training commands only parsed so far, whose checkpoints do not exist."""
    program = argv[0]
    if program in EXTERNAL:
        return ("external", EXTERNAL[program])
    if program == "pip":
        for req in [argv[i + 1] for i, a in enumerate(argv) if a == "-r"]:
            assert os.path.isfile(os.path.join(REPO, req)), f"pip install -r {req}: no such file"
        return ("external", "pip installs the requirements (checked: the files exist)")
    if program == "torchrun":
        script = argv.index("transformer.py")
        with torchrun_env(nproc_of(argv[:script])):
            transformer.parse_args(argv[script + 1:])
        return ("parse", "transformer.py", argv[script + 1:], WHY_ONLY_PARSED["torchrun"])
    assert program == "python", f"a command of an unknown program: {shlex.join(argv)} (place it in this test)"
    if argv[1:3] == ["-m", "pytest"]:
        return ("external", "the test suite itself")
    if argv[1] == "-c":
        compile(argv[2], "<python -c>", "exec")
        if "huggingface_hub" in argv[2]:
            return ("parse", "python -c", argv, "downloads from the hub (the network)")
        return ("run", "python -c", argv)
    script, args = argv[1], argv[2:]
    if script == "bench.py":
        parsed = bench.parse_args(args)
        return ("parse", script, args, WHY_ONLY_PARSED["gpu-check" if parsed.gpu_check else "bench"])
    if script == "prepare_data.py":
        parsed = prepare_data.parse_args(args)
        if parsed.dataset:
            return ("parse", script, args, WHY_ONLY_PARSED["dataset"])
        if parsed.tokenizer.startswith("hf:") and not os.path.isdir(parsed.tokenizer[3:]):
            return ("parse", script, args, WHY_ONLY_PARSED["hub-tokenizer"])
        return ("run", script, tiny_bpe(args))
    assert script == "transformer.py", f"a command of an unknown program: {shlex.join(argv)}"
    parsed = transformer.parse_args(args)
    if parsed.init_from:
        return ("parse", script, args, WHY_ONLY_PARSED["init-from"])
    if parsed.ckpt and os.path.normpath(parsed.ckpt).split(os.sep)[:2] in [d.split(os.sep)[:2] for d in unmade]:
        return ("parse", script, args, WHY_ONLY_PARSED["its checkpoint"])
    if parsed.eval and parsed.hellaswag is not None:
        return ("parse", script, args, WHY_ONLY_PARSED["hellaswag"])
    if parsed.data and "fineweb" in parsed.data:
        return ("parse", script, args, WHY_ONLY_PARSED["fineweb"])
    if parsed.sample:
        return ("run", script, replaced(args, "--max-new-tokens", "8") + ["--device", "cpu"])
    if parsed.export_hf or parsed.export_gguf:  # the exports run on the CPU and refuse --device
        return ("run", script, args)
    if parsed.eval:
        return ("run", script, args + ["--device", "cpu"])
    return ("run", script, tiny_training(args))


# -----------------------------------------------------------------------------
# Running them


def run(program, argv, monkeypatch):
    """One command in the current folder, in this process: exit status 0 (or none) and no error line."""
    if program == "python -c":
        exec(compile(argv[2], "<python -c>", "exec"), {"__name__": "__main__"})
        return
    main = {"transformer.py": transformer.main, "prepare_data.py": prepare_data.main}[program]
    if "--interactive" in argv:
        monkeypatch.setattr(sys, "stdin", io.StringIO("ROMEO:\n\n"))  # one prompt typed, then an empty line
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), f"{program} {shlex.join(argv)} exited with {e.code}"


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    """A folder as a user's checkout has it after the README's default run (`python transformer.py`, run here
    as written, scaled down): a text file of their own (my.txt, my.jsonl), tiny Shakespeare's input.txt and
    its byte shards, and checkpoints/ from the run. Each document then runs in a copy of it."""
    base = tmp_path_factory.mktemp("docs") / "checkout"
    base.mkdir()
    text = conftest.english_text(60_000)
    (base / "input.txt").write_bytes(text)
    (base / "my.txt").write_bytes(text[:30_000])
    (base / "my.jsonl").write_text('{"text": "ROMEO: good night"}\n')
    with monkeypatch_context() as mp:
        mp.chdir(base)
        mp.setattr(transformer, "peak_flops", lambda device: (1e12, "docs test: not measured"))
        prepare_data.main(["--tokenizer", shards.DEFAULT_TOKENIZER, "--out", shards.DEFAULT_DATA])  # as the default
        prepare_data.main(["--tokenizer", "byte", "--out", "data/shakespeare_byte"])  # run does; bytes, as docs show
        kind, program, argv = plan({}, DEFAULT_RUN)
        run(program, argv, mp)
    return base


@contextlib.contextmanager
def monkeypatch_context():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_readme_starts_with_the_default_run():
    assert commands_of("README.md")[1] == ("shell", ({}, DEFAULT_RUN))  # after `pip install`, as its second


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_runs_as_written(doc, workspaces, tmp_path, monkeypatch, capsys):
    """Every command of the document parses; the practical ones run at a tiny size (peak_flops is fixed: the
    start-up matmul would cost a second a run, and every training test elsewhere measures it for real)."""
    commands = commands_of(doc)
    assert commands, f"{doc} shows no command"
    folder = tmp_path / "checkout"
    shutil.copytree(workspaces, folder)
    monkeypatch.chdir(folder)
    monkeypatch.setattr(transformer, "peak_flops", lambda device: (1e12, "docs test: not measured"))
    done, unmade = [], []
    for kind, payload in commands:
        if kind == "python":
            if "pipeline(" in payload:
                compile(payload, doc, "exec")
                done.append(("parsed", "python block", WHY_ONLY_PARSED["pipeline"]))
                continue
            exec(compile(payload, doc, "exec"), {"__name__": "__main__"})
            done.append(("ran", "python block", ""))
            continue
        env, argv = payload
        if argv == DEFAULT_RUN and not env:
            done.append(("ran", shlex.join(argv), "in the fixture, before every document"))
            continue
        step = plan(env, argv, unmade)
        if step[0] == "run":
            run(step[1], step[2], monkeypatch)
        elif step[0] == "parse" and step[1] == "transformer.py" and "--out-dir" in step[2]:
            unmade.append(os.path.normpath(value_of(step[2], "--out-dir")))
        done.append((step[0], shlex.join(argv), step[-1] if step[0] != "run" else ""))
    with capsys.disabled():  # pytest -s shows what was run and what only parsed, and why
        if os.environ.get("TEST_DOCS_VERBOSE"):
            for what, command, why in done:
                print(f"{doc}: {what}: {command[:100]}{' (' + why + ')' if why else ''}")


def anchors(doc):
    """The #anchors GitHub gives a markdown file's headings."""
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_points_at_a_file_and_a_heading(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"\w+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if target in DRAWN_AT_RELEASE and not os.path.exists(os.path.join(REPO, target)):
            continue
        assert os.path.exists(os.path.join(REPO, target)), f"{doc}: {link} points at no file"
        if anchor:
            assert anchor in anchors(target), f"{doc}: {link}: no such heading in {target}"


def test_the_readme_is_a_front_door_and_links_every_document():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert readme.count("\n") <= 300
    for doc in DOCS[1:]:
        assert f"]({doc}" in readme, f"README.md does not link {doc}"


def test_pictures_drawn_at_release_are_small_pngs():
    for path in DRAWN_AT_RELEASE:
        full = os.path.join(REPO, path)
        if os.path.exists(full):  # docs/results.md: metrics.small_png keeps it small
            with open(full, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
            assert os.path.getsize(full) < 200_000
