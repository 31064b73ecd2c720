//! The listen-overflow worker of `tracer run`: every few seconds, on a thread of its own (one
//! sock_diag dump and two small files per network namespace, too slow for the event loop),
//! reads every namespace's listeners and overflow counter into the metrics.
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use crate::export::metrics::Metrics;
use crate::host::listeners;

/// How often the listeners are read.
pub const REFRESH: Duration = Duration::from_secs(5);

/// The running worker; dropping it asks it to stop (a read in progress is not waited for:
/// the process is about to exit).
pub struct ListenWorker {
    stop: Option<mpsc::Sender<()>>,
}

impl ListenWorker {
    /// Starts reading at once, then every `REFRESH`; `top_n` ports get their own series.
    pub fn start(metrics: Arc<Metrics>, top_n: usize) -> std::io::Result<ListenWorker> {
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("tracer-listen".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    match listeners::everywhere() {
                        Ok(snapshot) => {
                            metrics.listen.update(&snapshot, top_n);
                            if failing {
                                log::info!("listen overflows: reading listeners again");
                                failing = false;
                            }
                        }
                        // Said once, not every refresh.
                        Err(e) if !failing => {
                            log::warn!("listen overflows: cannot read the listeners: {e}");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                    match stopped.recv_timeout(REFRESH) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            })?;
        Ok(ListenWorker { stop: Some(stop) })
    }
}

impl Drop for ListenWorker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
