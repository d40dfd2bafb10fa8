//! Window arithmetic for usage history: bucketed counters, recently-seen sets and country runs.
//!
//! Everything takes timestamps as arguments (seconds since the epoch) and accepts events in any
//! order: an event lands in the bucket of its own time, not of its arrival. Everything is
//! bounded: buckets are pruned to [`HISTORY_SECS`] behind the newest event seen, sets and runs
//! keep a fixed number of entries (counts saturate there).

use std::collections::VecDeque;

/// 7 days: the longest window.
pub const HISTORY_SECS: i64 = 7 * 86_400;
/// Fine buckets (5 minutes) cover the last 24 hours; older counts fold into hourly buckets.
const FINE_SECS: i64 = 300;
const COARSE_SECS: i64 = 3600;
const FINE_SPAN_SECS: i64 = 86_400;

/// Counters for one bucket or one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub tokens: u64,
    pub anonymized: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.anonymized = self.anonymized.saturating_add(other.anonymized);
    }
}

/// Bucket starts and their counts, oldest first.
pub type Buckets = VecDeque<(i64, Counts)>;

/// Request counters in 5-minute buckets for 24 hours and hourly buckets for 7 days, sorted by
/// bucket start, stored sparsely.
#[derive(Clone, Debug, Default)]
pub struct Series {
    fine: VecDeque<(i64, Counts)>,
    coarse: VecDeque<(i64, Counts)>,
    newest: Option<i64>,
}

fn upsert(buckets: &mut VecDeque<(i64, Counts)>, start: i64, counts: Counts) {
    match buckets.binary_search_by_key(&start, |(s, _)| *s) {
        Ok(i) => buckets[i].1.add(counts),
        Err(i) => buckets.insert(i, (start, counts)),
    }
}

impl Series {
    /// Adds `counts` at time `t`. Counts older than 7 days before the newest event are dropped.
    pub fn add(&mut self, t: i64, counts: Counts) {
        let newest = self.newest.map_or(t, |n| n.max(t));
        self.newest = Some(newest);
        if t <= newest - HISTORY_SECS {
            return;
        }
        if t > newest - FINE_SPAN_SECS {
            upsert(&mut self.fine, t.div_euclid(FINE_SECS) * FINE_SECS, counts);
        } else {
            upsert(
                &mut self.coarse,
                t.div_euclid(COARSE_SECS) * COARSE_SECS,
                counts,
            );
        }
        self.prune(newest);
    }

    fn prune(&mut self, newest: i64) {
        while let Some(&(start, counts)) = self.fine.front() {
            if start + FINE_SECS > newest - FINE_SPAN_SECS {
                break;
            }
            self.fine.pop_front();
            upsert(
                &mut self.coarse,
                start.div_euclid(COARSE_SECS) * COARSE_SECS,
                counts,
            );
        }
        while self
            .coarse
            .front()
            .is_some_and(|(start, _)| start + COARSE_SECS <= newest - HISTORY_SECS)
        {
            self.coarse.pop_front();
        }
    }

    /// Counts in buckets that start within `(now - window, now]`. Resolution: 5 minutes for the
    /// last 24 hours, an hour before that.
    pub fn sum(&self, now: i64, window: i64) -> Counts {
        let mut total = Counts::default();
        for (start, counts) in self.coarse.iter().chain(self.fine.iter()) {
            if *start > now - window && *start <= now {
                total.add(*counts);
            }
        }
        total
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.fine.len() + self.coarse.len()
    }

    /// Heap bytes allocated, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        (self.fine.capacity() + self.coarse.capacity()) * std::mem::size_of::<(i64, Counts)>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buckets (fine, then coarse, each oldest first) and the newest event time: what a
    /// remote copy of the series stores.
    pub fn parts(&self) -> (&Buckets, &Buckets, Option<i64>) {
        (&self.fine, &self.coarse, self.newest)
    }

    /// Rebuilds a series from [`Series::parts`]; buckets out of order or out of their span are
    /// put back where `add` would have put them.
    pub fn from_parts(
        fine: impl IntoIterator<Item = (i64, Counts)>,
        coarse: impl IntoIterator<Item = (i64, Counts)>,
        newest: Option<i64>,
    ) -> Self {
        let mut series = Self {
            newest,
            ..Self::default()
        };
        for (start, counts) in fine {
            upsert(&mut series.fine, start, counts);
        }
        for (start, counts) in coarse {
            upsert(&mut series.coarse, start, counts);
        }
        if let Some(newest) = newest {
            series.prune(newest);
        }
        series
    }
}

/// Up to `cap` keys with the last time each was seen; when full, a new key replaces the one
/// seen longest ago (if the new one is more recent).
#[derive(Clone, Debug)]
pub struct Recent<K> {
    entries: Vec<(K, i64)>,
    cap: usize,
}

impl<K: PartialEq> Recent<K> {
    pub fn new(cap: usize) -> Self {
        Self {
            entries: Vec::new(),
            cap,
        }
    }

