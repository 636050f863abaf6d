"""
convert.py: a transformer.py model to and from other tools' formats. A companion of transformer.py,
which imports it (GPT.from_pretrained, --export-hf, --export-gguf); it never imports transformer.py.

Import: GPT.from_pretrained reads an HF GPT2LMHeadModel or LlamaForCausalLM checkpoint
(config.json and safetensors) and renames its tensors to ours with the converters below.
Export: a model is most useful where people already run models. --export-hf writes a folder that
transformers loads with no code of ours (AutoModelForCausalLM, pipeline, lm-eval), and
--export-gguf one file for llama.cpp and ollama. Only two HF classes compute what our blocks
compute: GPT2LMHeadModel (learned positions, LayerNorm, GELU) and LlamaForCausalLM (RoPE,
RMSNorm, SwiGLU, no biases). Any other mix (ALiBi, GPT-2 with RoPE, ...) is refused before
anything is written. Our weights are already theirs up to layout:
  - HF's GPT-2 multiplies with Conv1D, which stores a weight as (in, out): the transpose of
    nn.Linear's (out, in). GPT-2 always has biases, so a model trained without gets zeros.
  - Llama keeps q, k, v (and the MLP's gate, up) as separate matrices where we fuse each
    group into one matmul: the fused rows are cut back apart.
  - The GGUF is written from those HF tensors as llama.cpp's convert_hf_to_gguf.py would,
    with one twist. RoPE rotates pairs of dimensions of each head: we and HF pair dimension i
    with i + hd/2 (transformer.py, section 2), llama.cpp pairs neighbours (2i, 2i+1), as Meta's
    original code did. Rotating other pairs computes another function, so the GGUF stores each
    head's q and k rows in the order 0, hd/2, 1, hd/2+1, ...: the neighbours llama.cpp rotates
    together are then our pairs, and q·k is unchanged. v and the output projection never see RoPE.
Only the tokenizer's rows of the embedding and the head are written: a vocabulary padded for
speed, or HF weights fine-tuned on bytes, has rows that no token id reaches.
Our 'gpt2' and 'byte' tokenizers are written as byte-level BPE, the format of GPT-2's own HF
files: every byte is spelled as one printable character, and merges join spelled pieces into
tokens. tiktoken keeps only each token's rank, so the merges are recovered from the ranks; the
byte tokenizer is 256 one-byte tokens and no merges. An HF tokenizer is copied as it is.
"""

import glob
import json
import math
import os
import shutil

import torch

from files import staged, write_json
from tokenizer import byte_spelling


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
    return dict(
        n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads, n_embd=hf.hidden_size,
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
    """(tokens by id, merges [(left, right)], end-of-text id or None) of our 'byte' or tiktoken tokenizer,
    spelled as byte-level BPE."""
    spell = byte_spelling()
    if name == "byte":
        return [spell[b] for b in range(256)], [], None
    import tiktoken

    enc = tiktoken.get_encoding(name)
    tokens = tiktoken_tokens(enc)
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in specials}
    merges = [tuple("".join(spell[b] for b in part) for part in last_merge(p, ranks)) for p in ranks if len(p) > 1]
    return tokens, merges, enc.eot_token  # merges in rank order


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

