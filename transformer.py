"""
transformer.py: a GPT you can read top to bottom, train on a CPU, a GPU or many, and sample from.

    python transformer.py                          # prepare tiny Shakespeare, train, save, print a sample
    python transformer.py --sample --ckpt checkpoints/ckpt.pt --prompt "ROMEO:"
    python transformer.py --eval --ckpt checkpoints/ckpt.pt --data data/shakespeare_byte
    python transformer.py --export-hf out/hf --export-gguf out/model.gguf --ckpt checkpoints/ckpt.pt
    torchrun --standalone --nproc_per_node=8 transformer.py --data data/fineweb --arch gpt2 ...

The file is a story, in this order:
    1. Config       GPTConfig: sizes (tiny, mini, gpt2 ... gpt2-xl) and architectures (gpt2, llama, olmo, nanochat)
    2. Positions    learned, RoPE or ALiBi, decided in one place (Positions), and the attention mask
    3. Attention    causal self-attention: PyTorch's fused SDPA kernel beside an explicit reference path
    4. MLP          GELU (GPT-2), SwiGLU (LLaMA) or ReLU² (nanochat)
    5. Block        pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))
    6. Model        GPT: embeddings, blocks, tied head; init; forward; from_pretrained; generate (KV cache)
    7. Data         DataLoaderLite over token shards of any vocabulary (shards.py); bits per byte
    8. Processes    device and dtype, the processes torchrun starts (DDP), stop signals
    9. Checkpoints  everything a run needs to continue exactly, read back without running code
   10. Evaluation   the val loss the loop logs, perplexity over a whole text, HellaSwag accuracy
   11. Training     AdamW (or Muon), the lr schedule, and the loop: step, log, evaluate, save
   12. Commands     train, sample, eval, export
   13. CLI          argparse and main()
Beside it, companion files hold the tooling the story does not need first; they never import this file:
    convert.py      HF transformers and GGUF (llama.cpp): weights, configs, tokenizer files
    fsdp.py         --fsdp: sharding the model, gathering and scattering its state; sharded checkpoints
    hellaswag.py    the HellaSwag benchmark: read, render, score
    metrics.py      MFU, metrics.jsonl, loss.png
    files.py        files that are whole or absent: atomic writes, downloads
    flagtypes.py    argparse types that check every value, errors on one line
    tokenizer.py    text to ids and back: bytes, tiktoken, HF tokenizers, a BPE trained on the data
    shards.py       the token shard format (ours and llm.c's) and a dataset's meta.json
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import convert
import fsdp
import hellaswag
from files import atomic_open
from flagtypes import ArgumentParser, at_least, device_name, in_range
from metrics import MetricsLog, log_line, mfu, peak_flops, plot_metrics
from shards import find_shards, load_shard, read_meta
from tokenizer import get_tokenizer

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
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),  # the default run: Shakespeare's characters, a CPU
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
    """Rotate x (B, nh, T, hd) by cos/sin (T, hd).

    This is HF's 'half-split' layout: dimension i is paired with i + hd/2, so HF Llama
    checkpoints load unchanged. Meta's original code pairs neighbours (2i, 2i+1) instead;
    its q/k weights are the same up to a permutation of their rows.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hd/2) each: the two halves that form pairs
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate each (x1, x2) pair by 90 degrees
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_slopes(n_head):
    """Per-head slopes of ALiBi (Press et al. 2022): the geometric series 2^(-8/n), 2^(-16/n), ...

    For a head count that is not a power of two, the paper takes the slopes of the
    closest power of two below it, then every other slope of the next power up.
    """

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
    each other, or, with a KV cache (section 9), at the positions it gives them attending to every key it holds:
        pos_emb (T, C)   added to the token embeddings (learned), else None
        rope             (cos, sin), each (T, hd), to rotate q and k by (rope), else None
        bias             the additive attention mask (attention_bias): None for plain causal
                         attention, else (1, nh or 1, T, S), with ALiBi's distance penalty (alibi)
    GPT keeps it under GPT-2's name for its learned position embedding, transformer.wpe, so that
    GPT-2 checkpoints load unchanged; only the learned scheme has a weight."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # the model's own: GPT.set_block_size changes it for both
        # the furthest position a token may sit at: learned vectors end at block_size; RoPE and ALiBi
        # only see distances, so a sliding window of block_size tokens can run on forever
        self.max_len = config.block_size if config.pos == "learned" else math.inf
        if config.pos == "learned":
            self.weight = nn.Parameter(torch.empty(config.block_size, config.n_embd))  # one vector per position
        self.make_tables()

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
    def __init__(self, config, value_embed=False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.attn_impl, self.dropout = config.attn_impl, config.dropout
        self.qk_norm, self.norm_eps = config.qk_norm, config.norm_eps
        # q, k and v for all heads in one matmul
        qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # with a value embedding: a gate per kv head, read off the first channels of x (nanochat: 12)
        self.ve_gate = nn.Linear(min(12, config.n_embd), config.n_kv_head, bias=False) if value_embed else None

    def forward(self, x, rope=None, bias=None, cache=None, ve=None):
        """x (B, T, C); rope: (cos, sin) or None; bias: None for plain causal attention (see
        attention_bias), else an additive (1, nh or 1, T, S) float mask; cache: this layer's
        view of the KVCache during generation, whose S keys are all its slots, filled or not;
        ve: the tokens' value embeddings (B, T, nkv*hd), or None."""
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
            k, v = cache.update(k, v)  # (B, nkv, S, hd): every slot of the cache, these written into theirs
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
        self.attn = CausalSelfAttention(config, has_value_embed(config, layer))
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
# model from pushing its logits ever further, for stability. zero_init_proj (modded-nanogpt,
# nanochat) starts every block's output projections at zero, so each block starts as the
# identity and the model as a bigram model, which the blocks then learn to build on.
# x0_lambdas (modded-nanogpt, nanochat's current model) give each block two learned scalars:
# it reads resid_lambda * x + x0_lambda * x0, x0 being the stream as it entered the first block,
# so a deep layer can scale the stream down or reach back to the tokens themselves. They start
# at 1 and 0: the model as without them. The value embeddings' tables (section 3) live here.
# from_pretrained reads HF checkpoints with convert.py's converters. The section ends with
# generation: the model fed its own output one token at a time, with a KV cache.


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
        self.transformer["wpe"] = Positions(config)  # after ln_f, where GPT-2's wpe was: the same init order
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
        positions = self.transformer.wpe
        if block_size > positions.max_len:
            raise ValueError(f"--block-size {block_size}: this model's learned position embeddings end at "
                             f"{positions.max_len}; RoPE and ALiBi models can read past their training length")
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

        targets (B, T) are idx shifted left by one; -1 marks a position to ignore. With a
        KVCache (below), idx holds only the new tokens and the cache supplies the keys and
        values before them; the generation loop, not the model, gives the new tokens their
        positions in it.
        """
        B, T = idx.size()
        pos_emb, rope, bias = self.transformer.wpe(T, idx.device, cache)
        x = self.transformer.wte(idx)  # (B, T, C)
        if pos_emb is not None:
            x = x + pos_emb  # (T, C) broadcast over the batch
        x = x0 = self.transformer.drop(self.transformer.ln_emb(x))  # ln_emb: a norm (embed_norm) or nothing
        for i, block in enumerate(self.transformer.h):
            layer_cache = cache.layer(i) if cache is not None else None
            if self.config.x0_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.transformer.ve[str(i)](idx) if str(i) in self.transformer.ve else None  # (B, T, nkv*hd)
            if self.grad_checkpointing and self.training:  # recompute activations in backward: less memory
                x = torch.utils.checkpoint.checkpoint(block, x, rope, bias, layer_cache, ve, use_reentrant=False)
            else:
                x = block(x, rope, bias, layer_cache, ve)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap is not None:  # in fp32, as nanochat and HF do: tanh needs the precision
            logits = self.config.logit_softcap * torch.tanh(logits.float() / self.config.logit_softcap)
        loss = None
        if targets is not None:
            # (B*T, vocab) against (B*T,): the mean over every position of every sequence, in fp32
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def generate(self, idx, max_new_tokens, *, stream=False, **options):
        """idx (B, T) -> (B, T + max_new_tokens); with stream=True, an iterator over the new tokens,
        each (B, 1). options: temperature, top_k, top_p, use_cache, compile, generator, vocab_size (see
        generate_tokens, below). A bad prompt raises here, before any token."""
        check_prompt(idx, self.config.block_size)
        tokens = generate_tokens(self, idx, max_new_tokens, **options)
        return tokens if stream else torch.cat([idx, *tokens], dim=1)

    @classmethod
    def from_state_dict(cls, config, state_dict, source):
        """A model holding exactly state_dict's weights (checked: names and shapes; source names them in errors).
        Built on the meta device: no memory and no random init for weights that are about to be replaced, and
        nothing drawn from the global RNG."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")  # real storage, left uninitialised; this unties weights, so tie them again
        model.tie_weights()
        model.transformer.wpe.make_tables()
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
        """Load HF weights: GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), Llama-family or NanoChat
        models from the hub, or any local directory holding an HF GPT2LMHeadModel, LlamaForCausalLM or
        NanoChatForCausalLM checkpoint (config.json + *.safetensors or pytorch_model.bin). Which
        tokenizer its ids mean: convert.hf_tokenizer_name."""
        from transformers import AutoConfig  # only this function needs transformers

        path = convert.hf_folder(name_or_path)
        hf = AutoConfig.from_pretrained(path)
        if hf.model_type not in convert.HF_LOADERS:
            raise ValueError(f"{name_or_path}: model_type {hf.model_type!r} is not supported "
                             f"(supported: {', '.join(convert.HF_LOADERS)})")
        config_from_hf, weights_from_hf = convert.HF_LOADERS[hf.model_type]
        config = GPTConfig.preset("gpt2", hf.model_type, dropout=dropout, **config_from_hf(hf))
        return cls.from_state_dict(config, weights_from_hf(convert.read_hf_weights(path), config), name_or_path)


