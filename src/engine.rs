//! The application layer: joins the geo lookup, the current policy and the clock into a decision.
//!
//! This is where IO meets the pure core: it reads the clock, loads the current policy and geo
//! snapshots (lock-free `ArcSwap` loads), builds [`Facts`] and calls [`classify`]. It holds no
//! policy logic of its own and knows nothing of gRPC.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::classify::{
    AccountFacts, Decision, Facts, Flow, HintFacts, OverrideFact, UsageFacts, classify,
};
use crate::geo::{DatabaseMeta, Geo, GeoError, GeoLookup};
use crate::overrides::OverrideIndex;
use crate::policy::Policy;
use crate::usage::{EventLocation, UsageEvent, UsageHistory, UsageLookup, UsageQuery};

/// What the engine tells about each decision it makes (metrics implement it); narrow, so the
/// engine does not depend on how decisions are counted.
pub trait DecisionObserver: Send + Sync {
    fn decision(&self, decision: &Decision);
}

/// One request, parsed and checked at the edge.
#[derive(Clone, Debug)]
pub struct ClassifyInput {
    pub ip: IpAddr,
    pub flow: Flow,
    pub account: AccountFacts,
    pub hints: HintFacts,
    /// Usage history: inline from the caller, else filled from the aggregator by the engine.
    pub usage: Option<UsageFacts>,
    /// Keys into the usage aggregator and the overrides (the core never sees them).
    pub account_id: Option<String>,
    pub organization_domain: Option<String>,
    pub payment_fingerprint: Option<String>,
    pub request_id: String,
}

impl ClassifyInput {
    /// A request that says nothing but its address (an API call with no account known).
    pub fn for_ip(ip: IpAddr) -> Self {
        Self {
            ip,
            flow: Flow::ApiRequest,
            account: AccountFacts::default(),
            hints: HintFacts::default(),
            usage: None,
            account_id: None,
            organization_domain: None,
            payment_fingerprint: None,
            request_id: String::new(),
        }
    }
}

/// A database as it stood for one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseStatus {
    pub meta: DatabaseMeta,
    /// Older than the configured maximum age.
    pub stale: bool,
}

/// A decision with everything the caller is told about it.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub decision: Decision,
    pub location: GeoLookup,
    pub databases: Vec<DatabaseStatus>,
    /// Unique per decision: a UUIDv7, so ids sort by time.
    pub decision_id: String,
    /// The usage history the decision saw.
    pub usage: Option<UsageFacts>,
    /// The reviewer overrides that matched.
    pub overrides: Vec<OverrideFact>,
    /// When it was decided, milliseconds since the Unix epoch.
    pub decided_at_ms: i64,
    pub request_id: String,
}

/// What a decision depends on besides its request and the policy (`Engine::circumstances`).
#[derive(Clone, Debug)]
pub struct Circumstances {
    pub usage: Option<UsageFacts>,
    pub overrides: Vec<OverrideFact>,
    pub now: SystemTime,
}

impl Circumstances {
    /// Whether `outcome` was decided in these circumstances (its time aside): the same usage
    /// history and the same matching overrides.
    pub fn match_outcome(&self, outcome: &Outcome) -> bool {
        outcome.usage == self.usage && outcome.overrides == self.overrides
    }
}

pub struct Engine {
    policy: ArcSwap<Policy>,
    geo: Geo,
    max_db_age: Option<Duration>,
    usage: Option<Arc<dyn UsageHistory>>,
    overrides: ArcSwap<OverrideIndex>,
    /// A candidate policy evaluated beside the active one; its answers are counted and logged,
    /// never returned.
    shadow: ArcSwap<Option<Policy>>,
    shadow_evaluated: AtomicU64,
    shadow_differed: AtomicU64,
    observer: Option<Arc<dyn DecisionObserver>>,
}

/// How often the shadow policy was evaluated and disagreed with the active one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowStats {
    pub evaluated: u64,
    pub differed: u64,
}

