//! Fleets: accounts linked by values they shared within the usage window (payment
//! fingerprints, API keys, devices, organisation domains, networks, prompt templates), kept as
//! the connected components of that graph by union-find.
//!
//! Times are arguments (seconds since the epoch); nothing here reads a clock. Unions are
//! incremental as events arrive. Union-find cannot split a component, so expiry is a rebuild:
//! at most once an hour of event time (or when the policy's link rules change) expired link
//! members and idle accounts are dropped and the components recomputed from the links that are
//! left. Memory is bounded: at most `max_accounts` accounts and `max_links` link values; what
//! does not fit is counted in [`FleetStats::refused`], never silently.

use std::collections::hash_map::Entry;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::window::HISTORY_SECS;
use super::{DAY, NetworkKey, UsageEvent};
use crate::classify::{FleetFacts, LinkKind};
use crate::policy::FleetRules;

/// Accounts remembered per link value (the most recent; older ones drop out).
pub(crate) const MAX_MEMBERS: usize = 256;
/// Prompt templates remembered per account, for USAGE_TEMPLATE_REPETITION.
pub(crate) const TEMPLATES_PER_ACCOUNT: usize = 4;
/// Expired links are dropped, and components recomputed, this often (event time).
pub(crate) const REBUILD_SECS: i64 = 3600;
/// Members looked at for coordination: a bigger fleet is sampled by its first members.
pub(crate) const MAX_COORDINATION_MEMBERS: usize = 1024;
/// The coordination window, in minutes.
pub(crate) const WINDOW_MINUTES: i64 = 60;

/// Bytes per account and per link value, for the memory ceiling: the structures' sizes, scaled
/// to resident memory as `cargo bench --bench usage` measures it (a million linked accounts,
/// 2 link values each: 612–663 B resident an account over three runs; at a 32 MiB share, about 600 B an account
/// held with 1.4 values each), so that what is counted is about what the process holds.
pub const ACCOUNT_BYTES: u64 = 280;
pub const LINK_BYTES: u64 = 200;

pub(crate) fn window(kind: LinkKind) -> i64 {
    match kind {
        LinkKind::Network => DAY,
        _ => HISTORY_SECS,
    }
}

struct Node {
    account: Arc<str>,
    first_seen: i64,
    last_seen: i64,
    /// Minutes active: bit i is minute `minute - i`.
    minutes: u64,
    minute: i64,
    templates: Vec<(Arc<str>, i64)>,
    // Union-find.
    parent: u32,
    /// Circular list of the component's members.
    next: u32,
    /// At a root: members, link kinds (bits of `LinkKind::bit`), founding member.
    size: u32,
    kinds: u8,
    founder: u32,
}

struct Link {
    members: Vec<(u32, i64)>,
}

impl Link {
    fn live(&self, since: i64) -> impl Iterator<Item = u32> + '_ {
        self.members
            .iter()
            .filter(move |(_, t)| *t > since)
            .map(|(n, _)| *n)
    }
}

/// Sizes, for metrics and the benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetStats {
    pub accounts: u64,
    pub links: u64,
    /// Accounts or link values not taken because the ceiling was reached.
    pub refused: u64,
    pub rebuilds: u64,
}

/// One fleet as reviewers see it.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetReport {
    pub facts: FleetFacts,
    pub members: Vec<Arc<str>>,
    /// The values that link members: kind, value, accounts sharing it.
    pub links: Vec<(LinkKind, String, u32)>,
}

/// foldhash, seeded per process (keys are caller-chosen), as the gateway cache uses.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub struct FleetGraph {
    accounts: HashMap<Arc<str>, u32>,
    nodes: Vec<Node>,
    links: HashMap<(LinkKind, Arc<str>), Link>,
    rules: FleetRules,
    built_at: i64,
    newest: i64,
    max_accounts: usize,
    max_links: usize,
    refused: u64,
    rebuilds: u64,
    /// Fleet facts per root, as last computed: reused within the minute while the component
    /// keeps its size and links, so a decision costs a lookup, not a walk of the members.
    cached: HashMap<u32, Cached>,
    /// Graphs of more accounts than this are not rebuilt inside `record`: their holder rebuilds
    /// them when [`FleetGraph::rebuild_due`] says so (off the request path).
    inline_rebuild_max: usize,
    /// Per root: the founders the fleet had before (see [`absorb`]), each a member of the
    /// fleet: at most one entry per member, bounded by the accounts held.
    former: HashMap<u32, Vec<u32>>,
}

