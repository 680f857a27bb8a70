#!/usr/bin/env python
"""Generate tiny Hugging Face reference fixtures for alignjax's tests.

Run from the repository root with the reference venv (torch CPU + transformers):

    /work/venv_ref/bin/python third_party/hf_fixtures/generate.py

Everything is created locally (nothing is downloaded from the HF hub) and the
output is deterministic. alignjax's tests only *read* the files written here;
they never import torch or transformers.

Outputs (all under third_party/hf_fixtures/):
  tokenizer.json, tokenizer_config.json      tiny byte-level BPE + ChatML template
  tokenizer_reference.json                   encode/decode/chat-template references
  {llama,qwen2,qwen3}/                       config.json, generation_config.json,
                                             safetensors weights (qwen2 sharded),
                                             tokenizer files, reference.npz
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

OUT = Path(__file__).resolve().parent
SEED = 0

# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #

VOCAB_SIZE = 384  # total, including the 3 special tokens appended at the end
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Exactly the pre-tokenisation regex used by Qwen2/Qwen2.5 (and by transformers'
# Qwen2Tokenizer). The whole pipeline below (NFC normaliser, regex split,
# byte-level with use_regex=False, byte-level decoder) mirrors Qwen2Tokenizer so
# that every transformers loading path (TokenizersBackend reading tokenizer.json
# as-is, or Qwen2Tokenizer rebuilding from vocab/merges, which AutoTokenizer
# forces for model_type "qwen2") yields exactly the same tokenisation as
# `tokenizers.Tokenizer.from_file("tokenizer.json")`.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small language model learns to follow instructions and to answer questions.",
    "Alignment methods such as supervised fine-tuning, reward modelling and preference "
    "optimisation teach the model which answers people prefer.",
    "The assistant should be helpful, honest and harmless. It should think step by step.",
    "Once upon a time there was a little robot who liked to count the stars in the sky.",
    "She said: \"Hello there! How are you today?\" and he answered, 'I am fine, thank you.'",
    "We compute the loss on the response tokens only, and we mask the prompt tokens.",
    "The policy and the reference model see the same chosen and rejected completions.",
    "In the morning the weather was cold, but in the afternoon the sun came out.",
    "Please write a short poem about the sea, the wind and the mountains.",
    "What is the capital of France? The capital of France is Paris.",
    "Question: how many apples are left if you have ten and eat three? Answer: seven.",
    "The user asked the assistant a question, and the assistant gave a clear answer.",
    "Python code:\n    def add(a, b):\n        return a + b\n\nprint(add(2, 3))",
    "Tabs\tand  multiple   spaces\n\nand new lines\r\nshould all be handled.",
    "Arithmetic: 1+1=2, 2+2=4, 3*4=12, 10-7=3, 12+345=357, 100/4=25, 7*8=56.",
    "9+10=19 15+27=42 81-18=63 144/12=12 2*3*5=30 1000-1=999 64+64=128 256*2=512",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2024.",
    "Let x = 3 and y = 4; then x + y = 7 and x * y = 12 and x^2 + y^2 = 25.",
    "Good answers are short, correct and kind. Bad answers are long, wrong or rude.",
    "the the the and and and to to to of of of in in in is is is it it it",
    "think think answer answer question question model model reward reward",
]


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = CORPUS * 4  # repetition makes pair counts unambiguous enough; order is fixed
    tok.train_from_iterator(corpus, trainer=trainer)
    # Special tokens are appended after the BPE vocab (as in Qwen), so ids are 381..383.
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE, tok.get_vocab_size(with_added_tokens=True)
    return tok


# Qwen2(-Instruct) style ChatML template: a default system prompt is inserted when
# the conversation does not start with a system message.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": [],
        "model_max_length": 256,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #

COMMON = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    hidden_act="silu",
    bos_token_id=None,
    use_cache=True,
)

WEIGHT_STD = 0.2
NORM_NOISE = 0.2
BIAS_STD = 0.2


def make_configs(vocab_size: int, eos_id: int, pad_id: int) -> dict:
    ids = dict(vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=pad_id)
    llama = LlamaConfig(
        **COMMON,
        **ids,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    qwen2 = Qwen2Config(
        **COMMON,
        **ids,
        tie_word_embeddings=True,
        use_sliding_window=False,
        max_window_layers=COMMON["num_hidden_layers"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    qwen3 = Qwen3Config(
        **COMMON,
        **ids,
        head_dim=32,
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
        max_window_layers=COMMON["num_hidden_layers"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return {
        "llama": (LlamaForCausalLM, llama),
        "qwen2": (Qwen2ForCausalLM, qwen2),
        "qwen3": (Qwen3ForCausalLM, qwen3),
    }


@torch.no_grad()
def init_weights(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Large-ish random init so that every parameter visibly affects the logits."""
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):  # input/post_attention layernorm, final norm, q_norm, k_norm
            v = 1.0 + NORM_NOISE * torch.randn(p.shape, generator=gen, dtype=torch.float32)
        elif name.endswith(".bias"):
            v = BIAS_STD * torch.randn(p.shape, generator=gen, dtype=torch.float32)
        else:
            v = WEIGHT_STD * torch.randn(p.shape, generator=gen, dtype=torch.float32)
        p.copy_(v)


