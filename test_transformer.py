"""Specification of the model in transformer.py (sections 1-6): config, positions, attention, MLP, blocks,
GPT and loading HF GPT-2 / Llama checkpoints. Training, sampling and data have their own tests.

Everything is tiny (n_embd <= 64, <= 3 layers, small vocabularies) and offline: HF models are built with
random weights, every parameter perturbed (so a tensor that is silently not loaded shows), saved with
save_pretrained to a temporary folder and loaded back with GPT.from_pretrained.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import time

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers

import transformer
from transformer import ARCHS, GPT, GPTConfig, alibi_slopes, apply_rope, rope_cos_sin

ATOL_HF = 1e-4  # fp32 parity with transformers
ATOL_IMPL = 1e-5  # fp32 agreement of two code paths in this file


# -----------------------------------------------------------------------------
# Helpers


def tiny(arch="gpt2", **overrides):
    return GPTConfig.preset("tiny", arch, **overrides)


def perturb(model, scale=0.1, seed=0):
    """Add noise to every parameter, so that none keeps its (often 0 or 1) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def random_model(config, seed=0):
    """A GPT with all weights perturbed: sharp attention, non-trivial norms and biases."""
    torch.manual_seed(seed)
    return perturb(GPT(config), seed=seed).eval()


def tokens(vocab_size, B=2, T=16, seed=0):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


# Each architecture preset, then each single switch away from it.
OVERRIDES = [
    ("pos", "learned"), ("pos", "rope"), ("pos", "alibi"),
    ("norm", "layernorm"), ("norm", "rmsnorm"),
    ("mlp", "gelu"), ("mlp", "swiglu"), ("mlp", "relu2"), ("norm", "rmsnorm-noweight"),
    ("n_kv_head", 2), ("n_kv_head", 1),
    ("qk_norm", True), ("embed_norm", True), ("logit_softcap", 15.0), ("value_embeds", True), ("x0_lambdas", True),
]


def _variants():
    cases = [pytest.param(arch, {}, id=arch) for arch in ARCHS]
    for arch, preset in ARCHS.items():
        for field, value in OVERRIDES:
            if preset.get(field) != value:
                cases.append(pytest.param(arch, {field: value}, id=f"{arch}-{field}={value}"))
    return cases


VARIANTS = _variants()


# -----------------------------------------------------------------------------
# HF checkpoints, saved once per module


def save_hf(model, path):
    perturb(model.eval())
    model.save_pretrained(str(path))
    return model


GPT2_SHAPES = {
    "vocab1000": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=48),
    "n_inner-eps": dict(
        n_layer=3, n_head=2, n_embd=32, vocab_size=300, n_positions=20, n_inner=80, layer_norm_epsilon=1e-6
    ),
    "untied": dict(n_layer=2, n_head=4, n_embd=32, vocab_size=500, n_positions=32, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=list(GPT2_SHAPES), ids=list(GPT2_SHAPES))
def gpt2_checkpoint(request, tmp_path_factory):
    """(folder, the HF model saved there, its config kwargs)."""
    kw = GPT2_SHAPES[request.param]
    torch.manual_seed(0)
    config = transformers.GPT2Config(**kw, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp(f"gpt2-{request.param}")
    return path, save_hf(transformers.GPT2LMHeadModel(config), path), kw


LLAMA_SHAPES = {
    "gqa-tied-theta5e5": dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0
    ),
    "gqa-untied-head_dim8": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    "mqa-untied-theta5e5": dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0
    ),
}


ROPE_BASE = dict(  # Llama's and NanoChat's config.json share these names
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=None,
)


def llama_config(**kw):
    return transformers.LlamaConfig(**{**ROPE_BASE, **kw})


