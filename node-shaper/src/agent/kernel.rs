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
//! - A pass logs under the caller's span and to the caller's subscriber
//!   (the agent's `pass` span: node, guard, trigger), though it runs here.
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

/// A pass asked of the kernel thread, with where it logs; the input comes
/// back with the report.
struct Job {
    input: Input,
    trigger: Trigger,
    /// The caller's span, entered for the pass.
    span: tracing::Span,
    /// The caller's subscriber (the process's, but for tests).
    dispatch: tracing::Dispatch,
    done: oneshot::Sender<(Input, PassReport)>,
}

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
                for job in queue {
                    let Job {
                        input,
                        trigger,
                        span,
                        dispatch,
                        done,
                    } = job;
                    let report = tracing::dispatcher::with_default(&dispatch, || {
                        let _in_pass = span.enter();
                        let report = reconcile_with(&input, trigger, &mut memory);
                        // The kernel holds the plan now; the record for
                        // `explain` and `show` follows.
                        record_applied(&input, &mut memory);
                        report
                    });
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
    /// with the report. The pass logs under the current span.
    pub async fn pass(
        &self,
        input: Input,
        trigger: Trigger,
    ) -> Result<(Input, PassReport), KernelGone> {
        let (done, report) = oneshot::channel();
        let job = Job {
            input,
            trigger,
            span: tracing::Span::current(),
            dispatch: tracing::dispatcher::get_default(Clone::clone),
            done,
        };
        self.jobs
            .as_ref()
            .ok_or(KernelGone)?
            .send(job)
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::Instrument;

    use super::*;

    /// What a test subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The kernel thread's log lines carry the span the agent asked the
    /// pass in: the node, the guard the plan names, the trigger.
    #[test]
    fn a_pass_logs_under_the_callers_span() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // Scanned: the pass reads nothing of this host's interfaces.
            let kernel = Kernel::start(Memory {
                scanned: true,
                ..Memory::default()
            })
            .expect("thread");
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let plan = egressguard_crds::NodeShaping::new(
                "n1",
                egressguard_crds::NodeShapingSpec {
                    node_name: "n1".into(),
                    guard: Some(egressguard_crds::node_shaping::GuardRef {
                        name: "idc".into(),
                        uid: "u1".into(),
                        generation: 3,
                    }),
                    shaping: None,
                    groups: vec![],
                    protected: vec![],
                    enforce: true,
                },
            );
            let span = super::super::pass_span("n1", Some(&plan), Trigger::Plan);
            let waiting = Input::Waiting("reading EgressGuard idc".into());
            rt.block_on(kernel.pass(waiting, Trigger::Plan).instrument(span))
                .expect("pass");
        });
        let text = String::from_utf8_lossy(&out.0.lock().expect("log")).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains("plan not enforceable yet"))
            .unwrap_or_else(|| panic!("no pass log line in {text:?}"));
        assert!(
            line.contains("pass{node=n1 guard=\"idc\" trigger=Plan}"),
            "{line}"
        );
    }
}
