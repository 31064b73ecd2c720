//! A bounded breakdown by workload: the N most active labels keep their own series, every other
//! label is folded into [`OTHER`], so the number of series stays at most N + 1 whatever runs on
//! the host.
//!
//! The rule, applied at each [`TopLabels::refresh`] (the caller refreshes at a fixed interval
//! and passes each label's activity in that window, e.g. connections opened and closed):
//! 1. Each label's score loses a quarter (rounded up), then gains the window's activity: a
//!    decayed sum over recent windows (a steady rate r scores about 4r), so one busy window does
//!    not decide alone and an idle label fades away (a score of 1000 is gone after 22 idle
//!    windows).
//! 2. A chosen label keeps its place while its score is above zero. Free places go to the
//!    highest-scored labels (ties broken by name, so a refresh is deterministic).
//! 3. When every place is taken, the best unchosen label replaces the weakest chosen one only if
//!    its score is more than twice that one's. The margin keeps labels from flapping: two
//!    workloads equally busy in alternate windows settle at scores in a ratio of 4/3
//!    (`s = a + 3/4 · 3/4 · s`), so neither displaces the other; a label with a steady rate more
//!    than twice the weakest's does take its place, within a few windows.
//!
//! A label that leaves the chosen set is listed in [`Changes::removed`], so the exporter can
//! delete its series (its later activity counts under `other`).
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

/// The label of every workload outside the top N.
pub const OTHER: &str = "other";

/// Labels scored at most, chosen ones aside, as a multiple of N (and at least [`MIN_SCORED`]):
/// the least active are forgotten first.
const SCORED_PER_PLACE: usize = 16;
const MIN_SCORED: usize = 1024;

/// The N most active labels, chosen with the rule of the module documentation.
#[derive(Clone, Debug)]
pub struct TopLabels {
    places: usize,
    scored_max: usize,
    scores: HashMap<String, u64>,
    chosen: HashSet<String>,
}