def saved_random(tmp_path_factory, name, model_class, config):
    """(folder, a random HF model of model_class saved there)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    return path, save_hf(model_class(config), path)


@pytest.fixture(scope="module", params=list(LLAMA_SHAPES), ids=list(LLAMA_SHAPES))
def llama_checkpoint(request, tmp_path_factory):
    kw = LLAMA_SHAPES[request.param]
    model_class, config = transformers.LlamaForCausalLM, llama_config(**kw)
    return *saved_random(tmp_path_factory, f"llama-{request.param}", model_class, config), kw


NANOCHAT_SHAPES = {
    "gqa-untied-cap15": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha-head_dim8-theta5e5-cap2": dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, rope_theta=500000.0, final_logit_softcapping=2.0
    ),  # a cap of 2 on logits of ~3: the soft-cap bends them
    "mqa-3layers-tied-nocap": dict(
        num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3, tie_word_embeddings=True,
        final_logit_softcapping=None,
    ),
}


def nanochat_config(**kw):
    return transformers.NanoChatConfig(**{**ROPE_BASE, **kw})


@pytest.fixture(scope="module", params=list(NANOCHAT_SHAPES), ids=list(NANOCHAT_SHAPES))
def nanochat_checkpoint(request, tmp_path_factory):
    kw = NANOCHAT_SHAPES[request.param]
    model_class, config = transformers.NanoChatForCausalLM, nanochat_config(**kw)
    return *saved_random(tmp_path_factory, f"nanochat-{request.param}", model_class, config), kw


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A small valid GPT-2 checkpoint folder to break in various ways (copy it first)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    path = tmp_path_factory.mktemp("gpt2-valid")
    save_hf(transformers.GPT2LMHeadModel(config), path)
    return path


def edit_weights(src, dst, edit):
    """Copy the checkpoint folder src to dst and apply edit(dict of tensors) to its safetensors file."""
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    sd = safetensors.torch.load_file(file)
    edit(sd)
    safetensors.torch.save_file(sd, file, metadata={"format": "pt"})
    return str(dst)


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


# -----------------------------------------------------------------------------
# Config


def test_preset_combines_size_arch_and_overrides():
    c = GPTConfig.preset("gpt2-medium", "llama", n_kv_head=4)
    assert (c.n_layer, c.n_head, c.n_embd, c.n_kv_head) == (24, 16, 1024, 4)
    assert (c.pos, c.norm, c.mlp, c.bias, c.tie_embeddings) == ("rope", "rmsnorm", "swiglu", False, False)


def test_config_defaults_fill_kv_heads_head_dim_and_mlp_width():
    c = GPTConfig(n_head=4, n_embd=64)
    assert (c.n_kv_head, c.head_dim, c.mlp_hidden) == (4, 16, 256)
    assert GPTConfig(n_head=4, n_embd=64, mlp="swiglu").mlp_hidden == 192  # ~8/3 * n_embd, a multiple of 64


@pytest.mark.parametrize(
    "field, value", [("pos", "sinusoidal"), ("norm", "batchnorm"), ("mlp", "relu"), ("attn_impl", "flash")]
)
def test_config_rejects_unknown_choice(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{field: value})


def test_config_rejects_n_head_not_a_multiple_of_n_kv_head():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=64)


def test_config_rejects_rope_with_odd_head_dim():
    with pytest.raises(ValueError, match="even"):
        GPTConfig(n_head=4, n_embd=36, head_dim=9, pos="rope")


@pytest.mark.parametrize("size, arch", [("gpt5", "gpt2"), ("tiny", "mamba")])
def test_preset_rejects_unknown_size_or_arch(size, arch):
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig.preset(size, arch)


@pytest.mark.parametrize("cap", [0.0, -15.0, float("nan")])
def test_config_rejects_a_soft_cap_that_is_not_positive(cap):
    with pytest.raises(ValueError, match="logit_softcap"):
        GPTConfig(logit_softcap=cap)


NEW_FIELDS = ("embed_norm", "qk_norm", "logit_softcap", "zero_init_proj", "value_embeds", "x0_lambdas")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "olmo"])
def test_a_checkpoint_config_from_before_the_switches_loads_and_resumes_as_the_same_model(arch):
    """A checkpoint written before the switches existed stores a config without them: it reads as the model it
    was (every switch off), and --resume with the same flags accepts it."""
    config = tiny(arch)
    old = {k: v for k, v in dataclasses.asdict(config).items() if k not in NEW_FIELDS}
    assert GPTConfig(**old) == config
    assert config.architecture().keys() >= set(NEW_FIELDS)
    ckpt = {"config": old, "tokenizer": "byte", "args": {"optimizer": "adamw"}}
    transformer.check_resumable(ckpt, config, "adamw", {"tokenizer": "byte"}, "ckpt.pt")  # no error
    with pytest.raises(ValueError, match="qk_norm=False \\(now True\\)"):
        transformer.check_resumable(ckpt, tiny(arch, qk_norm=True), "adamw", {"tokenizer": "byte"}, "ckpt.pt")


# -----------------------------------------------------------------------------
# Model: logits and loss, weight tying, parameter counts


def test_forward_returns_logits_for_every_position_and_no_loss_without_targets():
    model = random_model(tiny("llama"))
    logits, loss = model(tokens(256, B=3, T=10))
    assert logits.shape == (3, 10, 256)
    assert loss is None


def test_loss_is_mean_cross_entropy_against_targets():
    model = random_model(tiny("gpt2"))
    idx, targets = tokens(256, B=2, T=12, seed=1), tokens(256, B=2, T=12, seed=2)
    logits, loss = model(idx, targets)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, 256), targets.view(-1)).item(), abs=1e-6)


def test_target_minus_one_is_ignored():
    model = random_model(tiny("gpt2"))
    idx, targets = tokens(256, B=2, T=12, seed=1), tokens(256, B=2, T=12, seed=2)
    keep = torch.rand(2, 12, generator=torch.Generator().manual_seed(3)) > 0.4
    logits, loss = model(idx, targets.masked_fill(~keep, -1))
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("arch, tied", [("gpt2", True), ("llama", False), ("olmo", True)])
def test_lm_head_is_tied_to_token_embedding_as_the_preset_says(arch, tied):
    model = GPT(tiny(arch))
    assert (model.lm_head.weight is model.transformer.wte.weight) is tied
    n_wte = model.transformer.wte.weight.numel()
    assert model.num_params() == sum(p.numel() for p in model.state_dict().values()) - (n_wte if tied else 0)


@pytest.mark.parametrize("size", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_parameter_count_of_size_preset_equals_hf_gpt2(size):
    c = GPTConfig.preset(size, "gpt2")
    with torch.device("meta"):
        ours = GPT(c)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
    assert ours.num_params() == hf.num_parameters()


def test_gpt2_preset_has_124_439_808_parameters():
    with torch.device("meta"):
        assert GPT(GPTConfig.preset("gpt2", "gpt2")).num_params() == 124_439_808


def test_learned_positions_refuse_a_sequence_longer_than_block_size():
    model = GPT(tiny("gpt2"))
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(256, B=1, T=65))


# -----------------------------------------------------------------------------
# Attention: the SDPA and explicit paths, causality, grouped-query attention, dtypes, dropout


@pytest.mark.parametrize("arch, overrides", VARIANTS)
def test_sdpa_path_equals_explicit_path(arch, overrides):
    sdpa = random_model(tiny(arch, **overrides))
    explicit = GPT(dataclasses.replace(sdpa.config, attn_impl="explicit")).eval()
    explicit.load_state_dict(sdpa.state_dict())
    idx = tokens(256, B=2, T=24)
    assert max_diff(our_logits(sdpa, idx), our_logits(explicit, idx)) <= ATOL_IMPL


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("arch, overrides", VARIANTS)
def test_changing_token_t_changes_no_logits_before_t(arch, overrides, attn_impl):
    model = random_model(tiny(arch, attn_impl=attn_impl, **overrides))
    T = 12
    base = tokens(256, B=1, T=T)
    changed = base.repeat(T, 1)  # row t: token t replaced
    rows = torch.arange(T)
    changed[rows, rows] = (changed[rows, rows] + 1) % 256
    ref, out = our_logits(model, base)[0], our_logits(model, changed)
    for t in range(T):
        assert torch.allclose(out[t, :t], ref[:t], rtol=0, atol=1e-6), f"token {t} changed logits before it"
        assert max_diff(out[t, t], ref[t]) > 1e-3  # while it does change its own position


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("arch, overrides", VARIANTS)
def test_logits_of_a_prefix_alone_equal_its_logits_inside_the_sequence(arch, overrides, attn_impl):
    model = random_model(tiny(arch, attn_impl=attn_impl, **overrides))
    idx = tokens(256, B=2, T=12)
    full = our_logits(model, idx)
    for k in (1, 5):  # k = 1: a single token, where no mask is needed
        assert max_diff(our_logits(model, idx[:, :k]), full[:, :k]) <= ATOL_IMPL


def test_multi_query_attention_has_one_kv_head():
    config = tiny("llama", n_kv_head=1)
    model = random_model(config)
    for block in model.transformer.h:
        assert block.attn.c_attn.out_features == (config.n_head + 2) * config.head_dim
    logits, loss = model(tokens(256), tokens(256, seed=1))
    assert logits.isfinite().all() and loss.isfinite()


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_grouped_query_attention_equals_full_attention_with_shared_kv_heads(attn_impl):
    """Query head h reads key/value head h // (n_head / n_kv_head): consecutive query heads share one."""
    gqa = random_model(tiny("llama", n_kv_head=2, attn_impl=attn_impl))
    full = GPT(dataclasses.replace(gqa.config, n_kv_head=4)).eval()
    sd, hd, nh = gqa.state_dict(), gqa.config.head_dim, gqa.config.n_head
    for i in range(gqa.config.n_layer):
        key = f"transformer.h.{i}.attn.c_attn.weight"
        q, k, v = sd[key].split([nh * hd, 2 * hd, 2 * hd])
        k, v = (w.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(nh * hd, -1) for w in (k, v))
        sd[key] = torch.cat([q, k, v])
    full.load_state_dict(sd)
    idx = tokens(256)
    assert max_diff(our_logits(gqa, idx), our_logits(full, idx)) <= ATOL_IMPL


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_bfloat16_model_runs_on_both_attention_paths(arch, attn_impl):
    """A model cast to bf16 computes in bf16 and stays close to its fp32 self (ALiBi's float mask included)."""
    model = random_model(tiny(arch, attn_impl=attn_impl))
    idx = tokens(256)
    ref = our_logits(model, idx)
    low = our_logits(model.to(torch.bfloat16), idx)
    assert low.dtype == (torch.float32 if model.config.logit_softcap else torch.bfloat16)  # the soft-cap: in fp32
    assert max_diff(low.float(), ref) <= 0.15  # logits are ~3 in size; bf16 keeps ~3 significant digits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    model = random_model(tiny(arch)).train()
    x, y = tokens(256, seed=1), tokens(256, seed=2)

    def grads(checkpointing):
        model.zero_grad()
        model.grad_checkpointing = checkpointing
        model(x, y)[1].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    assert all(max_diff(plain[n], recomputed[n]) <= ATOL_IMPL for n in plain)


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_dropout_acts_in_training_only(attn_impl):
    model = random_model(tiny("olmo", dropout=0.5, attn_impl=attn_impl))
    no_dropout = GPT(dataclasses.replace(model.config, dropout=0.0)).eval()
    no_dropout.load_state_dict(model.state_dict())
    idx = tokens(256)
    assert torch.equal(our_logits(model, idx), our_logits(no_dropout, idx))  # eval: dropout off
    model.train()
    assert max_diff(our_logits(model, idx), our_logits(model, idx)) > 1e-2  # train: a new mask each call


