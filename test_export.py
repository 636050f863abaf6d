"""Specification of convert.py, through --export-hf / --export-gguf: export to an HF transformers folder and to
GGUF.

Every export is read back by an independent reader: transformers (AutoModelForCausalLM, AutoTokenizer, pipeline,
and its GGUF reader, which undoes llama.cpp's RoPE row order and dequantizes), tiktoken for the GPT-2 tokenizer,
and GPT.from_pretrained for the round trip. Models are tiny and random (every weight perturbed), HF checkpoints
are built with random weights and saved to temporary folders, and nothing touches the network.
"""

import dataclasses
import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode

import checkpoint
import convert
import prepare_data
import transformer
from conftest import NEEDS_LLAMA_CPP, english_text, large_encoding, write_dataset
from test_transformer import max_diff, random_model, save_hf, tiny
from tokenizer import get_tokenizer
from transformer import GPT

transformers.logging.set_verbosity_error()
REPO = os.path.dirname(os.path.abspath(__file__))
ATOL_HF = 1e-5  # fp32: the exported folder in transformers against our model
ATOL_GGUF_F32 = 1e-4
ATOL_GGUF_F16 = 2e-2  # weights rounded to fp16 (measured: about 4e-3 on these models)
TEXTS = [
    "Hello world! ", "héllo wörld  \n\n  x  ", "日本語のテキスト 🤖🎉 naïve café", "  leading and trailing   ",
    "it's I'll we've 12345 3.14159 1,000,000", "\t\r\n x\u00a0y\u2028z", "ℌ𝔢𝔩𝔩𝔬 Ωμέγα Привет мир ﷽",
    "aaaaaaaaaaaaaaaa          a", "def f(x):\n    return x**2  # comment\n", "ROMEO:\nBut soft, what light?",
]


# -----------------------------------------------------------------------------
# Helpers


def save_ckpt(path, model, tokenizer="byte"):
    """A checkpoint as training writes it, reduced to what --ckpt reads."""
    checkpoint.save_checkpoint(str(path), {"format": transformer.CKPT_FORMAT, "model": model.state_dict(),
                                            "config": dataclasses.asdict(model.config), "tokenizer": tokenizer})
    return str(path)


def export(tmp_path, model, *flags, tokenizer="byte"):
    """Save model as a checkpoint, then run `transformer.py --ckpt ... *flags` in process."""
    transformer.main(["--ckpt", save_ckpt(tmp_path / "ckpt.pt", model, tokenizer), *map(str, flags)])


def idx(vocab_size, B=2, T=12, seed=0):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ours(model, x):
    return model(x)[0]


@torch.no_grad()
def hf_logits(model_dir, x, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **kw).eval()(x).logits


def read_json(path):
    with open(path) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# HF folders: round trip and logits


CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2-nobias": ("gpt2", dict(bias=False)),
    "gpt2-untied": ("gpt2", dict(tie_embeddings=False)),
    "gpt2-nobias-untied-n_inner80-eps1e-6": ("gpt2", dict(bias=False, tie_embeddings=False, mlp_hidden=80,
                                                          norm_eps=1e-6)),
    "llama-gqa-untied": ("llama", dict(n_kv_head=2)),
    "llama-gqa-tied-head_dim8-theta5e5": ("llama", dict(n_kv_head=2, tie_embeddings=True, head_dim=8,
                                                        rope_theta=5e5)),
    "llama-mqa-untied": ("llama", dict(n_kv_head=1)),
    "nanochat-gqa-untied": ("nanochat", dict(n_kv_head=2)),
    "nanochat-tied-head_dim8-theta5e5-cap2": ("nanochat", dict(tie_embeddings=True, head_dim=8, rope_theta=5e5,
                                                                logit_softcap=2.0)),
    "nanochat-mqa-nocap": ("nanochat", dict(n_kv_head=1, logit_softcap=None)),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def exported(request, tmp_path_factory):
    """(our model, the folder --export-hf wrote from its checkpoint)."""
    arch, overrides = CASES[request.param]
    model = random_model(tiny(arch, **overrides))
    tmp = tmp_path_factory.mktemp(request.param)
    export(tmp, model, "--export-hf", tmp / "hf")
    return model, tmp / "hf"


def test_export_writes_the_files_transformers_needs(exported):
    _, out = exported
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]


