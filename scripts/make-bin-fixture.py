#!/usr/bin/env python3
"""Generate the tiny LLaMA `.bin` / `.safetensors` twin checkpoint fixture.

Builds a tiny, randomly initialised LLaMA model with Hugging Face tensor
naming (deterministic: fixed numpy seed) and saves the very same float32
weights twice:

  * as a PyTorch pickle checkpoint (`torch.save` of an OrderedDict of
    tensors, default zip serialization format), and
  * as a safetensors file.

The two files therefore must load to bit-identical tensors, which lets the
Rust loader tests check the `.bin` reader against the safetensors reader.

Outputs (relative to the repository root):
    tests/fixtures/tiny-llama-bin/config.json
    tests/fixtures/tiny-llama-bin/pytorch_model.bin
    tests/fixtures/tiny-llama-bin/model.safetensors

Usage:
    pip install torch safetensors numpy
    python3 scripts/make-bin-fixture.py

Runs from any working directory. Only needs torch on CPU.
"""

import json
import os
from collections import OrderedDict

import numpy as np
import torch
from safetensors.numpy import load_file as st_load_file
from safetensors.numpy import save_file as st_save_file

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(SCRIPT_DIR)
OUT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "tiny-llama-bin")
CONFIG_PATH = os.path.join(OUT_DIR, "config.json")
BIN_PATH = os.path.join(OUT_DIR, "pytorch_model.bin")
SAFETENSORS_PATH = os.path.join(OUT_DIR, "model.safetensors")

SEED = 20240611

CONFIG = OrderedDict(
    [
        ("architectures", ["LlamaForCausalLM"]),
        ("model_type", "llama"),
        ("hidden_size", 32),
        ("intermediate_size", 64),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("vocab_size", 64),
        ("max_position_embeddings", 128),
        ("rms_norm_eps", 1e-5),
        ("rope_theta", 10000.0),
        ("tie_word_embeddings", False),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
        ("hidden_act", "silu"),
        ("torch_dtype", "float32"),
    ]
)


def build_weights():
    """Return an OrderedDict name -> float32 numpy array (HF LLaMA naming)."""
    rng = np.random.RandomState(SEED)
    hidden = CONFIG["hidden_size"]
    inter = CONFIG["intermediate_size"]
    vocab = CONFIG["vocab_size"]
    n_heads = CONFIG["num_attention_heads"]
    n_kv = CONFIG["num_key_value_heads"]
    head_dim = hidden // n_heads
    kv_dim = n_kv * head_dim

    def dense(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.02).astype(np.float32)

    w = OrderedDict()
    w["model.embed_tokens.weight"] = dense(vocab, hidden)
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = dense(hidden, hidden)
        w[p + "self_attn.k_proj.weight"] = dense(kv_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = dense(kv_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = dense(hidden, hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "mlp.gate_proj.weight"] = dense(inter, hidden)
        w[p + "mlp.up_proj.weight"] = dense(inter, hidden)
        w[p + "mlp.down_proj.weight"] = dense(hidden, inter)
    w["model.norm.weight"] = norm(hidden)
    w["lm_head.weight"] = dense(vocab, hidden)
    return w


def verify(weights):
    """Reload both files and check they hold identical tensors."""
    sd = torch.load(BIN_PATH, map_location="cpu", weights_only=True)
    st = st_load_file(SAFETENSORS_PATH)
    assert list(sd.keys()) == list(weights.keys()), "bin key order mismatch"
    assert set(st.keys()) == set(weights.keys()), "safetensors key mismatch"
    for name, ref in weights.items():
        t = sd[name]
        assert t.dtype == torch.float32, (name, t.dtype)
        a = t.numpy()
        b = st[name]
        assert a.shape == ref.shape == b.shape, (name, a.shape, b.shape)
        assert a.dtype == b.dtype == np.float32, (name, a.dtype, b.dtype)
        assert np.array_equal(a, ref) and np.array_equal(a, b), name


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    weights = build_weights()

    with open(CONFIG_PATH, "w") as f:
        json.dump(CONFIG, f, indent=2)
        f.write("\n")

    # Each tensor gets its own contiguous storage (clone breaks the link to
    # the numpy buffer so nothing is shared between entries).
    state_dict = OrderedDict(
        (name, torch.from_numpy(arr).clone()) for name, arr in weights.items()
    )
    torch.save(state_dict, BIN_PATH)  # default zip format (torch >= 1.6)

    st_save_file(weights, SAFETENSORS_PATH, metadata={"format": "pt"})

    verify(weights)

    n_params = sum(a.size for a in weights.values())
    print(f"{len(weights)} tensors, {n_params} parameters")
    for path in (CONFIG_PATH, BIN_PATH, SAFETENSORS_PATH):
        print(f"wrote {os.path.relpath(path, REPO_ROOT)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
