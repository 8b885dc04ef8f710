//! Quantized matmuls whose partial sums add up exactly across tensor-parallel ranks.
//!
//! A row-parallel layer (o_proj, down_proj) splits the dot products' input columns over the
//! ranks, and the ranks' partial sums are added by an all-reduce. In f32 that addition happens
//! in another order than the unsplit layer's, and the last-bit differences grow through the
//! next layers' 8-bit activation quantization into visibly different logits. Here each
//! quantization block's dot product is computed exactly as the unsplit layer computes it, and
//! blocks are summed in f64, where sums of these values are exact in practice; the f64 partials
//! are all-reduced, then rounded to f32 once. Split and unsplit models agree to the bit.

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::{DType, Device, Tensor};

/// A block-quantized `(out, in)` matrix applied with exact per-block accumulation.
pub struct ExactSum {
    rows: Box<dyn BlockRows>,
    out: usize,
    inp: usize,
}

impl std::fmt::Debug for ExactSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExactSum({}x{})", self.out, self.inp)
    }
}

trait BlockRows: Send + Sync {
    /// `x` is `(m, in)` row-major; returns `(m, out)` row-major.
    fn matmul(&self, x: &[f32], m: usize, out: usize) -> Vec<f64>;
}

struct Blocks<T: GgmlType> {
    data: Vec<T>,
    per_row: usize,
}

/// Blocks per `vec_dot` call: candle's Q4_1, Q5_0 and Q5_1 kernels take blocks in pairs.
fn group<T: GgmlType>() -> usize {
    match T::DTYPE {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => 2,
        _ => 1,
    }
}

impl<T: GgmlType + 'static> Blocks<T> {
    fn from_bytes(bytes: &[u8], out: usize, inp: usize) -> Option<Box<dyn BlockRows>> {
        let per_row = inp / T::BLCK_SIZE;
        let n = out * per_row;
        if !inp.is_multiple_of(T::BLCK_SIZE * group::<T>()) || bytes.len() != n * std::mem::size_of::<T>() {
            return None;
        }
        let mut data: Vec<T> = Vec::with_capacity(n);
        // SAFETY: candle's block types are #[repr(C)] structs of f16 and integer arrays, valid for
        // any bit pattern, and `bytes` holds exactly `n` of them in GGUF's layout; the copy
        // initialises all `n` elements before the length is set.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), data.as_mut_ptr().cast::<u8>(), bytes.len());
            data.set_len(n);
        }
        Some(Box::new(Self { data, per_row }))
    }
}

impl<T: GgmlType + 'static> BlockRows for Blocks<T> {
    fn matmul(&self, x: &[f32], m: usize, out: usize) -> Vec<f64> {
        let k = self.per_row * T::BLCK_SIZE;
        let mut xq = vec![T::VecDotType::zeros(); m * self.per_row];
        for (row, q) in x.chunks_exact(k).zip(xq.chunks_exact_mut(self.per_row)) {
            T::VecDotType::from_float(row, q);
        }
        let g = group::<T>();
        let mut y = vec![0f64; m * out];
        let y_addr = y.as_mut_ptr() as usize;
        // candle's own worker pool, not rayon: two pools spinning on the same cores starve each other.
        candle_core::utils::barrier_pool().execute_chunked(m * out, |items| {
            for idx in items {
                let (row, col) = (idx / out, idx % out);
                let w = &self.data[col * self.per_row..][..self.per_row];
                let xq = &xq[row * self.per_row..][..self.per_row];
                let dot: f64 = w
                    .chunks_exact(g)
                    .zip(xq.chunks_exact(g))
                    .map(|(wb, xb)| T::vec_dot(g * T::BLCK_SIZE, wb, xb) as f64)
                    .sum();
                // SAFETY: `idx < m * out`, and each index is handed to exactly one worker.
                unsafe { *(y_addr as *mut f64).add(idx) = dot };
            }
        });
        y
    }
}

