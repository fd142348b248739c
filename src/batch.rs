//! Micro-batching: examples from the ingestion channel into training batches of at most
//! `max` examples, waiting at most `max_wait` after the first one arrives.
//!
//! Waiting has two phases so that no example is ever dropped: waiting for a *first* example may
//! give up after an idle tick (nothing was taken from the channel, so nothing is lost), but once
//! the first example is taken the batch is always completed and returned. A caller that raced
//! a timer against the whole wait would drop the examples already taken whenever the timer won.

use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

use crate::example::TrainingExample;

/// The outcome of one wait for a batch.
#[derive(Debug)]
pub enum Wait {
    /// A batch of 1..=max examples.
    Batch(Vec<TrainingExample>),
    /// No example arrived within the idle tick; nothing was taken from the channel.
    Idle,
    /// The channel is closed and drained, or shutdown was requested while no example was held.
    Closed,
}

/// The next batch, or [`Wait::Idle`] when no first example arrives within `idle`. A shutdown
/// while filling returns what was collected: examples taken from the channel are never lost.
pub async fn next_batch(
    rx: &mut Receiver<TrainingExample>,
    max: usize,
    max_wait: Duration,
    idle: Duration,
    shutdown: &CancellationToken,
) -> Wait {
    // `recv` is cancel-safe: when the idle tick wins, no message was taken.
    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Wait::Closed,
        ex = rx.recv() => match ex {
            Some(ex) => ex,
            None => return Wait::Closed,
        },
        _ = tokio::time::sleep(idle) => return Wait::Idle,
    };
    let mut batch = Vec::with_capacity(max);
    batch.push(first);
    let deadline = tokio::time::Instant::now() + max_wait;
    while batch.len() < max {
        let want = max - batch.len();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            n = rx.recv_many(&mut batch, want) => if n == 0 { break },
        }
    }
    Wait::Batch(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{World, WorldConfig};

    fn world() -> World {
        World::new(WorldConfig {
            users: 2,
            items: 2,
            ..WorldConfig::default()
        })
    }

    fn len(w: Wait) -> usize {
        match w {
            Wait::Batch(b) => b.len(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn fills_up_to_max_or_waits_at_most_max_wait() {
        let w = world();
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        for i in 0..5 {
            tx.send(w.example(0, 0, i, i)).await.unwrap();
        }
        let stop = CancellationToken::new();
        let long = Duration::from_secs(10);
        assert_eq!(len(next_batch(&mut rx, 3, long, long, &stop).await), 3);
        // Only two left: the batch closes at the deadline instead of waiting for a third.
        let short = Duration::from_millis(50);
        assert_eq!(len(next_batch(&mut rx, 3, short, long, &stop).await), 2);
        assert!(matches!(
            next_batch(&mut rx, 3, short, short, &stop).await,
            Wait::Idle
        ));
        drop(tx);
        assert!(matches!(
            next_batch(&mut rx, 3, short, long, &stop).await,
            Wait::Closed
        ));
    }

    /// A trickle: the first example arrives late in the idle tick and the batch deadline runs
    /// past the tick. The example must come back in a batch, not vanish with the tick.
    #[tokio::test(start_paused = true)]
    async fn a_late_first_example_is_never_dropped_by_the_idle_tick() {
        let w = world();
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        let ex = w.example(0, 0, 1, 1);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            tx.send(ex).await.unwrap();
            std::future::pending::<()>().await;
        });
        let stop = CancellationToken::new();
        let (max_wait, idle) = (Duration::from_millis(200), Duration::from_millis(500));
        assert_eq!(len(next_batch(&mut rx, 8, max_wait, idle, &stop).await), 1);
    }
}