def test_export_loads_back_with_bit_identical_weights(exported):
    model, out = exported
    theirs, expected = GPT.from_pretrained(str(out)).state_dict(), model.state_dict()
    for k, v in expected.items():
        assert torch.equal(theirs[k], v), k


def test_a_gpt2_model_without_biases_is_exported_with_zero_biases(exported):
    """HF's GPT-2 always has biases: zeros compute what no biases compute."""
    model, out = exported
    extra = {k: v for k, v in GPT.from_pretrained(str(out)).state_dict().items() if k not in model.state_dict()}
    assert all(k.endswith(".bias") and not v.any() for k, v in extra.items())
    assert bool(extra) == (not model.config.bias and model.config.pos == "learned")


def test_transformers_loads_the_export_with_equal_logits(exported):
    model, out = exported
    x = idx(256)
    assert max_diff(hf_logits(out, x), ours(model, x)) <= ATOL_HF


def test_the_export_names_the_hf_class_of_its_architecture(exported):
    model, out = exported
    c = model.config
    expected = "GPT2LMHeadModel" if c.pos == "learned" else "NanoChatForCausalLM" if c.qk_norm else "LlamaForCausalLM"
    assert type(transformers.AutoModelForCausalLM.from_pretrained(str(out))).__name__ == expected
    assert read_json(out / "config.json")["architectures"] == [expected]


def test_rows_beyond_the_tokenizers_vocab_are_not_exported(tmp_path):
    """A vocabulary padded to a multiple of 64 (256 -> 320) is cut back to the tokenizer's 256."""
    model = random_model(tiny("llama", vocab_size=320))
    export(tmp_path, model, "--export-hf", tmp_path / "hf")
    x = idx(256)
    assert read_json(tmp_path / "hf" / "config.json")["vocab_size"] == 256
    assert max_diff(hf_logits(tmp_path / "hf", x), ours(model, x)[..., :256]) <= ATOL_HF


def test_an_exported_gpt2_byte_model_samples_with_its_own_tokenizer(tmp_path, capsys):
    """A gpt2 model whose folder ships a tokenizer other than GPT-2's is read with that tokenizer."""
    export(tmp_path, random_model(tiny("gpt2")), "--export-hf", tmp_path / "hf")
    assert convert.hf_tokenizer_name(str(tmp_path / "hf")) == "hf:" + str(tmp_path / "hf")
    transformer.main(["--sample", "--init-from", str(tmp_path / "hf"), "--prompt", "ab", "--max-new-tokens", "4",
                      "--device", "cpu"])
    assert capsys.readouterr().out.split("\n", 1)[1].startswith("ab")


# -----------------------------------------------------------------------------
# HF checkpoints through --init-from, then --export-hf


@pytest.fixture(scope="module")
def gpt2_hf_export(tmp_path_factory):
    """A random GPT2LMHeadModel whose vocab is padded to 50304, --init-from it, --export-hf.
    Returns (hf model, exported folder)."""
    tmp = tmp_path_factory.mktemp("gpt2-hf")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50304)
    hf = save_hf(transformers.GPT2LMHeadModel(config), tmp / "src")
    transformer.main(["--init-from", str(tmp / "src"), "--export-hf", str(tmp / "hf")])
    return hf, tmp / "hf"


def test_a_gpt2_folder_with_its_own_larger_tokenizer_is_not_read_with_gpt2s(gpt2_hf_export, tmp_path):
    """The vocabulary size says nothing about the tokenizer: a GPT-2-architecture folder of 50,304 ids that ships
    its own tokenizer is read with it; one that ships GPT-2's own files, or none, with tiktoken's gpt2."""
    src = gpt2_hf_export[1].parent / "src"  # the random GPT2LMHeadModel, no tokenizer files
    assert convert.hf_tokenizer_name(str(src)) == "gpt2"
    assert convert.hf_tokenizer_name(str(gpt2_hf_export[1])) == "gpt2"  # our export wrote GPT-2's own tokenizer
    own = tmp_path / "own"
    shutil.copytree(src, own)
    byte_tokenizer_files(own)
    assert convert.hf_tokenizer_name(str(own)) == "hf:" + str(own)


