"""
transformer.py: a GPT you can read top to bottom, train on one GPU or many, and sample from.

    python transformer.py                          # prepare tiny Shakespeare, train, save, print a sample
    python transformer.py --sample --ckpt checkpoints/ckpt.pt --prompt "ROMEO:"
    python transformer.py --eval --ckpt checkpoints/ckpt.pt --data data/shakespeare_byte
    python transformer.py --export-hf out/hf --export-gguf out/model.gguf --ckpt checkpoints/ckpt.pt
    torchrun --standalone --nproc_per_node=8 transformer.py --data data/fineweb --arch gpt2 ...

The file is a story, in this order:
    1. Config      GPTConfig: sizes (tiny, mini, gpt2 ... gpt2-xl) and architectures (gpt2, llama, olmo)
    2. Positions   learned, RoPE or ALiBi, decided in one place (Positions)
    3. Attention   causal self-attention: PyTorch's fused SDPA kernel beside an explicit reference path
    4. MLP         GELU (GPT-2) or SwiGLU (LLaMA)
    5. Block       pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))
    6. Model       GPT: embeddings, blocks, tied head; init; forward; generate; from_pretrained
    7. Data        tokenizers, the uint16 shard format (and llm.c's), DataLoaderLite
    8. Training    AdamW (or Muon), the lr schedule, the step, the loop (one process, torchrun DDP or FSDP)
    9. Sampling    KV cache, top-k / top-p generation; evaluation: perplexity, HellaSwag
   10. HF          import from and export to HF transformers; export to GGUF (llama.cpp, ollama)
   11. Plumbing    device and dtype, processes, RNG, signals, atomic files and checkpoints, peak FLOPs, metrics
   12. Commands    train, sample, eval, export
   13. CLI         argparse and main()
"""

import argparse
import contextlib
import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
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
    mlp_hidden: int | None = None  # None: 4 * n_embd for gelu, ~8/3 * n_embd for swiglu (same params)
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorm
    pos: str = "learned"  # 'learned' | 'rope' | 'alibi'
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm'
    mlp: str = "gelu"  # 'gelu' | 'swiglu'
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares its weight with the token embedding
    attn_impl: str = "sdpa"  # 'sdpa' (fused kernel, flash on GPU) | 'explicit' (the math, spelled out)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.mlp == "gelu" else 64 * math.ceil(8 * self.n_embd / 3 / 64)
        for field, allowed in (("pos", POSITIONS), ("norm", NORMS), ("mlp", MLPS), ("attn_impl", ("sdpa", "explicit"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"GPTConfig.{field}={getattr(self, field)!r}: expected one of {', '.join(allowed)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

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


POSITIONS, NORMS, MLPS = ("learned", "rope", "alibi"), ("layernorm", "rmsnorm"), ("gelu", "swiglu")


SIZES = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=256),  # for tests
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),  # the main job: Shakespeare's characters on a CPU
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


ARCHS = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    # OLMo as the course this project follows defines it; NOTE: AI2's released OLMo models use RoPE, not ALiBi
    "olmo": dict(pos="alibi", norm="layernorm", mlp="swiglu", bias=False, tie_embeddings=True),
}


# -----------------------------------------------------------------------------
# 2. Positions
# Attention by itself is blind to order. GPT-2 adds a learned vector per position to
# the token embedding. RoPE instead rotates queries and keys by an angle proportional
# to their position, so q·k depends only on the distance between them. ALiBi adds no
# vectors at all: each head subtracts slope × distance from its attention scores, and
# so runs past the length it was trained on. The Positions module at the end of this
# section is the one place that knows which scheme a model uses: a new one (NoPE, YaRN)
# is a new GPTConfig.pos value and a branch there.


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


class Positions(nn.Module):
    """What the model needs to know about positions, for T new tokens: at positions 0 .. T-1 attending to
    each other, or, with a KV cache (section 9), at the positions it gives them attending to every key it holds:
        pos_emb (T, C)   added to the token embeddings (learned), else None
        rope             (cos, sin), each (T, hd), to rotate q and k by (rope), else None
        bias             the additive attention mask of section 3: None for plain causal
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.attn_impl, self.dropout = config.attn_impl, config.dropout
        # q, k and v for all heads in one matmul
        qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, bias=None, cache=None):
        """x (B, T, C); rope: (cos, sin) or None; bias: None for plain causal attention (see
        attention_bias), else an additive (1, nh or 1, T, S) float mask; cache: this layer's
        view of the KVCache during generation, whose S keys are all its slots, filled or not."""
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(  # (B, T, nh*hd), (B, T, nkv*hd), (B, T, nkv*hd)
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
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
# a wider projection with SiLU of the other half.


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        fc_out = 2 * config.mlp_hidden if self.swiglu else config.mlp_hidden  # SwiGLU: gate and up in one matmul
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C)
        h = self.c_fc(x)  # (B, T, fc_out)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)  # (B, T, mlp_hidden) each
            h = F.silu(gate) * up  # (B, T, mlp_hidden)
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation of GELU
        return self.dropout(self.c_proj(h))  # (B, T, C)


# -----------------------------------------------------------------------------
# 5. Block
# Pre-norm residual: each sublayer reads a normalized copy of the residual stream and
# adds its output back, so gradients flow straight through the sum from top to bottom.


def make_norm(config):
    if config.norm == "rmsnorm":  # scale only: x / rms(x) * weight
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)  # (x - mean) / std * weight + bias


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, bias=None, cache=None):  # x (B, T, C)
        x = x + self.attn(self.ln_1(x), rope, bias, cache)
        x = x + self.mlp(self.ln_2(x))
        return x  # (B, T, C)


# -----------------------------------------------------------------------------
# 6. Model
# Token embedding, n_layer blocks, a final norm, and the language-model head: a Linear
# back to vocabulary logits, by default sharing its weight with the token embedding
# (weight tying, as in GPT-2). Positions (section 2) add what the scheme needs.
# from_pretrained reads HF checkpoints with the converters of section 10.


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
        self.transformer["wpe"] = Positions(config)  # after ln_f, where GPT-2's wpe was: the same init order
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.grad_checkpointing = False
        # GPT-2's init: N(0, 0.02) weights and zero biases; the projections that write into the
        # residual stream are scaled by 1/sqrt(2 * n_layer) so its variance stays ~1 with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

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
        KVCache (section 9), idx holds only the new tokens and the cache supplies the keys and
        values before them; the generation loop, not the model, gives the new tokens their
        positions in it.
        """
        B, T = idx.size()
        pos_emb, rope, bias = self.transformer.wpe(T, idx.device, cache)
        x = self.transformer.wte(idx)  # (B, T, C)
        if pos_emb is not None:
            x = x + pos_emb  # (T, C) broadcast over the batch
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            layer_cache = cache.layer(i) if cache is not None else None
            if self.grad_checkpointing and self.training:  # recompute activations in backward: less memory
                x = torch.utils.checkpoint.checkpoint(block, x, rope, bias, layer_cache, use_reentrant=False)
            else:
                x = block(x, rope, bias, layer_cache)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            # (B*T, vocab) against (B*T,): the mean over every position of every sequence, in fp32
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def generate(self, idx, max_new_tokens, *, stream=False, **options):
        """idx (B, T) -> (B, T + max_new_tokens); with stream=True, an iterator over the new tokens,
        each (B, 1). options: temperature, top_k, top_p, use_cache, compile, generator, vocab_size (see
        generate_tokens, section 9). A bad prompt raises here, before any token."""
        check_prompt(idx, self.config.block_size)
        tokens = generate_tokens(self, idx, max_new_tokens, **options)
        return tokens if stream else torch.cat([idx, *tokens], dim=1)

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """Load HF weights: GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') or Llama-family
        models from the hub, or any local directory holding an HF GPT2LMHeadModel or
        LlamaForCausalLM checkpoint (config.json + *.safetensors or pytorch_model.bin)."""
        from transformers import AutoConfig  # only this function needs transformers

        path = name_or_path if os.path.isdir(name_or_path) else download_hf(name_or_path)
        hf = AutoConfig.from_pretrained(path)
        if hf.model_type not in HF_LOADERS:
            raise ValueError(f"{name_or_path}: model_type {hf.model_type!r} is not supported "
                             f"(supported: {', '.join(HF_LOADERS)})")
        config_from_hf, weights_from_hf = HF_LOADERS[hf.model_type]
        config = config_from_hf(hf)
        config.dropout = dropout
        with torch.device("meta"):  # no memory and no random init: every weight comes from the checkpoint
            model = cls(config)
        model.to_empty(device="cpu")  # real storage, left uninitialised; this unties weights, so tie them again
        model.tie_weights()
        model.transformer.wpe.make_tables()
        ours = weights_from_hf(read_hf_weights(path), config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(ours))
        extra = sorted(set(ours) - set(expected))
        if missing or extra:
            raise ValueError(f"{name_or_path}: missing tensors {missing[:5]} / unexpected tensors {extra[:5]}")
        for k, v in ours.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"{name_or_path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        model.load_state_dict(ours)
        # what sampling decodes with: tiktoken for GPT-2, unless the folder brings a tokenizer GPT-2's would not fit
        own = os.path.isfile(os.path.join(path, "tokenizer.json")) and config.vocab_size < 50257  # exported bytes
        model.tokenizer = "gpt2" if hf.model_type == "gpt2" and not own else "hf:" + path
        return model