# -----------------------------------------------------------------------------
# Positions: RoPE and ALiBi


def test_rope_score_depends_only_on_distance():
    hd = 16
    cos, sin = rope_cos_sin(hd, torch.arange(64), 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd, generator=g), torch.randn(1, 1, 1, hd, generator=g)

    def score(m, n):  # q at position m, k at position n
        return (
            (apply_rope(q, cos[m : m + 1], sin[m : m + 1]) * apply_rope(k, cos[n : n + 1], sin[n : n + 1])).sum().item()
        )

    for d in (0, 3, 17):
        scores = [score(n + d, n) for n in (0, 5, 40)]
        assert max(scores) - min(scores) <= 1e-5
    assert abs(score(3, 0) - score(17, 0)) > 1e-3  # and the distance does matter


def test_rope_rotation_preserves_norm():
    cos, sin = rope_cos_sin(16, torch.arange(32), 10000.0)
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    assert max_diff(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1)) <= 1e-5


def test_rope_tables_and_rotation_match_hf_llama():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = llama_config(head_dim=16, rope_theta=500000.0)
    x = torch.randn(1, 4, 40, 16, generator=torch.Generator().manual_seed(0))
    hf_cos, hf_sin = LlamaRotaryEmbedding(config=config)(x, torch.arange(40)[None])
    cos, sin = rope_cos_sin(16, torch.arange(40), 500000.0)
    assert max_diff(cos, hf_cos[0]) <= 1e-6 and max_diff(sin, hf_sin[0]) <= 1e-6
    hf_q, _ = apply_rotary_pos_emb(x, x, hf_cos, hf_sin)
    assert max_diff(apply_rope(x, cos, sin), hf_q) <= 1e-6


