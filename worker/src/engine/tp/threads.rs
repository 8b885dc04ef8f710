//! CPU ranks: threads of one process that exchange tensors through shared memory.
//!
//! A collective publishes each rank's buffer, waits at a barrier until every rank has, computes
//! its result straight from the peers' buffers, and waits at a second barrier so that no buffer
//! is freed while a peer still reads it. The only copy is the result itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::Communicator;

/// The shared state of a group of CPU ranks.
pub struct ThreadGroup {
    world: usize,
    barrier: Mutex<BarrierState>,
    turned: Condvar,
    /// Each rank's published buffer during a collective: address and length in elements (all
    /// ranks pass the same element type).
    slots: Vec<(AtomicUsize, AtomicUsize)>,
}

#[derive(Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
    aborted: bool,
}

fn peer_failed() -> candle_core::Error {
    candle_core::Error::Msg("another tensor-parallel rank failed during this step".into())
}

impl ThreadGroup {
    /// A group of `world` ranks.
    pub fn new(world: usize) -> Self {
        Self {
            world,
            barrier: Mutex::new(BarrierState::default()),
            turned: Condvar::new(),
            slots: (0..world).map(|_| (AtomicUsize::new(0), AtomicUsize::new(0))).collect(),
        }
    }

    /// The communicator of rank `rank`.
    pub fn member(self: &Arc<Self>, rank: usize) -> ThreadComm {
        ThreadComm { rank, group: self.clone() }
    }

    fn state(&self) -> MutexGuard<'_, BarrierState> {
        self.barrier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until every rank has arrived; fails if a rank aborted first.
    fn wait(&self) -> candle_core::Result<()> {
        let mut s = self.state();
        if s.aborted {
            return Err(peer_failed());
        }
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.generation += 1;
            self.turned.notify_all();
            return Ok(());
        }
        let generation = s.generation;
        while s.generation == generation && !s.aborted {
            s = self.turned.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.generation == generation { Err(peer_failed()) } else { Ok(()) }
    }

    fn abort(&self) -> bool {
        let mut s = self.state();
        let first = !s.aborted;
        s.aborted = true;
        self.turned.notify_all();
        first
    }

    /// Clears an abort once every rank has returned from the failed step.
    pub fn reset(&self) {
        let mut s = self.state();
        s.arrived = 0;
        s.aborted = false;
    }
}

/// One CPU rank's view of its group.
pub struct ThreadComm {
    rank: usize,
    group: Arc<ThreadGroup>,
}

impl ThreadComm {
    /// Publishes `data`, runs `f` on every rank's buffer (in rank order) once all are published,
    /// and returns when no peer reads `data` any more.
    fn exchange<T, R>(&self, data: &[T], f: impl FnOnce(&[&[T]]) -> R) -> candle_core::Result<R> {
        let g = &self.group;
        let (addr, len) = &g.slots[self.rank];
        addr.store(data.as_ptr() as usize, Ordering::Relaxed);
        len.store(data.len(), Ordering::Relaxed);
        // The barrier's mutex orders the stores above before every peer's loads below.
        g.wait()?;
        let peers: Vec<&[T]> = g
            .slots
            .iter()
            .map(|(a, n)| {
                let (a, n) = (a.load(Ordering::Relaxed), n.load(Ordering::Relaxed));
                // SAFETY: every rank passed the first barrier, so each published buffer is a live
                // slice its owner holds borrowed until it passes the second barrier below, which
                // needs this rank too. `f` does not panic, so this rank always gets there.
                unsafe { std::slice::from_raw_parts(a as *const T, n) }
            })
            .collect();
        let out = f(&peers);
        g.wait()?;
        Ok(out)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Sum,
    Gather,
}

struct Collective<'a> {
    comm: &'a ThreadComm,
    kind: Kind,
}

