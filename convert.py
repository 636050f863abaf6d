"""
convert.py: a transformer.py model to and from other tools' formats. A companion of transformer.py,
which imports it (GPT.from_pretrained, --export-hf, --export-gguf); it never imports transformer.py.

Import: GPT.from_pretrained reads an HF GPT2LMHeadModel, LlamaForCausalLM or NanoChatForCausalLM
checkpoint (config.json and safetensors) and renames its tensors to ours with the converters below.
Export: a model is most useful where people already run models. --export-hf writes a folder that
transformers loads with no code of ours (AutoModelForCausalLM, pipeline, lm-eval), and
--export-gguf one file for llama.cpp and ollama. Three HF classes compute what our blocks
compute: GPT2LMHeadModel (learned positions, LayerNorm, GELU), LlamaForCausalLM (RoPE,
RMSNorm, SwiGLU, no biases) and NanoChatForCausalLM (RoPE, weightless RMSNorm also after the
embedding and on q and k, ReLU², no biases, a soft-cap or none). Any other mix (ALiBi, GPT-2
with RoPE, Llama with QK-norm, ...) is refused before anything is written. llama.cpp runs the
first two only (check_gguf_family). Our weights are already theirs up to layout:
  - HF's GPT-2 multiplies with Conv1D, which stores a weight as (in, out): the transpose of
    nn.Linear's (out, in). GPT-2 always has biases, so a model trained without gets zeros.
  - Llama and NanoChat keep q, k, v (and Llama's MLP gate, up) as separate matrices where we
    fuse each group into one matmul: the fused rows are cut back apart.
  - NanoChat rotates RoPE's pairs the other way round: its q and k rows, each head's two halves
    swapped, are ours (nanochat_rope).
  - The GGUF is written from those HF tensors as llama.cpp's convert_hf_to_gguf.py would,
    with one twist. RoPE rotates pairs of dimensions of each head: we and HF pair dimension i
    with i + hd/2 (transformer.py, section 2), llama.cpp pairs neighbours (2i, 2i+1), as Meta's
    original code did. Rotating other pairs computes another function, so the GGUF stores each
    head's q and k rows in the order 0, hd/2, 1, hd/2+1, ...: the neighbours llama.cpp rotates
    together are then our pairs, and q·k is unchanged. v and the output projection never see RoPE.
Only the tokenizer's rows of the embedding and the head are written: a vocabulary padded for
speed, or HF weights fine-tuned on bytes, has rows that no token id reaches.
Our tokenizers are written as byte-level BPE, the format of GPT-2's own HF files: every byte is
spelled as one printable character, and merges join spelled pieces into tokens. A trained BPE
('bpe:N') already is one, and its tokenizer.json is written as it is. tiktoken keeps only each
token's rank, so the merges are recovered from the ranks; the byte tokenizer is 256 one-byte tokens
and no merges. An HF tokenizer is copied as it is. GGUF holds byte-level BPE only (gguf_vocab); what
else an HF tokenizer may be is refused there, naming llama.cpp's own converter.
"""

import functools
import glob
import json
import math
import os
import shutil

import torch

from files import staged, write_json
from tokenizer import BPE_SPLIT, byte_spelling