# -----------------------------------------------------------------------------
# 7. Data
# Training reads token ids that prepare_data.py wrote ahead of time, so the GPU never
# waits for a tokenizer. A shard is a 1 KiB header of 256 little-endian int32
# (magic, format version, vocab size, token count, then zeros) followed by the tokens
# as uint16: 2 bytes a token, which is why vocabularies stop at 65,536.
# llm.c and modded-nanogpt write FineWeb as shards of the same shape under another magic
# number: (magic, version, token count, zeros), GPT-2 tokens implied, no meta.json. A
# folder of them is read as it is; shard_header tells the two formats apart.


SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20241123, 1, 256


LLMC_MAGIC, LLMC_VERSION = 20240520, 1  # llm.c's version 1: GPT-2 tokens as uint16 (its Llama 3 shards differ)


LLMC_META = {"tokenizer": "gpt2", "vocab_size": 50257}  # what an llm.c folder's missing meta.json would say


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). On ASCII text such as tiny Shakespeare this is character level."""

    name, vocab_size, eot = "byte", 256, None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """OpenAI's BPE through tiktoken ('gpt2': 50,257 tokens, <|endoftext|> = 50256 separates documents)."""

    def __init__(self, name):
        import tiktoken

        self.enc, self.name = tiktoken.get_encoding(name), name
        self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.enc.decode(ids)


class HFTokenizer:
    """The tokenizer saved beside an HF checkpoint (for Llama-family models loaded with --init-from)."""

    def __init__(self, path):
        from transformers import AutoTokenizer

        self.tok, self.name = AutoTokenizer.from_pretrained(path), "hf:" + path
        self.vocab_size, self.eot = len(self.tok), self.tok.eos_token_id

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return self.tok.decode(ids)


def get_tokenizer(name):
    """'byte', a tiktoken encoding ('gpt2'), or 'hf:<dir>' for an HF checkpoint's own tokenizer."""
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("hf:"):
        return HFTokenizer(name[3:])
    try:
        return TiktokenTokenizer(name)
    except ValueError:
        raise ValueError(f"unknown tokenizer {name!r}: use 'byte', 'gpt2' or 'hf:<dir>'") from None


def shard_header(path):
    """(format, vocab_size, token count) from a shard's header, checked against the file. The magic number
    decides the format: this project's ('transformer.py') or llm.c's ('llm.c', whose vocab is GPT-2's)."""
    try:
        header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    except OSError as e:
        raise ValueError(f"{path}: cannot read shard ({e.strerror})") from None
    magic = header[0] if header.size == SHARD_HEADER_INTS else None
    if magic == SHARD_MAGIC:
        fmt, version, vocab_size, n = "transformer.py", SHARD_VERSION, int(header[2]), int(header[3])
    elif magic == LLMC_MAGIC:
        fmt, version, vocab_size, n = "llm.c", LLMC_VERSION, LLMC_META["vocab_size"], int(header[2])
    else:
        raise ValueError(f"{path}: not a token shard (bad magic); make shards with prepare_data.py")
    if header[1] != version:
        raise ValueError(f"{path}: {fmt} shard format version {header[1]}, this code reads version {version}")
    held = (os.path.getsize(path) - 4 * SHARD_HEADER_INTS) / 2
    if held != n:
        raise ValueError(f"{path}: header says {n} tokens but the file holds {held:g}: truncated or corrupt")
    return fmt, vocab_size, n


def load_shard(path, vocab_size=None):
    """Memory-map a shard's tokens (uint16, shape (n,)) after checking its header against the file."""
    _, shard_vocab, n = shard_header(path)
    if vocab_size is not None and shard_vocab != vocab_size:
        raise ValueError(f"{path}: shard vocab_size {shard_vocab} does not match the dataset's {vocab_size}")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * SHARD_HEADER_INTS, shape=(n,))


def find_shards(data_dir, split):
    """The shards of one split, in name order. The rule: a file <split>.bin, <prefix>_<split>.bin or either
    with _<number> before .bin, so the split is a whole word of the name: this project's train_000000.bin,
    llm.c's fineweb_train_000001.bin and tiny_shakespeare_val.bin, but not interval_000000.bin."""

    def of_split(file):  # 'fineweb_train_000001.bin' -> ['fineweb', 'train', '000001']
        words = os.path.basename(file).removesuffix(".bin").split("_")
        return words[-1] == split or (len(words) > 1 and words[-2] == split and words[-1].isdigit())

    files = sorted(f for f in glob.glob(os.path.join(data_dir, "*.bin")) if of_split(f))
    if not files:
        raise ValueError(f"{data_dir}: no {split}_*.bin shards (nor llm.c's *_{split}_*.bin); "
                         "make them with prepare_data.py")
    return files


def read_meta(data_dir):
    """meta.json of a prepared dataset: tokenizer, vocab_size, token counts. Written last, so it marks a complete
    dataset. A folder of llm.c shards has none: its format implies GPT-2's tokenizer (LLMC_META)."""
    path = os.path.join(data_dir, "meta.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    shards = sorted(glob.glob(os.path.join(data_dir, "*.bin")))
    if shards and shard_header(shards[0])[0] == "llm.c":
        return dict(LLMC_META)
    raise ValueError(f"{data_dir}: no prepared dataset here (no meta.json); make one with prepare_data.py")


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


# -----------------------------------------------------------------------------
# 8. Training
# AdamW with weight decay on matrices only (or Muon for the blocks' matrices), linear
# warmup then cosine decay, gradient accumulation to reach a large batch in small
# steps, gradient clipping, bf16 autocast on GPUs. Under torchrun every process runs
# this same code on its slice of each batch (section 11 wraps the model for DDP or
# FSDP). Checkpoints hold all the state (weights, optimizer, data position, RNGs), so a
# resumed run continues exactly, even after a kill -9.


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


def train_step(model, loader, optimizer, scaler, lr_scale, grad_accum, grad_clip, device, dtype, dist, stop_requested):
    """One optimizer step over grad_accum micro-batches, each group's lr at lr_scale x its peak
    -> (mean loss, gradient norm, updated, stop).
    A non-finite loss or norm skips the update (updated=False): the weights stay as they were. stop is
    True on every process when any process was asked to stop.

    NOTE: the step waits for the device once, where the loss, the norm and the stop flag are read
    together; the update itself is queued behind that and not waited for."""
    for opt in getattr(optimizer, "optimizers", [optimizer]):  # a resumed run's lr is its flags', not the file's
        for group in opt.param_groups:
            group["lr"] = opt.defaults["lr"] * lr_scale  # defaults: what the optimizer was built with
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        buf = loader.next_batch().to(device, non_blocking=True)  # (B, T+1), one copy from pinned memory on GPUs
        x, y = buf[:, :-1], buf[:, 1:]  # (B, T) each: the targets are the inputs shifted by one
        with gradient_sync(model, micro == grad_accum - 1):  # processes average the gradients once, at the last
            with autocast(device, dtype):
                _, loss = model(x, y)
            loss = loss / grad_accum  # so the summed gradients are those of the mean over all micro-batches
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    # every process logs the same, global, loss; the flag rides along in the same all-reduce
    stats = dist.sum(torch.stack([loss_sum, torch.full((), float(stop_requested), device=device)]))
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # the norm of the whole gradient
    if is_sharded(model):  # FSDP: a DTensor, the norm over every process's shards, the same on each
        norm = norm.full_tensor()
    loss, stop, norm = torch.cat([stats, norm.view(1).float()]).tolist()  # the step's one host sync
    loss /= dist.world
    # fp16's GradScaler skips a step with inf gradients itself
    updated = math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled())
    if updated:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, updated, stop > 0


@contextlib.contextmanager
def gradient_sync(model, sync):
    """Around one micro-step's forward and backward. sync=False: each process adds this micro-batch's gradients
    to its own and talks to no one; sync=True (the last micro-step): the sums are averaged over the processes,
    one all-reduce (DDP) or reduce-scatter into each process's shard (FSDP) per optimizer step.

    NOTE: under FSDP the skipped syncs cost memory: until the last micro-step every process holds whole,
    unsharded gradients. Syncing every micro-step would keep only shards, at grad_accum times the traffic."""
    if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif not sync and is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


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


def model_config(args, vocab_size):
    """The model the training flags describe: an --arch preset with single switches on top. The embedding
    and the head get a vocabulary padded to a multiple of 64 (GPT-2's 50,257 -> 50,304), as nanoGPT does:
    GPU matmuls run on whole tiles. The extra ids never occur in the data, so training pushes their
    logits down, and sampling and evaluation only look at the tokenizer's ids."""
    overrides = {k: getattr(args, k) for k in ("pos", "norm", "mlp", "n_kv_head") if getattr(args, k) is not None}
    return GPTConfig.preset(
        args.size, args.arch, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
        vocab_size=64 * math.ceil(vocab_size / 64), dropout=args.dropout, **overrides,
    )


# The loop, in the order it runs. run_training sets the run up (start_run: data, model, optimizer;
# restore_run: a checkpoint's state when resuming; open_logs: metrics, the MFU peak, what is being
# trained), restores the random generators last, then train_loop steps, logs, evaluates and saves
# (save_run, restore_run's other half) until --max-steps, and finish_run plots the losses and samples.


