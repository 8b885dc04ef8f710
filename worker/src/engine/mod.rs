//! The inference engine: checkpoint loading, tokenization, chat templates, the LLaMA forward
//! pass and token generation.

pub mod config;
pub mod detok;
pub mod error;
pub mod grammar;
pub mod host;
pub mod kv;
pub mod llamacpp;
pub mod model;
pub mod pool;
pub mod quant;
pub mod sampler;
pub mod sentencepiece;
pub mod stop;
pub mod tokenizer;
pub mod tp;
pub mod weights;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

pub use config::ModelConfig;
pub use error::{EngineError, Result, candle_message};
pub use herd_prompt::{ChatTemplate, Message, TemplateSource};
pub use sampler::SamplingParams;
pub use tokenizer::Tokenizer;

use detok::IncrementalDecoder;
use kv::{KvOptions, KvStats, SeqCache, common_prefix};
use sampler::Sampler;
use stop::{StopMatcher, StopStep};
use tokenizer::TokenizerConfig;
use tp::Ranks;
pub use tp::parse_devices;
use weights::{GgufMode, Weights};

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Longest stop string, in bytes (the gateway's limit too): each is matched on every token.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most extra stop token ids per request.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// More bytes than any token of a real vocabulary spans.
pub const MAX_BYTES_PER_TOKEN: usize = 64;
/// Most alternatives per position a request may ask logprobs for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The `--dtype` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// GGUF stays quantized; HF checkpoints use f32 on CPU and f16 on CUDA.
    #[default]
    Auto,
    F32,
    F16,
    BF16,
}

impl FromStr for DTypeChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => Err(format!("unknown dtype {s:?} (expected auto, f32, f16 or bf16)")),
        }
    }
}

/// The `--quantize` choice: the block format HF checkpoints' matrices are quantized to as
/// they are read, for herd's CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizeChoice {
    Q8_0,
    Q4_0,
    Q4K,
}

impl QuantizeChoice {
    /// The GGUF block format.
    pub fn ggml_dtype(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType;
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4K => "q4_k",
        }
    }
}

impl FromStr for QuantizeChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            "q4_k" | "q4k" => Ok(Self::Q4K),
            _ => Err(format!("unknown quantization {s:?} (expected q8_0, q4_0 or q4_k)")),
        }
    }
}

/// What to load and how.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// An HF checkpoint directory or a `.gguf` file.
    pub model: PathBuf,
    pub dtype: DTypeChoice,
    /// `--quantize`: HF checkpoints' matrices quantized as they are read (CPU only).
    pub quantize: Option<QuantizeChoice>,
    /// One device per tensor-parallel rank.
    pub devices: Vec<Device>,
    /// `--chat-template NAME|FILE`.
    pub chat_template: Option<String>,
    /// Compute threads for the CPU kernels, shared out over CPU ranks (at least one each).
    pub threads: usize,
    /// Compute attention with candle's tensor ops, as on GPUs, even where the CPU's own loops
    /// would run (f32 on the CPU); for checking one against the other.
    pub tensor_attention: bool,
    /// The KV cache's size, block size and prefix caching.
    pub kv: KvOptions,
}

impl LoadOptions {
    /// One CPU rank, automatic dtype, the template the model implies.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            dtype: DTypeChoice::Auto,
            quantize: None,
            devices: vec![Device::Cpu],
            chat_template: None,
            threads: default_threads(),
            tensor_attention: false,
            kv: KvOptions::default(),
        }
    }
}

/// One compute thread per core this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

/// What a generation is asked to do besides sampling.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    /// Tokens to generate at most; `None` means what the context leaves.
    pub max_tokens: Option<usize>,
    /// Up to four strings that end the answer; they are not part of it.
    pub stop: Vec<String>,
    /// Extra token ids that end the answer (EOS ids always do unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS (benchmarks).
    pub ignore_eos: bool,
    /// Report each sampled token's logprob and this many top alternatives.
    pub logprobs: Option<usize>,
    /// Tokens to generate before EOS, a stop token or a stop string may end the answer.
    pub min_tokens: usize,
    /// Keep the stop string that ends the answer in its text.
    pub include_stop_str_in_output: bool,
    /// Write special tokens out in the text instead of leaving them out.
    pub keep_special_tokens: bool,
    /// What the output must match (JSON, a schema, a regex, a grammar).
    pub constraint: Option<grammar::Constraint>,
}

