//! The LLaMA forward pass, with a KV cache and positions owned by each sequence.

use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, RopeScaling};
use super::error::Result;
use super::weights::{LayerPart, Linear, WeightName, Weights};

/// Rotary position embedding tables, computed for the positions a step needs.
#[derive(Debug, Clone)]
struct Rope {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    /// GGUF files permute q/k rows so that rotation pairs are adjacent (llama.cpp's layout).
    interleaved: bool,
}

impl Rope {
    /// cos and sin of shape `(n, head_dim/2)` for positions `start..start+n`.
    fn cos_sin(&self, start: usize, n: usize, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
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
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
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
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The KV cache and position of one sequence.
#[derive(Debug, Clone, Default)]
pub struct SeqCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl SeqCache {
    /// Tokens already in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward step.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A loaded LLaMA-family model.
pub struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Reads every tensor the config calls for, checking shapes; `progress(done, total)` follows along.
    pub fn load(
        cfg: &ModelConfig,
        w: &Weights,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        // Progress counts the embedding, each layer, and the head.
        let total = cfg.num_layers + 2;
        let embed = w.dense(WeightName::Embed, &[cfg.vocab_size, h])?;
        progress(1, total);
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            use LayerPart::*;
            let name = |p| WeightName::Layer(i, p);
            blocks.push(Block {
                attn_norm: w.dense(name(AttnNorm), &[h])?,
                q: w.linear(name(Q), q_out, h)?,
                k: w.linear(name(K), kv_out, h)?,
                v: w.linear(name(V), kv_out, h)?,
                o: w.linear(name(O), h, q_out)?,
                ffn_norm: w.dense(name(FfnNorm), &[h])?,
                gate: w.linear(name(Gate), inter, h)?,
                up: w.linear(name(Up), inter, h)?,
                down: w.linear(name(Down), h, inter)?,
            });
            progress(i + 2, total);
        }
        let norm = w.dense(WeightName::FinalNorm, &[h])?;
        // Tied heads reuse the embedding; GGUF files omit `output.weight` when tied.
        let tied = cfg.tie_word_embeddings || (w.is_gguf() && !w.contains(WeightName::LmHead));
        let head_name = if tied { WeightName::Embed } else { WeightName::LmHead };
        let lm_head = w.linear(head_name, cfg.vocab_size, h)?;
        progress(total, total);
        let rope = Rope { head_dim: hd, theta: cfg.rope_theta, scaling: cfg.rope_scaling, interleaved: w.is_gguf() };
        Ok(Self { cfg: cfg.clone(), embed, blocks, norm, lm_head, rope, device: device.clone(), dtype: w.dtype() })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache { layers: vec![None; self.blocks.len()], len: 0 }
    }

    /// Runs `tokens` after what `cache` holds; returns f32 logits `(n, vocab)` for every
    /// position when `all_positions`, else `(1, vocab)` for the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut SeqCache, all_positions: bool) -> Result<Tensor> {
        let t = tokens.len();
        let start = cache.len;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
        let (cos, sin) = self.rope.cos_sin(start, t, &self.device, self.dtype)?;
        let mask = if t > 1 { Some(causal_mask(start, t, &self.device, self.dtype)?) } else { None };
        let scale = 1.0 / (hd as f64).sqrt();
        for (block, slot) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &block.attn_norm, eps)?;
            let heads = |l: &Linear, n: usize| -> candle_core::Result<Tensor> {
                l.forward(&h)?.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = self.rope.apply(&heads(&block.q, nh)?, &cos, &sin)?;
            let k = self.rope.apply(&heads(&block.k, nkv)?, &cos, &sin)?;
            let v = heads(&block.v, nkv)?;
            let (k, v) = match slot.take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            };
            let total = k.dim(2)?;
            // Query heads sharing one KV head are adjacent, so grouping them avoids copying K/V.
            let qg = q.reshape((1, nkv, (nh / nkv) * t, hd))?;
            let scores = (qg.matmul(&k.t()?)? * scale)?.reshape((1, nh, t, total))?;
            let scores = match &mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((1, nkv, (nh / nkv) * t, total))?;
            let attn = probs.matmul(&v)?.reshape((1, nh, t, hd))?.transpose(1, 2)?.reshape((1, t, nh * hd))?;
            *slot = Some((k, v));
            x = (x + block.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
            let act = (block.gate.forward(&h)?.silu()? * block.up.forward(&h)?)?;
            x = (x + block.down.forward(&act)?)?;
        }
        cache.len += t;
        let x = if all_positions { x } else { x.narrow(1, t - 1, 1)? };
        let x = candle_nn::ops::rms_norm(&x.contiguous()?, &self.norm, eps)?;
        Ok(self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?)
    }
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
    fn mask_hides_future_positions_only() {
        let m = causal_mask(2, 2, &Device::Cpu, DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let plain = Rope { head_dim: 4, theta: 10_000.0, scaling: RopeScaling::None, interleaved: false };
        let linear = Rope { scaling: RopeScaling::Linear { factor: 4.0 }, ..plain.clone() };
        let (c1, _) = plain.cos_sin(1, 1, &Device::Cpu, DType::F32).unwrap();
        let (c4, _) = linear.cos_sin(4, 1, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(c1.to_vec2::<f32>().unwrap(), c4.to_vec2::<f32>().unwrap());
    }
}