@dataclass
class Run:
    """Everything one training run holds, shared by the functions below."""

    args: argparse.Namespace
    dist: "Distributed"
    device: torch.device
    dtype: torch.dtype
    meta: dict  # the dataset's meta.json: tokenizer, vocab_size, splits
    train_loader: DataLoaderLite
    val_loader: DataLoaderLite
    grad_accum: int  # micro-steps per optimizer step
    tokens_per_step: int  # B x T x processes x grad_accum
    raw_model: GPT  # the model itself: its weights, generate(), flops_per_token()
    model: nn.Module  # what the step calls: raw_model, compiled and/or wrapped by DDP or FSDP
    optimizer: object  # torch AdamW, or Optimizers(Muon, AdamW)
    scaler: torch.amp.GradScaler  # fp16 only: scales the loss so small gradients do not flush to zero
    ckpt_path: str
    step: int = 0  # optimizer steps taken
    val_loss: float | None = None  # the last one measured, saved with the checkpoint
    log: "MetricsLog" = None  # set by open_logs, with what the loop reports against:
    peak: float | None = None  # the device's peak FLOP/s, the MFU denominator
    flops_per_token: int = 0  # what one trained token costs, the MFU numerator per token
    tokenizer: object = None  # for HellaSwag and the closing sample
    hellaswag: list | None = None  # the examples, with --hellaswag-every

    def say(self, *lines):
        if self.dist.master:  # every process runs the loop; one speaks
            print(*lines, flush=True)


def run_training(args, dist, device, dtype):
    run = start_run(args, dist, device, dtype)
    ckpt = restore_run(run) if args.resume else None
    open_logs(run)
    # NOTE: the RNGs come back last. Nothing between this and the first step may draw a random number
    # (the MFU peak is timed on constant matrices for that reason), or dropout after a resume would differ.
    seed_rng(ckpt, args.seed, dist, device)
    if train_loop(run):
        finish_run(run)


def start_run(args, dist, device, dtype):
    """Data loaders, the model (wrapped for compile, DDP or FSDP) and its optimizer."""
    if args.data is None:  # the main job: tiny Shakespeare, prepared by rank 0 while the others wait
        args.data = DEFAULT_DATA
        if dist.master:
            prepare_default_data(args.data)
        dist.barrier()
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not args.resume and os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out-dir")
    meta = read_meta(args.data)
    # An optimizer step sees B x T tokens per process per micro-step, over all processes and grad_accum
    # micro-steps: --total-batch-tokens sets the total (parse_args checked that it divides evenly).
    B, T = args.batch_size, args.seq_len
    tokens_per_step = args.total_batch_tokens or B * T * dist.world
    grad_accum = tokens_per_step // (B * T * dist.world)
    pin = device.type == "cuda"  # page-locked host memory: the copy to the GPU runs beside the compute
    train_loader, val_loader = (DataLoaderLite(args.data, split, B, T, dist.rank, dist.world, grad_accum,
                                               args.seed, pin) for split in ("train", "val"))
    raw_model = build_model(args, meta, device)
    # NOTE: wrapped before the optimizer is built: --fsdp replaces raw_model's weights with their shards, and
    # the optimizer must hold those (and so load its state after them). DDP and compile leave them as they are.
    model = wrap_model(raw_model, args, dist, device, dtype)
    muon_lr = args.muon_lr if args.optimizer == "muon" else None
    optimizer = configure_optimizer(raw_model, args.lr, args.weight_decay, device.type, muon_lr=muon_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    return Run(args, dist, device, dtype, meta, train_loader, val_loader, grad_accum, tokens_per_step, raw_model,
               model, optimizer, scaler, ckpt_path)


def build_model(args, meta, device):
    """A new GPT from the model flags, or HF weights (--init-from), on device."""
    torch.manual_seed(args.seed)  # the same initial weights on every process
    if args.init_from:
        model = GPT.from_pretrained(args.init_from, dropout=args.dropout)
        c = model.config
        if meta["vocab_size"] > c.vocab_size or args.seq_len > c.block_size:
            raise ValueError(f"{args.data} (vocab {meta['vocab_size']}, seq len {args.seq_len}) does not fit "
                             f"{args.init_from} (vocab {c.vocab_size}, block_size {c.block_size})")
    else:
        model = GPT(model_config(args, meta["vocab_size"]))
    model.grad_checkpointing = args.grad_checkpointing
    return model.to(device)


def save_run(run):
    """Write ckpt.pt with everything restore_run needs to continue exactly. Every process calls it: each
    one's RNG state is gathered (dropout continues exactly on each), and under FSDP every process gives its
    shards; rank 0 writes (atomically: a kill -9 mid-write leaves the previous checkpoint)."""
    rngs = run.dist.gather(rng_state(run.device))
    model_state, optimizer_state = training_state(run.raw_model, run.optimizer)
    if run.dist.master:
        save_checkpoint(run.ckpt_path, {
            "format": CKPT_FORMAT, "model": model_state, "optimizer": optimizer_state,
            "scaler": run.scaler.state_dict(), "config": dataclasses.asdict(run.raw_model.config),
            "args": vars(run.args), "step": run.step, "loader": run.train_loader.state_dict(), "rng": rngs,
            "tokenizer": run.meta["tokenizer"], "val_loss": run.val_loss,
        })


def restore_run(run):
    """save_run's other half: put ckpt.pt's weights, optimizer state, loss scale, data position and step
    back into run. Returns the checkpoint, whose RNG states seed_rng restores last."""
    ckpt = load_checkpoint(run.ckpt_path)
    check_same_architecture(ckpt["config"], run.raw_model.config, run.ckpt_path)
    saved = ckpt["args"].get("optimizer", "adamw")
    if saved != run.args.optimizer:
        raise ValueError(f"{run.ckpt_path} was trained with --optimizer {saved}: resume with the same optimizer")
    load_training_state(run.raw_model, run.optimizer, ckpt)
    run.scaler.load_state_dict(ckpt["scaler"])
    run.train_loader.load_state_dict(ckpt["loader"])
    run.step, run.val_loss = ckpt["step"], ckpt.get("val_loss")
    run.say(f"resumed {run.ckpt_path} at step {run.step}")
    return ckpt


def open_logs(run):
    """metrics.jsonl (cut back to the resumed step), what MFU is measured against, HellaSwag's examples,
    and a few lines on what is being trained."""
    args, config, meta = run.args, run.raw_model.config, run.meta
    run.log = MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), run.step, args, run.dist.master)
    run.tokenizer = get_tokenizer(meta["tokenizer"])
    run.hellaswag = load_hellaswag(args.hellaswag or HELLASWAG_URL, run.dist) if args.hellaswag_every else None
    run.peak, peak_source = peak_flops(run.device)
    run.flops_per_token = run.raw_model.flops_per_token(args.seq_len)
    vocab = f"vocab {meta['vocab_size']}"
    vocab += f" (padded to {config.vocab_size})" if config.vocab_size != meta["vocab_size"] else ""
    run.say(f"model: {run.raw_model.num_params():,} parameters | {config.pos} positions, {config.norm}, "
            f"{config.mlp}, {config.n_layer} layers x {config.n_head} heads x {config.n_embd} wide | {vocab} "
            f"({meta['tokenizer']})")
    run.say(f"batch: {args.batch_size} x {args.seq_len} tokens x {run.dist.world} processes x {run.grad_accum} "
            f"accumulation steps = {run.tokens_per_step:,} tokens/step | device {run.device}, "
            f"{str(run.dtype).removeprefix('torch.')}{', compiled' if args.compile else ''}")
    if args.fsdp:
        local = sum(p.to_local().numel() for p in run.raw_model.parameters())
        run.say(f"FSDP: weights, gradients and AdamW state sharded over {run.dist.world} processes; "
                f"rank 0 holds {local:,} of {run.raw_model.num_params():,} parameters")
    run.say("MFU per device, against " + (f"{run.peak / 1e12:.3g} TFLOP/s ({peak_source})" if run.peak
                                          else peak_source))


def train_loop(run):
    """Step until --max-steps (True), or until SIGINT/SIGTERM asks to stop (False, after a save). Every
    step is a line of metrics.jsonl; logged steps also measure speed, and some the val loss."""
    args = run.args
    decay_steps = args.lr_decay_steps or args.max_steps
    run.model.train()
    since = (time.perf_counter(), run.step)  # tokens/s is measured between logged steps
    with StopSignal() as stop:
        while run.step < args.max_steps:
            lr = lr_at(run.step, args.lr, args.min_lr, args.warmup_steps, decay_steps)
            loss, norm, updated, stopping = train_step(run.model, run.train_loader, run.optimizer, run.scaler,
                                                       lr / args.lr, run.grad_accum, args.grad_clip, run.device,
                                                       run.dtype, run.dist, stop.requested)
            if not updated:
                what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
                raise ValueError(f"{what} is {value} at step {run.step}: stopping before the update; "
                                 f"{run.ckpt_path} keeps the last good state (try a lower --lr)")
            run.step += 1
            record = {"step": run.step - 1, "loss": loss, "lr": lr, "grad_norm": norm}
            last = run.step == args.max_steps
            evaluating = run.step % args.eval_every == 0 or last
            scoring = args.hellaswag_every is not None and (run.step % args.hellaswag_every == 0 or last)
            if run.step % args.log_every == 0 or run.step == 1 or evaluating or scoring:
                measure(run, record, since, evaluating, scoring)
                since = (time.perf_counter(), run.step)  # evaluations are not counted as training time
            run.log.write(record)
            if run.step % args.ckpt_every == 0 or last or stopping:
                save_run(run)
            if stopping:
                run.log.close()
                run.say(f"interrupted: saved {run.ckpt_path} at step {run.step}; continue with --resume")
                return False
    run.log.close()
    return True


