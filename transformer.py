"""
transformer.py: a GPT you can read top to bottom, train on a CPU, a GPU or many, and sample from.

    python transformer.py                          # prepare tiny Shakespeare, train, save, print a sample
    python transformer.py --sample --ckpt checkpoints/ckpt.pt --prompt "ROMEO:"
    python transformer.py --eval --ckpt checkpoints/ckpt.pt --data data/shakespeare_bpe1024
    python transformer.py --export-hf out/hf --export-gguf out/model.gguf --ckpt checkpoints/ckpt.pt
    torchrun --standalone --nproc_per_node=8 transformer.py --data data/fineweb --arch gpt2 ...

The file is a story, in this order:
    1. Config       GPTConfig: sizes (tiny ... gpt2-xl), architectures (gpt2, llama, olmo, nanochat), RECIPE
    2. Positions    learned, RoPE or ALiBi, decided in one place (Positions), and the attention mask
    3. Attention    causal self-attention: PyTorch's fused SDPA kernel beside an explicit reference path
    4. MLP          GELU (GPT-2), SwiGLU (LLaMA) or ReLU² (nanochat)
    5. Block        pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))
    6. Model        GPT: embeddings, blocks, tied head; init; forward; from_pretrained
    7. Data         DataLoaderLite over token shards of any vocabulary (shards.py); bits per byte
    8. Processes    device and dtype, the model wrapped for DDP or FSDP
    9. Checkpoints  what a checkpoint holds, and how a run resumes from one
   10. Evaluation   the val loss the loop logs, perplexity over a whole text, HellaSwag accuracy
   11. Training     AdamW (or Muon), the lr schedule, and the loop: step, log, evaluate, save
   12. Generation   the KV cache, sampling, the generation loop, the compiled decode step
   13. Commands     train, sample, eval, export
   14. CLI          argparse (each default from RECIPE or a preset) and main()
Beside it, companion files hold what the story does not need first; they never import this file:
    checkpoint.py   saving, finding and loading checkpoints: ckpt.pt and sharded step folders
    convert.py      HF transformers and GGUF (llama.cpp): weights, configs, tokenizer files; the exports
    distributed.py  the processes: device, rank, process group, stop signals, DDP/FSDP wrapping, RNG states
    fsdp.py         --fsdp: sharding the model over processes, gathering and scattering its state
    hellaswag.py    the HellaSwag benchmark: read, render, score
    metrics.py      MFU, the lines a run prints, metrics.jsonl, loss.png
    optimizers.py   Muon and AdamW stepped as one
    files.py        files that are whole or absent: atomic writes, downloads; prompts typed on stdin
    flagtypes.py    argparse types that check every value; which flags each command reads, which must agree
    tokenizer.py    text to ids and back: bytes, tiktoken, HF tokenizers, a BPE trained on the data
    shards.py       the token shard format (ours and llm.c's), a dataset's meta.json, the default run's data
"""

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import convert
import hellaswag
from checkpoint import CKPT_FORMAT, Checkpoints, Unreadable, find_checkpoints, load_checkpoint, read_state, trained_args
from distributed import Distributed, StopSignal, pick_device, rng_state, seed_rng, synchronize, wrap_model
from files import typed_prompts
from flagtypes import ARCH_FLAGS, RESUMED, ArgumentParser, at_least, check_flags, command, device_name, in_range
from metrics import MetricsLog, log_line, mfu, peak_flops, plot_run, run_summary
from optimizers import Optimizers
from shards import DEFAULT_DATA, find_shards, load_shard, prepare_default_data, read_meta
from tokenizer import TokenizerUnavailable, get_tokenizer