# Generation feeds the model its own output one token at a time. Without a cache every
# step re-encodes the whole prefix; with a KV cache the prompt is encoded once (prefill)
# and each step computes only the new token's keys and values, attending to the stored
# ones. The model only reads the cache (GPT.forward); this loop gives the new tokens their
# places in it. The cache has one fixed shape, block_size slots a layer, written in place,
# and attention is masked to the filled ones: every decode step then has the same shapes, so
# --compile compiles it once (and on a GPU replays it as a CUDA graph), whatever the position.
# Past block_size the cache slides: the newest token overwrites the oldest slot, and RoPE and
# ALiBi, which only see distances, carry on. Learned positions end at block_size, so from
# there every step re-encodes the last block_size tokens, as the uncached path does.


class KVCache:
    """Keys and values of every layer in fixed-shape buffers: k[i] and v[i] are (B, n_kv_head, size, head_dim),
    size = block_size unless given, a ring: the token at absolute position p sits in slot p % size. key_pos
    (size,) holds the position in each slot (EMPTY, far in the future, until written: attention masks it out).
    `pos` counts every token seen (the absolute position of the next one); make_room gives the next T
    their positions (a tensor, so a compiled step reads them instead of specialising on them) and slots."""

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

    def layer(self, i):
        return LayerCache(self, i)


class LayerCache:
    """One layer's view of the KVCache, handed to its attention."""

    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    def update(self, k, v):  # k, v (B, nkv, T, hd) -> the layer's whole cache, each (B, nkv, block_size, hd)
        c, i = self.cache, self.i
        if c.k[i] is None:  # in the keys' dtype (fp32, or bf16 under autocast); zeros, as 0 x a NaN is NaN
            c.k[i], c.v[i] = k.new_zeros(c.shape), v.new_zeros(c.shape)
            for buf in (c.k[i], c.v[i]):  # one address for every step: a CUDA graph replays on these tensors
                torch._dynamo.mark_static_address(buf)
        c.k[i].index_copy_(2, c.slots, k)  # in place: the shapes never change
        c.v[i].index_copy_(2, c.slots, v)
        return c.k[i], c.v[i]


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


def check_prompt(idx, block_size):
    """A prompt idx (B, T) must have 1 <= T <= block_size tokens."""
    if idx.size(1) == 0:
        raise ValueError("empty prompt: give at least one token")
    if idx.size(1) > block_size:
        raise ValueError(f"prompt of {idx.size(1)} tokens is longer than the context (block_size={block_size})")


@torch.inference_mode()
def generate_tokens(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                    compile=False, generator=None, vocab_size=None):
    """Yield (B, 1) next tokens for the prompts idx (B, T); GPT.generate is the way in. compile=True runs
    the decode steps compiled (compiled_step); the prefill and the uncached path stay eager, as their shapes
    vary. Only ids < vocab_size are drawn, for a tokenizer smaller than the model's vocabulary (HF weights
    fine-tuned on byte data, say)."""
    block_size = model.config.block_size
    # Every step attends to all the cache's slots, filled or not, so it holds only what this generation needs,
    # rounded up to a power of two (a compiled step compiles once for each size), and block_size when it slides.
    size = min(block_size, 1 << (idx.size(1) + max_new_tokens - 1).bit_length())
    cache = KVCache(model.config, idx.size(0), idx.device, size) if use_cache else None
    step = compiled_step(idx.is_cuda) if compile else forward_step
    new = idx  # (B, T): what the cache has not seen, the prompt at first, then the token sampled last
    for _ in range(max_new_tokens):
        if cache is not None and cache.pos >= model.transformer.wpe.max_len:
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


