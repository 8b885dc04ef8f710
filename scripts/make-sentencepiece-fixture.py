#!/usr/bin/env python3
"""Generate the sentencepiece tokenizer test fixtures.

Trains a tiny LLaMA-style BPE sentencepiece model (byte fallback, split
digits, identity normalization, dummy prefix) on a deterministically generated
corpus and records reference encodings produced by the `sentencepiece` Python
package.

Outputs (relative to the repository root):
    tests/fixtures/sentencepiece/tokenizer.model
    tests/fixtures/sentencepiece/reference.json

Usage:
    pip install sentencepiece
    python3 scripts/make-sentencepiece-fixture.py

Runs from any working directory.
"""

import io
import json
import os
import random

import sentencepiece as spm

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(SCRIPT_DIR)
OUT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "sentencepiece")
MODEL_PATH = os.path.join(OUT_DIR, "tokenizer.model")
REFERENCE_PATH = os.path.join(OUT_DIR, "reference.json")

VOCAB_SIZE = 400  # 300 is below the 317 required (259 meta/byte pieces + chars)

SUBJECTS = [
    "The cat", "A dog", "My friend", "The old man", "Our teacher", "The robot",
    "A small bird", "The engineer", "Her brother", "The team", "Everyone",
    "The quick brown fox", "A tired student", "The server", "This model",
]
VERBS = [
    "runs", "jumps", "reads", "writes", "builds", "sees", "finds", "likes",
    "walks to", "talks about", "thinks about", "looks at", "computes",
    "tokenizes", "returns", "sends", "receives", "answers",
]
OBJECTS = [
    "the house", "a book", "the river", "some code", "the garden", "a letter",
    "the mountain", "an apple", "the network", "a question", "the answer",
    "the lazy dog", "a long sentence", "the results", "every request",
]
ENDINGS = [
    ".", "!", "?", ", and then it rains.", " every day.", " at night.",
    " (again).", "; nobody knows why.", " - quickly.", ": yes, really.",
    " with \"quotes\".", " in 2024.", " for $5.", " at 10:30 am.",
]
EXTRA_WORDS = [
    "Hello", "world", "Rust", "Python", "tokenizer", "sentence", "piece",
    "byte", "fallback", "vocabulary", "merge", "gateway", "worker", "model",
    "inference", "batch", "stream", "token", "latency", "throughput",
]
# Rare characters: each appears at most a couple of times in the corpus so
# that character_coverage drops them from the vocabulary and they have to be
# encoded via byte fallback.
RARE = ["你好", "世界", "こんにちは", "🦀", "🚀", "é", "ï", "Ω"]


def make_corpus(rng):
    lines = []
    for i in range(400):
        kind = i % 4
        if kind == 0:
            line = "%s %s %s%s" % (
                rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS),
                rng.choice(ENDINGS))
        elif kind == 1:
            n = rng.randint(3, 9)
            line = " ".join(rng.choice(EXTRA_WORDS) for _ in range(n))
            line = line + rng.choice([".", "!", "?", ","])
        elif kind == 2:
            line = "Item %d costs %d.%02d and weighs %d kg (id=%d)." % (
                rng.randint(1, 999), rng.randint(0, 99), rng.randint(0, 99),
                rng.randint(1, 50), rng.randint(1000, 99999))
        else:
            line = "%s, %s %s %s!" % (
                rng.choice(EXTRA_WORDS), rng.choice(SUBJECTS).lower(),
                rng.choice(VERBS), rng.choice(OBJECTS))
        if i in (57, 211):
            line += " " + RARE[(i // 57) % len(RARE)]
        lines.append(line)
    return lines


TEST_CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "My friend reads a book every day.",
    " leading space",
    "   three leading spaces",
    "double  spaces  inside",
    "trailing space ",
    "12345",
    "pi is 3.14",
    "I love 🦀 and 🚀",
    "你好，世界",
    "こんにちは世界",
    "café naïve",
    "line one\nline two",
    "tab\tseparated",
    "",
    " ",
    "Ω≈ç√∫ ☃ \u00a0nbsp",
    "Item 42 costs 7.99 and weighs 3 kg (id=12345).",
    "tokenizer byte fallback, vocabulary merge!",
]


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    rng = random.Random(20240601)
    corpus = make_corpus(rng)

    # Train from an in-memory iterator and write the model into memory so that
    # no temporary file paths end up in the serialized trainer_spec (keeps the
    # .model byte-for-byte reproducible).
    model_buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model_buf,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    model_bytes = model_buf.getvalue()

    with open(MODEL_PATH, "wb") as f:
        f.write(model_bytes)

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    cases = []
    for text in TEST_CASES:
        ids = sp.encode(text)
        pieces = [sp.id_to_piece(i) for i in ids]
        decoded = sp.decode(ids)
        cases.append({
            "text": text,
            "ids": ids,
            "pieces": pieces,
            "decoded": decoded,
            "roundtrip": decoded == text,
        })

    with open(REFERENCE_PATH, "w", encoding="utf-8") as f:
        json.dump({
            "sentencepiece_version": spm.__version__,
            "vocab_size": sp.get_piece_size(),
            "cases": cases,
        }, f, ensure_ascii=False, indent=2)
        f.write("\n")

    print("wrote %s (%d bytes)" % (MODEL_PATH, len(model_bytes)))
    print("wrote %s (%d cases)" % (REFERENCE_PATH, len(cases)))


if __name__ == "__main__":
    main()
