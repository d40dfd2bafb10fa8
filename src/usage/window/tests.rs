use super::*;
use proptest::prelude::*;

const NOW: i64 = 1_790_000_000;

fn req(n: u64) -> Counts {
    Counts {
        requests: n,
        tokens: n * 10,
        anonymized: 0,
    }
}

#[test]
fn windows_sum_buckets_inside_them() {
    let mut s = Series::default();
    s.add(NOW - 10, req(1));
    s.add(NOW - 2 * 3600, req(2));
    s.add(NOW - 3 * 86_400, req(4));
    s.add(NOW - 8 * 86_400, req(8)); // older than 7 days before the newest: dropped
    assert_eq!(s.sum(NOW, 3600).requests, 1);
    assert_eq!(s.sum(NOW, 86_400).requests, 3);
    assert_eq!(s.sum(NOW, HISTORY_SECS).requests, 7);
    assert_eq!(s.sum(NOW, HISTORY_SECS).tokens, 70);
}

#[test]
fn old_fine_buckets_fold_into_hours_and_expire() {
    let mut s = Series::default();
    for i in 0..12 {
        s.add(NOW + i * 300, req(1));
    }
    assert_eq!(s.len(), 12);
    s.add(NOW + 2 * 86_400, req(1));
    assert_eq!(
        s.sum(NOW + 2 * 86_400, HISTORY_SECS).requests,
        13,
        "folded, not lost"
    );
    assert!(
        s.len() <= 3,
        "12 five-minute buckets became at most 2 hourly ones: {}",
        s.len()
    );
    s.add(NOW + 9 * 86_400, req(1));
    assert_eq!(
        s.sum(NOW + 9 * 86_400, HISTORY_SECS).requests,
        1,
        "the rest expired"
    );
}

#[test]
fn recent_counts_saturate_at_the_cap_keeping_the_newest() {
    let mut r = Recent::new(3);
    for (i, key) in ["a", "b", "c", "d"].into_iter().enumerate() {
        r.touch(key, NOW + i as i64);
    }
    assert_eq!(r.len(), 3);
    assert_eq!(r.since(NOW).copied().collect::<Vec<_>>(), ["d", "b", "c"]);
    r.touch("b", NOW + 100);
    assert_eq!(r.count_since(NOW + 50), 1);
    r.touch("z", NOW - 1000);
    assert!(
        !r.since(0).any(|k| *k == "z"),
        "an older key does not evict a newer one"
    );
}

#[test]
fn country_runs_count_switches_and_gaps() {
    let mut runs = CountryRuns::new(16);
    for (t, c) in [(0, 'A'), (100, 'A'), (200, 'B'), (1000, 'A')] {
        runs.observe(NOW + t, c);
    }
    assert_eq!(runs.countries().collect::<String>(), "ABA");
    assert_eq!(runs.switches_since(NOW), (2, Some(100)));
    runs.prune(NOW + 150);
    assert_eq!(runs.countries().collect::<String>(), "BA");
}

#[test]
fn a_late_event_splits_a_run_without_shortening_gaps() {
    let mut runs = CountryRuns::new(16);
    for (t, c) in [(0, 'A'), (1000, 'A'), (500, 'B')] {
        runs.observe(NOW + t, c);
    }
    assert_eq!(runs.countries().collect::<String>(), "ABA");
    assert_eq!(runs.switches_since(NOW), (2, Some(500)));
}

/// The reference: sort by time, collapse equal neighbours.
fn reference(events: &[(i64, char)]) -> (String, Vec<i64>) {
    let mut sorted = events.to_vec();
    sorted.sort();
    let mut runs: Vec<(i64, i64, char)> = Vec::new();
    for (t, c) in sorted {
        match runs.last_mut() {
            Some(last) if last.2 == c => last.1 = t,
            _ => runs.push((t, t, c)),
        }
    }
    let gaps = runs.windows(2).map(|w| w[1].0 - w[0].1).collect();
    (runs.iter().map(|r| r.2).collect(), gaps)
}

fn arb_events() -> impl Strategy<Value = Vec<(i64, char)>> {
    prop::collection::btree_map(
        0i64..100_000,
        prop::sample::select(vec!['A', 'B', 'C']),
        0..40,
    )
    .prop_map(|m| m.into_iter().collect())
}

proptest! {
    #[test]
    fn runs_in_time_order_match_the_reference(events in arb_events()) {
        let mut runs = CountryRuns::new(1000);
        for (t, c) in &events {
            runs.observe(*t, *c);
        }
        let (countries, gaps) = reference(&events);
        prop_assert_eq!(runs.countries().collect::<String>(), countries);
        prop_assert_eq!(runs.switches_since(i64::MIN), (gaps.len() as u32, gaps.iter().min().map(|g| *g as u64)));
    }

    /// Late events lose detail (a run keeps only its outer times), never invent it: the same
    /// countries, no more switches than in time order, and no gap shorter than a true one.
    #[test]
    fn late_events_never_invent_switches_or_shorten_gaps(
        events in arb_events(),
        seed in any::<u64>(),
    ) {
        let mut shuffled = events.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut runs = CountryRuns::new(1000);
        for (t, c) in &shuffled {
            runs.observe(*t, *c);
        }
        let (countries, gaps) = reference(&events);
        let mut seen: Vec<char> = runs.countries().collect();
        let mut truth: Vec<char> = countries.chars().collect();
        seen.sort(); seen.dedup(); truth.sort(); truth.dedup();
        prop_assert_eq!(seen, truth);
        let (switches, fastest) = runs.switches_since(i64::MIN);
        prop_assert!(switches as usize <= gaps.len());
        if let (Some(got), Some(truth)) = (fastest, gaps.iter().min()) {
            prop_assert!(got >= *truth as u64, "gap {got} shorter than the true {truth}");
        }
    }

    #[test]
    fn series_totals_do_not_depend_on_arrival_order(
        events in prop::collection::vec((0i64..(6 * 86_400), 1u64..100), 0..60),
        seed in any::<u64>(),
    ) {
        let total: u64 = events.iter().map(|(_, n)| n).sum();
        let mut shuffled = events.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let (mut a, mut b) = (Series::default(), Series::default());
        for (t, n) in &events { a.add(NOW + t, req(*n)); }
        for (t, n) in &shuffled { b.add(NOW + t, req(*n)); }
        let end = NOW + 6 * 86_400;
        prop_assert_eq!(a.sum(end, HISTORY_SECS).requests, total, "all inside 7 days");
        prop_assert_eq!(b.sum(end, HISTORY_SECS).requests, total);
        for window in [3600, 86_400] {
            prop_assert_eq!(a.sum(end, window), b.sum(end, window), "window {}", window);
        }
    }

    #[test]
    fn duplicates_count_twice_and_windows_nest(t in 0i64..86_400, n in 1u64..1000) {
        let mut s = Series::default();
        s.add(NOW + t, req(n));
        s.add(NOW + t, req(n));
        let end = NOW + 86_400;
        prop_assert_eq!(s.sum(end, HISTORY_SECS).requests, 2 * n);
        prop_assert!(s.sum(end, 3600).requests <= s.sum(end, 86_400).requests);
    }
}