# -----------------------------------------------------------------------------
# 7. Data
# Training reads token ids that prepare_data.py wrote ahead of time, so the GPU never
# waits for a tokenizer (tokenizer.py). The ids lie in shards (shards.py): a 1 KiB header,
# then the tokens as uint16 while the vocabulary fits in 65,536 ids, else uint32,
# memory-mapped as they lie on disk; llm.c's shards read as they are. meta.json names the
# tokenizer and counts each split's tokens and the UTF-8 bytes they spell, so a loss per
# token also reads as bits per byte, the scale on which tokenizers compare.


def bits_per_byte(loss, n_tokens, n_bytes):
    """A mean loss (nats per token) over n_tokens tokens that spell n_bytes UTF-8 bytes, in bits per byte
    (nanochat's val_bpb): the text's total loss is loss * n_tokens nats, and a nat is 1/ln 2 bits. Models with
    different tokenizers compare on this scale, not per token.

    --eval's loss covers a whole text or val split (meta.json's splits.val.bytes), every token but the first,
    so it divides by exactly the bytes predicted. NOTE: the training log's val loss is an estimate from
    --eval-iters random windows, not the whole split; it is converted at the whole val split's tokens per byte."""
    return loss * n_tokens / (n_bytes * math.log(2))


class DataLoaderLite:
    """Batches of B windows of T + 1 tokens, (B, T+1) int64, from one split's shards: x = buf[:, :-1] and
    the targets y = buf[:, 1:] are the same window shifted by one.

    Each epoch cuts every shard into windows of T + 1 tokens starting at a random offset and visits
    the windows in a random order, both drawn from (seed, epoch) alone. The unit of reading is one
    optimizer step: B x num_processes x grad_accum consecutive windows of that order. Micro-step m
    of rank r takes windows (m * num_processes + r) * B ... + B - 1 of the step's block.

    NOTE: so any split of the same total batch (8 processes x B, or 1 process x B x 8 accumulation
    steps, ...) reads the same windows in the same steps, the epoch boundary included (the tail
    that does not fill a whole step is dropped); the optimizer sees the same mean gradient, and a
    checkpoint written under one split resumes under another. (epoch, step) is the whole state.
    """

    def __init__(self, data_dir, split, B, T, process_rank=0, num_processes=1, grad_accum=1, seed=0, pin_memory=False):
        files = find_shards(data_dir, split)
        meta_path = os.path.join(data_dir, "meta.json")
        vocab_size = read_meta(data_dir)["vocab_size"] if os.path.exists(meta_path) else None
        self.shards = [load_shard(f, vocab_size) for f in files]
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


DEFAULT_DATA = os.path.join("data", "shakespeare_byte")  # where the default run prepares its data


def prepare_default_data(data_dir):
    """The default run's data: tiny Shakespeare at byte (= character) level, prepared on first use by
    prepare_data.py, run as a program (it imports this file; this file never imports it)."""
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
        done = subprocess.run([sys.executable, script, "--tokenizer", "byte", "--out", data_dir, "--overwrite"])
        if done.returncode != 0:
            raise SystemExit(done.returncode)  # prepare_data.py has said why, in one line


# -----------------------------------------------------------------------------
# 8. Processes
# What a run needs around the model: a device and a dtype; under torchrun, the process
# group every process joins (one process per GPU), the model wrapped so that backward
# averages the gradients over the processes (DDP); and stop signals that end a run at a
# step's end, not in the middle of one.


def pick_device(name, local_rank=0):
    """'auto': cuda > mps > cpu. Under torchrun each process drives its own GPU, so a bare 'cuda'
    becomes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


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


def synchronize(device):
    """Wait for the GPU to finish what was queued (for honest timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Distributed:
    """Rank and world size from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); one process otherwise."""

    finished_on_gloo = False  # set when a gloo group was torn down after success: see running's NOTE

    def __init__(self):
        self.enabled = "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0

    @contextlib.contextmanager
    def running(self, device):
        """The process group for the block inside `with`: NCCL moves GPU tensors between GPUs directly, gloo
        runs the same collectives on CPU tensors (tests). Alone, there is nothing to set up.

        NOTE: a process that dies at exit fails the whole torchrun job, and gloo can make one die: a worker
        thread of its freeing the tensors of a finished collective after Python has begun shutting down aborts
        the process (SIGABRT, "terminate called without an active exception", 1 finished run in 20 to 40 on a
        busy machine). Hence:
        - FSDP (--fsdp uses it; transformers and torch.distributed.checkpoint import it) is imported before
          the group exists: its ShardedGradScaler takes `group.WORLD` as a default argument, so imported
          later it would keep the group, and its threads, alive after destroy_process_group.
        - On success every process waits for the others before tearing down. After an error there is no
          waiting: a peer may never arrive.
        - On gloo (CPU) a finished process ends right after destroy_process_group, everything written, closed
          and flushed, skipping Python's shutdown: under --fsdp torch's DTensor keeps the group and gloo's
          threads alive regardless. The program's entry (the end of this file) does that, when running has set
          Distributed.finished_on_gloo: library code never ends its caller's process."""
        if not self.enabled:
            yield
            return
        import torch.distributed.fsdp  # noqa: F401  (see the NOTE: before init_process_group)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        # NOTE: torchrun --max-restarts keeps one store for every attempt, the killed attempt's keys still in it:
        # a restarted gloo group reads a dead peer's address and hangs or fails. Each attempt gets its own keys.
        store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and torch.distributed.PrefixStore(
            f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}",
            torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False))
        torch.distributed.init_process_group(backend, store=store or None, rank=self.rank, world_size=self.world,
                                             device_id=device_id)
        try:
            yield
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
        Distributed.finished_on_gloo = backend == "gloo"

    def sum(self, t):
        """Sum a tensor over processes, in place."""
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def barrier(self):
        # wait until every process gets here (rank 0 preparing data or downloading, the others waiting)
        if self.enabled:
            torch.distributed.barrier()