# -----------------------------------------------------------------------------
# 1. Config
# A GPT is fixed by a handful of numbers (depth, width, heads, context, vocab) plus
# a few architectural choices. GPT-2, LLaMA and OLMo differ only in those choices.


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length T
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # < n_head: grouped-query attention (1: multi-query); None: n_head
    head_dim: int | None = None  # None: n_embd // n_head
    mlp_hidden: int | None = None  # None: 4 * n_embd for gelu/relu2, ~8/3 * n_embd for swiglu (same params)
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorm
    pos: str = "learned"  # 'learned' | 'rope' | 'alibi'
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm' | 'rmsnorm-noweight'
    mlp: str = "gelu"  # 'gelu' | 'swiglu' | 'relu2'
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares its weight with the token embedding
    embed_norm: bool = False  # a norm right after the token embedding (GPT.__init__)
    qk_norm: bool = False  # q and k divided by their RMS, after RoPE (CausalSelfAttention)
    logit_softcap: float | None = None  # logits squashed into (-cap, cap) by cap * tanh(logits / cap) (GPT.forward)
    zero_init_proj: bool = False  # the projections into the residual stream start at zero (GPT.__init__)
    value_embeds: bool = False  # every other layer adds a token's own vector to its values (has_value_embed)
    x0_lambdas: bool = False  # each block reads a learned mix of the stream and the first embedding (GPT.forward)
    attn_impl: str = "sdpa"  # 'sdpa' (fused kernel, flash on GPU) | 'explicit' (the math, spelled out)

    def __post_init__(self):
        """Fill in what follows from the other fields, and refuse a model that cannot exist: the one check of a
        model's shape (the command line builds a GPTConfig and reports its ValueError)."""
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: each head gets "
                             "n_embd / n_head dimensions")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64) if self.mlp == "swiglu" else 4 * self.n_embd
        for field, allowed in (("pos", POSITIONS), ("norm", NORMS), ("mlp", MLPS), ("attn_impl", ("sdpa", "explicit"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"GPTConfig.{field}={getattr(self, field)!r}: expected one of {', '.join(allowed)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim (it rotates pairs of dimensions), got {self.head_dim}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap={self.logit_softcap}: a soft-cap bounds |logits|, so it must be > 0")

    @classmethod
    def preset(cls, size="gpt2", arch="gpt2", **overrides):
        """GPTConfig.preset('gpt2-medium', 'llama', n_kv_head=4): a size, an architecture, then any field."""
        for kind, name, table in (("size", size, SIZES), ("arch", arch, ARCHS)):
            if name not in table:
                raise ValueError(f"unknown {kind} {name!r}: choose from {', '.join(table)}")
        return cls(**{**SIZES[size], **ARCHS[arch], **overrides})

    def architecture(self):
        """The fields that decide the shape and meaning of the weights (not dropout or the attention kernel)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("dropout", "attn_impl")}


POSITIONS = ("learned", "rope", "alibi")
NORMS = ("layernorm", "rmsnorm", "rmsnorm-noweight")
MLPS = ("gelu", "swiglu", "relu2")


SIZES = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=256),  # for tests
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),  # the default run: tiny Shakespeare, a CPU
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


ARCHS = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    # a teaching variant under OLMo's name: ALiBi positions, LayerNorm, SwiGLU, no biases;
    # NOTE: AI2's released OLMo models use RoPE, not ALiBi
    "olmo": dict(pos="alibi", norm="layernorm", mlp="swiglu", bias=False, tie_embeddings=True),
    # HF's NanoChatForCausalLM (Karpathy's nanochat, late 2025): weightless RMSNorms, also after the embedding and on
    # q and k; ReLU²; an untied head; logits soft-capped at 15; and nanochat's init, output projections at zero
    "nanochat": dict(pos="rope", norm="rmsnorm-noweight", mlp="relu2", bias=False, tie_embeddings=False,
                     embed_norm=True, qk_norm=True, logit_softcap=15.0, zero_init_proj=True, norm_eps=1e-6),
}


# The default run, as nanoGPT's train.py opens with its defaults: a small nanochat-style model (section 1's ARCHS) on
# tiny Shakespeare in a BPE of 1,024 tokens learned from its train split (prepared on first use: shards.py), which
# on a 2-core CPU reaches nanoGPT's CPU loss in under a third of nanoGPT's time. Each choice won a race of whole runs
# (docs/results.md: "Tokenizers", "Ablation"). The command line (section 14) takes its defaults from here.
RECIPE = dict(
    arch="nanochat", size="mini",  # the model: GPTConfig.preset(size, arch); T = the size's block_size, 64 tokens
    batch_size=12, max_steps=350,  # B = 12 windows of 64 tokens a step, 350 steps
    lr=2e-3, min_lr=2e-4, warmup_steps=50,  # AdamW's lr: a short linear warmup, then a cosine to a tenth of it
    muon_lr=0.02, weight_decay=0.1, grad_clip=1.0, dropout=0.0,
    log_every=50, eval_every=50, eval_iters=20, ckpt_every=1000,  # eval: 7 points for loss.png, ~8% of the time
    seed=1337,  # the initial weights, the data order and dropout all follow from it
)


# -----------------------------------------------------------------------------
# 2. Positions
# Attention by itself is blind to order. GPT-2 adds a learned vector per position to
# the token embedding. RoPE instead rotates queries and keys by an angle proportional
# to their position, so q·k depends only on the distance between them. ALiBi adds no
# vectors at all: each head subtracts slope × distance from its attention scores, and
# so runs past the length it was trained on; attention_bias builds that penalty into the
# causal mask. The Positions module at the end of this section is the one place that
# knows which scheme a model uses: a new one (NoPE, YaRN) is a new GPTConfig.pos value
# and a branch there.


def rope_cos_sin(head_dim, positions, theta):
    """cos and sin, each (T, head_dim), for positions (T,): position p rotates pair i by p * theta^(-2i/head_dim).
    Computed for the positions at hand (as HF does), not looked up in a table: generation can run past any
    table's end, and a compiled decode step then reads the position from a tensor, never from its shape."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = torch.outer(positions.float(), inv_freq)  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hd) by cos/sin (T, hd), in HF's 'half-split' layout: dimension i is paired with
    i + hd/2, so HF Llama checkpoints load unchanged. Meta's original code pairs neighbours (2i, 2i+1)
    instead; its q/k weights are the same up to a permutation of their rows."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hd/2) each: the two halves that form pairs
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate each (x1, x2) pair by 90 degrees
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_slopes(n_head):
    """Per-head slopes of ALiBi (Press et al. 2022): the geometric series 2^(-8/n), 2^(-16/n), ... For a head
    count that is not a power of two, the paper takes the slopes of the closest power of two below it, then
    every other slope of the next power up."""

    def power_of_2(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


def attention_bias(q_pos, k_pos, alibi=None):
    """The additive mask for queries at positions q_pos (T,) over keys at positions k_pos (S,): 0 where a
    query may look at a key, -inf where the key is in its future (a KV cache's empty slots sit far in the
    future), and with ALiBi's slopes (nh,) each head's -slope * distance on top. (1, nh or 1, T, S), fp32.
    Plain causal attention over one square window needs none: SDPA's is_causal runs its fastest kernel."""
    distance = (q_pos[:, None] - k_pos[None, :]).float()  # (T, S), >= 0: in the past
    slopes = distance.new_zeros(1) if alibi is None else alibi  # no ALiBi: a slope of 0, the causal mask alone
    bias = -slopes.view(-1, 1, 1) * distance  # (1 or nh, T, S)
    # four dimensions even without ALiBi: given a 3-D mask, SDPA falls back to its slow math kernel
    return bias.masked_fill(distance < 0, float("-inf")).unsqueeze(0)  # (1, nh or 1, T, S)


class Positions(nn.Module):
    """What the model needs to know about positions, for T new tokens: at positions 0 .. T-1 attending to
    each other, or, with a KV cache (section 12), at the positions it gives them attending to every key it holds:
        pos_emb (T, C)   added to the token embeddings (learned), else None
        rope             (cos, sin), each (T, hd), to rotate q and k by (rope), else None
        bias             the additive attention mask (attention_bias): None for plain causal
                         attention, else (1, nh or 1, T, S), with ALiBi's distance penalty (alibi)
    Only the learned scheme has a weight: GPT.positions.weight, GPT-2's transformer.wpe (convert.py maps
    the names)."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # the model's own: GPT.set_block_size changes it for both
        if config.pos == "learned":
            self.weight = nn.Parameter(torch.empty(config.block_size, config.n_embd))  # one vector per position
        self.make_tables()

    @property
    def max_len(self):
        """The furthest position a token may sit at: learned vectors end at block_size (read from the config,
        which --block-size may shorten); RoPE and ALiBi only see distances, so a sliding window of block_size
        tokens can run on forever."""
        return self.config.block_size if self.config.pos == "learned" else math.inf

    def make_tables(self):
        """What is derived from the config alone (checkpoints do not store it), built with the model
        rather than at the first forward, so that a compiled graph never sees it change."""
        if self.config.pos == "alibi":
            self.register_buffer("alibi", alibi_slopes(self.config.n_head), persistent=False)  # (nh,)

    def forward(self, T, device, cache=None):
        pos = self.config.pos
        alibi = self.alibi if pos == "alibi" else None
        if cache is None:  # one window: the tokens at 0 .. T-1, each seeing itself and those before it
            if T > self.max_len:
                raise ValueError(f"sequence of {T} tokens is longer than block_size={self.max_len}: "
                                 "learned position embeddings exist only for positions < block_size")
            positions = torch.arange(T, device=device)  # (T,)
            bias = None if alibi is None else attention_bias(positions, positions, alibi)  # else SDPA's is_causal
        else:  # the positions the cache gave the new tokens (a tensor: a compiled step never sees them change)
            positions = cache.positions  # (T,)
            bias = attention_bias(positions, cache.key_pos, alibi)  # (1, nh or 1, T, cache size)
        pos_emb = self.weight[positions] if pos == "learned" else None  # (T, C)
        rope = rope_cos_sin(self.config.head_dim, positions, self.config.rope_theta) if pos == "rope" else None
        return pos_emb, rope, bias


# -----------------------------------------------------------------------------
# 3. Attention
# Every position asks a question (query), advertises what it holds (key) and what it
# would hand over (value). Position t mixes the values of positions <= t, weighted
# by softmax(q·k / sqrt(head_dim)). The causal mask is what makes this a language
# model: no position sees the future. With grouped-query attention, several query
# heads share one key/value head, which shrinks the KV cache.
# QK-norm (qk_norm; ViT-22B, OLMo 2, modded-nanogpt, nanochat) divides each head's q and k by
# their RMS before the dot product, so a score is at most sqrt(head_dim) however large the
# weights grow: attention logits cannot run away into one-hot softmaxes, an instability that
# these models' authors saw at large learning rates. Weightless, as nanochat's; after RoPE, as
# HF's NanoChat (a rotation keeps a vector's RMS, so before RoPE would give the same).
# Value embeddings (value_embeds; modded-nanogpt, nanochat's current model) give a layer a
# second embedding table, one vector per token, added to each head's values through a gate
# that the layer's input sets: what a token hands over can carry its identity straight from
# the table, and the residual stream no longer has to keep it for every layer to read.


def has_value_embed(config, layer):
    """nanochat's choice of layers: every other one, the last included."""
    return config.value_embeds and layer % 2 == (config.n_layer - 1) % 2


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.layer = layer  # which of the KV cache's layers is this one's (HF's layer_idx)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.attn_impl, self.dropout = config.attn_impl, config.dropout
        self.qk_norm, self.norm_eps = config.qk_norm, config.norm_eps
        # q, k and v for all heads in one matmul
        qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # with a value embedding: a gate per kv head, read off the first channels of x (nanochat: 12)
        value_embed = has_value_embed(config, layer)
        self.ve_gate = nn.Linear(min(12, config.n_embd), config.n_kv_head, bias=False) if value_embed else None

    def forward(self, x, rope=None, bias=None, cache=None, ve=None):
        """x (B, T, C); rope: (cos, sin) or None; bias: None for plain causal attention (see
        attention_bias), else an additive (1, nh or 1, T, S) float mask; cache: the KVCache during
        generation, whose S keys are all this layer's slots, filled or not; ve: the tokens' value
        embeddings (B, T, nkv*hd), or None."""
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(  # (B, T, nh*hd), (B, T, nkv*hd), (B, T, nkv*hd)
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2
        )
        if ve is not None:  # each kv head's values plus its gated share of the token's value embedding
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B, T, nkv), in (0, 3)
            v = v + gate.repeat_interleave(self.head_dim, dim=-1) * ve  # (B, T, nkv*hd)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.qk_norm:  # each head's q and k to RMS 1: the cache holds normalized keys
            q, k = (F.rms_norm(t, (self.head_dim,), eps=self.norm_eps) for t in (q, k))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd): every slot, these written into theirs
        dropout_p = self.dropout if self.training else 0.0
        if bias is not None:
            bias = bias.to(q.dtype)  # the mask is built in fp32; a bf16 model attends in bf16
        if self.attn_impl == "sdpa":
            if bias is not None:
                # NOTE: on CUDA, SDPA's enable_gqa together with a float mask leaves only its math kernel,
                # which materialises (B, nh, T, S) scores; with k/v repeated to nh heads the memory-efficient
                # kernel runs. Without a mask, enable_gqa keeps the flash kernel and no copy is made.
                k, v = repeat_kv(k, v, self.n_head // self.n_kv_head)  # (B, nh, S, hd)
            y = F.scaled_dot_product_attention(  # T == 1 and no bias: one new query, every key is in its past
                q, k, v, attn_mask=bias, is_causal=bias is None and T > 1, dropout_p=dropout_p,
                enable_gqa=k.size(1) != self.n_head,
            )  # (B, nh, T, hd)
        else:
            y = explicit_attention(q, k, v, bias, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.resid_dropout(self.c_proj(y))


def repeat_kv(k, v, groups):
    """Grouped-query attention by copying: each of the nkv key/value heads serves `groups` query heads in a row."""
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nkv * groups, S, hd)


def explicit_attention(q, k, v, bias, dropout_p):
    """What scaled_dot_product_attention computes, spelled out. q (B, nh, T, hd), k/v (B, nkv, S, hd)."""
    k, v = repeat_kv(k, v, q.size(1) // k.size(1))  # (B, nh, S, hd)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    if bias is None and q.size(2) > 1:  # plain causal: position t sees positions <= t
        T = q.size(2)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    elif bias is not None:
        att = att + bias
    att = F.dropout(F.softmax(att, dim=-1), p=dropout_p)
    return att @ v  # (B, nh, T, hd)


# -----------------------------------------------------------------------------
# 4. MLP
# After attention has moved information between positions, the MLP processes each
# position on its own. GPT-2: Linear, GELU, Linear. LLaMA's SwiGLU gates one half of
# a wider projection with SiLU of the other half. ReLU² (So et al. 2021, "Primer"; modded-nanogpt
# and nanochat) squares a ReLU: as cheap as GELU, sparse (about half the units are exactly 0);
# Primer found it better than GELU at the same cost, and nanochat tried SwiGLU and kept ReLU².


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        fc_out = 2 * config.mlp_hidden if self.kind == "swiglu" else config.mlp_hidden  # SwiGLU: gate, up in one
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C)
        h = self.c_fc(x)  # (B, T, fc_out)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # (B, T, mlp_hidden) each
            h = F.silu(gate) * up  # (B, T, mlp_hidden)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation of GELU
        return self.dropout(self.c_proj(h))  # (B, T, C)


# -----------------------------------------------------------------------------
# 5. Block
# Pre-norm residual: each sublayer reads a normalized copy of the residual stream and
# adds its output back, so gradients flow straight through the sum from top to bottom.


def make_norm(config):
    """NOTE: nanochat's RMSNorm has no weight: x / rms(x) alone ('rmsnorm-noweight'). A per-channel gain in front
    of a Linear is one the Linear can learn itself, so nanochat drops it: fewer parameters, nothing to tune."""
    if config.norm.startswith("rmsnorm"):  # scale only: x / rms(x) * weight
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps, elementwise_affine=config.norm == "rmsnorm")
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)  # (x - mean) / std * weight + bias