struct Cached {
    minute: i64,
    size: u32,
    kinds: u8,
    facts: FleetFacts,
}

/// `fl_` and 16 hex digits of the founder's SHA-256: the same on every replica, and no
/// account id in another account's evidence.
pub fn fleet_id(founder: &str) -> String {
    let digest = Sha256::digest(founder.as_bytes());
    let mut id = String::with_capacity(19);
    id.push_str("fl_");
    for b in &digest[..8] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// Whether `text` has the form [`fleet_id`] gives (`fl_` and 16 lowercase hex digits).
pub fn is_fleet_id(text: &str) -> bool {
    text.strip_prefix("fl_").is_some_and(|hex| {
        hex.len() == 16
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A link value as an event holds it, before it is made a key (a network is formatted only
/// when its text is needed).
#[derive(Clone, Copy, Debug, Hash)]
pub(crate) enum LinkRef<'a> {
    Text(&'a Arc<str>),
    Network(NetworkKey),
}

impl LinkRef<'_> {
    pub(crate) fn value(self) -> Arc<str> {
        match self {
            Self::Text(value) => value.clone(),
            Self::Network(network) => Arc::from(network.to_string()),
        }
    }
}

/// The values of an event that the graph keeps: those of the kinds that link under `rules`,
/// and prompt templates always (they count for USAGE_TEMPLATE_REPETITION even when they do not
/// link). Both adapters keep exactly these.
pub(crate) fn link_refs<'a>(
    event: &'a UsageEvent,
    rules: &FleetRules,
) -> impl Iterator<Item = (LinkKind, LinkRef<'a>)> + 'a {
    let text = |value: &'a Option<Arc<str>>| value.as_ref().map(LinkRef::Text);
    let values = [
        (
            LinkKind::PaymentFingerprint,
            text(&event.payment_fingerprint),
        ),
        (LinkKind::ApiKey, text(&event.api_key_id)),
        (LinkKind::Device, text(&event.device_id)),
        (
            LinkKind::OrganizationDomain,
            text(&event.organization_domain),
        ),
        (
            LinkKind::Network,
            Some(LinkRef::Network(NetworkKey::of(event.ip))),
        ),
        (LinkKind::PromptTemplate, text(&event.prompt_fingerprint)),
    ];
    let rules = *rules;
    values.into_iter().filter_map(move |(kind, value)| {
        let value = value?;
        (rules.link(kind).is_some() || kind == LinkKind::PromptTemplate).then_some((kind, value))
    })
}

/// [`link_refs`], as keys.
pub(crate) fn link_values<'a>(
    event: &'a UsageEvent,
    rules: &FleetRules,
) -> impl Iterator<Item = (LinkKind, Arc<str>)> + 'a {
    link_refs(event, rules).map(|(kind, value)| (kind, value.value()))
}

impl FleetGraph {
    /// A graph within `max_bytes` (estimated; see [`ACCOUNT_BYTES`], [`LINK_BYTES`]).
    pub fn new(max_bytes: u64, rules: FleetRules) -> Self {
        Self {
            accounts: HashMap::default(),
            nodes: Vec::new(),
            links: HashMap::default(),
            rules,
            built_at: i64::MIN,
            newest: i64::MIN,
            max_accounts: (max_bytes / 2 / ACCOUNT_BYTES) as usize,
            max_links: (max_bytes / 2 / LINK_BYTES) as usize,
            refused: 0,
            rebuilds: 0,
            cached: HashMap::default(),
            former: HashMap::default(),
            inline_rebuild_max: usize::MAX,
        }
    }

    /// Leaves the rebuild of a graph of more than `accounts` accounts to its holder.
    pub(crate) fn rebuild_inline_up_to(&mut self, accounts: usize) {
        self.inline_rebuild_max = accounts;
    }

    /// Whether expired links should be dropped now (an hour of event time since the last
    /// rebuild, or new link rules).
    pub(crate) fn rebuild_due(&self) -> bool {
        self.newest.saturating_sub(self.built_at) >= REBUILD_SECS
    }

    /// Rebuilds as of the newest event seen.
    pub(crate) fn rebuild_now(&mut self) {
        self.rebuild(self.newest);
    }

    /// Takes new link rules; the components are recomputed by the next event.
    pub fn set_rules(&mut self, rules: FleetRules) {
        if rules.links != self.rules.links {
            self.built_at = i64::MIN;
        }
        self.rules = rules;
    }

    pub fn stats(&self) -> FleetStats {
        FleetStats {
            accounts: self.accounts.len() as u64,
            links: self.links.len() as u64,
            refused: self.refused,
            rebuilds: self.rebuilds,
        }
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> u64 {
        self.accounts.len() as u64 * ACCOUNT_BYTES + self.links.len() as u64 * LINK_BYTES
    }

    /// Adds one event's links.
    pub fn record(&mut self, event: &UsageEvent) {
        let t = event.timestamp;
        if t > self.newest {
            self.newest = t;
        }
        if self.rebuild_due() && self.accounts.len() <= self.inline_rebuild_max {
            self.rebuild(self.newest);
        }
        let Some(node) = self.node(&event.account_id, t) else {
            return;
        };
        let last_seen = &mut self.nodes[node as usize].last_seen;
        *last_seen = (*last_seen).max(t);
        if t < self.nodes[node as usize].first_seen {
            // The earliest event, whatever order events came in; the fleet's founder is its
            // earliest member, so that every replica names the fleet alike.
            self.nodes[node as usize].first_seen = t;
            let root = find(&mut self.nodes, node);
            let founder = self.nodes[root as usize].founder;
            if earlier(&self.nodes, node, founder) == node && founder != node {
                self.nodes[root as usize].founder = node;
                self.cached.remove(&root);
                // The fleet's id changes with its founder: the old one is kept as a former id.
                add_former(&mut self.former, root, [founder], node);
            }
        }
        {
            let n = &mut self.nodes[node as usize];
            let minute = t.div_euclid(60);
            if minute > n.minute {
                let shift = minute - n.minute;
                n.minutes = if shift >= 64 { 0 } else { n.minutes << shift };
                n.minute = minute;
            }
            let age = n.minute - minute;
            if age < 64 {
                n.minutes |= 1 << age;
            }
        }
        let rules = self.rules;
        for (kind, value) in link_values(event, &rules) {
            if kind == LinkKind::PromptTemplate {
                let templates = &mut self.nodes[node as usize].templates;
                match templates.iter_mut().find(|(v, _)| *v == value) {
                    Some(seen) => seen.1 = seen.1.max(t),
                    None => {
                        if templates.len() == TEMPLATES_PER_ACCOUNT {
                            let oldest = (0..templates.len())
                                .min_by_key(|i| templates[*i].1)
                                .unwrap_or(0);
                            templates.swap_remove(oldest);
                        }
                        templates.push((value.clone(), t));
                    }
                }
            }
            self.observe(kind, value, node, t);
        }
    }

    fn node(&mut self, account: &Arc<str>, t: i64) -> Option<u32> {
        if let Some(&n) = self.accounts.get(account) {
            return Some(n);
        }
        if self.accounts.len() >= self.max_accounts {
            self.refused += 1;
            return None;
        }
        let n = self.nodes.len() as u32;
        self.nodes.push(Node {
            account: account.clone(),
            first_seen: t,
            last_seen: t,
            minutes: 0,
            minute: t.div_euclid(60),
            templates: Vec::new(),
            parent: n,
            next: n,
            size: 1,
            kinds: 0,
            founder: n,
        });
        self.accounts.insert(account.clone(), n);
        Some(n)
    }

    fn observe(&mut self, kind: LinkKind, value: Arc<str>, node: u32, t: i64) {
        let full = self.links.len() >= self.max_links;
        let link = match self.links.entry((kind, value)) {
            Entry::Occupied(link) => link.into_mut(),
            Entry::Vacant(_) if full => {
                self.refused += 1;
                return;
            }
            Entry::Vacant(slot) => slot.insert(Link {
                members: Vec::new(),
            }),
        };
        let since = self.newest - window(kind);
        // Only whether the value was strong enough matters: count up to the minimum, not all
        // 256 members of a popular value each time it is seen.
        let min = self.rules.link(kind);
        let before = link.live(since).take(min.unwrap_or(0) as usize).count() as u32;
        let was_live = match link.members.iter_mut().find(|(n, _)| *n == node) {
            Some(member) => {
                let was_live = member.1 > since;
                member.1 = member.1.max(t);
                was_live
            }
            None => {
                if link.members.len() == MAX_MEMBERS {
                    let oldest = (0..link.members.len())
                        .min_by_key(|i| link.members[*i].1)
                        .unwrap_or(0);
                    link.members.swap_remove(oldest);
                }
                link.members.push((node, t));
                false
            }
        };
        let after = before + u32::from(!was_live && t > since);
        let Some(min) = min else {
            return;
        };
        if after < min {
            return;
        }
        if before < min {
            // The value just became strong enough: it links everyone who shares it.
            for other in link.live(since) {
                if let Some(merged) = union(&mut self.nodes, node, other, kind) {
                    absorb(&mut self.former, &self.nodes, merged);
                }
            }
        } else if let Some(other) = link.live(since).find(|n| *n != node)
            && let Some(merged) = union(&mut self.nodes, node, other, kind)
        {
            absorb(&mut self.former, &self.nodes, merged);
        }
    }

    /// Drops expired link members, empty links and accounts idle for the whole window, and
    /// recomputes the components from what is left.
    pub fn rebuild(&mut self, now: i64) {
        self.rebuilds += 1;
        self.built_at = now;
        self.cached.clear();
        let idle = now - HISTORY_SECS;
        // The founders of every fleet (current and former ids): each id follows its founder
        // into whatever component holds it after the rebuild.
        let mut founders: Vec<u32> = std::mem::take(&mut self.former)
            .into_values()
            .flatten()
            .collect();
        for (n, node) in self.nodes.iter().enumerate() {
            if node.parent == n as u32 && node.size >= 2 {
                founders.push(node.founder);
            }
        }
        // Renumber the accounts that stay.
        let mut renumber = vec![u32::MAX; self.nodes.len()];
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for (old, node) in std::mem::take(&mut self.nodes).into_iter().enumerate() {
            if node.last_seen <= idle {
                self.accounts.remove(&node.account);
                continue;
            }
            let n = nodes.len() as u32;
            renumber[old] = n;
            self.accounts.insert(node.account.clone(), n);
            nodes.push(Node {
                parent: n,
                next: n,
                size: 1,
                kinds: 0,
                founder: n,
                templates: node
                    .templates
                    .into_iter()
                    .filter(|(_, t)| *t > idle)
                    .collect(),
                ..node
            });
        }
        self.nodes = nodes;
        let mut links = std::mem::take(&mut self.links);
        links.retain(|(kind, _), link| {
            let since = now - window(*kind);
            link.members.retain_mut(|(n, t)| {
                let keep = *t > since && renumber[*n as usize] != u32::MAX;
                if keep {
                    *n = renumber[*n as usize];
                }
                keep
            });
            !link.members.is_empty()
        });
        for ((kind, _), link) in &links {
            let Some(min) = self.rules.link(*kind) else {
                continue;
            };
            if (link.members.len() as u32) < min {
                continue;
            }
            let first = link.members[0].0;
            for &(other, _) in &link.members[1..] {
                // The rebuild's own merges are not fleets anyone saw: no former ids from them.
                union(&mut self.nodes, first, other, *kind);
            }
        }
        self.links = links;
        // A fleet keeps the ids whose founders it still holds (not a fragment that split off
        // without them), while they are held.
        for old in founders {
            let founder = renumber[old as usize];
            if founder == u32::MAX {
                continue;
            }
            let root = find(&mut self.nodes, founder);
            let node = &self.nodes[root as usize];
            if node.size >= 2 && node.founder != founder {
                self.former.entry(root).or_default().push(founder);
            }
        }
        self.former.retain(|_, former| {
            former.sort_unstable();
            former.dedup();
            !former.is_empty()
        });
    }

    /// The account's fleet at `now` (`None` when it is linked to no other account), and the
    /// accounts sharing its most widely shared prompt template.
    pub fn facts(&mut self, account: &str, now: i64) -> (Option<FleetFacts>, u32) {
        let Some(&node) = self.accounts.get(account) else {
            return (None, 0);
        };
        let templates = self.nodes[node as usize]
            .templates
            .iter()
            .filter_map(|(value, _)| {
                self.links
                    .get(&(LinkKind::PromptTemplate, value.clone()))
                    .map(|l| l.live(now - HISTORY_SECS).count() as u32)
            })
            .max()
            .unwrap_or(0);
        let root = find(&mut self.nodes, node);
        let (size, kinds) = (
            self.nodes[root as usize].size,
            self.nodes[root as usize].kinds,
        );
        if size < 2 {
            return (None, templates);
        }
        let minute = now.div_euclid(60);
        if let Some(c) = self.cached.get(&root)
            && (c.minute, c.size, c.kinds) == (minute, size, kinds)
        {
            return (Some(c.facts.clone()), templates);
        }
        let facts = self.fleet_facts(root, now);
        self.cached.insert(
            root,
            Cached {
                minute,
                size,
                kinds,
                facts: facts.clone(),
            },
        );
        (Some(facts), templates)
    }

    fn fleet_facts(&self, root: u32, now: i64) -> FleetFacts {
        let r = &self.nodes[root as usize];
        let minute = now.div_euclid(60);
        let mut per_minute = [0u64; WINDOW_MINUTES as usize];
        let (mut active, mut sum, mut squares) = (0u32, 0f64, 0f64);
        let mut n = root;
        for _ in 0..(r.size as usize).min(MAX_COORDINATION_MEMBERS) {
            let member = &self.nodes[n as usize];
            let shift = minute - member.minute;
            let bits = if (0..64).contains(&shift) {
                member.minutes << shift
            } else {
                0
            } & ((1u64 << WINDOW_MINUTES) - 1);
            if bits != 0 {
                active += 1;
                let a = f64::from(bits.count_ones());
                sum += a;
                squares += a * a;
                for (m, count) in per_minute.iter_mut().enumerate() {
                    *count += (bits >> m) & 1;
                }
            }
            n = member.next;
        }
        let coactive = per_minute.iter().map(|c| c * c.saturating_sub(1) / 2).sum();
        let mut formerly: Vec<String> = self
            .former
            .get(&root)
            .into_iter()
            .flatten()
            .filter(|&&n| n != r.founder)
            .map(|&n| fleet_id(&self.nodes[n as usize].account))
            .collect();
        formerly.sort_unstable();
        formerly.dedup();
        FleetFacts {
            id: fleet_id(&self.nodes[r.founder as usize].account),
            formerly,
            size: r.size,
            links: LinkKind::from_bits(r.kinds),
            active_members_1h: active,
            coactive_pairs_1h: coactive,
            expected_coactive_pairs_1h: (sum * sum - squares) / (2.0 * WINDOW_MINUTES as f64),
        }
    }

    /// The fleet with this id, or that had it before (its `formerly`), for reviewers: its members
    /// and the values linking them.
    pub fn report(&mut self, id: &str, now: i64) -> Option<FleetReport> {
        // Fleets decisions asked about are in the cache; others are found by their founders.
        let is_root = |n: u32| self.nodes[n as usize].parent == n;
        let cached = self
            .cached
            .iter()
            .find(|(root, c)| c.facts.id == id && is_root(**root))
            .map(|(root, _)| *root);
        let is_fleet = |n: u32| is_root(n) && self.nodes[n as usize].size >= 2;
        let root = cached
            .or_else(|| {
                (0..self.nodes.len() as u32).find(|&n| {
                    is_fleet(n)
                        && fleet_id(&self.nodes[self.nodes[n as usize].founder as usize].account)
                            == id
                })
            })
            // An id the fleet had before (a decision's, from before a merge): the fleet now.
            .or_else(|| {
                self.former
                    .iter()
                    .find(|(root, founders)| {
                        is_fleet(**root)
                            && founders
                                .iter()
                                .any(|&f| fleet_id(&self.nodes[f as usize].account) == id)
                    })
                    .map(|(root, _)| *root)
            })?;
        let facts = self.fleet_facts(root, now);
        let mut members = Vec::with_capacity(facts.size as usize);
        let mut in_fleet = vec![false; self.nodes.len()];
        let mut n = root;
        for _ in 0..facts.size {
            members.push(self.nodes[n as usize].account.clone());
            in_fleet[n as usize] = true;
            n = self.nodes[n as usize].next;
        }
        members.sort_unstable();
        let mut links: Vec<(LinkKind, String, u32)> = self
            .links
            .iter()
            .filter_map(|((kind, value), link)| {
                // Only values strong enough to link (as the unions counted them).
                let min = self.rules.link(*kind)?;
                let since = now - window(*kind);
                if (link.live(since).count() as u32) < min {
                    return None;
                }
                let shared = link.live(since).filter(|m| in_fleet[*m as usize]).count() as u32;
                (shared >= 2).then(|| (*kind, value.to_string(), shared))
            })
            .collect();
        links.sort_unstable_by(|a, b| b.2.cmp(&a.2).then_with(|| (a.0, &a.1).cmp(&(b.0, &b.1))));
        Some(FleetReport {
            facts,
            members,
            links,
        })
    }
}

fn find(nodes: &mut [Node], mut n: u32) -> u32 {
    while nodes[n as usize].parent != n {
        let grandparent = nodes[nodes[n as usize].parent as usize].parent;
        nodes[n as usize].parent = grandparent;
        n = grandparent;
    }
    n
}

/// The earlier founder: first seen, then the smaller account id (the same on every replica,
/// whatever order events came in).
fn earlier(nodes: &[Node], a: u32, b: u32) -> u32 {
    let (x, y) = (&nodes[a as usize], &nodes[b as usize]);
    if (x.first_seen, &x.account) <= (y.first_seen, &y.account) {
        a
    } else {
        b
    }
}

/// What a union of two components did: the root that stays, the one absorbed, and the
/// founder that lost, when its component was a fleet (two or more: it had an id that decisions
/// carried, and that reviewers may have overridden).
struct Merged {
    root: u32,
    absorbed: u32,
    lost: Option<u32>,
}

/// Keeps the ids a fleet had before a merge as its former ids, so that an override on either
/// fleet holds for the merged one (a denied fleet cannot shed its id by linking to an older
/// account).
fn absorb(former: &mut HashMap<u32, Vec<u32>>, nodes: &[Node], merged: Merged) {
    let mut ids = former.remove(&merged.absorbed).unwrap_or_default();
    ids.extend(merged.lost);
    if !ids.is_empty() {
        add_former(
            former,
            merged.root,
            ids,
            nodes[merged.root as usize].founder,
        );
    }
}

/// Adds `ids` to `root`'s former founders, never its current `founder` (which it drops, should
/// an earlier founder have come back).
fn add_former(
    former: &mut HashMap<u32, Vec<u32>>,
    root: u32,
    ids: impl IntoIterator<Item = u32>,
    founder: u32,
) {
    let kept = former.entry(root).or_default();
    kept.extend(ids);
    kept.retain(|&id| id != founder);
    kept.sort_unstable();
    kept.dedup();
}

fn union(nodes: &mut [Node], a: u32, b: u32, kind: LinkKind) -> Option<Merged> {
    let (ra, rb) = (find(nodes, a), find(nodes, b));
    if ra == rb {
        nodes[ra as usize].kinds |= kind.bit();
        return None;
    }
    let (big, small) = if nodes[ra as usize].size >= nodes[rb as usize].size {
        (ra, rb)
    } else {
        (rb, ra)
    };
    let (big_founder, small_founder) = (nodes[big as usize].founder, nodes[small as usize].founder);
    let founder = earlier(nodes, big_founder, small_founder);
    let (loser, loser_size) = if founder == big_founder {
        (small_founder, nodes[small as usize].size)
    } else {
        (big_founder, nodes[big as usize].size)
    };
    let (small_size, small_kinds, small_next) = {
        let s = &mut nodes[small as usize];
        s.parent = big;
        (s.size, s.kinds, s.next)
    };
    // Splice the two member lists.
    nodes[small as usize].next = nodes[big as usize].next;
    let root = &mut nodes[big as usize];
    root.next = small_next;
    root.size += small_size;
    root.kinds |= small_kinds | kind.bit();
    root.founder = founder;
    Some(Merged {
        root: big,
        absorbed: small,
        lost: (loser_size >= 2).then_some(loser),
    })
}

#[cfg(test)]
mod tests;