class StopSignal:
    """Inside `with StopSignal() as stop:`, SIGINT / SIGTERM only set stop.requested, so the loop
    can finish its step, save a checkpoint and exit cleanly; the old handlers come back after."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True


def wrap_model(model, args, dist, device, dtype, init=None):
    """What runs the steps: the model, under torchrun inside DDP or, with --fsdp, sharded in place (fsdp.py; a model
    built inside init, an fsdp.DeferredInit, then initialised shard by shard); compiled.

    NOTE: DDP options: gradient_as_bucket_view lets gradients live in DDP's all-reduce buckets (no copy,
    less memory); broadcast_buffers=False since our only buffers (RoPE tables, ALiBi slopes) are computed
    from the config, identical on every process, and need no broadcast each step."""
    if args.fsdp:
        fsdp.shard(model, dtype, init, device, hsdp=args.fsdp == "hsdp")
    if args.compile:  # compiled first, then wrapped by DDP (as nanoGPT does)
        model = torch.compile(model)
    if dist.enabled and not args.fsdp:
        with warnings.catch_warnings():  # newer torch suggests forward_sync_buffers: older ones lack it, and it
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")  # still syncs at init
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True, broadcast_buffers=False,
            )
    return model


# -----------------------------------------------------------------------------
# 9. Checkpoints
# A checkpoint holds all of a run's state: weights, optimizer state, loss scale, the data
# loader's position, the step, and every process's RNG state, so a resumed run continues
# exactly, even after a kill -9 (files.atomic_open: the old file or the new one, never half).
# It is read back with weights_only=True: tensors and plain containers only, never code.


CKPT_FORMAT = "transformer.py/1"  # stored in every checkpoint, so other files are told apart


def save_checkpoint(path, state):
    with atomic_open(path) as f:
        torch.save(state, f)


def load_checkpoint(path):
    """weights_only=True: only tensors and plain containers are rebuilt, so a file can never run code.
    mmap=True: tensors are read from the file as they are used, so eight processes resuming on one
    machine do not each copy the whole checkpoint into host RAM first."""
    path = fsdp.newest(path) if os.path.isdir(path) else path  # a run's --out-dir: its newest complete checkpoint
    if os.path.isdir(path):  # a sharded step folder: its weights read whole, in this one process
        return {**fsdp.read_train_state(path), "model": fsdp.read_model_state(path)}
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a pickle asking for code or unknown classes, or not a torch file at all
        reason = str(e).strip().splitlines()[0][:200]
        raise fsdp.Unreadable(f"{path}: refused to load: not a plain transformer.py checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a transformer.py checkpoint (no '{CKPT_FORMAT}' format tag)")
    return ckpt


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
        raise ValueError(f"{path} was trained on {ckpt['tokenizer']} tokens, not on this --data's "
                         f"{meta['tokenizer']} tokens: resume on data made with the same tokenizer")
    theirs = GPTConfig(**ckpt["config"]).architecture()  # an older checkpoint's: the fields it lacks at default
    diff = [f"{k}={theirs[k]!r} (now {v!r})" for k, v in config.architecture().items() if theirs[k] != v]
    if diff:
        raise ValueError(f"{path} was trained with another model config: {', '.join(diff)}; "
                         "use the same model flags to resume")
    if ckpt["args"].get("optimizer", "adamw") != optimizer:
        raise ValueError(f"{path} was trained with --optimizer {ckpt['args']['optimizer']}: resume with the same one")


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def seed_rng(ckpt, seed, dist, device):
    """Set the global RNGs (dropout masks) for the loop: a resumed run restores its own process's state,
    so its masks continue exactly; a new run seeds each process differently, so their masks differ.

    NOTE: this is the last thing before the loop, on purpose: anything drawn from the global RNG after
    it (a random matrix to time a matmul, say) would shift every later dropout mask of a resumed run."""
    if ckpt is not None and len(ckpt["rng"]) == dist.world:
        torch.set_rng_state(ckpt["rng"][dist.rank]["cpu"])
        if "cuda" in ckpt["rng"][dist.rank] and device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][dist.rank]["cuda"], device)
        return
    # A new run, or a resume under another number of processes (the masks cannot continue exactly then).
    torch.manual_seed(seed + dist.rank + (ckpt["step"] if ckpt is not None else 0))


# -----------------------------------------------------------------------------
# 10. Evaluation
# How good a model is, measured three ways: the val loss the training loop logs (the same
# few batches every time, so the points of a run compare), the loss over every token of a
# whole text (--eval: perplexity), and HellaSwag's multiple choice (hellaswag.py).


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
def evaluate_tokens(model, tokens, batch_size, device, dtype, vocab_size=None, progress=True):
    """Mean next-token loss over a whole token stream, cut into windows of block_size + 1 tokens
    that overlap by one, so every token after the first is predicted exactly once.
    Returns (mean loss, number of tokens predicted)."""
    from tqdm import tqdm

    T = model.config.block_size
    tokens = np.asarray(tokens)
    n_full = (len(tokens) - 1) // T

    def loss_sum(rows):  # rows (b, n + 1) -> summed loss of predicting rows[:, 1:]
        buf = torch.from_numpy(rows.astype(np.int64)).to(device)
        with autocast(device, dtype):
            logits, _ = model(buf[:, :-1])  # (b, n, vocab)
        logits = logits[..., :vocab_size]  # the tokenizer's ids only: never a padded one
        return F.cross_entropy(logits.float().flatten(0, 1), buf[:, 1:].flatten(), reduction="sum").item()

    total = 0.0
    for first in tqdm(range(0, n_full, batch_size), desc="eval", unit="batch", disable=not progress, file=sys.stderr):
        windows = range(first, min(first + batch_size, n_full))
        total += loss_sum(np.stack([tokens[w * T : w * T + T + 1] for w in windows]))  # (b, T + 1)
    if len(tokens) - 1 > n_full * T:  # the shorter last window
        total += loss_sum(tokens[n_full * T :][None])
    return total / (len(tokens) - 1), len(tokens) - 1


def load_hellaswag(path, dist):
    """The examples of --hellaswag FILE, or of the official validation set when path is hellaswag.URL:
    downloaded once into the cache, by rank 0 alone under torchrun."""
    if dist.master:
        hellaswag.local_copy(path)
    dist.barrier()
    return hellaswag.read_examples(hellaswag.local_copy(path))


def hellaswag_accuracy(model, examples, tokenizer, device, dtype, dist, batch_size, progress=False):
    """(acc, acc_norm, n) over all examples: each process scores its share, the counts are added up."""
    with autocast(device, dtype):
        counts = hellaswag.scores(model, examples, tokenizer, device, dist.rank, dist.world, batch_size, progress)
    correct, correct_norm, n = dist.sum(torch.tensor(counts, device=device)).tolist()
    return correct / n, correct_norm / n, n


# -----------------------------------------------------------------------------
# 11. Training
# AdamW with weight decay on matrices only (or Muon for the blocks' matrices), linear
# warmup then cosine decay, gradient accumulation to reach a large batch in small
# steps, gradient clipping, bf16 autocast on GPUs. Under torchrun every process runs
# this same code on its slice of each batch (section 8 wraps the model for DDP, fsdp.py
# shards it for FSDP). train() is the whole run in the order it happens: set-up, resume,
# then the loop, whose every step is forward/backward, update, log, evaluate and save.


def configure_optimizer(model, lr, weight_decay, device_type, betas=(0.9, 0.95), muon_lr=None):
    """AdamW; weight decay only on matrices (>= 2-D), not on biases and norm weights. With muon_lr, the
    blocks' matrices (attention and MLP projections) go to Muon instead, and AdamW keeps the embeddings,
    the head, the norms and the biases. train_step scales each optimizer's own lr (its defaults["lr"])
    by the schedule."""
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
    return Optimizers(muon, adamw)


# Muon (Jordan et al. 2024, as modded-nanogpt and nanochat use it) updates a weight matrix with its
# momentum made orthogonal: a few Newton-Schulz iterations push every singular value of the momentum
# towards 1, so the update moves the matrix by the same amount in every direction its gradient points,
# instead of mostly along the few largest ones. That only means something for a matrix that maps one
# hidden space to another, so the embeddings (a lookup table), the head, norms and biases stay with
# AdamW. NOTE: our c_attn (q, k, v) and SwiGLU's c_fc (gate, up) are fused, so Muon orthogonalises
# each fused matrix as one, where nanochat orthogonalises q, k and v apart.
class Optimizers:
    """Several torch optimizers stepped as one (Muon for the hidden matrices, AdamW for the rest): the
    parts of torch.optim.Optimizer that training uses, and one state_dict holding each one's."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # read anew each time: load_state_dict replaces each optimizer's groups
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {type(o).__name__: o.state_dict() for o in self.optimizers}

    def load_state_dict(self, state):
        for o in self.optimizers:
            o.load_state_dict(state[type(o).__name__])


