//! Admission control for recall requests: at most `serve.max_concurrent_recalls` computing at
//! once (on the blocking pool, so the async workers that accept connections and drive the
//! consumer are never busy with a forward pass or a graph search), at most
//! `serve.max_queued_recalls` waiting for a slot, and the rest refused at once.
//!
//! Refusing early is the point: past saturation a queue only grows, every request in it waits
//! longer, and the whole queue times out together. A 503 with `Retry-After` tells a client or
//! a load balancer to go elsewhere while the requests already admitted still meet their
//! deadline; a request whose deadline passes in the queue or in compute is answered 408.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot busy and the queue full: shed (503, `Retry-After`).
    Overloaded,
    /// The deadline passed while waiting for a slot (408).
    TimedOut,
}

/// Slots for recall computations and a bounded queue in front of them.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    max_queued: usize,
    concurrency: usize,
}

/// A leaving waiter decrements the queue count whichever way it leaves.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// `concurrency` slots (0: one per available core) and room for `max_queued` waiters.
    pub fn new(concurrency: usize, max_queued: usize) -> Admission {
        let concurrency = if concurrency == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            concurrency
        };
        Admission {
            slots: Arc::new(Semaphore::new(concurrency)),
            queued: AtomicUsize::new(0),
            max_queued,
            concurrency,
        }
    }

    /// Slots.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Requests computing now.
    pub fn in_flight(&self) -> usize {
        self.concurrency - self.slots.available_permits()
    }

    /// A slot, held until the permit drops; refused when the queue is full or the deadline
    /// passes first.
    pub async fn admit(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, Refusal> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Overloaded);
        }
        let _waiting = Waiting(&self.queued);
        match tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it as overload if it ever were.
            Ok(Err(_)) => Err(Refusal::Overloaded),
            Err(_) => Err(Refusal::TimedOut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_full_queue_sheds_and_a_passed_deadline_times_out() {
        let a = Arc::new(Admission::new(1, 1));
        let later = Instant::now() + Duration::from_secs(5);
        let busy = a.admit(later).await.unwrap();
        assert_eq!(a.in_flight(), 1);
        // One waiter fits in the queue...
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(later).await.map(drop) })
        };
        while a.queued() == 0 {
            tokio::task::yield_now().await;
        }
        // ... the next is shed at once.
        assert_eq!(a.admit(later).await.unwrap_err(), Refusal::Overloaded);
        // The slot frees: the waiter gets it, the queue empties.
        drop(busy);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(a.queued(), 0);
        // A deadline that passes in the queue is a timeout, and leaves the queue empty.
        let _busy = a.admit(later).await.unwrap();
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(a.admit(soon).await.unwrap_err(), Refusal::TimedOut);
        assert_eq!(a.queued(), 0);
    }
}