def byte_tokenizer_files(path):
    """A byte-level tokenizer (id == byte, built here with the tokenizers library) saved beside an HF model."""
    spelling = bytes_to_unicode()
    tok = Tokenizer(models.BPE({spelling[b]: b for b in range(256)}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))


@pytest.fixture(scope="module", params=["Llama", "NanoChat"])
def rope_hf_export(request, tmp_path_factory):
    """A random LlamaForCausalLM or NanoChatForCausalLM (GQA, vocab 300) with a 256-token byte tokenizer,
    --init-from it, --export-hf. Returns (hf model, source folder, exported folder)."""
    tmp = tmp_path_factory.mktemp(f"{request.param}-hf")
    torch.manual_seed(0)
    config = getattr(transformers, f"{request.param}Config")(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5e5, tie_word_embeddings=False)
    hf = save_hf(getattr(transformers, f"{request.param}ForCausalLM")(config), tmp / "src")
    byte_tokenizer_files(tmp / "src")
    transformer.main(["--init-from", str(tmp / "src"), "--export-hf", str(tmp / "hf")])
    return hf, tmp / "src", tmp / "hf"


def test_an_hf_gpt2_checkpoint_exports_with_its_logits(gpt2_hf_export):
    hf, out = gpt2_hf_export
    x = idx(50257)
    with torch.no_grad():
        expected = hf(x).logits[..., :50257]  # the padding rows are cut
    assert max_diff(hf_logits(out, x), expected) <= ATOL_HF


def test_an_hf_llama_or_nanochat_checkpoint_exports_with_its_logits(rope_hf_export):
    hf, _, out = rope_hf_export
    x = idx(256)
    with torch.no_grad():
        expected = hf(x).logits[..., :256]  # the rows past the byte tokenizer are cut
    assert max_diff(hf_logits(out, x), expected) <= ATOL_HF


def test_an_hf_checkpoints_tokenizer_files_are_copied(rope_hf_export):
    _, src, out = rope_hf_export
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(src / name, out / name, shallow=False), name


# -----------------------------------------------------------------------------
# Tokenizers


def test_gpt2_tokenizer_files_encode_like_tiktoken(gpt2_hf_export):
    _, out = gpt2_hf_export
    theirs, enc = transformers.AutoTokenizer.from_pretrained(str(out)), transformer.get_tokenizer("gpt2")
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == enc.encode(text), text
        assert theirs.decode(ids) == text


def test_gpt2_end_of_text_is_one_special_token_as_tiktoken_allows_it(gpt2_hf_export):
    _, out = gpt2_hf_export
    theirs, enc = transformers.AutoTokenizer.from_pretrained(str(out)), transformer.get_tokenizer("gpt2").enc
    text = "one<|endoftext|>two"
    assert theirs.encode(text, add_special_tokens=False) == enc.encode(text, allowed_special="all")


def test_gpt2_end_of_text_is_bos_and_eos_in_both_configs(gpt2_hf_export):
    _, out = gpt2_hf_export
    for name in ("config.json", "generation_config.json"):
        assert {k: read_json(out / name)[k] for k in ("bos_token_id", "eos_token_id")} == {"bos_token_id": 50256,
                                                                                            "eos_token_id": 50256}
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token_id == 50256


def test_byte_tokenizer_files_encode_text_as_its_utf8_bytes(exported):
    _, out = exported
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == list(text.encode("utf-8")), text
        assert theirs.decode(ids) == text


def test_byte_tokenizer_export_has_no_end_of_text(exported):
    _, out = exported
    assert read_json(out / "config.json")["eos_token_id"] is None
    assert "eos_token_id" not in read_json(out / "generation_config.json")
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token_id is None


def test_byte_spelling_is_gpt2s():
    assert convert.byte_spelling() == bytes_to_unicode()


