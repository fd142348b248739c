//! Thread priorities: training and index builds yield the CPU to recall requests.
//!
//! When serving, training and refreshing share a few cores, a request that waits behind a
//! training step pays for it in tail latency. Linux nice values are per thread and inherited by
//! the threads a thread creates (libtorch's intra-op workers, index builders), so the trainer
//! and the refresher each run on a dedicated thread lowered once at birth: no pooled thread
//! ever carries a lowered priority into other work, and none needs raising back (which would
//! need privileges).

use std::io;

/// Sets the calling thread's nice value (Linux only; elsewhere does nothing).
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread's own id, no memory is passed.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, nice)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
    Ok(())
}

/// The calling thread's nice value (Linux; 0 elsewhere).
pub fn current_thread_nice() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as above; getpriority only reads the scheduler attribute.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// Runs `f` on a new OS thread named `name`, `nice` steps below the caller's priority (nice
/// value raised by `nice`, capped at 19); the receiver gets its result (and an error if it
/// panicked).
pub fn spawn<T: Send + 'static>(
    name: &str,
    nice: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<tokio::sync::oneshot::Receiver<T>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_name = name.to_owned();
    let target = (current_thread_nice() + nice).min(19);
    std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            if nice != 0 {
                if let Err(e) = set_current_thread_nice(target) {
                    tracing::warn!(thread = %thread_name, nice, error = %e, "could not lower thread priority");
                }
            }
            let _ = tx.send(f());
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_thread_and_its_children_run_at_the_requested_nice_value() {
        let before = current_thread_nice();
        let rx = spawn("nice-test", 7, || {
            let own = current_thread_nice();
            let child = std::thread::spawn(current_thread_nice)
                .join()
                .expect("child thread");
            (own, child)
        })
        .expect("spawn");
        let (own, child) = rx.blocking_recv().expect("result");
        if cfg!(target_os = "linux") {
            let expected = (before + 7).min(19);
            assert_eq!((own, child), (expected, expected));
        }
        // The caller's own priority is untouched.
        assert_eq!(current_thread_nice(), before);
    }
}