def lr_at(step, lr, min_lr, warmup_steps, decay_steps):
    """Linear warmup to lr, cosine decay to min_lr at decay_steps, then min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# the flags that override the --arch preset, each a GPTConfig field
ARCH_FLAGS = ("pos", "norm", "mlp", "n_kv_head", "tie_embeddings", "embed_norm", "qk_norm", "logit_softcap",
              "zero_init_proj", "value_embeds", "x0_lambdas")


def model_config(args, vocab_size):
    """The model the command line describes: an --arch and a --size preset, any single flag on top. The
    embedding and the head get a vocabulary padded to a multiple of 64 (GPT-2's 50,257 -> 50,304), as nanoGPT
    does: GPU matmuls run on whole tiles. The extra ids never occur in the data, so training pushes their
    logits down, and sampling and evaluation only look at the tokenizer's ids. GPTConfig refuses a shape that
    cannot exist (ValueError)."""
    flags = (*ARCH_FLAGS, "n_layer", "n_head", "n_embd", "block_size")
    overrides = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    return GPTConfig.preset(args.size or "mini", args.arch, vocab_size=64 * math.ceil(vocab_size / 64),
                            dropout=args.dropout, **overrides)


def train(args, dist, device, dtype):
    """A training run, top to bottom. Every process under torchrun runs all of it, on its own share of each
    batch. Returns (the trained model, its tokenizer), or None when SIGINT/SIGTERM ended the run early (after
    a save)."""

    def say(*lines):
        if dist.master:  # every process runs the loop; one speaks
            print(*lines, flush=True)

    # The data. An optimizer step sees B x T tokens per process per micro-step, over all processes and
    # grad_accum micro-steps: --total-batch-tokens sets the total (check_args made sure it divides evenly).
    if args.data is None:  # the default run: tiny Shakespeare, prepared by rank 0 while the others wait
        args.data = DEFAULT_DATA
        if dist.master:
            prepare_default_data(args.data)
        dist.barrier()
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt" if args.ckpt_format == "file" else "")
    # the complete checkpoints, newest first (a save cut short is never one); plain --resume insists on one
    found = fsdp.find_checkpoints(args.out_dir) or [os.path.join(args.out_dir, "ckpt.pt")] * (args.resume is True)
    if found and not args.resume:
        raise ValueError(f"{found[0]} exists: pass --resume to continue it, or choose another --out-dir")
    meta = read_meta(args.data)
    tokenizer = get_tokenizer(meta["tokenizer"], meta.get("tokenizer_json"))  # before anything is written
    B, T = args.batch_size, args.seq_len
    tokens_per_step = args.total_batch_tokens or B * T * dist.world
    grad_accum = tokens_per_step // (B * T * dist.world)
    pin = device.type == "cuda"  # page-locked host memory: the copy to the GPU runs beside the compute
    train_loader, val_loader = (DataLoaderLite(args.data, split, B, T, dist.rank, dist.world, grad_accum,
                                               args.seed, pin) for split in ("train", "val"))
    val_split = meta.get("splits", {}).get("val", {})  # its tokens and bytes turn val losses into bits per byte

    # The model, with the same initial weights on every process, and what runs the steps (wrap_model).
    # NOTE: wrapped before the optimizer is built: --fsdp replaces raw_model's weights with their shards, and
    # the optimizer must hold those (and so load its state after them). DDP and compile leave them as they are.
    # --fsdp builds it on the meta device and each process initialises only its shards, to a whole build's values.
    torch.manual_seed(args.seed)
    init = fsdp.DeferredInit(on=args.fsdp and not args.init_from)
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
    model = wrap_model(raw_model if init.on else raw_model.to(device), args, dist, device, dtype, init)
    if init.on:  # the position tables are computed, not drawn: on the meta device they were left unset
        with device:
            raw_model.transformer.wpe.make_tables()
    muon_lr = args.muon_lr if args.optimizer == "muon" else None
    optimizer = configure_optimizer(raw_model, args.lr, args.weight_decay, device.type, muon_lr=muon_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only: small gradients
    if device.type == "cuda":  # would flush to zero, so the loss is scaled up before backward
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True

    # Resuming puts back everything the save at the bottom of the loop wrote, whatever wrote it: ckpt.pt (one
    # process, DDP or FSDP) or a sharded step folder, under any number of processes (fsdp.Checkpoints.load).
    # --resume auto starts fresh when there is none yet; one that cannot be read gives way to the one before it.
    checkpoints = fsdp.Checkpoints(args.out_dir, args.ckpt_format, args.keep_checkpoints, args.async_save, dist.rank,
                                   dist.world, save_checkpoint)
    step, val_loss, ckpt = 0, None, None  # step: optimizer steps completed
    for path in found if args.resume else []:
        try:
            ckpt = fsdp.read_train_state(path) if os.path.isdir(path) else load_checkpoint(path)
            check_resumable(ckpt, raw_model.config, args.optimizer, meta, path)
            ckpt = checkpoints.load(path, ckpt, raw_model, optimizer, rng_state(device))
            break
        except fsdp.Unreadable as e:
            if path == found[-1]:
                raise
            say(f"{e}: resuming from {found[found.index(path) + 1]} instead")
    if ckpt is not None:
        scaler.load_state_dict(ckpt["scaler"])
        train_loader.load_state_dict(ckpt["loader"])
        step, val_loss = ckpt["step"], ckpt.get("val_loss")
        say(f"resumed {path} at step {step}")

    # The log (metrics.jsonl, cut back to the resumed step), what MFU is measured against, and a few lines on
    # what is being trained.
    log = MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), step, dist.master, args.wandb, vars(args))
    examples = load_hellaswag(args.hellaswag or hellaswag.URL, dist) if args.hellaswag_every else None
    peak, peak_source = peak_flops(device)
    flops_per_token = raw_model.flops_per_token(T)
    config = raw_model.config
    vocab = f"vocab {meta['vocab_size']}"
    vocab += f" (padded to {config.vocab_size})" if config.vocab_size != meta["vocab_size"] else ""
    say(f"model: {raw_model.num_params():,} parameters | {config.pos} positions, {config.norm}, {config.mlp}, "
        f"{config.n_layer} layers x {config.n_head} heads x {config.n_embd} wide | {vocab} ({meta['tokenizer']})")
    say(f"batch: {B} x {T} tokens x {dist.world} processes x {grad_accum} accumulation steps = "
        f"{tokens_per_step:,} tokens/step | device {device}, {str(dtype).removeprefix('torch.')}"
        f"{', compiled' if args.compile else ''}")
    if args.fsdp:
        local = sum(p.to_local().numel() for p in raw_model.parameters())
        say(f"FSDP: weights, gradients and AdamW state sharded over {dist.world} processes; "
            f"rank 0 holds {local:,} of {raw_model.num_params():,} parameters")
    say("MFU per device, against " + (f"{peak / 1e12:.3g} TFLOP/s ({peak_source})" if peak else peak_source))
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
                # NOTE: under FSDP the skipped syncs cost memory: until the last micro-step every process holds
                # whole, unsharded gradients. Syncing every micro-step would keep only shards, at grad_accum
                # times the traffic.
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
                raise ValueError(f"{what} is {value} at step {step + 1}: stopping before the update; "  # itself
                                 f"{ckpt_path} keeps the last good state (try a lower --lr)")
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
                    _, record["hellaswag_acc_norm"], _ = hellaswag_accuracy(raw_model, examples, tokenizer, device,
                                                                            dtype, dist, B)
                say(log_line(record))
                t0, step0 = time.perf_counter(), step
            log.write(record)

            # Save everything resuming needs, atomically: a kill -9 mid-write leaves the previous checkpoint. Every
            # process takes part, with its RNG state (dropout continues exactly on each) and its shards: ckpt.pt
            # gathers them whole for rank 0 to write, a sharded step folder gets each process's own (fsdp.py).
            if step % args.ckpt_every == 0 or last or stopping:
                checkpoints.save(raw_model, optimizer, rng_state(device), {
                    "format": CKPT_FORMAT, "scaler": scaler.state_dict(), "config": dataclasses.asdict(config),
                    "args": vars(args), "step": step, "loader": train_loader.state_dict(),
                    "tokenizer": meta["tokenizer"], "tokenizer_json": tokenizer.json, "val_loss": val_loss,
                }, done=last or stopping)
            if stopping:
                log.close()
                say(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
                return None
    log.close()
    say(f"saved {ckpt_path}")
    return raw_model, tokenizer


# -----------------------------------------------------------------------------
# 12. Commands
# What the command line runs: training (the default), --sample, --eval (perplexity or
# HellaSwag) and --export-hf / --export-gguf. Each picks the device, loads what it needs
# and hands over to the sections above.


NANOGPT_CPU_VAL_LOSS = 1.8857  # nanoGPT's README: train_shakespeare_char's val loss with its CPU flags


def train_and_sample(args):
    """The default command: train (alone or under torchrun: every process runs this same function, and
    Distributed tells it which one it is), then draw the losses (loss.png) and print a sample."""
    dist = Distributed()
    device = pick_device(args.device, dist.local_rank)
    dtype = pick_dtype(args.dtype, device)
    if args.compile is None:
        args.compile = device.type == "cuda"  # on small CPU models compiling costs ~30 s and buys nothing
    with dist.running(device):
        trained = train(args, dist, device, dtype)
        if trained is None:  # stopped by a signal, after a save
            return
        model, tokenizer = trained
        if dist.master:
            # On tiny Shakespeare (1,115,394 bytes, any tokenizer) nanoGPT's CPU recipe is the loss to beat, per byte
            shakespeare = sum(s.get("bytes", 0) for s in read_meta(args.data).get("splits", {}).values()) == 1115394
            plot_metrics(os.path.join(args.out_dir, "metrics.jsonl"),
                         NANOGPT_CPU_VAL_LOSS / math.log(2) if shakespeare else None, "nanoGPT CPU recipe")
        # NOTE: under FSDP no process holds a whole weight; each forward gathers them from all, so all sample
        # together (rank 0 prints). Otherwise rank 0 samples alone.
        if dist.master or args.fsdp:
            prompt = torch.tensor([tokenizer.encode("\n")], device=device)
            model.eval()
            with autocast(device, dtype):
                out = model.generate(prompt, 300, temperature=0.8, top_k=200, vocab_size=tokenizer.vocab_size)
            if dist.master:
                print("--- sample ---\n" + tokenizer.decode(out[0].tolist()), flush=True)


def load_for_inference(args, device):
    """(model in eval mode, tokenizer) from --ckpt or --init-from; the tokenizer is the one recorded with the
    weights."""
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
    """--sample: print --num-samples continuations of --prompt (with --interactive, of each prompt typed),
    token by token as they are drawn."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, tokenizer = load_for_inference(args, device)
    prompts = typed_prompts() if args.interactive else [args.prompt]
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
                stream = model.generate(
                    torch.tensor([ids], dtype=torch.long, device=device), args.max_new_tokens, stream=True,
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
    loss, n = evaluate_tokens(model, tokens, args.batch_size, device, dtype, tokenizer.vocab_size)
    bpb = n_bytes and bits_per_byte(loss, n, n_bytes - len(tokenizer.decode_bytes([int(tokens[0])])))
    print(f"{source}: loss {loss:.4f} | perplexity {math.exp(loss):.3f} | {n:,} tokens predicted in windows of "
          f"{model.config.block_size}{f' | {bpb:.4f} bits per byte' if bpb else ''}")


def evaluate_hellaswag(args):
    """--eval --hellaswag [FILE]: HellaSwag accuracy of --ckpt or --init-from. Under torchrun each process
    scores every world-th example and the counts are added up; only rank 0 downloads and prints."""
    dist = Distributed()
    device = pick_device(args.device, dist.local_rank)
    dtype = pick_dtype(args.dtype, device)
    with dist.running(device):
        model, tokenizer = load_for_inference(args, device)
        examples = load_hellaswag(args.hellaswag, dist)
        acc, acc_norm, n = hellaswag_accuracy(model, examples, tokenizer, device, dtype, dist, args.batch_size,
                                              progress=dist.master)
        if dist.master:
            print(f"hellaswag: acc {acc:.4f} | acc_norm {acc_norm:.4f} | {n} examples")


def check_new_output(path, folder):
    """Export never overwrites: a file must be new, a folder new or empty."""
    if os.path.exists(path) and not (folder and os.path.isdir(path) and not os.listdir(path)):
        raise ValueError(f"{path} already exists{' and is not an empty folder' if folder else ''}: "
                         f"export writes only to a new {'folder (or an empty one)' if folder else 'file'}")


def export(args):
    """--export-hf and --export-gguf: check everything first, then write each output whole."""
    model, tokenizer = load_for_inference(args, torch.device("cpu"))
    family = convert.hf_family(model.config)  # refuses a mix no HF class computes, before anything is written
    if args.export_gguf:  # a model llama.cpp runs, what GGUF says of the tokenizer, or one line on why not
        convert.check_gguf_family(family)
        vocab = convert.gguf_vocab(tokenizer)
    for path, folder in ((args.export_hf, True), (args.export_gguf, False)):
        if path:
            check_new_output(path, folder)
    what = f"{convert.HF_CLASSES[family]}, {model.num_params():,} parameters, {tokenizer.name} tokenizer"
    if args.export_hf:
        convert.export_hf(model, tokenizer, args.export_hf)
        print(f"wrote {args.export_hf}: {what}")
    if args.export_gguf:
        convert.export_gguf(model, vocab, args.export_gguf, args.gguf_dtype)
        print(f"wrote {args.export_gguf}: {what}, {args.gguf_dtype}")


# -----------------------------------------------------------------------------
# 13. CLI
# One entry point, main(). The defaults are the default run's recipe: a small LLaMA-style
# model (--size mini) on tiny Shakespeare characters, sized so a 2-core CPU beats
# nanoGPT's CPU recipe in about half its time (README: "Results"). Every value is
# checked here, before any work: a bad one is one line and exit status 2.


def parse_args(argv=None):
    """The command line, checked: argparse types check each value (at_least, in_range, device_name) and
    check_args the flags that must agree. --help lists the flags by group, with their defaults."""
    p = ArgumentParser(
        prog="transformer.py",
        description="Train a GPT (default), sample from one (--sample), measure its perplexity (--eval) "
        "or export it (--export-hf, --export-gguf).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add_flags in (data_and_model_flags, training_flags, logging_flags, system_flags, inference_flags,
                      export_flags):
        add_flags(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


# The flags by group. The model's numbers default to the --size preset (model_config leaves them to it), so
# GPTConfig's presets are the one source of defaults; training's defaults are the default run's recipe.


def data_and_model_flags(p):
    """What to train on and what to train: an --arch preset (the kind of model) and a --size preset (how big),
    each open to single overrides: ARCH_FLAGS are the switches of the architecture table."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help="directory of shards from prepare_data.py or llm.c (default: tiny "
                   f"Shakespeare bytes in {DEFAULT_DATA}, prepared on first use)")
    g = p.add_argument_group("model")
    # the kind of model (ARCHS), then single switches on top of it
    g.add_argument("--arch", default="llama", choices=list(ARCHS), help="architecture preset")
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
    # how big (SIZES), then single numbers: left None here, check_args fills them in from the preset
    g.add_argument("--size", choices=list(SIZES), help="size preset (SIZES): depth, width, context; default mini")
    g.add_argument("--n-layer", type=at_least(1), help="override the size's depth")
    g.add_argument("--n-head", type=at_least(1), help="override the size's heads")
    g.add_argument("--n-embd", type=at_least(1), help="override the size's width")
    # the context the model has vs the windows it trains on: a model may read further than it trains
    g.add_argument("--block-size", type=at_least(1), help="the model's context; default --seq-len, else the size's. "
                   "--sample/--eval: a longer context than trained, for RoPE and ALiBi, which see only distances")
    g.add_argument("--seq-len", type=at_least(1), help="T, the tokens of one training sequence; default --block-size")
    g.add_argument("--dropout", type=in_range(0, 1, high_open=True), default=0.0, help="in [0, 1)")
    g.add_argument("--init-from", help="start from HF weights: gpt2, gpt2-medium, ... or a local HF checkpoint folder")


def training_flags(p):
    """The optimization. The defaults are the default run's, measured on a 2-core CPU (README: "Results"): AdamW
    at 2e-3 with a short warmup and a cosine to a tenth of it, 850 steps of 12 x 64 characters. For GPT-2
    on FineWeb, nanoGPT's numbers are the place to start (README: "Recipes")."""
    g = p.add_argument_group("training")
    # the batch: B sequences of T tokens on each process; accumulation micro-steps make up the rest
    g.add_argument("--batch-size", type=at_least(1), default=12, help="B, sequences per process per micro-step")
    g.add_argument("--total-batch-tokens", type=at_least(1),
                   help="tokens per optimizer step; default B x T x processes (no accumulation)")
    g.add_argument("--max-steps", type=at_least(1), default=850)
    # the optimizers and their peak learning rates, all on one schedule: linear warmup, then a cosine
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                   help="muon: Muon for the blocks' matrices (--muon-lr), AdamW for the rest (--lr); torch >= 2.9")
    g.add_argument("--lr", type=in_range(0, low_open=True), default=2e-3, help="AdamW's peak lr")
    g.add_argument("--muon-lr", type=in_range(0, low_open=True), default=0.02, help="Muon's peak lr (--optimizer muon)")
    g.add_argument("--min-lr", type=in_range(0), default=2e-4, help="the cosine ends here; <= --lr")
    g.add_argument("--warmup-steps", type=at_least(0), default=50)
    g.add_argument("--lr-decay-steps", type=at_least(1), help="length of the cosine schedule; default --max-steps")
    # regularization and stability
    g.add_argument("--weight-decay", type=in_range(0), default=0.1)
    g.add_argument("--grad-clip", type=in_range(0, low_open=True), default=1.0, help="max global gradient norm")
    # the initial weights, the data order and dropout all follow from it
    g.add_argument("--seed", type=at_least(0, 2**32 - 1), default=1337)


def logging_flags(p):
    """Where the run writes (ckpt.pt, metrics.jsonl, loss.png) and how often it logs, evaluates and saves.
    Logged steps cost a host-device sync; evaluation costs --eval-iters forward passes."""
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out-dir", default="checkpoints", help="ckpt.pt, metrics.jsonl and loss.png go here")
    g.add_argument("--log-every", type=at_least(1), default=100)
    g.add_argument("--eval-every", type=at_least(1), default=100, help="val loss every N steps and at the end "
                   "(the default run: 9 points for loss.png, about 6%% of its time)")
    g.add_argument("--eval-iters", type=at_least(1), default=20)
    g.add_argument("--ckpt-every", type=at_least(1), default=1000)
    g.add_argument("--ckpt-format", choices=["file", "sharded"], help="file: one ckpt.pt, gathered to rank 0; sharded: "
                   "step_N/ folders, each process writing its own shards (default under --fsdp; any --ckpt reads both)")
    g.add_argument("--keep-checkpoints", type=at_least(1), default=1, metavar="K", help="sharded: keep the newest K")
    g.add_argument("--async-save", action="store_true", help="sharded: write in the background while training goes on")
    # a resumed run continues exactly where the last save left off, even after a kill -9
    g.add_argument("--resume", nargs="?", const=True, choices=["auto"], help="continue from OUT_DIR's checkpoint; "
                   "auto: if there is one, else start fresh (for torchrun --max-restarts and requeued jobs)")
    # extras for metrics.jsonl
    g.add_argument("--hellaswag-every", type=at_least(1), metavar="N",
                   help="HellaSwag acc_norm every N steps (and at the end) into metrics.jsonl; the examples come "
                        "from --hellaswag FILE, else the official val set")
    g.add_argument("--wandb", metavar="PROJECT",
                   help="also log every step's metrics to Weights & Biases (pip install wandb)")


def system_flags(p):
    """How the run uses the machine. 'auto' picks what is right for the device found: bf16 autocast and
    torch.compile on a GPU, fp32 and eager on a CPU (where compiling a small model costs more than it saves)."""
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", type=device_name,
                   help="auto: cuda > mps > cpu; under torchrun 'cuda' means cuda:LOCAL_RANK")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on CUDA where supported, fp16 on older GPUs, fp32 elsewhere")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on for CUDA only); --sample compiles its decode step, "
                   "only when asked")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    # under torchrun: DDP by default (a whole copy on each process); FSDP when the model does not fit
    g.add_argument("--fsdp", nargs="?", const=True, choices=["hsdp"], help="under torchrun: shard weights, "
                   "gradients and AdamW state over the processes (FSDP2) instead of a full copy on each (DDP); hsdp: "
                   "shard within each node, replicate across nodes (a 2-D mesh); checkpoints sharded")


