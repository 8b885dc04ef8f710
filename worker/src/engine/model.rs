//! The LLaMA forward pass of one tensor-parallel rank, with a KV cache and positions owned by
//! each sequence.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, RopeScaling};
use super::error::Result;
use super::host;
use super::kv::{BlockId, KvStore, PagedAttention, PagedRows};
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

    /// Bytes one KV block of `block_size` tokens takes on this rank.
    pub fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        let value = if self.host_attention { size_of::<f32>() } else { self.dtype.size_in_bytes() };
        self.cfg.num_layers * 2 * self.kv_heads * self.cfg.head_dim * block_size * value
    }

    /// Storage for `blocks` KV blocks of `block_size` tokens of this rank's KV heads: host
    /// vectors for the CPU's own attention loops, tensors on the device otherwise.
    pub fn new_store(&self, blocks: usize, block_size: usize) -> Result<KvStore> {
        let shape = (self.kv_heads, self.cfg.head_dim);
        KvStore::new(self.cfg.num_layers, (blocks, block_size), shape, self.host_attention, (&self.device, self.dtype))
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

    /// One step of a batch of sequences: each segment's tokens run at positions `start..`,
    /// their keys and values written to `store` in the blocks of the segment's table, after
    /// `copies` of blocks were made. The linear layers see every segment's tokens at once
    /// (weights are read once per step); attention reads each segment's blocks. Returns f32
    /// logits: `(total tokens, vocab)` when `all_positions`, else `(segments, vocab)` for each
    /// segment's last token. Every rank of the group must run the same call.
    pub fn forward(
        &self,
        comm: &dyn Communicator,
        store: &mut KvStore,
        (segs, copies): (&[Segment], &[(BlockId, BlockId)]),
        all_positions: bool,
    ) -> Result<Tensor> {
        store.copy_blocks(copies)?;
        let tokens: Vec<u32> = segs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut x = self.embed(comm, &tokens)?;
        // Per segment: offset in the batch, length and rotary tables.
        let mut parts = Vec::with_capacity(segs.len());
        let mut offset = 0;
        for seg in segs {
            let t = seg.tokens.len();
            parts.push((offset, t, self.rope.tables(seg.start, t)));
            offset += t;
        }
        let device = if self.host_attention { None } else { Some(self.device_step(store, segs, &parts)?) };
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = self.rms_norm(&x, &block.attn_norm)?;
            let [q, k, v] = block.qkv.forward(&h, &self.pool)?;
            let qkv = [&q, &k, &v];
            let attn = match &device {
                None => self.host_attention(layer, qkv, store, segs, &parts)?,
                Some(step) => self.device_attention(layer, qkv, store, step)?,
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
            let last: Vec<u32> = parts.iter().map(|(offset, t, _)| (offset + t - 1) as u32).collect();
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

    /// What tensor attention needs of a step, the same in every layer: rotary tables for each
    /// token, the rows its keys and values go to, and the segments in two groups for the paged
    /// op (decodes, then prompt chunks: on CUDA each has its kernel).
    fn device_step(&self, store: &KvStore, segs: &[Segment], parts: &[SegmentPart]) -> Result<DeviceStep> {
        let (dev, dtype) = (&self.device, self.dtype);
        let bs = store.block_size();
        let (nkv, hd) = store.shape();
        let total: usize = parts.iter().map(|(_, t, _)| t).sum();
        let half = hd / 2;
        let (cos, sin): (Vec<f32>, Vec<f32>) =
            parts.iter().flat_map(|(_, _, (c, s))| c.iter().copied().zip(s.iter().copied())).unzip();
        let cos = Tensor::from_vec(cos, (total, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (total, half), dev)?.to_dtype(dtype)?;
        let slot = |seg: &Segment, p: usize| seg.table[p / bs] * bs as u32 + (p % bs) as u32;
        let slots: Vec<u32> = segs
            .iter()
            .flat_map(|seg| (seg.start..seg.start + seg.tokens.len()).map(move |p| slot(seg, p)))
            .flat_map(|s| std::iter::repeat_n(s, nkv * hd))
            .collect();
        let slots = Tensor::from_vec(slots, (total, nkv * hd), dev)?;
        let mut groups = Vec::new();
        let mut unpad = vec![0u32; total];
        let mut base = 0;
        let scale = 1.0 / (hd as f32).sqrt();
        for decodes in [true, false] {
            let members: Vec<usize> = (0..segs.len()).filter(|&i| (parts[i].1 == 1) == decodes).collect();
            if members.is_empty() {
                continue;
            }
            let blocks = members.iter().map(|&i| (segs[i].start + parts[i].1).div_ceil(bs)).max().unwrap_or(1);
            let (mut tables, mut picked, mut rows, mut lens) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (k, &i) in members.iter().enumerate() {
                let (seg, (offset, t, _)) = (&segs[i], &parts[i]);
                let held = (seg.start + t).div_ceil(bs);
                tables.extend(seg.table[..held].iter().copied().chain(std::iter::repeat_n(0, blocks - held)));
                for r in 0..*t {
                    unpad[offset + r] = (base + picked.len()) as u32;
                    picked.push((offset + r) as u32);
                    rows.push(k as u32);
                    lens.push((seg.start + r + 1) as u32);
                }
            }
            base += picked.len();
            let n = picked.len();
            groups.push(Group {
                rows: Tensor::from_vec(picked, n, dev)?,
                op: PagedAttention { tables, max_blocks: blocks, rows, lens, scale },
            });
        }
        let unpad = Tensor::from_vec(unpad, total, dev)?;
        Ok(DeviceStep { cos, sin, slots, groups, unpad })
    }

    /// Attention with tensors on the device, for every segment of the step at once: keys and
    /// values scattered into their blocks, then the decodes and the prompt chunks each attend
    /// through the paged op (a CUDA kernel on GPUs), reading the blocks in place.
    fn device_attention(
        &self,
        layer: usize,
        [q_all, k_all, v_all]: [&Tensor; 3],
        store: &KvStore,
        step: &DeviceStep,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.cfg.head_dim);
        let total = q_all.dim(1)?;
        let heads = |a: &Tensor, n: usize| a.reshape((1, total, n, hd))?.transpose(1, 2)?.contiguous();
        let q = self.rope.apply(&heads(q_all, nh)?, &step.cos, &step.sin)?;
        let k = self.rope.apply(&heads(k_all, nkv)?, &step.cos, &step.sin)?;
        let rows = |a: &Tensor, n: usize| a.transpose(1, 2)?.contiguous()?.reshape((total, n * hd));
        let (q, k) = (rows(&q, nh)?, rows(&k, nkv)?);
        let v = v_all.reshape((total, nkv * hd))?.contiguous()?;
        let (kc, vc) = store.tensors(layer);
        let (blocks, bs) = (kc.dim(0)?, store.block_size());
        kc.reshape((blocks * bs, nkv * hd))?.scatter_set(&step.slots, &k, 0)?;
        vc.reshape((blocks * bs, nkv * hd))?.scatter_set(&step.slots, &v, 0)?;
        let mut outs = Vec::with_capacity(step.groups.len());
        for g in &step.groups {
            let n = g.op.rows.len();
            let qg = q.index_select(&g.rows, 0)?.reshape((n, nh, hd))?;
            outs.push(g.op.forward(&qg, kc, vc)?.reshape((n, nh * hd))?);
        }
        let out = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 0)? };
        Ok(out.index_select(&step.unpad, 0)?.unsqueeze(0)?)
    }

    /// Attention for f32 on the CPU, in plain loops: no per-op overhead, K/V written into
    /// their blocks in place, and each query's result computed the same way whatever else is in
    /// the step, so batched, chunked and recomputed sequences match step-by-step decoding exactly.
    fn host_attention(
        &self,
        layer: usize,
        [q_all, k_all, v_all]: [&Tensor; 3],
        store: &mut KvStore,
        segs: &[Segment],
        parts: &[SegmentPart],
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.cfg.head_dim);
        let per = nh / nkv;
        let half = hd / 2;
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut q, mut k, mut v) = (host::values(q_all)?, host::values(k_all)?, host::values(v_all)?);
        let mut units = Vec::new();
        for (index, (seg, (offset, t, (cos, sin)))) in segs.iter().zip(parts).enumerate() {
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
            let at: Vec<usize> = (0..t)
                .flat_map(|i| (0..nkv).map(move |g| (i, g)))
                .map(|(i, g)| store.host_offset(&seg.table, seg.start + i, g))
                .collect();
            let (kc, vc) = store.host_mut(layer);
            for (j, &to) in at.iter().enumerate() {
                let from = (offset * nkv + j) * hd;
                kc[to..to + hd].copy_from_slice(&k[from..from + hd]);
                vc[to..to + hd].copy_from_slice(&v[from..from + hd]);
            }
            // Queries in pieces of a few rows, so that a long prompt still spreads over the pool.
            for start in (0..t).step_by(QUERY_PIECE) {
                let rows = start..t.min(start + QUERY_PIECE);
                units.extend((0..nkv).map(|g| Unit {
                    seg: index,
                    offset,
                    rows: rows.clone(),
                    first: seg.start,
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
        // The scores and sums run on the pool, a (sequence, KV head, query piece) per chunk.
        let len = q.len();
        let job = Arc::new(Attention {
            q,
            kv: store.host(layer),
            tables: segs.iter().map(|s| s.table.clone()).collect(),
            units,
            heads: (nh, nkv, hd),
            block_size: store.block_size(),
            scale,
            out: Results::new_f32(len),
            llama_cpp: self.llama_cpp,
        });
        let chunks = job.units.len();
        let run = job.clone();
        self.pool.run(chunks, Arc::new(move |u| run.unit(u)));
        // A helper still finishing a chunk it was beaten to holds the job: copy the output then.
        let out = match Arc::try_unwrap(job) {
            Ok(job) => job.out.into_f32_vec(),
            Err(job) => job.out.to_f32_vec(),
        };
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

/// Host attention's parallel part: rotated queries, the layer's keys and values with each
/// segment's block table, the output.
struct Attention {
    q: Vec<f32>,
    kv: (Arc<Vec<f32>>, Arc<Vec<f32>>),
    tables: Vec<Arc<[BlockId]>>,
    units: Vec<Unit>,
    /// Query heads, KV heads and head size.
    heads: (usize, usize, usize),
    block_size: usize,
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
        let paged = |data| PagedRows {
            data,
            table: &self.tables[seg],
            head: heads.start / (nh / nkv),
            heads: nkv,
            block_size: self.block_size,
            dim: hd,
        };
        let (kc, vc) = (paged(&self.kv.0[..]), paged(&self.kv.1[..]));
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
            for kj in kc.rows(seen) {
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
            for (j, vj) in vc.rows(seen).enumerate() {
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

/// A segment's offset in the step, its length and its rotary tables.
type SegmentPart = (usize, usize, (Vec<f32>, Vec<f32>));

/// A group of segments for tensor attention: the step's rows of its queries, and the paged
/// op they attend through.
struct Group {
    rows: Tensor,
    op: PagedAttention,
}

/// [`Llama::device_step`]'s tensors: rotary tables `(tokens, head_dim/2)`, each token's row in
/// the blocks `(tokens, kv heads * head_dim)` (repeated for a scatter), the groups, and each
/// token's row in the groups' outputs laid end to end.
struct DeviceStep {
    cos: Tensor,
    sin: Tensor,
    slots: Tensor,
    groups: Vec<Group>,
    unpad: Tensor,
}

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
#[derive(Debug, Clone)]
pub struct Segment {
    /// The tokens to run (the whole prompt first, then one token per step).
    pub tokens: Arc<[u32]>,
    /// The position of the first of them (tokens already in the cache).
    pub start: usize,
    /// The blocks its positions `0..start + tokens.len()` are in.
    pub table: Arc<[BlockId]>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Blocks of 16 rows, the sequence's 45 positions in blocks 3, 0 and 2 of 4.
        let (nh, nkv, first, t, bs) = (6, 2, 40, 5, 16);
        let rand = |n: usize| Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let q = rand(t * nh * hd);
        let kv = (Arc::new(rand(4 * nkv * bs * hd)), Arc::new(rand(4 * nkv * bs * hd)));
        let table: Arc<[BlockId]> = Arc::from([3, 0, 2].as_slice());
        // Runs units of `per` query heads each through `f`; returns the output's bits.
        let run = |per: usize, f: &dyn Fn(&Attention, usize)| {
            let units =
                (0..nh / per).map(|u| Unit { seg: 0, offset: 0, rows: 0..t, first, heads: u * per..(u + 1) * per });
            let out = Results::new_f32(q.len());
            let a = Attention {
                q: q.clone(),
                kv: kv.clone(),
                tables: vec![table.clone()],
                units: units.collect(),
                heads: (nh, nkv, hd),
                block_size: bs,
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
    fn linear_scaling_divides_positions() {
        for llama_cpp in [false, true] {
            let plain =
                Rope { head_dim: 4, theta: 10_000.0, scaling: RopeScaling::None, interleaved: llama_cpp, llama_cpp };
            let linear = Rope { scaling: RopeScaling::Linear { factor: 4.0 }, ..plain.clone() };
            assert_eq!(plain.tables(1, 1), linear.tables(4, 1), "llama.cpp's arithmetic: {llama_cpp}");
        }
    }
}