/// What a refresh changed in the chosen set, each list sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl TopLabels {
    /// Keeps `places` (N) labels of their own; with 0, everything is [`OTHER`].
    pub fn new(places: usize) -> TopLabels {
        TopLabels {
            places,
            scored_max: places.saturating_mul(SCORED_PER_PLACE).max(MIN_SCORED),
            scores: HashMap::new(),
            chosen: HashSet::new(),
        }
    }

    /// The label to export for `label`: itself when chosen, else [`OTHER`].
    pub fn label<'a>(&'a self, label: &'a str) -> &'a str {
        if self.chosen.contains(label) {
            label
        } else {
            OTHER
        }
    }

    /// The chosen labels, sorted.
    pub fn chosen(&self) -> Vec<&str> {
        let mut chosen: Vec<&str> = self.chosen.iter().map(String::as_str).collect();
        chosen.sort_unstable();
        chosen
    }

    /// Ends a window: `activity` is each label's activity in it (a label may appear more than
    /// once; its counts add up). A label equal to [`OTHER`] is never chosen.
    pub fn refresh<'a>(&mut self, activity: impl IntoIterator<Item = (&'a str, u64)>) -> Changes {
        for score in self.scores.values_mut() {
            *score -= score.div_ceil(4);
        }
        for (label, count) in activity {
            if label == OTHER || count == 0 {
                continue;
            }
            match self.scores.get_mut(label) {
                Some(score) => *score = score.saturating_add(count),
                None => {
                    self.scores.insert(label.to_owned(), count);
                }
            }
        }
        let mut changes = Changes::default();
        let scores = &self.scores;
        let score = |label: &str| scores.get(label).copied().unwrap_or(0);
        self.chosen.retain(|label| {
            let active = score(label) > 0;
            if !active {
                changes.removed.push(label.clone());
            }
            active
        });
        let mut challengers: Vec<(&String, u64)> = scores
            .iter()
            .filter(|(label, score)| **score > 0 && !self.chosen.contains(*label))
            .map(|(label, score)| (label, *score))
            .collect();
        challengers.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let mut challengers = challengers.into_iter().peekable();
        while self.chosen.len() < self.places {
            let Some((label, _)) = challengers.next() else {
                break;
            };
            self.chosen.insert(label.clone());
            changes.added.push(label.clone());
        }
        while let Some(&(label, challenger)) = challengers.peek() {
            // The weakest chosen label; among equals the last by name goes first.
            let Some((weakest, weakest_score)) = self
                .chosen
                .iter()
                .map(|l| (l, score(l)))
                .min_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
            else {
                break;
            };
            if challenger <= weakest_score.saturating_mul(2) {
                break;
            }
            let weakest = weakest.clone();
            self.chosen.remove(&weakest);
            changes.removed.push(weakest);
            self.chosen.insert(label.clone());
            changes.added.push(label.clone());
            challengers.next();
        }
        self.forget_idle();
        changes.added.sort_unstable();
        changes.removed.sort_unstable();
        changes
    }

    /// Drops labels with no score left, then the least active beyond the bound.
    fn forget_idle(&mut self) {
        let chosen = &self.chosen;
        self.scores
            .retain(|label, score| *score > 0 || chosen.contains(label));
        let excess = self.scores.len().saturating_sub(self.scored_max);
        if excess == 0 {
            return;
        }
        let mut unchosen: Vec<(u64, String)> = self
            .scores
            .iter()
            .filter(|(label, _)| !chosen.contains(*label))
            .map(|(label, score)| (*score, label.clone()))
            .collect();
        unchosen.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)));
        for (_, label) in unchosen.into_iter().take(excess) {
            self.scores.remove(&label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refresh(top: &mut TopLabels, activity: &[(&str, u64)]) -> Changes {
        top.refresh(activity.iter().copied())
    }

    #[test]
    fn keeps_the_n_most_active_and_folds_the_rest() {
        let mut top = TopLabels::new(2);
        let changes = refresh(
            &mut top,
            &[
                ("a.service", 10),
                ("b.service", 30),
                ("c.service", 20),
                ("d.service", 1),
            ],
        );
        assert_eq!(top.chosen(), ["b.service", "c.service"]);
        assert_eq!(changes.added, ["b.service", "c.service"]);
        assert_eq!(top.label("b.service"), "b.service");
        assert_eq!(top.label("a.service"), OTHER);
        assert_eq!(top.label("never-seen"), OTHER);
    }

    #[test]
    fn fewer_labels_than_places_are_all_kept() {
        let mut top = TopLabels::new(5);
        refresh(&mut top, &[("a", 1), ("b", 2)]);
        assert_eq!(top.chosen(), ["a", "b"]);
    }

    #[test]
    fn zero_places_fold_everything() {
        let mut top = TopLabels::new(0);
        refresh(&mut top, &[("a", 100)]);
        assert!(top.chosen().is_empty());
        assert_eq!(top.label("a"), OTHER);
    }

    #[test]
    fn the_label_other_is_never_chosen() {
        let mut top = TopLabels::new(3);
        refresh(&mut top, &[(OTHER, 1000), ("a", 1)]);
        assert_eq!(top.chosen(), ["a"]);
    }

    #[test]
    fn counts_of_a_label_given_twice_add_up() {
        let mut top = TopLabels::new(1);
        refresh(&mut top, &[("a", 6), ("b", 10), ("a", 6)]);
        assert_eq!(top.chosen(), ["a"]);
    }

    #[test]
    fn ties_are_broken_by_name() {
        let mut top = TopLabels::new(2);
        refresh(&mut top, &[("c", 5), ("a", 5), ("b", 5)]);
        assert_eq!(top.chosen(), ["a", "b"]);
    }

    #[test]
    fn workloads_busy_in_alternate_windows_do_not_flap() {
        let mut top = TopLabels::new(1);
        refresh(&mut top, &[("a", 100)]);
        assert_eq!(top.chosen(), ["a"]);
        for window in 0..200 {
            let busy = if window % 2 == 0 { "b" } else { "a" };
            let changes = refresh(&mut top, &[(busy, 100)]);
            assert_eq!(changes, Changes::default(), "window {window}");
        }
        assert_eq!(top.chosen(), ["a"]);
    }

    #[test]
    fn a_steady_rate_below_twice_the_weakest_does_not_displace_it() {
        let mut top = TopLabels::new(1);
        for _ in 0..100 {
            let changes = refresh(&mut top, &[("a", 100), ("b", 190)]);
            assert!(changes.removed.is_empty());
        }
        // Both arrived in the same window: `b`, the busier, took the place and kept it.
        assert_eq!(top.chosen(), ["b"]);
        let mut top = TopLabels::new(1);
        refresh(&mut top, &[("a", 100)]);
        for _ in 0..100 {
            assert_eq!(
                refresh(&mut top, &[("a", 100), ("b", 190)]),
                Changes::default()
            );
        }
        assert_eq!(top.chosen(), ["a"]);
    }

    #[test]
    fn a_much_busier_newcomer_takes_the_weakest_place() {
        let mut top = TopLabels::new(2);
        for _ in 0..10 {
            refresh(&mut top, &[("a", 100), ("b", 10)]);
        }
        assert_eq!(top.chosen(), ["a", "b"]);
        let mut windows = 0;
        let changes = loop {
            windows += 1;
            let changes = refresh(&mut top, &[("a", 100), ("b", 10), ("c", 50)]);
            if changes != Changes::default() {
                break changes;
            }
            assert!(windows < 10, "c never took b's place");
        };
        assert_eq!(changes.added, ["c"]);
        assert_eq!(changes.removed, ["b"]);
        assert_eq!(top.chosen(), ["a", "c"]);
        // b's score settles near 4 × 10; c's passes twice that in its second window (50, 87).
        assert_eq!(windows, 2);
    }

    #[test]
    fn an_idle_label_fades_out_and_frees_its_place() {
        let mut top = TopLabels::new(1);
        refresh(&mut top, &[("a", 1000)]);
        let mut windows = 0;
        loop {
            windows += 1;
            let changes = refresh(&mut top, &[("b", 1)]);
            if !changes.removed.is_empty() {
                assert_eq!(changes.removed, ["a"]);
                assert_eq!(changes.added, ["b"]);
                break;
            }
            assert!(windows < 64, "a never left");
        }
        assert_eq!(top.chosen(), ["b"]);
        // A label idle and unchosen is forgotten once its score reaches zero.
        let mut top = TopLabels::new(0);
        refresh(&mut top, &[("x", 8)]);
        for _ in 0..6 {
            refresh(&mut top, &[]);
        }
        assert!(top.scores.is_empty());
    }

    #[test]
    fn series_stay_within_n_plus_one_and_scores_stay_bounded() {
        let places = 5;
        let mut top = TopLabels::new(places);
        let labels: Vec<String> = (0..5000).map(|i| format!("w{i}")).collect();
        for window in 0..50_u64 {
            let activity: Vec<(&str, u64)> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.as_str(), (i as u64 * 7 + window * 13) % 101))
                .collect();
            refresh(&mut top, &activity);
            assert!(top.chosen().len() <= places);
            let exported: HashSet<&str> = labels.iter().map(|l| top.label(l)).collect();
            assert!(exported.len() <= places + 1, "{} series", exported.len());
            assert!(top.scores.len() <= MIN_SCORED.max(places * SCORED_PER_PLACE));
        }
    }
}