def inference_flags(p):
    """--sample and --eval read a checkpoint (--ckpt) or HF weights (--init-from) and never train."""
    g = p.add_argument_group("sampling (--sample) and evaluation (--eval)")
    # the command, and what to load
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sample", action="store_true", help="generate text from --ckpt or --init-from")
    mode.add_argument("--eval", action="store_true",
                      help="loss and perplexity of --ckpt or --init-from on --data's val split or --text, "
                      "or --hellaswag")
    g.add_argument("--ckpt", help="a checkpoint written by training: ckpt.pt, a step folder, or a run's --out-dir")
    g.add_argument("--prompt", default="\n", help="text, or FILE:path to read it from a file")
    # how to sample: the temperature sharpens or flattens the distribution, top-k and top-p cut its tail
    g.add_argument("--num-samples", type=at_least(1), default=1)
    g.add_argument("--max-new-tokens", type=at_least(1), default=500)
    g.add_argument("--temperature", type=in_range(0), default=0.8, help="0 is greedy")
    g.add_argument("--top-k", type=at_least(1), default=200, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=in_range(0, 1, low_open=True),
                   help="sample among the most likely tokens whose probabilities add up to p, in (0, 1]")
    g.add_argument("--no-stop", action="store_true", help="keep generating past the end-of-text token")
    g.add_argument("--no-cache", action="store_true", help="re-encode the whole prefix every step (for comparison)")
    g.add_argument("--interactive", action="store_true", help="--sample each prompt typed on the terminal (or piped "
                   "in), one a line, streaming its continuation; an empty line or Ctrl-D ends")
    # what to evaluate on
    g.add_argument("--text", help="--eval on this text file instead of --data")
    g.add_argument("--hellaswag", nargs="?", const=hellaswag.URL, metavar="FILE",
                   help="--eval: HellaSwag accuracy on a jsonl FILE in the official format; without FILE, the "
                   "official val set, downloaded once to ~/.cache/transformer.py/. --batch-size examples a forward")