impl Collective<'_> {
    /// The collective over `T` values; computed identically (same order) on every rank, without
    /// indexing that could panic.
    fn run<T>(&self, data: &[T], last: usize) -> candle_core::Result<Vec<T>>
    where
        T: Copy + Default + std::ops::AddAssign,
    {
        let n = data.len();
        let out = self.comm.exchange(data, |peers| {
            if peers.iter().any(|p| p.len() != n) {
                return None;
            }
            let mut out = Vec::with_capacity(n * peers.len());
            match self.kind {
                Kind::Sum => {
                    out.resize(n, T::default());
                    for p in peers {
                        for (o, v) in out.iter_mut().zip(p.iter()) {
                            *o += *v;
                        }
                    }
                }
                Kind::Gather if last > 0 => {
                    let mut rows: Vec<_> = peers.iter().map(|p| p.chunks_exact(last)).collect();
                    for _ in 0..n / last {
                        for r in rows.iter_mut() {
                            out.extend_from_slice(r.next().unwrap_or_default());
                        }
                    }
                }
                Kind::Gather => {}
            }
            Some(out)
        })?;
        out.ok_or_else(|| candle_core::Error::Msg("ranks passed tensors of different sizes".into()))
    }
}

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Sum => "herd-all-reduce",
            Kind::Gather => "herd-all-gather",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("collectives need contiguous tensors".into()))?;
        let dims = layout.dims();
        let last = dims.last().copied().unwrap_or(1);
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end], last)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[start..end], last)?),
            other => candle_core::bail!("CPU collectives take f32 or f64 tensors, not {:?}", other.dtype()),
        };
        let shape = match self.kind {
            Kind::Sum => layout.shape().clone(),
            Kind::Gather => {
                let mut d = dims.to_vec();
                if let Some(l) = d.last_mut() {
                    *l *= self.comm.group.world;
                }
                Shape::from(d)
            }
        };
        Ok((out, shape))
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Collective { comm: self, kind: Kind::Sum })
    }

    fn all_gather(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Collective { comm: self, kind: Kind::Gather })
    }

    fn abort(&self) -> bool {
        self.group.abort()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Runs `f` on every rank of a `world`-rank group, each on its own thread.
    fn on_ranks<R: Send>(world: usize, f: impl Fn(ThreadComm) -> R + Sync) -> Vec<R> {
        on_ranks_of(&Arc::new(ThreadGroup::new(world)), f)
    }

    #[test]
    fn all_reduce_sums_and_every_rank_gets_the_same_bits() {
        let out = on_ranks(3, |c| {
            let x = Tensor::new(&[[1f32 + c.rank() as f32, 0.1], [2.0, 1e-8 * c.rank() as f32]], &Device::Cpu).unwrap();
            c.all_reduce_sum(&x).unwrap().to_vec2::<f32>().unwrap()
        });
        assert_eq!(out[0][0], vec![6.0, 0.1f32 + 0.1 + 0.1]);
        assert!(out.iter().all(|o| o == &out[0]));
    }

    #[test]
    fn all_gather_concatenates_the_last_dimension_in_rank_order() {
        let out = on_ranks(2, |c| {
            let r = c.rank() as f32;
            let x = Tensor::new(&[[r, r], [10.0 + r, 10.0 + r]], &Device::Cpu).unwrap();
            c.all_gather(&x).unwrap().to_vec2::<f32>().unwrap()
        });
        assert_eq!(out[1], vec![vec![0.0, 0.0, 1.0, 1.0], vec![10.0, 10.0, 11.0, 11.0]]);
    }

    #[test]
    fn an_aborted_rank_releases_its_peers_and_reset_recovers() {
        let group = Arc::new(ThreadGroup::new(2));
        let x = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        std::thread::scope(|s| {
            let waiting = s.spawn(|| group.member(0).all_reduce_sum(&x));
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(group.member(1).abort());
            assert!(waiting.join().unwrap().is_err());
        });
        group.reset();
        let out = on_ranks_of(&group, |c| c.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(out[0], vec![2.0; 4]);
    }

    fn on_ranks_of<R: Send>(group: &Arc<ThreadGroup>, f: impl Fn(ThreadComm) -> R + Sync) -> Vec<R> {
        std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = (0..group.world).map(|r| s.spawn(move || f(group.member(r)))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }
}