def test_alibi_slopes_for_8_heads_are_the_papers_geometric_series():
    expected = [2 ** (-8 * i / 8) for i in range(1, 9)]  # 1/2, 1/4, ..., 1/256
    assert alibi_slopes(8).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == 0.5 and expected[-1] == 1 / 256


def test_alibi_slopes_for_12_heads_take_every_other_slope_of_16_heads():
    slopes_8 = [2 ** (-i) for i in range(1, 9)]
    slopes_16 = [2 ** (-i / 2) for i in range(1, 17)]
    expected = slopes_8 + slopes_16[0::2][:4]  # 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    assert alibi_slopes(12).tolist() == pytest.approx(expected, rel=1e-6)


def test_alibi_attention_matches_a_reference_written_from_the_paper():
    """One OLMo block computed by hand: head h scores q·k/sqrt(hd) - slope_h * (i - j), causal."""
    config = tiny("olmo", n_layer=1)
    model = random_model(config)
    sd, C, nh, hd = model.state_dict(), config.n_embd, config.n_head, config.head_dim
    idx = tokens(256, B=2, T=10)
    T = idx.size(1)

    def norm(x, name):
        return F.layer_norm(x, (C,), sd[name + ".weight"], None, config.norm_eps)

    x = sd["transformer.wte.weight"][idx]
    q, k, v = (norm(x, "transformer.h.0.ln_1") @ sd["transformer.h.0.attn.c_attn.weight"].T).split(C, dim=-1)
    q, k, v = (t.view(2, T, nh, hd).transpose(1, 2) for t in (q, k, v))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    slopes = torch.tensor([2 ** (-8 * (h + 1) / nh) for h in range(nh)]).view(nh, 1, 1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd) - slopes * (i - j)
    att = scores.masked_fill(j > i, float("-inf")).softmax(-1)
    x = x + (att @ v).transpose(1, 2).reshape(2, T, C) @ sd["transformer.h.0.attn.c_proj.weight"].T
    gate, up = (norm(x, "transformer.h.0.ln_2") @ sd["transformer.h.0.mlp.c_fc.weight"].T).chunk(2, dim=-1)
    x = x + (F.silu(gate) * up) @ sd["transformer.h.0.mlp.c_proj.weight"].T
    expected = norm(x, "transformer.ln_f") @ sd["lm_head.weight"].T
    assert max_diff(our_logits(model, idx), expected) <= ATOL_IMPL


@pytest.mark.parametrize("pos", ["alibi", "rope"])
def test_relative_positions_evaluate_at_twice_the_training_length(pos):
    model = random_model(tiny("olmo", pos=pos))
    T = 2 * model.config.block_size
    logits, loss = model(tokens(256, B=1, T=T), tokens(256, B=1, T=T, seed=1))
    assert logits.shape == (1, T, 256) and loss.isfinite()


def test_learned_positions_cannot_evaluate_at_twice_the_training_length():
    model = random_model(tiny("gpt2"))
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(256, B=1, T=2 * model.config.block_size))


# -----------------------------------------------------------------------------
# The switches: each changes what it should and nothing else


def same_seed_pair(arch, **switch):
    """The preset's model and the one with the switch, both initialised from seed 0 (unperturbed)."""
    torch.manual_seed(0)
    base = GPT(tiny(arch)).eval()
    torch.manual_seed(0)
    return base, GPT(tiny(arch, **switch)).eval()