def hf_folder(name_or_path):
    """A local HF checkpoint folder as it is; a hub name ('gpt2', 'HuggingFaceTB/SmolLM2-135M') downloaded once
    into HF's cache (for users who are online), and that folder."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:  # an unknown name or no network: one line that says which
        raise ValueError(f"{name_or_path!r} is neither a local directory nor a model that could be downloaded: "
                         f"{e}") from None


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


# Each family: (its HF config -> GPTConfig fields on top of our preset of the same name, its tensors -> ours).


def gpt2_config_from_hf(hf):
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation {hf.activation_function!r} is not supported (only tanh GELU)")
    plain_values = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("reorder_and_upcast_attn", False))
    for flag, plain in plain_values:
        if getattr(hf, flag, plain) != plain:
            raise ValueError(f"GPT-2 checkpoints with {flag}={not plain} are not supported")
    return dict(
        n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, block_size=hf.n_positions,
        vocab_size=hf.vocab_size, mlp_hidden=hf.n_inner or 4 * hf.n_embd, norm_eps=hf.layer_norm_epsilon,
        tie_embeddings=getattr(hf, "tie_word_embeddings", True),
    )


GPT2_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # HF GPT-2 stores these as (in, out)
GPT2_RENAMED = {"transformer.wpe.weight": "positions.weight"}  # HF's name -> ours: the learned Positions' table


def gpt2_weights_from_hf(sd, config):
    """HF GPT-2 names match ours up to a 'transformer.' prefix (and wpe, our positions); its Conv1D stores weights
    as (in, out)."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old checkpoints store the causal mask as a buffer
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        k = GPT2_RENAMED.get(k, k)
        if k.endswith(GPT2_CONV1D):
            v = v.t()
        out[k] = v
    if config.tie_embeddings:
        out["lm_head.weight"] = out.get("transformer.wte.weight")
    return {k: v for k, v in out.items() if v is not None}


def rope_config_from_hf(hf, activation):
    """Llama's and NanoChat's config.json (the same names, but for the MLP's activation), or a ValueError naming
    a setting that our blocks do not compute."""
    family = type(hf).__name__.removesuffix("Config")  # Llama, NanoChat
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope scaling {rope_type!r} is not implemented: only plain RoPE ('default')")
    if hf.hidden_act != activation:
        raise ValueError(f"{family} activation {hf.hidden_act!r} is not supported (only {activation})")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError(f"{family} checkpoints with attention_bias / mlp_bias are not supported")
    return dict(
        n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads, n_embd=hf.hidden_size,
        n_kv_head=hf.num_key_value_heads, head_dim=getattr(hf, "head_dim", None), vocab_size=hf.vocab_size,
        block_size=hf.max_position_embeddings, mlp_hidden=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
        rope_theta=rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)),
        tie_embeddings=hf.tie_word_embeddings,
    )


def nanochat_config_from_hf(hf):
    """NanoChat is Llama's config with ReLU² and a soft-cap (None: none); ARCHS['nanochat'] sets its norms."""
    return rope_config_from_hf(hf, "relu2") | dict(logit_softcap=hf.final_logit_softcapping)


# Ours -> HF's names of a layer's tensors in the RoPE families. A tuple: HF's separate matrices, which we fuse into
# one Linear (q, k, v into c_attn; Llama's gate, up into c_fc). NanoChat's norms have no weights to name.
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
ROPE_LAYERS = {
    "llama": {"ln_1.weight": "input_layernorm.weight", "attn.c_attn.weight": QKV,
              "attn.c_proj.weight": "self_attn.o_proj.weight", "ln_2.weight": "post_attention_layernorm.weight",
              "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
              "mlp.c_proj.weight": "mlp.down_proj.weight"},
    "nanochat": {"attn.c_attn.weight": QKV, "attn.c_proj.weight": "self_attn.o_proj.weight",
                 "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_proj.weight": "mlp.fc2.weight"},
}