    pub fn touch(&mut self, key: K, t: i64) {
        if let Some(entry) = self.entries.iter_mut().find(|(k, _)| *k == key) {
            entry.1 = entry.1.max(t);
            return;
        }
        if self.entries.len() < self.cap {
            self.entries.push((key, t));
        } else if let Some(oldest) = self.entries.iter_mut().min_by_key(|(_, seen)| *seen)
            && oldest.1 < t
        {
            *oldest = (key, t);
        }
    }

    /// Keys seen at or after `since`.
    pub fn since(&self, since: i64) -> impl Iterator<Item = &K> {
        self.entries
            .iter()
            .filter(move |(_, seen)| *seen >= since)
            .map(|(k, _)| k)
    }

    pub fn count_since(&self, since: i64) -> u32 {
        self.since(since).count() as u32
    }

    /// Heap bytes allocated, for memory accounting (not counting what the keys point to).
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(K, i64)>()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every key with the last time it was seen.
    pub fn entries(&self) -> &[(K, i64)] {
        &self.entries
    }
}

/// Maximal stretches of time during which every observation came from one country.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run<C> {
    pub start: i64,
    pub end: i64,
    pub country: C,
}

/// The account's country runs in time order, for switches and impossible travel. Exact for events
/// that arrive in time order. An event that arrives late and falls inside another country's run
/// splits it; a run keeps only its outer times, so late events can lose detail (fewer switches
/// counted) but never invent it: no switch that did not happen, no gap shorter than the true one.
#[derive(Clone, Debug)]
pub struct CountryRuns<C> {
    runs: VecDeque<Run<C>>,
    cap: usize,
}

impl<C: Copy + PartialEq> CountryRuns<C> {
    pub fn new(cap: usize) -> Self {
        Self {
            runs: VecDeque::new(),
            cap,
        }
    }

    pub fn observe(&mut self, t: i64, country: C) {
        let next = self.runs.partition_point(|r| r.start <= t);
        let single = Run {
            start: t,
            end: t,
            country,
        };
        let prev = next.checked_sub(1);
        match prev.map(|i| self.runs[i]) {
            Some(run) if t <= run.end => {
                if run.country != country {
                    // Inside another country's run: split it around this observation.
                    let i = next - 1;
                    if t == run.start {
                        // Same instant as the run's first observation: it goes just before.
                        match i.checked_sub(1) {
                            Some(before) if self.runs[before].country == country => {
                                self.runs[before].end = t
                            }
                            _ => self.runs.insert(i, single),
                        }
                    } else {
                        self.runs[i] = Run {
                            end: run.start,
                            ..run
                        };
                        self.runs.insert(i + 1, single);
                        self.runs.insert(
                            i + 2,
                            Run {
                                start: run.end,
                                ..run
                            },
                        );
                    }
                }
            }
            Some(run) if run.country == country => {
                self.runs[next - 1].end = t;
                if self.runs.get(next).is_some_and(|n| n.country == country) {
                    let merged_end = self.runs[next].end;
                    self.runs[next - 1].end = merged_end;
                    self.runs.remove(next);
                }
            }
            _ => match self.runs.get_mut(next) {
                Some(after) if after.country == country => after.start = t,
                _ => self.runs.insert(next, single),
            },
        }
        while self.runs.len() > self.cap {
            self.runs.pop_front();
        }
    }

    /// Drops runs that ended before `since`.
    pub fn prune(&mut self, since: i64) {
        while self.runs.front().is_some_and(|r| r.end < since) {
            self.runs.pop_front();
        }
    }

    /// (switches, shortest gap in seconds) among runs that end at or after `since`.
    pub fn switches_since(&self, since: i64) -> (u32, Option<u64>) {
        let recent: Vec<&Run<C>> = self.runs.iter().filter(|r| r.end >= since).collect();
        let gaps = recent
            .windows(2)
            .map(|pair| (pair[1].start - pair[0].end).max(0) as u64);
        let (count, fastest) = gaps.fold((0u32, None), |(n, min): (u32, Option<u64>), gap| {
            (n + 1, Some(min.map_or(gap, |m: u64| m.min(gap))))
        });
        (count, fastest)
    }

    /// Heap bytes allocated, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.runs.capacity() * std::mem::size_of::<Run<C>>()
    }

    pub fn runs(&self) -> impl Iterator<Item = &Run<C>> + '_ {
        self.runs.iter()
    }

    /// Rebuilds runs from [`CountryRuns::runs`] (time order, as stored), keeping the newest `cap`.
    pub fn from_runs(cap: usize, runs: impl IntoIterator<Item = Run<C>>) -> Self {
        let mut runs: VecDeque<Run<C>> = runs.into_iter().collect();
        while runs.len() > cap {
            runs.pop_front();
        }
        Self { runs, cap }
    }

    pub fn countries(&self) -> impl Iterator<Item = C> + '_ {
        self.runs.iter().map(|r| r.country)
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

#[cfg(test)]
mod tests;
