//! Prompts being tokenized or tokenized lately. The gateway sends each of a request's `n`
//! choices as its own call with the same prompt; they (and repeats of a prompt) share one
//! tokenization, its error included, instead of paying for it `n` times. At most one
//! tokenization per core runs at once (each needs tens of MiB for a long prompt; more would
//! not finish sooner).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use herd_ops::metrics::IntCounterVec;
use sha2::{Digest, Sha256};

use crate::WorkerError;

/// One tokenization's outcome, shareable among the calls waiting on it.
type Outcome = Result<Arc<Vec<u32>>, Arc<WorkerError>>;

/// A tokenization, running or done, that any number of calls can await.
type Pending = Shared<BoxFuture<'static, Outcome>>;

/// How many prompts are remembered; each holds at most a context of ids once done.
const REMEMBERED: usize = 16;

/// Recent tokenizations by the SHA-256 of the prompt (its input as sent).
pub struct Tokenized {
    recent: Mutex<VecDeque<([u8; 32], Pending)>>,
    running: Arc<tokio::sync::Semaphore>,
    /// Prompts by `source`: `computed` (tokenized for this call) or `shared` (another's).
    counted: IntCounterVec,
}

impl Tokenized {
    /// An empty memory that counts each prompt in `counted` and runs at most `at_once`
    /// tokenizations at a time.
    pub fn new(counted: IntCounterVec, at_once: usize) -> Self {
        Self { recent: Mutex::default(), running: Arc::new(tokio::sync::Semaphore::new(at_once.max(1))), counted }
    }

    /// The key of a prompt: the digest of its parts.
    pub fn key(parts: &[&[u8]]) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in parts {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }

    /// The ids of the prompt `key`: a running or finished tokenization of the same prompt, else
    /// `tokenize`'s, which later calls then share.
    pub async fn ids(
        &self,
        key: [u8; 32],
        tokenize: impl Future<Output = Result<Vec<u32>, WorkerError>> + Send + 'static,
    ) -> Result<Arc<Vec<u32>>, WorkerError> {
        let pending = {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            match recent.iter().find(|(k, _)| *k == key) {
                Some((_, pending)) => {
                    self.counted.with_label_values(&["shared"]).inc();
                    pending.clone()
                }
                None => {
                    self.counted.with_label_values(&["computed"]).inc();
                    let running = self.running.clone();
                    let pending = async move {
                        let _turn = running.acquire_owned().await;
                        tokenize.await.map(Arc::new).map_err(Arc::new)
                    }
                    .boxed()
                    .shared();
                    if recent.len() == REMEMBERED {
                        recent.pop_front();
                    }
                    recent.push_back((key, pending.clone()));
                    pending
                }
            }
        };
        pending.await.map_err(WorkerError::Shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_and_repeated_prompts_tokenize_once_errors_too() {
        let registry = herd_ops::metrics::Registry::default();
        let counted = registry.counter_vec("tokenizations", "Prompts.", &["source"]);
        let cache = Arc::new(Tokenized::new(counted.clone(), 4));
        let runs = Arc::new(AtomicUsize::new(0));
        let tokenize = |ids: Result<Vec<u32>, &'static str>| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                ids.map_err(|e| WorkerError::InvalidArgument(e.into()))
            }
        };
        let key = Tokenized::key(&[b"m", b"hello"]);
        let calls = (0..16).map(|_| cache.ids(key, tokenize(Ok(vec![1, 2, 3]))));
        for ids in futures::future::join_all(calls).await {
            assert_eq!(*ids.unwrap(), [1, 2, 3]);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "sixteen choices, one tokenization");
        let count = |source: &str| counted.with_label_values(&[source]).get();
        assert_eq!((count("computed"), count("shared")), (1, 15));
        assert_eq!(*cache.ids(key, tokenize(Ok(vec![9]))).await.unwrap(), [1, 2, 3], "a repeat is remembered");

        let long = Tokenized::key(&[b"m", b"too long"]);
        for _ in 0..4 {
            let err = cache.ids(long, tokenize(Err("prompt too long"))).await.unwrap_err();
            assert_eq!((err.code(), err.to_string()), (tonic::Code::InvalidArgument, "prompt too long".into()));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // The parts are length-prefixed: moving a byte from one to the other is another prompt.
        assert_ne!(Tokenized::key(&[b"ab", b"c"]), Tokenized::key(&[b"a", b"bc"]));
        // Only the last REMEMBERED prompts are kept.
        for i in 0..REMEMBERED as u32 {
            cache.ids(Tokenized::key(&[&i.to_le_bytes()]), tokenize(Ok(vec![i]))).await.unwrap();
        }
        assert_eq!(*cache.ids(key, tokenize(Ok(vec![7]))).await.unwrap(), [7], "forgotten, tokenized again");
    }

    #[tokio::test]
    async fn at_most_the_allowed_tokenizations_run_at_once() {
        let registry = herd_ops::metrics::Registry::default();
        let cache = Arc::new(Tokenized::new(registry.counter_vec("t", "t", &["source"]), 2));
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let calls = (0..6u32).map(|i| {
            let (now, most) = (now.clone(), most.clone());
            cache.ids(Tokenized::key(&[&i.to_le_bytes()]), async move {
                let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(vec![i])
            })
        });
        for ids in futures::future::join_all(calls).await {
            ids.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }
}
