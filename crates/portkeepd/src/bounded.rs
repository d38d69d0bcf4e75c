//! A dataplane the committer never waits on for longer than a bound.
//!
//! The committer answers no request of a batch before the batch is
//! installed, so a dataplane that stalls (a kernel that does not answer,
//! a `nft` that hangs) would stall every client. [`Bounded`] runs the
//! dataplane on a thread of its own and waits for each batch at most
//! `[dataplane] timeout_ms`. A batch that takes longer counts as failed
//! as a whole: its requests are answered NETWORK_FAILURE (RFC 6887
//! section 7.4) and undone, as for any failed apply. It may still have
//! taken effect, though, so once it ends the dataplane is told its state
//! is in doubt ([`Dataplane::invalidate`]) and reconciles before the next
//! batch; a batch that arrives while the late one still runs waits for it
//! only within its own bound, and fails if it must wait longer.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use portkeep_server::{ChangeRecord, Dataplane, DataplaneError};

use crate::clock::Deadline;

/// Where a batch stands.
#[derive(Debug)]
enum State {
    /// Running, and its caller waits.
    Running,
    /// Running, and its caller gave up on it.
    Abandoned,
    /// Done; the result is the caller's.
    Done(Result<(), DataplaneError>),
    /// Done after its caller gave up; the dataplane was invalidated.
    Late,
}

/// One batch's state, shared by the caller and the dataplane's thread.
#[derive(Debug)]
struct Slot {
    state: Mutex<State>,
    cv: Condvar,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds for the state, at most until `deadline`;
    /// returns the guard either way.
    fn wait_until(
        &self,
        deadline: Deadline,
        done: impl Fn(&State) -> bool,
    ) -> std::sync::MutexGuard<'_, State> {
        let mut g = self.lock();
        while !done(&g) {
            let left = deadline.left();
            if left.is_zero() {
                break;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        g
    }
}

struct Job {
    changes: Vec<ChangeRecord>,
    slot: Arc<Slot>,
}

/// A dataplane behind a bounded wait.
#[derive(Debug)]
pub struct Bounded {
    name: &'static str,
    timeout: Duration,
    jobs: Option<mpsc::Sender<Job>>,
    /// A batch that outlived its bound and may still run.
    late: Option<Arc<Slot>>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} changes)", self.changes.len())
    }
}

fn all_failed(name: &'static str, changes: &[ChangeRecord], message: String) -> DataplaneError {
    DataplaneError {
        dataplane: name,
        message,
        failed: changes.iter().map(|c| c.seq).collect(),
    }
}

impl Bounded {
    /// Moves `inner` to a thread of its own; each [`Dataplane::apply`]
    /// then waits at most `timeout`.
    pub fn new(mut inner: Box<dyn Dataplane>, timeout: Duration) -> std::io::Result<Bounded> {
        let name = inner.name();
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = std::thread::Builder::new()
            .name("dataplane".into())
            .spawn(move || {
                for job in rx {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        inner.apply(&job.changes)
                    }))
                    .unwrap_or_else(|_| {
                        Err(all_failed(
                            name,
                            &job.changes,
                            "the dataplane panicked: the whole batch counts as failed".into(),
                        ))
                    });
                    let mut g = job.slot.lock();
                    *g = match *g {
                        State::Abandoned => {
                            // Applied, partly applied or not: the caller
                            // reported it failed, so reconcile first.
                            inner.invalidate();
                            tracing::warn!(
                                "a dataplane batch of {} change(s) ended after its caller gave up on it: \
                                 reconciling before the next one",
                                job.changes.len()
                            );
                            State::Late
                        }
                        _ => State::Done(r),
                    };
                    job.slot.cv.notify_all();
                }
            })?;
        Ok(Bounded {
            name,
            timeout,
            jobs: Some(tx),
            late: None,
            worker: Some(worker),
        })
    }
}

impl Dataplane for Bounded {
    fn name(&self) -> &'static str {
        self.name
    }

    fn apply(&mut self, changes: &[ChangeRecord]) -> Result<(), DataplaneError> {
        let deadline = Deadline::after(self.timeout);
        if let Some(late) = self.late.take() {
            let g = late.wait_until(deadline, |s| matches!(s, State::Late));
            if !matches!(*g, State::Late) {
                drop(g);
                self.late = Some(late);
                return Err(all_failed(
                    self.name,
                    changes,
                    format!(
                        "still busy with a batch that outlived the {} ms bound",
                        self.timeout.as_millis()
                    ),
                ));
            }
        }
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Running),
            cv: Condvar::new(),
        });
        let job = Job {
            changes: changes.to_vec(),
            slot: slot.clone(),
        };
        if self.jobs.as_ref().is_none_or(|tx| tx.send(job).is_err()) {
            return Err(all_failed(
                self.name,
                changes,
                "the dataplane thread is gone".into(),
            ));
        }
        let mut g = slot.wait_until(deadline, |s| matches!(s, State::Done(_)));
        match std::mem::replace(&mut *g, State::Abandoned) {
            State::Done(r) => {
                *g = State::Late;
                r
            }
            _ => {
                // Still running: it stays Abandoned, which tells the
                // thread to invalidate the dataplane when it ends.
                drop(g);
                self.late = Some(slot);
                Err(all_failed(
                    self.name,
                    changes,
                    format!(
                        "no answer within {} ms ([dataplane] timeout_ms)",
                        self.timeout.as_millis()
                    ),
                ))
            }
        }
    }
}

