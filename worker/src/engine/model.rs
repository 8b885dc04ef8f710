//! The LLaMA forward pass of one tensor-parallel rank, with a KV cache and positions owned by
//! each sequence.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, RopeScaling};
use super::error::Result;
use super::heap;
use super::host;
use super::llamacpp;
use super::pool::{ComputePool, Results};
use super::tp::{Communicator, Shard};
use super::weights::{Embedding, LayerPart, Linear, Part, WeightName, Weights};

/// Rotary position embedding tables, computed for the positions a step needs.
#[derive(Debug, Clone)]
struct Rope {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    /// GGUF files permute q/k rows so that rotation pairs are adjacent (llama.cpp's layout).
    interleaved: bool,
    /// Angles and rotation computed as llama.cpp does ([`llamacpp::rope_cache`]).
    llama_cpp: bool,
}

impl Rope {
    /// cos and sin tables, `head_dim/2` values per position, for positions `start..start+n`.
    fn tables(&self, start: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        if self.llama_cpp {
            let freq_scale = match self.scaling {
                RopeScaling::Linear { factor } => 1.0 / factor as f32,
                _ => 1.0,
            };
            return (start..start + n)
                .flat_map(|p| llamacpp::rope_cache(p, self.head_dim, self.theta as f32, freq_scale))
                .unzip();
        }
        let half = self.head_dim / 2;
        let d = self.head_dim as f64;
        let (theta, pos_scale) = match self.scaling {
            RopeScaling::None => (self.theta, 1.0),
            RopeScaling::Linear { factor } => (self.theta, 1.0 / factor),
            RopeScaling::Dynamic { factor, original_max } => {
                let len = (start + n) as f64;
                let orig = original_max as f64;
                let theta = if len > orig {
                    self.theta * ((factor * len / orig) - (factor - 1.0)).powf(d / (d - 2.0))
                } else {
                    self.theta
                };
                (theta, 1.0)
            }
        };
        let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f64 / d)).collect();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in start..start + n {
            let p = p as f64 * pos_scale;
            for f in &inv_freq {
                let a = p * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// The tables of [`Rope::tables`] as tensors of shape `(n, head_dim/2)`.
    fn cos_sin(&self, start: usize, n: usize, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.tables(start, n);
        let half = self.head_dim / 2;
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotates one head's vector `x` in place by one position's `cos` and `sin`.
    fn rotate(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        if self.llama_cpp {
            return llamacpp::rotate_head(x, cos, sin);
        }
        let half = self.head_dim / 2;
        for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
            // Interleaved layouts pair neighbours; HF's pairs each value with the one half a head on.
            let (a, b) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * c - x1 * s;
            x[b] = x0 * s + x1 * c;
        }
    }

    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    }
}

struct Block {
    attn_norm: Tensor,
    /// q, k and v.
    qkv: Fused,
    o: Linear,
    ffn_norm: Tensor,
    /// gate and up.
    gate_up: Fused,
    down: Linear,
}

/// Layers that read the same input: one matrix where the weights allow, else each apart.
enum Fused {
    One(Linear, Vec<usize>),
    Apart(Vec<Linear>),
}

impl Fused {
    /// Loads `layers` (each split by rows), fused if [`Weights::fused_linear`] can.
    fn load(w: &Weights, layers: &[(WeightName, [usize; 2], Part)], device: &Device) -> Result<Self> {
        if let Some((m, outs)) = w.fused_linear(layers, device)? {
            return Ok(Self::One(m, outs));
        }
        let apart = layers.iter().map(|(name, shape, part)| w.linear(*name, *shape, part.clone(), device));
        Ok(Self::Apart(apart.collect::<Result<_>>()?))
    }

    /// Each layer's output for `x`.
    fn forward<const N: usize>(&self, x: &Tensor, pool: &ComputePool) -> Result<[Tensor; N]> {
        let outs: Vec<Tensor> = match self {
            Self::One(m, outs) => {
                let y = m.forward(x, pool)?;
                let starts = outs.iter().scan(0, |at, n| Some(std::mem::replace(at, *at + n)));
                starts
                    .zip(outs)
                    .map(|(at, &n)| y.narrow(candle_core::D::Minus1, at, n))
                    .collect::<candle_core::Result<_>>()?
            }
            Self::Apart(layers) => layers.iter().map(|l| l.forward(x, pool)).collect::<candle_core::Result<_>>()?,
        };
        let n = outs.len();
        Ok(outs.try_into().unwrap_or_else(|_| unreachable!("{n} layers loaded, {N} asked for")))
    }
}

