//! The in-process fleet graph as request threads share it: nobody waits on its rebuild.
//!
//! The hourly rebuild (expired links dropped, components recomputed) costs about half a
//! microsecond an account under the graph's lock: 53 ms at 100k accounts, half a second at a
//! million. Run inside the `record` that found it due, it held up that request and every
//! decision and event queued behind the lock. A graph of more than [`INLINE_REBUILD_ACCOUNTS`]
//! is rebuilt on a thread of its own instead. Meanwhile events wait in a bounded list that the
//! next holder of the lock applies, and decisions go without fleet facts, marked degraded, rather
//! than wait. Past the list's bound an event waits for the lock: memory stays bounded and no
//! event is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use super::UsageEvent;
use super::fleet::FleetGraph;
use crate::classify::FleetFacts;
use crate::sharded::lock;

/// Graphs up to this many accounts are rebuilt inline (about 2 ms).
pub(crate) const INLINE_REBUILD_ACCOUNTS: usize = 4_096;

pub(crate) struct SharedFleets {
    graph: Mutex<FleetGraph>,
    /// Set by the one rebuild that runs, cleared under the `pending` lock once it has applied
    /// every event held: an event is either held while it runs or applied by a lock holder.
    rebuilding: AtomicBool,
    pending: Mutex<Vec<UsageEvent>>,
    pending_len: AtomicUsize,
    /// Events held at most: about a twentieth of the graph's share of memory.
    pending_max: usize,
    /// Fleet reads answered without the graph while it was rebuilt.
    degraded: AtomicU64,
}

/// What a caller gets when it asks for the graph.
enum Turn<'a> {
    Graph(std::sync::MutexGuard<'a, FleetGraph>),
    /// A rebuild holds it.
    Rebuilding,
}

/// Clears the rebuild flag however the rebuild ends (a panic included), so that rebuilds go
/// on and the events held are applied by the next holder.
struct Rebuilding<'a>(&'a SharedFleets);

impl Drop for Rebuilding<'_> {
    fn drop(&mut self) {
        let _pending = lock(&self.0.pending);
        self.0.rebuilding.store(false, Ordering::Release);
    }
}

impl SharedFleets {
    /// `graph` holds at most `max_bytes`.
    pub(crate) fn new(mut graph: FleetGraph, max_bytes: u64) -> Arc<Self> {
        graph.rebuild_inline_up_to(INLINE_REBUILD_ACCOUNTS);
        Arc::new(Self {
            graph: Mutex::new(graph),
            rebuilding: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            pending_len: AtomicUsize::new(0),
            // An event held costs a few hundred bytes with its strings.
            pending_max: usize::try_from(max_bytes / 20 / 512)
                .unwrap_or(usize::MAX)
                .clamp(1_024, 65_536),
            degraded: AtomicU64::new(0),
        })
    }

