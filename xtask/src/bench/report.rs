//! Summaries (median and spread), a small JSON writer and number formatting.
use std::fmt::Write as _;

/// Median, min and max of a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            n,
        })
    }

    pub fn json(&self) -> Json {
        Json::obj([
            ("median", Json::num(self.median)),
            ("min", Json::num(self.min)),
            ("max", Json::num(self.max)),
            ("n", Json::num(self.n as f64)),
        ])
    }
}

/// A JSON value, written compactly but with one member per line at the top levels.
#[derive(Debug, Clone)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn num(value: f64) -> Self {
        if value.is_finite() {
            Json::Num(value)
        } else {
            Json::Null
        }
    }

    pub fn opt(value: Option<f64>) -> Self {
        value.map_or(Json::Null, Json::num)
    }

    pub fn str(value: impl Into<String>) -> Self {
        Json::Str(value.into())
    }

    pub fn opt_str(value: Option<&str>) -> Self {
        value.map_or(Json::Null, Json::str)
    }

    pub fn obj<K: Into<String>>(members: impl IntoIterator<Item = (K, Json)>) -> Self {
        Json::Obj(members.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => {
                if n.fract() == 0.0 && n.abs() < 1e15 {
                    let _ = write!(out, "{}", *n as i64);
                } else {
                    let _ = write!(out, "{}", (n * 1e6).round() / 1e6);
                }
            }
            Json::Str(s) => write_str(out, s),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, depth + 1);
                }
                out.push(']');
            }
            Json::Obj(members) => {
                let pretty = depth < 3;
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        if !pretty {
                            out.push(' ');
                        }
                    }
                    if pretty {
                        out.push('\n');
                        out.push_str(&"  ".repeat(depth + 1));
                    }
                    write_str(out, key);
                    out.push_str(": ");
                    value.write(out, depth + 1);
                }
                if pretty && !members.is_empty() {
                    out.push('\n');
                    out.push_str(&"  ".repeat(depth));
                }
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// 48213.7 → "48 214" (thin thousands grouping, no decimals).
pub fn int(value: f64) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    let rounded = value.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    if rounded < 0 {
        out.insert(0, '-');
    }
    out
}

/// Bytes from KiB, in MiB with one decimal.
pub fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn json_renders_and_escapes() {
        let j = Json::obj([
            ("a", Json::num(1.0)),
            ("b", Json::str("x\"y\n")),
            (
                "c",
                Json::Arr(vec![Json::Null, Json::Bool(true), Json::num(0.5)]),
            ),
            ("d", Json::num(f64::NAN)),
        ]);
        assert_eq!(
            j.render(),
            "{\n  \"a\": 1,\n  \"b\": \"x\\\"y\\n\",\n  \"c\": [null, true, 0.5],\n  \"d\": null\n}\n"
        );
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(int(48213.7), "48 214");
        assert_eq!(int(999.0), "999");
        assert_eq!(int(1_000_000.0), "1 000 000");
        assert_eq!(int(-1234.0), "-1 234");
    }
}