def test_transformers_computes_our_loss_on_the_export(exported):
    """HF shifts the labels itself; ours takes targets already shifted."""
    model, out = exported
    x = idx(256, T=24, seed=3)
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out))(x, labels=x).loss
        _, loss = model(x[:, :-1], x[:, 1:])
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_pipeline_greedy_tokens_equal_ours(exported):
    model, out = exported
    prompt = "ROMEO:"
    pipe = transformers.pipeline("text-generation", model=str(out))
    theirs = pipe(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    expected = transformer.generate(model, torch.tensor([list(prompt.encode())]), 12, temperature=0)[0].tolist()
    assert list(theirs) == expected


# -----------------------------------------------------------------------------
# GGUF, read back with transformers' GGUF reader


def interleaved_rope(x, theta=10000.0):
    """RoPE as llama.cpp computes it: dimensions (2i, 2i+1) are rotated together. x (B, nh, T, hd)."""
    hd, T = x.size(-1), x.size(-2)
    angle = torch.outer(torch.arange(T, dtype=torch.float32), theta ** (-torch.arange(0, hd, 2) / hd))  # (T, hd/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack((even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()), dim=-1)
    return out.flatten(-2)  # (B, nh, T, hd)


def test_gguf_row_order_makes_llama_cpps_rope_give_our_attention_scores():
    """q and k rows reordered for the GGUF, then rotated in neighbouring pairs, score exactly as ours do."""
    n_head, hd, C, T = 4, 16, 32, 10
    g = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(n_head * hd, C, generator=g), torch.randn(n_head * hd, C, generator=g)
    x = torch.randn(T, C, generator=g)

    def heads(y):  # (T, nh*hd) -> (1, nh, T, hd)
        return y.view(1, T, n_head, hd).transpose(1, 2)

    cos, sin = transformer.rope_cos_sin(hd, torch.arange(T), 10000.0)
    expected = transformer.apply_rope(heads(x @ wq.T), cos, sin) @ transformer.apply_rope(heads(x @ wk.T), cos, sin).mT
    q, k = (heads(x @ convert.rope_pairs_adjacent(w, n_head).T) for w in (wq, wk))
    assert max_diff(interleaved_rope(q) @ interleaved_rope(k).mT, expected) <= 1e-4


GGUF_CASES = {
    "llama-gqa-untied-f32": ("llama", dict(n_kv_head=2), "f32"),
    "llama-gqa-tied-head_dim8-f16": ("llama", dict(n_kv_head=2, tie_embeddings=True, head_dim=8, rope_theta=5e5),
                                     "f16"),
    # transformers' GGUF reader takes GPT-2's context length from n_ctx, not n_positions: only 1024 reads back
    "gpt2-f32": ("gpt2", dict(block_size=1024), "f32"),
    "gpt2-nobias-untied-f16": ("gpt2", dict(block_size=1024, bias=False, tie_embeddings=False), "f16"),
}


@pytest.fixture(scope="module", params=list(GGUF_CASES), ids=list(GGUF_CASES))
def gguf_exported(request, tmp_path_factory):
    """(our model, the folder, the GGUF's file name in it, its dtype)."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers reads GGUF files only with it
    arch, overrides, dtype = GGUF_CASES[request.param]
    model = random_model(tiny(arch, **overrides))
    tmp = tmp_path_factory.mktemp(request.param)
    export(tmp, model, "--export-gguf", tmp / "model.gguf", "--gguf-dtype", dtype)
    return model, tmp, "model.gguf", dtype


def test_gguf_loads_in_transformers_with_equal_logits(gguf_exported):
    model, folder, name, dtype = gguf_exported
    x = idx(256)
    diff = max_diff(hf_logits(folder, x, gguf_file=name), ours(model, x))
    assert diff <= (ATOL_GGUF_F32 if dtype == "f32" else ATOL_GGUF_F16)


def test_gguf_greedy_tokens_equal_ours(gguf_exported):
    model, folder, name, _ = gguf_exported
    prompt = torch.tensor([list(b"ROMEO:")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name).eval()
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert theirs[0].tolist() == transformer.generate(model, prompt, 12, temperature=0)[0].tolist()


def test_gguf_byte_tokenizer_reads_back_as_utf8_bytes(gguf_exported):
    _, folder, name, _ = gguf_exported
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == list(text.encode("utf-8")), text
        assert theirs.decode(ids) == text


@pytest.fixture(scope="module")
def llama_cpp_model(gguf_exported):
    """(our model, the GGUF in llama.cpp itself, its dtype). Tests that use it skip where llama-cpp-python is
    missing (conftest.NEEDS_LLAMA_CPP): it compiles llama.cpp from source, so .ci/run installs it, the README's
    test command does not."""
    import llama_cpp
    model, folder, name, dtype = gguf_exported
    llm = llama_cpp.Llama(str(folder / name), n_ctx=64, logits_all=True, type_k=0, type_v=0,  # an f32 KV cache
                          n_threads=1, verbose=False)
    yield model, llm, dtype
    llm.close()


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_utf8_bytes(llama_cpp_model):
    _, llm, _ = llama_cpp_model
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == list(text.encode()), text
        assert llm.detokenize(list(text.encode())).decode() == text


@pytest.mark.slow
def test_llama_cpp_logits_equal_ours(llama_cpp_model):
    """Within 1e-4 for f32, but ggml's GELU reads an fp16 table: GPT-2 gets a looser bound."""
    model, llm, dtype = llama_cpp_model
    prompt = list(b"ROMEO: to be or not")
    llm.reset()
    llm.eval(prompt)
    tolerance = ATOL_GGUF_F16 if dtype == "f16" else 5e-3 if model.config.pos == "learned" else ATOL_GGUF_F32
    assert max_diff(torch.tensor(llm.scores[: len(prompt)]), ours(model, torch.tensor([prompt]))[0]) <= tolerance


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_equal_ours(llama_cpp_model):
    model, llm, _ = llama_cpp_model
    prompt = list(b"ROMEO:")
    expected = transformer.generate(model, torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        tokens.append(token)
        if len(tokens) == len(expected):
            break
    assert tokens == expected


@pytest.mark.slow
def test_gguf_gpt2_tokenizer_reads_back_like_tiktoken(tmp_path):
    pytest.importorskip("gguf")
    model = random_model(tiny("llama", vocab_size=50257, n_embd=32))
    export(tmp_path, model, "--export-gguf", tmp_path / "model.gguf", tokenizer="gpt2")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    enc = transformer.get_tokenizer("gpt2")
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == enc.encode(text), text
    assert theirs.eos_token_id == theirs.bos_token_id == 50256


# -----------------------------------------------------------------------------
# Every tokenizer: a BPE trained here (bpe:N), a tiktoken vocabulary with cl100k_base's split (built here, as
# cl100k_base cannot be downloaded), and an HF byte-level BPE shaped as SmolLM2's (digits one by one, then GPT-2's
# split; special tokens first). Each exports to HF and GGUF, and both encode like ours and give our logits.


def smollm_style_tokenizer(path, text):
    """An HF tokenizer folder shaped as SmolLM2-135M's tokenizer.json, trained here on text (400 tokens)."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                         eos_token="<|endoftext|>").save_pretrained(str(path))
    return f"hf:{path}"


TOKENIZER_CASES = {"bpe": "dbrx", "tiktoken-cl100k-style": "llama-bpe", "hf-smollm-style": "smollm"}  # -> GGUF pre


@pytest.fixture(scope="module", params=list(TOKENIZER_CASES), ids=list(TOKENIZER_CASES))
def tokenizer_export(request, tmp_path_factory):
    """(case, our tokenizer, our model, the --export-hf folder, the --export-gguf file (f32)) for a random Llama
    model whose vocabulary is the tokenizer's."""
    pytest.importorskip("gguf")
    import tiktoken.registry

    tmp, text = tmp_path_factory.mktemp(request.param), english_text(50_000).decode()
    with pytest.MonkeyPatch.context() as mp:  # conftest.register_encoding's registration, for this module
        name, tokenizer_json = request.param, None
        if name == "bpe":
            name, tokenizer_json = "bpe:400", prepare_data.train_bpe([text], 400)
        elif name.startswith("tiktoken"):
            tiktoken.list_encoding_names()
            encoding = large_encoding(1000)
            mp.setattr(tiktoken.registry, "ENCODINGS", {})
            mp.setitem(tiktoken.registry.ENCODING_CONSTRUCTORS, encoding["name"], lambda: encoding)
            name = encoding["name"]
        else:
            name = smollm_style_tokenizer(tmp / "tok", text)
        tok = transformer.get_tokenizer(name, tokenizer_json)
        model = random_model(tiny("llama", vocab_size=tok.vocab_size))
        ckpt = str(tmp / "ckpt.pt")
        checkpoint.save_checkpoint(ckpt, {"format": transformer.CKPT_FORMAT, "model": model.state_dict(),
                                           "config": dataclasses.asdict(model.config), "tokenizer": name,
                                           "tokenizer_json": tokenizer_json})
        transformer.main(["--ckpt", ckpt, "--export-hf", str(tmp / "hf"), "--export-gguf", str(tmp / "m.gguf"),
                          "--gguf-dtype", "f32"])
        yield request.param, tok, model, tmp / "hf", tmp / "m.gguf"


def test_every_tokenizers_hf_export_encodes_and_decodes_like_ours(tokenizer_export):
    _, tok, _, hf, _ = tokenizer_export
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf))
    for text in [*TEXTS, english_text(3000).decode()]:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text), text
        assert theirs.decode(ids) == tok.decode(ids) == text