def export_flags(p):
    """Writing a trained model for other tools (section 10). Both exports can run in one command."""
    g = p.add_argument_group("export (of --ckpt or --init-from)")
    g.add_argument("--export-hf", metavar="DIR", help="write an HF transformers folder (config.json, "
                   "model.safetensors, tokenizer) that AutoModelForCausalLM and AutoTokenizer load; DIR must be new "
                   "or empty")
    g.add_argument("--export-gguf", metavar="FILE", help="write a GGUF file for llama.cpp and ollama (needs "
                   "`pip install gguf`); FILE must be new")
    g.add_argument("--gguf-dtype", default="f16", choices=["f32", "f16"],
                   help="the GGUF's weight matrices; norms, biases and position embeddings stay f32")


def check_args(p, args):
    """What no single flag can check: flags that must agree with each other. p.error exits with one line."""
    # FSDP: each process holds a shard of every weight, which only a training run under torchrun can use
    if args.fsdp and (args.sample or args.eval):
        p.error(f"--fsdp is for training; --{'sample' if args.sample else 'eval'} runs the whole model in one process")
    if args.fsdp and "RANK" not in os.environ:  # what Distributed reads: set by torchrun
        p.error("--fsdp shards the model over processes: start it with torchrun --nproc_per_node=N transformer.py "
                "--fsdp ...")
    args.ckpt_format = args.ckpt_format or ("sharded" if args.fsdp else "file")
    if args.ckpt_format == "file" and (args.async_save or args.keep_checkpoints > 1):  # refused, not ignored
        p.error("--async-save and --keep-checkpoints are for --ckpt-format sharded (the default under --fsdp)")
    if args.optimizer == "muon" and args.ckpt_format == "sharded":  # and the Optimizers pair DCP does not know
        p.error("--optimizer muon needs whole matrices (Newton-Schulz on a shard is another update): use DDP, ckpt.pt")
    if args.fsdp and args.hellaswag_every:
        p.error("--hellaswag-every under --fsdp is not supported: each process scores its own share of the "
                "examples, and FSDP needs every process in every forward")
    if args.interactive and not args.sample:
        p.error("--interactive goes with --sample")
    # Sampling, evaluation and export need weights to start from, and none of the training flags below
    exporting = args.export_hf or args.export_gguf
    if args.sample or args.eval or exporting:
        if not (args.ckpt or args.init_from):
            what = "--sample" if args.sample else "--eval" if args.eval else "--export-hf/--export-gguf"
            p.error(f"{what} needs --ckpt PATH or --init-from gpt2|<HF dir>")
        if args.prompt.startswith("FILE:") and not os.path.isfile(args.prompt[5:]):
            p.error(f"--prompt {args.prompt}: no such file")
        return
    # Training: optional packages and the flags that must agree, checked before any data or model is touched
    if args.wandb and importlib.util.find_spec("wandb") is None:
        p.error("--wandb needs the wandb package: pip install wandb")
    if args.hellaswag is not None and args.hellaswag_every is None:
        p.error("--hellaswag goes with --eval or --hellaswag-every")
    if args.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        p.error(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
    if args.min_lr > args.lr:
        p.error(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}")
    # The model: GPTConfig is the one judge of a shape and the presets the one source of defaults, so the flags
    # build the config here (the data's vocabulary is read later, and cannot make a shape impossible).
    shape = [f for f in ("size", "n_layer", "n_head", "n_embd", "block_size", *ARCH_FLAGS)
             if getattr(args, f) is not None]
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
    file, a wrong checkpoint, no network) are ValueError or OSError: one line and exit status 1, no traceback.
    Anything else is a bug, and its traceback is what to report."""
    args = parse_args(argv)
    try:
        if args.export_hf or args.export_gguf:
            export(args)
        elif args.sample:
            sample(args)
        elif args.eval and args.hellaswag is not None:
            evaluate_hellaswag(args)
        elif args.eval:
            evaluate(args)
        else:
            train_and_sample(args)
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
