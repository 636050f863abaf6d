"""The specification of sampling and evaluation (transformer.py sections 6 and 10, and the --sample / --eval CLI):
the KV cache, top-k / top-p, seeds, the context limit, streaming, perplexity and the errors a user sees.
Offline, on CPU, with tiny models: the whole file runs in well under a minute.
"""

import contextlib
import io
import math
import os
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare_data
import transformer
from transformer import GPT, GPTConfig, KVCache

REPO = os.path.dirname(os.path.abspath(__file__))

SCRIPT = os.path.join(REPO, "transformer.py")
BLOCK = 24


# -----------------------------------------------------------------------------
# Helpers


def make_model(arch="gpt2", seed=0, **overrides):
    """A tiny random model in eval mode. Its matrices are drawn wider than GPT-2's init (std 0.02), so the
    logits are spread out and greedy decoding does not hinge on near-ties a rounding difference could flip."""
    torch.manual_seed(seed)
    config = GPTConfig.preset("tiny", arch, **{**dict(n_layer=2, n_head=4, n_embd=32, block_size=BLOCK,
                                                     vocab_size=64), **overrides})
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.2)
    return model


CONFIGS = {  # name -> (arch, overrides)
    "learned": ("gpt2", {}),
    "rope-gqa": ("gpt2", dict(pos="rope", n_kv_head=2)),
    "alibi": ("gpt2", dict(pos="alibi")),
    "arch-gpt2": ("gpt2", {}),
    "arch-llama": ("llama", {}),
    "arch-olmo": ("olmo", {}),
    "llama-mqa": ("llama", dict(n_kv_head=1)),
    "llama-gqa-explicit-attention": ("llama", dict(n_kv_head=2, attn_impl="explicit")),
    "olmo-explicit-attention": ("olmo", dict(attn_impl="explicit")),
    "arch-nanochat-gqa": ("nanochat", dict(n_kv_head=2)),  # QK-norm on the cached keys, the soft-cap
    "nanochat-value_embeds-x0_lambdas": ("nanochat", dict(n_kv_head=2, value_embeds=True, x0_lambdas=True)),
}


