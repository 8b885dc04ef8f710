#!/usr/bin/env python3
"""Make random, Vicuna-shaped LLaMA checkpoints for herd's benchmarks and tests.

The weights are random but deterministic (numpy Generator seeded from --seed and
the tensor's name, so every tensor is reproducible on its own and in any order).
They are scaled so that activations stay finite and non-degenerate through all
layers: projections ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms = 1.0.
`--check` runs a numpy forward pass on the written file and prints per-layer
hidden-state RMS and logit statistics.

The vocabulary is SmolLM2's 49152-token byte-level BPE, read from the test model
models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-test-model.sh fetches it),
with its chat template. `tiny-k` uses its first 1024 tokens and only the merges
whose parts and result lie within them; the special tokens keep their ids.

Formats (--format):
  f32, f16     GGUF as llama.cpp's convert_hf_to_gguf writes it (q/k rows permuted
               for llama.cpp's RoPE; norms stay f32).
  q4_0, q8_0   GGUF quantized here with numpy ports of ggml's reference quantizers
               (quantize_row_q4_0_ref / quantize_row_q8_0_ref, bit-exact). Every 2-D
               weight, token_embd and output included, uses that type: the mix of
               `llama-quantize --pure` (plain llama-quantize Q4_0 would make output Q6_K).
  q4_k_m, q5_k_m, q6_k
               an f32 (small shapes) or f16 (7b/13b) GGUF of the same seed, run through
               llama.cpp's llama-quantize (--llama-quantize or $HERD_LLAMA_QUANTIZE).
               A cached source GGUF is reused; otherwise a temporary one is written
               and removed (unless --keep-source).
  hf           an HF directory like lmsys/vicuna-7b-v1.5: config.json,
               generation_config.json, tokenizer.json, tokenizer_config.json and
               sharded f16 model-0000i-of-0000n.safetensors + index.
  hf-bin       the same with pytorch_model-0000i-of-0000n.bin + index, written by hand
               in torch's zip format (no torch needed).
The HF variants hold the un-permuted (HF layout) q/k weights, so the GGUF and HF
checkpoints of one shape and seed describe the same model.

Outputs are cached under ${HERD_CHECKPOINTS:-/var/tmp/herd-checkpoints}/<shape>/ and
skipped when present unless --force. Streams tensor by tensor: peak memory is about
a few times the largest tensor (the 7B embedding), not the model.

Needs Python 3.11+ with numpy, gguf and safetensors (scripts/make-checkpoint.sh makes
a venv). Note: numpy documents Generator streams as stable in practice but not
guaranteed across numpy versions; the same seed gives the same weights on one
numpy version.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import types
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover - the wrapper installs it
    sys.exit("make-checkpoint: the `gguf` package is needed (use scripts/make-checkpoint.sh)")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VOCAB_GGUF = REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(os.environ.get("HERD_CHECKPOINTS", "/var/tmp/herd-checkpoints"))
DEFAULT_QUANTIZE = Path(
    "/var/tmp/herd-llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build-avx2/bin/llama-quantize"
)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    context: int = 4096
    vocab_limit: int | None = None  # None: SmolLM2's full vocabulary
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    about: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def small(self) -> bool:
        # Small shapes go to llama-quantize as f32 GGUF, large ones as f16 (half the disk).
        return self.hidden <= 1024


SHAPES = {
    s.name: s
    for s in [
        Shape("vicuna-7b", 4096, 32, 32, 32, 11008, about="lmsys/vicuna-7b-v1.5's shape"),
        Shape("vicuna-13b", 5120, 40, 40, 40, 13824, about="lmsys/vicuna-13b-v1.5's shape"),
        Shape("tiny-k", 256, 2, 4, 2, 512, context=512, vocab_limit=1024,
              about="widths multiples of 256 for K-quant test fixtures; 1024-token vocab"),
        Shape("small-k", 512, 4, 8, 8, 1536, about="quick benches"),
    ]
}

GGUF_DIRECT = {"f32", "f16", "q4_0", "q8_0"}
# --format -> llama-quantize's type name
GGUF_KQUANT = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
HF_FORMATS = {"hf", "hf-bin"}
FORMATS = {
    "f32": "GGUF, float32 weights",
    "f16": "GGUF, float16 weights (norms f32)",
    "q4_0": "GGUF, every weight Q4_0 (numpy ggml reference quantizer; norms f32)",
    "q8_0": "GGUF, every weight Q8_0 (numpy ggml reference quantizer; norms f32)",
    "q4_k_m": "GGUF via llama-quantize Q4_K_M",
    "q5_k_m": "GGUF via llama-quantize Q5_K_M",
    "q6_k": "GGUF via llama-quantize Q6_K",
    "hf": "HF directory, sharded safetensors (f16 unless --hf-dtype f32)",
    "hf-bin": "HF directory, sharded pytorch_model*.bin (torch zip format, written without torch)",
}


# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    # Other tokenizer.* keys: key -> (value, vtype, sub_type), copied as typed in the source.
    extra: dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]]

    def special_id(self, what: str) -> int | None:
        v = self.extra.get(f"tokenizer.ggml.{what}_token_id")
        return None if v is None else int(v[0])

    @property
    def chat_template(self) -> str | None:
        v = self.extra.get("tokenizer.chat_template")
        return None if v is None else str(v[0])

    def flag(self, key: str, default: bool) -> bool:
        v = self.extra.get(f"tokenizer.ggml.{key}")
        return default if v is None else bool(v[0])


def read_vocab(path: Path, limit: int | None) -> Vocab:
    if not path.is_file():
        sys.exit(f"make-checkpoint: vocabulary GGUF {path} is missing; run `bash scripts/fetch-test-model.sh`")
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types_ = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    extra = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key in (
            "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"
        ):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        val = field.contents()
        if limit is not None and isinstance(val, list) and len(val) == len(tokens):
            val = val[:limit]  # per-token arrays (e.g. scores) follow the truncation
        extra[key] = (val, field.types[0], sub)
    if limit is not None and limit < len(tokens):
        tokens, types_ = tokens[:limit], types_[:limit]
        kept = set(tokens)
        # A merge may only stay if both parts and the result exist, or BPE loaders reject the vocab.
        merges = [m for m in merges if (lambda a, b: a in kept and b in kept and a + b in kept)(*m.split(" ", 1))]
        for key, (val, _, _) in extra.items():
            if key.endswith("_token_id") and int(val) >= limit:
                sys.exit(f"make-checkpoint: {key}={val} does not fit a {limit}-token vocabulary")
    return Vocab(list(tokens), [int(t) for t in types_], list(merges), extra)


# ---------------------------------------------------------------------------
# Weights (HF layout and names; GGUF names and q/k permutation derived from them)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str  # HF name
    shape: tuple[int, ...]  # HF/torch shape, (out, in) for matrices
    std: float  # 0.0: a norm weight, all ones


def tensor_specs(s: Shape, n_vocab: int) -> list[TensorSpec]:
    """All tensors in torch state_dict order (as LlamaForCausalLM registers them)."""
    h, kv = s.hidden, s.kv_heads * s.head_dim

    def proj(name: str, rows: int, cols: int) -> TensorSpec:
        return TensorSpec(name, (rows, cols), 1.0 / math.sqrt(cols))

    specs = [TensorSpec("model.embed_tokens.weight", (n_vocab, h), 1.0)]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        specs += [
            proj(p + "self_attn.q_proj.weight", h, h),
            proj(p + "self_attn.k_proj.weight", kv, h),
            proj(p + "self_attn.v_proj.weight", kv, h),
            proj(p + "self_attn.o_proj.weight", h, h),
            proj(p + "mlp.gate_proj.weight", s.ffn, h),
            proj(p + "mlp.up_proj.weight", s.ffn, h),
            proj(p + "mlp.down_proj.weight", h, s.ffn),
            TensorSpec(p + "input_layernorm.weight", (h,), 0.0),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), 0.0),
        ]
    # A larger output gain gives logits a spread (std ~2.5) more like a trained model's.
    specs += [TensorSpec("model.norm.weight", (h,), 0.0),
              TensorSpec("lm_head.weight", (n_vocab, h), 2.5 / math.sqrt(h))]
    return specs


def make_tensor(spec: TensorSpec, seed: int) -> np.ndarray:
    """The float32 HF-layout tensor; its own stream, so independent of generation order."""
    if spec.std == 0.0:
        return np.ones(spec.shape, dtype=np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    x = rng.standard_normal(spec.shape, dtype=np.float32)
    x *= np.float32(spec.std)
    return x


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF's half-split RoPE rows -> llama.cpp's pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")  # model.layers.N.<module>.<leaf>.weight
    local = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }[".".join(parts[3:-1])]
    return f"blk.{parts[2]}.{local}.weight"


def gguf_layout(spec: TensorSpec, x: np.ndarray, s: Shape) -> np.ndarray:
    if spec.name.endswith("q_proj.weight"):
        return permute_qk(x, s.heads)
    if spec.name.endswith("k_proj.weight"):
        return permute_qk(x, s.kv_heads)
    return x


# ---------------------------------------------------------------------------
# ggml reference quantizers (ggml/src/ggml-quants.c), bit-exact in numpy
# ---------------------------------------------------------------------------

QK = 32
CHUNK = 1 << 22  # elements per quantization chunk, bounds the temporaries


def _quantize_rows(x: np.ndarray, block_bytes: int, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    rows, cols = x.shape
    assert cols % QK == 0, f"row length {cols} is not a multiple of {QK}"
    out = np.empty((rows, cols // QK * block_bytes), dtype=np.uint8)
    step = max(1, CHUNK // cols)
    for r in range(0, rows, step):
        blocks = x[r:r + step].reshape(-1, QK)
        out[r:r + step] = fn(blocks).reshape(-1, out.shape[1])
    return out


def _q4_0_blocks(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    # The value of largest magnitude, first one on ties, as the C loop's strict `<`.
    mx = b[np.arange(n), np.abs(b).argmax(axis=1)]
    d = mx / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    # (int8_t)(x*id + 8.5f) truncates; the sum is >= 0 so truncation is floor.
    q = np.minimum(np.trunc(b * inv[:, None] + np.float32(8.5)), np.float32(15)).astype(np.uint8)
    out = np.empty((n, 2 + QK // 2), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    out[:, 2:] = q[:, :QK // 2] | (q[:, QK // 2:] << np.uint8(4))
    return out


def _q8_0_blocks(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = np.abs(b).max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = b * inv[:, None]
    # roundf: half away from zero; |v| + 0.5 is exact in float64.
    q = (np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)).astype(np.int8)
    out = np.empty((n, 2 + QK), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    out[:, 2:] = q.view(np.uint8)
    return out


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    return _quantize_rows(x, 2 + QK // 2, _q4_0_blocks)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    return _quantize_rows(x, 2 + QK, _q8_0_blocks)


# ---------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------

GQT = gguf.GGMLQuantizationType
FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def gguf_encode(fmt: str, x: np.ndarray) -> tuple[np.ndarray, GQT | None]:
    """The tensor's bytes as written, and the raw GGML type for quantized data."""
    if x.ndim == 1 or fmt == "f32":
        return x.astype(np.float32, copy=False), None
    if fmt == "f16":
        return x.astype(np.float16), None
    if fmt == "q4_0":
        return quantize_q4_0(x), GQT.Q4_0
    if fmt == "q8_0":
        return quantize_q8_0(x), GQT.Q8_0
    raise AssertionError(fmt)


