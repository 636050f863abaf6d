"""
files.py: files that are whole or absent. A companion of transformer.py (checkpoints, downloads, exports)
and prepare_data.py (shards); it never imports either.

A kill -9, a full disk or a lost connection at any moment must leave the old file or the complete new one,
never half of one: each writer here writes beside its target and renames at the end. At the end, one reader:
the prompts typed for --sample --interactive (typed_prompts).
"""

import contextlib
import json
import os
import sys


@contextlib.contextmanager
def atomic_open(path):
    """Open path + '.tmp' for writing; when the block ends well it is flushed to disk and renamed to path,
    and when it fails it is removed. A crash at any moment leaves the old file or the complete new one,
    never half of one. Checkpoints, downloads and prepare_data.py's shards are all written this way."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def download(url, path, hint, sha256=None):
    """Fetch url into path (atomically). Offline, a bad status or a wrong checksum is a ValueError
    that ends with hint, the way around it (a local copy)."""
    import hashlib
    import http.client
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            print(f"downloading {url} to {path}", file=sys.stderr)  # once connected: offline, the error is one line
            data = response.read()
    except (OSError, http.client.HTTPException) as e:  # offline, DNS, HTTP errors, a cut connection
        raise ValueError(f"could not download {url} ({e}); {hint}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"the download from {url} has the wrong sha256; {hint}")
    with atomic_open(path) as f:
        f.write(data)


def cached_download(url, hint):
    """The local copy of url in ~/.cache/transformer.py/ (or $XDG_CACHE_HOME/transformer.py/), downloaded
    on first use; hint is said when the download fails."""
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "transformer.py")
    path = os.path.join(folder, url.rsplit("/", 1)[-1])
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        download(url, path, hint)
    return path


@contextlib.contextmanager
def staged(path):
    """Yield a temporary path beside `path` to write to; it becomes `path` when the block ends well and is removed
    when it fails, so an export is whole or absent, never half-written."""
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        yield os.path.join(tmp_dir, "out")
        os.replace(os.path.join(tmp_dir, "out"), path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json(path, obj):
    """obj as indented JSON in path, whole or not at all (atomic_open): the text is made before anything is written."""
    text = json.dumps(obj, indent=2)
    with atomic_open(path) as f:
        f.write(text.encode())


def typed_prompts():
    """--interactive: the prompts typed on the terminal (or piped in), one a line, until an empty line or the
    end of the input (Ctrl-D). A terminal gets a '> ' before each."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", flush=True)  # on stdout: input() would write it to stderr
        line = sys.stdin.readline().rstrip("\r\n")  # '' at the end of the input, as for an empty line
        if not line:
            return
        yield line
