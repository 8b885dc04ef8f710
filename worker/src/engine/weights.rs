//! Checkpoint files: find them, read tensors by logical name, check shapes against the config.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};

use super::error::{EngineError, Result, candle_message};
use super::pool::ComputePool;
use super::quant::{Kernels, QuantMatrix, Sums};

/// A weight matrix applied as `x @ W^T`, kept quantized or dense.
#[derive(Debug)]
pub enum Linear {
    /// A dense `(out, in)` matrix.
    Dense(Tensor),
    /// A GGUF block-quantized matrix on a GPU: candle's quantized matmul.
    Quant(QMatMul),
    /// A GGUF block-quantized matrix on the CPU: herd's kernels, summing rows in llama.cpp's
    /// order, except `summed` layers (split by input columns over ranks), which sum exactly and
    /// answer in f64, so that the ranks' sums add up to the same result whatever the split.
    Blocks { m: QuantMatrix, summed: bool },
}

impl Linear {
    /// Applies the layer to `x` of shape `(.., in)`, computing on `pool` where it can; summed
    /// `Blocks` layers answer in f64.
    pub fn forward(&self, x: &Tensor, pool: &ComputePool) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => x.broadcast_matmul(&w.t()?),
            Self::Quant(q) => q.forward(x),
            Self::Blocks { m, summed } => m.forward(x, pool, if *summed { DType::F64 } else { DType::F32 }),
        }
    }
}

/// The token embedding table: dense, or kept in the file's block encoding on the CPU, where
/// only the rows a step looks up are dequantized (a 7B model's f32 table would add about a
/// fifth to its quantized size).
#[derive(Debug)]
pub enum Embedding {
    /// A dense `(vocab, hidden)` table in the engine dtype.
    Dense(Tensor),
    /// GGUF blocks, `row_bytes` per vocabulary row of `cols` values.
    Blocks { dtype: GgmlDType, bytes: Vec<u8>, row_bytes: usize, cols: usize, out: DType },
}

impl Embedding {
    /// The rows of `ids`, `(ids.len(), hidden)`; ids must be below the table's row count.
    pub fn lookup(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(t) => t.index_select(&Tensor::new(ids, device)?, 0),
            Self::Blocks { dtype, bytes, row_bytes, cols, out } => {
                let mut picked = Vec::with_capacity(ids.len() * row_bytes);
                for &id in ids {
                    let at = id as usize * row_bytes;
                    let row = bytes.get(at..at + row_bytes).ok_or_else(|| {
                        candle_core::Error::Msg(format!("token id {id} is outside the embedding table"))
                    })?;
                    picked.extend_from_slice(row);
                }
                let q = ggml_file::qtensor_from_ggml(*dtype, &picked, vec![ids.len(), *cols], device)?;
                q.dequantize(device)?.to_dtype(*out)
            }
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

/// Which part of a 2-D weight a tensor-parallel rank reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// Output rows (heads, intermediate units, vocabulary entries).
    Rows(Range<usize>),
    /// Input columns.
    Cols(Range<usize>),
}

impl Part {
    /// The shape of this part of a tensor of shape `full`.
    fn shape(&self, full: &[usize]) -> Vec<usize> {
        match (self, full) {
            (Self::Rows(r), [_, c]) => vec![r.len(), *c],
            (Self::Cols(c), [r, _]) => vec![*r, c.len()],
            _ => full.to_vec(),
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
    /// Tensors are read with positioned reads, so a rank reads only its slice.
    Gguf {
        content: gguf_file::Content,
        file: File,
        mode: GgufMode,
    },
    Safetensors {
        st: MmapedSafetensors,
        file_of: HashMap<String, PathBuf>,
    },
    Pth {
        files: Vec<(PathBuf, candle_core::pickle::PthTensors)>,
        file_of: HashMap<String, usize>,
    },
}

/// An opened checkpoint: reads tensors (or a rank's part of them) by role, converted to the
/// engine's dtype, onto the device asked for.
pub struct Weights {
    store: Store,
    /// The file or directory the user named, for error messages.
    path: PathBuf,
    dtype: DType,
    /// `--quantize`: HF matrices become blocks as they are read, on the CPU.
    quantize: Option<HfQuantize>,
}

/// How `--quantize` reads an HF checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HfQuantize {
    /// The block format asked for.
    pub dtype: GgmlDType,
    /// The model's head size: q and k rows are permuted per head into GGUF's layout, so that
    /// the model runs exactly as from a GGUF file (llama.cpp's interleaved RoPE).
    pub head_dim: usize,
}

/// Rows of a q or k projection, whole heads of `head_dim`, permuted as llama.cpp's converter
/// permutes them for its interleaved RoPE: each head's two halves interleaved.
fn permute_for_interleaved_rope(t: &Tensor, head_dim: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    t.reshape((rows / head_dim, 2, head_dim / 2, cols))?.transpose(1, 2)?.reshape((rows, cols))
}

/// Quantizes an f32 `(rows, cols)` matrix to GGUF blocks of `dtype` (Q8_0, Q4_0 or Q4_K), rows
/// spread over the cores and read in place; `None` when its rows do not fill the format's blocks.
fn quantize_blocks(t: &Tensor, dtype: GgmlDType) -> candle_core::Result<Option<Vec<u8>>> {
    use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4K, BlockQ8_0};
    let (rows, cols) = t.dims2()?;
    if !cols.is_multiple_of(dtype.block_size()) {
        return Ok(None);
    }
    super::host::with_values(t, |values| match dtype {
        GgmlDType::Q8_0 => Ok(Some(quantize_rows::<BlockQ8_0>(values, rows, cols))),
        GgmlDType::Q4_0 => Ok(Some(quantize_rows::<BlockQ4_0>(values, rows, cols))),
        GgmlDType::Q4K => Ok(Some(quantize_rows::<BlockQ4K>(values, rows, cols))),
        other => Err(candle_core::Error::Msg(format!("--quantize does not make {other:?}"))),
    })?
}

/// `rows` rows of `cols` values quantized to blocks of `T` on all cores, as GGUF's bytes.
fn quantize_rows<T: candle_core::quantized::k_quants::GgmlType>(values: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    let per_row = cols / T::BLCK_SIZE;
    let mut blocks = vec![T::zeros(); rows * per_row];
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (x, out) in values.chunks(per * cols).zip(blocks.chunks_mut(per * per_row)) {
            s.spawn(move || T::from_float(x, out));
        }
    });
    // SAFETY: candle's block types are #[repr(C)] plain data laid out as GGUF's blocks; the
    // bytes are copied out while `blocks` is alive.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), blocks.len() * size_of::<T>()) }.to_vec()
}