/// One rank's part of one sequence's KV cache: its KV heads, for every layer. f32 models on
/// the CPU keep it in growable vectors, one per KV head, `[position][head_dim]`, appended to in
/// place; others keep tensors `(1, kv heads, positions, head_dim)`.
#[derive(Debug, Clone, Default)]
pub struct ShardCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    host: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
    /// Positions its sequence may come to (0: unknown), so that the host vectors are allocated
    /// once at their final size instead of doubling: each doubling left the old block behind as
    /// a hole that the heap reused only in part.
    expected: usize,
}

/// Positions reserved at most beyond those a step needs, so that a sequence allowed a long
/// answer does not hold address space for all of it from the start.
const RESERVE_AHEAD: usize = 1024;

impl ShardCache {
    /// An empty cache for a model of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self { layers: vec![None; layers], host: vec![Vec::new(); layers], expected: 0 }
    }

    /// Notes that its sequence may come to `positions`.
    pub fn will_hold(&mut self, positions: usize) {
        self.expected = positions;
    }

    /// A copy of the first `n` of the `len` positions it holds.
    pub fn prefix(&self, n: usize, len: usize) -> Result<Self> {
        let narrow = |t: &Tensor| t.narrow(2, 0, n)?.contiguous();
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(|(k, v)| Ok::<_, candle_core::Error>((narrow(k)?, narrow(v)?))).transpose())
            .collect::<candle_core::Result<_>>()?;
        let host = self
            .host
            .iter()
            .map(|heads| {
                let keep = |x: &Vec<f32>| x[..n * x.len().checked_div(len).unwrap_or(0)].to_vec();
                heads.iter().map(|(k, v)| (keep(k), keep(v))).collect()
            })
            .collect();
        Ok(Self { layers, host, expected: self.expected })
    }

    /// Drops every cached token and frees their memory (a preempted sequence waits without it).
    pub fn clear(&mut self) {
        heap::freed(self.bytes());
        self.layers.iter_mut().for_each(|l| *l = None);
        self.host.iter_mut().for_each(Vec::clear);
    }

    /// Bytes it holds on the host.
    fn bytes(&self) -> usize {
        let tensors = self.layers.iter().flatten().filter(|(k, _)| k.device().is_cpu());
        let tensor_bytes: usize =
            tensors.map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum();
        let host_floats: usize = self.host.iter().flatten().map(|(k, v)| k.capacity() + v.capacity()).sum();
        tensor_bytes + host_floats * size_of::<f32>()
    }
}

impl Drop for ShardCache {
    fn drop(&mut self) {
        heap::freed(self.bytes());
    }
}

/// Makes room in one head's cache vector for `more` values, `per` values a position: exactly up
/// to the `expected` positions (within [`RESERVE_AHEAD`]) while the sequence stays within them,
/// else growing by doubling.
fn reserve(v: &mut Vec<f32>, more: usize, per: usize, expected: usize) {
    let needed = v.len() + more;
    if v.capacity() >= needed {
        return;
    }
    let positions = needed.div_ceil(per);
    if expected >= positions {
        v.reserve_exact(expected.min(positions + RESERVE_AHEAD) * per - v.len());
    } else {
        v.reserve(more);
    }
}

/// One rank's shard of a LLaMA-family model (the whole model when the world size is 1).
pub struct Llama {
    cfg: ModelConfig,
    shard: Shard,
    /// Attention heads and KV heads on this rank.
    heads: usize,
    kv_heads: usize,
    embed: Embedding,
    /// Vocabulary rows this rank holds of the embedding and lm_head.
    vocab: Range<usize>,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    dtype: DType,
    /// The threads this rank's CPU kernels compute on.
    pool: ComputePool,
    /// Whether attention runs in plain loops over host memory rather than tensor ops.
    host_attention: bool,
    /// Whether the step follows llama.cpp's arithmetic ([`llamacpp`]): block-quantized weights
    /// on the CPU, where herd's results should be llama.cpp's.
    llama_cpp: bool,
    /// Whether o_proj and down_proj hold this rank's output rows rather than input columns.
    split_outputs: bool,
}

