//! Which workloads each finding is about: the tallies of the topics by the cgroup of the
//! connection (which service's clients hold the TIME_WAIT ports, which container leaks
//! CLOSE_WAIT sockets), named at report time, and shown with each finding (`details.workloads`
//! and a `workloads:` line).
use std::collections::HashMap;

use serde_json::{Value, json};

use super::Finding;

/// The label of connections whose cgroup is not known.
const UNKNOWN: &str = "unknown";

/// Per topic, the count by cgroup id (0: unknown), at most `cap` ids per topic (the rest
/// summed under id 0).
#[derive(Clone, Debug, Default)]
pub(super) struct ByWorkload {
    cap: usize,
    counts: HashMap<&'static str, HashMap<u64, u64>>,
    /// Set by [`ByWorkload::name`]: each id's workload name.
    names: HashMap<u64, String>,
}

impl ByWorkload {
    pub(super) fn new(cap: usize) -> ByWorkload {
        ByWorkload {
            cap,
            ..ByWorkload::default()
        }
    }

    pub(super) fn add(&mut self, topic: &'static str, cgroup: u64, n: u64) {
        let by_id = self.counts.entry(topic).or_default();
        let key = if by_id.len() >= self.cap && !by_id.contains_key(&cgroup) {
            0
        } else {
            cgroup
        };
        let count = by_id.entry(key).or_default();
        *count = count.saturating_add(n);
    }

    /// The cgroup ids tallied, to be named.
    pub(super) fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .counts
            .values()
            .flat_map(|by_id| by_id.keys().copied())
            .filter(|id| *id != 0)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Names the ids tallied (`name_of`: `None` when not known).
    pub(super) fn name(&mut self, name_of: impl Fn(u64) -> Option<String>) {
        for id in self.ids() {
            if let Some(name) = name_of(id) {
                self.names.insert(id, name);
            }
        }
    }

    /// The top `n` workloads of `topic`, by count (ties by name).
    pub(super) fn top(&self, topic: &str, n: usize) -> Vec<(String, u64)> {
        let Some(by_id) = self.counts.get(topic) else {
            return Vec::new();
        };
        let mut by_name: HashMap<&str, u64> = HashMap::new();
        for (id, count) in by_id {
            let name = self.names.get(id).map_or(UNKNOWN, String::as_str);
            *by_name.entry(name).or_default() += count;
        }
        let mut ranked: Vec<(String, u64)> = by_name
            .into_iter()
            .map(|(name, count)| (name.to_owned(), count))
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ranked.truncate(n);
        ranked
    }

    /// Adds the workloads of `finding`'s topic to it, when any is named.
    pub(super) fn annotate(&self, finding: &mut Finding, n: usize) {
        let top = self.top(finding.topic, n);
        if top.iter().all(|(name, _)| name == UNKNOWN) {
            return;
        }
        let rows: Vec<Value> = top
            .iter()
            .map(|(name, count)| json!({"workload": name, "count": count}))
            .collect();
        if let Value::Object(details) = &mut finding.details {
            details.insert("workloads".to_owned(), Value::Array(rows));
        }
        let text: Vec<String> = top
            .iter()
            .map(|(name, count)| format!("{} ({count})", name.escape_debug()))
            .collect();
        finding
            .lines
            .push(format!("workloads: {}", text.join(", ")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::{Severity, TOPIC_CLOSE_WAIT};

    #[test]
    fn names_and_ranks_the_workloads_of_a_topic() {
        let mut by = ByWorkload::new(2);
        by.add(TOPIC_CLOSE_WAIT, 7, 3);
        by.add(TOPIC_CLOSE_WAIT, 8, 5);
        by.add(TOPIC_CLOSE_WAIT, 9, 1); // past the cap: unknown
        by.name(|id| (id == 8).then(|| "docker/0123456789ab".to_owned()));
        assert_eq!(
            by.top(TOPIC_CLOSE_WAIT, 5),
            vec![
                ("docker/0123456789ab".to_owned(), 5),
                ("unknown".to_owned(), 4)
            ]
        );
        let mut finding = Finding {
            topic: TOPIC_CLOSE_WAIT,
            severity: Severity::Problem,
            title: String::new(),
            measured: String::new(),
            why: String::new(),
            action: String::new(),
            details: json!({}),
            lines: Vec::new(),
        };
        by.annotate(&mut finding, 1);
        assert_eq!(finding.lines, ["workloads: docker/0123456789ab (5)"]);
        assert_eq!(
            finding.details["workloads"][0]["workload"],
            "docker/0123456789ab"
        );
    }
}
