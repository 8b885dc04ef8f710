//! Reading CPU tensors' values into plain slices for herd's own loops.

use candle_core::{Result, Storage, Tensor};

/// Calls `f` with a CPU f32 tensor's values in row-major order: in place when they are
/// contiguous (the usual case), else from a copy ([`values`]).
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
        return Ok(f(&cpu.as_slice::<f32>()?[start..end]));
    }
    drop(storage);
    Ok(f(&values(t)?))
}

/// A CPU f32 tensor's values in row-major order, copied once: a view whose rows are contiguous
/// (a fused layer's part) is read row by row rather than made contiguous and then copied.
pub fn values(t: &Tensor) -> Result<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    if let (Storage::Cpu(cpu), Some((&width, lead)), Some(1)) =
        (&*storage, layout.dims().split_last(), layout.stride().last().copied())
    {
        let data = cpu.as_slice::<f32>()?;
        let strides = &layout.stride()[..lead.len()];
        let mut out = Vec::with_capacity(t.elem_count());
        for row in 0..lead.iter().product() {
            // The row's offset: its index in each leading dimension times that dimension's stride.
            let (mut rest, mut at) = (row, layout.start_offset());
            for (&dim, &stride) in lead.iter().zip(strides).rev() {
                at += rest % dim * stride;
                rest /= dim;
            }
            out.extend_from_slice(&data[at..at + width]);
        }
        return Ok(out);
    }
    drop(storage);
    t.flatten_all()?.to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn host_values_reads_views_in_row_major_order() {
        let t = Tensor::arange(0f32, 2.0 * 3.0 * 10.0, &Device::Cpu).unwrap().reshape((2, 3, 10)).unwrap();
        let views = [
            t.clone(),
            t.narrow(2, 4, 5).unwrap(),
            t.narrow(1, 1, 2).unwrap().narrow(2, 0, 3).unwrap(),
            // Rows that are not contiguous take the copying path.
            t.transpose(1, 2).unwrap(),
        ];
        for v in views {
            assert_eq!(values(&v).unwrap(), v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{:?}", v.layout());
        }
    }

    #[test]
    fn with_values_reads_in_place_or_from_a_copy_alike() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((4, 6)).unwrap();
        for v in [t.narrow(0, 1, 2).unwrap(), t.t().unwrap()] {
            let want = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(with_values(&v, <[f32]>::to_vec).unwrap(), want, "{:?}", v.layout());
        }
    }
}
