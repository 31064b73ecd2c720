//! The kernel's tick rate (`CONFIG_HZ`): some socket fields count jiffies (the rwnd-limited
//! time of a connection), and the kernel exports no HZ to user space (`sysconf(_SC_CLK_TCK)` is
//! `USER_HZ`, always 100). Measured once at start-up: `/proc/timer_list` prints the current
//! `jiffies`; read twice a known time apart, the rate is rounded to the nearest of the values
//! the kernel can be built with (100, 250, 300, 1000). At 200 ms apart, a one-jiffy error is
//! 5 Hz, well inside the smallest gap (250 to 300).
use std::path::Path;
use std::time::{Duration, Instant};

const TIMER_LIST: &str = "/proc/timer_list";

/// The tick rates `CONFIG_HZ` can take.
const CANDIDATES: [u32; 4] = [100, 250, 300, 1000];

/// How far apart the two readings are.
const SPAN: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum HzError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} has no `jiffies:` line")]
    NoJiffies(String),
    #[error("jiffies did not advance over {0:?}")]
    Stalled(Duration),
}

/// The kernel's HZ, and the length of one jiffy in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hz(pub u32);

impl Hz {
    pub fn jiffy_ns(self) -> u64 {
        1_000_000_000 / u64::from(self.0.max(1))
    }
}

/// Measures HZ from `/proc/timer_list` (root only); blocks for about 200 ms.
pub fn measure() -> Result<Hz, HzError> {
    measure_from(Path::new(TIMER_LIST), SPAN)
}

fn measure_from(path: &Path, span: Duration) -> Result<Hz, HzError> {
    let (j0, t0) = (read_jiffies(path)?, Instant::now());
    std::thread::sleep(span);
    let (j1, t1) = (read_jiffies(path)?, Instant::now());
    let elapsed = t1.duration_since(t0);
    let ticks = j1.wrapping_sub(j0);
    if ticks == 0 {
        return Err(HzError::Stalled(elapsed));
    }
    Ok(nearest(ticks as f64 / elapsed.as_secs_f64()))
}

fn read_jiffies(path: &Path) -> Result<u64, HzError> {
    let text = std::fs::read_to_string(path).map_err(|source| HzError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_jiffies(&text).ok_or_else(|| HzError::NoJiffies(path.display().to_string()))
}

/// The first `jiffies: N` line (one per CPU, all the same counter).
fn parse_jiffies(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("jiffies:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The candidate HZ nearest to a measured rate.
fn nearest(rate: f64) -> Hz {
    let mut best = CANDIDATES[0];
    for c in CANDIDATES {
        if (f64::from(c) - rate).abs() < (f64::from(best) - rate).abs() {
            best = c;
        }
    }
    Hz(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jiffies_line_is_found_among_the_timer_list() {
        let text = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 1 nsecs\n\n\
                    cpu: 0\n  .idle_jiffies   : 4297639890\njiffies: 4297640448\n";
        assert_eq!(parse_jiffies(text), Some(4_297_640_448));
        assert_eq!(parse_jiffies("cpu: 0\n"), None);
    }

    #[test]
    fn rates_round_to_the_nearest_config_hz() {
        assert_eq!(nearest(96.0), Hz(100));
        assert_eq!(nearest(255.0), Hz(250));
        assert_eq!(nearest(290.0), Hz(300));
        assert_eq!(nearest(990.0), Hz(1000));
        assert_eq!(Hz(250).jiffy_ns(), 4_000_000);
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let err = measure_from(Path::new("/nonexistent/timer_list"), Duration::ZERO);
        assert!(matches!(err, Err(HzError::Read { .. })), "{err:?}");
    }
}