def make_inputs(vocab_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    input_ids = rng.integers(0, vocab_size, size=(2, 16)).astype(np.int32)
    attention_mask = np.ones((2, 16), dtype=np.int32)
    attention_mask[1, 11:] = 0  # right padding on row 1 ...
    input_ids[1, 11:] = pad_id  # ... filled with the pad token, as a collator would
    return input_ids, attention_mask


@torch.no_grad()
def run_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    out = model(
        input_ids=torch.from_numpy(input_ids.astype(np.int64)),
        attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
        use_cache=False,
    )
    return out.logits.float().numpy()


# --------------------------------------------------------------------------- #
# Tokenizer reference
# --------------------------------------------------------------------------- #

TEST_STRINGS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "héllo 世界",
    "12+345=357",
    "  leading spaces\n\nnew lines\tand a tab\r\n  trailing  ",
    "Emoji 🙂 and symbols: <>&%$#@~`^|",
    "I'm sure it's fine, they'll see.",
    "special token inline: <|im_start|>user\nhi<|im_end|>",
]

CONVERSATIONS = [
    {
        "name": "with_system_generation_prompt",
        "add_generation_prompt": True,
        "messages": [
            {"role": "system", "content": "You are a terse math tutor."},
            {"role": "user", "content": "What is 12+345?"},
            {"role": "assistant", "content": "12+345=357"},
            {"role": "user", "content": "And 7*8?"},
        ],
    },
    {
        "name": "no_system_no_generation_prompt",
        "add_generation_prompt": False,
        "messages": [
            {"role": "user", "content": "Write héllo 世界 twice."},
            {"role": "assistant", "content": "héllo 世界\nhéllo 世界"},
        ],
    },
]