impl Engine {
    pub fn new(policy: Policy, geo: Geo, max_db_age: Option<Duration>) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            geo,
            max_db_age,
            usage: None,
            overrides: ArcSwap::from_pointee(OverrideIndex::default()),
            shadow: ArcSwap::from_pointee(None),
            shadow_evaluated: AtomicU64::new(0),
            shadow_differed: AtomicU64::new(0),
            observer: None,
        }
    }

    /// Keeps usage history in `history` (fed by [`Engine::record_usage`]).
    pub fn with_usage(mut self, history: Arc<dyn UsageHistory>) -> Self {
        history.set_fleet_rules(self.policy.load().fleets());
        self.usage = Some(history);
        self
    }

    /// Tells `observer` of every decision (metrics count verdicts and reasons).
    pub fn with_observer(mut self, observer: Arc<dyn DecisionObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Sets (or clears) the shadow policy.
    pub fn set_shadow_policy(&self, policy: Option<Policy>) {
        self.shadow.store(Arc::new(policy));
    }

    pub fn shadow_stats(&self) -> ShadowStats {
        ShadowStats {
            evaluated: self.shadow_evaluated.load(Ordering::Relaxed),
            differed: self.shadow_differed.load(Ordering::Relaxed),
        }
    }

    /// Replaces the overrides matched against requests.
    pub fn set_overrides(&self, index: OverrideIndex) {
        self.overrides.store(Arc::new(index));
    }

    pub fn usage(&self) -> Option<&dyn UsageHistory> {
        self.usage.as_deref()
    }

    /// Records one usage event, located by the geo databases (unlocated when they cannot say).
    /// Returns false when usage history is turned off or the event could not be kept.
    pub fn record_usage(&self, event: &UsageEvent) -> bool {
        let Some(history) = &self.usage else {
            return false;
        };
        let location = match self.geo.lookup(event.ip) {
            Ok(found) => {
                let facts = &found.record.facts;
                let a = facts.anonymizer;
                EventLocation {
                    country: facts.country,
                    subdivisions: facts.subdivisions.clone(),
                    asn: found.record.asn,
                    anonymized: a.vpn
                        || a.tor
                        || a.public_proxy
                        || a.residential_proxy
                        || a.hosting,
                }
            }
            Err(_) => EventLocation::default(),
        };
        history.record(event, &location)
    }

    pub fn geo(&self) -> &Geo {
        &self.geo
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Swaps in a new, already validated policy; requests in flight finish on the old one.
    pub fn set_policy(&self, policy: Policy) {
        if let Some(history) = &self.usage {
            history.set_fleet_rules(policy.fleets());
        }
        self.policy.store(Arc::new(policy));
    }

    /// Decides. Waits only for a remote usage history, and never longer than its timeout.
    pub async fn classify(&self, input: &ClassifyInput) -> Result<Outcome, GeoError> {
        self.classify_at(input, SystemTime::now()).await
    }

    /// As [`Engine::classify`], at a given time (tests, replays).
    pub async fn classify_at(
        &self,
        input: &ClassifyInput,
        now: SystemTime,
    ) -> Result<Outcome, GeoError> {
        let location = self.geo.lookup(input.ip)?;
        Ok(self.decide_at(input, location, now).await)
    }

    /// Decides without waiting, for callers with no runtime (benches, fuzzing): usage history
    /// that only a remote engine holds is not waited for; the decision then says `degraded`.
    pub fn classify_now(
        &self,
        input: &ClassifyInput,
        now: SystemTime,
    ) -> Result<Outcome, GeoError> {
        let location = self.geo.lookup(input.ip)?;
        let now_unix = unix_secs(now);
        let usage = match self.usage_lookup(input, &location, now_unix) {
            UsageLookup::Ready(facts) => facts,
            UsageLookup::Pending(_) => Some(UsageFacts {
                degraded: true,
                ..UsageFacts::default()
            }),
        };
        let circumstances = self.circumstances_with(input, &location, usage, now);
        Ok(self.decide_in(input, location, circumstances))
    }

    /// The request's usage facts: inline from the caller, else from the history.
    fn usage_lookup<'a>(
        &'a self,
        input: &ClassifyInput,
        location: &GeoLookup,
        now_unix: i64,
    ) -> UsageLookup<'a> {
        match (&input.usage, &self.usage) {
            (Some(inline), _) => UsageLookup::Ready(Some(inline.clone())),
            (None, None) => UsageLookup::Ready(None),
            (None, Some(history)) => history.facts(UsageQuery {
                account_id: input.account_id.as_deref(),
                ip: location.ip,
                payment_fingerprint: input.payment_fingerprint.as_deref(),
                now: now_unix,
            }),
        }
    }

    async fn decide_at(
        &self,
        input: &ClassifyInput,
        location: GeoLookup,
        now: SystemTime,
    ) -> Outcome {
        let circumstances = self.circumstances(input, &location, now).await;
        self.decide_in(input, location, circumstances)
    }

    /// Everything besides the request and the policy that a decision for `input` at `now`
    /// depends on: the usage history it would see and the overrides that match. A cache of
    /// decisions compares these with what a cached decision saw (`Outcome::usage`,
    /// `Outcome::overrides`) before reusing it.
    pub async fn circumstances(
        &self,
        input: &ClassifyInput,
        location: &GeoLookup,
        now: SystemTime,
    ) -> Circumstances {
        let now_unix = unix_secs(now);
        let usage = self.usage_lookup(input, location, now_unix).resolve().await;
        self.circumstances_with(input, location, usage, now)
    }

    fn circumstances_with(
        &self,
        input: &ClassifyInput,
        location: &GeoLookup,
        usage: Option<UsageFacts>,
        now: SystemTime,
    ) -> Circumstances {
        let now_ms = unix_ms(now);
        let overrides = self.overrides.load().matching(
            input.account_id.as_deref(),
            input.organization_domain.as_deref(),
            location.ip,
            // Only a fleet the history found: a caller's inline usage could name or omit any.
            usage
                .as_ref()
                .filter(|_| input.usage.is_none())
                .and_then(|u| u.fleet.as_ref()),
            now_ms,
        );
        Circumstances {
            usage,
            overrides,
            now,
        }
    }

    /// The decision itself, once its circumstances are known: no waiting.
    pub fn decide_in(
        &self,
        input: &ClassifyInput,
        location: GeoLookup,
        circumstances: Circumstances,
    ) -> Outcome {
        let Circumstances {
            usage,
            overrides,
            now,
        } = circumstances;
        let policy = self.policy.load();
        let now_unix = unix_secs(now);
        let now_ms = unix_ms(now);
        let facts = Facts {
            flow: input.flow,
            now_unix,
            ip: &location.record.facts,
            account: &input.account,
            hints: &input.hints,
            usage: usage.as_ref(),
            overrides: &overrides,
        };
        let decision = classify(&facts, &policy);
        let decision_id = decision_id(now);
        if let Some(observer) = &self.observer {
            observer.decision(&decision);
        }
        if let Some(shadow) = self.shadow.load().as_ref() {
            let candidate = classify(&facts, shadow);
            self.shadow_evaluated.fetch_add(1, Ordering::Relaxed);
            if candidate.verdict != decision.verdict {
                self.shadow_differed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    %decision_id,
                    active = decision.verdict.as_str(),
                    shadow = candidate.verdict.as_str(),
                    shadow_policy = %shadow.version(),
                    "shadow policy would decide differently"
                );
            }
        }
        let databases = self.database_status(&location.databases, now);
        Outcome {
            decision,
            location,
            databases,
            decision_id,
            usage,
            overrides,
            decided_at_ms: now_ms,
            request_id: input.request_id.clone(),
        }
    }

    pub fn lookup(&self, ip: IpAddr) -> Result<(GeoLookup, Vec<DatabaseStatus>), GeoError> {
        let location = self.geo.lookup(ip)?;
        let databases = self.database_status(&location.databases, SystemTime::now());
        Ok((location, databases))
    }

    fn database_status(&self, databases: &[DatabaseMeta], now: SystemTime) -> Vec<DatabaseStatus> {
        databases
            .iter()
            .map(|meta| DatabaseStatus {
                meta: meta.clone(),
                stale: is_stale(meta.build_epoch, self.max_db_age, now),
            })
            .collect()
    }
}