def measure(run, record, since, evaluating, scoring):
    """Add a logged step's speed (and val loss, HellaSwag) to its record, and print it."""
    synchronize(run.device)  # only here: the time since the last log is then the time of those steps
    t0, step0 = since
    record["tokens_per_s"] = (run.step - step0) * run.tokens_per_step / (time.perf_counter() - t0)
    record["mfu"] = mfu(record["tokens_per_s"], run.flops_per_token, run.dist.world, run.peak)
    if evaluating:
        run.val_loss = record["val_loss"] = estimate_val_loss(run.model, run.val_loader, run.args.eval_iters,
                                                              run.device, run.dtype, run.dist)
    if scoring:
        _, record["hellaswag_acc_norm"], _ = hellaswag_accuracy(run.raw_model, run.hellaswag, run.tokenizer,
                                                                run.device, run.dtype, run.dist, run.args.batch_size)
    run.say(log_line(record))


def finish_run(run):
    """Plot the losses, then print a sample of what the model learned."""
    if run.dist.master:
        run.say(f"saved {run.ckpt_path}")
        default_run = run.args.data == DEFAULT_DATA  # tiny Shakespeare bytes: nanoGPT's CPU recipe is the loss to beat
        plot_metrics(run.log.path, NANOGPT_CPU_VAL_LOSS if default_run else None, "nanoGPT CPU recipe")
    # NOTE: under FSDP no process holds a whole weight; each forward gathers them from all, so all sample
    # together (rank 0 prints). Otherwise rank 0 samples alone.
    if run.dist.master or run.args.fsdp:
        prompt = torch.tensor([run.tokenizer.encode("\n")], device=run.device)
        run.say("--- sample ---")
        run.raw_model.eval()
        with autocast(run.device, run.dtype):
            out = run.raw_model.generate(prompt, 300, temperature=0.8, top_k=200, vocab_size=run.tokenizer.vocab_size)
        run.say(run.tokenizer.decode(out[0].tolist()))


# -----------------------------------------------------------------------------
# 9. Sampling and evaluation
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


# HellaSwag (Zellers et al. 2019) asks which of four endings continues a short scene: "A man is
# sitting on a roof. He ..." The model is never shown the choices side by side. As in build-nanogpt
# ("completion style"), each ending is scored as a continuation of the context: the loss of its own
# tokens, summed, and the lowest loss is the model's answer (acc). Longer endings pile up more loss,
# so acc_norm compares the mean loss per ending token instead. Random guessing scores 0.25.

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def read_hellaswag(path):
    """The examples of a HellaSwag jsonl file, the official format: one JSON object a line, with
    ctx (text), endings (4 texts) and label (0-3, the right ending). Other fields are ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read a HellaSwag file ({getattr(e, 'strerror', None) or e})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(example, dict) or not {"ctx", "endings", "label"} <= set(example):
            raise ValueError(f"{where}: a HellaSwag example needs the fields ctx, endings and label")
        ctx, endings, label = example["ctx"], example["endings"], example["label"]
        if not isinstance(ctx, str) or not ctx:
            raise ValueError(f"{where}: ctx must be a non-empty text")
        if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
            raise ValueError(f"{where}: endings must be a list of 4 texts")
        if type(label) is not int or not 0 <= label < 4:
            raise ValueError(f"{where}: label must be 0, 1, 2 or 3, not {label!r}")
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no HellaSwag examples in this file")
    return examples


def render_hellaswag(example, tokenizer, block_size):
    """(4 token rows, 4 ending lengths): the context's tokens followed by each ending's.

    Context and ending are tokenized apart and joined, with the space between them at the start of the
    ending, where GPT-2's BPE puts it (" roof" is one token). NOTE: when context + longest ending exceed
    block_size, the context loses its oldest tokens, the same ones for all four rows, so the endings
    still compete on the same context (the official val set fits GPT-2's 1024 tokens: nothing is cut).
    An ending that leaves no room for even one context token is refused."""
    ctx = tokenizer.encode(example["ctx"])
    endings = [tokenizer.encode(" " + ending) for ending in example["endings"]]
    longest = max(len(e) for e in endings)
    if longest >= block_size:
        raise ValueError(f"HellaSwag example {example['ctx'][:30]!r}...: an ending of {longest} tokens does not fit "
                         f"the model's context of {block_size} tokens after at least one context token")
    ctx = ctx[max(0, len(ctx) + longest - block_size) :]
    return [ctx + e for e in endings], [len(e) for e in endings]


@torch.no_grad()
def hellaswag_losses(model, rendered, device, dtype):
    """The loss of each ending, for examples rendered by render_hellaswag (a list of (rows, ending lengths)),
    all in one forward -> (summed, mean), each (examples, 4): summed over the ending's tokens, and per token."""
    rows = [row for r, _ in rendered for row in r]
    n_ending = [n for _, ns in rendered for n in ns]
    R, L = len(rows), max(len(r) for r in rows)  # R = 4 x examples
    tokens = torch.zeros(R, L, dtype=torch.long)  # (R, L), right-padded with token 0
    in_ending = torch.zeros(R, L, dtype=torch.bool)  # (R, L): True on the ending's tokens
    for i, (row, n) in enumerate(zip(rows, n_ending)):
        tokens[i, : len(row)] = torch.tensor(row)
        in_ending[i, len(row) - n : len(row)] = True
    tokens, in_ending = tokens.to(device), in_ending.to(device)
    with autocast(device, dtype):
        logits, _ = model(tokens)  # (R, L, vocab); causal, so the padding on the right changes nothing before it
    scored = in_ending[:, 1:]  # (R, L-1): position t predicts token t+1, which must be an ending's
    token_loss = torch.zeros(R, L - 1, device=device)  # (R, L-1), zero outside the endings
    token_loss[scored] = F.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored], reduction="none")
    summed = token_loss.sum(dim=1).view(-1, 4)  # (examples, 4)
    return summed, summed / scored.sum(dim=1).view(-1, 4)  # and the mean per ending token, (examples, 4)


def hellaswag_scores(model, examples, tokenizer, device, dtype, rank=0, world=1, batch_size=8, progress=False):
    """Score examples[rank::world] -> (n_correct, n_correct_norm, n): this process's share, so a caller
    under torchrun adds the three counts up over processes (Distributed.sum). batch_size examples, 4 rows
    each, go through the model at once. The model is scored in eval mode and left in the mode it came in;
    nothing draws random numbers. Pass the plain model, not a DDP or compiled wrapper: each process runs
    its own shapes, and a compiled model would recompile for each new one."""
    from tqdm import tqdm

    mine = examples[rank::world]
    # Tokenize everything first, so a bad example stops the run before any scoring.
    rendered = [render_hellaswag(e, tokenizer, model.config.block_size) for e in mine]
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    for first in tqdm(range(0, len(mine), batch_size), desc="hellaswag", unit="batch", disable=not progress,
                      file=sys.stderr):
        summed, mean = hellaswag_losses(model, rendered[first : first + batch_size], device, dtype)  # (b, 4) each
        labels = torch.tensor([e["label"] for e in mine[first : first + batch_size]], device=device)  # (b,)
        correct += (summed.argmin(dim=1) == labels).sum().item()
        correct_norm += (mean.argmin(dim=1) == labels).sum().item()
    model.train(was_training)
    return correct, correct_norm, len(mine)


def load_hellaswag(path, dist):
    """The examples of --hellaswag FILE, or of the official validation set (10,042 examples) when path is
    HELLASWAG_URL: downloaded once into the cache, by rank 0 alone under torchrun."""
    if path == HELLASWAG_URL:
        if dist.master:
            cached_download(path)
        dist.barrier()
        path = cached_download(path)
    return read_hellaswag(path)


def hellaswag_accuracy(model, examples, tokenizer, device, dtype, dist, batch_size, progress=False):
    """(acc, acc_norm, n) over all examples: each process scores its share, the counts are added up."""
    counts = hellaswag_scores(model, examples, tokenizer, device, dtype, dist.rank, dist.world, batch_size, progress)
    correct, correct_norm, n = dist.sum(torch.tensor(counts, device=device)).tolist()
    return correct / n, correct_norm / n, n


