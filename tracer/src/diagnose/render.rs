//! How the report is written out: the text layout (`Display for Report`), and the number,
//! duration, label and JSON-row helpers that the findings share.
use std::fmt;
use std::net::SocketAddr;

use serde_json::{Value, json};
use tracer_core::model::{Comm, Tuple};

use crate::diagnose::{ProcKey, Report, Severity};

/// Text width of the human report.
const WIDTH: usize = 96;

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        let watched = human_seconds(self.duration_seconds);
        let conns = format!(
            "{} opened, {} closed",
            plural(self.connections_opened, "connection", "connections"),
            grouped(self.connections_closed)
        );
        if self.findings.is_empty() {
            wrap(
                &mut out,
                "",
                "",
                &format!("No TCP problems seen in {watched} ({conns})."),
            );
        } else {
            let problems = self.problems() as u64;
            let notices = self.findings.len() as u64 - problems;
            wrap(
                &mut out,
                "",
                "",
                &format!(
                    "TCP diagnosis over {watched} ({conns}): {}, {}.",
                    plural(problems, "problem", "problems"),
                    plural(notices, "notice", "notices")
                ),
            );
        }
        let warnings = [
            (self.events_lost > 0).then(|| {
                format!(
                    "{} lost (the kernel's ring buffer was full): the numbers in this report \
                     are lower bounds.",
                    plural(self.events_lost, "event was", "events were")
                )
            }),
            (self.softirqs_unobserved > 0).then(|| {
                format!(
                    "the kernel ran {} without any BPF program: what TCP did in them is \
                     missing, and the numbers in this report are lower bounds.",
                    plural(self.softirqs_unobserved, "softirq", "softirqs")
                )
            }),
        ];
        for warning in warnings.iter().flatten() {
            wrap(&mut out, "warning: ", "         ", warning);
        }
        for finding in &self.findings {
            out.push('\n');
            let tag = match finding.severity {
                Severity::Problem => "[PROBLEM] ",
                Severity::Notice => "[NOTICE] ",
            };
            wrap(&mut out, tag, &" ".repeat(tag.len()), &finding.title);
            const INDENT: &str = "            ";
            wrap(&mut out, "  measured: ", INDENT, &finding.measured);
            wrap(&mut out, "  why:      ", INDENT, &finding.why);
            wrap(&mut out, "  do:       ", INDENT, &finding.action);
            for line in &finding.lines {
                wrap(&mut out, "    ", "      ", line);
            }
        }
        f.write_str(out.trim_end_matches('\n'))
    }
}

/// Appends `text` wrapped at `WIDTH` columns: `first` starts the first line, `rest` the others.
/// Breaks only at ASCII spaces.
fn wrap(out: &mut String, first: &str, rest: &str, text: &str) {
    let mut line = first.to_owned();
    let mut width = first.chars().count();
    let mut empty = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = word.chars().count();
        if !empty && width + 1 + len > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = rest.to_owned();
            width = rest.chars().count();
            empty = true;
        }
        if !empty {
            line.push(' ');
            width += 1;
        }
        line.push_str(word);
        width += len;
        empty = false;
    }
    out.push_str(&line);
    out.push('\n');
}

/// Capitalised, ending with a full stop.
pub(super) fn sentence(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

/// `1 234 567`, grouped with no-break spaces so that a line is never wrapped inside a number.
pub(super) fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 * 2);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{a0}');
        }
        out.push(c);
    }
    out
}

/// `1 stall`, `2 stalls`.
pub(super) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", grouped(n), if n == 1 { one } else { many })
}

/// `0.8` as `80%`.
pub(super) fn percent(ratio: f64) -> String {
    format!("{:.0}%", ratio * 100.0)
}

/// Nanoseconds as fractional milliseconds, the unit of the JSON durations.
pub(super) fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Nanoseconds as fractional seconds.
pub(super) fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A duration in the unit a person would use: `0.35 ms`, `41 ms`, `1.5 s`, `2 min 5 s`.
pub(super) fn human_ns(ns: u64) -> String {
    let ms = ms(ns);
    if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1_000.0 {
        format!("{ms:.0} ms")
    } else {
        human_seconds(ms / 1_000.0)
    }
}

