//! GPU ranks: NCCL through cudarc, one rank per GPU, collectives queued on the stream candle
//! uses for that GPU so they order with the model's kernels without extra synchronisation.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id as RawId, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{Communicator, Shard};
use crate::engine::error::{EngineError, Result};

/// The unique id every rank of one NCCL group joins with.
#[derive(Clone, Copy)]
pub struct Id(RawId);

impl Id {
    /// A fresh id for a group of `world` ranks in this process.
    pub fn new(world: usize) -> Result<Self> {
        RawId::new()
            .map(Id)
            .map_err(|e| EngineError::Model(format!("NCCL: cannot create a group of {world} ranks: {e:?}")))
    }
}

/// One GPU rank's NCCL communicator.
pub struct NcclComm {
    comm: Comm,
}

impl NcclComm {
    /// Joins the group; blocks until every rank has called this.
    pub fn connect(id: &Id, shard: Shard, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(EngineError::InvalidArgument("NCCL ranks need CUDA devices".into()));
        };
        let comm = Comm::from_rank(dev.cuda_stream(), shard.rank, shard.world, id.0).map_err(|e| {
            EngineError::Model(format!("NCCL: rank {} of {} could not join: {e:?}", shard.rank, shard.world))
        })?;
        Ok(Self { comm })
    }
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL {what} failed: {e:?}"))
}

#[derive(Clone, Copy)]
enum Kind {
    Sum,
    Gather,
}

struct Collective<'a> {
    comm: &'a Comm,
    kind: Kind,
}

impl Collective<'_> {
    /// Runs the collective on elements `start..end` of `s`; returns `world·n` values when gathering.
    fn run<T: CudaDType + DeviceRepr + NcclType>(
        &self,
        s: &CudaStorage,
        start: usize,
        end: usize,
        dev: &CudaDevice,
    ) -> candle_core::Result<CudaStorage> {
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let n = end - start;
        match self.kind {
            Kind::Sum => {
                // SAFETY: NCCL writes every element before anything reads the buffer.
                let mut dst = unsafe { dev.alloc::<T>(n)? };
                self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(|e| nccl_error("all-reduce", e))?;
                Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
            }
            Kind::Gather => {
                // SAFETY: as above.
                let mut dst = unsafe { dev.alloc::<T>(n * self.comm.world_size())? };
                self.comm.all_gather(&src, &mut dst).map_err(|e| nccl_error("all-gather", e))?;
                Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
            }
        }
    }
}

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Sum => "herd-nccl-all-reduce",
            Kind::Gather => "herd-nccl-all-gather",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives take CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("collectives need contiguous tensors".into()))?;
        let dev = s.device();
        let out = match s.dtype() {
            DType::F32 => self.run::<f32>(s, start, end, dev)?,
            DType::F16 => self.run::<half::f16>(s, start, end, dev)?,
            DType::BF16 => self.run::<half::bf16>(s, start, end, dev)?,
            other => candle_core::bail!("NCCL collectives do not take {other:?} tensors"),
        };
        let shape = match self.kind {
            Kind::Sum => layout.shape().clone(),
            // Rank-major: (world, ..dims); `all_gather` below moves the rank axis into place.
            Kind::Gather => {
                let mut d = vec![self.comm.world_size()];
                d.extend_from_slice(layout.dims());
                Shape::from(d)
            }
        };
        Ok((out, shape))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Collective { comm: &self.comm, kind: Kind::Sum })
    }

    fn all_gather(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let stacked = x.contiguous()?.apply_op1_no_bwd(&Collective { comm: &self.comm, kind: Kind::Gather })?;
        // (world, d0.., last) -> (d0.., world, last) -> (d0.., world·last)
        let nd = x.rank();
        let order: Vec<usize> = (1..nd).chain([0, nd]).collect();
        let mut dims = x.dims().to_vec();
        if let Some(l) = dims.last_mut() {
            *l *= self.comm.world_size();
        }
        stacked.permute(order)?.contiguous()?.reshape(dims)
    }

    /// An NCCL collective cannot be interrupted from another thread here; a failed rank leaves
    /// the group unusable and the worker exits (see `Backend::recover`).
    fn abort(&self) -> bool {
        true
    }
}