@pytest.mark.parametrize("arch, switch, added, removed", [
    ("llama", dict(qk_norm=True), set(), set()),
    ("llama", dict(logit_softcap=1.0), set(), set()),
    ("gpt2", dict(mlp="relu2"), set(), set()),
    ("llama", dict(embed_norm=True), {"transformer.ln_emb.weight"}, set()),
    ("llama", dict(norm="rmsnorm-noweight"), set(),
     {"transformer.ln_f.weight"} | {f"transformer.h.{i}.ln_{j}.weight" for i in range(2) for j in (1, 2)}),
], ids=["qk_norm", "logit_softcap", "relu2", "embed_norm", "rmsnorm-noweight"])
def test_a_switch_draws_the_same_weights_and_changes_the_logits(arch, switch, added, removed):
    """With one seed, a switch adds or removes only its own weights; every other weight is drawn the same."""
    base, switched = same_seed_pair(arch, **switch)
    a, b = base.state_dict(), switched.state_dict()
    assert (b.keys() - a.keys(), a.keys() - b.keys()) == (added, removed)
    assert all(torch.equal(a[k], b[k]) for k in a.keys() & b.keys())
    perturb(base), perturb(switched)
    idx = tokens(256)
    assert max_diff(our_logits(base, idx), our_logits(switched, idx)) > 1e-3


def test_a_weightless_rmsnorm_computes_what_a_fresh_rmsnorm_does():
    """A fresh RMSNorm's weight is all ones: with the same seed, the weightless model gives the same logits."""
    base, switched = same_seed_pair("llama", norm="rmsnorm-noweight")
    assert torch.equal(our_logits(base, tokens(256)), our_logits(switched, tokens(256)))


def test_zero_init_proj_zeroes_only_the_output_projections_and_starts_as_a_bigram_model():
    base, switched = same_seed_pair("llama", zero_init_proj=True)
    a, b = base.state_dict(), switched.state_dict()
    assert all(not b[k].any() if k.endswith("c_proj.weight") else torch.equal(a[k], b[k]) for k in a)
    idx = tokens(256)
    changed = idx.clone()
    changed[:, :-1] = (changed[:, :-1] + 1) % 256  # every token but the last
    assert torch.equal(our_logits(switched, idx)[:, -1], our_logits(switched, changed)[:, -1])  # the last alone


def test_logit_softcap_is_cap_times_tanh_of_the_uncapped_logits():
    model = random_model(tiny("llama"))
    capped = GPT.from_state_dict(tiny("llama", logit_softcap=2.0), model.state_dict(), "test").eval()
    idx = tokens(256)
    raw = our_logits(model, idx)
    assert raw.abs().max() > 2  # the cap bends them
    assert max_diff(our_logits(capped, idx), 2.0 * torch.tanh(raw / 2.0)) <= ATOL_IMPL


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    """q and k are divided by their RMS: scaling their weights changes nothing (but for the norm's eps); without
    QK-norm, the scores sharpen."""
    diffs = {}
    for qk_norm in (True, False):
        model = random_model(tiny("llama", qk_norm=qk_norm))
        idx = tokens(256)
        before = our_logits(model, idx)
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[: 2 * 64] *= 10  # the q and k rows (4 heads x 16, n_kv_head = n_head)
        diffs[qk_norm] = max_diff(our_logits(model, idx), before)
    assert diffs[True] <= ATOL_HF and diffs[False] > 0.1


def test_embed_norm_makes_the_model_blind_to_the_scale_of_the_embedding():
    """nanochat's norm after the embedding: with an untied head, scaling the embedding table changes nothing."""
    model = random_model(tiny("nanochat", norm_eps=1e-12))  # the eps alone would see the scale
    idx = tokens(256)
    before = our_logits(model, idx)
    with torch.no_grad():
        model.transformer.wte.weight *= 10
    assert max_diff(our_logits(model, idx), before) <= ATOL_IMPL


def test_relu2_mlp_is_the_square_of_a_relu():
    model = random_model(tiny("gpt2", mlp="relu2"))
    mlp, x = model.transformer.h[0].mlp, torch.randn(2, 5, 64)
    with torch.no_grad():
        assert max_diff(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2)) <= ATOL_IMPL


def test_nanochat_preset_sets_every_switch():
    c = tiny("nanochat")
    assert (c.pos, c.norm, c.mlp, c.bias, c.tie_embeddings) == ("rope", "rmsnorm-noweight", "relu2", False, False)
    assert (c.embed_norm, c.qk_norm, c.logit_softcap, c.zero_init_proj, c.norm_eps) == (True, True, 15.0, True, 1e-6)
    assert c.mlp_hidden == 4 * c.n_embd
    assert not any(name.startswith("transformer.h.") and "ln_" in name for name, _ in GPT(c).named_parameters())


# nanochat's current model: value embeddings and x0 lambdas, by their invariants


def without(model, *fields):
    """model's weights in the model whose config has fields off: the tensors only they add left out."""
    config = dataclasses.replace(model.config, **dict.fromkeys(fields, False))
    keys = GPT(config).state_dict().keys()
    return GPT.from_state_dict(config, {k: v for k, v in model.state_dict().items() if k in keys}, "test").eval()


