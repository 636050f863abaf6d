"""The specification of --eval --hellaswag and --hellaswag-every (hellaswag.py): build-nanogpt's completion-style
scoring, checked against HF transformers and a scoring loop written here; batching, the split over processes, the
download cache and the errors a user sees. Offline, on CPU, with a tiny random GPT-2 (GPT-2's vocabulary, 16
wide) and six invented examples.
"""

import dataclasses
import io
import json
import os
import re
import urllib.error
import urllib.request

import pytest
import tiktoken
import torch
import torch.nn.functional as F
import transformers

import checkpoint
import convert
import hellaswag
import transformer
from conftest import gloo_threads, torchrun_leaving, write_dataset
from transformer import GPT, GPTConfig

BLOCK = 32  # the model's context, in GPT-2 tokens: short enough that the long example below is cropped
LINE = re.compile(r"hellaswag: acc (\d\.\d{4}) \| acc_norm (\d\.\d{4}) \| (\d+) examples")

# Invented for these tests. The last context is longer than BLOCK tokens, so its oldest tokens are cut.
EXAMPLES = [
    {"ctx": "A girl pours water into a glass and", "label": 0,
     "endings": ["drinks it slowly.", "the glass sings a song about Tuesday.", "paints the ceiling green.",
                 "folds the river in half."]},
    {"ctx": "The baker takes the bread out of the oven. She", "label": 2,
     "endings": ["throws it at the moon.", "reads it a bedtime story.", "lets it cool on a rack.",
                 "plants it in the garden."]},
    {"ctx": "Two men carry a sofa up the stairs. They", "label": 1,
     "endings": ["eat the stairs.", "set it down in the living room.", "teach it to swim.",
                 "turn into birds and fly away from the building."]},
    {"ctx": "A boy ties his shoes and", "label": 3,
     "endings": ["melts.", "the shoes run off without him.", "sings to a lamp post for hours.",
                 "walks out of the door."]},
    {"ctx": "The cat jumps onto the table.", "label": 0,
     "endings": ["It knocks a cup to the floor.", "It files a tax return.", "It becomes a small cloud.",
                 "It recites the alphabet backwards."]},
    {"ctx": "A woman stands at the edge of a quiet lake early in the morning, holding a long fishing rod "
            "and a small box of bait, while a thin mist drifts slowly across the water towards her. She",
     "label": 1,
     "endings": ["eats the fishing rod.", "casts her line into the water.", "asks the lake for directions.",
                 "paints the mist purple."]},
]


# -----------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT2LMHeadModel with GPT-2's vocabulary, every weight perturbed (so that the four endings'
    losses are well apart), saved with save_pretrained. Returns (folder, the HF model)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=BLOCK, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=50256, eos_token_id=50256)
    hf = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(str(path))
    return str(path), hf


def write_jsonl(path, examples):
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples)
    return str(path)


@pytest.fixture(scope="module")
def hf_losses(hf_dir):
    """For each example, the summed and the mean loss of its four endings: computed here with HF transformers,
    one ending at a time, tokenized with tiktoken itself. Returns a list of (summed, mean), 4 floats each."""
    _, hf = hf_dir
    enc = tiktoken.get_encoding("gpt2")
    out = []
    for example in EXAMPLES:
        ctx = enc.encode(example["ctx"])
        endings = [enc.encode(" " + e) for e in example["endings"]]
        longest = max(len(e) for e in endings)
        ctx = ctx[-(BLOCK - longest):]  # the documented crop: oldest context tokens go, the same for all four
        summed, mean = [], []
        for ending in endings:
            ids = torch.tensor([ctx + ending])
            with torch.no_grad():
                logprobs = F.log_softmax(hf(ids).logits[0], dim=-1)  # (n, vocab)
            loss = -sum(logprobs[len(ctx) - 1 + j, token].item() for j, token in enumerate(ending))
            summed.append(loss)
            mean.append(loss / len(ending))
        out.append((summed, mean))
    assert len(enc.encode(EXAMPLES[-1]["ctx"])) > BLOCK  # the long example really is cropped
    return out