class Block(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, bias=None, cache=None, ve=None):  # x (B, T, C)
        x = x + self.attn(self.ln_1(x), rope, bias, cache, ve)
        x = x + self.mlp(self.ln_2(x))
        return x  # (B, T, C)


# -----------------------------------------------------------------------------
# 6. Model
# Token embedding, n_layer blocks, a final norm, and the language-model head: a Linear
# back to vocabulary logits, by default sharing its weight with the token embedding
# (weight tying, as in GPT-2). Positions (section 2) add what the scheme needs.
# Four switches act here. embed_norm (nanochat) normalizes the embedding before the first
# block, so the residual stream starts at RMS 1 whatever scale the embedding table drifts to.
# logit_softcap (Gemma 2, modded-nanogpt, nanochat: 15) squashes each logit into (-cap, cap)
# with cap * tanh(logit / cap): nearly the identity for small logits, it keeps a confident
# model from pushing its logits ever further. zero_init_proj (modded-nanogpt, nanochat) starts
# every block's output projections at zero: each block starts as the identity, the model as a
# bigram model. x0_lambdas (modded-nanogpt, nanochat) give each block two learned scalars: it
# reads resid_lambda * x + x0_lambda * x0, x0 the stream as it entered the first block, so a deep
# layer can scale the stream down or reach back to the tokens. They start at 1 and 0: the model
# as without them. The value embeddings' tables (section 3) live here too.
# from_pretrained reads HF checkpoints (convert.py).


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                ln_emb=make_norm(config) if config.embed_norm else nn.Identity(),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ve=nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, config.n_kv_head * config.head_dim)
                                  for i in range(config.n_layer) if has_value_embed(config, i)}),
                ln_f=make_norm(config),
            )
        )
        self.positions = Positions(config)  # registered after ln_f, where GPT-2's wpe was: the same init order
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.x0_lambdas:  # one pair per block, set below
            self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.tie_weights()
        self.grad_checkpointing = False
        # GPT-2's init: N(0, 0.02) weights and zero biases; the projections that write into the
        # residual stream are scaled by 1/sqrt(2 * n_layer) so its variance stays ~1 with depth
        # (zero_init_proj: drawn with std 0, so every other weight gets the same draws as without it).
        self.apply(self._init_weights)
        proj_std = 0.0 if config.zero_init_proj else 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=proj_std)
        if config.x0_lambdas:  # 1 and 0: each block reads the stream as it is (in place: fsdp.DeferredInit replays it)
            nn.init.ones_(self.resid_lambdas), nn.init.zeros_(self.x0_lambdas)

    def set_block_size(self, block_size):
        """Read a longer (or shorter) context than the model was trained on: --block-size for --eval and
        --sample. RoPE and ALiBi see only distances, so any length runs (how well is what --eval
        measures); learned position vectors exist only for the positions trained."""
        trained = self.positions.weight.size(0) if self.config.pos == "learned" else math.inf  # learned: its rows
        if block_size > trained:
            raise ValueError(f"--block-size {block_size}: this model's learned position embeddings end at "
                             f"{trained}; RoPE and ALiBi models can read past their training length")
        self.config.block_size = block_size

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding, Positions)) and hasattr(module, "weight"):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    def flops_per_token(self, T):
        """Training FLOPs per token (PaLM appendix B): 6 per matmul weight (2 forward, 4 backward),
        plus 12 * n_layer * n_head * head_dim * T for the attention scores and their mix of values."""
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        c = self.config
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * T

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy against targets or None).
        targets (B, T) are idx shifted left by one; -1 marks a position to ignore. With a KVCache (section 12),
        idx holds only the new tokens, and the cache the keys and values before them, and their positions."""
        B, T = idx.size()
        pos_emb, rope, bias = self.positions(T, idx.device, cache)
        x = self.transformer.wte(idx)  # (B, T, C)
        if pos_emb is not None:
            x = x + pos_emb  # (T, C) broadcast over the batch
        x = x0 = self.transformer.drop(self.transformer.ln_emb(x))  # ln_emb: a norm (embed_norm) or nothing
        for i, block in enumerate(self.transformer.h):
            if self.config.x0_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.transformer.ve[str(i)](idx) if str(i) in self.transformer.ve else None  # (B, T, nkv*hd)
            if self.grad_checkpointing and self.training:  # recompute activations in backward: less memory
                x = torch.utils.checkpoint.checkpoint(block, x, rope, bias, cache, ve, use_reentrant=False)
            else:
                x = block(x, rope, bias, cache, ve)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap is not None:  # in fp32, as nanochat and HF do: tanh needs the precision
            logits = self.config.logit_softcap * torch.tanh(logits.float() / self.config.logit_softcap)
        loss = None
        if targets is not None:
            # (B*T, vocab) against (B*T,): the mean over every position of every sequence, in fp32
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @classmethod
    def from_state_dict(cls, config, state_dict, source):
        """A model holding exactly state_dict's weights (checked: names and shapes; source names them in errors).
        Built on the meta device: no memory and no random init for weights that are about to be replaced, and
        nothing drawn from the global RNG."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")  # real storage, left uninitialised; this unties weights, so tie them again
        model.tie_weights()
        model.positions.make_tables()
        expected = model.state_dict()
        missing, extra = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        if missing or extra:
            raise ValueError(f"{source}: missing tensors {missing[:5]} / unexpected tensors {extra[:5]}")
        for k, v in state_dict.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        model.load_state_dict(state_dict)
        return model

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """Load HF weights: GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), Llama-family or NanoChat models
        from the hub, or a local directory holding an HF GPT2LMHeadModel, LlamaForCausalLM or NanoChatForCausalLM
        checkpoint (config.json + *.safetensors or pytorch_model.bin). Its ids' tokenizer: convert.hf_tokenizer_name."""
        arch, fields, weights = convert.read_hf(name_or_path)  # HF's config and weights under our names
        config = GPTConfig.preset("gpt2", arch, dropout=dropout, **fields)
        return cls.from_state_dict(config, weights(config), name_or_path)


# -----------------------------------------------------------------------------
# 7. Data
# Training reads token ids that prepare_data.py wrote ahead of time, so the GPU never
# waits for a tokenizer (tokenizer.py). The ids lie in shards (shards.py, llm.c's read as
# they are), memory-mapped as uint16 or uint32. meta.json names the tokenizer and counts
# each split's tokens and the UTF-8 bytes they spell: a loss per token also reads as bits
# per byte, the scale on which tokenizers compare. The default run's data, tiny Shakespeare in
# a BPE learned from its train split, is made on first use (shards.prepare_default_data).


def bits_per_byte(loss, n_tokens, n_bytes):
    """A mean loss (nats per token) over n_tokens tokens that spell n_bytes UTF-8 bytes, in bits per byte
    (nanochat's val_bpb): the total loss is loss * n_tokens nats, and a nat is 1/ln 2 bits. NOTE: the training
    log's val loss is an estimate from --eval-iters windows, converted at the whole val split's tokens per byte."""
    return loss * n_tokens / (n_bytes * math.log(2))