impl Llama {
    /// Reads this rank's slice of every tensor the config calls for, checking shapes;
    /// `progress(done, total)` follows along.
    pub fn load(
        cfg: &ModelConfig,
        w: &Weights,
        shard: Shard,
        device: &Device,
        (pool, tensor_attention): (ComputePool, bool),
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let whole = shard.world == 1;
        let rows = |r: Range<usize>| if whole { Part::Whole } else { Part::Rows(r) };
        let cols = |r: Range<usize>| if whole { Part::Whole } else { Part::Cols(r) };
        // Whole heads per rank: row ranges of q/k/v and column ranges of o_proj.
        let heads = shard.even(cfg.num_heads);
        let kv_heads = shard.even(cfg.num_kv_heads);
        let q_part = heads.start * hd..heads.end * hd;
        let kv_part = kv_heads.start * hd..kv_heads.end * hd;
        let ffn_part = shard.even(inter);
        let vocab = shard.chunk(cfg.vocab_size);
        let host_attention = device.is_cpu() && w.dtype() == DType::F32 && !tensor_attention;
        // llama.cpp has no dynamic rotary scaling, and its f16 matmuls need heads of 8 lanes.
        let llama_cpp = host_attention
            && w.block_quantized(WeightName::Layer(0, LayerPart::O))
            && hd.is_multiple_of(8)
            && !matches!(cfg.rope_scaling, RopeScaling::Dynamic { .. });
        // Split ranks following llama.cpp cut o_proj and down_proj by output rows (inputs
        // gathered), so that each output sums its whole row in llama.cpp's order, as one rank does.
        let split_outputs = llama_cpp && !whole;
        let row_parallel = |name, inp: usize, part: &Range<usize>| {
            if split_outputs {
                w.linear(name, [h, inp], Part::Rows(shard.chunk(h)), device)
            } else {
                w.summed_linear(name, [h, inp], cols(part.clone()), device)
            }
        };
        // Progress counts the embedding, each layer, and the head.
        let total = cfg.num_layers + 2;
        let embed = w.embedding([cfg.vocab_size, h], rows(vocab.clone()), device)?;
        progress(1, total);
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            use LayerPart::*;
            let name = |p| WeightName::Layer(i, p);
            blocks.push(Block {
                attn_norm: w.dense(name(AttnNorm), &[h], Part::Whole, device)?,
                qkv: Fused::load(
                    w,
                    &[
                        (name(Q), [q_out, h], rows(q_part.clone())),
                        (name(K), [kv_out, h], rows(kv_part.clone())),
                        (name(V), [kv_out, h], rows(kv_part.clone())),
                    ],
                    device,
                )?,
                o: row_parallel(name(O), q_out, &q_part)?,
                ffn_norm: w.dense(name(FfnNorm), &[h], Part::Whole, device)?,
                gate_up: Fused::load(
                    w,
                    &[(name(Gate), [inter, h], rows(ffn_part.clone())), (name(Up), [inter, h], rows(ffn_part.clone()))],
                    device,
                )?,
                down: row_parallel(name(Down), inter, &ffn_part)?,
            });
            progress(i + 2, total);
        }
        let norm = w.dense(WeightName::FinalNorm, &[h], Part::Whole, device)?;
        // Tied heads reuse the embedding; GGUF files omit `output.weight` when tied.
        let tied = cfg.tie_word_embeddings || (w.is_gguf() && !w.contains(WeightName::LmHead));
        let head_name = if tied { WeightName::Embed } else { WeightName::LmHead };
        let lm_head = w.linear(head_name, [cfg.vocab_size, h], rows(vocab.clone()), device)?;
        progress(total, total);
        let rope = Rope {
            head_dim: hd,
            theta: cfg.rope_theta,
            scaling: cfg.rope_scaling,
            interleaved: w.interleaved_rope(),
            llama_cpp,
        };
        Ok(Self {
            cfg: cfg.clone(),
            shard,
            heads: heads.len(),
            kv_heads: kv_heads.len(),
            embed,
            vocab,
            blocks,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            dtype: w.dtype(),
            pool,
            host_attention,
            llama_cpp,
            split_outputs,
        })
    }

    /// Embeddings of `tokens`, `(1, t, hidden)`. Split ranks look up the ids they hold, leave
    /// zero rows for the rest, and sum: exactly one rank contributes each row.
    fn embed(&self, comm: &dyn Communicator, tokens: &[u32]) -> Result<Tensor> {
        if self.shard.world == 1 {
            return Ok(self.embed.lookup(tokens, &self.device)?.unsqueeze(0)?);
        }
        let range = self.vocab.start as u32..self.vocab.end as u32;
        let local: Vec<u32> = tokens.iter().map(|&t| if range.contains(&t) { t - range.start } else { 0 }).collect();
        let keep: Vec<f32> = tokens.iter().map(|t| if range.contains(t) { 1.0 } else { 0.0 }).collect();
        let keep = Tensor::from_vec(keep, (tokens.len(), 1), &self.device)?.to_dtype(self.dtype)?;
        let rows = self.embed.lookup(&local, &self.device)?.broadcast_mul(&keep)?;
        Ok(comm.all_reduce_sum(&rows)?.unsqueeze(0)?)
    }

    /// A row-parallel layer (o_proj, down_proj) applied to this rank's part of its input. Split
    /// by input columns, the ranks' partial outputs are summed in the precision the layer
    /// produced them (f64 for exact sums); split by output rows, the inputs are gathered first
    /// and the outputs after.
    fn row_parallel(&self, comm: &dyn Communicator, layer: &Linear, x: &Tensor) -> Result<Tensor> {
        if self.split_outputs {
            let y = layer.forward(&comm.all_gather(x)?, &self.pool)?;
            return self.gather_chunks(comm, y, self.cfg.hidden_size);
        }
        let y = layer.forward(x, &self.pool)?;
        let y = if self.shard.world == 1 { y } else { comm.all_reduce_sum(&y)? };
        Ok(y.to_dtype(self.dtype)?)
    }

    /// Every rank's chunk of the last dimension ([`Shard::chunk`] of `n`) gathered: shorter last
    /// chunks are padded to the common size for the collective, and the padding cut after.
    fn gather_chunks(&self, comm: &dyn Communicator, local: Tensor, n: usize) -> Result<Tensor> {
        if self.shard.world == 1 {
            return Ok(local);
        }
        let chunk = n.div_ceil(self.shard.world);
        let last = local.rank() - 1;
        let local = match chunk - local.dim(last)? {
            0 => local,
            pad => local.pad_with_zeros(last, 0, pad)?,
        };
        Ok(comm.all_gather(&local)?.narrow(last, 0, n)?)
    }

    /// Logits `(n, vocab)` from final hidden states `(n, hidden)`: each rank computes its
    /// vocabulary rows and the slices are gathered.
    fn logits(&self, comm: &dyn Communicator, x: &Tensor) -> Result<Tensor> {
        let local = self.lm_head.forward(x, &self.pool)?;
        self.gather_chunks(comm, local, self.cfg.vocab_size)
    }

    /// One step of a batch of sequences: each segment's tokens run at positions `start..` after
    /// what its cache holds. The linear layers see every segment's tokens at once (weights are
    /// read once per step); attention runs per segment on its own cache and positions. Returns
    /// f32 logits: `(total tokens, vocab)` when `all_positions`, else `(segments, vocab)` for each
    /// segment's last token. Every rank of the group must run the same call.
    pub fn forward(&self, comm: &dyn Communicator, segs: &mut [Segment], all_positions: bool) -> Result<Tensor> {
        let tokens: Vec<u32> = segs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut x = self.embed(comm, &tokens)?;
        // Per segment: offset in the batch, length, rotary tables and causal mask (tensors for
        // the device path; the host path uses the tables as they are).
        let host = self.host_attention;
        let mut parts = Vec::with_capacity(segs.len());
        let mut offset = 0;
        for seg in segs.iter() {
            let t = seg.tokens.len();
            let tables = self.rope.tables(seg.start, t);
            let device_tables = if host {
                None
            } else {
                let (cos, sin) = self.rope.cos_sin(seg.start, t, &self.device, self.dtype)?;
                let mask = if t > 1 { Some(causal_mask(seg.start, t, &self.device, self.dtype)?) } else { None };
                Some((cos, sin, mask))
            };
            parts.push((offset, t, tables, device_tables));
            offset += t;
        }
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = self.rms_norm(&x, &block.attn_norm)?;
            let [q, k, v] = block.qkv.forward(&h, &self.pool)?;
            let qkv = [&q, &k, &v];
            let attn = if host {
                self.host_attention(layer, qkv, segs, &parts)?
            } else {
                self.device_attention(layer, qkv, segs, &parts)?
            };
            x = (x + self.row_parallel(comm, &block.o, &attn)?)?;
            let h = self.rms_norm(&x, &block.ffn_norm)?;
            let [gate, up] = block.gate_up.forward(&h, &self.pool)?;
            let act = swiglu(&self.pool, &gate, &up, self.llama_cpp)?;
            x = (x + self.row_parallel(comm, &block.down, &act)?)?;
        }
        let x = if all_positions {
            x
        } else {
            let last: Vec<u32> = parts.iter().map(|(offset, t, ..)| (offset + t - 1) as u32).collect();
            x.index_select(&Tensor::new(last, &self.device)?, 1)?
        };
        let x = self.rms_norm(&x.contiguous()?, &self.norm)?;
        Ok(self.logits(comm, &x.squeeze(0)?)?.to_dtype(DType::F32)?)
    }

    /// RMS normalization of `x`'s rows times `w`, as llama.cpp computes it where the step follows it.
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        if !self.llama_cpp {
            return Ok(candle_nn::ops::rms_norm(x, w, eps)?);
        }
        let y = llamacpp::rms_norm(&host::values(x)?, &host::values(w)?, eps);
        Ok(Tensor::from_vec(y, x.dims(), &Device::Cpu)?)
    }

    /// Attention with tensors on the device, segment by segment; the KV cache grows by
    /// concatenation.
    fn device_attention(
        &self,
        layer: usize,
        [q_all, k_all, v_all]: [&Tensor; 3],
        segs: &mut [Segment],
        parts: &[SegmentPart],
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.cfg.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(segs.len());
        for (seg, (offset, t, _, device_tables)) in segs.iter_mut().zip(parts) {
            let (offset, t) = (*offset, *t);
            let Some((cos, sin, mask)) = device_tables else { unreachable!("made for the device path") };
            let heads = |a: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                a.narrow(1, offset, t)?.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = self.rope.apply(&heads(q_all, nh)?, cos, sin)?;
            let k = self.rope.apply(&heads(k_all, nkv)?, cos, sin)?;
            let v = heads(v_all, nkv)?;
            let slot = &mut seg.cache.layers[layer];
            let (k, v) = match slot.take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            };
            let total = k.dim(2)?;
            // Query heads sharing one KV head are adjacent, so grouping them avoids copying K/V.
            let qg = q.reshape((1, nkv, (nh / nkv) * t, hd))?;
            let scores = (qg.matmul(&k.t()?)? * scale)?.reshape((1, nh, t, total))?;
            let scores = match mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((1, nkv, (nh / nkv) * t, total))?;
            outs.push(probs.matmul(&v)?.reshape((1, nh, t, hd))?.transpose(1, 2)?.reshape((1, t, nh * hd))?);
            *slot = Some((k, v));
        }
        Ok(if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 1)? })
    }

    /// Attention for f32 on the CPU, in plain loops: no per-op overhead, K/V appended to the
    /// cache in place, and each query's result computed the same way whatever else is in the
    /// step, so batched, chunked and recomputed sequences match step-by-step decoding exactly.
    fn host_attention(
        &self,
        layer: usize,
        [q_all, k_all, v_all]: [&Tensor; 3],
        segs: &mut [Segment],
        parts: &[SegmentPart],
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.cfg.head_dim);
        let per = nh / nkv;
        let half = hd / 2;
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut q, mut k, mut v) = (host::values(q_all)?, host::values(k_all)?, host::values(v_all)?);
        let mut units = Vec::new();
        for (index, (seg, (offset, t, (cos, sin), _))) in segs.iter_mut().zip(parts).enumerate() {
            let (offset, t) = (*offset, *t);
            for i in 0..t {
                let (c, s) = (&cos[i * half..][..half], &sin[i * half..][..half]);
                let row = offset + i;
                q[row * nh * hd..][..nh * hd].chunks_exact_mut(hd).for_each(|x| self.rope.rotate(x, c, s));
                k[row * nkv * hd..][..nkv * hd].chunks_exact_mut(hd).for_each(|x| self.rope.rotate(x, c, s));
            }
            if self.llama_cpp {
                // llama.cpp's KV cache holds f16, and its attention matmuls take queries in f16.
                llamacpp::round_half_any(&mut q[offset * nh * hd..][..t * nh * hd]);
                llamacpp::round_half_any(&mut k[offset * nkv * hd..][..t * nkv * hd]);
                llamacpp::round_half_any(&mut v[offset * nkv * hd..][..t * nkv * hd]);
            }
            let expected = seg.cache.expected;
            let heads = &mut seg.cache.host[layer];
            heads.resize_with(nkv, Default::default);
            for (g, (kc, vc)) in heads.iter_mut().enumerate() {
                reserve(kc, t * hd, hd, expected);
                reserve(vc, t * hd, hd, expected);
                for row in offset..offset + t {
                    let at = (row * nkv + g) * hd..(row * nkv + g + 1) * hd;
                    kc.extend_from_slice(&k[at.clone()]);
                    vc.extend_from_slice(&v[at]);
                }
            }
            let first = heads[0].0.len() / hd - t;
            // Queries in pieces of a few rows, so that a long prompt still spreads over the pool.
            for start in (0..t).step_by(QUERY_PIECE) {
                let rows = start..t.min(start + QUERY_PIECE);
                units.extend((0..nkv).map(|g| Unit {
                    seg: index,
                    offset,
                    rows: rows.clone(),
                    first,
                    heads: g * per..(g + 1) * per,
                }));
            }
        }
        // Too few units to keep every thread busy (one short sequence, few KV heads): a unit per
        // query head instead, each computed as before.
        if units.len() < self.pool.threads() && per > 1 {
            units = units
                .into_iter()
                .flat_map(|u| u.heads.clone().map(move |h| Unit { heads: h..h + 1, rows: u.rows.clone(), ..u }))
                .collect();
        }
        // The scores and sums run on the pool, a (sequence, KV head, query piece) per chunk. The job owns
        // what it reads, so this layer's caches move into it and back.
        let caches: Vec<_> = segs.iter_mut().map(|s| std::mem::take(&mut s.cache.host[layer])).collect();
        let len = q.len();
        let llama_cpp = self.llama_cpp;
        let job = Arc::new(Attention {
            q,
            caches,
            units,
            heads: (nh, nkv, hd),
            scale,
            out: Results::new_f32(len),
            llama_cpp,
        });
        let chunks = job.units.len();
        let run = job.clone();
        self.pool.run(chunks, Arc::new(move |u| run.unit(u)));
        // A helper still finishing a chunk it was beaten to holds the job: copy it then.
        let (out, caches) = match Arc::try_unwrap(job) {
            Ok(job) => (job.out.into_f32_vec(), job.caches),
            Err(job) => (job.out.to_f32_vec(), job.caches.clone()),
        };
        for (seg, c) in segs.iter_mut().zip(caches) {
            seg.cache.host[layer] = c;
        }
        Ok(Tensor::from_vec(out, q_all.dims(), &Device::Cpu)?)
    }
}

