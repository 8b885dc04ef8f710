//! The Rust conversion of a sentencepiece model against ids from the sentencepiece library
//! (tests/fixtures/sentencepiece, made by scripts/make-sentencepiece-fixture.py), and
//! incremental detokenization on byte-fallback text.

use herd_tests::fixture;
use herd_worker::engine::Tokenizer;
use herd_worker::engine::detok::IncrementalDecoder;
use herd_worker::engine::tokenizer::TokenizerConfig;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn spm() -> Tokenizer {
    let dir = fixture("sentencepiece");
    herd_worker::engine::tokenizer::from_hf_dir(&dir, &TokenizerConfig::default(), Some(1))
        .expect("convert tokenizer.model")
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("sentencepiece/reference.json")).unwrap();
    serde_json::from_str::<Reference>(&text).unwrap().cases
}

#[test]
fn converted_sentencepiece_gives_identical_ids_and_round_trips() {
    let tok = spm();
    let cases = cases();
    assert!(cases.len() >= 15);
    for case in cases {
        let ids = tok.encode(&case.text).unwrap();
        // LLaMA-style tokenizers add BOS (id 1) in front; sentencepiece's encode does not.
        assert_eq!(ids.first(), Some(&1), "BOS for {:?}", case.text);
        assert_eq!(&ids[1..], &case.ids[..], "ids for {:?}", case.text);
        assert_eq!(tok.decode(&ids).unwrap(), case.text, "round trip of {:?}", case.text);
    }
}

#[test]
fn incremental_decoding_never_splits_a_character() {
    let tok = spm();
    for text in ["I love 🦀 and 🚀", "你好，世界", "café naïve", " leading space", "line one\nline two"] {
        let ids = tok.encode(text).unwrap();
        // Several of these characters are 3-4 byte-fallback tokens each.
        let mut dec = IncrementalDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            let delta = dec.push(&tok, id).unwrap();
            assert!(!delta.contains('\u{FFFD}'), "half a character emitted for {text:?}: {delta:?}");
            out.push_str(&delta);
        }
        out.push_str(&dec.finish(&tok).unwrap());
        assert_eq!(out, text);
    }
}