# -----------------------------------------------------------------------------
# 10. HF import and export: transformers and GGUF
# Import: GPT.from_pretrained reads an HF GPT2LMHeadModel or LlamaForCausalLM checkpoint
# (config.json and safetensors) and renames its tensors to ours; the converters are below.
# Export: a model is most useful where people already run models. --export-hf writes a folder that
# transformers loads with no code of ours (AutoModelForCausalLM, pipeline, lm-eval), and
# --export-gguf one file for llama.cpp and ollama. Only two HF classes compute what our blocks
# compute: GPT2LMHeadModel (learned positions, LayerNorm, GELU) and LlamaForCausalLM (RoPE,
# RMSNorm, SwiGLU, no biases). Any other mix (ALiBi, GPT-2 with RoPE, ...) is refused before
# anything is written. Our weights are already theirs up to layout:
#   - HF's GPT-2 multiplies with Conv1D, which stores a weight as (in, out): the transpose of
#     nn.Linear's (out, in). GPT-2 always has biases, so a model trained without gets zeros.
#   - Llama keeps q, k, v (and the MLP's gate, up) as separate matrices where we fuse each
#     group into one matmul: the fused rows are cut back apart.
#   - The GGUF is written from those HF tensors as llama.cpp's convert_hf_to_gguf.py would,
#     with one twist. RoPE rotates pairs of dimensions of each head: we and HF pair dimension i
#     with i + hd/2 (section 2), llama.cpp pairs neighbours (2i, 2i+1), as Meta's original code
#     did. Rotating other pairs computes another function, so the GGUF stores each head's q and
#     k rows in the order 0, hd/2, 1, hd/2+1, ...: the neighbours llama.cpp rotates together
#     are then our pairs, and q·k is unchanged. v and the output projection never see RoPE.
# Only the tokenizer's rows of the embedding and the head are written: a vocabulary padded for
# speed, or HF weights fine-tuned on bytes, has rows that no token id reaches.
# Our 'gpt2' and 'byte' tokenizers are written as byte-level BPE, the format of GPT-2's own HF
# files: every byte is spelled as one printable character, and merges join spelled pieces into
# tokens. tiktoken keeps only each token's rank, so the merges are recovered from the ranks; the
# byte tokenizer is 256 one-byte tokens and no merges. An HF tokenizer is copied as it is.


def download_hf(name):
    """Fetch config and weights of a hub model (users who are online) and return the local folder."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:  # an unknown name or no network: one line that says which
        raise ValueError(f"{name!r} is neither a local directory nor a model that could be downloaded: {e}") from None


def read_hf_weights(path):
    """All tensors of an HF checkpoint folder: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(f).items()}
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin")


def gpt2_config_from_hf(hf):
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation {hf.activation_function!r} is not supported (only tanh GELU)")
    plain_values = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("reorder_and_upcast_attn", False))
    for flag, plain in plain_values:
        if getattr(hf, flag, plain) != plain:
            raise ValueError(f"GPT-2 checkpoints with {flag}={not plain} are not supported")
    return GPTConfig.preset(
        "gpt2", "gpt2", n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, block_size=hf.n_positions,
        vocab_size=hf.vocab_size, mlp_hidden=hf.n_inner or 4 * hf.n_embd, norm_eps=hf.layer_norm_epsilon,
        tie_embeddings=getattr(hf, "tie_word_embeddings", True),
    )


GPT2_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # HF GPT-2 stores these as (in, out)


def gpt2_weights_from_hf(sd, config):
    """HF GPT-2 names match ours up to a 'transformer.' prefix; its Conv1D stores weights as (in, out)."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old checkpoints store the causal mask as a buffer
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        if k.endswith(GPT2_CONV1D):
            v = v.t()
        out[k] = v
    if config.tie_embeddings:
        out["lm_head.weight"] = out.get("transformer.wte.weight")
    return {k: v for k, v in out.items() if v is not None}


def llama_config_from_hf(hf):
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope scaling {rope_type!r} is not implemented: only plain RoPE ('default')")
    if hf.hidden_act != "silu":
        raise ValueError(f"Llama activation {hf.hidden_act!r} is not supported (only silu)")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError("Llama checkpoints with attention_bias / mlp_bias are not supported")
    return GPTConfig.preset(
        "gpt2", "llama", n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads, n_embd=hf.hidden_size,
        n_kv_head=hf.num_key_value_heads, head_dim=getattr(hf, "head_dim", None), vocab_size=hf.vocab_size,
        block_size=hf.max_position_embeddings, mlp_hidden=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
        rope_theta=rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)),
        tie_embeddings=hf.tie_word_embeddings,
    )


def llama_weights_from_hf(sd, config):
    """Llama keeps q/k/v and gate/up as separate matrices; we fuse each group into one Linear."""
    sd = {k.removeprefix("model."): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    out = {"transformer.wte.weight": sd.pop("embed_tokens.weight"), "transformer.ln_f.weight": sd.pop("norm.weight")}
    out["lm_head.weight"] = out["transformer.wte.weight"] if config.tie_embeddings else sd.pop("lm_head.weight", None)
    for i in range(config.n_layer):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        attn = [sd.pop(p + f"self_attn.{n}_proj.weight", None) for n in "qkv"]
        mlp = [sd.pop(p + f"mlp.{n}_proj.weight", None) for n in ("gate", "up")]
        out.update({
            q + "ln_1.weight": sd.pop(p + "input_layernorm.weight", None),
            q + "attn.c_attn.weight": torch.cat(attn) if None not in attn else None,
            q + "attn.c_proj.weight": sd.pop(p + "self_attn.o_proj.weight", None),
            q + "ln_2.weight": sd.pop(p + "post_attention_layernorm.weight", None),
            q + "mlp.c_fc.weight": torch.cat(mlp) if None not in mlp else None,
            q + "mlp.c_proj.weight": sd.pop(p + "mlp.down_proj.weight", None),
        })
    sd.pop("lm_head.weight", None)  # a tied checkpoint may still carry the copy
    out.update(sd)  # whatever is left is unexpected: from_pretrained reports it
    return {k: v for k, v in out.items() if v is not None}


HF_LOADERS = {
    "gpt2": (gpt2_config_from_hf, gpt2_weights_from_hf),
    "llama": (llama_config_from_hf, llama_weights_from_hf),
}


HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def hf_family(c):
    """'gpt2' or 'llama': the HF family that computes what config c computes. For any other mix, a ValueError
    names the settings that the closest family cannot express."""
    needs = {
        "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", n_kv_head=c.n_head, head_dim=c.n_embd / c.n_head),
        "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    }
    misfits = {arch: [f"{k}={getattr(c, k)!r}" for k, v in need.items() if getattr(c, k) != v]
               for arch, need in needs.items()}
    family = min(misfits, key=lambda arch: len(misfits[arch]))
    if misfits[family]:
        raise ValueError(f"no HF transformers class computes this model: the closest, {HF_CLASSES[family]}, "
                         f"has no {', '.join(misfits[family])}")
    return family


def hf_tensors(model, family, vocab_size):
    """Our weights under HF's names and layouts, the embedding and head cut to the tokenizer's vocab_size rows."""
    sd = dict(model.state_dict())
    for k in ("transformer.wte.weight", "lm_head.weight"):
        sd[k] = sd[k][:vocab_size]  # (V, C)
    if model.config.tie_embeddings:
        del sd["lm_head.weight"]  # HF ties it to the embedding again
    return gpt2_weights_to_hf(sd) if family == "gpt2" else llama_weights_to_hf(sd, model.config)


def gpt2_weights_to_hf(sd):
    """The inverse of gpt2_weights_from_hf: Conv1D matrices as (in, out), and zero biases where we have none."""
    out = {k: v.t() if k.endswith(GPT2_CONV1D) else v for k, v in sd.items()}
    for k, v in list(out.items()):
        if k.startswith(("transformer.h.", "transformer.ln_f.")) and k.endswith("weight"):
            out.setdefault(k.removesuffix("weight") + "bias", torch.zeros(v.shape[-1]))  # (out features,)
    return out


def llama_weights_to_hf(sd, c):
    """The inverse of llama_weights_from_hf: our fused c_attn and c_fc cut back into q, k, v and gate, up."""
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    kv = c.n_kv_head * c.head_dim
    for i in range(c.n_layer):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        wq, wk, wv = sd[q + "attn.c_attn.weight"].split([c.n_head * c.head_dim, kv, kv])  # (nh*hd, C), (nkv*hd, C) x2
        gate, up = sd[q + "mlp.c_fc.weight"].chunk(2)  # (mlp_hidden, C) each
        out.update({
            p + "input_layernorm.weight": sd[q + "ln_1.weight"],
            p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk, p + "self_attn.v_proj.weight": wv,
            p + "self_attn.o_proj.weight": sd[q + "attn.c_proj.weight"],
            p + "post_attention_layernorm.weight": sd[q + "ln_2.weight"],
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": sd[q + "mlp.c_proj.weight"],
        })
    return out


def hf_config(c, family, vocab_size, bos, eos):
    """config.json: our config under GPT2Config's or LlamaConfig's names."""
    common = dict(architectures=[HF_CLASSES[family]], model_type=family, vocab_size=vocab_size, bos_token_id=bos,
                  eos_token_id=eos, tie_word_embeddings=c.tie_embeddings, torch_dtype="float32")
    if family == "gpt2":
        return common | dict(
            n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_inner=c.mlp_hidden,
            layer_norm_epsilon=c.norm_eps, activation_function="gelu_new",  # GELU's tanh approximation
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        )
    return common | dict(
        hidden_size=c.n_embd, intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, hidden_act="silu", attention_dropout=c.dropout,
    )


def byte_spelling():
    """GPT-2's printable spelling of the 256 bytes: printable Latin-1 bytes stand for themselves, the others
    (control bytes, space, ...) take the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(0x100 + i) for i, b in enumerate(others)}}


