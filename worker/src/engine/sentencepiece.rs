//! Converts a sentencepiece BPE model (LLaMA's `tokenizer.model`, or a GGUF `llama` vocabulary)
//! into an equivalent `tokenizers` tokenizer.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as DecoderStrip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence, Strip};
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use super::error::{EngineError, Result};

/// sentencepiece's piece types (`ModelProto.SentencePiece.Type`).
pub(crate) mod kind {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
}

/// The parts of `sentencepiece_model.proto` herd reads; unknown fields are skipped.
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<PieceProto>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct PieceProto {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    #[prost(int32, optional, tag = "3", default = "1")]
    r#type: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// 1 unigram (the default), 2 BPE, 3 word, 4 char.
    #[prost(int32, optional, tag = "3", default = "1")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "35", default = "false")]
    byte_fallback: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(bool, optional, tag = "3", default = "true")]
    add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4", default = "true")]
    remove_extra_whitespaces: Option<bool>,
    #[prost(bool, optional, tag = "5", default = "true")]
    escape_whitespaces: Option<bool>,
}

/// One vocabulary entry.
#[derive(Debug, Clone)]
pub(crate) struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: i32,
}

/// A sentencepiece BPE vocabulary and the normalization options that shape its input.
#[derive(Debug, Clone)]
pub(crate) struct SpmModel {
    pub pieces: Vec<Piece>,
    pub byte_fallback: bool,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

const SPACE: &str = "\u{2581}";

impl SpmModel {
    /// Parses a `tokenizer.model` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::checkpoint(path, e))?;
        let proto = ModelProto::decode(bytes.as_slice())
            .map_err(|e| EngineError::checkpoint(path, format!("not a sentencepiece model: {e}")))?;
        let trainer = proto.trainer_spec.unwrap_or_default();
        let model_type = trainer.model_type();
        if model_type != 2 {
            let name = match model_type {
                1 => "unigram",
                3 => "word",
                4 => "char",
                _ => "unknown",
            };
            return Err(EngineError::checkpoint(
                path,
                format!("sentencepiece {name} models are not supported (LLaMA-family tokenizers are BPE)"),
            ));
        }
        let norm = proto.normalizer_spec.unwrap_or_default();
        if let Some(name) = norm.name.as_deref().filter(|n| !matches!(*n, "identity" | "")) {
            tracing::warn!(
                "{}: sentencepiece normalization {name} is not reproduced; text is tokenized as given",
                path.display()
            );
        }
        let pieces = proto
            .pieces
            .iter()
            .map(|p| Piece { text: p.piece().to_string(), score: p.score(), kind: p.r#type() })
            .collect();
        Ok(Self {
            pieces,
            byte_fallback: trainer.byte_fallback(),
            add_dummy_prefix: norm.add_dummy_prefix(),
            remove_extra_whitespaces: norm.remove_extra_whitespaces(),
            escape_whitespaces: norm.escape_whitespaces(),
        })
    }

    /// BPE merges implied by the vocabulary: every split of a piece into two pieces, the
    /// higher-scoring merged piece first (sentencepiece merges the best-scoring pair first).
    fn merges(&self, vocab: &HashMap<&str, u32>) -> Vec<(String, String)> {
        let mut ranked: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
        for (id, p) in self.pieces.iter().enumerate() {
            if p.kind != kind::NORMAL && p.kind != kind::USER_DEFINED {
                continue;
            }
            for (split, _) in p.text.char_indices().skip(1) {
                let (l, r) = p.text.split_at(split);
                if let (Some(&lid), Some(&_rid)) = (vocab.get(l), vocab.get(r)) {
                    ranked.push((p.score, id as u32, lid, l, r));
                }
            }
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        ranked.into_iter().map(|(_, _, _, l, r)| (l.to_string(), r.to_string())).collect()
    }

    /// Builds the equivalent `tokenizers` tokenizer (no BOS added here; the caller adds it).
    pub fn to_tokenizer(&self) -> Result<HfTokenizer> {
        let err = |e: tokenizers::Error| EngineError::Tokenizer(format!("converting sentencepiece model: {e}"));
        let vocab: HashMap<&str, u32> =
            self.pieces.iter().enumerate().map(|(i, p)| (p.text.as_str(), i as u32)).collect();
        let merges = self.merges(&vocab);
        let unk = self.pieces.iter().find(|p| p.kind == kind::UNKNOWN).map(|p| p.text.clone());
        let owned: Vocab = vocab.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let mut builder =
            BPE::builder().vocab_and_merges(owned, merges).byte_fallback(self.byte_fallback).fuse_unk(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder.build().map_err(err)?;
        let mut tok = HfTokenizer::new(bpe);

        let mut norms: Vec<NormalizerWrapper> = Vec::new();
        if self.remove_extra_whitespaces {
            norms.push(Strip::new(true, true).into());
            norms.push(
                Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()), " ")
                    .map_err(err)?
                    .into(),
            );
        }
        if self.add_dummy_prefix {
            norms.push(Prepend::new(SPACE.into()).into());
        }
        if self.escape_whitespaces {
            norms.push(Replace::new(" ", SPACE).map_err(err)?.into());
        }
        tok.with_normalizer(Some(NormalizerSequence::new(norms))).map_err(err)?;

        let mut decoders: Vec<DecoderWrapper> = vec![
            DecoderWrapper::Replace(Replace::new(SPACE, " ").map_err(err)?),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if self.add_dummy_prefix {
            decoders.push(DecoderStrip::new(' ', 1, 0).into());
        }
        tok.with_decoder(Some(DecoderSequence::new(decoders)));

        let specials: Vec<AddedToken> = self
            .pieces
            .iter()
            .filter(|p| p.kind == kind::CONTROL || p.kind == kind::UNKNOWN)
            .map(|p| AddedToken::from(p.text.clone(), true).normalized(false))
            .collect();
        tok.add_special_tokens(specials).map_err(err)?;
        let user: Vec<AddedToken> = self
            .pieces
            .iter()
            .filter(|p| p.kind == kind::USER_DEFINED)
            .map(|p| AddedToken::from(p.text.clone(), false).normalized(false))
            .collect();
        tok.add_tokens(user).map_err(err)?;
        Ok(tok)
    }
}
