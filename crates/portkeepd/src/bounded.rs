//! A dataplane the committer never waits on for longer than a bound.
//!
//! The committer answers no request of a batch before the batch is
//! installed, so a dataplane that stalls (a kernel that does not answer,
//! a `nft` that hangs) would stall every client. [`Bounded`] runs the
//! dataplane on a thread of its own and waits for each batch at most
//! `[dataplane] timeout_ms`. A batch that takes longer counts as failed
//! as a whole: its requests are answered NETWORK_FAILURE (RFC 6887
//! section 7.4) and undone, as for any failed apply. It may still take
//! effect, which needs no reconciling: the mappings it installed are
//! undone in the server, whose removals reach the dataplane next, and
//! its removals are what the server holds anyway (a dataplane that fails
//! part of a batch is in doubt on its own account).
//!
//! A dataplane in doubt ([`Dataplane::in_doubt`]; for nftables, a table
//! to be rebuilt) reconciles on this thread after the batch that left it
//! so, outside any batch's bound: a rebuild takes seconds per million
//! mappings. Until it is done, and while a late batch still runs, batches
//! fail at once (after waiting for the late one within their own bound),
//! without reaching the dataplane. Their removals are kept, though, and
//! go in front of the next batch that does: a removal the server made
//! must reach the NAT.
//!
//! Dropping a [`Bounded`] waits for its thread, so the dataplane it
//! drops (an nftables table set to be flushed on stop is flushed there)
//! is gone before anything else programs the same table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use portkeep_server::{Change, ChangeRecord, Dataplane, DataplaneError};

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
    /// Done after its caller gave up, or its result taken.
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
    /// Set by the thread while it reconciles the dataplane.
    reconciling: Arc<AtomicBool>,
    /// Removals of batches failed while the dataplane was busy, for the
    /// front of the next batch.
    held: Vec<ChangeRecord>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} changes)", self.changes.len())
    }
}

/// Every change failed, and what the NAT holds for each is in doubt: as
/// lost, so every client that held one of them is told (fail closed).
fn all_failed(name: &'static str, changes: &[ChangeRecord], message: String) -> DataplaneError {
    let all: Vec<u64> = changes.iter().map(|c| c.seq).collect();
    DataplaneError {
        dataplane: name,
        message,
        failed: all.clone(),
        kept: Vec::new(),
        lost: all,
    }
}

/// `inner.apply(changes)`; a panic fails the whole batch and leaves the
/// dataplane in doubt (it may have stopped anywhere).
fn apply_caught(
    inner: &mut Box<dyn Dataplane>,
    name: &'static str,
    changes: &[ChangeRecord],
) -> Result<(), DataplaneError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.apply(changes))) {
        Ok(r) => r,
        Err(_) => {
            inner.invalidate();
            Err(all_failed(
                name,
                changes,
                "the dataplane panicked: the whole batch counts as failed".into(),
            ))
        }
    }
}

/// Reconciles a dataplane in doubt (`apply(&[])`), then clears `flag`.
/// If it is still in doubt, its next batch reconciles it first.
fn reconcile(inner: &mut Box<dyn Dataplane>, name: &'static str, flag: &AtomicBool) {
    tracing::warn!(
        "the {name} dataplane is in doubt: reconciling it; batches fail until it is done"
    );
    match apply_caught(inner, name, &[]) {
        Ok(()) if !inner.in_doubt() => tracing::info!("the {name} dataplane is reconciled"),
        Ok(()) => tracing::error!(
            "the {name} dataplane is still in doubt: the next batch reconciles it first"
        ),
        Err(e) => tracing::error!("reconciling the {name} dataplane failed: {e}"),
    }
    flag.store(false, Ordering::SeqCst);
}