class DataLoaderLite:
    """Batches of B windows of T + 1 tokens, (B, T+1) int64, from one split's shards: x = buf[:, :-1] and
    the targets y = buf[:, 1:] are the same window shifted by one.

    Each epoch cuts every shard into windows at a random offset and visits them in a random order, both
    drawn from (seed, epoch) alone. One optimizer step reads B x num_processes x grad_accum consecutive
    windows of that order; micro-step m of rank r takes windows (m * num_processes + r) * B ... + B - 1.
    NOTE: so any split of the same total batch (8 processes x B, or 1 x B x 8 accumulation steps) reads
    the same windows in the same steps: a checkpoint written under one resumes under another.
    """

    def __init__(self, data_dir, split, B, T, process_rank=0, num_processes=1, grad_accum=1, seed=0, pin_memory=False):
        meta = read_meta(data_dir) if os.path.exists(os.path.join(data_dir, "meta.json")) else {}
        self.shards = [load_shard(f, meta.get("vocab_size")) for f in find_shards(data_dir, split)]
        self.B, self.T, self.rank, self.world, self.grad_accum = B, T, process_rank, num_processes, grad_accum
        self.seed, self.pin_memory = seed, pin_memory  # pinned host memory: the copy to the GPU can overlap compute
        self.step_windows = B * num_processes * grad_accum
        n_tokens = sum(len(s) for s in self.shards)
        if self._windows(offset=T - 1).sum() < self.step_windows:  # the worst offset must still fill one step
            raise ValueError(
                f"{data_dir}: the {split} split has {n_tokens:,} tokens, too few for one step of {self.step_windows} "
                f"x {T + 1} tokens (batch size x processes x accumulation x (seq len + 1)): lower them"
            )
        self.reset()

    def _windows(self, offset):
        # Window i of a shard is tokens offset + i*T ... offset + i*T + T: T + 1 tokens, overlapping the next
        # by one, so every token after the offset is a target exactly once. A shard of n tokens holds
        # (n - offset - 1) // T of them; the few tokens left at its end wait for another epoch's offset.
        return np.array([max(0, (len(s) - offset - 1) // self.T) for s in self.shards])

    def reset(self, epoch=0, step=0):
        """Go to optimizer step `step` of epoch `epoch` and draw that epoch's offset and order."""
        self.epoch, self.step, self.micro = epoch, step, 0
        rng = np.random.default_rng([self.seed, epoch])  # every process draws the same: no communication
        self.offset = int(rng.integers(self.T))  # a new cut each epoch, so windows do not repeat exactly
        counts = self._windows(self.offset)  # windows in each shard
        self.first_window = np.concatenate([[0], np.cumsum(counts)])  # window ids of shard i start here
        self.order = rng.permutation(int(counts.sum()))
        self.steps_per_epoch = len(self.order) // self.step_windows

    def next_batch(self):
        """This process's next micro-batch, (B, T+1)."""
        if self.micro == 0 and self.step >= self.steps_per_epoch:  # only between whole optimizer steps
            self.reset(self.epoch + 1)
        # this step's block of the order, then micro-step m of rank r: the docstring's arithmetic
        start = self.step * self.step_windows + (self.micro * self.world + self.rank) * self.B
        rows = []
        for w in self.order[start : start + self.B]:
            shard = int(np.searchsorted(self.first_window, w, side="right")) - 1  # the shard window w is in
            pos = self.offset + (w - self.first_window[shard]) * self.T  # its first token there
            rows.append(self.shards[shard][pos : pos + self.T + 1])
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro, self.step = 0, self.step + 1
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        return buf.pin_memory() if self.pin_memory else buf

    def state_dict(self):
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, T=self.T, step_windows=self.step_windows)

    def load_state_dict(self, state):
        for key in ("seed", "T", "step_windows"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"data loader state has {key}={state.get(key)}, this run has {getattr(self, key)}: "
                                 "resume with the same --seed, --seq-len and total batch")
        self.reset(state["epoch"], state["step"])


# -----------------------------------------------------------------------------
# 8. Processes
# What a run needs around the model: a device and a dtype; under torchrun, one process per
# GPU, the model wrapped so that backward averages the gradients over them (DDP). The
# plumbing is distributed.py's: pick_device (cuda:LOCAL_RANK under torchrun), Distributed
# (rank, world size, the process group), StopSignal (SIGINT/SIGTERM end a run at a step's
# end, after a save), synchronize (wait for the GPU, for honest timings), and wrap_model: the
# model compiled, then inside DDP, or sharded in place under --fsdp (fsdp.py).


def pick_dtype(name, device):
    """auto: bf16 autocast on GPUs that have it, fp16 (with loss scaling) on older ones, fp32 elsewhere."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device, dtype):
    """Matmuls in dtype, weights and optimizer state in fp32 (mixed precision); nothing to do for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -----------------------------------------------------------------------------
# 9. Checkpoints
# A checkpoint holds all of a run's state, so that a resumed run continues exactly, even
# after a kill -9. The loop's save (section 11) writes:
#     model, optimizer      the weights and the optimizer's moments
#     scaler, step, loader  fp16's loss scale, the steps completed, the data loader's place
#     rng                   every process's RNG state: dropout continues where it was
#     config, args          the model's shape and the command line that trained it
#     tokenizer(_json)      what its ids mean; val_loss; format: CKPT_FORMAT
# checkpoint.py writes it whole or never (ckpt.pt, or a step folder of shards under --fsdp)
# and reads it with weights_only=True: tensors and plain containers, never code. Each process's
# RNG state is saved (rng_state) and put back for the loop (seed_rng), both in distributed.py.


def model_from_checkpoint(ckpt, path="the checkpoint"):
    """The model a checkpoint holds, built from its config and weights (GPT.from_state_dict: no random init)."""
    return GPT.from_state_dict(GPTConfig(**ckpt["config"]), ckpt["model"], path)


def tokenized_alike(meta, name, tokenizer_json):
    """Whether a dataset's ids (its meta.json) mean what a model's tokenizer's ids mean: the same name and, for a
    trained BPE, the same tokenizer.json (two bpe:4096 trained on different texts share a name, not their ids)."""
    return meta["tokenizer"] == name and meta.get("tokenizer_json") == tokenizer_json


def check_resumable(ckpt, config, optimizer, meta, path):
    """The same model config, optimizer and tokenizer, or resuming is refused before any weight is read."""
    if not tokenized_alike(meta, ckpt["tokenizer"], ckpt.get("tokenizer_json")):
        same_name = meta["tokenizer"] == ckpt["tokenizer"]
        ours = f"; this --data's {meta['tokenizer']} was trained on another text" if same_name else \
            f", not on this --data's {meta['tokenizer']} tokens"
        raise ValueError(f"{path} was trained on {ckpt['tokenizer']} tokens{ours}: "
                         "resume on data made with the same tokenizer")
    theirs = GPTConfig(**ckpt["config"]).architecture()  # an older checkpoint's: the fields it lacks at default
    diff = [f"{k}={theirs[k]!r} (now {v!r})" for k, v in config.architecture().items() if theirs[k] != v]
    if diff:
        raise ValueError(f"{path} was trained with another model config: {', '.join(diff)}; "
                         "use the same model flags to resume")
    if ckpt["args"].get("optimizer", "adamw") != optimizer:
        raise ValueError(f"{path} was trained with --optimizer {ckpt['args']['optimizer']}: resume with the same one")


def resume(args, model, optimizer, scaler, loader, meta, dist, device, checkpoints):
    """Put back all the loop's save wrote, whatever wrote it (one process, DDP or FSDP; either format), under any
    number of processes; returns the checkpoint, or None for a new run. Without --resume a checkpoint is refused,
    never overwritten; --resume auto starts fresh without one; an unreadable one gives way to the one before."""
    found = find_checkpoints(args.out_dir)  # the complete ones, newest first: a save cut short is never one
    if found and not args.resume:
        raise ValueError(f"{found[0]} exists: pass --resume to continue it, or choose another --out-dir")
    if not found and args.resume is True:
        raise ValueError(f"{os.path.join(args.out_dir, 'ckpt.pt')}: no such checkpoint")
    for path in found if args.resume else []:
        try:
            ckpt = read_state(path)
            check_resumable(ckpt, model.config, args.optimizer, meta, path)
            ckpt = checkpoints.load(path, ckpt, model, optimizer, rng_state(device))
        except Unreadable as e:
            if path == found[-1]:
                raise
            if dist.master:
                print(f"{e}: resuming from {found[found.index(path) + 1]} instead", flush=True)
            continue
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        if dist.master:
            print(f"resumed {path} at step {ckpt['step']}", flush=True)
        return ckpt
    return None


# -----------------------------------------------------------------------------
# 10. Evaluation
# How good a model is, measured three ways: the val loss the training loop logs (the same
# few batches every time, so the points of a run compare), the loss over every token of a
# whole text (--eval: perplexity), and HellaSwag's multiple choice (hellaswag.accuracy:
# each process scores its share of the examples, the counts are added up).


@torch.no_grad()
def estimate_val_loss(model, loader, iters, device, dtype, dist):
    """Mean loss over the same `iters` val steps every time (the loader restarts at its beginning), each
    step read like a training step, so every split of the same total batch sees the same windows."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(iters * loader.grad_accum):
        buf = loader.next_batch().to(device, non_blocking=True)  # (B, T+1)
        with autocast(device, dtype):
            _, loss = model(buf[:, :-1], buf[:, 1:])
        total += loss.float()
    model.train()
    return dist.sum(total).item() / (iters * loader.grad_accum * dist.world)


@torch.no_grad()
def evaluate_tokens(model, tokens, batch_size, device, dtype, progress=True):
    """(mean next-token loss, tokens predicted) over a whole token stream, in windows of block_size + 1
    tokens that overlap by one: every token after the first is predicted exactly once. The softmax runs over
    every row of the head (padded ids included), as the training loss, transformers and lm-eval score a model."""
    from tqdm import tqdm

    T = model.config.block_size
    tokens = np.asarray(tokens)
    n_full = (len(tokens) - 1) // T

    def loss_sum(rows):  # rows (b, n + 1) -> summed loss of predicting rows[:, 1:]
        buf = torch.from_numpy(rows.astype(np.int64)).to(device)
        with autocast(device, dtype):
            logits, _ = model(buf[:, :-1])  # (b, n, vocab)
        return F.cross_entropy(logits.float().flatten(0, 1), buf[:, 1:].flatten(), reduction="sum").item()

    total = 0.0
    for first in tqdm(range(0, n_full, batch_size), desc="eval", unit="batch", disable=not progress, file=sys.stderr):
        windows = range(first, min(first + batch_size, n_full))
        total += loss_sum(np.stack([tokens[w * T : w * T + T + 1] for w in windows]))  # (b, T + 1)
    if len(tokens) - 1 > n_full * T:  # the shorter last window
        total += loss_sum(tokens[n_full * T :][None])
    return total / (len(tokens) - 1), len(tokens) - 1


# -----------------------------------------------------------------------------
# 11. Training
# AdamW with weight decay on matrices only (or Muon for the blocks' matrices), linear
# warmup then cosine decay, gradient accumulation to reach a large batch in small steps,
# gradient clipping, bf16 autocast on GPUs. Under torchrun every process runs this same
# code on its slice of each batch. train() is the whole run in the order it happens:
# set-up, resume, then the loop: forward/backward, update, log, evaluate and save.


# Muon (Jordan et al. 2024, as modded-nanogpt and nanochat use it) updates a weight matrix with its
# momentum made orthogonal: Newton-Schulz iterations push every singular value of the momentum towards 1,
# so the update moves the matrix as much in every direction its gradient points, not mostly along the
# largest few. That only means something for a matrix from one hidden space to another: embeddings, head,
# norms and biases stay with AdamW. NOTE: our fused c_attn (q, k, v) and SwiGLU c_fc (gate, up) are each
# orthogonalised as one matrix, where nanochat orthogonalises q, k and v apart.
def configure_optimizer(model, lr, weight_decay, device_type, betas=(0.9, 0.95), muon_lr=None):
    """AdamW; weight decay only on matrices (>= 2-D), not on biases and norm weights. With muon_lr, the
    blocks' matrices (attention and MLP projections) go to Muon instead, AdamW keeping the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = {id(p) for block in model.transformer.h for p in block.parameters() if p.dim() == 2} if muon_lr else set()
    rest = [p for p in params if id(p) not in hidden]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type in ("cuda", "cpu")  # one kernel for all parameters instead of a loop over them
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)
    if not muon_lr:
        return adamw
    matrices = [p for p in params if id(p) in hidden]
    muon = torch.optim.Muon(matrices, lr=muon_lr, weight_decay=weight_decay)
    return Optimizers(muon, adamw)  # stepped, zeroed and saved as one (optimizers.py)


def lr_at(step, lr, min_lr, warmup_steps, decay_steps):
    """Linear warmup to lr, cosine decay to min_lr at decay_steps, then min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def model_config(args, vocab_size):
    """The model the command line describes: an --arch and a --size preset, any single flag on top (GPTConfig
    refuses a shape that cannot exist). The vocabulary is padded to a multiple of 64 (GPT-2's 50,257 -> 50,304)
    as nanoGPT does, for whole GPU tiles; training pushes their logits down, evaluation counts them, sampling
    never draws them."""
    flags = (*ARCH_FLAGS, "n_layer", "n_head", "n_embd", "block_size")
    overrides = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    return GPTConfig.preset(args.size or RECIPE["size"], args.arch, vocab_size=64 * math.ceil(vocab_size / 64),
                            dropout=args.dropout, **overrides)


def train(args, dist, device, dtype):
    """A training run, top to bottom; under torchrun every process runs all of it, on its share of each batch.
    Returns (the trained model, its tokenizer or None where it cannot be loaded), or None when SIGINT/SIGTERM ended
    the run early (after a save) or the run resumed was already complete."""

    say = functools.partial(print, sep="\n", flush=True) if dist.master else lambda *lines: None  # one speaks

    # The data. An optimizer step sees B x T tokens per process per micro-step, over all processes and
    # grad_accum micro-steps: --total-batch-tokens sets the total (check_args made sure it divides evenly).
    args.data = args.data or prepare_default_data(dist)
    meta = read_meta(args.data)
    # NOTE: training needs only the ids. A tokenizer that cannot be loaded here (llm.c's Llama 3 shards imply Meta's,
    # gated on the hub) is needed only where ids become text: the sample at the end, HellaSwag, the exports.
    try:
        tokenizer, unloaded = get_tokenizer(meta["tokenizer"], meta.get("tokenizer_json")), None  # before any write
    except TokenizerUnavailable as e:  # not an unknown name (refused): one that cannot be fetched here
        tokenizer, unloaded = None, str(e)
        if args.hellaswag_every:
            raise ValueError(f"--hellaswag-every needs the tokenizer {meta['tokenizer']}, which cannot be loaded "
                             f"here ({e})") from None
    B, T = args.batch_size, args.seq_len
    tokens_per_step = args.total_batch_tokens or B * T * dist.world
    grad_accum = tokens_per_step // (B * T * dist.world)
    pin = device.type == "cuda"  # page-locked host memory: the copy to the GPU runs beside the compute
    train_loader, val_loader = (DataLoaderLite(args.data, split, B, T, dist.rank, dist.world, grad_accum,
                                               args.seed, pin) for split in ("train", "val"))
    val_split = meta.get("splits", {}).get("val", {})  # its tokens and bytes turn val losses into bits per byte

    # The model, with the same initial weights on every process, and what runs the steps (wrap_model).
    # NOTE: wrapped before the optimizer is built: --fsdp replaces raw_model's weights with their shards, which
    # the optimizer must hold. --fsdp builds it on the meta device, each process initialising only its shards.
    torch.manual_seed(args.seed)
    deferred = bool(args.fsdp) and not args.init_from
    if deferred:
        import fsdp  # FSDP is loaded where it is used: a one-process run never pays for it
    init = fsdp.DeferredInit() if deferred else contextlib.nullcontext()
    if args.init_from:
        raw_model = GPT.from_pretrained(args.init_from, dropout=args.dropout)
        c = raw_model.config
        if meta["vocab_size"] > c.vocab_size or T > c.block_size:
            raise ValueError(f"{args.data} (vocab {meta['vocab_size']}, seq len {T}) does not fit "
                             f"{args.init_from} (vocab {c.vocab_size}, block_size {c.block_size})")
    else:
        with init:
            raw_model = GPT(model_config(args, meta["vocab_size"]))
    raw_model.grad_checkpointing = args.grad_checkpointing
    model = wrap_model(raw_model if deferred else raw_model.to(device), args, dist, device, dtype,
                       init if deferred else None)
    muon_lr = args.muon_lr if args.optimizer == "muon" else None
    optimizer = configure_optimizer(raw_model, args.lr, args.weight_decay, device.type, muon_lr=muon_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only: small gradients
    if device.type == "cuda":  # would flush to zero, so the loss is scaled up before backward
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True

    # A new run, or the one in --out-dir continued where its last save left off (section 9).
    checkpoints = Checkpoints(args.out_dir, args.ckpt_format, args.keep_checkpoints, args.async_save, dist.rank,
                              dist.world)
    ckpt = resume(args, raw_model, optimizer, scaler, train_loader, meta, dist, device, checkpoints)
    step, val_loss = (ckpt["step"], ckpt.get("val_loss")) if ckpt else (0, None)  # step: optimizer steps completed
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt" if args.ckpt_format == "file" else "")
    saved = (ckpt_path, step) if ckpt else None  # the latest state on disk: what a divergence names
    if step >= args.max_steps:  # nothing to train, save or sample: the run's files stay as they are
        say(f"{ckpt_path} is at step {step} of --max-steps {args.max_steps}: the run is already complete "
            "(raise --max-steps to train further)")
        return None

    # The log (metrics.jsonl, cut back to the resumed step), what MFU is measured against, what is trained.
    log = MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), step, dist.master, args.wandb, vars(args))
    examples = hellaswag.examples(args.hellaswag or hellaswag.URL, dist) if args.hellaswag_every else None
    peak, peak_source = peak_flops(device)
    flops_per_token = raw_model.flops_per_token(T)
    if unloaded:
        say(f"tokenizer {meta['tokenizer']} cannot be loaded here: training needs only the ids, but the sample at the "
            "end, --hellaswag-every and the exports need it: put a copy in a folder and a meta.json naming it beside "
            f"the shards, {{\"tokenizer\": \"hf:<folder>\", \"vocab_size\": {meta['vocab_size']}}} ({unloaded})")
    say(*run_summary(raw_model, meta, args, dist, device, dtype, grad_accum, peak, peak_source))
    # NOTE: the RNGs come back last. Nothing between this and the first step may draw a random number
    # (the MFU peak is timed on constant matrices for that reason), or dropout after a resume would differ.
    seed_rng(ckpt, args.seed, dist, device)

    decay_steps = args.lr_decay_steps or args.max_steps
    model.train()
    t0, step0 = time.perf_counter(), step  # tokens/s is measured between logged steps
    with StopSignal() as stop:
        while step < args.max_steps:
            # The lr of this step, each optimizer at the same fraction of its own peak (its defaults["lr"]);
            # a resumed run's lr is its flags', not the file's.
            lr = lr_at(step, args.lr, args.min_lr, args.warmup_steps, decay_steps)
            for opt in getattr(optimizer, "optimizers", [optimizer]):
                for group in opt.param_groups:
                    group["lr"] = opt.defaults["lr"] * lr / args.lr

            # Forward and backward over grad_accum micro-batches: their gradients add up.
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                buf = train_loader.next_batch().to(device, non_blocking=True)  # (B, T+1), from pinned memory
                x, y = buf[:, :-1], buf[:, 1:]  # (B, T) each: the targets are the inputs shifted by one
                # The processes average their gradients once, in the last micro-step's backward (DDP's
                # all-reduce, FSDP's reduce-scatter into each one's shard); before it each adds up its own.
                # NOTE: under FSDP that holds whole gradients until then: less traffic, more memory.
                sync = micro == grad_accum - 1
                if args.fsdp:
                    raw_model.set_requires_gradient_sync(sync)
                elif dist.enabled:
                    model.require_backward_grad_sync = sync
                with autocast(device, dtype):
                    _, loss = model(x, y)
                loss = loss / grad_accum  # so the summed gradients are those of the mean over all micro-batches
                loss_sum += loss.detach()
                scaler.scale(loss).backward()

            # The update. Every process logs the same, global, loss; the stop flag rides in the same all-reduce.
            stats = dist.sum(torch.stack([loss_sum, torch.full((), float(stop.requested), device=device)]))
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # of the whole gradient
            if args.fsdp:  # a DTensor: the norm over every process's shards, the same on each
                norm = norm.full_tensor()
            # NOTE: the step's one wait for the device, where the loss, the norm and the stop flag are read
            # together; the update itself is queued behind it and not waited for.
            loss, stopping, norm = torch.cat([stats, norm.view(1).float()]).tolist()
            loss /= dist.world
            if not math.isfinite(loss) or not (math.isfinite(norm) or scaler.is_enabled()):  # fp16's GradScaler
                what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)  # skips an inf
                checkpoints.wait()  # itself; a save still being written in the background completes: it is good
                kept = f"{saved[0]} keeps step {saved[1]}'s state" if saved else "no checkpoint was saved yet"
                raise ValueError(f"{what} is {value} at step {step + 1}: stopping before the update; {kept} "
                                 "(try a lower --lr)")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # Log: every step is a line of metrics.jsonl; logged steps also measure speed (waiting for the
            # device only here), and some the val loss or HellaSwag, which are not counted as training time.
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm}
            last = step == args.max_steps
            evaluating = step % args.eval_every == 0 or last
            scoring = args.hellaswag_every is not None and (step % args.hellaswag_every == 0 or last)
            if step % args.log_every == 0 or step == 1 or evaluating or scoring:
                synchronize(device)
                record["tokens_per_s"] = (step - step0) * tokens_per_step / (time.perf_counter() - t0)
                record["mfu"] = mfu(record["tokens_per_s"], flops_per_token, dist.world, peak)
                if evaluating:
                    val_loss = record["val_loss"] = estimate_val_loss(model, val_loader, args.eval_iters, device,
                                                                      dtype, dist)
                    if "bytes" in val_split:  # llm.c's shards and datasets prepared before byte counts have none
                        record["val_bpb"] = bits_per_byte(val_loss, val_split["tokens"], val_split["bytes"])
                if scoring:
                    with autocast(device, dtype):
                        _, record["hellaswag_acc_norm"], _ = hellaswag.accuracy(raw_model, examples, tokenizer,
                                                                                device, dist, B)
                say(log_line(record))
                t0, step0 = time.perf_counter(), step
            log.write(record)

            # Save everything resuming needs (section 9), atomically: a kill -9 mid-write leaves the previous
            # checkpoint. Every process takes part, with its RNG state and its shards (checkpoint.py).
            if step % args.ckpt_every == 0 or last or stopping:
                checkpoints.save(raw_model, optimizer, rng_state(device), {
                    "format": CKPT_FORMAT, "scaler": scaler.state_dict(), "args": vars(args), "step": step,
                    "config": dataclasses.asdict(raw_model.config), "loader": train_loader.state_dict(),
                    "tokenizer": meta["tokenizer"], "tokenizer_json": meta.get("tokenizer_json"), "val_loss": val_loss,
                }, done=last or stopping)
                saved = (ckpt_path, step)
            if stopping:
                log.close()
                say(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
                return None
    log.close()
    say(f"saved {ckpt_path}")
    return raw_model, tokenizer


# -----------------------------------------------------------------------------
# 12. Generation
# The trained model fed its own output, one token at a time. Without a cache every step
# re-encodes the whole prefix; with a KV cache the prompt is encoded once (prefill) and each
# step computes only the new token's keys and values, attending to the stored ones. The model
# only reads the cache (GPT.forward); this loop gives the new tokens their places in it. The
# cache has one fixed shape, written in place and masked to the filled slots, so every decode
# step has the same shapes: --compile compiles it once (a CUDA graph on a GPU). Past block_size
# the cache slides (RoPE and ALiBi see only distances); learned positions re-encode the window.
# NOTE: cached and uncached generation give the same logits (to rounding) up to block_size tokens at any
# depth, and past it with learned positions (both re-encode) or one layer. With RoPE or ALiBi and two or
# more layers they part past block_size: a slot keeps the keys its token got when it was read, which from
# the second layer on mixed in tokens that have since left the window; re-encoding sees only the window.
# Neither is wrong (the model never trained past block_size); re-encoding costs a window per token.


class KVCache:
    """Keys and values of every layer in fixed-shape buffers: k[i] and v[i] are (B, n_kv_head, size, head_dim),
    size = block_size unless given, a ring: the token at absolute position p sits in slot p % size. key_pos (size,)
    holds the position in each slot (EMPTY, far in the future, until written: attention masks it out). `pos` counts
    every token seen; make_room gives the next T their positions (a tensor, so a compiled step reads them instead of
    specialising on them) and slots, where each layer's attention writes its keys and values (update(layer, k, v))."""

    EMPTY = 2**62

    def __init__(self, config, batch_size, device, size=None):
        size = size or config.block_size  # fewer slots when generation ends before block_size (generate_tokens)
        self.shape = (batch_size, config.n_kv_head, size, config.head_dim)
        self.k, self.v = [None] * config.n_layer, [None] * config.n_layer  # allocated at the first write
        self.key_pos = torch.full((size,), self.EMPTY, device=device)  # (size,)
        self.pos = 0

    def make_room(self, T):
        """Positions pos .. pos+T-1 for the next T tokens, in slots that overwrite the oldest once full."""
        size = self.shape[2]
        if T > size:
            raise ValueError(f"{T} tokens at once do not fit the {size}-token cache")
        self.positions = torch.arange(self.pos, self.pos + T, device=self.key_pos.device)  # (T,)
        self.slots = self.positions % size  # (T,)
        self.key_pos.index_copy_(0, self.slots, self.positions)
        self.pos += T

    def update(self, i, k, v):  # layer i's new k, v (B, nkv, T, hd) -> its whole cache, each (B, nkv, size, hd)
        if self.k[i] is None:  # in the keys' dtype (fp32, or bf16 under autocast); zeros, as 0 x a NaN is NaN
            self.k[i], self.v[i] = k.new_zeros(self.shape), v.new_zeros(self.shape)
            for buf in (self.k[i], self.v[i]):  # one address for every step: a CUDA graph replays on these tensors
                torch._dynamo.mark_static_address(buf)
        self.k[i].index_copy_(2, self.slots, k)  # in place: the shapes never change
        self.v[i].index_copy_(2, self.slots, v)
        return self.k[i], self.v[i]


def forward_step(model, idx, cache):
    """The new tokens idx (B, T) through the model (and the cache, if any) -> the last one's logits (B, vocab)."""
    logits, _ = model(idx, cache=cache)
    return logits[:, -1]


@functools.cache
def compiled_step(cuda):
    """forward_step under torch.compile, made once per process, for the one-token steps after the prefill:
    their shapes never change, so it compiles once. On a GPU, mode="reduce-overhead" records the step as a
    CUDA graph and replays it, one launch for the hundreds of small kernels a batch-1 step is made of."""
    step = torch.compile(forward_step, mode="reduce-overhead" if cuda else None, fullgraph=True)

    def run(model, idx, cache):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs (its logits) are no longer needed
        return step(model, idx, cache)

    return run


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, vocab) -> (B, 1). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature  # <= 0: finite for any temperature
    if top_k is not None:  # keep the k most likely tokens
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # keep the fewest tokens whose probabilities add up to top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the first token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


@torch.inference_mode()
def generate_tokens(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                    compile=False, generator=None, vocab_size=None):
    """Yield (B, 1) next tokens for the prompts idx (B, T); generate is the way in. compile=True compiles the decode
    steps (compiled_step); the prefill and the uncached path stay eager, as their shapes vary. Only ids < vocab_size
    are drawn, for a tokenizer smaller than the model's vocabulary (padded, or HF weights fine-tuned on byte data):
    an id past the tokenizer spells no text (evaluate_tokens, which scores the model, keeps every row)."""
    block_size = model.config.block_size
    # Every step attends to all the cache's slots, filled or not, so it holds only what this generation needs,
    # rounded up to a power of two (a compiled step compiles once for each size), and block_size when it slides.
    size = min(block_size, 1 << (idx.size(1) + max_new_tokens - 1).bit_length())
    cache = KVCache(model.config, idx.size(0), idx.device, size) if use_cache else None
    step = compiled_step(idx.is_cuda) if compile else forward_step
    new = idx  # (B, T): what the cache has not seen, the prompt at first, then the token sampled last
    for _ in range(max_new_tokens):
        if cache is not None and cache.pos >= model.positions.max_len:
            cache = None  # no position embedding beyond block_size: re-encode the window from here on
        if cache is None:
            logits = forward_step(model, idx[:, -block_size:], None)  # (B, vocab)
        else:
            prefill = cache.pos == 0
            cache.make_room(new.size(1))
            logits = (forward_step if prefill else step)(model, new, cache)  # (B, vocab)
        new = sample_next(logits[:, :vocab_size], temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat((idx, new), dim=1)
        yield new


def generate(model, idx, max_new_tokens, *, stream=False, **options):
    """idx (B, T) -> (B, T + max_new_tokens); with stream=True, an iterator over the new tokens,
    each (B, 1). options: temperature, top_k, top_p, use_cache, compile, generator, vocab_size (see
    generate_tokens). A bad prompt (1 <= T <= block_size) raises here, before any token. use_cache=False
    re-encodes the last block_size tokens every step: past block_size see the NOTE above KVCache."""
    if idx.size(1) == 0:
        raise ValueError("empty prompt: give at least one token")
    if idx.size(1) > model.config.block_size:
        raise ValueError(f"prompt of {idx.size(1)} tokens is longer than the context "
                         f"(block_size={model.config.block_size})")
    tokens = generate_tokens(model, idx, max_new_tokens, **options)
    return tokens if stream else torch.cat([idx, *tokens], dim=1)




# -----------------------------------------------------------------------------
# 13. Commands
# What the command line runs: training (the default), --sample, --eval (perplexity or
# HellaSwag) and --export-hf / --export-gguf, each handing over to the sections above.


def train_and_sample(args):
    """The default command: train (alone, or as one of torchrun's processes), draw loss.png, print a sample."""
    dist = Distributed()
    device = pick_device(args.device, dist.local_rank)
    dtype = pick_dtype(args.dtype, device)
    if args.compile is None:
        args.compile = device.type == "cuda"  # on small CPU models compiling costs ~30 s and buys nothing
    with dist.running(device):
        trained = train(args, dist, device, dtype)
        if trained is None:  # stopped by a signal, after a save, or resumed already complete
            return
        model, tokenizer = trained
        if tokenizer is None:  # train() said at its start what needs the tokenizer, and how to provide it
            if dist.master:
                print(f"no sample: the tokenizer {read_meta(args.data)['tokenizer']} could not be loaded", flush=True)
            return
        if dist.master:  # loss.png; on tiny Shakespeare with nanoGPT's CPU recipe as the loss to beat
            plot_run(args.out_dir, read_meta(args.data))
        # NOTE: under FSDP no process holds a whole weight; each forward gathers them from all, so all sample
        # together (rank 0 prints). Otherwise rank 0 samples alone.
        if dist.master or args.fsdp:
            prompt = torch.tensor([tokenizer.encode("\n")], device=device)
            model.eval()
            with autocast(device, dtype):
                out = generate(model, prompt, 300, temperature=0.8, top_k=200, vocab_size=tokenizer.vocab_size)
            if dist.master:
                print("--- sample ---\n" + tokenizer.decode(out[0].tolist()), flush=True)


def load_for_inference(args, device):
    """(model in eval mode, tokenizer) from --ckpt or --init-from, with the tokenizer recorded beside the weights."""
    if args.ckpt:
        ckpt = load_checkpoint(args.ckpt)
        model, tokenizer_name = model_from_checkpoint(ckpt, args.ckpt), ckpt["tokenizer"]
        tokenizer_json = ckpt.get("tokenizer_json")  # a trained BPE travels inside its checkpoint
    else:  # parse_args made sure there is one of the two
        model = GPT.from_pretrained(args.init_from)
        tokenizer_name, tokenizer_json = convert.hf_tokenizer_name(convert.hf_folder(args.init_from)), None
    if args.block_size:
        model.set_block_size(args.block_size)
    tokenizer = get_tokenizer(tokenizer_name, tokenizer_json)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_name} has {tokenizer.vocab_size} tokens, "
                         f"more than the model's {model.config.vocab_size}")
    return model.to(device).eval(), tokenizer


