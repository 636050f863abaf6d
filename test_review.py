"""The ten wrong answers to users of issue #25, each pinned by the behaviour a user sees: through the command line
(transformer.main or a subprocess) wherever it can be, so the tests survive the file's restructuring. Offline, on CPU.
"""

import os
import re

import pytest

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
