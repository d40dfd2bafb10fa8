//! Fleets in Redis: the link graph every replica shares, kept by one Lua script
//! (`fleet.lua`, which lists the keys) so that replicas agree on every fleet and its id.
//!
//! - The writer adds each batch's links with the script (`write`): a link value's accounts in a
//!   capped sorted set, and the union-find of the current generation, merged by size.
//! - A decision reads its account's fleet in the same pipelined round trip as the rest of its
//!   history (`read`); the coordination facts of a fleet are computed once a minute, in Redis,
//!   and kept for every replica.
//! - Expiry: union-find cannot split a component, so once an hour of event time (or when the
//!   link rules change) one replica, holding a lock, rebuilds the components into a new
//!   generation from the live links; writes meanwhile go to both, then the new generation takes
//!   over and the old one is deleted.
//!
//! All fleet keys share one hash tag (`{f}`): one Redis Cluster slot holds the whole graph.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use redis::aio::ConnectionManager;
use redis::{RedisResult, Script, Value};

use super::Keys;
use super::writer::bounded;
use crate::classify::{FleetFacts, LinkKind};
use crate::policy::FleetRules;
use crate::usage::UsageEvent;
use crate::usage::fleet::{
    FleetReport, LinkRef, MAX_COORDINATION_MEMBERS, REBUILD_SECS, WINDOW_MINUTES, fleet_id,
    link_refs, window,
};
use crate::usage::window::HISTORY_SECS;

pub(super) const SCRIPT: &str = include_str!("fleet.lua");

/// Generation keys live this long after their last write.
const GENERATION_TTL_MS: i64 = HISTORY_SECS * 1000;
/// The rebuilder's lock (and the dual writes it starts) lapse after this long.
const LOCK_MS: u64 = 600_000;
/// Accounts per script call: a call blocks Redis while it runs (about 30 µs an account with
/// three link values, so a call stays well under a millisecond).
const ACCOUNTS_PER_CALL: usize = 16;
/// Link values per script call, at most (a caller may send an account with many devices).
const VALUES_PER_CALL: usize = 64;
/// A link value an account was seen with is sent again only once its time has moved on by this
/// much (event time): a member's time in Redis lags by at most this, for expiry, which the
/// hourly rebuild makes hour-grained anyway.
const REFRESH_SECS: i64 = REBUILD_SECS;
/// Link values, and accounts' activity, remembered as sent, at most (then forgotten all at
/// once, and sent again).
const SENT_MAX: usize = 200_000;
/// Link keys a rebuild takes per script call (each up to 256 members).
const LIVE_PAGE: usize = 200;
/// Old fleets a rebuild carries the ids of per script call (each walks its members).
const CARRY_PAGE: usize = 200;
/// Fleet write pipelines in flight at once, per batch.
const PIPELINES_IN_FLIGHT: usize = 3;
/// Script calls per pipeline.
const CALLS_PER_PIPELINE: usize = 16;
/// After the link rules change, the graph is rebuilt at most this often (event time), so
/// replicas running different policies during a roll-out do not rebuild on every batch.
const RULES_REBUILD_SECS: i64 = 60;

/// The caps of the shared graph: accounts per generation, link values in all. What does not fit
/// is counted in Redis (`{f}refused`), never silently dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetLimits {
    pub max_accounts: u64,
    pub max_links: u64,
}

impl FleetLimits {
    /// Link values allowed per account held.
    pub const LINKS_PER_ACCOUNT: u64 = 2;

    pub fn for_accounts(max_accounts: u64) -> Self {
        Self {
            max_accounts,
            max_links: max_accounts.saturating_mul(Self::LINKS_PER_ACCOUNT),
        }
    }
}

impl Keys {
    /// The fleet keys' common start (their hash tag included).
    pub(super) fn fleets(&self) -> String {
        format!("{}{{f}}", self.prefix)
    }
}

/// One account's share of a batch, as the graph takes it.
pub(super) struct Record {
    first: i64,
    last: i64,
    /// Minutes active: bit i is minute `top - i` (as in-process).
    activity: Minutes,
    /// Link values with the latest time each was seen.
    links: HashMap<(LinkKind, Arc<str>), i64>,
}

pub(super) type Records = HashMap<Arc<str>, Record>;