@pytest.mark.parametrize("n_layer, layers", [(3, ["0", "2"]), (4, ["1", "3"])])
def test_value_embeddings_sit_in_every_other_layer_the_last_included(n_layer, layers):
    model = GPT(tiny("nanochat", n_layer=n_layer, n_kv_head=2, value_embeds=True))
    assert list(model.transformer.ve) == layers
    assert model.transformer.ve[layers[0]].weight.shape == (256, 2 * 16)  # (vocab, nkv * hd)
    assert [str(i) for i, b in enumerate(model.transformer.h) if b.attn.ve_gate is not None] == layers


def test_zeroed_value_embeddings_compute_the_model_without_them():
    model = random_model(tiny("nanochat", n_kv_head=2, value_embeds=True))
    idx = tokens(256)
    with_them = our_logits(model, idx)
    with torch.no_grad():
        for table in model.transformer.ve.values():
            table.weight.zero_()
    assert max_diff(our_logits(model, idx), our_logits(without(model, "value_embeds"), idx)) <= ATOL_IMPL
    assert max_diff(our_logits(model, idx), with_them) > 1e-3  # and they did act


def test_x0_lambdas_at_their_start_compute_the_model_without_them():
    model = random_model(tiny("nanochat", x0_lambdas=True))
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0), model.x0_lambdas.zero_()
    assert torch.equal(GPT(tiny("nanochat", x0_lambdas=True)).x0_lambdas, torch.zeros(2))  # where they start
    idx = tokens(256)
    assert max_diff(our_logits(model, idx), our_logits(without(model, "x0_lambdas"), idx)) <= ATOL_IMPL


def test_the_first_block_reads_x0_itself_so_only_the_sum_of_its_lambdas_counts():
    """In front of the first block the stream is x0: resid_lambdas[0] * x0 + x0_lambdas[0] * x0. A later block's
    x0_lambda mixes in something the stream no longer is."""
    model = random_model(tiny("nanochat", x0_lambdas=True))
    idx = tokens(256)
    before = our_logits(model, idx)
    with torch.no_grad():
        model.resid_lambdas[0] += model.x0_lambdas[0]
        model.x0_lambdas[0] = 0.0
    assert max_diff(our_logits(model, idx), before) <= ATOL_IMPL
    with torch.no_grad():
        model.x0_lambdas[1] += 0.5
    assert max_diff(our_logits(model, idx), before) > 1e-3


# -----------------------------------------------------------------------------
# Every variant learns