thread_local! {
    /// Each thread's sequence of decision ids (monotonic within a millisecond).
    static DECISION_IDS: uuid::ContextV7 = const { uuid::ContextV7::new() };
}

/// A decision's id: a UUIDv7 of the time the decision was made at (the clock reading the
/// decision already has), in a sequence per thread. `Uuid::now_v7` read the clock again and
/// took a lock every thread shares, for every decision.
fn decision_id(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let at = DECISION_IDS
        .with(|ids| uuid::Timestamp::from_unix(ids, since.as_secs(), since.subsec_nanos()));
    // Encoded in place: `to_string` goes through the formatter, slower on this path.
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v7(at)
        .hyphenated()
        .encode_lower(&mut text)
        .to_owned()
}

/// Milliseconds since the Unix epoch (0 before it).
fn unix_ms(now: SystemTime) -> i64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Seconds since the Unix epoch (0 before it).
fn unix_secs(now: SystemTime) -> i64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether a database built at `build_epoch` is older than `max_age` at `now`.
pub fn is_stale(build_epoch: u64, max_age: Option<Duration>, now: SystemTime) -> bool {
    let Some(max_age) = max_age else { return false };
    let built = UNIX_EPOCH + Duration::from_secs(build_epoch);
    now.duration_since(built).is_ok_and(|age| age > max_age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_ids_carry_the_decision_time_and_never_repeat() {
        let at_ms = 1_796_000_000_123;
        let now = UNIX_EPOCH + Duration::from_millis(at_ms);
        let ids: Vec<String> = (0..10_000).map(|_| decision_id(now)).collect();
        let mut ordered = ids.clone();
        ordered.sort();
        ordered.dedup();
        assert_eq!(ordered, ids, "unique, and in the order they were made");
        let id = uuid::Uuid::parse_str(&ids[0]).unwrap();
        assert_eq!(id.get_version_num(), 7);
        let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
        assert_eq!(secs * 1_000 + u64::from(nanos / 1_000_000), at_ms);
        // Another thread's sequence is its own, and as unique.
        let other = std::thread::spawn(move || decision_id(now)).join().unwrap();
        assert!(!ids.contains(&other));
    }

    #[tokio::test]
    async fn a_shadow_policy_is_counted_never_returned() {
        use crate::geo::{DbRole, GeoDatabase, fixtures};
        use crate::policy::{EMBEDDED_POLICY, parse_policy};
        let db = GeoDatabase::from_bytes(DbRole::Location, fixtures::city_db(), "city").unwrap();
        let engine = Engine::new(
            parse_policy(EMBEDDED_POLICY, "active").unwrap(),
            Geo::new(Some(db), None, None, 10),
            None,
        );
        let shadow = EMBEDDED_POLICY.replacen("  \"CU\",", "  \"US\",\n  \"CU\",", 1);
        engine.set_shadow_policy(Some(parse_policy(&shadow, "shadow").unwrap()));
        let input = |ip: &str| ClassifyInput::for_ip(ip.parse().unwrap());
        let us = engine.classify(&input("216.160.83.57")).await.unwrap();
        assert_eq!(
            us.decision.verdict,
            crate::classify::Verdict::Allow,
            "the active policy decides"
        );
        engine.classify(&input("175.16.199.10")).await.unwrap();
        assert_eq!(
            engine.shadow_stats(),
            ShadowStats {
                evaluated: 2,
                differed: 1
            }
        );
    }

    #[test]
    fn staleness_compares_build_time_with_max_age() {
        let now = UNIX_EPOCH + Duration::from_secs(100 * 86_400);
        let day = Duration::from_secs(86_400);
        assert!(is_stale(0, Some(day * 30), now));
        assert!(!is_stale(90 * 86_400, Some(day * 30), now));
        assert!(!is_stale(0, None, now));
        assert!(
            !is_stale(200 * 86_400, Some(day), now),
            "built in the future is not stale"
        );
    }
}