/// Why generation ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Log-probability of a sampled token and its strongest alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// What the token adds to the text after the tokens before it: the sampled tokens' texts
    /// add up to the answer (a character split over several tokens comes with its last one).
    pub text: String,
    /// The most likely tokens, most likely first.
    pub top: Vec<Alternative>,
}

/// One of the most likely tokens at a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    pub id: u32,
    pub logprob: f32,
    /// What it would have added to the text.
    pub text: String,
}

/// One sampled token as it streams out.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOutput {
    pub id: u32,
    /// Text released by this token (may be empty while a character or stop string is pending).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A loaded model with its tokenizer and chat template, ready to generate.
pub struct Engine {
    model: Ranks,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    template_source: TemplateSource,
    eos_ids: Vec<u32>,
    path: PathBuf,
    /// Compiles output constraints (JSON mode, schemas, regexes) for this vocabulary.
    grammars: grammar::Grammars,
}

/// Prompt tokens shared with a prompt of the same step worth waiting a step for.
const MIN_REUSE: usize = 16;

fn resolve_dtype(choice: DTypeChoice, device: &Device) -> Result<DType> {
    match (choice, device.is_cpu()) {
        (DTypeChoice::Auto, true) | (DTypeChoice::F32, _) => Ok(DType::F32),
        (DTypeChoice::Auto, false) | (DTypeChoice::F16, false) => Ok(DType::F16),
        (DTypeChoice::BF16, false) => Ok(DType::BF16),
        (DTypeChoice::F16 | DTypeChoice::BF16, true) => {
            Err(EngineError::InvalidArgument("--dtype f16/bf16 needs a CUDA device; on CPU use auto or f32".into()))
        }
    }
}

/// EOS ids from `generation_config.json`, if present.
fn generation_eos(dir: &Path) -> Result<Vec<u32>> {
    #[derive(serde::Deserialize)]
    struct GenConfig {
        eos_token_id: Option<config::OneOrMany>,
    }
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::checkpoint(&path, e))?;
    let g: GenConfig =
        serde_json::from_str(&text).map_err(|e| EngineError::checkpoint(&path, format!("not valid JSON: {e}")))?;
    Ok(g.eos_token_id.map(|e| e.ids()).unwrap_or_default())
}

struct Loaded {
    cfg: ModelConfig,
    weights: Weights,
    tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    model_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

fn open_hf(dir: &Path, dtype: DType, quantize: Option<QuantizeChoice>) -> Result<Loaded> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(EngineError::checkpoint(&config_path, "missing: not an HF checkpoint directory"));
    }
    let cfg = ModelConfig::from_hf_file(&config_path)?;
    let tcfg = TokenizerConfig::from_dir(dir)?;
    let tokenizer = tokenizer::from_hf_dir(dir, &tcfg, cfg.bos_token_id)?;
    if quantize.is_none() && dtype == DType::F32 {
        check_f32_fits(&cfg, dir)?;
    }
    let quantize = quantize.map(|q| weights::HfQuantize { dtype: q.ggml_dtype(), head_dim: cfg.head_dim });
    let weights = Weights::open_hf(dir, dtype, quantize)?;
    let mut eos_ids = cfg.eos_token_ids.clone();
    eos_ids.extend(generation_eos(dir)?);
    eos_ids.extend(tcfg.eos_token().and_then(|t| tokenizer.token_id(t)));
    let text_of = |t: Option<&str>, id: Option<u32>| {
        t.map(str::to_string).or_else(|| id.and_then(|i| tokenizer.token(i))).unwrap_or_default()
    };
    let bos_token = text_of(tcfg.bos_token(), tokenizer.bos_id());
    let eos_token = text_of(tcfg.eos_token(), eos_ids.first().copied());
    Ok(Loaded { model_template: tcfg.chat_template(), cfg, weights, tokenizer, eos_ids, bos_token, eos_token })
}