/// Values per chunk of [`Llama::swiglu`].
const SWIGLU_CHUNK: usize = 4096;

/// Query rows per chunk of host attention.
const QUERY_PIECE: usize = 16;

/// One chunk of host attention: some of a segment's queries, for some query heads of one KV group.
struct Unit {
    seg: usize,
    /// The segment's first row in the step, the unit's rows within it, and the positions cached
    /// before the segment.
    offset: usize,
    rows: Range<usize>,
    first: usize,
    heads: Range<usize>,
}

/// Host attention's parallel part: rotated queries, each segment's keys and values, the output.
struct Attention {
    q: Vec<f32>,
    caches: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
    units: Vec<Unit>,
    /// Query heads, KV heads and head size.
    heads: (usize, usize, usize),
    scale: f32,
    out: Results,
    /// Whether each head is computed as llama.cpp does ([`llamacpp::attend`]).
    llama_cpp: bool,
}

impl Attention {
    /// Computes unit `u`'s outputs the same way whatever else the step holds, with the widest
    /// vectors the CPU has: the Rust below is compiled again for AVX-512 and AVX2, which changes
    /// how many lanes each instruction holds but no result (Rust never fuses a multiply and an
    /// add on its own; llama.cpp's arithmetic fuses them explicitly, alike in every copy).
    fn unit(&self, u: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { self.unit_avx512(u) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                // SAFETY: the CPU has AVX2, FMA and F16C.
                return unsafe { self.unit_avx2(u) };
            }
        }
        self.unit_portable(u)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn unit_avx512(&self, u: usize) {
        self.unit_with::<true>(u)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unit_avx2(&self, u: usize) {
        self.unit_with::<true>(u)
    }

    /// [`Self::unit`] in the baseline instruction set.
    fn unit_portable(&self, u: usize) {
        self.unit_with::<false>(u)
    }

    /// [`Self::unit`], inlined into each compiled copy; `SIMD` copies have AVX2, FMA and F16C.
    ///
    /// The unit's heads (of one KV group) go through its keys and values together, reading them
    /// once instead of once per head. Each head's arithmetic is the same as alone.
    #[inline(always)]
    fn unit_with<const SIMD: bool>(&self, u: usize) {
        let Unit { seg, offset, ref rows, first, ref heads } = self.units[u];
        let (nh, nkv, hd) = self.heads;
        let (kc, vc) = &self.caches[seg][heads.start / (nh / nkv)];
        if self.llama_cpp {
            let (mut scratch, mut o) = (llamacpp::Scratch::default(), vec![0f32; hd]);
            for i in rows.clone() {
                for h in heads.clone() {
                    let at = ((offset + i) * nh + h) * hd;
                    llamacpp::attend::<SIMD>(
                        &self.q[at..][..hd],
                        kc,
                        vc,
                        first + i + 1,
                        self.scale,
                        &mut scratch,
                        &mut o,
                    );
                    o.iter().enumerate().for_each(|(d, &x)| self.out.set(at + d, f64::from(x)));
                }
            }
            return;
        }
        let mut scores: Vec<Vec<f32>> = heads.clone().map(|_| Vec::with_capacity(first + rows.end)).collect();
        let mut o = vec![0f32; heads.len() * hd];
        let mut sums = vec![0f32; heads.len()];
        for i in rows.clone() {
            // Query i sees positions up to its own.
            let seen = first + i + 1;
            let at = |h: usize| ((offset + i) * nh + h) * hd;
            for s in &mut scores {
                s.clear();
            }
            for j in 0..seen {
                let kj = &kc[j * hd..][..hd];
                for (s, h) in scores.iter_mut().zip(heads.clone()) {
                    s.push(dot(&self.q[at(h)..][..hd], kj) * self.scale);
                }
            }
            sums.fill(0.0);
            for (s, sum) in scores.iter_mut().zip(&mut sums) {
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for sc in s.iter_mut() {
                    *sc = (*sc - max).exp();
                    *sum += *sc;
                }
            }
            o.fill(0.0);
            for j in 0..seen {
                let vj = &vc[j * hd..][..hd];
                for (oh, s) in o.chunks_exact_mut(hd).zip(&scores) {
                    let p = s[j];
                    oh.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
                }
            }
            for ((oh, h), &sum) in o.chunks_exact(hd).zip(heads.clone()).zip(&sums) {
                for (d, x) in oh.iter().enumerate() {
                    self.out.set(at(h) + d, f64::from(*x / sum));
                }
            }
        }
    }
}

/// A segment's offset in the step, its length, its rotary tables, and (device path) the same
/// tables as tensors with its causal mask.
type SegmentPart = (usize, usize, (Vec<f32>, Vec<f32>), Option<(Tensor, Tensor, Option<Tensor>)>);

/// The feed-forward's gate, `silu(gate) * up`. On the CPU in f32 it runs on the pool: an
/// exponential per value is a few percent of a batched step. Same formula as candle's, or as
/// llama.cpp's when `llama_cpp`.
fn swiglu(pool: &ComputePool, gate: &Tensor, up: &Tensor, llama_cpp: bool) -> Result<Tensor> {
    if !gate.device().is_cpu() || gate.dtype() != DType::F32 {
        return Ok((gate.silu()? * up)?);
    }
    let inputs = Arc::new((host::values(gate)?, host::values(up)?));
    let n = inputs.0.len();
    let out = Arc::new(Results::new_f32(n));
    let (job_out, chunk) = (out.clone(), SWIGLU_CHUNK);
    pool.run(
        n.div_ceil(chunk),
        Arc::new(move |c| {
            let (g, u) = &*inputs;
            let span = c * chunk..n.min((c + 1) * chunk);
            if llama_cpp {
                let mut y = vec![0f32; span.len()];
                llamacpp::swiglu_slice(&g[span.clone()], &u[span.clone()], &mut y);
                y.iter().zip(span).for_each(|(&y, i)| job_out.set(i, f64::from(y)));
                return;
            }
            for i in span {
                let x = g[i];
                job_out.set(i, f64::from(x / (1.0 + (-x).exp()) * u[i]));
            }
        }),
    );
    Ok(Tensor::from_vec(Results::take_f32(out), gate.dims(), &Device::Cpu)?)
}

/// A dot product in eight independent lanes, which the compiler vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// One sequence's share of a batched step.
#[derive(Debug)]
pub struct Segment {
    /// The tokens to run (the whole prompt first, then one token per step).
    pub tokens: std::sync::Arc<[u32]>,
    /// The position of the first of them (tokens already in the cache).
    pub start: usize,
    pub cache: ShardCache,
}

/// `(t, start+t)` additive mask: query i sees keys up to position start+i.
fn causal_mask(start: usize, t: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let total = start + t;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..total).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_vectors_are_sized_once_for_the_expected_positions() {
        let per = 4;
        // A prompt of 3 positions in a sequence expected to reach 10: room for all 10 at once.
        let mut v = Vec::new();
        reserve(&mut v, 3 * per, per, 10);
        assert_eq!(v.capacity(), 10 * per);
        v.resize(3 * per, 0.0);
        let block = v.as_ptr();
        for _ in 3..10 {
            reserve(&mut v, per, per, 10);
            v.extend([0.0; 4]);
        }
        assert_eq!((v.as_ptr(), v.capacity()), (block, 10 * per), "never moved nor grown");
        // Past the expectation (or with none), it grows by doubling, not one position at a time.
        reserve(&mut v, per, per, 10);
        assert!(v.capacity() >= 20 * per, "{}", v.capacity());
        // A long expectation reserves only so far ahead.
        let mut long = Vec::new();
        reserve(&mut long, 2 * per, per, 1 << 20);
        assert_eq!(long.capacity(), (2 + RESERVE_AHEAD) * per);
    }

