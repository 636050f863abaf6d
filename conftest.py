"""Set-up shared by every test file: offline where ../shared holds tiktoken's cache, on one torch thread, the texts
tests read, and the two tiers. The suite also passes on a fresh clone with nothing beside it (a user's checkout):
tiktoken then uses its own cache or downloads its two files, and tests make their own text.

Two tiers. `python -m pytest -q` is the fast tier (about 2 minutes on a quiet 2-core machine): every section of
transformer.py and every companion at a tiny size, HF parity, cache == no cache, resume == an uninterrupted run in
one process, each command of the CLI, and bad input. `python -m pytest -q --slow` runs everything (.ci/run does,
with --durations=10). `-m slow` runs the slow tier alone.

The rule for a new test: mark it `@pytest.mark.slow` (above any parametrize) when it
  - starts more than one process (torchrun, HSDP's two launchers), or a subprocess that trains or is signalled
    (kill -9 loops, SIGINT/SIGTERM, a pseudo-terminal), or mounts a full disk;
  - builds or runs llama.cpp, runs bench.py's rows or --gpu-check, or torch.compile;
  - or takes more than ~3 s on a quiet 2-core machine and is not the one test of something the fast tier must
    keep (make such a test smaller first; mark it slow only when it cannot be).
A test that uses a fixture which does one of these (test_fsdp.py's `runs`, test_hellaswag.py's `under_torchrun`) is
slow too. A subprocess that only checks bad input (one line, exit 2) stays fast: it is how a user meets the program.
Each slow test's claim keeps a tiny in-process twin in the fast tier where one exists: resume == uninterrupted and
a save dying halfway for the kill -9 loops, a refused write for the real full disks, FSDP in a one-process group
(test_one_fsdp_process_...) and its refusals for FSDP's torchrun runs, piped --interactive for the terminal one."""

import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import prepare_data
import transformer

REPO = os.path.dirname(os.path.abspath(__file__))
# TRANSFORMER_TEST_SHARED=none runs the suite as a user's clone would, without the CI machines' ../shared.
SHARED = os.environ.get("TRANSFORMER_TEST_SHARED", os.path.join(REPO, "..", "shared"))
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):  # tiktoken's gpt2 files, so it never downloads
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.abspath(os.path.join(SHARED, "tiktoken_cache")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# One thread: the test models are far too small to gain from more, and on a shared 2-core machine a
# second OpenMP thread that waits for a busy core makes every tiny op many times slower.
torch.set_num_threads(1)

SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def tiny_shakespeare():
    """Tiny Shakespeare's exact bytes from ../shared/data or the input.txt the default run downloaded, else None."""
    for path in (os.path.join(SHARED, "data", "tinyshakespeare.txt"), os.path.join(REPO, "input.txt")):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256:
                return data
    return None


def needs_tiny_shakespeare():
    """The bytes of tiny Shakespeare, or skip the test with a line that says how to enable it."""
    data = tiny_shakespeare()
    if data is None:
        pytest.skip("needs tiny Shakespeare's exact bytes: run `python prepare_data.py --tokenizer byte` once "
                    "(it downloads input.txt) or put the file at ../shared/data/tinyshakespeare.txt")
    return data


LLAMA_CPP_PYTHON = "0.3.36"  # the version .ci/run installs
NEEDS_LLAMA_CPP = (f"needs llama-cpp-python (compiles llama.cpp, ~10 min): pip install "
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON}; .ci/run installs it")


pytest_plugins = ["pytester"]  # test_tiers.py runs pytest on a file of its own with this conftest
SLOW_LEFT_OUT = pytest.StashKey[int]()  # how many slow tests this run left out


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="run the slow tests too (marked slow: torchrun, kill -9, llama.cpp, bench.py...)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs only with --slow (the rule is in conftest.py's docstring)")