def test_every_tokenizers_hf_export_reads_end_of_text_as_its_special_token(tokenizer_export):
    """As GPT-2's own HF files do; ours reads '<|endoftext|>' in a text as text (tiktoken's encode_ordinary)."""
    _, tok, _, hf, _ = tokenizer_export
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf))
    assert theirs.eos_token_id == tok.eot is not None
    assert theirs.encode("a<|endoftext|>b", add_special_tokens=False) == [*tok.encode("a"), tok.eot, *tok.encode("b")]


def test_every_tokenizers_hf_export_gives_our_logits_in_transformers(tokenizer_export):
    _, tok, model, hf, _ = tokenizer_export
    x = torch.tensor([tok.encode("ROMEO: 12345 naïve 🙂")])
    assert max_diff(hf_logits(hf, x), ours(model, x)) <= ATOL_HF


def gguf_fields(path):
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}


def test_every_tokenizers_gguf_is_written_as_llama_cpps_converter_writes_it(tokenizer_export):
    """Byte-level BPE ('gpt2'), the split's name, every token by id (control for special ones), the merges in rank
    order and the special ids, all as the tokenizer.json says."""
    import gguf

    case, tok, _, hf, path = tokenizer_export
    fields, spec = gguf_fields(path), read_json(hf / "tokenizer.json")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == TOKENIZER_CASES[case]
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get) and len(vocab) == tok.vocab_size
    specials = {t["id"] for t in spec["added_tokens"] if t["special"]}
    assert tok.eot in specials
    control = [i for i, t in enumerate(fields["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL]
    assert control == sorted(specials)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]  # ["a b"] or [["a", "b"]]
    assert fields["tokenizer.ggml.merges"] == merges
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.bos_token_id"] == tok.eot
    assert fields["tokenizer.ggml.add_bos_token"] is False


@pytest.fixture(scope="module")
def tokenizer_llama_cpp(tokenizer_export):
    """(our tokenizer, our model, the GGUF in llama.cpp). Skips with conftest's one line without llama-cpp-python."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    _, tok, model, _, path = tokenizer_export
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False)
    yield tok, model, llm
    llm.close()


@pytest.mark.slow
def test_every_tokenizers_gguf_tokenizes_like_ours_in_llama_cpp(tokenizer_llama_cpp):
    tok, _, llm = tokenizer_llama_cpp
    special = tok.name.startswith("hf:")  # an HF tokenizer reads '<|endoftext|>' in a text as its token; ours as text
    for text in [*TEXTS, english_text(3000).decode(), "a<|endoftext|>b"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=special) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text), special=special).decode() == text


@pytest.mark.slow
def test_every_tokenizers_gguf_gives_our_logits_in_llama_cpp(tokenizer_llama_cpp):
    tok, model, llm = tokenizer_llama_cpp
    ids = tok.encode("ROMEO: 12345 naïve 🙂")
    llm.reset()
    llm.eval(ids)
    assert max_diff(torch.tensor(llm.scores[: len(ids)]), ours(model, torch.tensor([ids]))[0]) <= ATOL_GGUF_F32


# -----------------------------------------------------------------------------
# What export refuses: one line, nothing written


@pytest.mark.parametrize("arch, overrides, named", [
    ("olmo", {}, "pos='alibi'"),
    ("gpt2", dict(pos="rope"), "pos='rope'"),
    ("llama", dict(norm="layernorm"), "norm='layernorm'"),
    ("gpt2", dict(mlp="swiglu"), "mlp='swiglu'"),
    ("gpt2", dict(n_kv_head=2), "n_kv_head=2"),
    ("llama", dict(qk_norm=True), "qk_norm=True"),
    ("llama", dict(logit_softcap=30.0), "logit_softcap=30.0"),
    ("nanochat", dict(norm="rmsnorm"), "norm='rmsnorm'"),
    ("nanochat", dict(embed_norm=False), "embed_norm=False"),
    ("nanochat", dict(value_embeds=True), "value_embeds=True"),
    ("nanochat", dict(x0_lambdas=True), "x0_lambdas=True"),
], ids=["alibi", "gpt2-rope", "llama-layernorm", "gpt2-swiglu", "gpt2-gqa", "llama-qk_norm", "llama-softcap",
        "nanochat-weighted-norm", "nanochat-no-embed_norm", "nanochat-value_embeds", "nanochat-x0_lambdas"])
def test_a_model_with_no_hf_class_is_a_one_line_error_naming_the_setting(tmp_path, one_line_error, arch, overrides,
                                                                          named):
    model = random_model(tiny(arch, **overrides))
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model)
    line = one_line_error(["--ckpt", ckpt, "--export-hf", str(tmp_path / "hf"),
                           "--export-gguf", str(tmp_path / "m.gguf")])
    assert named in line and "no HF transformers class" in line
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_gguf_export_of_nanochat_is_a_one_line_error_before_anything_is_written(tmp_path, one_line_error):
    """llama.cpp has no NanoChat architecture (convert.check_gguf_family): refused, the HF export not written either."""
    ckpt = save_ckpt(tmp_path / "ckpt.pt", random_model(tiny("nanochat")))
    line = one_line_error(["--ckpt", ckpt, "--export-hf", str(tmp_path / "hf"),
                           "--export-gguf", str(tmp_path / "m.gguf")])
    assert "llama.cpp has no NanoChatForCausalLM architecture" in line and "use --export-hf" in line
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


@pytest.mark.parametrize("variant, named", [
    (dict(attention_bias=True), "NanoChat checkpoints with attention_bias"),
    (dict(hidden_act="silu"), "NanoChat activation 'silu' is not supported (only relu2)"),
], ids=["attention_bias", "silu"])
def test_a_nanochat_folder_this_model_cannot_express_is_a_one_line_error(tmp_path, one_line_error, variant, named):
    config = transformers.NanoChatConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, **variant)
    transformers.NanoChatForCausalLM(config).save_pretrained(str(tmp_path / "src"))
    byte_tokenizer_files(tmp_path / "src")
    assert named in one_line_error(["--init-from", str(tmp_path / "src"), "--export-hf", str(tmp_path / "hf")])
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_export_without_ckpt_or_init_from_is_a_one_line_error(tmp_path, one_line_error):
    assert "needs --ckpt" in one_line_error(["--export-hf", str(tmp_path / "hf")], status=2)
    assert not (tmp_path / "hf").exists()


def test_export_into_a_non_empty_folder_is_refused_and_leaves_it_as_it_was(tmp_path, one_line_error):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    ckpt = save_ckpt(tmp_path / "ckpt.pt", random_model(tiny("llama")))
    assert "not an empty folder" in one_line_error(["--ckpt", ckpt, "--export-hf", str(tmp_path / "hf")])
    assert os.listdir(tmp_path / "hf") == ["notes.txt"]


def test_export_into_an_empty_folder_fills_it(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    export(tmp_path, random_model(tiny("llama")), "--export-hf", tmp_path / "hf")
    assert "config.json" in os.listdir(tmp_path / "hf")
    assert f"wrote {tmp_path / 'hf'}: LlamaForCausalLM" in capsys.readouterr().out


def test_gguf_export_over_an_existing_file_is_refused(tmp_path, one_line_error):
    (tmp_path / "m.gguf").write_bytes(b"old")
    ckpt = save_ckpt(tmp_path / "ckpt.pt", random_model(tiny("llama")))
    assert "already exists" in one_line_error(["--ckpt", ckpt, "--export-gguf", str(tmp_path / "m.gguf")])
    assert (tmp_path / "m.gguf").read_bytes() == b"old"


def test_gguf_export_of_a_sentencepiece_style_tokenizer_is_a_one_line_error_before_anything_is_written(
        tmp_path, one_line_error):
    """A Unigram model over Metaspace pieces (SentencePiece's kind, T5's, ...): GGUF's byte-level BPE cannot hold it."""
    pieces = [("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(tmp_path / "tok"))
    model = random_model(tiny("llama", vocab_size=len(pieces)))
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, f"hf:{tmp_path / 'tok'}")
    line = one_line_error(["--ckpt", ckpt, "--export-hf", str(tmp_path / "hf"),
                           "--export-gguf", str(tmp_path / "m.gguf")])
    assert "is a Unigram model" in line and "use --export-hf, then llama.cpp's convert_hf_to_gguf.py" in line
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "tok"]


def test_a_failed_export_leaves_neither_output_nor_temporary_files(tmp_path, monkeypatch, one_line_error):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    ckpt = save_ckpt(tmp_path / "ckpt.pt", random_model(tiny("llama")))
    assert "No space left" in one_line_error(["--ckpt", ckpt, "--export-hf", str(tmp_path / "hf")])
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


# -----------------------------------------------------------------------------
# The command line, as a user runs it, on a checkpoint from a real training run


def cli(cwd, *args, status=0):
    """transformer.py *args in a process of its own, in cwd; its (stdout, stderr), and the exit status checked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TIKTOKEN_CACHE_DIR": os.environ.get("TIKTOKEN_CACHE_DIR", ""),
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, os.path.join(REPO, "transformer.py"), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == status, result.stderr
    return result.stdout, result.stderr


def trained(tmp_path, *flags):
    """A tiny model trained 3 steps by the command line on random bytes: the model as out/ckpt.pt holds it."""
    write_dataset(tmp_path / "data", {"train": [3000], "val": [1000]})
    cli(tmp_path, "--data", "data", "--out-dir", "out", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--seq-len", "16", "--batch-size", "4", "--max-steps", "3", "--eval-every", "3", "--eval-iters", "1",
        "--log-every", "1", "--device", "cpu", *flags)
    return transformer.model_from_checkpoint(transformer.load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))).eval()


@pytest.mark.slow
def test_cli_exports_a_freshly_trained_checkpoint_that_transformers_runs(tmp_path):
    model = trained(tmp_path, "--arch", "llama")  # what llama.cpp runs (the default, nanochat's, is refused below)
    printed, _ = cli(tmp_path, "--ckpt", "out/ckpt.pt", "--export-hf", "hf", "--export-gguf", "model.gguf")
    assert "wrote hf: LlamaForCausalLM" in printed and "wrote model.gguf" in printed
    x = idx(256)
    assert max_diff(hf_logits(tmp_path / "hf", x), ours(model, x)) <= ATOL_HF
    if transformers.utils.is_accelerate_available():
        assert max_diff(hf_logits(tmp_path, x, gguf_file="model.gguf"), ours(model, x)) <= ATOL_GGUF_F16


@pytest.mark.slow  # its fast twins: the NanoChat export cases above, in process
def test_cli_exports_a_freshly_trained_nanochat_that_transformers_runs_as_nanochat(tmp_path):
    """--arch nanochat, trained by the command line: transformers loads the export as NanoChat and computes our
    logits, our loss and our greedy text; --export-gguf refuses it in one line."""
    model = trained(tmp_path, "--arch", "nanochat", "--n-kv-head", "1")
    assert (model.config.qk_norm, model.config.logit_softcap, model.config.n_kv_head) == (True, 15.0, 1)
    _, err = cli(tmp_path, "--ckpt", "out/ckpt.pt", "--export-gguf", "model.gguf", status=1)
    assert err.splitlines() == [err.strip()] and "llama.cpp has no NanoChatForCausalLM" in err
    printed, _ = cli(tmp_path, "--ckpt", "out/ckpt.pt", "--export-hf", "hf")
    assert "wrote hf: NanoChatForCausalLM" in printed and sorted(os.listdir(tmp_path)) == ["data", "hf", "out"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert (hf.config.model_type, type(hf).__name__) == ("nanochat", "NanoChatForCausalLM")
    x = idx(256, T=16)
    with torch.no_grad():
        theirs = hf(x, labels=x)
        _, loss = model(x[:, :-1], x[:, 1:])
    assert max_diff(theirs.logits, ours(model, x)) <= ATOL_HF
    assert loss.item() == pytest.approx(theirs.loss.item(), abs=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    prompt = tok("ROMEO:", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    expected = transformer.generate(model, prompt, 16, temperature=0)
    assert greedy.tolist() == expected.tolist()
    assert tok.decode(greedy[0]) == get_tokenizer("byte").decode(expected[0].tolist())