def sample(args):
    """--sample: print --num-samples continuations of --prompt (--interactive: of each prompt typed), streamed."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, tokenizer = load_for_inference(args, device)
    prompts = typed_prompts() if args.interactive else [args.prompt]  # --interactive: lines typed on stdin
    generator = torch.Generator(device).manual_seed(args.seed)  # --seed: the same samples every time
    for prompt in prompts:
        if prompt.startswith("FILE:"):
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        ids = tokenizer.encode(prompt)
        for _ in range(args.num_samples):
            # A token can be part of a character (GPT-2's BPE splits UTF-8 bytes), so the text printed is what
            # the tokens so far decode to, less what is already on screen, once it ends on a whole character.
            new, shown = [], ""
            with autocast(device, dtype):
                stream = generate(
                    model, torch.tensor([ids], dtype=torch.long, device=device), args.max_new_tokens, stream=True,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache,
                    compile=bool(args.compile), generator=generator, vocab_size=tokenizer.vocab_size,
                )
                print(prompt, end="", flush=True)  # after generate() took the prompt: an error comes before any output
                for token in stream:
                    if token.item() == tokenizer.eot and not args.no_stop:
                        break
                    new.append(token.item())
                    text = tokenizer.decode(new)
                    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                        print(text[len(shown):], end="", flush=True)
                        shown = text
            print(tokenizer.decode(new)[len(shown):] + "\n" + "-" * 40, flush=True)


def evaluate(args):
    """--eval: the mean next-token loss (and its exp, the perplexity) over a whole text or val split, every
    token predicted once, in windows of the model's block_size (--block-size to read further)."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, tokenizer = load_for_inference(args, device)
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        tokens, source, n_bytes = tokenizer.encode(text), args.text, len(text.encode("utf-8"))
    elif args.data:  # shards must hold the ids of the model's own tokenizer
        meta = read_meta(args.data)
        if not tokenized_alike(meta, tokenizer.name, tokenizer.json):
            raise ValueError(f"{args.data} was tokenized with {meta['tokenizer']}, the model uses {tokenizer.name}"
                             f"{' trained on another text' if meta['tokenizer'] == tokenizer.name else ''}")
        files = find_shards(args.data, "val")
        tokens, source = np.concatenate([load_shard(f, meta["vocab_size"]) for f in files]), f"{args.data} (val split)"
        n_bytes = meta.get("splits", {}).get("val", {}).get("bytes")  # None: llm.c's shards, older datasets
    else:
        raise ValueError("--eval needs --data DIR (its whole val split) or --text FILE")
    if len(tokens) < 2:
        raise ValueError(f"{source}: fewer than 2 tokens, nothing to predict")
    loss, n = evaluate_tokens(model, tokens, args.batch_size, device, dtype)
    bpb = n_bytes and bits_per_byte(loss, n, n_bytes - len(tokenizer.decode_bytes([int(tokens[0])])))
    print(f"{source}: loss {loss:.4f} | perplexity {math.exp(loss):.3f} | {n:,} tokens predicted in windows of "
          f"{model.config.block_size}{f' | {bpb:.4f} bits per byte' if bpb else ''}")


