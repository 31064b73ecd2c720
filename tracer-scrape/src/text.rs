//! The Prometheus text exposition format (version 0.0.4), as the agent serves it: `# HELP` and
//! `# TYPE` lines, samples with labels, values and optional timestamps. A line that does not
//! follow the format is an error naming the line, never skipped.
use std::collections::BTreeMap;
use std::fmt;

/// One sample: a series name (a histogram's `_bucket`, `_sum` and `_count` are each their own
/// name), its labels in the order written, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether every `(key, value)` of `labels` is among the sample's labels.
    pub fn has_labels(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// A line of the exposition that does not follow the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub message: String,
    pub text: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {:?}", self.line, self.message, self.text)
    }
}

impl std::error::Error for ParseError {}

/// A parsed exposition: every sample in order, and the declared type of every family.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Exposition, ParseError> {
        let mut exposition = Exposition::default();
        for (index, raw) in text.lines().enumerate() {
            let error = |message: &str| ParseError {
                line: index + 1,
                message: message.to_owned(),
                text: raw.to_owned(),
            };
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                exposition.comment(comment).map_err(&error)?;
                continue;
            }
            let sample = parse_sample(line).map_err(&error)?;
            exposition.samples.push(sample);
        }
        Ok(exposition)
    }

    /// `# TYPE name type` is recorded; `# HELP` and other comments only need to be comments.
    fn comment(&mut self, comment: &str) -> Result<(), &'static str> {
        let mut words = comment.split_whitespace();
        if words.next() != Some("TYPE") {
            return Ok(());
        }
        let (Some(name), Some(kind), None) = (words.next(), words.next(), words.next()) else {
            return Err("`# TYPE` takes a metric name and a type");
        };
        if !is_metric_name(name) {
            return Err("bad metric name in `# TYPE`");
        }
        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
            return Err("unknown metric type");
        }
        if self
            .types
            .insert(name.to_owned(), kind.to_owned())
            .is_some()
        {
            return Err("a second `# TYPE` for the same family");
        }
        Ok(())
    }

    /// Every sample, in the order of the exposition.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    pub fn into_samples(self) -> Vec<Sample> {
        self.samples
    }

    /// The `# TYPE` of every family, by family name.
    pub fn types(&self) -> &BTreeMap<String, String> {
        &self.types
    }

    /// The `# TYPE` of family `family`, if declared.
    pub fn family_type(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }

    /// The family a series name belongs to: itself when it is a declared family, or the
    /// histogram whose `_bucket`, `_sum` or `_count` it is, or the summary whose `_sum` or
    /// `_count` it is.
    pub fn family_of<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if self.types.contains_key(name) {
            return Some(name);
        }
        let part_of = |suffix: &str, kinds: &[&str]| {
            let base = name.strip_suffix(suffix)?;
            kinds.contains(&self.family_type(base)?).then_some(base)
        };
        part_of("_bucket", &["histogram"])
            .or_else(|| part_of("_sum", &["histogram", "summary"]))
            .or_else(|| part_of("_count", &["histogram", "summary"]))
    }

    /// The samples named `name` whose labels include all of `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.has_labels(labels))
            .collect()
    }

    /// The sum of the samples named `name` whose labels include all of `labels`; `None` when
    /// there is none, so that a caller tells "absent" from "0".
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .iter()
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `name{key="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .ok_or("a sample without a value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err("bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.trim_start().strip_prefix('{') {
        let (parsed, after) = parse_labels(after)?;
        labels = parsed;
        rest = after;
    }
    if !rest.starts_with(|c: char| c.is_ascii_whitespace()) {
        return Err("no blank between the series and its value");
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = parse_value(fields.next().ok_or("a sample without a value")?)?;
    if let Some(timestamp) = fields.next()
        && timestamp.parse::<i64>().is_err()
    {
        return Err("the timestamp is not an integer");
    }
    if fields.next().is_some() {
        return Err("text after the timestamp");
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

type Labels = Vec<(String, String)>;

/// The labels after `{`, up to and including `}`; returns them and what follows.
fn parse_labels(mut rest: &str) -> Result<(Labels, &str), &'static str> {
    let mut labels = Labels::new();
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (key, after) = rest.split_once('=').ok_or("a label without `=`")?;
        let key = key.trim();
        if !is_label_name(key) {
            return Err("bad label name");
        }
        if labels.iter().any(|(k, _)| k == key) {
            return Err("a label given twice");
        }
        let after = after
            .trim_start()
            .strip_prefix('"')
            .ok_or("a label value that is not quoted")?;
        let (value, after) = parse_label_value(after)?;
        labels.push((key.to_owned(), value));
        rest = after.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by `,` or ended by `}`");
        }
    }
}

/// A label value after its opening quote, with `\\`, `\"` and `\n` unescaped; returns it and
/// what follows the closing quote.
fn parse_label_value(text: &str) -> Result<(String, &str), &'static str> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[at + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                _ => return Err("an unknown escape in a label value"),
            },
            c => value.push(c),
        }
    }
    Err("an unterminated label value")
}