/// Refuses an HF checkpoint whose f32 weights would not fit in the memory available, naming
/// what they need and the flag that makes them fit.
fn check_f32_fits(cfg: &ModelConfig, dir: &Path) -> Result<()> {
    let (Some(available), need) = (available_memory_bytes(), cfg.parameter_count() * 4) else { return Ok(()) };
    if need <= available {
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    Err(EngineError::InvalidArgument(format!(
        "{}: its {:.1}B parameters need about {:.1} GB as f32 on the CPU, and {:.1} GB of memory is available; \
         pass --quantize q8_0 (about {:.1} GB), q4_k or q4_0 (about {:.1} GB) to quantize the weights as they are read",
        dir.display(),
        cfg.parameter_count() as f64 / 1e9,
        gb(need),
        gb(available),
        gb(cfg.parameter_count() * 34 / 32),
        gb(cfg.parameter_count() * 18 / 32),
    )))
}

/// `MemAvailable` from /proc/meminfo, where the OS reports it.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn open_gguf(path: &Path, choice: DTypeChoice, device: &Device) -> Result<Loaded> {
    let mut file = File::open(path).map_err(|e| EngineError::checkpoint(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| EngineError::checkpoint(path, format!("not a readable GGUF file: {}", candle_message(&e))))?;
    let cfg = ModelConfig::from_gguf(&content.metadata, path)?;
    let tokenizer = tokenizer::from_gguf(&content.metadata, path)?;
    let model_template = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    let (mode, dtype) = match choice {
        DTypeChoice::Auto => (GgufMode::Quantized, resolve_dtype(DTypeChoice::F32, device)?),
        other => (GgufMode::Dequantized, resolve_dtype(other, device)?),
    };
    let weights = Weights::open_gguf(path, content, mode, dtype)?;
    let token = |id: Option<u32>| id.and_then(|i| tokenizer.token(i)).unwrap_or_default();
    let bos_token = token(tokenizer.bos_id());
    let eos_token = token(cfg.eos_token_ids.first().copied());
    Ok(Loaded { eos_ids: cfg.eos_token_ids.clone(), cfg, weights, tokenizer, model_template, bos_token, eos_token })
}

impl Engine {
    /// Loads a checkpoint; `progress(done, total)` is called as layers are read.
    pub fn load(opts: &LoadOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let path = &opts.model;
        if !path.exists() {
            return Err(EngineError::checkpoint(path, "no such file or directory"));
        }
        let device = opts.devices.first().ok_or_else(|| EngineError::InvalidArgument("no device to load on".into()))?;
        if let Some(q) = opts.quantize {
            if !path.is_dir() {
                return Err(EngineError::InvalidArgument(format!(
                    "--quantize {} applies to HF checkpoint directories; {} is a file (GGUF files are used as quantized)",
                    q.name(),
                    path.display()
                )));
            }
            if opts.devices.iter().any(|d| !d.is_cpu()) || !matches!(opts.dtype, DTypeChoice::Auto | DTypeChoice::F32) {
                return Err(EngineError::InvalidArgument(format!(
                    "--quantize {} runs herd's CPU kernels: use it with --devices cpu and --dtype auto or f32",
                    q.name()
                )));
            }
        }
        let started = std::time::Instant::now();
        let loaded = if path.is_dir() {
            open_hf(path, resolve_dtype(opts.dtype, device)?, opts.quantize)?
        } else {
            open_gguf(path, opts.dtype, device)?
        };
        let Loaded { cfg, weights, tokenizer, mut eos_ids, model_template, bos_token, eos_token } = loaded;
        eos_ids.sort_unstable();
        eos_ids.dedup();
        if tokenizer.vocab_size() > cfg.vocab_size {
            tracing::warn!(
                "tokenizer has {} tokens but the model only {}; prompts using the extra ids will be rejected",
                tokenizer.vocab_size(),
                cfg.vocab_size
            );
        }
        let model =
            Ranks::load(&cfg, &weights, &opts.devices, (opts.threads, opts.tensor_attention), &opts.kv, progress)?;
        let (template, template_source) =
            ChatTemplate::choose(opts.chat_template.as_deref(), path, model_template, &bos_token, &eos_token)?;
        tracing::info!(
            model = %path.display(),
            layers = cfg.num_layers,
            context = cfg.context_length,
            tp = opts.devices.len(),
            template = template.name(),
            load_seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            kv_blocks = model.kv_stats().total,
            kv_block_size = opts.kv.block_size,
            prefix_caching = opts.kv.prefix_caching,
            "model loaded"
        );
        Ok(Self {
            model,
            tokenizer,
            template,
            template_source,
            eos_ids,
            path: path.clone(),
            grammars: Default::default(),
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Tokens one sequence may hold.
    pub fn context_length(&self) -> usize {
        self.config().context_length
    }

    /// The KV cache's blocks: in use, cached and in all, and the prefixes found in it.
    pub fn kv_stats(&self) -> KvStats {
        self.model.kv_stats()
    }

    /// Bytes one KV block takes over all ranks.
    pub fn kv_block_bytes(&self) -> usize {
        self.model.kv_block_bytes()
    }

    /// The short hashes of the KV cache's full blocks, and the version of the pool they are
    /// current for (`kv_stats().version`).
    pub fn kv_hashes(&self) -> (u64, Vec<u64>) {
        self.model.kv_hashes()
    }

    /// New KV blocks `seq` needs to run what it has not run yet, after taking what the cache
    /// holds of it; [`Engine::step_batch`] takes them when it runs.
    pub fn blocks_to_admit(&self, seq: &mut Sequence) -> usize {
        self.reuse_prefix(seq);
        seq.cache.blocks_needed(seq.context.len() - seq.cache.len())
    }

    /// Tensor-parallel ranks the model is split over.
    pub fn tp_size(&self) -> usize {
        self.model.world_size()
    }

    /// The model itself, for callers that drive forward passes directly.
    pub fn model(&self) -> &Ranks {
        &self.model
    }

    /// The checkpoint this engine was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template in use and why it was chosen.
    pub fn template(&self) -> (&ChatTemplate, &TemplateSource) {
        (&self.template, &self.template_source)
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The prompt ids for a conversation, ready for the assistant's answer. Only the template
    /// adds special tokens: message text that spells one (`<|im_end|><|im_start|>system`, a
    /// forged turn) is encoded as the text it is.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        Ok(herd_prompt::encode_chat(&self.tokenizer, &self.template, messages)?)
    }

    /// f32 logits `(n, vocab)` for every position of `ids`, from an empty cache.
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor> {
        self.check_ids(ids)?;
        let mut cache = self.model.new_cache();
        self.model.forward(ids, &mut cache, true)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(EngineError::InvalidArgument("the prompt is empty".into()));
        }
        let vocab = self.config().vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => {
                Err(EngineError::InvalidArgument(format!("token id {id} is outside the vocabulary of {vocab}")))
            }
            None => Ok(()),
        }
    }

    /// Refuses prompt text of `bytes` that cannot fit the context however it tokenizes (no
    /// token spans more than [`MAX_BYTES_PER_TOKEN`] bytes), so that an over-long prompt, sent
    /// once per choice, is refused without being tokenized.
    pub fn check_prompt_bytes(&self, bytes: usize) -> Result<()> {
        let context = self.context_length();
        let max_bytes = context.saturating_mul(MAX_BYTES_PER_TOKEN);
        if bytes > max_bytes {
            return Err(EngineError::PromptTooManyBytes { bytes, context, max_bytes });
        }
        Ok(())
    }

    /// Checks a request against the context and parameter limits; returns max_tokens to use.
    pub fn validate(&self, prompt_len: usize, params: &GenerationParams) -> Result<usize> {
        params.sampling.validate()?;
        if params.stop.len() > MAX_STOP_STRINGS {
            return Err(EngineError::InvalidArgument(format!(
                "at most {MAX_STOP_STRINGS} stop strings are allowed, got {}",
                params.stop.len()
            )));
        }
        if let Some(long) = params.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(EngineError::InvalidArgument(format!(
                "a stop string may be at most {MAX_STOP_BYTES} bytes long, got {}",
                long.len()
            )));
        }
        if params.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(EngineError::InvalidArgument(format!("top logprobs must be at most {MAX_TOP_LOGPROBS}")));
        }
        let vocab = self.config().vocab_size;
        let named = params.sampling.logit_bias.iter().map(|(id, _)| ("logit_bias", id));
        if let Some((what, id)) = params
            .stop_token_ids
            .iter()
            .map(|id| ("stop_token_ids", id))
            .chain(named)
            .find(|(_, id)| **id as usize >= vocab)
        {
            return Err(EngineError::InvalidArgument(format!(
                "{what}: token id {id} is outside the vocabulary of {vocab}"
            )));
        }
        if params.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(EngineError::InvalidArgument(format!(
                "at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {}",
                params.stop_token_ids.len()
            )));
        }
        let context = self.context_length();
        if prompt_len >= context {
            return Err(EngineError::PromptTooLong { prompt: prompt_len, context });
        }
        let max_tokens = params.max_tokens.unwrap_or(context - prompt_len);
        if max_tokens == 0 {
            return Err(EngineError::InvalidArgument("max_tokens must be at least 1".into()));
        }
        if prompt_len + max_tokens > context {
            return Err(EngineError::ContextOverflow { prompt: prompt_len, max_tokens, context });
        }
        if params.min_tokens > max_tokens {
            return Err(EngineError::InvalidArgument(format!(
                "min_tokens ({}) must be at most max_tokens ({max_tokens})",
                params.min_tokens
            )));
        }
        Ok(max_tokens)
    }

    /// Starts a generation for `prompt_ids` after checking it against the context and parameter
    /// limits; nothing runs until [`Engine::step`].
    pub fn start(&self, prompt_ids: &[u32], params: &GenerationParams) -> Result<Sequence> {
        self.check_ids(prompt_ids)?;
        let max_tokens = self.validate(prompt_ids.len(), params)?;
        let mut stops = params.stop.clone();
        stops.extend(self.template.default_stops().iter().map(|s| s.to_string()));
        let mut stop_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend(&self.eos_ids);
        }
        let grammar = match &params.constraint {
            Some(_) if params.ignore_eos => {
                return Err(EngineError::InvalidArgument("an output constraint needs EOS: drop ignore_eos".into()));
            }
            Some(c) => Some(self.grammars.matcher(c, &self.tokenizer, self.config().vocab_size, &self.eos_ids)?),
            None => None,
        };
        Ok(Sequence {
            cache: self.model.new_cache(),
            sampler: Sampler::new(params.sampling.clone()),
            detok: if params.keep_special_tokens {
                IncrementalDecoder::keeping_special_tokens()
            } else {
                IncrementalDecoder::new()
            },
            stopper: if params.include_stop_str_in_output {
                StopMatcher::new(&stops).including_stop()
            } else {
                StopMatcher::new(&stops)
            },
            stop_ids,
            grammar,
            logprobs: params.logprobs,
            max_tokens,
            min_tokens: params.min_tokens,
            prompt_len: prompt_ids.len(),
            cached_prompt: 0,
            found: 0,
            ran: false,
            computed: 0,
            context: prompt_ids.to_vec(),
            out: Vec::new(),
            text: String::new(),
            finish: None,
        })
    }

    /// Runs one forward pass of `seq` (the whole prompt on the first call) and samples one token.
    pub fn step(&self, seq: &mut Sequence) -> Result<Step> {
        match self.step_batch(&mut [seq], usize::MAX)?.pop().expect("one result per sequence")? {
            Progress::Sampled(step) => Ok(step),
            Progress::Waiting | Progress::Preempted => unreachable!("an unlimited step of one sequence samples"),
        }
    }

    /// One step of several sequences in a single batched forward pass, running at most
    /// `max_tokens` tokens in all. Each sequence runs the tokens its cache lacks (its prompt, its
    /// last sampled token, or its whole context after an eviction), after taking the blocks the
    /// cache holds of them: decoding sequences first, one token each, then prompts in order, cut
    /// into chunks that fit. A prompt that mostly repeats one an earlier sequence of the step is
    /// running waits, to share its blocks once they are written. Sequences take the KV blocks
    /// they need in order; when too few are free, the last ones give theirs up
    /// ([`Progress::Preempted`]). The outer error fails the whole step; the inner ones belong to
    /// single sequences.
    pub fn step_batch(&self, seqs: &mut [&mut Sequence], max_tokens: usize) -> Result<Vec<Result<Progress>>> {
        if let Some(done) = seqs.iter().position(|s| s.finish.is_some()) {
            return Err(EngineError::InvalidArgument(format!("sequence {done} of the step has already finished")));
        }
        for seq in seqs.iter_mut() {
            self.reuse_prefix(seq);
        }
        let n = seqs.len();
        let pending: Vec<usize> = seqs.iter().map(|s| s.context.len() - s.cache.len()).collect();
        let waits = self.waiting_for_prefixes(seqs, &pending);
        let mut take = vec![0; n];
        let mut left = max_tokens.max(1);
        for decoding in [true, false] {
            let runs = pending.iter().zip(&waits).map(|(&p, &w)| (p == 1) == decoding && !w);
            for ((t, &p), _) in take.iter_mut().zip(&pending).zip(runs).filter(|(_, run)| *run) {
                *t = p.min(left);
                left -= *t;
            }
        }
        let mut preempted = vec![false; n];
        let mut failed: Vec<Option<EngineError>> = (0..n).map(|_| None).collect();
        for i in 0..n {
            while take[i] > 0 && seqs[i].cache.prepare(take[i]).is_err() {
                let newer = (i + 1..n).rev().find(|&j| !preempted[j] && (take[j] > 0 || seqs[j].cache.blocks() > 0));
                let older_hold = (0..i).any(|j| seqs[j].cache.blocks() > 0);
                let victim = match newer {
                    Some(j) => j,
                    None if older_hold => i,
                    None => {
                        let stats = self.kv_stats();
                        let tokens = seqs[i].max_kv_tokens();
                        failed[i] = Some(EngineError::KvCacheFull { tokens, budget: stats.total * stats.block_size });
                        take[i] = 0;
                        break;
                    }
                };
                seqs[victim].evict();
                (preempted[victim], take[victim]) = (true, 0);
            }
        }
        let inputs: Vec<Vec<u32>> =
            seqs.iter().zip(&take).map(|(s, &t)| s.context[s.cache.len()..][..t].to_vec()).collect();
        let mut batch: Vec<(&[u32], &mut SeqCache)> = inputs
            .iter()
            .zip(seqs.iter_mut())
            .filter(|(i, _)| !i.is_empty())
            .map(|(i, s)| (i.as_slice(), &mut s.cache))
            .collect();
        let mut logits = if batch.is_empty() {
            Vec::new().into_iter()
        } else {
            self.model.forward_batch(&mut batch, false)?.to_vec2::<f32>()?.into_iter()
        };
        let mut results = Vec::with_capacity(n);
        for (i, seq) in seqs.iter_mut().enumerate() {
            if let Some(e) = failed[i].take() {
                results.push(Err(e));
                continue;
            }
            if preempted[i] {
                results.push(Ok(Progress::Preempted));
                continue;
            }
            if take[i] == 0 {
                results.push(Ok(Progress::Waiting));
                continue;
            }
            let row = logits.next().expect("a logits row per sequence that ran");
            seq.computed += take[i];
            if !seq.ran {
                seq.ran = true;
                self.model.count_prompt(seq.prompt_len, seq.found);
            }
            if take[i] < pending[i] {
                results.push(Ok(Progress::Waiting));
                continue;
            }
            let step = self.sample(seq, row);
            if !matches!(step, Ok(Step { finish: None, .. })) {
                // Finished (or failed): what its blocks hold stays cached for later prompts.
                seq.cache.clear();
            }
            results.push(step.map(Progress::Sampled));
        }
        Ok(results)
    }

    /// Gives a sequence that has not run yet the longest prefix of its context the cache holds,
    /// looking again each step while it waits (more may have been written since).
    fn reuse_prefix(&self, seq: &mut Sequence) {
        if seq.ran {
            return;
        }
        seq.cache.clear();
        seq.found = seq.cache.reuse_prefix(&seq.context);
        // A sequence recomputing after an eviction had its prompt counted already.
        if seq.out.is_empty() {
            seq.cached_prompt = seq.found;
        }
    }

    /// Which sequences hold their prompt back a step: those that would compute mostly what an
    /// earlier sequence of the step is computing of its prompt, and can share it once written.
    fn waiting_for_prefixes(&self, seqs: &[&mut Sequence], pending: &[usize]) -> Vec<bool> {
        let stats = self.kv_stats();
        let room = stats.total * stats.block_size;
        let mut waits = vec![false; seqs.len()];
        if !self.model.prefix_caching() {
            return waits;
        }
        for i in 0..seqs.len() {
            if seqs[i].ran || pending[i] <= 1 {
                continue;
            }
            waits[i] = (0..i).any(|j| {
                let shared = common_prefix(&seqs[i].context, &seqs[j].context);
                let gain = shared.saturating_sub(seqs[i].cache.len());
                // Running its prompt (the first time), whose blocks stay findable.
                let prompting = seqs[j].out.is_empty() && pending[j] > 0;
                !waits[j] && prompting && seqs[j].context.len() <= room && gain >= MIN_REUSE && gain * 2 >= pending[i]
            });
        }
        waits
    }

    /// Samples `seq`'s next token from its logits `row` and releases what text it can.
    fn sample(&self, seq: &mut Sequence, mut row: Vec<f32>) -> Result<Step> {
        let logprob_of = seq.logprobs.map(|n| (n, sampler::log_softmax(&row)));
        seq.sampler.apply_penalties(&mut row, &seq.context, &seq.out);
        if let Some(matcher) = &mut seq.grammar {
            // Only what the constraint allows next; EOS once it is complete.
            let allowed =
                matcher.compute_mask_or_eos().map_err(|e| EngineError::Model(format!("output constraint: {e}")))?;
            allowed.iter_unset_entries(|i| {
                if let Some(l) = row.get_mut(i) {
                    *l = f32::NEG_INFINITY;
                }
            });
        }
        if seq.out.len() < seq.min_tokens {
            let ends: Vec<(usize, f32)> =
                seq.stop_ids.iter().filter_map(|&id| row.get(id as usize).map(|&l| (id as usize, l))).collect();
            for &(id, _) in &ends {
                row[id] = f32::NEG_INFINITY;
            }
            // A constraint that allows nothing but the end wins over min_tokens.
            if !row.iter().any(|l| l.is_finite()) {
                for (id, l) in ends {
                    row[id] = l;
                }
            }
        }
        let id = seq.sampler.sample(&row);
        seq.out.push(id);
        seq.context.push(id);
        let mut complete = false;
        if let Some(matcher) = seq.grammar.as_mut().filter(|_| !seq.stop_ids.contains(&id)) {
            matcher.consume_token(id).map_err(|e| EngineError::Model(format!("output constraint: {e}")))?;
            complete = matcher.is_stopped();
        }
        let mut step = Step {
            token: None,
            text: String::new(),
            logprob: None,
            finish: None,
            cached_prompt_tokens: seq.cached_prompt,
        };
        let by_stop_string = if seq.stop_ids.contains(&id) {
            step.finish = Some(FinishReason::Stop);
            false
        } else {
            // Alternatives are decoded after the same tokens as the sampled one, before it joins them.
            let top = match &logprob_of {
                Some((n, lp)) => top_n(lp, *n)
                    .into_iter()
                    .map(|(id, logprob)| Ok(Alternative { id, logprob, text: seq.detok.peek(&self.tokenizer, id)? }))
                    .collect::<Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            let text = seq.detok.push(&self.tokenizer, id)?;
            step.logprob = logprob_of.map(|(_, lp)| TokenLogprob { logprob: lp[id as usize], text: text.clone(), top });
            // Stop strings count from the token that completes `min_tokens` on.
            let released = if seq.out.len() < seq.min_tokens {
                StopStep { emit: text, stopped: false }
            } else {
                seq.stopper.push(&text)
            };
            step.token = Some(id);
            step.text = released.emit;
            if released.stopped || complete {
                step.finish = Some(FinishReason::Stop);
            } else if seq.out.len() >= seq.max_tokens {
                step.finish = Some(FinishReason::Length);
            }
            released.stopped
        };
        // Release what the decoder and the stop matcher still hold, unless a stop string ended it.
        if step.finish.is_some() && !by_stop_string {
            let held = seq.detok.finish(&self.tokenizer)?;
            if let Some(lp) = &mut step.logprob {
                lp.text.push_str(&held);
            }
            let tail = seq.stopper.push(&held);
            step.text.push_str(&tail.emit);
            if !tail.stopped {
                step.text.push_str(&seq.stopper.finish());
            }
        }
        seq.text.push_str(&step.text);
        seq.finish = step.finish;
        Ok(step)
    }

    /// Generates an answer to `prompt_ids`, calling `on_token` as text becomes final.
    pub fn generate(
        &self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        on_token: &mut dyn FnMut(&TokenOutput),
    ) -> Result<Completion> {
        let mut seq = self.start(prompt_ids, params)?;
        loop {
            let step = self.step(&mut seq)?;
            if step.token.is_some() || !step.text.is_empty() {
                let id = step.token.unwrap_or(*seq.out.last().unwrap_or(&0));
                on_token(&TokenOutput { id, text: step.text, logprob: step.logprob });
            }
            if step.finish.is_some() {
                return Ok(seq.into_completion().expect("finished"));
            }
        }
    }
}