def halves_swapped(w, n_head):
    """A q or k weight (n_head*hd, C) with the two halves of each head's rows swapped; another shape as it is
    (from_pretrained then reports it)."""
    if w.dim() != 2 or w.shape[0] % (2 * n_head):
        return w
    rows, C = w.shape
    return w.view(n_head, 2, rows // n_head // 2, C).flip(1).reshape(rows, C)  # (nh, halves, hd/2, C)


def nanochat_rope(sd, c):
    """NanoChat rotates each pair (x1, x2) of a head's two halves the other way round from Llama and us: to
    (x1 cos + x2 sin, x2 cos - x1 sin), which is our rotation of the pair (x2, x1). So its q and k weights with
    each head's halves swapped (HF names, either way: the swap undoes itself) compute ours. q and k are swapped
    alike, and neither q·k nor the weightless QK-norm sees the order of a head's dimensions: the same scores."""
    out = dict(sd)
    for k, v in sd.items():
        for name, n_head in (("self_attn.q_proj.weight", c.n_head), ("self_attn.k_proj.weight", c.n_kv_head)):
            if k.endswith(name):
                out[k] = halves_swapped(v, n_head)
    return out


def rope_weights_from_hf(sd, config, family):
    """Llama's and NanoChat's tensors under our names: q/k/v (and Llama's gate/up) fused into one Linear each."""
    sd = {k.removeprefix("model."): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    sd = nanochat_rope(sd, config) if family == "nanochat" else sd
    out = {"transformer.wte.weight": sd.pop("embed_tokens.weight", None),
           "transformer.ln_f.weight": sd.pop("norm.weight", None)}
    out["lm_head.weight"] = out["transformer.wte.weight"] if config.tie_embeddings else sd.pop("lm_head.weight", None)
    for i in range(config.n_layer):
        for ours, theirs in ROPE_LAYERS[family].items():
            parts = [sd.pop(f"layers.{i}.{name}", None) for name in (theirs if isinstance(theirs, tuple) else [theirs])]
            out[f"transformer.h.{i}.{ours}"] = torch.cat(parts) if None not in parts else None
    sd.pop("lm_head.weight", None)  # a tied checkpoint may still carry the copy
    out.update(sd)  # whatever is left is unexpected: from_pretrained reports it
    return {k: v for k, v in out.items() if v is not None}


HF_LOADERS = {
    "gpt2": (gpt2_config_from_hf, gpt2_weights_from_hf),
    "llama": (functools.partial(rope_config_from_hf, activation="silu"),
              functools.partial(rope_weights_from_hf, family="llama")),
    "nanochat": (nanochat_config_from_hf, functools.partial(rope_weights_from_hf, family="nanochat")),
}


def read_hf(name_or_path):
    """An HF checkpoint, a hub name or a local folder: (its model_type, which is also our --arch; the GPTConfig
    fields its config.json gives; a function of our config that reads its weights under our names)."""
    from transformers import AutoConfig  # only reading HF checkpoints needs transformers

    path = hf_folder(name_or_path)
    hf = AutoConfig.from_pretrained(path)
    if hf.model_type not in HF_LOADERS:
        raise ValueError(f"{name_or_path}: model_type {hf.model_type!r} is not supported "
                         f"(supported: {', '.join(HF_LOADERS)})")
    config_from_hf, weights_from_hf = HF_LOADERS[hf.model_type]
    return hf.model_type, config_from_hf(hf), lambda config: weights_from_hf(read_hf_weights(path), config)


HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "nanochat": "NanoChatForCausalLM"}


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def hf_family(c):
    """'gpt2', 'llama' or 'nanochat': the HF family that computes what config c computes. For any other mix, a
    ValueError names the settings that the closest family cannot express."""
    later = dict(value_embeds=False, x0_lambdas=False)  # nanochat's later model: no HF class has these
    plain = dict(embed_norm=False, qk_norm=False, logit_softcap=None, **later)  # nor GPT-2 and Llama these
    needs = {
        "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", n_kv_head=c.n_head, head_dim=c.n_embd / c.n_head,
                     **plain),
        "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, **plain),
        "nanochat": dict(pos="rope", norm="rmsnorm-noweight", mlp="relu2", bias=False, embed_norm=True, qk_norm=True,
                         **later),
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
    return gpt2_weights_to_hf(sd) if family == "gpt2" else rope_weights_to_hf(sd, model.config, family)


def gpt2_weights_to_hf(sd):
    """The inverse of gpt2_weights_from_hf: Conv1D matrices as (in, out), and zero biases where we have none."""
    hf_names = {ours: hf for hf, ours in GPT2_RENAMED.items()}
    out = {hf_names.get(k, k): v.t() if k.endswith(GPT2_CONV1D) else v for k, v in sd.items()}
    for k, v in list(out.items()):
        if k.startswith(("transformer.h.", "transformer.ln_f.")) and k.endswith("weight"):
            out.setdefault(k.removesuffix("weight") + "bias", torch.zeros(v.shape[-1]))  # (out features,)
    return out


def rope_weights_to_hf(sd, c, family):
    """The inverse of rope_weights_from_hf: our fused c_attn and c_fc cut back into q, k, v and gate, up."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    out = {theirs: sd[ours] for ours, theirs in names.items() if ours in sd}  # a weightless norm has no tensor
    kv = c.n_kv_head * c.head_dim
    for i in range(c.n_layer):
        for ours, theirs in ROPE_LAYERS[family].items():
            w = sd[f"transformer.h.{i}.{ours}"]
            if theirs == QKV:
                parts = w.split([c.n_head * c.head_dim, kv, kv])  # (nh*hd, C), (nkv*hd, C) x2
            else:
                theirs, parts = (theirs, w.chunk(2)) if isinstance(theirs, tuple) else ([theirs], [w])  # gate, up
            out.update({f"model.layers.{i}.{name}": part for name, part in zip(theirs, parts)})
    return nanochat_rope(out, c) if family == "nanochat" else out


def hf_config(c, family, vocab_size, bos, eos):
    """config.json: our config under GPT2Config's, LlamaConfig's or NanoChatConfig's names."""
    common = dict(architectures=[HF_CLASSES[family]], model_type=family, vocab_size=vocab_size, bos_token_id=bos,
                  eos_token_id=eos, tie_word_embeddings=c.tie_embeddings, torch_dtype="float32")
    if family == "gpt2":
        return common | dict(
            n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_inner=c.mlp_hidden,
            layer_norm_epsilon=c.norm_eps, activation_function="gelu_new",  # GELU's tanh approximation
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        )
    rope = common | dict(
        hidden_size=c.n_embd, intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, attention_dropout=c.dropout,
    )
    if family == "llama":
        return rope | dict(hidden_act="silu")
    # NanoChatConfig's pad_token_id defaults to 1, a real token of ours
    return rope | dict(hidden_act="relu2", final_logit_softcapping=c.logit_softcap, pad_token_id=None)


def last_merge(piece, ranks):
    """The pair whose merge made the token `piece`: BPE on its bytes, merging the lowest-ranked pair first, ends
    in the two parts it was made of."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 2:
        _, i = min((ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiktoken_tokens(enc):
    """Each id's token of a tiktoken encoding, spelled as byte-level BPE; special tokens by their names."""
    spell = byte_spelling()
    specials = {enc.encode_single_token(s): s for s in enc.special_tokens_set}  # <|endoftext|>: 50256
    return [specials.get(i) or "".join(spell[b] for b in enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]


def byte_level_bpe(name):
    """(tokens by id, merges [(left, right)], end-of-text id or None, split pattern) of our 'byte' or tiktoken
    tokenizer, spelled as byte-level BPE. The pattern is what text is cut into before merging: None for GPT-2's
    (HF's ByteLevel pre-tokenizer has it built in), else the encoding's own (cl100k_base's, ...). A token that no
    merge of two tokens makes (a test vocabulary's filler) gets no merge: tiktoken cannot make it either."""
    spell = byte_spelling()
    if name == "byte":
        return [spell[b] for b in range(256)], [], None, None
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pattern

    enc = tiktoken.get_encoding(name)
    tokens = tiktoken_tokens(enc)
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in specials}
    pairs = (last_merge(p, ranks) for p in ranks if len(p) > 1)  # in rank order
    merges = [tuple("".join(spell[b] for b in part) for part in pair) for pair in pairs if set(pair) <= ranks.keys()]
    return tokens, merges, enc.eot_token, None if enc._pat_str == r50k_pat_str else enc._pat_str


def hf_tokenizer_name(path):
    """What to decode an HF folder's token ids with: the folder's own tokenizer whenever it ships one, unless it
    is GPT-2's own (then tiktoken's 'gpt2': the same ids, and the name GPT-2 datasets record). A GPT-2 folder
    without tokenizer files gets 'gpt2'; any other folder needs its own."""
    vocab = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
            spec = json.load(f)
        vocab = dict(spec.get("model", {}).get("vocab") or {})
        vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    elif os.path.isfile(os.path.join(path, "vocab.json")):
        with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
    if vocab is None:
        with open(os.path.join(path, "config.json")) as f:
            model_type = json.load(f).get("model_type")
        if model_type == "gpt2":
            return "gpt2"
        raise ValueError(f"{path}: no tokenizer (tokenizer.json or vocab.json) beside the {model_type} weights")
    if len(vocab) == 50257 and isinstance(vocab, dict):
        import tiktoken

        if vocab == {t: i for i, t in enumerate(tiktoken_tokens(tiktoken.get_encoding("gpt2")))}:
            return "gpt2"
    return "hf:" + path


def byte_level_tokenizer(tokens, merges, eot, pattern=None):
    """A tokenizers.Tokenizer for byte-level BPE, set up as HF's GPT-2 tokenizer.json is, or for another split
    pattern as HF's Llama 3 tokenizer.json is: the pattern, then the byte spelling. NOTE: tiktoken takes a piece
    that is a token whole, before any merge (HF's ignore_merges, which Llama 3's file sets too); on GPT-2's
    vocabulary the merges always end in that token, and GPT-2's own file leaves it off."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pattern is not None))
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split into words, spelled
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()  # spelling -> bytes -> UTF-8 text
    if eot is not None:
        tok.add_special_tokens([AddedToken(tokens[eot], special=True, normalized=False)])
    return tok


def tokenizer_json(tokenizer):
    """The text of a tokenizer.json (HF tokenizers' format) for any of our tokenizers: a trained BPE's own, an HF
    tokenizer's (a fast one's; a SentencePiece-only one has none), and byte or tiktoken built as byte-level BPE."""
    if tokenizer.json is not None:
        return tokenizer.json
    if tokenizer.name.startswith("hf:"):
        if not tokenizer.tok.is_fast:
            raise ValueError(f"{tokenizer.name} has no tokenizer.json (a SentencePiece-only tokenizer)")
        return tokenizer.tok.backend_tokenizer.to_str()
    return byte_level_tokenizer(*byte_level_bpe(tokenizer.name)).to_str()


def special_ids(tokenizer):
    """(bos, eos) token ids, None where the tokenizer has none: an HF tokenizer's own; ours use the end-of-text
    token for both, as GPT-2 does."""
    if tokenizer.name.startswith("hf:"):
        return tokenizer.tok.bos_token_id, tokenizer.tok.eos_token_id
    return tokenizer.eot, tokenizer.eot


def save_hf_tokenizer(tokenizer, out, block_size):
    """An HF checkpoint's tokenizer files, copied; ours as tokenizer.json (a trained BPE's as it is) and a
    tokenizer_config.json that names the end-of-text token. NOTE: transformers then reads '<|endoftext|>' in a
    text as that token, as it does for GPT-2's own files; our encode reads it as text (tiktoken's encode_ordinary)."""
    if tokenizer.name.startswith("hf:"):
        for f in HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer.name[3:], f)):
                shutil.copy(os.path.join(tokenizer.name[3:], f), out)
        return
    from tokenizers import Tokenizer

    text = tokenizer_json(tokenizer)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(text)
    eot = Tokenizer.from_str(text).id_to_token(tokenizer.eot) if tokenizer.eot is not None else None
    special = {"bos_token": eot, "eos_token": eot} if eot is not None else {}
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


def check_gguf_family(family):
    """NOTE: llama.cpp has no NanoChat architecture (its src/llama-arch.cpp names none, ggml-org/llama.cpp as of
    2026), and none of the graphs it has puts NanoChat's parts together: a norm after the embedding, weightless
    norms, QK-norm after RoPE, ReLU² and a final soft-cap. A GGUF under another architecture's name would run
    another model, so NanoChat is refused, before anything is written."""
    if family not in ("gpt2", "llama"):
        raise ValueError(f"--export-gguf: llama.cpp has no {HF_CLASSES[family]} architecture (its norms, QK-norm, "
                         "ReLU² and soft-cap in one graph): use --export-hf, which transformers runs, or train with "
                         "--arch llama for llama.cpp")


def import_gguf():
    try:
        import gguf  # llama.cpp's own reader and writer of the format
    except ImportError:
        raise ValueError("--export-gguf needs the gguf package (llama.cpp's gguf-py): pip install gguf") from None
    return gguf


# How llama.cpp cuts text before merging is not stored in a GGUF but named (tokenizer.ggml.pre), one name per
# split its llama-vocab.cpp implements. llama.cpp's convert_hf_to_gguf.py recognises a tokenizer by the hash of
# the ids it gives a test text, so a tokenizer trained here would be unknown to it; we name the split by the
# tokenizer.json's own pre-tokenizer instead: GPT-2's regex (ByteLevel) is 'gpt-2'; single digits and then
# GPT-2's regex (SmolLM's) 'smollm'; Llama 3's pattern, which our trained BPE uses, 'llama-bpe' when whole
# pieces that are tokens skip the merges (ignore_merges: tiktoken's rule, Llama 3's file) and 'dbrx' when they
# do not (llama.cpp's name for the same split without that rule). cl100k_base's pattern is Llama 3's but for
# possessive quantifiers and how a run of whitespace ends; llama.cpp splits DBRX's cl100k_base with Llama 3's.
CL100K_SPLIT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$"""
                r"""|\s*[\r\n]|\s+(?!\S)|\s""")  # tiktoken's cl100k_base
