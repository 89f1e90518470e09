//! Prefetching: the next meta-batches of episodes are built on a background thread
//! while the current one trains, so that data never dominates a meta-iteration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{Episode, EpisodeSource};
use crate::{Error, Result};

/// Meta-batches of consecutive episodes (`first`, `first + 1`, …) of a source, built
/// ahead on a background thread over a bounded channel. Dropping it stops and joins
/// the thread.
pub struct Prefetcher {
    receiver: Option<Receiver<Result<Vec<Episode>>>>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher").finish_non_exhaustive()
    }
}

impl Prefetcher {
    /// Starts building meta-batches of `meta_batch_size` episodes from episode `first`
    /// on; at most `capacity` (at least 1) finished meta-batches wait in the channel.
    pub fn new(
        source: Arc<dyn EpisodeSource>,
        first: u64,
        meta_batch_size: usize,
        capacity: usize,
    ) -> Result<Self> {
        if meta_batch_size == 0 {
            return Err(Error::InvalidArgument(
                "a meta-batch needs at least one episode".into(),
            ));
        }
        let (sender, receiver) = sync_channel(capacity.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let worker = std::thread::Builder::new()
            .name("melora-prefetch".into())
            .spawn(move || {
                let mut next = first;
                while !stopping.load(Ordering::Relaxed) {
                    let end = u64::try_from(meta_batch_size)
                        .ok()
                        .and_then(|size| next.checked_add(size));
                    let batch = match end {
                        Some(end) => (next..end)
                            .map(|i| source.episode(i))
                            .collect::<Result<Vec<_>>>(),
                        None => Err(Error::InvalidArgument(format!(
                            "the episode index overflows: a meta-batch of {meta_batch_size} \
                             episodes from episode {next} on goes past {}",
                            u64::MAX
                        ))),
                    };
                    next = end.unwrap_or(u64::MAX);
                    let failed = batch.is_err();
                    // A send fails once the receiver is gone: the prefetcher was dropped.
                    if sender.send(batch).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| Error::InvalidArgument(format!("cannot start prefetch thread: {e}")))?;
        Ok(Self {
            receiver: Some(receiver),
            stop,
            worker: Some(worker),
        })
    }

    /// The next meta-batch (waits if it is not built yet). After an error the
    /// prefetcher has stopped and reports that.
    pub fn next_batch(&mut self) -> Result<Vec<Episode>> {
        self.receiver
            .as_ref()
            .and_then(|r| r.recv().ok())
            .unwrap_or_else(|| {
                Err(Error::InvalidArgument(
                    "the prefetch thread has stopped (after an earlier error)".into(),
                ))
            })
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a worker waiting on a full channel.
        self.receiver.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