    #[test]
    fn swiglu_on_the_pool_gives_candles_bits() {
        let pool = ComputePool::new(2).unwrap();
        // Three chunks, the last one partial; large values reach exp's overflow.
        let gate = (Tensor::randn(0f32, 30.0, (1, 5, 2000), &Device::Cpu).unwrap()).contiguous().unwrap();
        let up = Tensor::randn(0f32, 1.0, (1, 5, 2000), &Device::Cpu).unwrap();
        let want = (gate.silu().unwrap() * &up).unwrap();
        let got = swiglu(&pool, &gate, &up, false).unwrap();
        assert_eq!(got.dims(), want.dims());
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(&got), bits(&want));
    }

    #[test]
    fn every_compiled_copy_of_host_attention_gives_the_same_bits() {
        // Two KV heads of three query heads each, a head size that leaves a tail after the
        // 8-lane dot product (herd's arithmetic; llama.cpp's takes whole lanes), 40 cached
        // positions and 5 new queries.
        for (hd, llama_cpp) in [(12, false), (16, true)] {
            attention_copies_agree(hd, llama_cpp);
        }
    }

    fn attention_copies_agree(hd: usize, llama_cpp: bool) {
        let (nh, nkv, first, t) = (6, 2, 40, 5);
        let rand = |n: usize| Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let q = rand(t * nh * hd);
        let caches: Vec<Vec<_>> = vec![(0..nkv).map(|_| (rand((first + t) * hd), rand((first + t) * hd))).collect()];
        // Runs units of `per` query heads each through `f`; returns the output's bits.
        let run = |per: usize, f: &dyn Fn(&Attention, usize)| {
            let units =
                (0..nh / per).map(|u| Unit { seg: 0, offset: 0, rows: 0..t, first, heads: u * per..(u + 1) * per });
            let out = Results::new_f32(q.len());
            let a = Attention {
                q: q.clone(),
                caches: caches.clone(),
                units: units.collect(),
                heads: (nh, nkv, hd),
                scale: 0.3,
                out,
                llama_cpp,
            };
            (0..a.units.len()).for_each(|u| f(&a, u));
            a.out.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let portable = run(1, &|a, u| a.unit_portable(u));
        assert_eq!(run(1, &|a, u| a.unit(u)), portable, "the CPU's widest copy");
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            // SAFETY: checked just above.
            assert_eq!(run(1, &|a, u| unsafe { a.unit_avx2(u) }), portable, "AVX2");
        }
        assert_eq!(run(3, &|a, u| a.unit(u)), portable, "a unit per KV group");
    }

    #[test]
    fn mask_hides_future_positions_only() {
        let m = causal_mask(2, 2, &Device::Cpu, DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn linear_scaling_divides_positions() {
        for llama_cpp in [false, true] {
            let plain =
                Rope { head_dim: 4, theta: 10_000.0, scaling: RopeScaling::None, interleaved: llama_cpp, llama_cpp };
            let linear = Rope { scaling: RopeScaling::Linear { factor: 4.0 }, ..plain.clone() };
            assert_eq!(plain.tables(1, 1), linear.tables(4, 1), "llama.cpp's arithmetic: {llama_cpp}");
        }
    }
}
