//! Checkpoint files: find them, read tensors by logical name, check shapes against the config.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};

use super::error::{EngineError, Result, candle_message};

/// A weight matrix applied as `x @ W^T`, kept quantized or dense.
#[derive(Debug, Clone)]
pub enum Linear {
    /// A dense `(out, in)` matrix.
    Dense(Tensor),
    /// A GGUF block-quantized matrix, multiplied without dequantizing.
    Quant(QMatMul),
}

impl Linear {
    /// Applies the layer to `x` of shape `(.., in)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => x.broadcast_matmul(&w.t()?),
            Self::Quant(q) => q.forward(x),
        }
    }
}

/// One of a LLaMA layer's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPart {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// A tensor of the model by role, independent of the file format's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightName {
    Embed,
    FinalNorm,
    LmHead,
    Layer(usize, LayerPart),
}

impl WeightName {
    fn hf(self) -> String {
        use LayerPart::*;
        match self {
            Self::Embed => "model.embed_tokens.weight".into(),
            Self::FinalNorm => "model.norm.weight".into(),
            Self::LmHead => "lm_head.weight".into(),
            Self::Layer(i, p) => {
                let part = match p {
                    AttnNorm => "input_layernorm",
                    Q => "self_attn.q_proj",
                    K => "self_attn.k_proj",
                    V => "self_attn.v_proj",
                    O => "self_attn.o_proj",
                    FfnNorm => "post_attention_layernorm",
                    Gate => "mlp.gate_proj",
                    Up => "mlp.up_proj",
                    Down => "mlp.down_proj",
                };
                format!("model.layers.{i}.{part}.weight")
            }
        }
    }

    fn gguf(self) -> String {
        use LayerPart::*;
        match self {
            Self::Embed => "token_embd.weight".into(),
            Self::FinalNorm => "output_norm.weight".into(),
            Self::LmHead => "output.weight".into(),
            Self::Layer(i, p) => {
                let part = match p {
                    AttnNorm => "attn_norm",
                    Q => "attn_q",
                    K => "attn_k",
                    V => "attn_v",
                    O => "attn_output",
                    FfnNorm => "ffn_norm",
                    Gate => "ffn_gate",
                    Up => "ffn_up",
                    Down => "ffn_down",
                };
                format!("blk.{i}.{part}.weight")
            }
        }
    }
}

/// How GGUF weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufMode {
    /// Matrices stay block-quantized (candle's quantized matmul).
    Quantized,
    /// Every tensor is dequantized at load.
    Dequantized,
}

enum Store {
    Gguf { content: gguf_file::Content, file: Mutex<BufReader<File>>, mode: GgufMode },
    Safetensors { st: MmapedSafetensors, file_of: HashMap<String, PathBuf> },
    Pth { files: Vec<(PathBuf, candle_core::pickle::PthTensors)>, file_of: HashMap<String, usize> },
}

/// An opened checkpoint: reads tensors by role, converted to the engine's dtype and device.
pub struct Weights {
    store: Store,
    /// The file or directory the user named, for error messages.
    path: PathBuf,
    device: Device,
    dtype: DType,
}

/// The weight files of an HF checkpoint directory.
enum HfFiles {
    Safetensors(Vec<PathBuf>),
    Pth(Vec<PathBuf>),
}

fn index_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| EngineError::checkpoint(index, e))?;
    let idx: Index = serde_json::from_str(&text)
        .map_err(|e| EngineError::checkpoint(index, format!("not a valid weight index: {e}")))?;
    let names: BTreeSet<&String> = idx.weight_map.values().collect();
    names
        .into_iter()
        .map(|n| {
            let p = dir.join(n);
            if p.is_file() {
                Ok(p)
            } else {
                Err(EngineError::checkpoint(&p, format!("missing shard named by {}", index.display())))
            }
        })
        .collect()
}