impl Bounded {
    /// Moves `inner` to a thread of its own; each [`Dataplane::apply`]
    /// then waits at most `timeout`.
    pub fn new(mut inner: Box<dyn Dataplane>, timeout: Duration) -> std::io::Result<Bounded> {
        let name = inner.name();
        let (tx, rx) = mpsc::channel::<Job>();
        // A dataplane handed over in doubt (its full install failed)
        // reconciles before its first batch.
        let reconciling = Arc::new(AtomicBool::new(inner.in_doubt()));
        let flag = reconciling.clone();
        let worker = std::thread::Builder::new()
            .name("dataplane".into())
            .spawn(move || {
                if flag.load(Ordering::SeqCst) {
                    reconcile(&mut inner, name, &flag);
                }
                for job in rx {
                    let r = apply_caught(&mut inner, name, &job.changes);
                    // Set before the result is out, so that no batch
                    // queues behind the reconciling.
                    let doubt = inner.in_doubt();
                    if doubt {
                        flag.store(true, Ordering::SeqCst);
                    }
                    let mut g = job.slot.lock();
                    *g = match *g {
                        State::Abandoned => {
                            tracing::warn!(
                                "a dataplane batch of {} change(s) ended after its caller gave up on it ({})",
                                job.changes.len(),
                                match &r {
                                    Ok(()) => "applied".to_owned(),
                                    Err(e) => e.to_string(),
                                }
                            );
                            State::Late
                        }
                        _ => State::Done(r),
                    };
                    job.slot.cv.notify_all();
                    drop(g);
                    if doubt {
                        reconcile(&mut inner, name, &flag);
                    }
                }
            })?;
        Ok(Bounded {
            name,
            timeout,
            jobs: Some(tx),
            late: None,
            reconciling,
            held: Vec::new(),
            worker: Some(worker),
        })
    }