def prompt(batch=2, length=5, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def synthetic_text(n_chars, seed=0):
    """ASCII prose-like text: words from a small vocabulary, in lines."""
    words = ("the king and queen of hearts shall speak to thee my lord what say you now good night sweet "
             "prince o romeo wherefore art thou").split()
    rng, lines, size = random.Random(seed), [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)[:n_chars]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained briefly (the default llama architecture, tiny) on byte shards that prepare_data.py
    made from ASCII text; the val split is spread over several shards. Returns (ckpt path, data dir)."""
    tmp = tmp_path_factory.mktemp("trained")
    (tmp / "text.txt").write_text(synthetic_text(30_000))
    data = str(tmp / "data")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare_data.main(["--input", str(tmp / "text.txt"), "--tokenizer", "byte", "--out", data,
                           "--shard-tokens", "1000"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            transformer.main(["--data", data, "--out-dir", str(tmp / "out"), "--device", "cpu", "--n-layer", "1",
                              "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "8",
                              "--max-steps", "40", "--lr", "1e-2", "--warmup-steps", "5", "--log-every", "100",
                              "--eval-every", "1000", "--eval-iters", "1"])
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
    return str(tmp / "out" / "ckpt.pt"), data


def load(ckpt_path):
    return transformer.model_from_checkpoint(transformer.load_checkpoint(ckpt_path)).eval()


def direct_mean_loss(model, tokens):
    """Mean next-token cross-entropy over windows of block_size + 1 tokens overlapping by one, computed here
    independently of evaluate_tokens: every token after the first is predicted once, with the context
    since the start of its window."""
    T, tokens = model.config.block_size, torch.tensor(np.asarray(tokens, dtype=np.int64))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, T):
            window = tokens[start : start + T + 1]
            logits, _ = model(window[None, :-1])
            total += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
    return total / (len(tokens) - 1)


def parse_eval(out):
    m = re.search(r": loss (\d+\.\d+) \| perplexity (\d+\.\d+) \| ([\d,]+) tokens predicted", out)
    assert m, out
    return float(m[1]), float(m[2]), int(m[3].replace(",", ""))


# -----------------------------------------------------------------------------
# The KV cache


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_gives_the_same_greedy_tokens_as_no_cache(name):
    arch, overrides = CONFIGS[name]
    model = make_model(arch, **overrides)
    idx = prompt()
    n = BLOCK - idx.size(1)  # up to the end of the context
    cached = transformer.generate(model, idx, n, temperature=0, use_cache=True)
    uncached = transformer.generate(model, idx, n, temperature=0, use_cache=False)
    assert cached.shape == (2, BLOCK)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : idx.size(1)], idx)
    assert len(set(cached[0, idx.size(1) :].tolist())) > 1  # not a degenerate model that repeats one token


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_logits_equal_a_full_forward(name):
    """Prefill, then one token at a time through the cache: each step's logits are the full forward's."""
    arch, overrides = CONFIGS[name]
    model = make_model(arch, **overrides)
    idx = prompt(length=BLOCK, seed=1)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, idx.size(0), idx.device)
        cache.make_room(7)  # the generation loop's part: the model only reads the cache
        first, _ = model(idx[:, :7], cache=cache)
        torch.testing.assert_close(first, full[:, :7], atol=1e-4, rtol=1e-4)
        for t in range(7, BLOCK):
            cache.make_room(1)
            step, _ = model(idx[:, t : t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-4, rtol=1e-4)
    assert cache.pos == BLOCK and cache.key_pos.tolist() == list(range(BLOCK))


@pytest.mark.parametrize("name", ["learned", "rope-gqa", "alibi"])
def test_a_short_generation_gets_a_smaller_cache_and_the_same_tokens(name, monkeypatch):
    """Every step attends to all the cache's slots: a generation that ends early holds the power of two that
    fits it (3 + 6 tokens: 16 slots), not block_size (24)."""
    arch, overrides = CONFIGS[name]
    model = make_model(arch, **overrides)
    sizes, real_init = [], KVCache.__init__
    monkeypatch.setattr(KVCache, "__init__", lambda self, *a: (real_init(self, *a), sizes.append(self.shape[2]))[0])
    idx = prompt(length=3)
    cached = transformer.generate(model, idx, 6, temperature=0)
    assert torch.equal(cached, transformer.generate(model, idx, 6, temperature=0, use_cache=False))
    assert sizes == [16]


def test_streaming_yields_the_tokens_generate_returns():
    model = make_model("llama")
    idx = prompt()
    streamed = list(transformer.generate(model, idx, 10, temperature=0, stream=True))
    assert len(streamed) == 10 and all(t.shape == (2, 1) for t in streamed)
    assert torch.equal(torch.cat([idx, *streamed], 1), transformer.generate(model, idx, 10, temperature=0))


def test_learned_positions_past_block_size_cached_equals_uncached():
    """Learned positions end at block_size: from there both paths re-encode the last block_size tokens."""
    model = make_model("gpt2")
    idx = prompt(length=4)
    cached = transformer.generate(model, idx, 2 * BLOCK, temperature=0, use_cache=True)
    uncached = transformer.generate(model, idx, 2 * BLOCK, temperature=0, use_cache=False)
    assert cached.shape == (2, 4 + 2 * BLOCK)
    assert torch.equal(cached, uncached)
    with pytest.raises(ValueError, match="longer than block_size"):  # the model itself cannot go further
        model(cached[:, : BLOCK + 1])


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_rope_and_alibi_caches_slide_past_block_size(pos, monkeypatch):
    model = make_model("llama", pos=pos, n_kv_head=2)
    filled, shapes, finite = [], set(), []
    real_make_room, real_sample_next = KVCache.make_room, transformer.sample_next

    def make_room(self, T):
        real_make_room(self, T)
        filled.append(int((self.key_pos < KVCache.EMPTY).sum()))
        shapes.update(tuple(buf.shape) for buf in self.k + self.v if buf is not None)

    def sample_next(logits, *args, **kwargs):
        finite.append(bool(torch.isfinite(logits).all()))
        return real_sample_next(logits, *args, **kwargs)

    monkeypatch.setattr(KVCache, "make_room", make_room)
    monkeypatch.setattr(transformer, "sample_next", sample_next)
    idx = prompt(length=5)
    out = transformer.generate(model, idx, 2 * BLOCK, temperature=0)
    assert out.shape == (2, 5 + 2 * BLOCK)
    assert shapes == {(2, 2, BLOCK, model.config.head_dim)}  # one shape, never more than block_size slots
    assert filled[0] == 5 and max(filled) == BLOCK and filled[-1] == BLOCK  # it filled up, then slid
    assert all(finite) and len(finite) == 2 * BLOCK
    assert torch.equal(transformer.generate(model, idx, 2 * BLOCK, temperature=0), out)  # deterministic
    sampled = [transformer.generate(model, idx, 2 * BLOCK, temperature=1.0, generator=torch.Generator().manual_seed(3))
               for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])
    # the uncached path (a window of the last block_size tokens) runs past the limit too
    assert transformer.generate(model, idx, 2 * BLOCK, temperature=0, use_cache=False).shape == out.shape


class GrowingCache:
    """The sliding cache written the plain way, as the reference for KVCache's ring: each layer's keys and values
    kept in the order of their positions, the new ones appended (torch.cat) and the oldest cut off past block_size.
    It offers what the model reads of a KVCache: make_room, positions, key_pos and update (layer i's k, v)."""

    def __init__(self, size, n_layer):
        self.size, self.pos, self.kv = size, 0, [None] * n_layer

    def make_room(self, T):
        self.positions = torch.arange(self.pos, self.pos + T)
        self.pos += T
        self.key_pos = torch.arange(max(0, self.pos - self.size), self.pos)  # the last block_size positions

    def update(self, i, k, v):
        if self.kv[i] is not None:
            k, v = torch.cat((self.kv[i][0], k), dim=2), torch.cat((self.kv[i][1], v), dim=2)
        self.kv[i] = k[:, :, -self.size :], v[:, :, -self.size :]
        return self.kv[i]


def greedy_with(cache, model, idx, n):
    """n greedy tokens through `cache`, one at a time after the prompt."""
    new = idx
    with torch.no_grad():
        for _ in range(n):
            cache.make_room(new.size(1))
            logits, _ = model(new, cache=cache)
            new = logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat((idx, new), dim=1)
    return idx


@pytest.mark.parametrize("name", ["rope-gqa", "alibi", "llama-mqa", "llama-gqa-explicit-attention"])
def test_the_fixed_shape_cache_slides_as_a_growing_one_would(name):
    """Past block_size the ring overwrites its oldest slot; a cache that appends and cuts keeps the same keys
    in another order, and attention does not care about the order: the same greedy tokens, many layers deep."""
    arch, overrides = CONFIGS[name]
    model = make_model(arch, **{**overrides, "n_layer": 3})
    idx = prompt(length=5)
    expected = greedy_with(GrowingCache(BLOCK, 3), model, idx, 3 * BLOCK)
    assert torch.equal(transformer.generate(model, idx, 3 * BLOCK, temperature=0), expected)
    assert torch.equal(greedy_with(KVCache(model.config, 2, idx.device), model, idx, 3 * BLOCK), expected)


@pytest.fixture
def fresh_dynamo():
    """Compiled graphs of other tests' models count towards dynamo's limit of recompiles per function."""
    torch._dynamo.reset()
    yield torch._dynamo.utils.counters["stats"]
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["learned", "rope-gqa", "alibi"])
def test_compiled_decode_gives_the_eager_tokens_and_compiles_once(name, fresh_dynamo):
    """compile=True (--sample --compile): the one-token steps run one compiled graph, the same for every position,
    past block_size too (where learned positions re-encode eagerly), and for a new prompt of another length."""
    arch, overrides = CONFIGS[name]
    model = make_model(arch, **overrides)
    graphs = fresh_dynamo["unique_graphs"]
    for length, n in ((5, 2 * BLOCK), (9, BLOCK)):
        idx = prompt(length=length, seed=length)
        compiled = transformer.generate(model, idx, n, temperature=0, compile=True)
        assert torch.equal(compiled, transformer.generate(model, idx, n, temperature=0))
        assert fresh_dynamo["unique_graphs"] - graphs == 1  # not one per token, nor one per prompt


def test_the_compiled_step_is_what_runs_each_token(monkeypatch):
    """The decode steps go through compiled_step's function (prefill and the uncached path stay eager); the
    test above is its un-stubbed twin."""
    calls = []
    monkeypatch.setattr(transformer, "compiled_step", lambda cuda: lambda *a: (calls.append(cuda),
                                                                                transformer.forward_step(*a))[1])
    model = make_model("llama")
    transformer.generate(model, prompt(length=5), 10, temperature=0, compile=True)
    assert calls == [False] * 9  # every token after the prefill's
    transformer.generate(model, prompt(length=5), 10, temperature=0)
    assert len(calls) == 9


@pytest.mark.parametrize("name", ["learned", "rope-gqa", "alibi"])
def test_a_model_can_be_trained_after_it_generated(name):
    """Sampling while training (or sampling a loaded model, then fine-tuning it) must not leave state behind
    that autograd refuses: generate() runs under inference_mode, and whatever it caches on the model
    (RoPE's cos/sin tables grow to cover 2 x block_size positions and more) is reused by training."""
    arch, overrides = CONFIGS[name]
    model = make_model(arch, **overrides)
    transformer.generate(model, prompt(length=2), 3 * BLOCK, temperature=0)
    model.train()
    x = prompt(length=BLOCK)
    _, loss = model(x, x)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_one_layer_sliding_cache_equals_reencoding_the_window(pos):
    """With one layer a cached key depends only on its token and position, and RoPE / ALiBi scores only
    on distances, so past block_size the sliding cache must give what re-encoding the last block_size
    tokens gives: this pins down the positions the cache uses once it slides."""
    model = make_model("llama", pos=pos, n_layer=1, n_kv_head=2)
    idx = prompt(length=5)
    cached = transformer.generate(model, idx, 2 * BLOCK, temperature=0, use_cache=True)
    assert torch.equal(cached, transformer.generate(model, idx, 2 * BLOCK, temperature=0, use_cache=False))


# -----------------------------------------------------------------------------
# sample_next: temperature, top-k, top-p


def draws(logits_row, n=4000, seed=0, **kwargs):
    """n samples of sample_next from one row of logits, as a set of token ids."""
    logits = logits_row.expand(n, -1)
    out = transformer.sample_next(logits, generator=torch.Generator().manual_seed(seed), **kwargs)
    assert out.shape == (n, 1)
    return set(out[:, 0].tolist())


def test_a_tiny_temperature_samples_the_argmax_instead_of_overflowing():
    logits = torch.tensor([[3.0, 9.0, -2.0, 8.5]])
    assert draws(logits[0], n=50, temperature=1e-45) == {1}  # 9 / 1e-45 would overflow fp32 to inf


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(transformer.sample_next(logits, temperature=0), logits.argmax(-1, keepdim=True))
    assert torch.equal(transformer.sample_next(logits, temperature=1.0, top_k=1), logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_top_k_never_samples_outside_the_k_most_likely(k, temperature):
    gen = torch.Generator().manual_seed(k)
    row = torch.randperm(50, generator=gen).float() * 0.05  # distinct logits, spread over [0, 2.5)
    allowed = set(np.argsort(-row.numpy())[:k].tolist())
    seen = draws(row, temperature=temperature, top_k=k)
    assert seen <= allowed
    assert seen == allowed  # and every one of them can be drawn


def nucleus(probs, top_p):
    """The smallest set of most likely tokens whose probabilities sum to at least top_p."""
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    return set(order[: int(np.searchsorted(cum, top_p)) + 1].tolist())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_never_samples_outside_the_nucleus(seed, top_p):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(30, 0.5))
    cum = np.cumsum(np.sort(probs)[::-1])
    if np.min(np.abs(cum - top_p)) < 1e-3:  # too close to call in float32
        pytest.skip("a cumulative probability falls on top_p")
    allowed = nucleus(probs, top_p)
    seen = draws(torch.tensor(np.log(probs), dtype=torch.float32), top_p=top_p)
    assert seen <= allowed
    assert allowed - seen == set() or min(probs[list(allowed - seen)]) < 2e-3  # the rest is just rare


def test_top_p_keeps_exactly_the_crafted_nucleus():
    probs = np.array([0.05, 0.4, 0.02, 0.15, 0.25, 0.1, 0.03])  # sorted: 0.4, 0.25, 0.15 reach 0.8
    logits = torch.tensor(np.log(probs), dtype=torch.float32)
    assert draws(logits, top_p=0.7) == {1, 4, 3}
    assert draws(logits, top_p=0.3) == {1}  # the most likely token alone already covers 0.3
    assert draws(logits, top_p=1.0) == set(range(7))


def test_top_k_then_top_p_on_what_top_k_kept():
    probs = np.array([0.3, 0.05, 0.2, 0.1, 0.15, 0.2])
    logits = torch.tensor(np.log(probs), dtype=torch.float32)
    # top-3 keeps 0.3, 0.2, 0.2 (renormalised 0.43, 0.29, 0.29); top_p 0.6 then needs the first two of them
    kept = draws(logits, top_k=3, top_p=0.6)
    assert kept < {0, 2, 5} and 0 in kept and len(kept) == 2


# -----------------------------------------------------------------------------
# Seeds and prompts


def test_the_same_seed_gives_the_same_tokens_and_other_seeds_differ():
    model = make_model("llama")
    idx = prompt()

    def run(seed):
        torch.manual_seed(12345 + seed)  # the global RNG must not matter when a generator is given
        generator = torch.Generator().manual_seed(seed)
        return transformer.generate(model, idx, 30, temperature=1.0, top_k=None, generator=generator)

    assert torch.equal(run(7), run(7))
    assert len({tuple(run(s).flatten().tolist()) for s in range(4)}) == 4


def test_a_prompt_longer_than_block_size_or_empty_is_a_value_error():
    model = make_model("llama")
    with pytest.raises(ValueError, match="longer than the context"):
        transformer.generate(model, prompt(length=BLOCK + 1), 1)
    with pytest.raises(ValueError, match="empty prompt"):
        transformer.generate(model, torch.zeros(1, 0, dtype=torch.long), 1)
    full = transformer.generate(model, prompt(length=BLOCK), 2, temperature=0)
    assert full.shape == (2, BLOCK + 2)  # exactly full is fine


# -----------------------------------------------------------------------------
# The CLI: --sample


def test_cli_sample_prints_the_prompt_then_streams_the_generated_text(trained, monkeypatch):
    ckpt, _ = trained
    out, lengths = io.StringIO(), []
    real_sample_next = transformer.sample_next

    def sample_next(*args, **kwargs):
        lengths.append(len(out.getvalue()))  # what had been printed when this token was picked
        return real_sample_next(*args, **kwargs)

    monkeypatch.setattr(transformer, "sample_next", sample_next)
    monkeypatch.setattr(sys, "stdout", out)
    transformer.main(["--sample", "--ckpt", ckpt, "--prompt", "The king", "--max-new-tokens", "40",
                      "--temperature", "0", "--device", "cpu"])
    monkeypatch.undo()
    model = load(ckpt)
    ids = list(b"The king")
    new = transformer.generate(model, torch.tensor([ids]), 40, temperature=0)[0, len(ids) :].tolist()
    assert out.getvalue() == "The king" + bytes(new).decode("utf-8", errors="replace") + "\n" + "-" * 40 + "\n"
    assert all(b < 128 for b in new)  # the model learned its ASCII text
    # streamed: the prompt is out before the first token is picked, and text keeps appearing during generation
    assert len(lengths) == 40 and lengths[0] == len("The king")
    assert lengths[-1] == len("The king") + 39
    assert lengths == sorted(lengths)


def test_cli_sample_with_the_same_seed_prints_the_same_text(trained, capsys):
    ckpt, _ = trained

    def sample(*flags):
        capsys.readouterr()
        transformer.main(["--sample", "--ckpt", ckpt, "--max-new-tokens", "60", "--temperature", "1.0",
                          "--device", "cpu", *flags])
        return capsys.readouterr().out

    first = sample("--seed", "5", "--num-samples", "2")
    assert sample("--seed", "5", "--num-samples", "2") == first
    assert sample("--seed", "6", "--num-samples", "2") != first
    one, two = first.split("-" * 40 + "\n")[:2]
    assert one != two  # the samples of one run differ from each other
    within_context = ("--seed", "5", "--max-new-tokens", "15")  # block_size 16: no sliding, so exactly equal
    assert sample(*within_context, "--no-cache") == sample(*within_context)  # the cache changes nothing


@pytest.mark.slow
def test_cli_sample_compiled_prints_the_eager_text(trained, capsys, fresh_dynamo):
    ckpt, _ = trained

    def sample(*flags):
        capsys.readouterr()
        transformer.main(["--sample", "--ckpt", ckpt, "--prompt", "The king", "--max-new-tokens", "30",
                          "--temperature", "0", "--device", "cpu", *flags])
        return capsys.readouterr().out

    graphs = fresh_dynamo["unique_graphs"]
    assert sample("--compile") == sample()
    assert fresh_dynamo["unique_graphs"] - graphs == 1


def sample_prompt(trained, capsys, text):
    """What --sample --prompt text prints, greedy, 20 new tokens."""
    capsys.readouterr()
    transformer.main(["--sample", "--ckpt", trained[0], "--device", "cpu", "--max-new-tokens", "20",
                      "--temperature", "0", "--prompt", text])
    return capsys.readouterr().out


def test_cli_interactive_samples_each_piped_prompt_until_an_empty_line(trained, capsys, monkeypatch):
    one, two = sample_prompt(trained, capsys, "The king"), sample_prompt(trained, capsys, "Good night")
    for piped, expected in [("The king\nGood night\n\nnever read\n", one + two),
                            ("The king", one)]:  # the end of the input ends it too
        monkeypatch.setattr(sys, "stdin", io.StringIO(piped))  # a pipe: no terminal, so no '> '
        transformer.main(["--sample", "--interactive", "--ckpt", trained[0], "--device", "cpu", "--max-new-tokens",
                          "20", "--temperature", "0"])
        assert capsys.readouterr() == (expected, "")


@pytest.mark.slow
def test_cli_interactive_on_a_terminal_prompts_and_ends_on_ctrl_d(trained, capsys):
    """On a pseudo-terminal, as a user types: a '> ' before each prompt, the continuation, and Ctrl-D ends."""
    import pty
    import select

    expected = sample_prompt(trained, capsys, "The king")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, SCRIPT, "--sample", "--interactive", "--ckpt", trained[0], "--device",
                             "cpu", "--max-new-tokens", "20", "--temperature", "0"], stdin=follower, stdout=follower,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(follower)
    seen = b""

    def read_until(text):
        nonlocal seen
        while text not in seen.replace(b"\r\n", b"\n"):
            ready, _, _ = select.select([leader], [], [], 120)
            assert ready, seen
            seen += os.read(leader, 4096)

    try:
        read_until(b"> ")
        os.write(leader, b"The king\n")
        read_until(b"-" * 40 + b"\n> ")
        os.write(leader, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0 and proc.stderr.read() == b""
    finally:
        proc.kill()
        os.close(leader)
    assert expected.encode() in seen.replace(b"\r\n", b"\n")


def test_cli_interactive_without_sample_is_a_one_line_error(one_line_error):
    assert "--interactive is not read by training" in one_line_error(["--interactive"], status=2)


def test_cli_sample_prompt_from_a_file(trained, tmp_path, capsys):
    ckpt, _ = trained
    (tmp_path / "p.txt").write_text("Good night")
    transformer.main(["--sample", "--ckpt", ckpt, "--prompt", f"FILE:{tmp_path / 'p.txt'}", "--max-new-tokens", "5",
                      "--device", "cpu"])
    assert capsys.readouterr().out.startswith("Good night")


@pytest.mark.parametrize("text, message", [("x" * 17, "longer than the context"), ("", "empty prompt")])
def test_cli_sample_with_a_bad_prompt_is_a_one_line_error(trained, capsys, text, message, one_line_error):
    ckpt, _ = trained
    line = one_line_error(["--sample", "--ckpt", ckpt, "--prompt", text, "--device", "cpu"])
    assert message in line


def test_cli_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--sample", "--ckpt", "nope.pt", "--device", "cpu"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert result.stderr.strip() == "transformer.py: error: nope.pt: no such checkpoint"


@pytest.mark.parametrize("mode", ["--sample", "--eval"])
def test_cli_foreign_checkpoints_are_one_line_errors(tmp_path, capsys, mode, one_line_error):
    torch.save({"state_dict": make_model().state_dict()}, str(tmp_path / "other.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    base = [mode, "--device", "cpu", *(["--text", __file__] if mode == "--eval" else [])]  # --sample reads no text
    assert "not a transformer.py checkpoint" in one_line_error([*base, "--ckpt", str(tmp_path / "other.pt")])
    assert "refused to load" in one_line_error([*base, "--ckpt", str(tmp_path / "text.pt")])
    assert "no such checkpoint" in one_line_error([*base, "--ckpt", str(tmp_path / "none.pt")])
    assert "needs --ckpt" in one_line_error([mode, "--device", "cpu"], status=2)


# -----------------------------------------------------------------------------
# The CLI: --eval


def test_cli_eval_text_perplexity_is_exp_of_the_mean_loss(trained, tmp_path, capsys):
    ckpt, _ = trained
    text = synthetic_text(1000, seed=42)  # 62 windows of 16 and a last one of 8 tokens
    (tmp_path / "t.txt").write_text(text)
    transformer.main(["--eval", "--ckpt", ckpt, "--text", str(tmp_path / "t.txt"), "--batch-size", "7",
                      "--device", "cpu"])
    loss, ppl, n = parse_eval(capsys.readouterr().out)
    expected = direct_mean_loss(load(ckpt), list(text.encode()))
    assert n == len(text) - 1
    assert loss == pytest.approx(expected, abs=6e-5)
    assert ppl == pytest.approx(math.exp(expected), abs=6e-4)
    assert expected < math.log(256) - 1  # the model has learned something: a meaningful number


def test_cli_eval_data_uses_the_whole_val_split(trained, capsys):
    ckpt, data = trained
    files = sorted(f for f in os.listdir(data) if f.startswith("val_"))
    assert len(files) == 3  # several shards, read in order as one stream
    val = np.concatenate([transformer.load_shard(os.path.join(data, f)) for f in files])
    transformer.main(["--eval", "--ckpt", ckpt, "--data", data, "--device", "cpu"])
    out = capsys.readouterr().out
    loss, ppl, n = parse_eval(out)
    assert "(val split)" in out
    assert n == len(val) - 1
    expected = direct_mean_loss(load(ckpt), val)
    assert loss == pytest.approx(expected, abs=6e-5)
    assert ppl == pytest.approx(math.exp(expected), abs=6e-4)


def test_evaluate_tokens_matches_the_direct_computation_for_any_length(trained):
    model = load(trained[0])
    rng = np.random.default_rng(0)
    for n in (2, 16, 17, 18, 33, 100):  # one token pair, exact multiples of T (+1), remainders
        tokens = rng.integers(0, 256, n)
        loss, count = transformer.evaluate_tokens(model, tokens, 3, torch.device("cpu"), torch.float32, progress=False)
        assert count == n - 1
        assert loss == pytest.approx(direct_mean_loss(model, tokens), abs=1e-5)


def test_cli_eval_without_text_or_data_and_with_a_one_token_text_are_one_line_errors(
    trained, tmp_path, capsys, one_line_error
):
    ckpt, _ = trained
    assert "--eval needs --data DIR" in one_line_error(["--eval", "--ckpt", ckpt, "--device", "cpu"])
    (tmp_path / "one.txt").write_text("x")
    line = one_line_error(["--eval", "--ckpt", ckpt, "--text", str(tmp_path / "one.txt"), "--device", "cpu"])
    assert "fewer than 2 tokens" in line
    line = one_line_error(["--eval", "--ckpt", ckpt, "--text", str(tmp_path / "none.txt"), "--device", "cpu"])
    assert "none.txt" in line