def encoded_nbytes(fmt: str, spec: TensorSpec) -> tuple[tuple[int, ...], np.dtype, int, GQT | None]:
    """(byte shape, numpy dtype, nbytes, raw type) of a tensor, without generating it."""
    if len(spec.shape) == 1 or fmt == "f32":
        return spec.shape, np.dtype(np.float32), 4 * math.prod(spec.shape), None
    if fmt == "f16":
        return spec.shape, np.dtype(np.float16), 2 * math.prod(spec.shape), None
    rows, cols = spec.shape
    per_block = {"q4_0": 18, "q8_0": 34}[fmt]
    shape = (rows, cols // QK * per_block)
    return shape, np.dtype(np.uint8), math.prod(shape), {"q4_0": GQT.Q4_0, "q8_0": GQT.Q8_0}[fmt]


def write_gguf(path: Path, fmt: str, s: Shape, vocab: Vocab, seed: int) -> int:
    specs = tensor_specs(s, len(vocab.tokens))
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_type("model")
    w.add_name(f"{s.name} random (seed {seed})")
    w.add_description(f"Random weights in {s.name}'s shape, made by herd's scripts/make-checkpoint.py; "
                      "vocabulary from SmolLM2-135M-Instruct")
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_file_type(FILE_TYPE[fmt])
    w.add_vocab_size(len(vocab.tokens))
    w.add_rope_dimension_count(s.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    A, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType
    w.add_key_value("tokenizer.ggml.tokens", vocab.tokens, A, S.STRING)
    w.add_key_value("tokenizer.ggml.token_type", vocab.types, A, S.INT32)
    w.add_key_value("tokenizer.ggml.merges", vocab.merges, A, S.STRING)
    for key, (val, vtype, sub) in vocab.extra.items():
        w.add_key_value(key, val, vtype, sub)

    for spec in specs:
        shape, dtype, nbytes, raw = encoded_nbytes(fmt, spec)
        w.add_tensor_info(gguf_name(spec.name), shape, dtype, nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for spec in specs:
        data, _ = gguf_encode(fmt, gguf_layout(spec, make_tensor(spec, seed), s))
        w.write_tensor_data(data)
        del data
    w.close()
    tmp.rename(path)
    return sum(math.prod(t.shape) for t in specs)


def llama_quantize_path(args) -> Path:
    qbin = Path(args.llama_quantize or os.environ.get("HERD_LLAMA_QUANTIZE") or DEFAULT_QUANTIZE)
    if not (qbin.is_file() and os.access(qbin, os.X_OK)):
        sys.exit(f"make-checkpoint: llama-quantize not found at {qbin}; build llama.cpp and pass "
                 "--llama-quantize PATH or set HERD_LLAMA_QUANTIZE")
    return qbin


def quantize_with_llama_cpp(path: Path, fmt: str, s: Shape, vocab: Vocab, seed: int, args) -> int:
    qbin = llama_quantize_path(args)
    src_fmt = "f32" if s.small else "f16"
    src = default_path(args.out_dir, s, seed, src_fmt)
    made_src = False
    if not src.is_file():
        if args.keep_source:
            src.parent.mkdir(parents=True, exist_ok=True)
        else:
            src = path.with_name(path.name + f".{src_fmt}.tmp.gguf")
        print(f"writing {src_fmt} source {src}", file=sys.stderr)
        n = write_gguf(src, src_fmt, s, vocab, seed)
        made_src = not args.keep_source
    else:
        n = sum(math.prod(t.shape) for t in tensor_specs(s, len(vocab.tokens)))
    tmp = path.with_name(path.name + ".part")
    cmd = [str(qbin), str(src), str(tmp), GGUF_KQUANT[fmt], str(os.cpu_count() or 1)]
    print("running " + " ".join(cmd), file=sys.stderr)
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stdout[-4000:])
            sys.exit(f"make-checkpoint: llama-quantize failed with status {r.returncode}")
        tmp.rename(path)
    finally:
        if made_src:
            src.unlink(missing_ok=True)
    return n


# ---------------------------------------------------------------------------
# HF directory
# ---------------------------------------------------------------------------

ST_DTYPE = {"f16": ("F16", np.float16, "HalfStorage", "float16"),
            "f32": ("F32", np.float32, "FloatStorage", "float32")}


def plan_shards(specs: list[TensorSpec], itemsize: int, max_bytes: int) -> list[list[TensorSpec]]:
    """transformers' shard_checkpoint: a new shard when the next tensor would overflow this one."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = math.prod(spec.shape) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def write_safetensors(path: Path, specs: list[TensorSpec], seed: int, dtype: str) -> None:
    st, npd, _, _ = ST_DTYPE[dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for spec in specs:
        n = math.prod(spec.shape) * np.dtype(npd).itemsize
        header[spec.name] = {"dtype": st, "shape": list(spec.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors library pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            f.write(make_tensor(spec, seed).astype(npd).tobytes())


class _TorchStubs:
    """Stand-ins for the torch globals a checkpoint pickle names, so pickle writes them
    exactly as torch.save does (GLOBAL 'torch._utils _rebuild_tensor_v2', 'torch HalfStorage')."""

    def __enter__(self):
        if "torch" in sys.modules:
            raise RuntimeError("make-checkpoint writes .bin without torch; do not import torch alongside")
        torch = types.ModuleType("torch")
        utils = types.ModuleType("torch._utils")

        def _rebuild_tensor_v2(*args):  # never called here; named by reference only
            raise NotImplementedError

        _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
        utils._rebuild_tensor_v2 = _rebuild_tensor_v2
        torch._utils = utils
        for _, _, cls, _ in ST_DTYPE.values():
            setattr(torch, cls, type(cls, (), {"__module__": "torch"}))
        sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
        self.torch = torch
        return self

    def __exit__(self, *exc):
        del sys.modules["torch"], sys.modules["torch._utils"]


@dataclasses.dataclass
class _StorageRef:
    cls: type
    key: str
    numel: int


class _TensorRef:
    """Pickles as torch does a contiguous CPU tensor that owns its whole storage."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        fn = sys.modules["torch._utils"]._rebuild_tensor_v2
        return fn, (self.storage, 0, self.shape, stride, False, OrderedDict())


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def _zip_aligned(zf: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A stored entry whose data starts 64-byte aligned, padded with torch's 'FB' extra field."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    header = 30 + len(name.encode()) + 4  # local header + name + the extra field's own header
    pad = -(zf.start_dir + header) % 64
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def write_torch_bin(path: Path, specs: list[TensorSpec], seed: int, dtype: str) -> None:
    _, npd, cls_name, _ = ST_DTYPE[dtype]
    arch = path.stem  # torch.save names the archive's folder after the file
    with _TorchStubs() as stubs:
        cls = getattr(stubs.torch, cls_name)
        state = OrderedDict(
            (spec.name, _TensorRef(_StorageRef(cls, str(i), math.prod(spec.shape)), spec.shape))
            for i, spec in enumerate(specs)
        )
        buf = io.BytesIO()
        _TorchPickler(buf, protocol=2).dump(state)
    serial_id = str(zlib.crc32(f"{seed}:{path.name}".encode())).rjust(40, "0")
    # Entry order and the small records are those of torch.save (torch 2.x, zip format).
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        def small(name: str, data: bytes) -> None:
            zf.writestr(_zip_aligned(zf, f"{arch}/{name}", len(data)), data)

        small("data.pkl", buf.getvalue())
        small(".format_version", b"1")
        small(".storage_alignment", b"64")
        small("byteorder", b"little")
        for i, spec in enumerate(specs):
            data = make_tensor(spec, seed).astype(npd)
            with zf.open(_zip_aligned(zf, f"{arch}/data/{i}", data.nbytes), "w") as out:
                out.write(memoryview(data).cast("B"))
            del data
        small("version", b"3\n")
        small(".data/serialization_id", serial_id.encode())


def tokenizer_json(vocab: Vocab) -> dict:
    """A `tokenizers` JSON equal to the GGUF's gpt2 tokenizer (as herd builds it from GGUF)."""
    pre = vocab.extra.get("tokenizer.ggml.pre", ("default",))[0]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "smollm":
        pre_tok = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre in ("gpt2", "default"):
        pre_tok = byte_level
    else:
        sys.exit(f"make-checkpoint: no tokenizer.json pre-tokenizer known for tokenizer.ggml.pre={pre}")
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": vocab.types[i] != 3, "special": vocab.types[i] == 3}
        for i, t in enumerate(vocab.tokens) if vocab.types[i] in (3, 4)  # CONTROL, USER_DEFINED
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(vocab.tokens)},
            "merges": vocab.merges,
        },
    }