impl ExactSum {
    /// Wraps raw GGUF blocks of an `(out, in)` matrix; `None` for encodings it does not cover.
    pub fn from_gguf(dtype: GgmlDType, bytes: &[u8], out: usize, inp: usize) -> Option<Self> {
        let rows = match dtype {
            GgmlDType::Q4_0 => Blocks::<BlockQ4_0>::from_bytes(bytes, out, inp),
            GgmlDType::Q4_1 => Blocks::<BlockQ4_1>::from_bytes(bytes, out, inp),
            GgmlDType::Q5_0 => Blocks::<BlockQ5_0>::from_bytes(bytes, out, inp),
            GgmlDType::Q5_1 => Blocks::<BlockQ5_1>::from_bytes(bytes, out, inp),
            GgmlDType::Q8_0 => Blocks::<BlockQ8_0>::from_bytes(bytes, out, inp),
            GgmlDType::Q2K => Blocks::<BlockQ2K>::from_bytes(bytes, out, inp),
            GgmlDType::Q3K => Blocks::<BlockQ3K>::from_bytes(bytes, out, inp),
            GgmlDType::Q4K => Blocks::<BlockQ4K>::from_bytes(bytes, out, inp),
            GgmlDType::Q5K => Blocks::<BlockQ5K>::from_bytes(bytes, out, inp),
            GgmlDType::Q6K => Blocks::<BlockQ6K>::from_bytes(bytes, out, inp),
            _ => None,
        }?;
        Some(Self { rows, out, inp })
    }

    /// `x @ W^T` for f32 `x` of shape `(.., in)` on the CPU: f64 sums of shape `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let m = x.elem_count() / self.inp;
        let flat = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = self.rows.matmul(&flat, m, self.out);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.out;
        }
        Tensor::from_vec(y, out_dims, &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;
    use candle_core::quantized::QTensor;

    /// A quantized random matrix, split by input columns into `parts`, gives partial sums that
    /// add up (in f64, in any order) to exactly the unsplit layer's output.
    #[test]
    fn split_partial_sums_add_up_to_the_whole() {
        let (out, inp) = (24, 512);
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let x: Vec<f32> = (0..2 * inp).map(|i| (i * 104_729 % 997) as f32 / 498.5 - 1.0).collect();
        let wt = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
        let xt = Tensor::from_vec(x, (2, inp), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
            let bytes_of = |t: &Tensor| QTensor::quantize(t, dtype).unwrap().data().unwrap().into_owned();
            let whole = ExactSum::from_gguf(dtype, &bytes_of(&wt), out, inp).unwrap();
            let y = whole.forward(&xt).unwrap().to_vec2::<f64>().unwrap();
            // Split in two halves of 256 columns (a whole number of blocks for every type here).
            let half = |i: usize| {
                let w = wt.narrow(1, i * 256, 256).unwrap().contiguous().unwrap();
                let part = ExactSum::from_gguf(dtype, &bytes_of(&w), out, 256).unwrap();
                let x = xt.narrow(1, i * 256, 256).unwrap().contiguous().unwrap();
                part.forward(&x).unwrap().to_vec2::<f64>().unwrap()
            };
            let (a, b) = (half(0), half(1));
            for r in 0..2 {
                for c in 0..out {
                    assert_eq!((a[r][c] + b[r][c]) as f32, y[r][c] as f32, "{dtype:?} [{r},{c}]");
                }
            }
            // And it is the same matmul candle computes, up to f32 rounding of the sum.
            let reference = candle_core::quantized::QMatMul::from_qtensor(QTensor::quantize(&wt, dtype).unwrap())
                .unwrap()
                .forward(&xt)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for r in 0..2 {
                for c in 0..out {
                    assert!((reference[r][c] - y[r][c] as f32).abs() < 1e-3, "{dtype:?} differs from candle");
                }
            }
        }
    }
}