    /// Fails `changes` without handing them to the dataplane, keeping
    /// their removals for the next batch.
    fn busy(&mut self, changes: &[ChangeRecord], why: String) -> DataplaneError {
        self.held.extend(
            changes
                .iter()
                .filter(|c| matches!(c.change, Change::Removed { .. }))
                .cloned(),
        );
        all_failed(self.name, changes, why)
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
                let why = format!(
                    "still busy with a batch that outlived the {} ms bound",
                    self.timeout.as_millis()
                );
                return Err(self.busy(changes, why));
            }
        }
        if self.reconciling.load(Ordering::SeqCst) {
            let why = "the dataplane is reconciling (rebuilding) its state".to_owned();
            return Err(self.busy(changes, why));
        }
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Running),
            cv: Condvar::new(),
        });
        let mut all = std::mem::take(&mut self.held);
        all.extend_from_slice(changes);
        let job = Job {
            changes: all,
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
                // thread that nobody takes its result.
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
        // It is waited for even when a late batch or a reconciling still
        // runs: what replaces this dataplane must not program the table
        // before the old one is done with it.
        self.jobs = None;
        let busy = self.reconciling.load(Ordering::SeqCst)
            || self
                .late
                .as_ref()
                .is_some_and(|l| !matches!(*l.lock(), State::Late));
        if let Some(w) = self.worker.take() {
            if busy {
                tracing::warn!("the dataplane is still busy: waiting for it to end");
            }
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Stopwatch;
    use portkeep_server::Change;
    use std::sync::atomic::AtomicUsize;

    /// A dataplane whose applies block until the test lets them go.
    struct Gate {
        release: mpsc::Receiver<()>,
        applied: Arc<AtomicUsize>,
        invalidated: Arc<AtomicUsize>,
        /// The sequence numbers of each apply, in order.
        seen: Arc<Mutex<Vec<Vec<u64>>>>,
        /// In doubt until an empty apply (a reconciling) ends.
        doubt: Arc<AtomicBool>,
        dropped: Arc<AtomicBool>,
    }

    impl Dataplane for Gate {
        fn name(&self) -> &'static str {
            "gate"
        }
        fn apply(&mut self, changes: &[ChangeRecord]) -> Result<(), DataplaneError> {
            let _ = self.release.recv();
            self.applied.fetch_add(1, Ordering::SeqCst);
            self.seen
                .lock()
                .unwrap()
                .push(changes.iter().map(|c| c.seq).collect());
            if changes.is_empty() {
                self.doubt.store(false, Ordering::SeqCst);
            }
            Ok(())
        }
        fn invalidate(&mut self) {
            self.invalidated.fetch_add(1, Ordering::SeqCst);
        }
        fn in_doubt(&self) -> bool {
            self.doubt.load(Ordering::SeqCst)
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn batch(seqs: &[u64]) -> Vec<ChangeRecord> {
        seqs.iter()
            .map(|&seq| ChangeRecord {
                started: false,
                seq,
                change: Change::ServerEpochReset {
                    anchor: portkeep_server::Timestamp(0),
                },
            })
            .collect()
    }

    /// Removals of one mapping each, numbered `seqs`.
    fn removals(seqs: &[u64]) -> Vec<ChangeRecord> {
        let m = portkeep_server::MappingRecord {
            kind: portkeep_server::MappingKind::Map,
            key: portkeep_server::MappingKey {
                internal_ip: "10.0.0.2".parse().unwrap(),
                protocol: portkeep_proto::Protocol::TCP,
                internal_port: 22,
            },
            external: "198.51.100.1:30022".parse().unwrap(),
            nonce: [0; 12],
            expires: portkeep_server::Timestamp(0),
            lifetime: 60,
            checkpoint: false,
            filters: vec![],
            description: None,
            subscriber: portkeep_server::SubscriberKeying::default()
                .subscriber_of("10.0.0.2".parse().unwrap()),
            third_party: false,
            followed: false,
            manager: None,
        };
        seqs.iter()
            .map(|&seq| ChangeRecord {
                started: false,
                seq,
                change: Change::Removed {
                    mapping: m.clone(),
                    reason: portkeep_server::RemoveReason::Deleted,
                },
            })
            .collect()
    }

    struct Rig {
        dp: Bounded,
        release: mpsc::Sender<()>,
        applied: Arc<AtomicUsize>,
        invalidated: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<Vec<u64>>>>,
        doubt: Arc<AtomicBool>,
        dropped: Arc<AtomicBool>,
    }

    fn rig(timeout: Duration) -> Rig {
        let (release, rx) = mpsc::channel();
        let applied = Arc::new(AtomicUsize::new(0));
        let invalidated = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let doubt = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        let dp = Bounded::new(
            Box::new(Gate {
                release: rx,
                applied: applied.clone(),
                invalidated: invalidated.clone(),
                seen: seen.clone(),
                doubt: doubt.clone(),
                dropped: dropped.clone(),
            }),
            timeout,
        )
        .unwrap();
        Rig {
            dp,
            release,
            applied,
            invalidated,
            seen,
            doubt,
            dropped,
        }
    }

    /// Waits (a few seconds at most) for `f` to hold.
    fn eventually(f: impl Fn() -> bool) {
        let until = Deadline::after(Duration::from_secs(10));
        while !f() {
            assert!(!until.left().is_zero(), "timed out");
            std::thread::sleep(Duration::from_millis(2));
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
    /// (its requests are answered NETWORK_FAILURE); batches that come
    /// while it still runs fail without reaching the dataplane; once it
    /// ends, having applied, nothing needs reconciling and the next batch
    /// goes through.
    #[test]
    fn rfc6887_s7_4_a_stalled_batch_fails_whole_and_the_next_goes_through_after_it() {
        let mut r = rig(Duration::from_millis(20));
        let e = r.dp.apply(&batch(&[1, 2, 3])).unwrap_err();
        assert_eq!(e.failed, [1, 2, 3]);
        assert!(e.message.contains("timeout_ms"), "{e}");
        // Still stalled: the next batch fails within its own bound, and
        // never reaches the dataplane.
        let e = r.dp.apply(&batch(&[4])).unwrap_err();
        assert_eq!(e.failed, [4]);
        assert_eq!(r.applied.load(Ordering::SeqCst), 0);
        // The late batch ends: the next batch goes through, and a late
        // batch that applied puts nothing in doubt (a late success used
        // to invalidate, and so a rebuild longer than the bound never
        // ended).
        r.release.send(()).unwrap();
        r.release.send(()).unwrap();
        r.dp.timeout = Duration::from_secs(60);
        r.dp.apply(&batch(&[5])).unwrap();
        assert_eq!(r.applied.load(Ordering::SeqCst), 2);
        assert_eq!(r.invalidated.load(Ordering::SeqCst), 0);
        assert_eq!(*r.seen.lock().unwrap(), [vec![1, 2, 3], vec![5]]);
    }

    /// A dataplane left in doubt reconciles on its thread, outside any
    /// batch's bound, however long that takes; batches meanwhile fail at
    /// once, and go through again after it.
    #[test]
    fn a_dataplane_in_doubt_reconciles_outside_the_bound_while_batches_fail_fast() {
        let mut r = rig(Duration::from_millis(200));
        r.doubt.store(true, Ordering::SeqCst);
        r.release.send(()).unwrap();
        // The batch that leaves it in doubt has its own result.
        r.dp.apply(&batch(&[1])).unwrap();
        // Reconciling, and held up there: batches fail, fast.
        for seq in 2..5 {
            let t = Stopwatch::start();
            let e = r.dp.apply(&batch(&[seq])).unwrap_err();
            assert!(e.message.contains("reconciling"), "{e}");
            assert!(t.micros() < 150_000, "{} us", t.micros());
        }
        r.release.send(()).unwrap();
        eventually(|| !r.dp.reconciling.load(Ordering::SeqCst));
        r.release.send(()).unwrap();
        r.dp.apply(&batch(&[5])).unwrap();
        assert_eq!(*r.seen.lock().unwrap(), [vec![1], vec![], vec![5]]);
        assert_eq!(r.invalidated.load(Ordering::SeqCst), 0);
    }

    /// A dataplane handed over in doubt reconciles before its first
    /// batch, outside the bound.
    #[test]
    fn a_dataplane_handed_over_in_doubt_reconciles_first() {
        let (release, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut dp = Bounded::new(
            Box::new(Gate {
                release: rx,
                applied: Arc::default(),
                invalidated: Arc::default(),
                seen: seen.clone(),
                doubt: Arc::new(AtomicBool::new(true)),
                dropped: Arc::default(),
            }),
            Duration::from_secs(60),
        )
        .unwrap();
        let e = dp.apply(&batch(&[1])).unwrap_err();
        assert!(e.message.contains("reconciling"), "{e}");
        release.send(()).unwrap();
        eventually(|| !dp.reconciling.load(Ordering::SeqCst));
        release.send(()).unwrap();
        dp.apply(&batch(&[2])).unwrap();
        assert_eq!(*seen.lock().unwrap(), [vec![], vec![2]]);
    }

    /// A removal the server made must reach the NAT: the removals of a
    /// batch failed because the dataplane was busy go in front of the
    /// next batch that reaches it.
    #[test]
    fn removals_failed_while_busy_go_in_front_of_the_next_batch() {
        let mut r = rig(Duration::from_millis(20));
        r.dp.apply(&batch(&[1])).unwrap_err();
        let mut b = removals(&[2]);
        b.extend(batch(&[3]));
        assert_eq!(r.dp.apply(&b).unwrap_err().failed, [2, 3]);
        r.release.send(()).unwrap();
        r.release.send(()).unwrap();
        r.dp.timeout = Duration::from_secs(60);
        r.dp.apply(&removals(&[4])).unwrap();
        assert_eq!(*r.seen.lock().unwrap(), [vec![1], vec![2, 4]]);
    }

    /// A takeover replaces the dataplane: dropping the old one waits for
    /// its thread, so the old dataplane (whose drop may flush the table)
    /// is gone before the new one programs anything.
    #[test]
    fn dropping_waits_for_a_late_batch_and_the_dataplane_drop() {
        let mut r = rig(Duration::from_millis(20));
        r.dp.apply(&batch(&[1])).unwrap_err();
        let release = r.release.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let _ = release.send(());
        });
        drop(r.dp);
        assert!(r.dropped.load(Ordering::SeqCst));
        t.join().unwrap();
    }

    #[test]
    fn a_panicking_dataplane_fails_the_whole_batch_and_is_invalidated() {
        struct Boom(Arc<AtomicUsize>);
        impl Dataplane for Boom {
            fn name(&self) -> &'static str {
                "boom"
            }
            fn apply(&mut self, _: &[ChangeRecord]) -> Result<(), DataplaneError> {
                std::panic::panic_any("dataplane bug")
            }
            fn invalidate(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let n = Arc::new(AtomicUsize::new(0));
        let mut dp = Bounded::new(Box::new(Boom(n.clone())), Duration::from_secs(60)).unwrap();
        assert_eq!(dp.apply(&batch(&[7, 8])).unwrap_err().failed, [7, 8]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        // The thread survives the panic.
        assert_eq!(dp.apply(&batch(&[9])).unwrap_err().failed, [9]);
    }
}
