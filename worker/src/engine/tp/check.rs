//! Side-by-side greedy decoding of two engines, to check a split (or a device) against a
//! reference: used by the tensor-parallel tests and by `examples/tp_check.rs` on GPUs.

use crate::engine::error::Result;
use crate::engine::{Engine, sampler};

/// What two engines did on one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct SideBySide {
    /// Tokens the reference picked, one per step.
    pub reference: Vec<u32>,
    /// Tokens the other engine picked; decoding stops at the first step where they differ.
    pub other: Vec<u32>,
    /// Largest absolute logit difference over all steps.
    pub max_diff: f32,
}

impl SideBySide {
    /// Both picked the same tokens at every step.
    pub fn agrees(&self) -> bool {
        self.reference == self.other
    }
}

/// Greedy-decodes up to `steps` tokens after `prompt` with both engines, one token at a time
/// through each one's own KV cache, comparing full logit rows at every step.
pub fn greedy_side_by_side(reference: &Engine, other: &Engine, prompt: &[u32], steps: usize) -> Result<SideBySide> {
    let (ma, mb) = (reference.model(), other.model());
    let (mut ca, mut cb) = (ma.new_cache(), mb.new_cache());
    let mut out = SideBySide { reference: Vec::new(), other: Vec::new(), max_diff: 0.0 };
    let mut input = prompt.to_vec();
    for _ in 0..steps {
        let la = ma.forward(&input, &mut ca, false)?.squeeze(0)?.to_vec1::<f32>()?;
        let lb = mb.forward(&input, &mut cb, false)?.squeeze(0)?.to_vec1::<f32>()?;
        let diff = la.iter().zip(&lb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        out.max_diff = out.max_diff.max(diff);
        let (ta, tb) = (sampler::argmax(&la), sampler::argmax(&lb));
        out.reference.push(ta);
        out.other.push(tb);
        if ta != tb {
            break;
        }
        input = vec![ta];
    }
    Ok(out)
}
