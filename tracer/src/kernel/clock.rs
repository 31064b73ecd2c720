//! The clocks: kernel event timestamps are CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`);
//! events are written in wall-clock time (formatted with `jiff`).
use std::fmt;
use std::io;

use serde::Serialize;
use serde::ser::Serializer;

/// Converts kernel timestamps (CLOCK_MONOTONIC nanoseconds, as from `bpf_ktime_get_ns`) to wall
/// clock time. The offset between the clocks is read once: a later step of the wall clock (NTP,
/// `date -s`) is not followed, which keeps the events of one run consistently spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in nanoseconds.
    offset_ns: i64,
}

impl WallClock {
    /// Reads both clocks now.
    pub fn new() -> io::Result<WallClock> {
        // Monotonic on both sides of the real time read: their midpoint is the best estimate of
        // the monotonic time at that read.
        let before = clock_ns(libc::CLOCK_MONOTONIC)?;
        let real = clock_ns(libc::CLOCK_REALTIME)?;
        let after = clock_ns(libc::CLOCK_MONOTONIC)?;
        let mono = before + (after - before) / 2;
        Ok(WallClock {
            offset_ns: real.saturating_sub(mono),
        })
    }

    /// A clock with a fixed offset (realtime minus monotonic, in nanoseconds).
    pub fn with_offset(offset_ns: i64) -> WallClock {
        WallClock { offset_ns }
    }

    pub fn offset_ns(&self) -> i64 {
        self.offset_ns
    }

    /// Nanoseconds since the Unix epoch for a CLOCK_MONOTONIC timestamp.
    pub fn unix_ns(&self, monotonic_ns: u64) -> i64 {
        i64::try_from(monotonic_ns)
            .unwrap_or(i64::MAX)
            .saturating_add(self.offset_ns)
    }

    /// The wall clock time of a CLOCK_MONOTONIC timestamp, displayed as RFC 3339.
    pub fn rfc3339(&self, monotonic_ns: u64) -> Rfc3339 {
        Rfc3339(self.unix_ns(monotonic_ns))
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of the kernel's event timestamps
/// (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC).map_or(0, |ns| u64::try_from(ns).unwrap_or(0))
}

#[allow(
    clippy::useless_conversion,
    reason = "time_t and c_long are i64 on 64-bit targets only"
)]
fn clock_ns(clock: libc::clockid_t) -> io::Result<i64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call; clock_gettime only
    // writes to it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i64::from(ts.tv_sec)
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(ts.tv_nsec)))
}

/// Unix nanoseconds as a UTC timestamp, truncated to `unit` nanoseconds (the documented format
/// truncates rather than rounds).
fn timestamp(unix_ns: i64, unit: i64) -> Option<jiff::Timestamp> {
    jiff::Timestamp::from_nanosecond(i128::from(unix_ns.div_euclid(unit) * unit)).ok()
}

/// Unix time in nanoseconds, displayed as RFC 3339 UTC with microseconds
/// (`2026-11-23T12:00:00.123456Z`; truncated, not rounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rfc3339(pub i64);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match timestamp(self.0, 1_000) {
            Some(ts) => write!(f, "{ts:.6}"),
            // Past jiff's range (years beyond ±9999): no realistic clock gets there.
            None => write!(f, "@{}ns", self.0),
        }
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Unix time in nanoseconds, displayed as the UTC time of day with milliseconds
/// (`12:00:00.123`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeOfDay(pub i64);

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match timestamp(self.0, 1_000_000) {
            Some(ts) => {
                let t = ts.to_zoned(jiff::tz::TimeZone::UTC).time();
                write!(
                    f,
                    "{:02}:{:02}:{:02}.{:03}",
                    t.hour(),
                    t.minute(),
                    t.second(),
                    t.millisecond()
                )
            }
            None => f.write_str("--:--:--.---"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;
    /// 2026-11-23T12:00:00Z.
    const WALL: i64 = 1_795_435_200 * SEC;

    #[test]
    fn rfc3339_known_timestamps() {
        let cases: [(i64, &str); 8] = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400_123_456_789, "2000-02-29T00:00:00.123456Z"),
            (WALL + 123_456_789, "2026-11-23T12:00:00.123456Z"),
            (951_868_799_999_999_999, "2000-02-29T23:59:59.999999Z"),
            (951_868_800_000_000_000, "2000-03-01T00:00:00.000000Z"),
            (1_704_067_199_000_001_000, "2023-12-31T23:59:59.000001Z"),
            (4_107_542_400 * SEC, "2100-03-01T00:00:00.000000Z"),
            (-1_000, "1969-12-31T23:59:59.999999Z"),
        ];
        for (ns, expected) in cases {
            assert_eq!(Rfc3339(ns).to_string(), expected, "{ns}");
        }
        assert_eq!(TimeOfDay(WALL + 123_456_789).to_string(), "12:00:00.123");
        assert_eq!(TimeOfDay(-1_000_000).to_string(), "23:59:59.999");
    }

    #[test]
    fn wall_clock_from_the_system_is_close_to_system_time() {
        let clock = WallClock::new().unwrap();
        let mono = clock_ns(libc::CLOCK_MONOTONIC).unwrap();
        let wall = clock.unix_ns(mono as u64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        assert!((now - wall).abs() < SEC, "{now} vs {wall}");
        assert_eq!(clock.rfc3339(mono as u64), Rfc3339(wall));
    }
}