def evaluate_hellaswag(args):
    """--eval --hellaswag [FILE]: HellaSwag accuracy of --ckpt or --init-from, shared out under torchrun."""
    dist = Distributed()
    device = pick_device(args.device, dist.local_rank)
    dtype = pick_dtype(args.dtype, device)
    with dist.running(device):
        model, tokenizer = load_for_inference(args, device)
        examples = hellaswag.examples(args.hellaswag, dist)
        with autocast(device, dtype):
            acc, acc_norm, n = hellaswag.accuracy(model, examples, tokenizer, device, dist, args.batch_size,
                                                  progress=dist.master)
        if dist.master:
            print(f"hellaswag: acc {acc:.4f} | acc_norm {acc_norm:.4f} | {n} examples")


def export(args):
    """--export-hf and --export-gguf (convert.py): everything checked first, then each output written whole."""
    model, tokenizer = load_for_inference(args, torch.device("cpu"))
    convert.export(model, tokenizer, args.export_hf, args.export_gguf, args.gguf_dtype)


# -----------------------------------------------------------------------------
# 14. CLI
# One entry point, main(). The model's numbers default to the --size preset (model_config
# leaves them to it), training's to the default run's RECIPE (section 1). Every value is
# checked here, before any work: a bad one is one line and exit status 2. Which flags each
# command reads (READS; any other is refused) and which must agree live in flagtypes.py.