def write_hf(out: Path, fmt: str, s: Shape, vocab: Vocab, seed: int, shard_mb: int, dtype: str) -> int:
    specs = tensor_specs(s, len(vocab.tokens))
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bos, eos, pad = vocab.special_id("bos"), vocab.special_id("eos"), vocab.special_id("padding")
    text = lambda i: None if i is None else vocab.tokens[i]  # noqa: E731
    st, npd, _, torch_dtype = ST_DTYPE[dtype]
    config = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": bos, "eos_token_id": eos,
        "pad_token_id": pad, "hidden_act": "silu", "hidden_size": s.hidden, "initializer_range": 0.02,
        "intermediate_size": s.ffn, "max_position_embeddings": s.context, "model_type": "llama",
        "num_attention_heads": s.heads, "num_hidden_layers": s.layers, "num_key_value_heads": s.kv_heads,
        "pretraining_tp": 1, "rms_norm_eps": s.rms_eps, "rope_scaling": None, "rope_theta": s.rope_theta,
        "tie_word_embeddings": False, "torch_dtype": torch_dtype, "transformers_version": "4.31.0",
        "use_cache": True, "vocab_size": len(vocab.tokens),
    }
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": True,
           "temperature": 0.9, "top_p": 0.6, "max_length": s.context, "transformers_version": "4.31.0"}
    tok_cfg = {
        "add_bos_token": vocab.flag("add_bos_token", False), "add_eos_token": False,
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for a in tokenizer_json(vocab)["added_tokens"]
        },
        "bos_token": text(bos), "eos_token": text(eos), "pad_token": text(pad),
        "unk_token": text(vocab.special_id("unknown")), "clean_up_tokenization_spaces": False,
        "model_max_length": s.context, "tokenizer_class": "GPT2Tokenizer",
    }
    if vocab.chat_template:
        tok_cfg["chat_template"] = vocab.chat_template
    for name, obj in [("config.json", config), ("generation_config.json", gen),
                      ("tokenizer.json", tokenizer_json(vocab)), ("tokenizer_config.json", tok_cfg)]:
        (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    itemsize = np.dtype(npd).itemsize
    shards = plan_shards(specs, itemsize, shard_mb * 1000 * 1000)
    stem, ext, index = ("model", "safetensors", "model.safetensors.index.json") if fmt == "hf" else \
        ("pytorch_model", "bin", "pytorch_model.bin.index.json")
    names = [f"{stem}.{ext}"] if len(shards) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        print(f"  {name}: {len(shard)} tensors", file=sys.stderr)
        (write_safetensors if fmt == "hf" else write_torch_bin)(tmp / name, shard, seed, dtype)
        weight_map.update({spec.name: name for spec in shard})
    if len(shards) > 1:  # transformers writes an index only for sharded checkpoints
        total = sum(math.prod(spec.shape) * itemsize for spec in specs)
        (tmp / index).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sum(math.prod(t.shape) for t in specs)


# ---------------------------------------------------------------------------
# Reading back (for --check and tests): name -> float32 HF-layout tensor
# ---------------------------------------------------------------------------

def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: Path, s: Shape) -> Callable[[str, np.ndarray | None], np.ndarray]:
    """HF-named float32 tensors of a GGUF, q/k un-permuted; rows selects embedding rows."""
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}

    def get(hf: str, rows: np.ndarray | None = None) -> np.ndarray:
        t = by_name[gguf_name(hf)]
        data = t.data if rows is None else t.data[rows]
        x = gguf.quants.dequantize(np.asarray(data), t.tensor_type).astype(np.float32, copy=False)
        if hf.endswith("q_proj.weight"):
            x = _unpermute_qk(x, s.heads)
        elif hf.endswith("k_proj.weight"):
            x = _unpermute_qk(x, s.kv_heads)
        return x

    return get


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a torch zip checkpoint as read-only memory maps, parsed without torch.

    Handles what torch.save writes for contiguous tensors that own their storage
    (as this script and HF checkpoints do); entries must be stored, not deflated."""
    dtypes = {"HalfStorage": np.float16, "FloatStorage": np.float32}
    with zipfile.ZipFile(path) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("data.pkl")]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return lambda storage, off, size, stride, *_: (storage, off, tuple(size), tuple(stride))
                if module == "torch" and name in dtypes:
                    return name
                if (module, name) == ("collections", "OrderedDict"):
                    return OrderedDict
                raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

            def persistent_load(self, pid):
                _, cls, key, _, numel = pid
                return (dtypes[cls], key, numel)

        state = Unpickler(io.BytesIO(zf.read(pkl))).load()
        infos = {i.filename: i for i in zf.infolist()}
    out = {}
    with open(path, "rb") as f:
        for name, ((dt, key, numel), off, size, stride) in state.items():
            info = infos[f"{prefix}data/{key}"]
            assert info.compress_type == zipfile.ZIP_STORED and off == 0 and info.file_size == numel * dt().itemsize
            assert stride == tuple(math.prod(size[i + 1:]) for i in range(len(size))), "non-contiguous tensor"
            f.seek(info.header_offset + 26)  # the local header's name and extra lengths
            n_name, n_extra = struct.unpack("<HH", f.read(4))
            start = info.header_offset + 30 + n_name + n_extra
            out[name] = np.memmap(path, dtype=dt, mode="r", offset=start, shape=size)
    return out


def open_hf(path: Path) -> Callable[[str, np.ndarray | None], np.ndarray]:
    """HF-named float32 tensors of an HF directory (safetensors, else pytorch_model*.bin)."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        handles = [safe_open(f, framework="numpy") for f in files]
        where = {k: h for h in handles for k in h.keys()}

        def get(hf: str, rows: np.ndarray | None = None) -> np.ndarray:
            if rows is None:
                return where[hf].get_tensor(hf).astype(np.float32)
            sl = where[hf].get_slice(hf)  # integer-array indexing is not supported; take rows one by one
            return np.concatenate([sl[int(r):int(r) + 1] for r in rows]).astype(np.float32)

        return get
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("pytorch_model*.bin")):
        tensors.update(read_torch_bin(f))
    return lambda hf, rows=None: np.asarray(tensors[hf] if rows is None else tensors[hf][rows], dtype=np.float32)