@pytest.fixture(scope="module")
def choices(hf_losses):
    """For each example, (the ending with the lowest summed loss, the one with the lowest mean loss)."""
    out = []
    for summed, mean in hf_losses:
        for losses in (summed, mean):  # far from a tie: a rounding difference cannot change the answer
            best, second = sorted(losses)[:2]
            assert second - best > 1e-3, losses
        out.append((summed.index(min(summed)), mean.index(min(mean))))
    for answers in zip(*out):  # a scorer that always picks the same ending, or the shortest, would fail
        assert len(set(answers)) >= 3, out
    return out


def hellaswag_line(capsys, *argv):
    """Run --eval --hellaswag in this process; stdout must be exactly one line: (acc, acc_norm, n, line)."""
    capsys.readouterr()
    transformer.main(["--eval", "--hellaswag", *map(str, argv), "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    m = LINE.fullmatch(out.strip())
    assert m, out
    return float(m[1]), float(m[2]), int(m[3]), out.strip()


def expected_line(correct, correct_norm, n):
    return f"hellaswag: acc {correct / n:.4f} | acc_norm {correct_norm / n:.4f} | {n} examples"


# -----------------------------------------------------------------------------
# Scoring: the same answers as HF transformers and a loop written here


@pytest.mark.parametrize("batch_size", [1, 4])
def test_acc_and_acc_norm_equal_an_independent_scoring_with_hf_transformers(hf_dir, choices, tmp_path, capsys,
                                                                            batch_size):
    path, _ = hf_dir
    file = write_jsonl(tmp_path / "hs.jsonl", EXAMPLES)
    correct = sum(s == e["label"] for (s, _), e in zip(choices, EXAMPLES))
    correct_norm = sum(m == e["label"] for (_, m), e in zip(choices, EXAMPLES))
    *_, line = hellaswag_line(capsys, file, "--init-from", path, "--batch-size", batch_size)
    assert line == expected_line(correct, correct_norm, len(EXAMPLES))


def test_every_examples_answer_equals_hf_transformers_answer(hf_dir, choices, tmp_path, capsys):
    """With each label set to the ending HF's summed (then mean) loss picks, acc (then acc_norm) is 1."""
    path, _ = hf_dir
    by_sum = [{**e, "label": s} for (s, _), e in zip(choices, EXAMPLES)]
    by_mean = [{**e, "label": m} for (_, m), e in zip(choices, EXAMPLES)]
    acc, _, n, _ = hellaswag_line(capsys, write_jsonl(tmp_path / "sum.jsonl", by_sum), "--init-from", path)
    _, acc_norm, _, _ = hellaswag_line(capsys, write_jsonl(tmp_path / "mean.jsonl", by_mean), "--init-from", path)
    assert (acc, acc_norm, n) == (1.0, 1.0, len(EXAMPLES))


def test_a_checkpoint_is_scored_with_its_own_tokenizer(tmp_path, capsys):
    """--ckpt of a byte-level model: the longer contexts are cropped to its 64 bytes; the line keeps its format."""
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", "gpt2", block_size=64)
    checkpoint.save_checkpoint(str(tmp_path / "ckpt.pt"), {
        "format": transformer.CKPT_FORMAT, "model": GPT(config).state_dict(), "config": dataclasses.asdict(config),
        "tokenizer": "byte"})
    file = write_jsonl(tmp_path / "hs.jsonl", EXAMPLES)
    acc, acc_norm, n, _ = hellaswag_line(capsys, file, "--ckpt", tmp_path / "ckpt.pt")
    assert n == len(EXAMPLES) and 0 <= acc <= 1 and 0 <= acc_norm <= 1


@pytest.fixture(scope="module")
def ours(hf_dir):
    model = GPT.from_pretrained(hf_dir[0]).eval()
    return model, transformer.get_tokenizer(convert.hf_tokenizer_name(hf_dir[0]))


def test_each_endings_loss_equals_hf_transformers_in_one_padded_batch(ours, hf_losses):
    model, tokenizer = ours
    rendered = [hellaswag.render(e, tokenizer, BLOCK) for e in EXAMPLES]
    summed, mean = hellaswag.losses(model, rendered, torch.device("cpu"))
    assert summed.shape == mean.shape == (len(EXAMPLES), 4)
    torch.testing.assert_close(summed, torch.tensor([s for s, _ in hf_losses]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(mean, torch.tensor([m for _, m in hf_losses]), atol=1e-4, rtol=1e-5)


# -----------------------------------------------------------------------------
# The function a training loop calls



def test_scoring_leaves_the_model_in_its_mode_and_the_rng_untouched(ours):
    model, tokenizer = ours
    model.train()
    rng = torch.get_rng_state()
    counts = hellaswag.scores(model, EXAMPLES, tokenizer, torch.device("cpu"))
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    model.eval()
    assert hellaswag.scores(model, EXAMPLES, tokenizer, torch.device("cpu")) == counts
    assert not model.training


def test_ranks_score_disjoint_shares_whose_counts_add_up_to_one_process(ours):
    model, tokenizer = ours
    cpu = torch.device("cpu")
    one = hellaswag.scores(model, EXAMPLES, tokenizer, cpu, batch_size=3)
    shares = [hellaswag.scores(model, EXAMPLES, tokenizer, cpu, rank=r, world=4)
              for r in range(4)]
    assert [n for *_, n in shares] == [2, 2, 1, 1]  # examples rank, rank + 4, ...
    assert tuple(map(sum, zip(*shares))) == one


@pytest.fixture(scope="module")
def under_torchrun(hf_dir, tmp_path_factory):
    """--eval --hellaswag of the HF model (--init-from imports transformers) with 2 processes under torchrun:
    (the finished subprocess, how each process left)."""
    cwd = tmp_path_factory.mktemp("torchrun")
    file = write_jsonl(cwd / "hs.jsonl", EXAMPLES)
    return torchrun_leaving(["--eval", "--hellaswag", file, "--init-from", hf_dir[0], "--device", "cpu"], cwd,
                            {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.mark.slow
def test_two_processes_under_torchrun_print_the_one_process_line(under_torchrun, hf_dir, tmp_path, capsys):
    file = write_jsonl(tmp_path / "hs.jsonl", EXAMPLES)
    *_, line = hellaswag_line(capsys, file, "--init-from", hf_dir[0])
    result, left = under_torchrun
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r and r["status"] for r in left] == [0, 0], left  # both ended before Python's shutdown
    assert result.stdout.strip() == line  # once, from rank 0, with both ranks' counts: flushed before os._exit


@pytest.mark.slow
def test_under_torchrun_no_gloo_thread_outlives_the_process_group(under_torchrun):
    """transformers imports torch's FSDP module, whose default argument held the process group when imported
    after it was made: gloo's threads then lived into Python's shutdown and aborted a finished run 1 time in 20."""
    result, left = under_torchrun
    assert all(r is not None and not gloo_threads(r) for r in left), left


# -----------------------------------------------------------------------------
# The official file: downloaded once into the cache


def test_without_file_the_official_val_set_is_downloaded_once_into_the_cache(hf_dir, tmp_path, capsys, monkeypatch):
    path, _ = hf_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    served = write_jsonl(tmp_path / "served.jsonl", EXAMPLES)
    asked = []

    def server(url, timeout=None):
        asked.append(url)
        with open(served, "rb") as f:
            return io.BytesIO(f.read())

    monkeypatch.setattr(urllib.request, "urlopen", server)
    first = hellaswag_line(capsys, "--init-from", path)
    assert asked == [hellaswag.URL] and first[2] == len(EXAMPLES)
    cached = tmp_path / "cache" / "transformer.py" / "hellaswag_val.jsonl"
    assert cached.read_bytes() == open(served, "rb").read()
    assert os.listdir(cached.parent) == ["hellaswag_val.jsonl"]  # no temporary file left behind

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert hellaswag_line(capsys, "--init-from", path) == first  # read from the cache, no download


def test_offline_without_a_cached_copy_is_a_one_line_error(hf_dir, tmp_path, monkeypatch, one_line_error):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    line = one_line_error(["--eval", "--hellaswag", "--init-from", hf_dir[0], "--device", "cpu"])
    assert "could not download https://raw.githubusercontent.com/rowanz/hellaswag" in line
    assert "--hellaswag FILE" in line
    assert not os.path.exists(tmp_path / "cache" / "transformer.py" / "hellaswag_val.jsonl")


# -----------------------------------------------------------------------------
# Bad input: one clear line


BAD_FILES = {  # name -> (file content, what the error says)
    "not-json": ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}\n{"ctx": oops}\n',
                 r"hs.jsonl, line 2: not JSON"),
    "three-endings": ('{"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}\n',
                      r"line 1: endings must be a list of 4 texts"),
    "no-label": ('{"ctx": "A man", "endings": ["a", "b", "c", "d"]}\n',
                 r"line 1: a HellaSwag example needs the fields ctx, endings and label"),
    "label-4": ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}\n',
                r"line 1: label must be 0, 1, 2 or 3, not 4"),
    "empty": ("\n", r"hs.jsonl: no HellaSwag examples"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_file_is_a_one_line_error(hf_dir, tmp_path, one_line_error, name):
    content, message = BAD_FILES[name]
    (tmp_path / "hs.jsonl").write_text(content)
    line = one_line_error(["--eval", "--hellaswag", str(tmp_path / "hs.jsonl"), "--init-from", hf_dir[0],
                           "--device", "cpu"])
    assert re.search(message, line), line


def test_a_missing_file_is_a_one_line_error(hf_dir, tmp_path, one_line_error):
    line = one_line_error(["--eval", "--hellaswag", str(tmp_path / "none.jsonl"), "--init-from", hf_dir[0],
                           "--device", "cpu"])
    assert "none.jsonl: cannot read a HellaSwag file (No such file or directory)" in line


def test_an_ending_longer_than_the_context_is_refused_in_one_line(hf_dir, tmp_path, one_line_error):
    long = {**EXAMPLES[0], "endings": ["and then " * 20, "a", "b", "c"]}
    file = write_jsonl(tmp_path / "hs.jsonl", [long])
    line = one_line_error(["--eval", "--hellaswag", file, "--init-from", hf_dir[0], "--device", "cpu"])
    assert f"does not fit the model's context of {BLOCK} tokens" in line


def test_hellaswag_without_eval_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        transformer.parse_args(["--hellaswag", "x.jsonl"])
    assert exc.value.code == 2 and "--hellaswag goes with --eval or --hellaswag-every" in capsys.readouterr().err


def test_training_with_hellaswag_every_logs_the_score_eval_prints(tmp_path, capsys):
    """--hellaswag-every N scores the model being trained every N steps and at the end; the last score is
    the one --eval --hellaswag prints for the saved checkpoint."""
    data = str(tmp_path / "data")
    write_dataset(data, {"train": [3000], "val": [1000]})
    file = write_jsonl(tmp_path / "hs.jsonl", EXAMPLES)
    transformer.main(["--data", data, "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--n-layer", "1",
                      "--n-head", "2", "--n-embd", "32", "--seq-len", "64", "--batch-size", "4", "--max-steps", "5",
                      "--hellaswag", file, "--hellaswag-every", "2", "--eval-iters", "1"])
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "hellaswag_acc_norm" in r] == [2, 4, 5]
    _, acc_norm, _, _ = hellaswag_line(capsys, file, "--ckpt", tmp_path / "out" / "ckpt.pt")
    assert rows[-1]["hellaswag_acc_norm"] == pytest.approx(acc_norm, abs=1e-4)
