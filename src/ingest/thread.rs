//! The ingest loop's own thread and runtime.
//!
//! Request handling, the refresher's hand-offs and replication share the process's tokio
//! runtime; a loop that consumed on it too could be starved by HTTP load (the freshness issue:
//! under saturating recall traffic consumption stalls and lag grows although the trainer is
//! idle). The loop therefore runs on a single-threaded runtime on a thread of its own.
//!
//! The returned [`JoinHandle`] behaves like one from `tokio::spawn`: awaited from any runtime,
//! and `abort` drops the loop (and with it the consumer) at once. The loop also stops when
//! the runtime that started it shuts down, as a task spawned on it would have.

use std::future::Future;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Name of the thread, as seen in `top -H` and panics.
pub const THREAD_NAME: &str = "towerstream-ingest";

/// Runs `loop_future` on a new single-threaded runtime on its own OS thread. Must be called
/// from within a tokio runtime (the caller's), whose shutdown also stops the loop.
pub fn spawn_on_own_thread<F>(loop_future: F) -> std::io::Result<JoinHandle<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (finished_tx, finished_rx) = oneshot::channel::<()>();
    let task = runtime.spawn(async move {
        let out = loop_future.await;
        drop(finished_tx);
        out
    });
    // Held by a task on the caller's runtime: dropped when that runtime shuts down (a test
    // ending, the process stopping without awaiting the loop), which ends the thread below.
    let (caller_alive, caller_gone) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut caller_alive = caller_alive;
        caller_alive.closed().await; // the thread ended first
    });
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            // `finished_rx` resolves when the loop returns, is aborted or panics.
            runtime.block_on(async {
                tokio::select! {
                    _ = finished_rx => {}
                    _ = caller_gone => {}
                }
            });
            // Dropping the runtime cancels what is left on it (an aborted loop's remains,
            // dead-letter writes in flight: their offsets were never committed).
            drop(runtime);
        })?;
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn the_loop_runs_while_the_callers_runtime_is_blocked() {
        let (tx, rx) = std::sync::mpsc::channel();
        let task = spawn_on_own_thread(async move {
            for i in 0..5 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let _ = tx.send(i);
            }
            std::thread::current().name().map(str::to_owned)
        })
        .expect("spawn");
        // Blocks the only worker of the caller's runtime: a task spawned on it could not run.
        let got: Vec<i32> = (0..5)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(5))
                    .expect("the loop made progress")
            })
            .collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(task.await.expect("joined").as_deref(), Some(THREAD_NAME));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn abort_drops_the_loop() {
        struct Dropped(std::sync::mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let guard = Dropped(tx);
        let task = spawn_on_own_thread(async move {
            let _guard = guard; // dropped with the future, polled or not
            std::future::pending::<()>().await
        })
        .expect("spawn");
        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the loop was dropped");
    }

    #[test]
    fn the_loop_stops_when_the_callers_runtime_shuts_down() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let caller = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        caller.block_on(async move {
            spawn_on_own_thread(async move {
                let _keep = tx; // dropped with the loop
                std::future::pending::<()>().await
            })
            .expect("spawn");
        });
        drop(caller);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