/// A Go float as Prometheus writes it: `NaN`, `+Inf`, `-Inf` or a decimal number.
fn parse_value(text: &str) -> Result<f64, &'static str> {
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        // Rust would also read `inf` and `infinity`, which Prometheus does not write.
        _ if text
            .bytes()
            .any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E') =>
        {
            Err("the value is not a number")
        }
        _ => text.parse().map_err(|_| "the value is not a number"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP a_total A.\n# TYPE a_total counter\n\
        a_total{direction=\"active\",close=\"local\"} 3\n\
        a_total{direction=\"passive\",close=\"lo,c\\\"al=}\"} 4\n\
        a_total_other 100\n\
        # TYPE h_seconds histogram\n\
        h_seconds_bucket{direction=\"active\",le=\"0.5\"} 1\n\
        h_seconds_bucket{direction=\"active\",le=\"+Inf\"} 2\n\
        h_seconds_sum{direction=\"active\"} 1.5e-3\n\
        h_seconds_count{direction=\"active\"} 2\n\
        \n\
        b 1.5e3 1700000000000\n\
        c{path=\"C:\\\\dir\",text=\"two\\nlines\",} +Inf\n";

    #[test]
    fn reads_labels_escapes_histograms_and_values() {
        let page = Exposition::parse(PAGE).unwrap();
        assert_eq!(page.samples().len(), 9);
        assert_eq!(page.sum("a_total", &[]), Some(7.0));
        assert_eq!(page.sum("a_total", &[("direction", "active")]), Some(3.0));
        assert_eq!(page.sum("a_total", &[("close", "lo,c\"al=}")]), Some(4.0));
        assert_eq!(page.sum("a_total", &[("close", "remote")]), None);
        assert_eq!(page.sum("missing", &[]), None);
        assert_eq!(page.sum("b", &[]), Some(1500.0));
        let c = &page.matching("c", &[])[0];
        assert_eq!(c.label("path"), Some("C:\\dir"));
        assert_eq!(c.label("text"), Some("two\nlines"));
        assert_eq!(c.value, f64::INFINITY);
        assert_eq!(page.sum("h_seconds_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(page.sum("h_seconds_sum", &[]), Some(0.0015));
        assert_eq!(page.sum("h_seconds_count", &[]), Some(2.0));
        assert_eq!(page.family_type("a_total"), Some("counter"));
        assert_eq!(page.family_type("h_seconds"), Some("histogram"));
        assert_eq!(page.family_type("b"), None);
        assert_eq!(page.types().len(), 2);
    }

    #[test]
    fn sum_adds_label_sets_and_ignores_longer_names() {
        let page = Exposition::parse(
            "tracer_events_total{kind=\"state\"} 10\n\
             tracer_events_total{kind=\"reset\"} 2\n\
             tracer_events_total_other 100\n\
             tracer_events_lost_total 0\n",
        )
        .unwrap();
        assert_eq!(page.sum("tracer_events_total", &[]), Some(12.0));
        assert_eq!(page.sum("tracer_events_lost_total", &[]), Some(0.0));
        assert_eq!(page.sum("tracer_events", &[]), None);
    }

    #[test]
    fn family_of_maps_histogram_and_summary_series_to_their_family() {
        let page = Exposition::parse(
            "# TYPE tracer_a_seconds histogram\n# TYPE tracer_b_count gauge\n\
             # TYPE tracer_q summary\n",
        )
        .unwrap();
        assert_eq!(
            page.family_of("tracer_a_seconds_bucket"),
            Some("tracer_a_seconds")
        );
        assert_eq!(
            page.family_of("tracer_a_seconds_count"),
            Some("tracer_a_seconds")
        );
        assert_eq!(page.family_of("tracer_b_count"), Some("tracer_b_count"));
        assert_eq!(page.family_of("tracer_b_sum"), None);
        assert_eq!(page.family_of("tracer_q_sum"), Some("tracer_q"));
        assert_eq!(page.family_of("tracer_q_bucket"), None);
        assert_eq!(page.family_of("tracer_c_total"), None);
    }

    #[test]
    fn malformed_lines_are_errors_with_their_number() {
        for (bad, line) in [
            ("a 1\nb{x=\"1\" 2\n", 2),
            ("a{x=\"1} 2\n", 1),
            ("a{x=1} 2\n", 1),
            ("a{x=\"\\t\"} 2\n", 1),
            ("a{x=\"1\",x=\"2\"} 2\n", 1),
            ("a{1x=\"1\"} 2\n", 1),
            ("a\n", 1),
            ("a one\n", 1),
            ("a inf\n", 1),
            ("a 1 2 3\n", 1),
            ("a 1 1.5\n", 1),
            ("a{x=\"1\"}2\n", 1),
            ("1a 2\n", 1),
            ("# TYPE a counter\n# TYPE a gauge\n", 2),
            ("# TYPE a countr\n", 1),
        ] {
            let error = Exposition::parse(bad).expect_err(bad);
            assert_eq!(error.line, line, "{bad:?}: {error}");
        }
    }
}