def parse_args(argv=None):
    """The command line, checked: argparse types check each value, check_args the flags that must agree."""
    p = ArgumentParser(
        prog="transformer.py",
        description="Train a GPT (default), sample from one (--sample), measure its perplexity (--eval) "
        "or export it (--export-hf, --export-gguf).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # What to train on, and what to train: an --arch preset and a --size preset, each open to single overrides.
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"shards from prepare_data.py or llm.c (default: {DEFAULT_DATA}, made on first use)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=RECIPE["arch"], choices=list(ARCHS), help="architecture preset")
    g.add_argument("--pos", choices=POSITIONS, help="override the preset's positions")
    g.add_argument("--norm", choices=NORMS, help="override the preset's norm")
    g.add_argument("--mlp", choices=MLPS, help="override the preset's MLP")
    on_off = argparse.BooleanOptionalAction  # --qk-norm / --no-qk-norm; neither: the preset's
    g.add_argument("--tie-embeddings", action=on_off, help="the head shares the token embedding's weight")
    g.add_argument("--embed-norm", action=on_off, help="a norm right after the token embedding")
    g.add_argument("--qk-norm", action=on_off, help="q and k divided by their RMS (per head) before attention")
    g.add_argument("--logit-softcap", type=in_range(0, low_open=True), metavar="CAP", help="logits squashed to "
                   "CAP * tanh(logits / CAP)")
    g.add_argument("--zero-init-proj", action=on_off, help="the output projections start at zero")
    g.add_argument("--value-embeds", action=on_off, help="every other layer adds a per-token table to its values")
    g.add_argument("--x0-lambdas", action=on_off, help="each block reads a learned mix of the stream and the first")
    g.add_argument("--n-kv-head", type=at_least(1), help="key/value heads (grouped-query attention); default n_head")
    # the size's numbers are left None here: model_config leaves them to the preset
    g.add_argument("--size", choices=list(SIZES), help="size preset (SIZES): depth, width, context; default mini")
    g.add_argument("--n-layer", type=at_least(1), help="override the size's depth")
    g.add_argument("--n-head", type=at_least(1), help="override the size's heads")
    g.add_argument("--n-embd", type=at_least(1), help="override the size's width")
    # the context the model has vs the windows it trains on: a model may read further than it trains
    g.add_argument("--block-size", type=at_least(1), help="the model's context; default --seq-len, else the size's. "
                   "--sample/--eval: a longer context than trained, for RoPE and ALiBi, which see only distances")
    g.add_argument("--seq-len", type=at_least(1), help="T, the tokens of one training sequence; default --block-size")
    g.add_argument("--dropout", type=in_range(0, 1, high_open=True), default=RECIPE["dropout"], help="in [0, 1)")
    g.add_argument("--init-from", help="start from HF weights: gpt2, gpt2-medium, ... or a local HF checkpoint folder")

    # The optimization, RECIPE's by default. For GPT-2 on FineWeb, start from nanoGPT's (README: "Recipes").
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=at_least(1), default=RECIPE["batch_size"], help="B, per process and micro-step")
    g.add_argument("--total-batch-tokens", type=at_least(1), help="tokens a step; default B x T x processes")
    g.add_argument("--max-steps", type=at_least(1), default=RECIPE["max_steps"])
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                   help="muon: Muon for the blocks' matrices (--muon-lr), AdamW for the rest (--lr); torch >= 2.9")
    g.add_argument("--lr", type=in_range(0, low_open=True), default=RECIPE["lr"], help="AdamW's peak lr")
    g.add_argument("--muon-lr", type=in_range(0, low_open=True), default=RECIPE["muon_lr"], help="Muon's peak lr")
    g.add_argument("--min-lr", type=in_range(0), default=RECIPE["min_lr"], help="the cosine ends here; <= --lr")
    g.add_argument("--warmup-steps", type=at_least(0), default=RECIPE["warmup_steps"])
    g.add_argument("--lr-decay-steps", type=at_least(1), help="length of the cosine schedule; default --max-steps")
    g.add_argument("--weight-decay", type=in_range(0), default=RECIPE["weight_decay"])
    g.add_argument("--grad-clip", type=in_range(0, low_open=True), default=RECIPE["grad_clip"], help="max grad norm")
    g.add_argument("--seed", type=at_least(0, 2**32 - 1), default=RECIPE["seed"])

    # Where the run writes and how often it logs (a host-device sync), evaluates and saves.
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out-dir", default="checkpoints", help="ckpt.pt, metrics.jsonl and loss.png go here")
    g.add_argument("--log-every", type=at_least(1), default=RECIPE["log_every"])
    g.add_argument("--eval-every", type=at_least(1), default=RECIPE["eval_every"], help="every N steps and at the end")
    g.add_argument("--eval-iters", type=at_least(1), default=RECIPE["eval_iters"])
    g.add_argument("--ckpt-every", type=at_least(1), default=RECIPE["ckpt_every"])
    g.add_argument("--ckpt-format", choices=["file", "sharded"], help="file: one ckpt.pt, gathered to rank 0; sharded: "
                   "step_N/ folders, each process writing its own shards (default under --fsdp; any --ckpt reads both)")
    g.add_argument("--keep-checkpoints", type=at_least(1), default=1, metavar="K", help="sharded: keep the newest K")
    g.add_argument("--async-save", action="store_true", help="sharded: write in the background while training goes on")
    g.add_argument("--resume", nargs="?", const=True, choices=["auto"], help="continue from OUT_DIR's checkpoint; "
                   "auto: if there is one, else start fresh (for torchrun --max-restarts and requeued jobs)")
    g.add_argument("--hellaswag-every", type=at_least(1), metavar="N", help="HellaSwag acc_norm every N steps and "
                   "at the end, into metrics.jsonl; on --hellaswag FILE, else the official val set")
    g.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (pip install wandb)")

    # How the run uses the machine: bf16 autocast and torch.compile on a GPU, fp32 and eager on a CPU by default.
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", type=device_name, help="auto: cuda > mps > cpu (torchrun: LOCAL_RANK)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on CUDA where supported, fp16 on older GPUs, fp32 elsewhere")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile (default: on CUDA only); --sample compiles its decode step when asked")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    g.add_argument("--fsdp", nargs="?", const=True, choices=["hsdp"], help="under torchrun: shard weights, "
                   "gradients and AdamW state over the processes (FSDP2) instead of a full copy on each (DDP); hsdp: "
                   "shard within each node, replicate across nodes (a 2-D mesh); checkpoints sharded")

    # --sample and --eval read a checkpoint (--ckpt) or HF weights (--init-from) and never train.
    g = p.add_argument_group("sampling (--sample) and evaluation (--eval)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sample", action="store_true", help="generate text from --ckpt or --init-from")
    mode.add_argument("--eval", action="store_true",
                      help="loss and perplexity of --ckpt or --init-from on --data's val split, --text or --hellaswag")
    g.add_argument("--ckpt", help="a checkpoint written by training: ckpt.pt, a step folder, or a run's --out-dir")
    g.add_argument("--prompt", default="\n", help="text, or FILE:path to read it from a file")
    g.add_argument("--num-samples", type=at_least(1), default=1)
    g.add_argument("--max-new-tokens", type=at_least(1), default=500)
    g.add_argument("--temperature", type=in_range(0), default=0.8, help="0 is greedy")
    g.add_argument("--top-k", type=at_least(1), default=200, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=in_range(0, 1, low_open=True), help="sample among the fewest tokens of mass p")
    g.add_argument("--no-stop", action="store_true", help="keep generating past the end-of-text token")
    g.add_argument("--no-cache", action="store_true", help="re-encode the last block_size tokens every step, no KV "
                   "cache (for comparison): the same up to block_size tokens; past it, RoPE and ALiBi models of 2+ "
                   "layers differ, as the cache keeps keys computed while older tokens were in the window")
    g.add_argument("--interactive", action="store_true", help="--sample each prompt typed on the terminal (or piped "
                   "in), one a line, streaming its continuation; an empty line or Ctrl-D ends")
    g.add_argument("--text", help="--eval on this text file instead of --data")
    g.add_argument("--hellaswag", nargs="?", const=hellaswag.URL, metavar="FILE",
                   help="--eval: HellaSwag accuracy on a jsonl FILE in the official format; without FILE, the "
                   "official val set, downloaded once to ~/.cache/transformer.py/. --batch-size examples a forward")

    # Writing a trained model for other tools (section 13). Both exports can run in one command.
    g = p.add_argument_group("export (of --ckpt or --init-from)")
    g.add_argument("--export-hf", metavar="DIR", help="write an HF transformers folder (config, safetensors, "
                   "tokenizer) for AutoModelForCausalLM and AutoTokenizer; DIR must be new or empty")
    g.add_argument("--export-gguf", metavar="FILE", help="write a new GGUF file for llama.cpp (pip install gguf)")
    g.add_argument("--gguf-dtype", default="f16", choices=["f32", "f16"], help="the matrices'; the rest stays f32")
    args = p.parse_args(argv)
    for action in p._actions:  # parsed again without defaults, only the flags typed remain: given, even at a default
        action.default = argparse.SUPPRESS
    check_args(p, args, given=list(vars(p.parse_args(argv))))
    return args