/// The 64 latest minutes an account was active in: bit i is minute `top - i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Minutes {
    top: i64,
    bits: u64,
}

impl Minutes {
    fn of(minute: i64) -> Self {
        Self {
            top: minute,
            bits: 1,
        }
    }

    /// Adds `minute`; whether it was not there (a minute older than the 64 kept is dropped,
    /// as the script drops it).
    fn insert(&mut self, minute: i64) -> bool {
        if minute > self.top {
            let shift = minute - self.top;
            self.bits = if shift >= 64 { 0 } else { self.bits << shift };
            self.top = minute;
        }
        let age = self.top - minute;
        if age >= 64 || self.bits & (1 << age) != 0 {
            return false;
        }
        self.bits |= 1 << age;
        true
    }
}

/// What this writer sent lately: an account that keeps using its card, key and network costs
/// Redis one link update every [`REFRESH_SECS`] and one activity update a minute, not one per
/// event or per batch. Nothing else depends on it (what is not remembered is sent). Kept by
/// 64-bit hashes (seeded per process), so a lookup copies nothing; two values with one hash
/// would only delay one's resend by up to [`REFRESH_SECS`].
#[derive(Default)]
pub(super) struct Sent {
    hasher: foldhash::fast::RandomState,
    /// Hash of (account, kind, value) → the latest time sent.
    links: HashMap<u64, i64, foldhash::fast::RandomState>,
    /// Hash of an account → its first time and minutes sent.
    activity: HashMap<u64, (i64, Minutes), foldhash::fast::RandomState>,
}

impl Sent {
    /// Forgets everything: all is sent again.
    pub(super) fn clear(&mut self) {
        self.links.clear();
        self.activity.clear();
    }

    /// Whether `account`'s use of `value` at `t` must go to Redis (and then remembers it).
    fn needs(&mut self, account: &str, kind: LinkKind, value: LinkRef<'_>, t: i64) -> bool {
        if self.links.len() >= SENT_MAX {
            self.links.clear();
        }
        let key = self.hasher.hash_one((account, kind as u8, value));
        match self.links.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut sent) => {
                if t < *sent.get() + REFRESH_SECS {
                    return false;
                }
                sent.insert(t);
                true
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(t);
                true
            }
        }
    }

    /// Whether an event of `account` at `t` tells Redis something new about its activity: a
    /// minute not sent yet, or an earlier first time (and then remembers it).
    fn active(&mut self, account: &str, t: i64) -> bool {
        if self.activity.len() >= SENT_MAX {
            self.activity.clear();
        }
        let minute = t.div_euclid(60);
        match self.activity.entry(self.hasher.hash_one(account)) {
            std::collections::hash_map::Entry::Occupied(mut sent) => {
                let (first, minutes) = sent.get_mut();
                let earlier = t < *first;
                *first = (*first).min(t);
                minutes.insert(minute) | earlier
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert((t, Minutes::of(minute)));
                true
            }
        }
    }
}

pub(super) fn add(records: &mut Records, sent: &mut Sent, rules: &FleetRules, event: &UsageEvent) {
    let t = event.timestamp;
    let active = sent.active(&event.account_id, t);
    let mut links = link_refs(event, rules)
        .filter(|(kind, value)| sent.needs(&event.account_id, *kind, *value, t))
        .peekable();
    if !active && links.peek().is_none() {
        return;
    }
    let minute = t.div_euclid(60);
    let record = records
        .entry(event.account_id.clone())
        .or_insert_with(|| Record {
            first: t,
            last: t,
            activity: Minutes::of(minute),
            links: HashMap::new(),
        });
    record.first = record.first.min(t);
    record.last = record.last.max(t);
    record.activity.insert(minute);
    for (kind, value) in links {
        let seen = record.links.entry((kind, value.value())).or_insert(t);
        *seen = (*seen).max(t);
    }
}

/// The policy's link minimums as the script takes them (0: the kind does not link); also what
/// marks which rules a generation was built with.
fn minimums(rules: &FleetRules) -> String {
    LinkKind::ALL
        .map(|k| rules.link(k).unwrap_or(0).to_string())
        .join(",")
}

fn windows() -> String {
    LinkKind::ALL.map(|k| window(k).to_string()).join(",")
}

/// The script, and the keys it is called with.
pub(super) struct Graph {
    pub script: Script,
    base: String,
    gen_key: String,
}