LLAMA3_SPLITS = (BPE_SPLIT, CL100K_SPLIT)


def gguf_pre_tokenizer(spec, name):
    """llama.cpp's name for the split of a tokenizer.json (spec, as a dict), or a ValueError for a tokenizer that
    GGUF's byte-level BPE ('gpt2') cannot hold: another model (SentencePiece, Unigram, WordPiece), a normalizer,
    byte fallback, or a split llama.cpp has no name for."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = [step.get("type") for step in steps]
    byte_level = (model.get("type") == "BPE" and not model.get("byte_fallback") and not spec.get("normalizer")
                  and shape[-1:] == ["ByteLevel"])
    gpt2_regex = steps[-1].get("use_regex", True)
    if byte_level and shape == ["ByteLevel"] and gpt2_regex:
        return "gpt-2"
    if byte_level and shape == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and gpt2_regex:
        return "smollm"
    split = steps[0] if shape == ["Split", "ByteLevel"] and not gpt2_regex else {}
    if byte_level and split.get("pattern", {}).get("Regex") in LLAMA3_SPLITS and split.get("behavior") == "Isolated":
        return "llama-bpe" if model.get("ignore_merges") else "dbrx"
    what = (f"a {model.get('type')} model" if model.get("type") != "BPE" else "a BPE with byte fallback"
            if model.get("byte_fallback") else "a BPE with a normalizer" if spec.get("normalizer")
            else f"a BPE split by {' + '.join(map(str, shape)) or 'nothing'}")
    raise ValueError(f"--export-gguf writes byte-level BPE tokenizers split as GPT-2, SmolLM or Llama 3 split text, "
                     f"and {name} is {what}: use --export-hf, then llama.cpp's convert_hf_to_gguf.py on that folder")


def gguf_vocab(tokenizer):
    """What the GGUF says of a tokenizer, as llama.cpp's convert_hf_to_gguf.py writes it, read from its
    tokenizer.json: {pre: the split's name, tokens: by id, types: control for special tokens, user-defined for
    other added ones, unused for ids with no token, normal for the rest; merges: 'left right' in rank order;
    bos, eos: ids or None}. Refuses what GGUF cannot hold (gguf_pre_tokenizer).
    NOTE: GGUF cannot store an empty list, and llama.cpp insists on merges, so a vocabulary of bytes and no
    merges (our 'byte') spells byte FF, which never occurs in UTF-8, as the pair C0 C1, which never occurs either,
    and one merge makes it: it never fires, and any UTF-8 text still encodes to exactly its bytes."""
    gguf = import_gguf()
    spec = json.loads(tokenizer_json(tokenizer))
    pre = gguf_pre_tokenizer(spec, tokenizer.name)
    model, added = spec["model"], {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(tokenizer.vocab_size)]
    types = [gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL if i not in added
             else gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED
             for i in range(tokenizer.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # ["a b"] or [["a", "b"]]
    if not merges:
        spell = byte_spelling()
        tokens[model["vocab"][spell[0xFF]]] = spell[0xC0] + spell[0xC1]
        merges = [f"{spell[0xC0]} {spell[0xC1]}"]
    bos, eos = special_ids(tokenizer)
    return dict(pre=pre, tokens=tokens, types=types, merges=merges, bos=bos, eos=eos)


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


def gguf_tokenizer(w, vocab):
    """The tokenizer (gguf_vocab) as llama.cpp's 'gpt2' (byte-level BPE) model: its split's name, tokens by id,
    their types, the merges, the special ids. Our encode never adds a BOS, and neither does llama.cpp then."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    if vocab["bos"] is not None:
        w.add_bos_token_id(vocab["bos"])
    if vocab["eos"] is not None:
        w.add_eos_token_id(vocab["eos"])
    w.add_add_bos_token(False)