impl Drop for Bounded {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which drops the dataplane
        // (an nftables table set to be flushed on stop is flushed there).
        self.jobs = None;
        let stuck = self
            .late
            .as_ref()
            .is_some_and(|l| !matches!(*l.lock(), State::Late));
        if let Some(w) = self.worker.take() {
            if stuck {
                tracing::warn!("the dataplane is still busy with a late batch: not waiting for it");
            } else {
                let _ = w.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portkeep_server::Change;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A dataplane whose applies block until the test lets them go.
    struct Gate {
        release: mpsc::Receiver<()>,
        applied: Arc<AtomicUsize>,
        invalidated: Arc<AtomicUsize>,
    }

    impl Dataplane for Gate {
        fn name(&self) -> &'static str {
            "gate"
        }
        fn apply(&mut self, _: &[ChangeRecord]) -> Result<(), DataplaneError> {
            let _ = self.release.recv();
            self.applied.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn invalidate(&mut self) {
            self.invalidated.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn batch(seqs: &[u64]) -> Vec<ChangeRecord> {
        seqs.iter()
            .map(|&seq| ChangeRecord {
                seq,
                change: Change::ServerEpochReset {
                    anchor: portkeep_server::Timestamp(0),
                },
            })
            .collect()
    }

    struct Rig {
        dp: Bounded,
        release: mpsc::Sender<()>,
        applied: Arc<AtomicUsize>,
        invalidated: Arc<AtomicUsize>,
    }

    fn rig(timeout: Duration) -> Rig {
        let (release, rx) = mpsc::channel();
        let applied = Arc::new(AtomicUsize::new(0));
        let invalidated = Arc::new(AtomicUsize::new(0));
        let dp = Bounded::new(
            Box::new(Gate {
                release: rx,
                applied: applied.clone(),
                invalidated: invalidated.clone(),
            }),
            timeout,
        )
        .unwrap();
        Rig {
            dp,
            release,
            applied,
            invalidated,
        }
    }

    #[test]
    fn a_batch_that_answers_in_time_is_its_own_result() {
        let mut r = rig(Duration::from_secs(60));
        r.release.send(()).unwrap();
        r.dp.apply(&batch(&[1, 2])).unwrap();
        assert_eq!(r.applied.load(Ordering::SeqCst), 1);
        assert_eq!(r.invalidated.load(Ordering::SeqCst), 0);
    }

    /// RFC 6887 section 7.4: a stalled dataplane fails the whole batch
    /// (its requests are answered NETWORK_FAILURE); once the late batch
    /// ends, the dataplane is invalidated before it gets the next one.
    #[test]
    fn rfc6887_s7_4_a_stalled_batch_fails_whole_and_the_dataplane_reconciles_after_it() {
        let mut r = rig(Duration::from_millis(20));
        let e = r.dp.apply(&batch(&[1, 2, 3])).unwrap_err();
        assert_eq!(e.failed, [1, 2, 3]);
        assert!(e.message.contains("timeout_ms"), "{e}");
        // Still stalled: the next batch fails within its own bound, and
        // never reaches the dataplane.
        let e = r.dp.apply(&batch(&[4])).unwrap_err();
        assert_eq!(e.failed, [4]);
        assert_eq!(r.applied.load(Ordering::SeqCst), 0);
        // The late batch ends: invalidated, and the next batch goes through.
        r.release.send(()).unwrap();
        r.release.send(()).unwrap();
        r.dp.timeout = Duration::from_secs(60);
        r.dp.apply(&batch(&[5])).unwrap();
        assert_eq!(r.applied.load(Ordering::SeqCst), 2);
        assert_eq!(r.invalidated.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_panicking_dataplane_fails_the_whole_batch() {
        struct Boom;
        impl Dataplane for Boom {
            fn name(&self) -> &'static str {
                "boom"
            }
            fn apply(&mut self, _: &[ChangeRecord]) -> Result<(), DataplaneError> {
                std::panic::panic_any("dataplane bug")
            }
        }
        let mut dp = Bounded::new(Box::new(Boom), Duration::from_secs(60)).unwrap();
        assert_eq!(dp.apply(&batch(&[7, 8])).unwrap_err().failed, [7, 8]);
        // The thread survives the panic.
        assert_eq!(dp.apply(&batch(&[9])).unwrap_err().failed, [9]);
    }
}