@pytest.mark.parametrize("arch, overrides", VARIANTS)
def test_tiny_model_overfits_one_batch(arch, overrides):
    torch.manual_seed(0)
    model = GPT(tiny(arch, **overrides))
    x, y = tokens(256, B=4, T=16, seed=1), tokens(256, B=4, T=16, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model(x, y)[1].item()
    for _ in range(30):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model(x, y)[1].item() < 0.1 * first  # ~ln(256) = 5.5 at the start; < 0.1 after 30 steps in practice


# -----------------------------------------------------------------------------
# from_pretrained: HF GPT-2


def test_gpt2_checkpoint_config_is_read(gpt2_checkpoint):
    path, hf, kw = gpt2_checkpoint
    c = GPT.from_pretrained(str(path)).config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (
        kw["n_layer"],
        kw["n_head"],
        kw["n_embd"],
        kw["vocab_size"],
        kw["n_positions"],
    )
    assert c.mlp_hidden == (kw.get("n_inner") or 4 * kw["n_embd"])
    assert c.norm_eps == kw.get("layer_norm_epsilon", 1e-5)
    assert c.tie_embeddings == kw.get("tie_word_embeddings", True)


def test_gpt2_logits_match_hf(gpt2_checkpoint):
    path, hf, kw = gpt2_checkpoint
    ours = GPT.from_pretrained(str(path)).eval()
    idx = tokens(kw["vocab_size"], B=2, T=kw["n_positions"])
    assert max_diff(our_logits(ours, idx), hf_logits(hf, idx)) <= ATOL_HF


def test_gpt2_loss_matches_hf(gpt2_checkpoint):
    """HF shifts the labels itself; ours takes targets already shifted."""
    path, hf, kw = gpt2_checkpoint
    ours = GPT.from_pretrained(str(path)).eval()
    idx = tokens(kw["vocab_size"], B=2, T=kw["n_positions"], seed=1)
    with torch.no_grad():
        expected = hf(idx, labels=idx).loss
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_gpt2_checkpoint_ties_lm_head_as_its_config_says(gpt2_checkpoint):
    path, hf, kw = gpt2_checkpoint
    model = GPT.from_pretrained(str(path))
    assert (model.lm_head.weight is model.transformer.wte.weight) == kw.get("tie_word_embeddings", True)


# -----------------------------------------------------------------------------
# from_pretrained: HF Llama


def test_llama_checkpoint_config_is_read(llama_checkpoint):
    path, hf, kw = llama_checkpoint
    c = GPT.from_pretrained(str(path)).config
    assert (c.pos, c.norm, c.mlp, c.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert (c.n_head, c.n_kv_head, c.head_dim) == (
        hf.config.num_attention_heads,
        hf.config.num_key_value_heads,
        hf.config.head_dim,
    )
    assert c.rope_theta == kw.get("rope_theta", 10000.0)
    assert c.tie_embeddings == kw["tie_word_embeddings"]
    assert (c.mlp_hidden, c.norm_eps) == (96, 1e-6)


def test_llama_checkpoint_ties_lm_head_as_its_config_says(llama_checkpoint):
    path, hf, kw = llama_checkpoint
    model = GPT.from_pretrained(str(path))
    assert (model.lm_head.weight is model.transformer.wte.weight) == kw["tie_word_embeddings"]


def assert_logits_match_hf(path, hf):
    ours = GPT.from_pretrained(str(path)).eval()
    idx = tokens(300, B=2, T=40)
    assert max_diff(our_logits(ours, idx), hf_logits(hf, idx)) <= ATOL_HF


def assert_loss_matches_hf(path, hf):
    """HF shifts the labels itself; ours takes targets already shifted."""
    ours = GPT.from_pretrained(str(path)).eval()
    idx = tokens(300, B=2, T=40, seed=1)
    with torch.no_grad():
        expected = hf(idx, labels=idx).loss
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_llama_logits_match_hf(llama_checkpoint):
    assert_logits_match_hf(*llama_checkpoint[:2])


def test_llama_loss_matches_hf(llama_checkpoint):
    assert_loss_matches_hf(*llama_checkpoint[:2])


@pytest.mark.parametrize("rope_parameters", ["absent", "rope_type only"])
def test_llama_rope_theta_at_the_top_level_of_config_json_is_used(tmp_path, rope_parameters):
    """Older config.json files keep rope_theta at the top level (and rope_scaling: null)."""
    torch.manual_seed(0)
    hf = save_hf(transformers.LlamaForCausalLM(llama_config(num_key_value_heads=2, rope_theta=500000.0)), tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config.pop("rope_parameters", None)
    config.update(rope_theta=500000.0, rope_scaling=None)
    if rope_parameters == "rope_type only":
        config["rope_parameters"] = {"rope_type": "default"}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.rope_theta == 500000.0
    idx = tokens(300, B=1, T=48)
    assert max_diff(our_logits(ours, idx), hf_logits(hf, idx)) <= ATOL_HF


@pytest.mark.parametrize(
    "scaling",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ],
    ids=["llama3", "yarn"],
)
def test_llama_rope_scaling_is_refused(tmp_path, scaling):
    torch.manual_seed(0)
    save_hf(transformers.LlamaForCausalLM(llama_config(rope_theta=500000.0, rope_scaling=scaling)), tmp_path)
    with pytest.raises(ValueError, match=scaling["rope_type"]):
        GPT.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# from_pretrained: HF NanoChat


def test_nanochat_checkpoint_config_is_read(nanochat_checkpoint):
    path, hf, kw = nanochat_checkpoint
    c = GPT.from_pretrained(str(path)).config
    assert c.architecture() == GPTConfig.preset("gpt2", "nanochat", **dict(
        n_layer=kw.get("num_hidden_layers", 2), n_head=kw["num_attention_heads"], n_embd=64,
        n_kv_head=kw["num_key_value_heads"], head_dim=kw.get("head_dim"), vocab_size=300, block_size=64, mlp_hidden=96,
        rope_theta=kw.get("rope_theta", 10000.0), tie_embeddings=kw.get("tie_word_embeddings", False),
        logit_softcap=kw.get("final_logit_softcapping", 15.0))).architecture()


def test_nanochat_logits_match_hf(nanochat_checkpoint):
    assert_logits_match_hf(*nanochat_checkpoint[:2])


def test_nanochat_loss_matches_hf(nanochat_checkpoint):
    assert_loss_matches_hf(*nanochat_checkpoint[:2])


def test_nanochat_greedy_tokens_with_the_kv_cache_match_hf(nanochat_checkpoint):
    path, hf, kw = nanochat_checkpoint
    ours = GPT.from_pretrained(str(path)).eval()
    prompt = tokens(300, B=1, T=5, seed=2)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert transformer.generate(ours, prompt, 20, temperature=0).tolist() == expected.tolist()


@pytest.mark.parametrize(
    "variant, named",
    [
        (dict(hidden_act="gelu"), "NanoChat activation 'gelu'"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "'linear'"),
        (dict(final_logit_softcapping=0.0), "logit_softcap=0.0"),
    ],
    ids=["gelu", "attention_bias", "rope-linear", "softcap0"],
)
def test_nanochat_variant_that_would_not_match_is_refused(tmp_path, variant, named):
    torch.manual_seed(0)
    save_hf(transformers.NanoChatForCausalLM(nanochat_config(num_hidden_layers=1, **variant)), tmp_path)
    with pytest.raises(ValueError, match=re.escape(named)):
        GPT.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# from_pretrained: what it refuses


def test_from_pretrained_of_a_missing_path_raises_value_error_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    t0 = time.perf_counter()
    for name in (str(tmp_path / "no-such-dir"), "nobody-here/no-such-model"):
        with pytest.raises(ValueError, match="neither a local directory"):
            GPT.from_pretrained(name)
    assert time.perf_counter() - t0 < 10


def test_from_pretrained_refuses_an_unsupported_model_type(tmp_path):
    transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="'bert' is not supported"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_refuses_a_missing_tensor(gpt2_dir, tmp_path):
    path = edit_weights(gpt2_dir, tmp_path / "ckpt", lambda sd: sd.pop("transformer.h.0.ln_2.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['transformer.h.0.ln_2.bias'\]"):
        GPT.from_pretrained(path)


def test_from_pretrained_refuses_an_unexpected_tensor(gpt2_dir, tmp_path):
    path = edit_weights(
        gpt2_dir, tmp_path / "ckpt", lambda sd: sd.update({"transformer.h.0.attn.q_norm.weight": torch.ones(16)})
    )
    with pytest.raises(ValueError, match=r"unexpected tensors \['transformer.h.0.attn.q_norm.weight'\]"):
        GPT.from_pretrained(path)


def test_from_pretrained_refuses_a_tensor_of_the_wrong_shape(gpt2_dir, tmp_path):
    path = edit_weights(
        gpt2_dir, tmp_path / "ckpt", lambda sd: sd.update({"transformer.wpe.weight": torch.zeros(17, 16)})
    )
    with pytest.raises(ValueError, match=r"positions.weight has shape \(17, 16\), expected \(16, 16\)"):
        GPT.from_pretrained(path)


def test_from_pretrained_loads_the_untouched_checkpoint_used_above(gpt2_dir):
    """The folder the three tests above break is itself valid."""
    assert GPT.from_pretrained(str(gpt2_dir)).config.n_embd == 16


def test_gpt2_checkpoint_in_the_original_hub_layout_loads(gpt2_dir, tmp_path):
    """openai-community/gpt2's files name tensors without 'transformer.' and store the causal mask as attn.bias."""

    def to_hub_layout(sd):
        for k in list(sd):
            sd[k.removeprefix("transformer.")] = sd.pop(k)
        sd["h.0.attn.bias"] = torch.ones(16, 16).tril().view(1, 1, 16, 16)
        sd["h.0.attn.masked_bias"] = torch.tensor(-1e4)

    path = edit_weights(gpt2_dir, tmp_path / "ckpt", to_hub_layout)
    idx = tokens(64, T=16)
    assert torch.equal(our_logits(GPT.from_pretrained(path), idx), our_logits(GPT.from_pretrained(str(gpt2_dir)), idx))


def test_pytorch_model_bin_checkpoint_loads(gpt2_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(gpt2_dir, path)
    torch.save(safetensors.torch.load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    os.remove(path / "model.safetensors")
    idx = tokens(64, T=16)
    assert torch.equal(
        our_logits(GPT.from_pretrained(str(path)), idx), our_logits(GPT.from_pretrained(str(gpt2_dir)), idx)
    )


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    hf = perturb(transformers.LlamaForCausalLM(llama_config(num_key_value_heads=2))).eval()
    hf.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    idx = tokens(300, T=20)
    assert max_diff(our_logits(GPT.from_pretrained(str(tmp_path)), idx), hf_logits(hf, idx)) <= ATOL_HF


@pytest.mark.parametrize(
    "variant",
    [
        dict(activation_function="relu"),
        dict(scale_attn_weights=False),  # scores not divided by sqrt(head_dim)
        dict(scale_attn_by_inverse_layer_idx=True),
        dict(reorder_and_upcast_attn=True),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_gpt2_variant_that_would_not_match_is_refused(tmp_path, variant):
    """A GPT-2 checkpoint either loads with HF's logits or is refused: never loaded as something else."""
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0, **variant
    )
    save_hf(transformers.GPT2LMHeadModel(config), tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "variant",
    [dict(hidden_act="gelu"), dict(attention_bias=True), dict(mlp_bias=True)],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_llama_variant_that_would_not_match_is_refused(tmp_path, variant):
    torch.manual_seed(0)
    save_hf(transformers.LlamaForCausalLM(llama_config(num_hidden_layers=1, **variant)), tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        GPT.from_pretrained(str(tmp_path))


def test_readme_architecture_table_names_exist_in_transformer_py():
    """The architecture table (docs/model.md) points into transformer.py by name (`Positions`, `make_norm`, ...):
    every name it gives must be defined there, so the reading guide cannot drift from the code."""
    repo = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(repo, "docs", "model.md")) as f:
        rows = [
            line
            for line in f
            if line.startswith("| `--") or line.startswith("| biases") or line.startswith("| lm_head")
        ]
    with open(os.path.join(repo, "transformer.py")) as f:
        source = f.read()
    names = [name for row in rows for name in re.findall(r"`([A-Za-z_][\w.]*)`", row.rsplit("|", 2)[-2])]
    assert len(names) >= 10
    for name in names:
        assert re.search(rf"\b(def|class) {name.split('.')[-1]}\b|\b{re.escape(name.split('.')[-1])}\s*[=(]", source), (
            name
        )


def test_the_readme_python_example_runs(capsys):
    """The 'From Python' block of docs/model.md is run as it is written (test_docs.py runs every block; this one
    checks what it prints)."""
    repo = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(repo, "docs", "model.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
    assert blocks, "docs/model.md has no python example"
    for block in blocks:
        exec(compile(block, "docs/model.md", "exec"), {})
    assert len(capsys.readouterr().out.splitlines()) >= 6  # the sample, then five streamed tokens