/// What one sequence's part of a step came to.
#[derive(Debug)]
pub enum Progress {
    /// It ran nothing, or only part of its prompt: its turn to sample comes later.
    Waiting,
    /// It gave its KV blocks up for older sequences; the step after it is resumed recomputes them.
    Preempted,
    /// It sampled a token.
    Sampled(Step),
}

/// One generation in progress: its KV cache, sampler, and the text it has released.
pub struct Sequence {
    cache: SeqCache,
    sampler: Sampler,
    detok: IncrementalDecoder,
    stopper: StopMatcher,
    stop_ids: Vec<u32>,
    /// The matcher of its output constraint, advanced token by token.
    grammar: Option<llguidance::Matcher>,
    logprobs: Option<usize>,
    max_tokens: usize,
    /// Tokens to sample before anything but `max_tokens` may end it.
    min_tokens: usize,
    prompt_len: usize,
    /// Prompt tokens found in the cache when the prompt ran.
    cached_prompt: usize,
    /// Tokens found in the cache by the latest lookup.
    found: usize,
    /// Whether it has run tokens since it started or was evicted.
    ran: bool,
    /// Tokens it has run through the model, recomputations included.
    computed: usize,
    context: Vec<u32>,
    out: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// The most tokens its KV cache can come to: the prompt and every token it may sample.
    pub fn max_kv_tokens(&self) -> usize {
        self.prompt_len + self.max_tokens
    }