    /// The graph, or word that a rebuild holds it: never waits on a rebuild. Other holders
    /// keep it for microseconds, and are waited for.
    fn turn(&self) -> Turn<'_> {
        loop {
            match self.graph.try_lock() {
                Ok(graph) => return Turn::Graph(graph),
                Err(TryLockError::Poisoned(poisoned)) => return Turn::Graph(poisoned.into_inner()),
                Err(TryLockError::WouldBlock) if self.rebuilding.load(Ordering::Acquire) => {
                    return Turn::Rebuilding;
                }
                Err(TryLockError::WouldBlock) => std::thread::yield_now(),
            }
        }
    }

    /// Adds an event's links; while a rebuild runs, it is held and applied after it.
    pub(crate) fn record(self: &Arc<Self>, event: &UsageEvent) {
        let mut graph = loop {
            match self.turn() {
                Turn::Graph(graph) => break graph,
                Turn::Rebuilding => {
                    let mut pending = lock(&self.pending);
                    // Checked again under the lock the rebuild clears its flag under.
                    if !self.rebuilding.load(Ordering::Acquire) {
                        continue;
                    }
                    if pending.len() < self.pending_max {
                        pending.push(event.clone());
                        self.pending_len.store(pending.len(), Ordering::Release);
                        return;
                    }
                    drop(pending);
                    // Past the bound the event waits for the graph: memory stays bounded and
                    // nothing is lost.
                    break lock(&self.graph);
                }
            }
        };
        self.apply_pending(&mut graph);
        graph.record(event);
        if graph.rebuild_due() && !self.rebuilding.swap(true, Ordering::AcqRel) {
            let shared = self.clone();
            let spawned = std::thread::Builder::new()
                .name("regionguard-fleets".into())
                .spawn(move || shared.rebuild());
            if let Err(error) = spawned {
                // No thread to be had: rebuild here rather than never.
                tracing::warn!(%error, "fleet graph: no thread for the rebuild; rebuilding inline");
                let _done = Rebuilding(self);
                graph.rebuild_now();
            }
        }
    }

    fn rebuild(&self) {
        let done = Rebuilding(self);
        let mut graph = lock(&self.graph);
        let started = std::time::Instant::now();
        graph.rebuild_now();
        // Apply what was held, until nothing is: the flag is cleared under the pending lock,
        // so no event can be held after the last look.
        loop {
            let events = {
                let mut pending = lock(&self.pending);
                if pending.is_empty() {
                    self.rebuilding.store(false, Ordering::Release);
                    break;
                }
                self.pending_len.store(0, Ordering::Release);
                std::mem::take(&mut *pending)
            };
            for event in &events {
                graph.record(event);
            }
        }
        std::mem::forget(done);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            accounts = graph.stats().accounts,
            "fleet graph rebuilt"
        );
    }

    fn apply_pending(&self, graph: &mut FleetGraph) {
        if self.pending_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let events = {
            let mut pending = lock(&self.pending);
            self.pending_len.store(0, Ordering::Release);
            std::mem::take(&mut *pending)
        };
        for event in &events {
            graph.record(event);
        }
    }

    /// The account's fleet and the accounts sharing its template; `None` while a rebuild
    /// holds the graph (the decision goes without fleet facts, marked degraded).
    pub(crate) fn facts(&self, account: &str, now: i64) -> Option<(Option<FleetFacts>, u32)> {
        self.try_with(|graph| graph.facts(account, now))
            .or_else(|| {
                self.degraded.fetch_add(1, Ordering::Relaxed);
                None
            })
    }

    /// Runs `f` on the graph; `None` while a rebuild holds it (reviewers' reads).
    pub(crate) fn try_with<T>(&self, f: impl FnOnce(&mut FleetGraph) -> T) -> Option<T> {
        match self.turn() {
            Turn::Graph(mut graph) => {
                self.apply_pending(&mut graph);
                Some(f(&mut graph))
            }
            Turn::Rebuilding => None,
        }
    }

    /// Runs `f` on the graph, waiting for it (rule changes, off the request path).
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut FleetGraph) -> T) -> T {
        let mut graph = lock(&self.graph);
        self.apply_pending(&mut graph);
        f(&mut graph)
    }

    /// Fleet reads answered without the graph while it was rebuilt.
    pub(crate) fn degraded_reads(&self) -> u64 {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Whether a rebuild is running or events wait to be applied.
    pub(crate) fn busy(&self) -> bool {
        self.rebuilding.load(Ordering::Acquire) || self.pending_len.load(Ordering::Acquire) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::FleetRules;

    const NOW: i64 = 1_790_000_000;

    fn event(account: &str, card: &str, t: i64) -> UsageEvent {
        UsageEvent {
            account_id: account.into(),
            ip: "10.7.0.1".parse().unwrap(),
            timestamp: t,
            api_key_id: None,
            requests: 1,
            input_tokens: 0,
            output_tokens: 0,
            payment_fingerprint: Some(card.into()),
            device_id: None,
            prompt_fingerprint: None,
            organization_domain: None,
        }
    }

    /// While a rebuild holds the graph, an event waits in the pending list and a read answers
    /// at once without fleet facts; once it is done, the event is in the graph.
    #[test]
    fn nobody_waits_on_a_rebuild() {
        let fleets = SharedFleets::new(FleetGraph::new(64 << 20, FleetRules::default()), 64 << 20);
        fleets.record(&event("a", "card-1", NOW));
        fleets.record(&event("b", "card-1", NOW));
        assert_eq!(fleets.facts("a", NOW).unwrap().0.unwrap().size, 2);
        // A rebuild in progress, as its thread holds it.
        let held = lock(&fleets.graph);
        fleets.rebuilding.store(true, Ordering::Release);
        let (tx, rx) = std::sync::mpsc::channel();
        let other = fleets.clone();
        std::thread::spawn(move || {
            other.record(&event("c", "card-1", NOW + 1));
            let _ = tx.send(other.facts("a", NOW + 1));
        });
        let during = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("neither the event nor the read waited on the rebuild");
        assert_eq!(during, None, "no fleet facts while rebuilding");
        assert_eq!(fleets.degraded_reads(), 1);
        assert!(fleets.busy());
        fleets.rebuilding.store(false, Ordering::Release);
        drop(held);
        let after = fleets.facts("a", NOW + 1).unwrap().0.unwrap();
        assert_eq!(after.size, 3, "the pending event was applied");
        assert!(!fleets.busy());
    }

    /// A graph past the inline limit is rebuilt on a thread of its own, and keeps its fleets.
    #[test]
    fn a_large_graph_is_rebuilt_off_the_caller() {
        let fleets =
            SharedFleets::new(FleetGraph::new(256 << 20, FleetRules::default()), 256 << 20);
        for i in 0..(INLINE_REBUILD_ACCOUNTS as i64 + 100) {
            let mut e = event(&format!("acct-{i}"), &format!("card-{}", i / 2), NOW);
            // A network of its own each: only the cards link, in pairs.
            e.ip = format!("10.{}.{}.1", i / 256, i % 256).parse().unwrap();
            fleets.record(&e);
        }
        let before = fleets.with(|g| g.stats().rebuilds);
        // Two hours on: due. The rebuild cannot finish while the pending list is held here, so
        // `record` returning at all shows it did not rebuild in the caller.
        let held = lock(&fleets.pending);
        let (tx, rx) = std::sync::mpsc::channel();
        let caller = fleets.clone();
        std::thread::spawn(move || {
            caller.record(&event("late", "card-late", NOW + 7_200));
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the caller returned before the rebuild was done");
        assert!(fleets.busy(), "the rebuild runs on");
        drop(held);
        let started = std::time::Instant::now();
        while fleets.busy() {
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(fleets.with(|g| g.stats().rebuilds), before + 1);
        assert_eq!(
            fleets.facts("acct-1", NOW + 7_200).unwrap().0.unwrap().size,
            2
        );
    }
}
