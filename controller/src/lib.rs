//! Bulkhead, the product: what ships in the image.
//!
//! - [`agent`]: `bulkhead agent`, one per node: follows a [`source`], compiles
//!   with `bulkhead-policy`, keeps the [`dataplane`] (the only code touching
//!   the kernel's BPF objects) in step.
//! - [`controller`]: `bulkhead controller`, one writer of policy status.
//! - [`cli`]: the offline commands (`check`, `explain`, `compile`).
//! - [`report`]: what agents tell the controller through the API server.
//! - [`http`]: the metrics, probe and debug servers both roles run.

pub mod agent;
pub mod cli;
pub mod controller;
pub mod dataplane;
pub mod http;
pub mod metrics;
pub mod report;
pub mod source;

/// One malloc arena for the whole process (glibc builds; the image's musl
/// allocator has no arenas). glibc gives threads arenas of their own, up to
/// eight per core, and memory freed in one stays resident for that arena
/// alone: the agent compiles on one thread, attaches programs on another and
/// serves HTTP on the runtime's. At 150k pods its peak was 882 MB with the
/// default, 721-740 MB with two arenas and 644-645 MB with one. The lock
/// all threads then share cost latency only while the scale bench polled
/// the agent 2000 times a second; since it long-polls, one arena is as
/// fast as two (BENCHMARKS). Call it first, before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter, and no other thread
    // exists yet to allocate meanwhile.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hand the free pages malloc keeps back to the kernel (glibc builds; musl's
/// allocator gives freed memory back by itself). glibc returns freed memory on its own only
/// from the top of the heap, so what a whole compile's scratch freed (the
/// first sync's map operations among it) stays resident, unused, until then.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe; it takes the arena's lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// SIGTERM (what the kubelet sends) or Ctrl-C: time to stop, cleanly.
pub async fn stop_requested() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