def last_merge(piece, ranks):
    """The pair whose merge made the token `piece`: BPE on its bytes, merging the lowest-ranked pair first, ends
    in the two parts it was made of."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 2:
        _, i = min((ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def byte_level_bpe(name):
    """(tokens by id, merges [(left, right)], end-of-text id or None) of our 'byte' or tiktoken tokenizer,
    spelled as byte-level BPE."""
    spell = byte_spelling()
    if name == "byte":
        return [spell[b] for b in range(256)], [], None
    enc = get_tokenizer(name).enc
    pieces = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]  # each id's bytes
    specials = {enc.encode_single_token(s): s for s in enc.special_tokens_set}  # <|endoftext|>: 50256
    ranks = {p: i for i, p in enumerate(pieces) if i not in specials}

    def text(piece):
        return "".join(spell[b] for b in piece)

    tokens = [specials.get(i) or text(p) for i, p in enumerate(pieces)]
    merges = [tuple(map(text, last_merge(p, ranks))) for p in ranks if len(p) > 1]  # in rank order
    return tokens, merges, enc.eot_token


def byte_level_tokenizer(tokens, merges, eot):
    """A tokenizers.Tokenizer for byte-level BPE, set up as HF's GPT-2 tokenizer.json is."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split into words, then spelling
    tok.decoder = decoders.ByteLevel()  # spelling -> bytes -> UTF-8 text
    if eot is not None:
        tok.add_special_tokens([AddedToken(tokens[eot], special=True, normalized=False)])
    return tok


def special_ids(tokenizer):
    """(bos, eos) token ids, None where the tokenizer has none. GPT-2 uses <|endoftext|> for both."""
    hf = getattr(tokenizer, "tok", None)  # an HFTokenizer's transformers tokenizer
    return (hf.bos_token_id, hf.eos_token_id) if hf is not None else (tokenizer.eot, tokenizer.eot)


def save_hf_tokenizer(tokenizer, out, block_size):
    """An HF checkpoint's tokenizer files, copied; ours as tokenizer.json (the tokenizers library's format)."""
    import shutil

    if tokenizer.name.startswith("hf:"):
        for f in HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer.name[3:], f)):
                shutil.copy(os.path.join(tokenizer.name[3:], f), out)
        return
    tokens, merges, eot = byte_level_bpe(tokenizer.name)
    byte_level_tokenizer(tokens, merges, eot).save(os.path.join(out, "tokenizer.json"))
    special = {"bos_token": tokens[eot], "eos_token": tokens[eot]} if eot is not None else {}
    write_json(os.path.join(out, "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size, **special})


def export_hf(model, tokenizer, out):
    """out/: config.json, generation_config.json, model.safetensors and the tokenizer files."""
    from safetensors.torch import save_file

    family, vocab_size = hf_family(model.config), tokenizer.vocab_size
    bos, eos = special_ids(tokenizer)
    # safetensors stores each tensor whole: copy the views (slices, transposes, q/k/v splits) into their own memory
    tensors = hf_tensors(model, family, vocab_size)
    tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    with staged(out) as tmp:
        os.makedirs(tmp)
        write_json(os.path.join(tmp, "config.json"), hf_config(model.config, family, vocab_size, bos, eos))
        generation = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
        write_json(os.path.join(tmp, "generation_config.json"), generation)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        save_hf_tokenizer(tokenizer, tmp, model.config.block_size)


def import_gguf():
    try:
        import gguf  # llama.cpp's own reader and writer of the format
    except ImportError:
        raise ValueError("--export-gguf needs the gguf package (llama.cpp's gguf-py): pip install gguf") from None
    return gguf


def gguf_vocab(name):
    """byte_level_bpe, with one change for the byte tokenizer: GGUF cannot store an empty list, and llama.cpp
    insists on merges. So byte FF, which never occurs in UTF-8, is spelled as the pair C0 C1, which never occurs
    either, and one merge makes it: it never fires, and any UTF-8 text still encodes to exactly its bytes."""
    tokens, merges, eot = byte_level_bpe(name)
    if not merges:
        tokens = tokens[:0xFF] + [tokens[0xC0] + tokens[0xC1]]
        merges = [(tokens[0xC0], tokens[0xC1])]
    return tokens, merges, eot


def rope_pairs_adjacent(w, n_head):
    """Reorder each head's rows of a q or k weight (n_head*hd, C) from HF's halves (0 .. hd/2-1 | hd/2 .. hd-1) to
    llama.cpp's neighbouring pairs (0, hd/2, 1, hd/2+1, ...)."""
    rows, C = w.shape
    w = w.view(n_head, 2, rows // n_head // 2, C)  # (nh, 2, hd/2, C): the halves
    return w.transpose(1, 2).reshape(rows, C)  # (nh, hd/2, 2, C): dimension i beside i + hd/2, flattened


def gguf_hyperparameters(w, c, family, vocab_size):
    """The numbers llama.cpp builds the model from, under its key names ('<family>.block_count', ...)."""
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.mlp_hidden)
    w.add_head_count(c.n_head)
    if family == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
        return
    w.add_head_count_kv(c.n_kv_head)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(vocab_size)


def gguf_tokenizer(w, gguf, tokens, merges, eot):
    """The tokenizer as llama.cpp's 'gpt2' (byte-level BPE) model: tokens by id, their types, the merges."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's split of text into words before BPE
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == eot else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    if eot is not None:
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
    w.add_add_bos_token(False)


def export_gguf(model, tokenizer, path, dtype="f16"):
    """path: one GGUF file, the hyperparameters and tokenizer as key-value metadata, then the tensors."""
    gguf = import_gguf()
    c, family = model.config, hf_family(model.config)
    tokens, merges, eot = gguf_vocab(tokenizer.name)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2 if family == "gpt2" else gguf.MODEL_ARCH.LLAMA, c.n_layer)
    with staged(path) as tmp:
        w = gguf.GGUFWriter(tmp, family)
        gguf_hyperparameters(w, c, family, len(tokens))
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        gguf_tokenizer(w, gguf, tokens, merges, eot)
        for k, v in hf_tensors(model, family, len(tokens)).items():
            if family == "gpt2" and k.endswith(GPT2_CONV1D):
                v = v.t()  # back to (out, in): ggml keeps nn.Linear's layout
            if k.endswith(("q_proj.weight", "k_proj.weight")):
                v = rope_pairs_adjacent(v, c.n_head if k.endswith("q_proj.weight") else c.n_kv_head)
            name = names.get_name(k, try_suffixes=(".weight", ".bias"))  # blk.0.attn_q.weight, ...
            # --gguf-dtype is for the matrices: llama.cpp wants norms, biases and position embeddings in f32
            half = dtype == "f16" and v.dim() == 2 and not name.startswith("position_embd")
            w.add_tensor(name, v.to(torch.float16 if half else torch.float32).contiguous().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


# -----------------------------------------------------------------------------
# 11. Plumbing
# What a run needs around the model, none of it specific to GPTs: the device and dtype;
# the processes torchrun starts (DDP or FSDP wrapping, gradient sync); the random
# generators, seeded in one place; stop signals; files written atomically (checkpoints,
# downloads, exports) and checkpoints read without running code; the peak FLOP/s that MFU
# divides by; and the metrics log with its plot.


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
          threads alive regardless."""
        if not self.enabled:
            yield
            return
        import torch.distributed.fsdp  # noqa: F401  (see the NOTE: before init_process_group)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        torch.distributed.init_process_group(backend=backend, device_id=device_id)
        try:
            yield
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
        if backend == "gloo":  # the process ends here, with status 0 (see the NOTE)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def sum(self, t):
        """Sum a tensor over processes, in place."""
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def gather(self, obj):
        # any picklable object from every process, in rank order (the RNG states a checkpoint keeps)
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self):
        # wait until every process gets here (rank 0 preparing data or downloading, the others waiting)
        if self.enabled:
            torch.distributed.barrier()


def wrap_model(model, args, dist, device, dtype):
    """What runs the steps: the model, under torchrun inside DDP or, with --fsdp, sharded in place; compiled.

    NOTE: DDP options: gradient_as_bucket_view lets gradients live in DDP's all-reduce buckets (no copy,
    less memory); broadcast_buffers=False since our only buffers (RoPE tables, ALiBi slopes) are computed
    from the config, identical on every process, and need no broadcast each step.

    NOTE: FSDP (fully_shard, FSDP2) shards each Block, then the root (embeddings, final norm, head), so a
    forward gathers one block's weights at a time and frees them after; the weights become DTensors, each
    process holding a 1/N slice, and the optimizer built over them keeps 1/N of AdamW's state. A tied
    weight stays one parameter (wte and lm_head both live in the root's group). With bf16, FSDP's
    mixed-precision policy gathers bf16 copies of the fp32 master weights (half the traffic and memory of
    a gathered block) and reduces gradients in fp32. autocast stays on around the forward as on every other
    path, so the ops it keeps in fp32 (layer_norm, pow, rsqrt, exp, ...) run in fp32 here too; what differs
    from DDP is that FSDP casts each block's inputs (the residual stream, the RoPE tables) to bf16, as
    torchtitan does. fp16 is refused: its GradScaler would have to find an inf in any process's shard."""
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if dtype == torch.float16:
            raise ValueError("--fsdp trains in bfloat16 or float32, not float16 (its loss scaling is not shard-aware "
                             "here): pass --dtype bfloat16 or --dtype float32")
        policy = MixedPrecisionPolicy()  # fp32: nothing cast
        if dtype == torch.bfloat16:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # what is left: embeddings, ln_f, lm_head
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


def is_sharded(model):
    """Whether --fsdp's fully_shard split this model (or the one torch.compile wraps) across processes."""
    if "torch.distributed.fsdp" not in sys.modules:  # only --fsdp imports it: then nothing is sharded, and
        return False  # single-process and DDP runs skip the import (about a second)
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


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


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


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


def cached_download(url):
    """The local copy of url in ~/.cache/transformer.py/ (or $XDG_CACHE_HOME/transformer.py/), downloaded
    on first use."""
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "transformer.py")
    path = os.path.join(folder, url.rsplit("/", 1)[-1])
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        download(url, path, hint="pass a local copy: --hellaswag FILE")
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
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