fn files_with_suffix(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::checkpoint(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
        .collect();
    out.sort();
    Ok(out)
}

fn find_hf_files(dir: &Path) -> Result<HfFiles> {
    let st_index = dir.join("model.safetensors.index.json");
    if st_index.is_file() {
        return Ok(HfFiles::Safetensors(index_files(dir, &st_index)?));
    }
    let st = files_with_suffix(dir, |n| n.ends_with(".safetensors"))?;
    if !st.is_empty() {
        return Ok(HfFiles::Safetensors(st));
    }
    let bin_index = dir.join("pytorch_model.bin.index.json");
    if bin_index.is_file() {
        return Ok(HfFiles::Pth(index_files(dir, &bin_index)?));
    }
    let bins = files_with_suffix(dir, |n| n.starts_with("pytorch_model") && n.ends_with(".bin"))?;
    if !bins.is_empty() {
        return Ok(HfFiles::Pth(bins));
    }
    Err(EngineError::checkpoint(dir, "no weights found (expected *.safetensors or pytorch_model*.bin files)"))
}

impl Weights {
    /// Opens the weight files of an HF checkpoint directory.
    pub fn open_hf(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let store = match find_hf_files(dir)? {
            HfFiles::Safetensors(files) => {
                let mut file_of = HashMap::new();
                for f in &files {
                    // SAFETY: the file is mapped read-only; herd does not modify checkpoints while serving.
                    let one = unsafe { MmapedSafetensors::new(f) }.map_err(|e| {
                        EngineError::checkpoint(f, format!("not a readable safetensors file: {}", candle_message(&e)))
                    })?;
                    for (name, _) in one.tensors() {
                        file_of.insert(name, f.clone());
                    }
                }
                // SAFETY: as above.
                let st = unsafe { MmapedSafetensors::multi(&files) }
                    .map_err(|e| EngineError::checkpoint(dir, candle_message(&e)))?;
                Store::Safetensors { st, file_of }
            }
            HfFiles::Pth(files) => {
                let mut opened = Vec::new();
                let mut file_of = HashMap::new();
                for f in files {
                    let t = candle_core::pickle::PthTensors::new(&f, None).map_err(|e| {
                        EngineError::checkpoint(
                            &f,
                            format!("not a readable PyTorch checkpoint: {}", candle_message(&e)),
                        )
                    })?;
                    for name in t.tensor_infos().keys() {
                        file_of.insert(name.clone(), opened.len());
                    }
                    opened.push((f, t));
                }
                Store::Pth { files: opened, file_of }
            }
        };
        Ok(Self { store, path: dir.to_path_buf(), device: device.clone(), dtype })
    }

    /// Opens a GGUF file whose metadata has already been read.
    pub fn open_gguf(
        path: &Path,
        content: gguf_file::Content,
        mode: GgufMode,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::checkpoint(path, e))?;
        Ok(Self {
            store: Store::Gguf { content, file: Mutex::new(BufReader::new(file)), mode },
            path: path.to_path_buf(),
            device: device.clone(),
            dtype,
        })
    }

    /// True for GGUF files, whose q/k rows are permuted for interleaved RoPE.
    pub fn is_gguf(&self) -> bool {
        matches!(self.store, Store::Gguf { .. })
    }

    /// The dtype dense tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the checkpoint holds this tensor.
    pub fn contains(&self, w: WeightName) -> bool {
        match &self.store {
            Store::Gguf { content, .. } => content.tensor_infos.contains_key(&w.gguf()),
            Store::Safetensors { file_of, .. } => file_of.contains_key(&w.hf()),
            Store::Pth { file_of, .. } => file_of.contains_key(&w.hf()),
        }
    }

    /// The file holding `name`, for error messages.
    fn file_for(&self, name: &str) -> PathBuf {
        match &self.store {
            Store::Gguf { .. } => self.path.clone(),
            Store::Safetensors { file_of, .. } => file_of.get(name).cloned().unwrap_or_else(|| self.path.clone()),
            Store::Pth { files, file_of } => {
                file_of.get(name).map_or_else(|| self.path.clone(), |i| files[*i].0.clone())
            }
        }
    }

    fn check_shape(&self, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got == want {
            return Ok(());
        }
        Err(EngineError::checkpoint(
            self.file_for(name),
            format!("tensor {name} has shape {got:?} but the model config implies {want:?}"),
        ))
    }

    fn missing(&self, name: &str) -> EngineError {
        EngineError::checkpoint(&self.path, format!("missing tensor {name}"))
    }

    fn gguf_qtensor(&self, name: &str, want: &[usize]) -> Result<QTensor> {
        let Store::Gguf { content, file, .. } = &self.store else {
            unreachable!("gguf_qtensor is only called on GGUF stores")
        };
        let info = content.tensor_infos.get(name).ok_or_else(|| self.missing(name))?;
        self.check_shape(name, info.shape.dims(), want)?;
        let mut reader = file.lock().unwrap_or_else(|p| p.into_inner());
        content.tensor(&mut *reader, name, &self.device).map_err(|e| {
            EngineError::checkpoint(&self.path, format!("cannot read tensor {name}: {}", candle_message(&e)))
        })
    }

    /// A dense tensor of the given shape, in the engine dtype.
    pub fn dense(&self, w: WeightName, shape: &[usize]) -> Result<Tensor> {
        let t = match &self.store {
            Store::Gguf { .. } => {
                let name = w.gguf();
                let q = self.gguf_qtensor(&name, shape)?;
                q.dequantize(&self.device).map_err(|e| {
                    EngineError::checkpoint(&self.path, format!("cannot dequantize {name}: {}", candle_message(&e)))
                })?
            }
            Store::Safetensors { st, .. } => {
                let name = w.hf();
                let view = st.get(&name).map_err(|_| self.missing(&name))?;
                self.check_shape(&name, view.shape(), shape)?;
                st.load(&name, &self.device).map_err(|e| {
                    EngineError::checkpoint(
                        self.file_for(&name),
                        format!("cannot read tensor {name}: {}", candle_message(&e)),
                    )
                })?
            }
            Store::Pth { files, file_of } => {
                let name = w.hf();
                let idx = *file_of.get(&name).ok_or_else(|| self.missing(&name))?;
                let (path, pth) = &files[idx];
                let t = pth
                    .get(&name)
                    .map_err(|e| {
                        EngineError::checkpoint(path, format!("cannot read tensor {name}: {}", candle_message(&e)))
                    })?
                    .ok_or_else(|| self.missing(&name))?;
                self.check_shape(&name, t.dims(), shape)?;
                t.to_device(&self.device)?
            }
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    /// A weight matrix `(out, in)`: quantized when the file and mode allow it, else dense.
    pub fn linear(&self, w: WeightName, out_dim: usize, in_dim: usize) -> Result<Linear> {
        if let Store::Gguf { mode: GgufMode::Quantized, .. } = &self.store {
            let name = w.gguf();
            let q = self.gguf_qtensor(&name, &[out_dim, in_dim])?;
            if !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                let qm = QMatMul::from_qtensor(q).map_err(|e| {
                    EngineError::checkpoint(&self.path, format!("tensor {name}: {}", candle_message(&e)))
                })?;
                return Ok(Linear::Quant(qm));
            }
            let dense = q.dequantize(&self.device)?.to_dtype(self.dtype)?;
            return Ok(Linear::Dense(dense));
        }
        Ok(Linear::Dense(self.dense(w, &[out_dim, in_dim])?))
    }
}