def export_gguf(model, vocab, path, dtype="f16"):
    """path: one GGUF file, the hyperparameters and tokenizer (gguf_vocab) as key-value metadata, then the
    tensors."""
    c, family, vocab_size = model.config, hf_family(model.config), len(vocab["tokens"])
    check_gguf_family(family)
    gguf = import_gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2 if family == "gpt2" else gguf.MODEL_ARCH.LLAMA, c.n_layer)
    with staged(path) as tmp:
        w = gguf.GGUFWriter(tmp, family)
        gguf_hyperparameters(w, c, family, vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        gguf_tokenizer(w, vocab)
        for k, v in hf_tensors(model, family, vocab_size).items():
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


def check_new_output(path, folder):
    """Export never overwrites: a file must be new, a folder new or empty."""
    if os.path.exists(path) and not (folder and os.path.isdir(path) and not os.listdir(path)):
        raise ValueError(f"{path} already exists{' and is not an empty folder' if folder else ''}: "
                         f"export writes only to a new {'folder (or an empty one)' if folder else 'file'}")


def export(model, tokenizer, hf_dir=None, gguf_path=None, gguf_dtype="f16"):
    """transformer.py's --export-hf DIR and --export-gguf FILE: check everything first (a family HF computes, a
    tokenizer GGUF can hold, outputs that are new), then write each output whole, and say what was written."""
    family = hf_family(model.config)  # refuses a mix no HF class computes, before anything is written
    if gguf_path:  # a model llama.cpp runs, what GGUF says of the tokenizer, or one line on why not
        check_gguf_family(family)
        vocab = gguf_vocab(tokenizer)
    for path, folder in ((hf_dir, True), (gguf_path, False)):
        if path:
            check_new_output(path, folder)
    what = f"{HF_CLASSES[family]}, {model.num_params():,} parameters, {tokenizer.name} tokenizer"
    if hf_dir:
        export_hf(model, tokenizer, hf_dir)
        print(f"wrote {hf_dir}: {what}")
    if gguf_path:
        export_gguf(model, vocab, gguf_path, gguf_dtype)
        print(f"wrote {gguf_path}: {what}, {gguf_dtype}")
