"""Set-up shared by every test file: offline, with the files in ../shared, on one torch thread."""

import os

import pytest
import torch

import transformer

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared")
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):  # tiktoken's gpt2 files, so it never downloads
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.abspath(os.path.join(SHARED, "tiktoken_cache")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# One thread: the test models are far too small to gain from more, and on a shared 2-core machine a
# second OpenMP thread that waits for a busy core makes every tiny op many times slower.
torch.set_num_threads(1)


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