def tokenizer_reference(model_dir: Path) -> dict:
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    encodings = []
    for s in TEST_STRINGS:
        ids = hf_tok.encode(s, add_special_tokens=False)
        raw_ids = raw.encode(s, add_special_tokens=False).ids
        assert ids == raw_ids, (s, ids, raw_ids)
        decoded = hf_tok.decode(ids, skip_special_tokens=False)
        assert decoded == raw.decode(ids, skip_special_tokens=False)
        encodings.append(
            {
                "text": s,
                "ids": ids,
                "tokens": hf_tok.convert_ids_to_tokens(ids),
                "decoded": decoded,
                "roundtrip": decoded == s,
            }
        )
    chats = []
    for conv in CONVERSATIONS:
        text = hf_tok.apply_chat_template(
            conv["messages"], tokenize=False, add_generation_prompt=conv["add_generation_prompt"]
        )
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        tok_ids = hf_tok.apply_chat_template(
            conv["messages"], tokenize=True, add_generation_prompt=conv["add_generation_prompt"]
        )
        if not isinstance(tok_ids, list):  # transformers v5 may return a BatchEncoding
            tok_ids = tok_ids["input_ids"]
        assert list(tok_ids) == ids, (tok_ids, ids)
        chats.append(
            {
                "name": conv["name"],
                "messages": conv["messages"],
                "add_generation_prompt": conv["add_generation_prompt"],
                "text": text,
                "ids": ids,
            }
        )
    return {
        "generated_by": "third_party/hf_fixtures/generate.py",
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "vocab_size": len(hf_tok),
        "special_tokens": {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
        "eos_token": hf_tok.eos_token,
        "eos_token_id": hf_tok.eos_token_id,
        "pad_token": hf_tok.pad_token,
        "pad_token_id": hf_tok.pad_token_id,
        "bos_token": hf_tok.bos_token,
        "bos_token_id": hf_tok.bos_token_id,
        "encode_kwargs": {"add_special_tokens": False},
        "decode_kwargs": {"skip_special_tokens": False},
        "encodings": encodings,
        "chat_template": chats,
    }


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def main() -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    # Tokenizer
    tok = build_tokenizer()
    tok.save(str(OUT / "tokenizer.json"), pretty=True)
    tok_cfg = tokenizer_config(tok)
    write_json(OUT / "tokenizer_config.json", tok_cfg)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id = tok.token_to_id("<|im_end|>")
    pad_id = tok.token_to_id("<|endoftext|>")

    input_ids, attention_mask = make_inputs(vocab_size, pad_id)

    for i, (name, (cls, config)) in enumerate(make_configs(vocab_size, eos_id, pad_id).items()):
        d = OUT / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

        torch.manual_seed(SEED + i)
        gen = torch.Generator().manual_seed(1000 + i)
        model = cls(config).to(torch.float32)
        init_weights(model, gen)
        model.set_attn_implementation("eager")
        model.eval()
        if config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

        logits = run_logits(model, input_ids, attention_mask)
        assert logits.shape == (2, 16, vocab_size) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        # Sanity: right padding must not change the valid positions of row 1.
        n_valid = int(attention_mask[1].sum())
        unpadded = run_logits(model, input_ids[1:2, :n_valid], attention_mask[1:2, :n_valid])
        assert np.abs(unpadded[0] - logits[1, :n_valid]).max() < 1e-5

        save_kwargs = dict(safe_serialization=True)
        if name == "qwen2":
            save_kwargs["max_shard_size"] = "200KB"
        model.save_pretrained(str(d), **save_kwargs)
        shutil.copy(OUT / "tokenizer.json", d / "tokenizer.json")
        shutil.copy(OUT / "tokenizer_config.json", d / "tokenizer_config.json")
        np.savez(d / "reference.npz", input_ids=input_ids, attention_mask=attention_mask, logits=logits)
        print(f"[{name}] saved {sorted(p.name for p in d.iterdir())}; |logits| max {np.abs(logits).max():.3f}")

    # A reward model in the HF sequence-classification layout (backbone + score, no lm_head):
    # scores read at the last non-pad token, as alignjax's reward head does.
    rm_cls_config = make_configs(vocab_size, eos_id, pad_id)["llama"][1]
    rm_cls_config.num_labels = 1
    d = OUT / "llama_rm"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    torch.manual_seed(SEED + 10)
    rm = LlamaForSequenceClassification(rm_cls_config).to(torch.float32)
    init_weights(rm, torch.Generator().manual_seed(1010))
    rm.set_attn_implementation("eager")
    rm.eval()
    with torch.no_grad():
        scores = rm(input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
                    use_cache=False).logits.float().numpy()
    assert scores.shape == (2, 1) and np.isfinite(scores).all()
    rm.save_pretrained(str(d), safe_serialization=True)
    shutil.copy(OUT / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(OUT / "tokenizer_config.json", d / "tokenizer_config.json")
    np.savez(d / "reference.npz", input_ids=input_ids, attention_mask=attention_mask, scores=scores)
    print(f"[llama_rm] saved {sorted(p.name for p in d.iterdir())}; scores {scores.ravel()}")

    # Tokenizer reference: computed with AutoTokenizer on each model dir; must agree.
    refs = {name: tokenizer_reference(OUT / name) for name in ("llama", "qwen2", "qwen3")}
    ref = refs["llama"]
    for name in ("qwen2", "qwen3"):
        assert refs[name]["encodings"] == ref["encodings"], name
        assert refs[name]["chat_template"] == ref["chat_template"], name
    write_json(OUT / "tokenizer_reference.json", ref)
    print("wrote tokenizer_reference.json")


if __name__ == "__main__":
    sys.exit(main())