def pytest_collection_modifyitems(config, items):
    """Without --slow, the tests marked slow are deselected (pytest counts them as "deselected"); a -m expression
    (`-m slow`: the slow tier alone) decides for itself. Where llama-cpp-python is missing, every test that runs a
    GGUF in llama.cpp (fixture llama_cpp_model) skips with one reason, which `pytest -rs` prints as one line."""
    if not config.getoption("--slow") and not config.option.markexpr:
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]
            config.stash[SLOW_LEFT_OUT] = len(slow)
    if importlib.util.find_spec("llama_cpp") is None:
        for item in items:
            if "llama_cpp_model" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.skip(reason=NEEDS_LLAMA_CPP))


def pytest_terminal_summary(terminalreporter, config):
    left_out = config.stash.get(SLOW_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(f"fast tier: {left_out} slow tests not run; `python -m pytest -q --slow` runs all")


def english_text(n_bytes, seed=0):
    """n_bytes of ASCII play-like text: tiny Shakespeare's start when it is here, else text made up from a small
    vocabulary in the same shape (speaker lines, verse, blank lines), so no test depends on a download."""
    real = tiny_shakespeare()
    if real is not None and n_bytes <= len(real):
        return real[:n_bytes]
    words = ("the king and queen of hearts shall speak to thee my lord what say you now good night sweet prince "
             "o romeo wherefore art thou gentle sir i pray come hither and be gone with all the world").split()
    # and 2,000 made-up words of 2-4 syllables, one word in three: the default run's bpe:1024 finds enough pairs to
    # merge in 20 KB of it, as in tiny Shakespeare (45 words alone hold a few hundred merges)
    syllables = [a + b for a in "bcdfghklmnprstvw" for b in "aeiou"] + ["th", "st", "ng", "ck", "sh", "qu"]
    made_up = ["".join(random.Random(i).choices(syllables, k=2 + i % 3)) for i in range(2000)]
    speakers = ["ROMEO", "JULIET", "KING HENRY", "First Citizen", "MENENIUS", "LADY CAPULET"]
    rng, parts, size = random.Random(seed), [], 0

    def word():
        return rng.choice(made_up) if rng.random() < 1 / 3 else rng.choice(words)

    while size < n_bytes:
        lines = [" ".join(word() for _ in range(rng.randint(4, 9))).capitalize() + rng.choice(",.;!?:")
                 for _ in range(rng.randint(1, 5))]
        part = f"{rng.choice(speakers)}:\n" + "\n".join(lines) + "\n\n"
        parts.append(part)
        size += len(part)
    return "".join(parts).encode("ascii")[:n_bytes]


@pytest.fixture
def one_line_error(capsys):
    """one_line_error(argv, status=1): run transformer.main(argv), expect that exit status (1: refused
    while running, 2: refused by the command line's checks) and exactly one line on stderr; return it."""

    def run(argv, status=1):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            transformer.main(argv)
        assert exc.value.code == status
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("transformer.py: error: ")
        return lines[0]

    return run


def write_dataset(out, splits, vocab_size=256, seed=0, tokenizer="byte"):
    """A dataset as prepare_data.py lays it out, from random tokens: splits maps a split name to the token
    count of each of its shards, e.g. {"train": [9000, 6000], "val": [2000]}. Returns the tokens by split."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = {}
    for split, sizes in splits.items():
        tokens[split] = []
        for i, n in enumerate(sizes):
            t = rng.integers(0, vocab_size, n).astype(np.uint16)
            prepare_data.write_shard(os.path.join(out, f"{split}_{i:06d}.bin"), t, vocab_size)
            tokens[split].append(t)
    meta = {"format_version": 1, "tokenizer": tokenizer, "vocab_size": vocab_size, "eot": None,
            "splits": {s: {"tokens": int(sum(n)), "shards": len(n)} for s, n in splits.items()}}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    return tokens


# cl100k_base's split pattern (as tiktoken writes it): what the test encodings below cut text into.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


def large_encoding(n_vocab):
    """tiktoken.Encoding's arguments for n_vocab tokens, the last <|endoftext|>, for vocabularies beyond 65,536 offline
    (cl100k_base's and o200k_base's files cannot be downloaded here). Its merges are the 729 pairs of lowercase
    letters and space, ranked last, so English text encodes to ids above 65,535; the ranks between are filler
    tokens no text forms."""
    pairs = [bytes([a, b]) for a in b"abcdefghijklmnopqrstuvwxyz " for b in b"abcdefghijklmnopqrstuvwxyz "]
    filler = n_vocab - 1 - 256 - len(pairs)
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"\x00\x01" + i.to_bytes(3, "big"): 256 + i for i in range(filler)})
    ranks.update({p: 256 + filler + j for j, p in enumerate(pairs)})
    return {"name": f"test_{n_vocab}", "pat_str": CL100K_PATTERN, "mergeable_ranks": ranks,
            "special_tokens": {"<|endoftext|>": n_vocab - 1}}


@pytest.fixture
def register_encoding(monkeypatch):
    """register_encoding(n_vocab) -> name: makes large_encoding(n_vocab) a tiktoken encoding that
    tiktoken.get_encoding(name) finds, through the registry its plugins (tiktoken_ext) fill, for this test."""
    import tiktoken
    import tiktoken.registry

    tiktoken.list_encoding_names()  # the registry reads its plugins first
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # get_encoding's cache: nothing of this test stays

    def register(n_vocab):
        encoding = large_encoding(n_vocab)
        monkeypatch.setitem(tiktoken.registry.ENCODING_CONSTRUCTORS, encoding["name"], lambda: encoding)
        return encoding["name"]

    return register


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Random byte tokens: two train shards (15,000 tokens), one val shard (2,000). Read-only for the tests."""
    out = str(tmp_path_factory.mktemp("data") / "random_byte")
    write_dataset(out, {"train": [9000, 6000], "val": [2000]})
    return out


def complete_lines(path):
    """Lines a writer has finished in path so far (it may be halfway through the next one); 0 before it exists."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def signal_after(proc, path, lines, sig, timeout):
    """Wait until the run proc has written `lines` complete lines to path (it is training), send it sig, and
    return its (stdout, stderr) once it exits; it is killed if anything goes wrong on the way."""
    try:
        deadline = time.monotonic() + timeout
        while complete_lines(path) < lines:
            assert proc.poll() is None, f"the run ended early; stderr:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.05)
        proc.send_signal(sig)
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# transformer.py run as a program under torchrun. A finished gloo run ends each process with os._exit(0) at the
# end of transformer.py, after destroy_process_group (see Distributed.running); here that call first records its
# status and the names of the threads the process still has in left<rank>.json. gloo's worker threads
# ("pt_gloo_runloop", "gloo_tcp_loop") live exactly as long as the process group does.
LEAVING = """
import json, os, runpy, sys

def record_then_exit(status, _exit=os._exit):
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(f"left{os.environ['RANK']}.json", "w") as f:
        json.dump({"status": status, "threads": threads}, f)
    _exit(status)

os._exit = record_then_exit
sys.argv = [sys.argv[0].replace("leaving.py", "transformer.py"), *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["PYTHONPATH"], "transformer.py"), run_name="__main__")
"""


def torchrun_leaving(args, cwd, env, timeout):
    """Run transformer.py's command line `args` with 2 processes under torchrun in cwd. Returns (the finished
    subprocess, per rank {"status", "threads"} as os._exit found them, or None where it was not called)."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux's /proc to list a process's threads")
    driver = os.path.join(cwd, "leaving.py")
    with open(driver, "w") as f:
        f.write(LEAVING)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             driver, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**env, "PYTHONPATH": REPO})
    left = []
    for rank in range(2):
        try:
            with open(os.path.join(cwd, f"left{rank}.json")) as f:
                left.append(json.load(f))
        except FileNotFoundError:  # that process ended some other way
            left.append(None)
    return result, left


def gloo_threads(left):
    return [name for name in left["threads"] if "gloo" in name]
