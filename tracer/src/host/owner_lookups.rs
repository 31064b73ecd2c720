//! Owner lookups off the event path. Finding the process that holds a socket takes a sock_diag
//! dump and a walk of every `/proc/PID/fd` (milliseconds on a quiet host, much more on a busy
//! one), so it runs on one worker thread behind a bounded queue, at a bounded rate; the event
//! loop only queues a request and later collects what finished. A request that does not fit the
//! queue is refused at once and the caller reports without an owner.
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tracer_core::model::{Owner, Tuple};
use tracer_core::record::CloseWaitLeak;

/// Lookups waiting at most; past it requests are refused.
pub const QUEUE: usize = 64;
/// Lookups started per second at most: each walks the whole of `/proc`.
pub const PER_SECOND: u32 = 20;

pub struct OwnerLookups {
    requests: Option<SyncSender<CloseWaitLeak>>,
    results: Receiver<CloseWaitLeak>,
    worker: Option<std::thread::JoinHandle<()>>,
    pending: usize,
    refused: u64,
}

impl OwnerLookups {
    /// Starts the worker with `lookup` (normally [`super::proc_owners::socket_owner`]).
    pub fn start(
        lookup: impl Fn(u32, &Tuple) -> Option<Owner> + Send + 'static,
        queue: usize,
        per_second: u32,
    ) -> std::io::Result<OwnerLookups> {
        let (requests, inbox) = std::sync::mpsc::sync_channel::<CloseWaitLeak>(queue);
        let (outbox, results) = std::sync::mpsc::channel();
        let spacing = Duration::from_secs(1) / per_second.max(1);
        let worker = std::thread::Builder::new()
            .name("tracer-owners".into())
            .spawn(move || {
                let mut next = Instant::now();
                // Ends when the event loop drops its sender.
                while let Ok(mut leak) = inbox.recv() {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    next = Instant::now() + spacing;
                    leak.owner = lookup(leak.netns, &leak.tuple);
                    if outbox.send(leak).is_err() {
                        return;
                    }
                }
            })?;
        Ok(OwnerLookups {
            requests: Some(requests),
            results,
            worker: Some(worker),
            pending: 0,
            refused: 0,
        })
    }

    /// Queues a lookup for `leak`; `false` (and counted) when the queue is full.
    pub fn request(&mut self, leak: CloseWaitLeak) -> bool {
        let Some(requests) = &self.requests else {
            return false;
        };
        match requests.try_send(leak) {
            Ok(()) => {
                self.pending += 1;
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.refused += 1;
                false
            }
        }
    }

    /// The leaks whose lookup finished since the last call, owner filled in where found.
    pub fn finished(&mut self) -> Vec<CloseWaitLeak> {
        let done: Vec<CloseWaitLeak> = self.results.try_iter().collect();
        self.pending = self.pending.saturating_sub(done.len());
        done
    }

    /// Lookups queued or running.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Requests refused because the queue was full.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// At shutdown: the lookups that finish within `timeout`; the rest are abandoned.
    pub fn finish(&mut self, timeout: Duration) -> Vec<CloseWaitLeak> {
        self.requests = None;
        let deadline = Instant::now() + timeout;
        let mut done = Vec::new();
        while self.pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.results.recv_timeout(left) {
                Ok(leak) => {
                    self.pending -= 1;
                    done.push(leak);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        if self.pending == 0
            && let Some(worker) = self.worker.take()
        {
            let _ = worker.join();
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::{Arc, Mutex};

    use super::*;
    use tracer_core::model::{Comm, Direction};

    fn leak(port: u16) -> CloseWaitLeak {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        CloseWaitLeak {
            netns: 1,
            tuple: Tuple {
                src: lo,
                sport: port,
                dst: lo,
                dport: 80,
            },
            since_ns: 0,
            detected_ns: 1,
            direction: Direction::Passive,
            owner: None,
            cgroup: 0,
            seeded: false,
        }
    }

    /// A lookup that blocks until the test lets it go: requests must not wait for it.
    #[test]
    fn requests_never_wait_for_the_lookup_and_the_queue_is_bounded() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let worker_gate = Arc::clone(&gate);
        let mut lookups = OwnerLookups::start(
            move |_, tuple| {
                let _open = worker_gate.lock().unwrap();
                Some(Owner {
                    pid: u32::from(tuple.sport),
                    comm: Comm::from("server"),
                })
            },
            2,
            1_000,
        )
        .unwrap();
        // The worker takes the first and blocks in the lookup; two more fill the queue.
        let accepted: Vec<bool> = (1..=6).map(|port| lookups.request(leak(port))).collect();
        assert!(accepted[0] && accepted[1]);
        assert!(!accepted[5], "a full queue refuses at once: {accepted:?}");
        let queued = accepted.iter().filter(|a| **a).count();
        assert_eq!(lookups.refused(), (6 - queued) as u64);
        assert!(
            lookups.finished().is_empty(),
            "nothing finished while the gate is shut"
        );
        drop(held);
        let done = lookups.finish(Duration::from_secs(30));
        assert_eq!(done.len(), queued);
        for leak in done {
            assert_eq!(leak.owner.map(|o| o.pid), Some(u32::from(leak.tuple.sport)));
        }
    }

    #[test]
    fn an_owner_not_found_comes_back_as_none() {
        let mut lookups = OwnerLookups::start(|_, _| None, QUEUE, PER_SECOND).unwrap();
        assert!(lookups.request(leak(9)));
        let done = lookups.finish(Duration::from_secs(30));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].owner, None);
        assert_eq!(lookups.pending(), 0);
    }
}