def check_args(p, args, given):
    """What no single flag can check: check_flags (flagtypes.py) refuses a flag the command does not read and flags
    that disagree (given: those typed on the command line); here GPTConfig judges the shape. p.error: one line."""
    check_flags(p, args, given)
    if command(args) != "training":
        return
    # --resume continues the run its checkpoint holds: each flag not given is that run's, not today's default (a
    # run from --init-from took its shape from the weights, and takes it from them again)
    shape_flags = ("size", "n_layer", "n_head", "n_embd", "block_size", *ARCH_FLAGS)
    run = trained_args(args.out_dir) if args.resume else {}
    for name in RESUMED:
        if name in run and name not in given and not (run.get("init_from") and name in shape_flags):
            setattr(args, name, run[name])
    # The model: GPTConfig is the one judge of a shape and the presets the one source of defaults, so the flags
    # build the config here (the data's vocabulary is read later, and cannot make a shape impossible).
    shape = [f for f in shape_flags if getattr(args, f) is not None]
    if args.init_from and shape:  # HF weights fix all of these; a flag that cannot act is refused, not ignored
        p.error(f"--init-from {args.init_from} brings its own shape: drop --{shape[0].replace('_', '-')}")
    args.block_size = args.block_size or args.seq_len  # --seq-len 256 alone trains a 256-token model
    try:
        config = model_config(args, vocab_size=256)
    except ValueError as e:  # said with the flags' names: "n_embd=65" is --n-embd 65
        p.error(re.sub(r"\b(n_\w+|block_size)=", lambda m: f"--{m[1].replace('_', '-')} ", str(e)))
    args.block_size = config.block_size  # the context, and by default the length of the training windows
    args.seq_len = args.seq_len or args.block_size
    if args.seq_len > args.block_size:  # learned positions have no vector past block_size
        p.error(f"--seq-len {args.seq_len} is longer than the model's context, --block-size {args.block_size}")
    # An optimizer step adds up whole micro-steps: B x T tokens on each process (torchrun sets WORLD_SIZE)
    micro = args.batch_size * args.seq_len * int(os.environ.get("WORLD_SIZE", 1))
    if args.total_batch_tokens is not None and args.total_batch_tokens % micro:
        p.error(f"--total-batch-tokens {args.total_batch_tokens} is not a multiple of "
                f"batch x seq-len x processes = {micro}")


def main(argv=None):
    """Parse (a bad flag exits 2 with one line), then run one command. The errors a user can cause (a missing
    file, a wrong checkpoint, no network) are ValueError or OSError: one line, exit status 1; the rest are bugs."""
    args = parse_args(argv)
    run = {"training": train_and_sample, "--sample": sample, "--eval": evaluate,
           "--eval --hellaswag": evaluate_hellaswag, "--export-hf/--export-gguf": export}[command(args)]
    try:
        run(args)
    except ModuleNotFoundError as e:  # a package only some flags need
        error = f"this needs the {e.name} package: pip install -r requirements-extras.txt"
    except (ValueError, OSError) as e:
        error = str(e)
    else:
        return
    # NOTE: one write, so the same line from every torchrun process on one stderr pipe stays whole lines (print
    # writes the text and the newline apart, and another process's line could land between them)
    sys.stderr.write(f"transformer.py: error: {error}\n")
    sys.stderr.flush()
    sys.exit(1)


if __name__ == "__main__":
    main()
    if Distributed.finished_on_gloo:  # Distributed.running's NOTE: skip Python's shutdown, everything written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
