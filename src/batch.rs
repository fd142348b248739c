//! Micro-batching: examples from the ingestion channel into training batches of at most
//! `max` examples, waiting at most `max_wait` after the first one arrives.

use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

use crate::example::TrainingExample;

/// The next batch; `None` once the channel is closed and drained, or on shutdown while
/// waiting for a first example. A shutdown while filling returns what was collected.
pub async fn next_batch(
    rx: &mut Receiver<TrainingExample>,
    max: usize,
    max_wait: Duration,
    shutdown: &CancellationToken,
) -> Option<Vec<TrainingExample>> {
    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return None,
        ex = rx.recv() => ex?,
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
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{World, WorldConfig};

    #[tokio::test]
    async fn fills_up_to_max_or_waits_at_most_max_wait() {
        let w = World::new(WorldConfig {
            users: 2,
            items: 2,
            ..WorldConfig::default()
        });
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        for i in 0..5 {
            tx.send(w.example(0, 0, i, i)).await.unwrap();
        }
        let stop = CancellationToken::new();
        let b = next_batch(&mut rx, 3, Duration::from_secs(10), &stop)
            .await
            .unwrap();
        assert_eq!(b.len(), 3);
        // Only two left: the batch closes at the deadline instead of waiting for a third.
        let b = next_batch(&mut rx, 3, Duration::from_millis(50), &stop)
            .await
            .unwrap();
        assert_eq!(b.len(), 2);
        drop(tx);
        assert!(next_batch(&mut rx, 3, Duration::from_millis(50), &stop)
            .await
            .is_none());
    }
}