/// What a batch's write learned: whether a rebuild is due, and when the graph was started (a
/// new start means Redis lost it, and what this writer remembers having sent is void).
pub(super) struct WriteStatus {
    pub newest: i64,
    pub rebuild_due: bool,
    pub epoch: String,
}

impl WriteStatus {
    /// What two pipelines of one batch said, whichever finished first: the newest time, a
    /// rebuild due if either says so, and the later start (Redis may have lost the graph
    /// between them).
    fn later(a: Self, b: Self) -> Self {
        let start = |s: &Self| {
            let (secs, micros) = s.epoch.split_once('.').unwrap_or((&s.epoch, "0"));
            (secs.parse::<i64>().ok(), micros.parse::<i64>().ok())
        };
        let epoch = if start(&b) >= start(&a) {
            b.epoch
        } else {
            a.epoch
        };
        Self {
            newest: a.newest.max(b.newest),
            rebuild_due: a.rebuild_due || b.rebuild_due,
            epoch,
        }
    }
}

impl Graph {
    pub(super) fn new(keys: &Keys) -> Self {
        let base = keys.fleets();
        Self {
            script: Script::new(SCRIPT),
            gen_key: format!("{base}gen"),
            base,
        }
    }

    fn call(&self, mode: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash())
            .arg(1)
            .arg(&self.gen_key)
            .arg(mode)
            .arg(&self.base);
        cmd
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.base)
    }

    fn generation_key(&self, generation: &str, name: &str) -> String {
        format!("{}{generation}:{name}", self.base)
    }

    /// Writes `records`, taking out what was written (a retry after an error writes the rest;
    /// writing a record twice changes nothing).
    pub(super) async fn write(
        &self,
        conn: &mut ConnectionManager,
        rules: &FleetRules,
        limits: FleetLimits,
        records: &mut Records,
        refused: &mut u64,
    ) -> RedisResult<Option<WriteStatus>> {
        let (mins, windows) = (minimums(rules), windows());
        let mut status = None;
        let mut all: Vec<(Arc<str>, Record)> = records.drain().collect();
        let mut parts = Vec::new();
        while !all.is_empty() {
            let take = all.len().min(ACCOUNTS_PER_CALL * CALLS_PER_PIPELINE);
            let part: Vec<(Arc<str>, Record)> = all.drain(all.len() - take..).collect();
            let newest = part.iter().map(|(_, r)| r.last).max().unwrap_or(0);
            let header = || {
                let mut cmd = self.call("write");
                cmd.arg(GENERATION_TTL_MS)
                    .arg(limits.max_accounts)
                    .arg(limits.max_links)
                    .arg(newest)
                    .arg(&mins)
                    .arg(&windows);
                cmd
            };
            // Calls of at most ACCOUNTS_PER_CALL accounts and VALUES_PER_CALL link values: an
            // account with more values is split over calls (its activity sent with each piece,
            // which changes nothing).
            let mut pipe = redis::pipe();
            let (mut cmd, mut accounts, mut values) = (header(), 0, 0);
            for (account, r) in &part {
                let links: Vec<_> = r.links.iter().collect();
                let pieces: Vec<&[_]> = if links.is_empty() {
                    vec![&[]]
                } else {
                    links.chunks(VALUES_PER_CALL).collect()
                };
                for piece in pieces {
                    if accounts == ACCOUNTS_PER_CALL || values + piece.len() > VALUES_PER_CALL {
                        pipe.add_command(std::mem::replace(&mut cmd, header()));
                        (accounts, values) = (0, 0);
                    }
                    cmd.arg(&**account)
                        .arg(r.first)
                        .arg(r.last)
                        .arg(r.activity.top)
                        .arg((r.activity.bits >> 32) as u32)
                        .arg(r.activity.bits as u32)
                        .arg(piece.len());
                    for ((kind, value), t) in piece {
                        cmd.arg(*kind as u8).arg(&**value).arg(**t);
                    }
                    accounts += 1;
                    values += piece.len();
                }
            }
            if accounts > 0 {
                pipe.add_command(cmd);
            }
            parts.push((part, pipe));
        }
        // A few pipelines in flight, so that Redis works while replies travel and are parsed.
        let mut parts = parts.into_iter();
        let mut running = tokio::task::JoinSet::new();
        let mut failed = None;
        loop {
            while failed.is_none() && running.len() < PIPELINES_IN_FLIGHT {
                let Some((part, pipe)) = parts.next() else {
                    break;
                };
                let mut conn = conn.clone();
                running.spawn(async move {
                    let replies = bounded(pipe.query_async::<Vec<Vec<String>>>(&mut conn)).await;
                    (part, replies)
                });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            match done {
                Ok((_, Ok(replies))) => {
                    if let Some(last) = replies.last() {
                        match write_status(last, &mins) {
                            Ok(got) => {
                                status = Some(match status.take() {
                                    Some(before) => WriteStatus::later(before, got),
                                    None => got,
                                })
                            }
                            Err(error) => {
                                failed.get_or_insert(error);
                            }
                        }
                    }
                }
                // Keys Redis refuses for good (another application's value under the prefix, an
                // ACL): retrying cannot help, so this part's links are dropped and counted; the
                // other parts go on.
                Ok((part, Err(error))) if super::writer::refused_for_good(&error) => {
                    tracing::warn!(%error, accounts = part.len(), "usage history in Redis: the fleet graph's keys are refused; fleet updates dropped");
                    *refused += part.len() as u64;
                }
                Ok((part, Err(error))) => {
                    records.extend(part);
                    failed.get_or_insert(error);
                }
                Err(error) => {
                    // Short of a bug a pipeline task cannot panic; its accounts' fleet updates
                    // are then lost (the next minute or hour sends them again).
                    tracing::error!(%error, "usage history: a fleet write task failed");
                }
            }
        }
        records.extend(parts.flat_map(|(part, _)| part));
        match failed {
            Some(error) => Err(error),
            None => Ok(status),
        }
    }

    /// Adds the read of `account`'s fleet to a decision's pipeline (its reply: [`parse_read`]).
    pub(super) fn read(&self, pipe: &mut redis::Pipeline, account: &str, now: i64) {
        let mut cmd = self.call("read");
        cmd.arg(account)
            .arg(now)
            .arg(HISTORY_SECS)
            .arg(MAX_COORDINATION_MEMBERS)
            .arg(WINDOW_MINUTES);
        pipe.add_command(cmd);
    }

    /// Rebuilds the components into a new generation, if this replica gets the lock; `me`
    /// names the lock holder. Returns whether it rebuilt. A failed rebuild deletes what it
    /// built (or the next one sweeps it).
    pub(super) async fn rebuild(
        &self,
        conn: &mut ConnectionManager,
        rules: &FleetRules,
        me: &str,
        newest: i64,
    ) -> RedisResult<bool> {
        let got: Option<String> = redis::cmd("SET")
            .arg(self.key("lock"))
            .arg(me)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_MS)
            .query_async(conn)
            .await?;
        if got.is_none() {
            return Ok(false);
        }
        let mut new = None;
        let result = self.build(conn, rules, me, newest, &mut new).await;
        if result.is_err() {
            let _: RedisResult<i64> = self.call("abandon").arg(me).query_async(conn).await;
            if let Some(new) = new {
                let _ = self.drop_generation(conn, &new).await;
            }
        }
        result
    }

    /// Keeps the lock (and the dual writes) for another [`LOCK_MS`]; an error once it lapsed.
    async fn renew(&self, conn: &mut ConnectionManager, me: &str) -> RedisResult<()> {
        let held: i64 = self
            .call("renew")
            .arg(me)
            .arg(LOCK_MS)
            .query_async(conn)
            .await?;
        if held != 1 {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "fleet rebuild: the lock lapsed",
            )));
        }
        Ok(())
    }

    async fn build(
        &self,
        conn: &mut ConnectionManager,
        rules: &FleetRules,
        me: &str,
        newest: i64,
        building: &mut Option<String>,
    ) -> RedisResult<bool> {
        let old: Option<String> = redis::cmd("GET")
            .arg(&self.gen_key)
            .query_async(conn)
            .await?;
        // Generations a failed rebuild left behind.
        let held: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("gens"))
            .query_async(conn)
            .await?;
        for stale in held.iter().filter(|g| Some(*g) != old.as_ref()) {
            self.drop_generation(conn, stale).await?;
            self.renew(conn, me).await?;
        }
        let new: i64 = redis::cmd("INCR")
            .arg(self.key("genseq"))
            .query_async(conn)
            .await?;
        let new = new.to_string();
        *building = Some(new.clone());
        let () = redis::pipe()
            .cmd("SADD")
            .arg(self.key("gens"))
            .arg(&new)
            .ignore()
            .cmd("SET")
            .arg(self.key("building"))
            .arg(&new)
            .arg("PX")
            .arg(LOCK_MS)
            .ignore()
            .query_async(conn)
            .await?;
        // From here on writes go to both generations. Accounts active within the window move.
        let accounts = self.generation_key(&new, "A");
        if let Some(old) = &old {
            let from = self.generation_key(old, "A");
            let mut pages = HashPages::new(&from, 1000);
            while let Some(items) = pages.next(conn).await? {
                let mut pipe = redis::pipe();
                for (account, activity) in &items {
                    if last_seen(activity).is_some_and(|t| t > newest - HISTORY_SECS) {
                        pipe.cmd("HSETNX")
                            .arg(&accounts)
                            .arg(account)
                            .arg(activity)
                            .ignore();
                    }
                }
                let () = pipe.query_async(conn).await?;
                self.renew(conn, me).await?;
            }
        }
        let () = redis::cmd("PEXPIRE")
            .arg(&accounts)
            .arg(GENERATION_TTL_MS)
            .query_async(conn)
            .await?;
        // The components, from the link keys the index holds that are still live.
        let links_prefix = self.key("l:");
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(self.key("index"))
                .arg(cursor)
                .arg("COUNT")
                .arg(LIVE_PAGE)
                .query_async(conn)
                .await?;
            let kinds: Vec<(String, LinkKind)> = keys
                .into_iter()
                .filter_map(|key| {
                    let kind = link_kind(key.strip_prefix(&links_prefix)?)?;
                    Some((key, kind))
                })
                .collect();
            if !kinds.is_empty() {
                let mut live = self.call("live");
                live.arg(newest);
                for (key, kind) in &kinds {
                    live.arg(key).arg(window(*kind));
                }
                let members: Vec<Vec<String>> = live.query_async(conn).await?;
                let mut unions = redis::pipe();
                for ((key, kind), members) in kinds.iter().zip(&members) {
                    let Some(min) = rules.link(*kind) else {
                        continue;
                    };
                    if members.len() < min as usize || members.len() < 2 {
                        continue;
                    }
                    let mut cmd = self.call("union");
                    cmd.arg(GENERATION_TTL_MS)
                        .arg(&new)
                        .arg(*kind as u8)
                        .arg(key)
                        .arg(min)
                        .arg(members);
                    unions.add_command(cmd).ignore();
                }
                let () = unions.query_async(conn).await?;
            }
            self.renew(conn, me).await?;
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // Each id follows its founder into the new generation.
        if let Some(old) = &old {
            let roots = self.generation_key(old, "r");
            let mut pages = HashPages::new(&roots, CARRY_PAGE);
            while let Some(items) = pages.next(conn).await? {
                if !items.is_empty() {
                    let mut carry = self.call("carry");
                    carry.arg(GENERATION_TTL_MS).arg(old).arg(&new);
                    for (root, _) in &items {
                        carry.arg(root);
                    }
                    let _: i64 = carry.query_async(conn).await?;
                }
                self.renew(conn, me).await?;
            }
        }
        let flipped: i64 = self
            .call("flip")
            .arg(me)
            .arg(&new)
            .arg(newest)
            .arg(minimums(rules))
            .query_async(conn)
            .await?;
        if flipped != 1 {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "fleet rebuild: the lock lapsed before the new generation was ready",
            )));
        }
        *building = None;
        if let Some(old) = old {
            // Left for the next rebuild to sweep if this fails (it stays in `gens`).
            self.drop_generation(conn, &old).await?;
        }
        Ok(true)
    }

    /// Deletes a generation's keys: those of each root it holds, then its hashes; no keyspace
    /// SCAN, so it works the same on Redis Cluster.
    async fn drop_generation(&self, conn: &mut ConnectionManager, old: &str) -> RedisResult<()> {
        let roots = self.generation_key(old, "r");
        let mut pages = HashPages::new(&roots, 1000);
        while let Some(items) = pages.next(conn).await? {
            if !items.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                for (root, _) in &items {
                    for kind in ["m", "L", "c", "k"] {
                        unlink.arg(self.generation_key(old, &format!("{kind}:{root}")));
                    }
                }
                let _: i64 = unlink.query_async(conn).await?;
            }
        }
        let _: i64 = redis::cmd("UNLINK")
            .arg(self.generation_key(old, "A"))
            .arg(self.generation_key(old, "p"))
            .arg(roots)
            .query_async(conn)
            .await?;
        let _: i64 = redis::cmd("SREM")
            .arg(self.key("gens"))
            .arg(old)
            .query_async(conn)
            .await?;
        Ok(())
    }

    /// The fleet with this id, for reviewers: its members and the values linking them, as the
    /// in-process graph reports them.
    /// The root of the fleet whose former founders (`G:k:ROOT`) include the one `id` names: the
    /// roots a page at a time, their founder sets in one pipeline a page.
    async fn root_that_was(
        &self,
        conn: &mut ConnectionManager,
        generation: &str,
        id: &str,
    ) -> RedisResult<Option<String>> {
        let roots = self.generation_key(generation, "r");
        let mut pages = HashPages::new(&roots, 1000);
        while let Some(items) = pages.next(conn).await? {
            let mut pipe = redis::pipe();
            for (root, _) in &items {
                pipe.cmd("SMEMBERS")
                    .arg(self.generation_key(generation, &format!("k:{root}")));
            }
            let founders: Vec<Vec<String>> = pipe.query_async(conn).await?;
            let found = items
                .into_iter()
                .zip(founders)
                .find(|(_, founders)| founders.iter().any(|f| fleet_id(f) == id));
            if let Some(((root, _), _)) = found {
                return Ok(Some(root));
            }
        }
        Ok(None)
    }

    pub(super) async fn report(
        &self,
        conn: &mut ConnectionManager,
        rules: &FleetRules,
        id: &str,
        now: i64,
    ) -> RedisResult<Option<FleetReport>> {
        let Some(generation): Option<String> = redis::cmd("GET")
            .arg(&self.gen_key)
            .query_async(conn)
            .await?
        else {
            return Ok(None);
        };
        // Roots of components with two members or more, by their founders' ids.
        let roots = self.generation_key(&generation, "r");
        let mut pages = HashPages::new(&roots, 1000);
        let mut root = None;
        while root.is_none()
            && let Some(items) = pages.next(conn).await?
        {
            root = items.into_iter().find_map(|(root, info)| {
                let founder = info.splitn(4, ',').nth(3)?;
                (fleet_id(founder) == id).then_some(root)
            });
        }
        let root = match root {
            Some(root) => root,
            // An id the fleet had before (a decision's, from before a merge): the fleet now.
            None => match self.root_that_was(conn, &generation, id).await? {
                Some(root) => root,
                None => return Ok(None),
            },
        };
        let mut pipe = redis::pipe();
        self.read(&mut pipe, &root, now);
        pipe.cmd("SMEMBERS")
            .arg(self.generation_key(&generation, &format!("m:{root}")));
        pipe.cmd("SMEMBERS")
            .arg(self.generation_key(&generation, &format!("L:{root}")));
        let (read, members, link_keys): (Value, Vec<String>, Vec<String>) =
            pipe.query_async(conn).await?;
        let Some(facts) = parse_read(read).map_err(unreadable)?.0 else {
            return Ok(None);
        };
        let in_fleet: HashSet<&str> = members.iter().map(String::as_str).collect();
        let links_prefix = self.key("l:");
        let kinds: Vec<(String, LinkKind, String)> = link_keys
            .into_iter()
            .filter_map(|key| {
                let rest = key.strip_prefix(&links_prefix)?;
                let kind = link_kind(rest)?;
                let value = rest.split_once(':')?.1.to_owned();
                Some((key, kind, value))
            })
            .collect();
        let mut pipe = redis::pipe();
        for (key, kind, _) in &kinds {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(key)
                .arg(format!("({}", now - window(*kind)))
                .arg("+inf");
        }
        let live: Vec<Vec<String>> = pipe.query_async(conn).await?;
        let mut links: Vec<(LinkKind, String, u32)> = kinds
            .into_iter()
            .zip(live)
            .filter_map(|((_, kind, value), live)| {
                // Only values strong enough to link, as the unions counted them.
                let min = rules.link(kind)?;
                if (live.len() as u32) < min {
                    return None;
                }
                let shared = live
                    .iter()
                    .filter(|m| in_fleet.contains(m.as_str()))
                    .count() as u32;
                (shared >= 2).then_some((kind, value, shared))
            })
            .collect();
        links.sort_unstable_by(|a, b| b.2.cmp(&a.2).then_with(|| (a.0, &a.1).cmp(&(b.0, &b.1))));
        let mut members: Vec<Arc<str>> = members.into_iter().map(Arc::from).collect();
        members.sort_unstable();
        Ok(Some(FleetReport {
            facts,
            members,
            links,
        }))
    }
}