CKPT_FORMAT = "transformer.py/1"  # stored in every checkpoint, so other files are told apart


def save_checkpoint(path, state):
    with atomic_open(path) as f:
        torch.save(state, f)


def load_checkpoint(path):
    """weights_only=True: only tensors and plain containers are rebuilt, so a file can never run code.
    mmap=True: tensors are read from the file as they are used, so eight processes resuming on one
    machine do not each copy the whole checkpoint into host RAM first."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a pickle asking for code or unknown classes, or not a torch file at all
        reason = str(e).strip().splitlines()[0][:200]
        raise ValueError(f"{path}: refused to load: not a plain transformer.py checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a transformer.py checkpoint (no '{CKPT_FORMAT}' format tag)")
    return ckpt


def training_state(model, optimizer):
    """(model state, optimizer state) for ckpt.pt: model.state_dict() and optimizer.state_dict(), plain tensors.

    Under FSDP every process must call this: each weight and each AdamW moment is gathered from its shards
    into whole CPU tensors on rank 0 (the other processes get ({}, {})), and laid out as one process's
    state_dict()s would be. So a checkpoint is the same file whether one process, DDP or FSDP wrote it, and
    any of them can read it (load_training_state).

    NOTE: the gathered layout costs rank 0 the host RAM of the whole model and optimizer state at every save
    (~12 bytes a parameter: fp32 weights and AdamW's two moments); torch.distributed.checkpoint would let
    each process write its own shard instead (README: "Many GPUs: DDP or FSDP")."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only
    model_state = get_model_state_dict(model, options=full)
    optim_state = get_optimizer_state_dict(model, optimizer, options=full)  # keyed by parameter name
    if not model_state:
        return {}, {}
    first = {}  # a tied weight comes back as two copies: make it one tensor under both names, as in state_dict()
    for name, p in model.named_parameters(remove_duplicate=False):
        model_state[name] = model_state[first.setdefault(id(p), name)]
    ids = optimizer.state_dict()  # torch.optim's layout (ids 0, 1, ... and the groups' settings), local shards
    ids["state"] = {i: optim_state["state"][name] for i, name in enumerate(optimizer_param_names(model, optimizer))
                    if name in optim_state["state"]}
    return model_state, ids


def load_training_state(model, optimizer, ckpt):
    """Put ckpt's model and optimizer state into model and optimizer, whatever wrote it (one process, DDP or FSDP).
    Under FSDP every process reads the whole tensors (mapped from the file, see load_checkpoint) and keeps its
    own shard of each."""
    if not is_sharded(model):
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=full)
    names = optimizer_param_names(model, optimizer)  # torch.optim's ids -> the names FSDP's loader expects
    saved = ckpt["optimizer"]
    by_name = {"state": {names[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


def optimizer_param_names(model, optimizer):
    """The name of each parameter the optimizer updates, in the order of its state_dict() ids 0, 1, 2, ..."""
    names = {id(p): name for name, p in model.named_parameters()}  # a tied weight under its first name
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def model_from_checkpoint(ckpt):
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def check_same_architecture(saved, config, path):
    ours = config.architecture()
    diff = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in ours.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"{path} was trained with another model config: {', '.join(diff)}; "
                         "use the same model flags to resume")


# MFU (model FLOPs utilisation) = the FLOPs a step needs / the time it took / the device's peak.
# On a GPU the peak is the datasheet's dense bf16 tensor-core figure (no 2:4 sparsity), matched in
# order against torch.cuda.get_device_name(): the more specific names come first, since
# "NVIDIA H100 PCIe" also contains "H100" and "NVIDIA A100-SXM4-80GB" also contains "A10".
# A GPU not in the table gets no MFU at all rather than a made-up one.
GPU_PEAK_FLOPS = [
    ("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800 PCIe", 756e12), ("H800", 989e12),
    ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("A10G", 125e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 6000 Ada", 364e12), ("RTX A6000", 155e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def gpu_peak_flops(name):
    """Datasheet dense bf16 FLOP/s for a torch.cuda.get_device_name(), or None when the GPU is unknown."""
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)


def matmul_peak_flops(device, dtype=torch.float32, n=512, repeats=5):
    """Measured FLOP/s of a square matmul: the CPU's practical peak, used as MFU's denominator there.
    The matrices are constant, not random: nothing here may draw from the global RNG, whose state a
    resumed run has restored (dropout masks would shift)."""
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        t0 = time.perf_counter()
        a @ a
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device):
    """(FLOP/s or None, where the figure comes from) for one device: a GPU's datasheet bf16 peak, or a CPU's
    measured fp32 matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        return flops, f"{name}: " + ("bf16 datasheet peak" if flops else "not in GPU_PEAK_FLOPS, so MFU is unknown")
    return matmul_peak_flops(device), f"fp32 matmul measured at start-up on {device.type}"


def mfu(tokens_per_s, flops_per_token, world, peak):
    """MFU of one device: its share of the tokens (all processes' tokens/s / world) x FLOPs per token / its peak."""
    return None if peak is None else tokens_per_s / world * flops_per_token / peak


class MetricsLog:
    """Every step's record, as one line of metrics.jsonl and, with --wandb PROJECT, in Weights & Biases.
    Rank 0 writes; a resumed run first drops the lines of the steps it is about to redo."""

    def __init__(self, path, step, args, master):
        self.path, self.master, self.wandb = path, master, None
        if not master:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        keep_metrics_before(path, step)
        if args.wandb:
            import wandb  # only --wandb needs it

            self.wandb = wandb.init(project=args.wandb, config=vars(args), dir=os.path.dirname(path) or ".")

    def write(self, record):
        if self.master:
            record = {k: v for k, v in record.items() if v is not None}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log(record, step=record["step"])

    def close(self):
        if self.wandb:
            self.wandb.finish()


def log_line(r):
    val = f" | val {r['val_loss']:.4f}" if "val_loss" in r else ""
    val += f" | hellaswag {r['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in r else ""
    mfu_text = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    return (f"step {r['step']:5d} | loss {r['loss']:.4f}{val} | lr {r['lr']:.2e} | norm {r['grad_norm']:.3f} | "
            f"{r['tokens_per_s']:,.0f} tok/s | MFU {mfu_text}")


def keep_metrics_before(path, step):
    """Drop metrics.jsonl lines of steps >= step (all of them for a fresh run), atomically. A line cut
    short by a kill -9 is dropped too."""
    lines = []
    if step > 0 and os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    if line.endswith("\n") and json.loads(line)["step"] < step:
                        lines.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def plot_metrics(path, target=None, target_label="target"):
    """loss.png beside metrics.jsonl, when matplotlib is installed; returns its path (None without matplotlib).

    One step's loss is one batch's: noisy. So every step's train loss is drawn faint, and over it a
    moving average centred on each step, which shows the trend without lagging behind it; val loss,
    measured every --eval-every steps on the same batches, is drawn as points joined by a line, and
    `target` as a horizontal line (a loss to beat, named target_label). The left panel is the whole
    run; the right one zooms in on its second half, where the curves are close together and the
    differences that matter (train vs val, val vs target) are a few hundredths. Linear axes."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend needed
    except ImportError:
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    if not rows:  # nothing logged yet
        return None
    steps, loss = np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    # Moving average over 2h+1 steps (fewer at the ends), from a running sum: smooth[i] = mean(loss[lo:hi]).
    n, h = len(loss), max(1, len(loss) // 80)
    total = np.concatenate([[0.0], np.cumsum(loss)])  # (n + 1,)
    lo, hi = np.maximum(np.arange(n) - h, 0), np.minimum(np.arange(n) + h + 1, n)
    smooth = (total[hi] - total[lo]) / (hi - lo)  # (n,)

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    whole, tail = fig.subplots(1, 2)
    for ax in (whole, tail):
        ax.plot(steps, loss, color="tab:blue", alpha=0.2, linewidth=0.8, label="train loss, each step")
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train loss, mean of {2 * h + 1} steps")
        if val:
            ax.plot(*zip(*val), "o-", color="tab:orange", markersize=4, linewidth=1.5,
                    label=f"val loss (last {val[-1][1]:.4f})")
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle="--", linewidth=1.2, label=f"{target_label} {target:.4f}")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    margin = 0.02 * (steps[-1] - steps[0]) + 0.5  # so the last val point is drawn whole
    whole.set(ylabel="loss (cross-entropy per token)", title="whole run", xlim=(steps[0], steps[-1] + margin))
    # The zoom: the second half's steps, and a y range that holds its average, val points and the target.
    first = steps[n // 2]
    near = [*smooth[n // 2 :], *(v for s, v in val if s >= first), *([target] if target is not None else [])]
    pad = 0.15 * (max(near) - min(near)) + 1e-3
    tail.set(title="second half, zoomed in", xlim=(first, steps[-1] + margin), ylim=(min(near) - pad, max(near) + pad))
    whole.legend(loc="upper right")
    fig.suptitle(f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}: {n} steps")
    out = os.path.join(os.path.dirname(path), "loss.png")
    fig.savefig(out, dpi=110)
    return out


# -----------------------------------------------------------------------------
# 12. Commands
# What the command line runs: train (the default), --sample, --eval (perplexity or
# HellaSwag) and --export-hf / --export-gguf. Each picks the device, loads what it needs
# and hands over to the sections above.


def prepare_default_data(data_dir):
    """The main job's data: tiny Shakespeare at byte (= character) level, prepared on first use by
    prepare_data.py, run as a program (it imports this file; this file never imports it)."""
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
        done = subprocess.run([sys.executable, script, "--tokenizer", "byte", "--out", data_dir, "--overwrite"])
        if done.returncode != 0:
            raise SystemExit(done.returncode)  # prepare_data.py has said why, in one line


def train(args):
    """The default command. Run alone or under torchrun: every process executes this same function, and
    Distributed tells it which one it is (rank) and how many there are (world)."""
    dist = Distributed()
    device = pick_device(args.device, dist.local_rank)
    dtype = pick_dtype(args.dtype, device)
    if args.compile is None:
        args.compile = device.type == "cuda"  # on small CPU models compiling costs ~30 s and buys nothing
    with dist.running(device):
        run_training(args, dist, device, dtype)


def load_for_inference(args, device):
    """(model in eval mode, tokenizer) from --ckpt or --init-from; the tokenizer is the one recorded with the
    weights."""
    if args.ckpt:
        ckpt = load_checkpoint(args.ckpt)
        model, tokenizer_name = model_from_checkpoint(ckpt), ckpt["tokenizer"]
    else:  # parse_args made sure there is one of the two
        model = GPT.from_pretrained(args.init_from)
        tokenizer_name = model.tokenizer
    if args.block_size:
        model.set_block_size(args.block_size)
    tokenizer = get_tokenizer(tokenizer_name)
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
            tokens, source = tokenizer.encode(f.read()), args.text
    elif args.data:  # shards must hold the ids of the model's own tokenizer
        meta = read_meta(args.data)
        if meta["tokenizer"] != tokenizer.name:
            raise ValueError(f"{args.data} was tokenized with {meta['tokenizer']}, the model uses {tokenizer.name}")
        files = find_shards(args.data, "val")
        tokens, source = np.concatenate([load_shard(f, meta["vocab_size"]) for f in files]), f"{args.data} (val split)"
    else:
        raise ValueError("--eval needs --data DIR (its whole val split) or --text FILE")
    if len(tokens) < 2:
        raise ValueError(f"{source}: fewer than 2 tokens, nothing to predict")
    loss, n = evaluate_tokens(model, tokens, args.batch_size, device, dtype, tokenizer.vocab_size)
    print(f"{source}: loss {loss:.4f} | perplexity {math.exp(loss):.3f} | {n:,} tokens predicted "
          f"in windows of {model.config.block_size}")


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
    family = hf_family(model.config)  # refuses a mix no HF class computes, before anything is written
    if args.export_gguf:
        import_gguf()
        if tokenizer.name.startswith("hf:"):
            raise ValueError(f"--export-gguf writes the gpt2 and byte tokenizers, not {tokenizer.name}'s: use "
                             "--export-hf, then llama.cpp's convert_hf_to_gguf.py on that folder")
    for path, folder in ((args.export_hf, True), (args.export_gguf, False)):
        if path:
            check_new_output(path, folder)
    what = f"{HF_CLASSES[family]}, {model.num_params():,} parameters, {tokenizer.name} tokenizer"
    if args.export_hf:
        export_hf(model, tokenizer, args.export_hf)
        print(f"wrote {args.export_hf}: {what}")
    if args.export_gguf:
        export_gguf(model, tokenizer, args.export_gguf, args.gguf_dtype)
        print(f"wrote {args.export_gguf}: {what}, {args.gguf_dtype}")


# -----------------------------------------------------------------------------
# 13. CLI
# One entry point, main(). The defaults are the main job's recipe: a small LLaMA-style
# model (--size mini) on tiny Shakespeare characters, sized so a 2-core CPU beats
# nanoGPT's CPU recipe in about half its time (README: "Results"). Every value is
# checked here, before any work: a bad one is one line and exit status 2.


DEFAULT_DATA = os.path.join("data", "shakespeare_byte")  # where the main job prepares its data
NANOGPT_CPU_VAL_LOSS = 1.8857  # nanoGPT's README: train_shakespeare_char's val loss with its CPU flags


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


# The flags by group. The model's numbers default to the --size preset (check_args fills them in), so
# GPTConfig's presets are the one source of defaults; training's defaults are the main job's recipe.


def data_and_model_flags(p):
    """What to train on and what to train: an --arch preset (the kind of model) and a --size preset (how big),
    each open to single overrides. --pos, --norm and --mlp are the switches of the architecture table."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help="directory of shards from prepare_data.py or llm.c (default: tiny "
                   f"Shakespeare bytes in {DEFAULT_DATA}, prepared on first use)")
    g = p.add_argument_group("model")
    # the kind of model (ARCHS), then single switches on top of it
    g.add_argument("--arch", default="llama", choices=list(ARCHS), help="architecture preset")
    g.add_argument("--pos", choices=POSITIONS, help="override the preset's positions")
    g.add_argument("--norm", choices=NORMS, help="override the preset's norm")
    g.add_argument("--mlp", choices=MLPS, help="override the preset's MLP")
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
    """The optimization. The defaults are the main job's, measured on a 2-core CPU (README: "Results"): AdamW
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
                   "(the main job: 9 points for loss.png, about 6%% of its time)")
    g.add_argument("--eval-iters", type=at_least(1), default=20)
    g.add_argument("--ckpt-every", type=at_least(1), default=1000)
    # a resumed run continues exactly where the last save left off, even after a kill -9
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
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
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW state over "
                   "the processes (FSDP2) instead of a full copy on each (DDP); checkpoints keep the one format")


def inference_flags(p):
    """--sample and --eval read a checkpoint (--ckpt) or HF weights (--init-from) and never train."""
    g = p.add_argument_group("sampling (--sample) and evaluation (--eval)")
    # the command, and what to load
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sample", action="store_true", help="generate text from --ckpt or --init-from")
    mode.add_argument("--eval", action="store_true",
                      help="loss and perplexity of --ckpt or --init-from on --data's val split or --text, "
                      "or --hellaswag")
    g.add_argument("--ckpt", help="a checkpoint written by training")
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
    g.add_argument("--hellaswag", nargs="?", const=HELLASWAG_URL, metavar="FILE",
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
    if args.fsdp and args.optimizer == "muon":
        p.error("--optimizer muon needs whole matrices (Newton-Schulz on a shard is another update): use DDP")
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
    fill_in_shape(p, args)
    if args.init_from is None:  # a new model: its shape must make sense (HF weights bring their own)
        n_kv_head = args.n_kv_head or args.n_head
        if args.n_embd % args.n_head:
            p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
        if args.n_head % n_kv_head:
            p.error(f"--n-head {args.n_head} is not a multiple of --n-kv-head {n_kv_head}")
        if (args.pos or ARCHS[args.arch]["pos"]) == "rope" and (args.n_embd // args.n_head) % 2:
            p.error(f"RoPE needs an even head dim; --n-embd {args.n_embd} / --n-head {args.n_head} "
                    f"= {args.n_embd // args.n_head}")
    # An optimizer step adds up whole micro-steps: B x T tokens on each process (torchrun sets WORLD_SIZE)
    micro = args.batch_size * args.seq_len * int(os.environ.get("WORLD_SIZE", 1))
    if args.total_batch_tokens is not None and args.total_batch_tokens % micro:
        p.error(f"--total-batch-tokens {args.total_batch_tokens} is not a multiple of "
                f"batch x seq-len x processes = {micro}")


def fill_in_shape(p, args):
    """One source of defaults: what the model flags leave open comes from the --size preset (default mini), as
    GPTConfig.preset has it. The context (--block-size) defaults to the training windows (--seq-len) and the
    other way round, so --seq-len 256 alone trains a 256-token model, as it always did."""
    shape = [f for f in ("size", "n_layer", "n_head", "n_embd", "block_size") if getattr(args, f) is not None]
    if args.init_from and shape:  # HF weights fix all of these; a flag that cannot act is refused, not ignored
        p.error(f"--init-from {args.init_from} brings its own shape: drop --{shape[0].replace('_', '-')}")
    args.size = args.size or "mini"
    size = {**dataclasses.asdict(GPTConfig()), **SIZES[args.size]}
    for k in ("n_layer", "n_head", "n_embd"):
        setattr(args, k, getattr(args, k) or size[k])
    args.block_size = args.block_size or args.seq_len or size["block_size"]
    args.seq_len = args.seq_len or args.block_size
    if args.seq_len > args.block_size:  # learned positions have no vector past block_size
        p.error(f"--seq-len {args.seq_len} is longer than the model's context, --block-size {args.block_size}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block): 'transformer.py: error: ...', exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(low, high=None):
    """An argparse type: an integer >= low (and <= high, when given)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be >= {low}{f' and <= {high}' if high else ''}, got {value}")
        return value

    return parse


def in_range(low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a finite number between low and high, each end included unless it is open."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            if high == math.inf:
                interval = f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text}")
        return value

    return parse


def device_name(text):
    """An argparse type: 'auto' or a device torch knows and this machine has (cpu, cuda, cuda:1, mps)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine")
    return text


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
            train(args)
    except (ValueError, OSError) as e:
        print(f"transformer.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