/// The format `--quantize` gives a matrix of `cols` columns: the one asked for, or Q8_0 where a
/// K-quant's 256-value super-blocks do not fit the rows (as llama.cpp's quantizer falls back).
fn quantize_format(asked: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(asked.block_size()) { asked } else { GgmlDType::Q8_0 }
}

/// Drops a mapped byte range's pages from this process's memory once it has been copied (the
/// kernel reads them from the file again if they are touched), so that quantizing a checkpoint
/// as it is read never holds the whole file in memory.
fn release_pages(bytes: &[u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end > start {
        // SAFETY: the range lies inside a read-only file mapping that herd never writes; dropping
        // its pages only makes later reads fault them in from the file again, unchanged.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
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
    /// Opens the weight files of an HF checkpoint directory; with `quantize`, matrices read on
    /// the CPU are quantized to that block format.
    pub fn open_hf(dir: &Path, dtype: DType, quantize: Option<HfQuantize>) -> Result<Self> {
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
        Ok(Self { store, path: dir.to_path_buf(), dtype, quantize })
    }

    /// Opens a GGUF file whose metadata has already been read.
    pub fn open_gguf(path: &Path, content: gguf_file::Content, mode: GgufMode, dtype: DType) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::checkpoint(path, e))?;
        Ok(Self { store: Store::Gguf { content, file, mode }, path: path.to_path_buf(), dtype, quantize: None })
    }

    /// True for GGUF files, whose q/k rows are permuted for interleaved RoPE.
    pub fn is_gguf(&self) -> bool {
        matches!(self.store, Store::Gguf { .. })
    }

    /// Whether q/k rows come in GGUF's layout, for interleaved RoPE: GGUF files, and HF
    /// checkpoints quantized as they are read.
    pub fn interleaved_rope(&self) -> bool {
        self.is_gguf() || self.quantize.is_some()
    }

    /// Under `--quantize`, a matrix read from an HF checkpoint as f32, q/k rows permuted into
    /// GGUF's layout; and the block format it gets (Q8_0 where K-quant super-blocks do not fit).
    fn hf_matrix(
        &self,
        q: HfQuantize,
        w: WeightName,
        shape: &[usize],
        part: Part,
        device: &Device,
    ) -> Result<(Tensor, GgmlDType)> {
        let t = self.dense(w, shape, part, device)?;
        let t = match w {
            WeightName::Layer(_, LayerPart::Q | LayerPart::K) => permute_for_interleaved_rope(&t, q.head_dim)?,
            _ => t,
        };
        let dtype = quantize_format(q.dtype, t.dims().last().copied().unwrap_or(0));
        Ok((t, dtype))
    }

    /// Whether `w` stays block-quantized (a GGUF file under `--dtype auto`, in a block format, or
    /// an HF matrix under `--quantize`).
    pub fn block_quantized(&self, w: WeightName) -> bool {
        if self.quantize.is_some() {
            return !matches!(
                w,
                WeightName::FinalNorm | WeightName::Layer(_, LayerPart::AttnNorm | LayerPart::FfnNorm)
            );
        }
        let Store::Gguf { content, mode: GgufMode::Quantized, .. } = &self.store else { return false };
        content
            .tensor_infos
            .get(&w.gguf())
            .is_some_and(|i| !matches!(i.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
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

    fn read_error(&self, name: &str, e: impl std::fmt::Display) -> EngineError {
        EngineError::checkpoint(self.file_for(name), format!("cannot read tensor {name}: {e}"))
    }

    /// The bytes of `part` of a GGUF tensor, still in its file encoding, and that encoding.
    /// Column parts must fall on the encoding's block boundaries.
    fn gguf_bytes(&self, name: &str, want: &[usize], part: &Part) -> Result<(GgmlDType, Vec<u8>)> {
        let Store::Gguf { content, file, .. } = &self.store else {
            unreachable!("gguf_bytes is only called on GGUF stores")
        };
        let info = content.tensor_infos.get(name).ok_or_else(|| self.missing(name))?;
        self.check_shape(name, info.shape.dims(), want)?;
        let dtype = info.ggml_dtype;
        let (block, block_bytes) = (dtype.block_size(), dtype.type_size());
        let cols = *want.last().unwrap_or(&1);
        if !cols.is_multiple_of(block) {
            return Err(self.read_error(name, format!("rows of {cols} values do not fill {dtype:?} blocks of {block}")));
        }
        let row_bytes = cols / block * block_bytes;
        let rows = want.iter().rev().skip(1).product::<usize>();
        let base = content.tensor_data_offset + info.offset;
        let read = |offset: usize, buf: &mut [u8]| {
            file.read_exact_at(buf, base + offset as u64).map_err(|e| self.read_error(name, e))
        };
        let bytes = match part {
            Part::Whole | Part::Rows(_) => {
                let r = match part {
                    Part::Rows(r) => r.clone(),
                    _ => 0..rows,
                };
                let mut buf = vec![0u8; r.len() * row_bytes];
                read(r.start * row_bytes, &mut buf)?;
                buf
            }
            Part::Cols(c) => {
                if !c.start.is_multiple_of(block) || !c.end.is_multiple_of(block) {
                    return Err(EngineError::InvalidArgument(format!(
                        "tensor {name} is {dtype:?}, stored in blocks of {block} values; this rank's columns \
                         {}..{} of {cols} do not fall on block boundaries, so it cannot be split this way \
                         (choose a --tp that splits {cols} into multiples of {block}, or load with --dtype f32)",
                        c.start, c.end
                    )));
                }
                let part_bytes = c.len() / block * block_bytes;
                let mut buf = vec![0u8; rows * part_bytes];
                for (row, out) in buf.chunks_exact_mut(part_bytes.max(1)).enumerate() {
                    read(row * row_bytes + c.start / block * block_bytes, out)?;
                }
                buf
            }
        };
        Ok((dtype, bytes))
    }

    /// `part` of a GGUF tensor as a quantized tensor on `device`.
    fn gguf_part(&self, name: &str, want: &[usize], part: &Part, device: &Device) -> Result<QTensor> {
        let (dtype, bytes) = self.gguf_bytes(name, want, part)?;
        self.qtensor(name, dtype, &bytes, want, part, device)
    }

    /// Bytes read by [`Weights::gguf_bytes`] as a quantized tensor on `device`.
    fn qtensor(
        &self,
        name: &str,
        dtype: GgmlDType,
        bytes: &[u8],
        want: &[usize],
        part: &Part,
        device: &Device,
    ) -> Result<QTensor> {
        ggml_file::qtensor_from_ggml(dtype, bytes, part.shape(want), device)
            .map_err(|e| self.read_error(name, candle_message(&e)))
    }

    /// `part` of a safetensors tensor: only the bytes of that part are read from the mapping.
    fn safetensors_part(
        &self,
        st: &MmapedSafetensors,
        name: &str,
        want: &[usize],
        part: &Part,
        device: &Device,
    ) -> Result<Tensor> {
        let view = st.get(name).map_err(|_| self.missing(name))?;
        self.check_shape(name, view.shape(), want)?;
        let dtype = DType::try_from(view.dtype()).map_err(|e| self.read_error(name, candle_message(&e)))?;
        let es = dtype.size_in_bytes();
        let data = view.data();
        let cols = *want.last().unwrap_or(&1);
        let bytes: Cow<[u8]> = match part {
            Part::Whole => Cow::Borrowed(data),
            Part::Rows(r) => Cow::Borrowed(&data[r.start * cols * es..r.end * cols * es]),
            Part::Cols(c) => Cow::Owned(
                data.chunks_exact(cols * es).flat_map(|row| &row[c.start * es..c.end * es]).copied().collect(),
            ),
        };
        let t = Tensor::from_raw_buffer(&bytes, dtype, &part.shape(want), device)
            .map_err(|e| self.read_error(name, candle_message(&e)))?;
        if self.quantize.is_some() {
            release_pages(data);
        }
        Ok(t)
    }

    /// A dense tensor (or `part` of one) of full shape `shape`, in the engine dtype.
    pub fn dense(&self, w: WeightName, shape: &[usize], part: Part, device: &Device) -> Result<Tensor> {
        let t = match &self.store {
            Store::Gguf { .. } => {
                let name = w.gguf();
                // Column parts may split quantization blocks: they are cut after dequantizing.
                let (read, cut) = match &part {
                    Part::Cols(c) => (Part::Whole, Some(c.clone())),
                    other => (other.clone(), None),
                };
                let t = self.gguf_part(&name, shape, &read, device)?.dequantize(device).map_err(|e| {
                    EngineError::checkpoint(&self.path, format!("cannot dequantize {name}: {}", candle_message(&e)))
                })?;
                match cut {
                    Some(c) => t.narrow(1, c.start, c.len())?.contiguous()?,
                    None => t,
                }
            }
            Store::Safetensors { st, .. } => self.safetensors_part(st, &w.hf(), shape, &part, device)?,
            Store::Pth { files, file_of } => {
                // Pickled tensors are read whole; the part is cut afterwards.
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
                let t = match &part {
                    Part::Whole => t,
                    Part::Rows(r) => t.narrow(0, r.start, r.len())?.contiguous()?,
                    Part::Cols(c) => t.narrow(1, c.start, c.len())?.contiguous()?,
                };
                t.to_device(device)?
            }
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    /// The embedding table of full shape `[vocab, hidden]` (or a rank's rows of it): kept
    /// block-quantized on the CPU when the file and mode allow it, else dense.
    pub fn embedding(&self, shape: [usize; 2], part: Part, device: &Device) -> Result<Embedding> {
        if let (Some(q), true, false) = (self.quantize, device.is_cpu(), self.is_gguf()) {
            let (t, dtype) = self.hf_matrix(q, WeightName::Embed, &shape, part, device)?;
            if let Some(bytes) = quantize_blocks(&t, dtype)? {
                let row_bytes = shape[1] / dtype.block_size() * dtype.type_size();
                return Ok(Embedding::Blocks { dtype, bytes, row_bytes, cols: shape[1], out: self.dtype });
            }
            return Ok(Embedding::Dense(t));
        }
        if device.is_cpu() && self.block_quantized(WeightName::Embed) && matches!(part, Part::Whole | Part::Rows(_)) {
            let (dtype, bytes) = self.gguf_bytes(&WeightName::Embed.gguf(), &shape, &part)?;
            let row_bytes = shape[1] / dtype.block_size() * dtype.type_size();
            return Ok(Embedding::Blocks { dtype, bytes, row_bytes, cols: shape[1], out: self.dtype });
        }
        Ok(Embedding::Dense(self.dense(WeightName::Embed, &shape, part, device)?))
    }

    /// A weight matrix of full shape `[out, in]` (or `part` of it): quantized when the file and
    /// mode allow it, else dense.
    pub fn linear(&self, w: WeightName, shape: [usize; 2], part: Part, device: &Device) -> Result<Linear> {
        self.matrix(w, shape, part, device, false)
    }

    /// Like [`Weights::linear`], for a layer whose outputs ranks add up (split by input
    /// columns): block-quantized weights on the CPU sum exactly, so that any split over ranks
    /// gives the same result. A rank holding the whole layer has nothing to add: it sums in
    /// llama.cpp's order like every other layer.
    pub fn summed_linear(&self, w: WeightName, shape: [usize; 2], part: Part, device: &Device) -> Result<Linear> {
        let summed = part != Part::Whole;
        self.matrix(w, shape, part, device, summed)
    }

    /// Layers that read the same input and are split by rows, as one matrix with their rows one
    /// after another, and each layer's outputs; `None` unless they are block-quantized alike for
    /// herd's CPU kernels. One matrix quantizes the input and meets the threads once, not once
    /// per layer.
    pub fn fused_linear(
        &self,
        layers: &[(WeightName, [usize; 2], Part)],
        device: &Device,
    ) -> Result<Option<(Linear, Vec<usize>)>> {
        if let (Some(q), true, false) = (self.quantize, device.is_cpu(), self.is_gguf()) {
            let inp = layers[0].2.shape(&layers[0].1)[1];
            let dtype = quantize_format(q.dtype, inp);
            let (mut bytes, mut outs) = (Vec::new(), Vec::new());
            for (w, shape, part) in layers {
                let (t, _) = self.hf_matrix(q, *w, shape, part.clone(), device)?;
                let Some(b) = quantize_blocks(&t, dtype)? else { return Ok(None) };
                bytes.extend_from_slice(&b);
                outs.push(part.shape(shape)[0]);
            }
            let m = QuantMatrix::from_gguf(dtype, &bytes, [outs.iter().sum(), inp], Kernels::detect(), Sums::Llama);
            return Ok(m.map(|m| (Linear::Blocks { m, summed: false }, outs)));
        }
        let Store::Gguf { content, mode: GgufMode::Quantized, .. } = &self.store else { return Ok(None) };
        // One block-quantized format throughout, known before reading anything (else each layer
        // loads apart, and reports a missing tensor itself).
        let dtypes: Vec<_> =
            layers.iter().map(|(w, ..)| content.tensor_infos.get(&w.gguf()).map(|i| i.ggml_dtype)).collect();
        let dtype = match dtypes[..] {
            [Some(d), ..] if dtypes.iter().all(|&x| x == Some(d)) => d,
            _ => return Ok(None),
        };
        let inputs: Vec<_> = layers.iter().map(|(_, shape, part)| part.shape(shape)[1]).collect();
        if !device.is_cpu()
            || matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
            || inputs.iter().any(|&i| i != inputs[0])
        {
            return Ok(None);
        }
        let (mut bytes, mut outs) = (Vec::new(), Vec::new());
        for (w, shape, part) in layers {
            bytes.extend_from_slice(&self.gguf_bytes(&w.gguf(), shape, part)?.1);
            outs.push(part.shape(shape)[0]);
        }
        let inp = inputs[0];
        let m = QuantMatrix::from_gguf(dtype, &bytes, [outs.iter().sum(), inp], Kernels::detect(), Sums::Llama);
        Ok(m.map(|m| (Linear::Blocks { m, summed: false }, outs)))
    }

    fn matrix(&self, w: WeightName, shape: [usize; 2], part: Part, device: &Device, summed: bool) -> Result<Linear> {
        if let (Some(q), true, false) = (self.quantize, device.is_cpu(), self.is_gguf()) {
            let [out, inp] = part.shape(&shape)[..] else { unreachable!("matrices are 2-D") };
            let (t, dtype) = self.hf_matrix(q, w, &shape, part, device)?;
            let sums = if summed { Sums::Exact } else { Sums::Llama };
            if let Some(bytes) = quantize_blocks(&t, dtype)?
                && let Some(m) = QuantMatrix::from_gguf(dtype, &bytes, [out, inp], Kernels::detect(), sums)
            {
                return Ok(Linear::Blocks { m, summed });
            }
            return Ok(Linear::Dense(t));
        }
        let Store::Gguf { mode: GgufMode::Quantized, .. } = &self.store else {
            return Ok(Linear::Dense(self.dense(w, &shape, part, device)?));
        };
        let name = w.gguf();
        let (dtype, bytes) = self.gguf_bytes(&name, &shape, &part)?;
        if matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            let q = self.qtensor(&name, dtype, &bytes, &shape, &part, device)?;
            return Ok(Linear::Dense(q.dequantize(device)?.to_dtype(self.dtype)?));
        }
        if device.is_cpu() {
            let [out, inp] = part.shape(&shape)[..] else { unreachable!("matrices are 2-D") };
            let sums = if summed { Sums::Exact } else { Sums::Llama };
            if let Some(m) = QuantMatrix::from_gguf(dtype, &bytes, [out, inp], Kernels::detect(), sums) {
                return Ok(Linear::Blocks { m, summed });
            }
        }
        let q = self.qtensor(&name, dtype, &bytes, &shape, &part, device)?;
        let qm = QMatMul::from_qtensor(q)
            .map_err(|e| EngineError::checkpoint(&self.path, format!("tensor {name}: {}", candle_message(&e))))?;
        Ok(Linear::Quant(qm))
    }
}