fn unreadable(message: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Parse, "fleet script", message))
}

fn write_status(reply: &[String], mins: &str) -> RedisResult<WriteStatus> {
    let number = |i: usize| reply.get(i).and_then(|v| v.parse::<i64>().ok());
    let newest = number(0).ok_or_else(|| unreadable(format!("write reply {reply:?}")))?;
    let built = number(1).unwrap_or(i64::MIN);
    let rules_differ = reply.get(2).is_none_or(|r| r != mins);
    let since = newest.saturating_sub(built);
    Ok(WriteStatus {
        newest,
        rebuild_due: since >= REBUILD_SECS || (rules_differ && since >= RULES_REBUILD_SECS),
        epoch: reply.get(3).cloned().unwrap_or_default(),
    })
}

/// The fields of a hash, about `count` at a time (HSCAN: no keyspace scan, and a page a call,
/// so a large hash never blocks Redis).
struct HashPages<'a> {
    key: &'a str,
    count: usize,
    /// The next cursor; none once the scan is done.
    cursor: Option<u64>,
}

impl<'a> HashPages<'a> {
    fn new(key: &'a str, count: usize) -> Self {
        Self {
            key,
            count,
            cursor: Some(0),
        }
    }

    async fn next(
        &mut self,
        conn: &mut ConnectionManager,
    ) -> RedisResult<Option<Vec<(String, String)>>> {
        let Some(cursor) = self.cursor else {
            return Ok(None);
        };
        let (next, items): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(self.key)
            .arg(cursor)
            .arg("COUNT")
            .arg(self.count)
            .query_async(conn)
            .await?;
        self.cursor = (next != 0).then_some(next);
        Ok(Some(items))
    }
}