def forward_check(get, s: Shape, n_vocab: int, n_tokens: int = 8) -> None:
    """A numpy LLaMA forward pass (HF layout: rotate-half RoPE, causal attention)."""
    ids = np.array([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365][:n_tokens]) % n_vocab
    hd, T = s.head_dim, len(ids)
    inv = s.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(np.arange(T), inv)
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rms(x, w):
        return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + s.rms_eps) * w

    def rope(x):  # (heads, T, hd)
        half = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos + half * sin

    uniq, where = np.unique(ids, return_inverse=True)
    x = get("model.embed_tokens.weight", uniq)[where].astype(np.float64)
    print(f"  embed        rms {np.sqrt((x ** 2).mean()):8.4f}")
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(s.layers):
        p = f"model.layers.{i}."
        h = rms(x, get(p + "input_layernorm.weight"))
        q = (h @ get(p + "self_attn.q_proj.weight").T).reshape(T, s.heads, hd).transpose(1, 0, 2)
        k = (h @ get(p + "self_attn.k_proj.weight").T).reshape(T, s.kv_heads, hd).transpose(1, 0, 2)
        v = (h @ get(p + "self_attn.v_proj.weight").T).reshape(T, s.kv_heads, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        rep = s.heads // s.kv_heads
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
        att = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        a = (att @ v).transpose(1, 0, 2).reshape(T, s.hidden)
        x = x + a @ get(p + "self_attn.o_proj.weight").T
        h = rms(x, get(p + "post_attention_layernorm.weight"))
        g, u = h @ get(p + "mlp.gate_proj.weight").T, h @ get(p + "mlp.up_proj.weight").T
        x = x + (g / (1 + np.exp(-g)) * u) @ get(p + "mlp.down_proj.weight").T
        print(f"  layer {i:3d}    rms {np.sqrt((x ** 2).mean()):8.4f}   attn max weight "
              f"{att[:, -1].max():.3f}")
    logits = rms(x, get("model.norm.weight")) @ get("lm_head.weight").T
    if not np.isfinite(logits).all():
        sys.exit("make-checkpoint: non-finite logits")
    z = logits - logits.max(-1, keepdims=True)
    p_ = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    ent = -(p_ * np.log(p_ + 1e-30)).sum(-1)
    print(f"  logits std {logits.std():.3f} min {logits.min():.3f} max {logits.max():.3f}; "
          f"entropy {ent.mean():.2f} nats (uniform {math.log(n_vocab):.2f}); argmax {logits.argmax(-1).tolist()}")


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def default_path(root: Path, s: Shape, seed: int, fmt: str) -> Path:
    tag = s.name if seed == 0 else f"{s.name}-seed{seed}"
    return root / s.name / (f"{tag}-{fmt}" if fmt in HF_FORMATS else f"{tag}-{fmt}.gguf")


def disk_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def list_all() -> None:
    print("shapes (LLaMA; rope theta 10000, rms eps 1e-5; vocabulary SmolLM2's 49152 unless noted):")
    print(f"  {'name':<11} {'hidden':>6} {'layers':>6} {'heads':>5} {'kv':>3} {'ffn':>6} {'ctx':>5} {'vocab':>6} "
          f"{'params':>7}")
    for s in SHAPES.values():
        n_vocab = s.vocab_limit or 49152
        n = sum(math.prod(t.shape) for t in tensor_specs(s, n_vocab))
        print(f"  {s.name:<11} {s.hidden:>6} {s.layers:>6} {s.heads:>5} {s.kv_heads:>3} {s.ffn:>6} {s.context:>5} "
              f"{n_vocab:>6} {n / 1e6:>6.1f}M  {s.about}")
    print("formats:")
    for f, about in FORMATS.items():
        print(f"  {f:<7} {about}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  scripts/make-checkpoint.sh --list\n"
               "  scripts/make-checkpoint.sh tiny-k --format q4_0 q8_0 f32 --check\n"
               "  scripts/make-checkpoint.sh vicuna-7b --format f16 hf\n",
    )
    ap.add_argument("shape", nargs="?", choices=list(SHAPES), help="model shape (see --list)")
    ap.add_argument("--format", "-f", nargs="+", default=["f16"], choices=list(FORMATS), metavar="FMT",
                    help="one or more of: " + ", ".join(FORMATS) + " (default f16)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                    help="cache root (default $HERD_CHECKPOINTS or /var/tmp/herd-checkpoints)")
    ap.add_argument("--output", "-o", type=Path, help="exact output path (one format only)")
    ap.add_argument("--force", action="store_true", help="remake outputs that already exist")
    ap.add_argument("--vocab-gguf", type=Path, default=DEFAULT_VOCAB_GGUF, help="GGUF to take the tokenizer from")
    ap.add_argument("--shard-mb", type=int, default=10000,
                    help="HF shard size limit in MB of 10^6 bytes (default 10000, as transformers' 10GB)")
    ap.add_argument("--hf-dtype", choices=list(ST_DTYPE), default="f16", help="HF weights dtype (default f16)")
    ap.add_argument("--llama-quantize", help="llama-quantize binary for K-quants "
                    f"(default $HERD_LLAMA_QUANTIZE or {DEFAULT_QUANTIZE})")
    ap.add_argument("--keep-source", action="store_true",
                    help="keep the f32/f16 GGUF made for llama-quantize in the cache")
    ap.add_argument("--check", action="store_true",
                    help="after making, run a numpy forward pass of 8 tokens on the file and print per-layer RMS")
    ap.add_argument("--list", action="store_true", help="list shapes and formats")
    args = ap.parse_args()
    if args.list:
        list_all()
        return
    if args.shape is None:
        ap.error("a shape is needed (see --list)")
    if args.output and len(args.format) > 1:
        ap.error("--output takes one format")
    s = SHAPES[args.shape]
    if any(f in GGUF_KQUANT for f in args.format):
        llama_quantize_path(args)  # fail before any long job
    vocab = read_vocab(args.vocab_gguf, s.vocab_limit)

    for fmt in dict.fromkeys(args.format):
        path = args.output or default_path(args.out_dir, s, args.seed, fmt)
        t0 = time.monotonic()
        if path.exists() and not args.force:
            status = "cached"
            n = sum(math.prod(t.shape) for t in tensor_specs(s, len(vocab.tokens)))
        else:
            print(f"making {s.name} {fmt} (seed {args.seed}) -> {path}", file=sys.stderr)
            path.parent.mkdir(parents=True, exist_ok=True)
            if fmt in GGUF_DIRECT:
                n = write_gguf(path, fmt, s, vocab, args.seed)
            elif fmt in GGUF_KQUANT:
                n = quantize_with_llama_cpp(path, fmt, s, vocab, args.seed, args)
            else:
                n = write_hf(path, fmt, s, vocab, args.seed, args.shard_mb, args.hf_dtype)
            status = f"made in {time.monotonic() - t0:.1f}s"
        size = disk_size(path)
        print(f"{path}\t{fmt}\t{size / 1e6:.1f} MB\t{n / 1e6:.2f}M params\t{status}")
        if args.check:
            get = open_hf(path) if fmt in HF_FORMATS else open_gguf(path, s)
            forward_check(get, s, len(vocab.tokens))


if __name__ == "__main__":
    main()