fn human_seconds(s: f64) -> String {
    if s < 10.0 {
        let text = format!("{s:.1}");
        format!("{} s", text.strip_suffix(".0").unwrap_or(&text))
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else {
        let whole = s.round() as u64;
        match whole % 60 {
            0 => format!("{} min", whole / 60),
            rest => format!("{} min {rest} s", whole / 60),
        }
    }
}

/// `comm (pid N)`, or `unknown process`.
pub(super) fn proc_label(key: &ProcKey) -> String {
    match key {
        Some((pid, comm)) => format!("{} (pid {pid})", Comm(*comm).as_str()),
        None => "unknown process".to_owned(),
    }
}

/// `{"pid", "comm"}`, or null when unknown.
pub(super) fn proc_json(key: &ProcKey) -> Value {
    match key {
        Some((pid, comm)) => json!({"pid": pid, "comm": Comm(*comm).as_str().into_owned()}),
        None => Value::Null,
    }
}

/// `local -> remote`.
pub(super) fn tuple_label(tuple: &Tuple) -> String {
    format!(
        "{} -> {}",
        SocketAddr::new(tuple.src, tuple.sport),
        SocketAddr::new(tuple.dst, tuple.dport)
    )
}

/// The addressing fields of a per-connection JSON row.
pub(super) fn conn_json(netns: u32, tuple: &Tuple) -> Value {
    json!({
        "netns": netns,
        "local": SocketAddr::new(tuple.src, tuple.sport).to_string(),
        "remote": SocketAddr::new(tuple.dst, tuple.dport).to_string(),
    })
}

/// Adds the fields of the object `more` to the object `row`.
pub(super) fn extend(row: &mut Value, more: Value) {
    if let (Value::Object(row), Value::Object(more)) = (row, more) {
        row.extend(more);
    }
}

#[cfg(test)]
mod tests {
    use tracer_core::model::{SockId, TcpState, TimerPhase};
    use tracer_core::testkit::{MS, time_wait, tuple};

    use super::*;
    use crate::diagnose::test_support::{Run, context, ip, stalls, sysctls};
    use crate::diagnose::{DiagnoseConfig, ReportContext};
    use crate::kernel::system::TcpSysctls;

    #[test]
    fn lost_events_make_the_numbers_lower_bounds() {
        let run = Run::new(DiagnoseConfig::default());
        let report = run.diagnosis.report_with_owners(
            &run.tracker,
            &ReportContext {
                events_lost: 1234,
                ..context(sysctls())
            },
            |_, _| None,
        );
        let text = report.to_string();
        assert!(
            text.contains("warning: 1\u{a0}234 events were lost"),
            "{text}"
        );
        assert!(text.contains("lower bounds"), "{text}");
        assert!(!text.contains("softirq"), "{text}");
    }

    #[test]
    fn softirqs_run_without_the_programs_make_the_numbers_lower_bounds() {
        let run = Run::new(DiagnoseConfig::default());
        let report = run.diagnosis.report_with_owners(
            &run.tracker,
            &ReportContext {
                softirqs_unobserved: 3,
                ..context(sysctls())
            },
            |_, _| None,
        );
        let text = report.to_string();
        assert!(
            text.contains("warning: the kernel ran 3 softirqs without any BPF program"),
            "{text}"
        );
        assert!(!text.contains("events were lost"), "{text}");
    }

    #[test]
    fn text_stays_within_the_terminal_width() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.tracker
            .time_wait_mut()
            .set_ephemeral_ports((40000, 40099));
        run.feed(&stalls(12));
        for i in 0..80u16 {
            let t = tuple(ip(1), 40000 + i, ip(2), 80);
            run.feed(&[time_wait(
                u64::from(i),
                0xa000 + SockId::from(i),
                t,
                TcpState::TimeWait,
                TimerPhase::Start,
            )]);
        }
        let report = run.report(TcpSysctls {
            ip_local_port_range: Some((40000, 40099)),
            ..sysctls()
        });
        let text = report.to_string();
        println!("{text}");
        for line in text.lines() {
            assert!(line.chars().count() < 100, "too wide: {line}");
        }
    }

    #[test]
    fn human_units() {
        assert_eq!(grouped(1_234_567), "1\u{a0}234\u{a0}567");
        assert_eq!(grouped(999), "999");
        assert_eq!(human_ns(41 * MS), "41 ms");
        assert_eq!(human_ns(1_500 * MS), "1.5 s");
        assert_eq!(human_ns(350_000), "0.35 ms");
        assert_eq!(human_seconds(30.0), "30 s");
        assert_eq!(human_seconds(125.0), "2 min 5 s");
        assert_eq!(sentence("set it"), "Set it.");
    }
}