/// The link kind a key (after the `l:` prefix) names: `KIND:VALUE`, KIND a digit.
fn link_kind(rest: &str) -> Option<LinkKind> {
    let (kind, _) = rest.split_once(':')?;
    LinkKind::ALL.get(kind.parse::<usize>().ok()?).copied()
}

/// The last time in an account's activity (`first,last,top,hi,lo`).
fn last_seen(activity: &str) -> Option<i64> {
    activity.split(',').nth(1)?.parse().ok()
}

/// The read's reply: the account's fleet (when in one) and the accounts sharing its most
/// widely shared prompt template.
pub(super) fn parse_read(reply: Value) -> Result<(Option<FleetFacts>, u32), String> {
    let Value::Array(items) = reply else {
        return Err(format!("fleet read: unexpected {reply:?}"));
    };
    let int = |v: &Value| -> Result<i64, String> {
        redis::from_redis_value_ref(v).map_err(|e| format!("fleet read: {e}"))
    };
    let templates = int(items.first().ok_or("fleet read: empty reply")?)?;
    let templates = u32::try_from(templates).unwrap_or(u32::MAX);
    if items.len() < 5 {
        return Ok((None, templates));
    }
    let size = int(&items[1])?;
    let kinds = int(&items[2])?;
    let founder: String =
        redis::from_redis_value_ref(&items[3]).map_err(|e| format!("fleet read: {e}"))?;
    let coordination: String =
        redis::from_redis_value_ref(&items[4]).map_err(|e| format!("fleet read: {e}"))?;
    let mut parts = coordination.split(',');
    let mut next = || parts.next().ok_or("fleet read: short coordination");
    let active: u32 = next()?.parse().map_err(|_| "fleet read: active")?;
    let coactive: u64 = next()?.parse().map_err(|_| "fleet read: coactive")?;
    let expected: f64 = next()?.parse().map_err(|_| "fleet read: expected")?;
    let former: Vec<String> = match items.get(5) {
        Some(former) => {
            redis::from_redis_value_ref(former).map_err(|e| format!("fleet read: {e}"))?
        }
        None => Vec::new(),
    };
    let mut formerly: Vec<String> = former
        .iter()
        .filter(|account| **account != founder)
        .map(|account| fleet_id(account))
        .collect();
    formerly.sort_unstable();
    formerly.dedup();
    Ok((
        Some(FleetFacts {
            id: fleet_id(&founder),
            formerly,
            size: u32::try_from(size).unwrap_or(u32::MAX),
            links: LinkKind::from_bits(kinds as u8),
            active_members_1h: active,
            coactive_pairs_1h: coactive,
            expected_coactive_pairs_1h: expected,
        }),
        templates,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_numbers_kinds_as_link_kind_does() {
        // fleet.lua's TEMPLATE_KIND, and the digit in every link key.
        assert_eq!(LinkKind::PromptTemplate as usize, 5);
        assert!(SCRIPT.contains("local TEMPLATE_KIND = 5"));
        assert_eq!(link_kind("2:device-1"), Some(LinkKind::Device));
        assert_eq!(link_kind("9:x"), None);
        assert_eq!(last_seen("10,20,1,0,5"), Some(20));
    }

    #[test]
    fn minutes_keep_the_64_latest_and_say_what_is_new() {
        let mut m = Minutes::of(100);
        assert!(!m.insert(100));
        assert!(m.insert(99));
        assert!(m.insert(163));
        assert_eq!((m.top, m.bits), (163, 1 | 1 << 63));
        // Minute 99 is now 64 minutes old: dropped, and not new.
        assert!(!m.insert(99));
        assert!(m.insert(300));
        assert_eq!((m.top, m.bits), (300, 1));
    }

    #[test]
    fn an_account_is_sent_again_only_with_a_new_minute_or_an_earlier_first_time() {
        let mut sent = Sent::default();
        let a: Arc<str> = Arc::from("a");
        assert!(sent.active(&a, 6_000));
        assert!(!sent.active(&a, 6_030));
        assert!(sent.active(&a, 6_060));
        // An earlier event in a minute already sent moves the first time back.
        assert!(sent.active(&a, 5_999));
        assert!(!sent.active(&a, 6_001));
        let rules = FleetRules::default();
        let event = UsageEvent {
            account_id: a.clone(),
            ip: "192.0.2.1".parse().unwrap(),
            timestamp: 6_010,
            api_key_id: Some(Arc::from("key-1")),
            requests: 1,
            input_tokens: 0,
            output_tokens: 0,
            payment_fingerprint: Some(Arc::from("card-1")),
            device_id: None,
            prompt_fingerprint: None,
            organization_domain: None,
        };
        let mut records = Records::new();
        add(&mut records, &mut sent, &rules, &event);
        // Its minute was sent, but not its link values.
        let record = records.get(&a).expect("links to send");
        assert!(!record.links.is_empty());
        records.clear();
        add(&mut records, &mut sent, &rules, &event);
        assert!(records.is_empty(), "nothing new to send");
    }

    #[test]
    fn a_batch_says_the_newest_time_and_the_later_start_whatever_order_its_pipelines_end() {
        let status = |newest, due, epoch: &str| WriteStatus {
            newest,
            rebuild_due: due,
            epoch: epoch.into(),
        };
        // Redis restarted between two pipelines: the later start wins either way round
        // (microseconds unpadded, as TIME says them).
        for (a, b) in [
            (status(50, false, "100.999"), status(40, true, "100.1000")),
            (status(40, true, "100.1000"), status(50, false, "100.999")),
        ] {
            let s = WriteStatus::later(a, b);
            assert_eq!(
                (s.newest, s.rebuild_due, s.epoch.as_str()),
                (50, true, "100.1000")
            );
        }
    }

    #[test]
    fn a_rebuild_is_due_hourly_or_when_the_rules_change() {
        let reply =
            |built: &str, rules: &str| vec!["10000".to_owned(), built.to_owned(), rules.to_owned()];
        let due = |r: Vec<String>| write_status(&r, "2,2").unwrap().rebuild_due;
        assert!(!due(reply("9000", "2,2")));
        assert!(due(reply("6400", "2,2")));
        assert!(due(reply("9000", "3,2")));
        assert!(!due(reply("9990", "3,2")));
    }
}