    /// Tokens it has run through the model so far, recomputations included (two readings
    /// around a step give what the step computed).
    pub fn computed_tokens(&self) -> usize {
        self.computed
    }

    /// Frees the KV cache; the next step recomputes it from the prompt and the tokens sampled
    /// so far, and generation continues where it stopped.
    pub fn evict(&mut self) {
        self.cache.clear();
        self.ran = false;
    }

    /// Tokens in the prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_len
    }

    /// Prompt tokens found in the KV cache rather than computed.
    pub fn cached_prompt_tokens(&self) -> usize {
        self.cached_prompt
    }

    /// Tokens sampled so far (a final EOS included).
    pub fn completion_tokens(&self) -> usize {
        self.out.len()
    }

    /// Why it ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The finished generation; `None` while it is still running.
    pub fn into_completion(self) -> Option<Completion> {
        Some(Completion {
            finish_reason: self.finish?,
            text: self.text,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.out.len(),
            token_ids: self.out,
        })
    }
}

/// What one [`Engine::step`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The sampled token, unless it was a stop token.
    pub token: Option<u32>,
    /// Text released by this step (may be empty while a character or stop string is pending).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    /// Set on the last step.
    pub finish: Option<FinishReason>,
    /// Prompt tokens of its sequence found in the KV cache.
    pub cached_prompt_tokens: usize,
}

fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logprobs.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    idx.truncate(n);
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx
}
