//! The agent's kernel work on a thread of its own.
//!
//! A reconcile pass is blocking netlink work: milliseconds for a small plan,
//! seconds for a 100,000-entry one. Run on the agent's single-threaded
//! runtime, it would stall everything else the runtime serves — the
//! kubelet's probes first. So one dedicated thread owns the [`Memory`] and
//! the netlink socket's work; the runtime sends it an [`Input`] and awaits
//! the [`PassReport`].
//!
//! # Guarantees
//! - Passes run one at a time, in the order they were asked for: every
//!   pass, the SIGTERM removal included, goes through this one thread.
//! - After each pass the thread gives free heap pages back to the kernel
//!   ([`crate::alloc::release_free_memory`], which trims every malloc
//!   arena, this thread's own included).
//!
//! glibc gives a second thread that allocates an arena of its own; the
//! pass's peak (the planned and the observed tree) is built and freed in
//! this thread's arena and trimmed there. The chart also sets
//! `MALLOC_ARENA_MAX=2` so that the other threads (the probes', tokio's
//! blocking pool) share that arena instead of each keeping one: without it
//! the idle agent held 3.6 MiB more at 100,000 entries.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::inputs::Input;
use super::reconcile::{reconcile_with, record_applied, Memory, PassReport, Trigger};

/// A pass asked of the kernel thread; the input comes back with the report.
type Job = (Input, Trigger, oneshot::Sender<(Input, PassReport)>);

/// The kernel thread stopped: a pass panicked.
#[derive(Debug, thiserror::Error)]
#[error("the kernel thread stopped (a reconcile pass panicked)")]
pub struct KernelGone;

/// The handle of the thread that runs reconcile passes. Dropped, it lets the
/// thread finish the pass it is in and waits for it.
#[derive(Debug)]
pub struct Kernel {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Kernel {
    /// Starts the thread, which owns `memory` from now on.
    pub fn start(mut memory: Memory) -> std::io::Result<Kernel> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("netlink".into())
            .spawn(move || {
                for (input, trigger, done) in queue {
                    let report = reconcile_with(&input, trigger, &mut memory);
                    // The kernel holds the plan now; the record for
                    // `explain` and `show` follows.
                    record_applied(&input, &mut memory);
                    // Return the input first: it was allocated on the runtime
                    // and is freed there; this thread's own peak is trimmed now.
                    let _ = done.send((input, report));
                    crate::alloc::release_free_memory();
                }
            })?;
        Ok(Kernel {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs one pass for `input` (run for `trigger`) on the kernel thread
    /// and waits for it without blocking the runtime; gives the input back
    /// with the report.
    pub async fn pass(
        &self,
        input: Input,
        trigger: Trigger,
    ) -> Result<(Input, PassReport), KernelGone> {
        let (done, report) = oneshot::channel();
        self.jobs
            .as_ref()
            .ok_or(KernelGone)?
            .send((input, trigger, done))
            .map_err(|_| KernelGone)?;
        report.await.map_err(|_| KernelGone)
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop after its current pass.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
