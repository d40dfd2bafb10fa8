//! The usage-history port's shared suite: the same events into the in-process adapter and the
//! Redis adapter (a throwaway `redis-server`), then the same questions to both. Every adapter
//! must give the same facts, so decisions do not depend on where history is kept.

mod support;

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use regionguard::classify::FleetFacts;
use regionguard::region::{CountryCode, RegionCode};
use regionguard::usage::redis::{RedisSettings, RedisUsage};
use regionguard::usage::{EventLocation, UsageAggregator, UsageEvent, UsageHistory, UsageQuery};
use support::redis::RedisServer;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const COUNTRIES: [&str; 5] = ["DE", "FR", "US", "NL", "UA"];

fn location(host: u64) -> EventLocation {
    let country = COUNTRIES[(host % 5) as usize];
    EventLocation {
        country: CountryCode::parse(country).ok(),
        subdivisions: if country == "UA" {
            vec![RegionCode::parse("UA-43").unwrap()]
        } else {
            Vec::new()
        },
        asn: Some(64_500 + (host % 7) as u32),
        anonymized: host.is_multiple_of(4),
    }
}

fn ip(host: u64) -> IpAddr {
    if host % 6 == 5 {
        format!("2001:db8:{:x}::{:x}", host % 9, host)
            .parse()
            .unwrap()
    } else {
        format!("198.{}.{}.{}", 18 + host % 3, host % 11, host % 250)
            .parse()
            .unwrap()
    }
}

/// Accounts hopping between countries, sharing cards and networks, over three days; some
/// events arrive out of order.
fn events(now: i64) -> Vec<(UsageEvent, EventLocation)> {
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    let mut out = Vec::new();
    for _ in 0..3_000 {
        let account = rng.below(40);
        let host = if account < 10 {
            rng.below(400)
        } else {
            account * 13 + rng.below(2)
        };
        let t = now - rng.below(3 * 86_400) as i64;
        let card = match account {
            0..=7 => Some(format!("card-shared-{}", account % 2)),
            _ if rng.below(3) == 0 => Some(format!("card-{account}")),
            _ => None,
        };
        out.push((
            UsageEvent {
                account_id: format!("acct-{account}").into(),
                ip: ip(host),
                timestamp: t,
                api_key_id: Some(format!("key-{}-{}", account, rng.below(3)).into()),
                requests: 1 + rng.below(20),
                input_tokens: rng.below(5_000),
                output_tokens: rng.below(2_000),
                payment_fingerprint: card.map(Into::into),
                // Fleets: devices shared in fives, templates in threes, one company domain.
                device_id: (10..20)
                    .contains(&account)
                    .then(|| format!("dev-{}", account / 5).into()),
                prompt_fingerprint: (account < 15 && rng.below(4) == 0)
                    .then(|| format!("tpl-{}", account % 3).into()),
                organization_domain: (30..35).contains(&account).then(|| "corp.example".into()),
            },
            location(host),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_and_redis_adapters_give_the_same_facts() {
    let redis = RedisServer::start();
    let remote = history_on(&redis, "test:");
    let local = UsageAggregator::new(256 << 20);
    let now = now();
    let events = events(now);
    for (event, location) in &events {
        assert!(UsageHistory::record(&local, event, location));
        assert!(remote.record(event, location));
    }
    remote.flush().await;
    assert_eq!(remote.stats().written_events, events.len() as u64);
    assert_eq!(remote.stats().pending_events, 0);

    let (mut known, mut fleets, mut templates) = (0, 0, 0);
    for question in &questions() {
        let q = question.query(now);
        let Question(account, ip, card) = question;
        let expected = local.facts(q.account_id, q.ip, q.payment_fingerprint, now);
        fleets += usize::from(expected.as_ref().is_some_and(|f| f.fleet.is_some()));
        templates += usize::from(
            expected
                .as_ref()
                .is_some_and(|f| f.accounts_sharing_template > 1),
        );
        let got = remote.facts(q).resolve().await;
        assert_eq!(
            without_former_ids(got),
            without_former_ids(expected.clone()),
            "{account:?} on {ip} with {card:?}"
        );
        known += usize::from(expected.is_some());
    }
    assert!(
        known > 100,
        "the questions must mostly hit history ({known})"
    );
    assert!(
        fleets > 50 && templates > 20,
        "the questions must reach fleets ({fleets}) and shared templates ({templates})"
    );
    let hopper = local
        .facts(Some("acct-3"), ip(3), None, now)
        .expect("acct-3 has history");
    assert!(hopper.distinct_countries_24h >= 3 && hopper.country_switches_24h > 0);
    assert!(hopper.accounts_sharing_network > 0);
    assert!(
        local
            .facts(Some("acct-1"), ip(3), Some("card-shared-1"), now)
            .unwrap()
            .accounts_sharing_payment
            >= 4
    );
    assert!(remote.stats().backend_errors == 0);
}

/// An account (or none), the address it asks from, its card (or none).
struct Question(Option<String>, IpAddr, Option<String>);

impl Question {
    fn query(&self, now: i64) -> UsageQuery<'_> {
        UsageQuery {
            account_id: self.0.as_deref(),
            ip: self.1,
            payment_fingerprint: self.2.as_deref(),
            now,
        }
    }
}

/// Questions of every shape (with and without account and card) about the accounts of
/// `events`, and about strangers.
fn questions() -> Vec<Question> {
    let mut questions = Vec::new();
    for account in 0..40u64 {
        let id = Some(format!("acct-{account}"));
        questions.push(Question(id.clone(), ip(account * 13), None));
        questions.push(Question(
            id.clone(),
            ip(3),
            Some(format!("card-shared-{}", account % 2)),
        ));
        questions.push(Question(
            id,
            ip(401 + account),
            Some(format!("card-{account}")),
        ));
    }
    questions.push(Question(
        Some("newcomer".into()),
        ip(7),
        Some("card-shared-1".into()),
    ));
    questions.push(Question(None, ip(7), Some("card-shared-0".into())));
    questions.push(Question(
        Some("stranger".into()),
        "203.0.113.9".parse().unwrap(),
        None,
    ));
    questions
}

/// Entries past three quarters of their life are read again in the background while they
/// answer: each must get its own query's facts (questions of every shape, all refreshed at
/// once) and be in place before the entry it replaces expires, so that a hot account sees new
/// history without a decision ever waiting on Redis.
#[tokio::test(flavor = "current_thread")]
async fn hot_entries_are_read_again_in_the_background_before_they_expire() {
    let ttl = Duration::from_secs(3);
    let redis = RedisServer::start();
    let remote = RedisUsage::start(&RedisSettings {
        cache_ttl: ttl,
        ..settings(&redis, "batch:")
    })
    .unwrap();
    let local = UsageAggregator::new(256 << 20);
    let now = now();
    for (event, location) in &events(now) {
        assert!(UsageHistory::record(&local, event, location));
        assert!(remote.record(event, location));
    }
    remote.flush().await;
    let questions = questions();
    let facts_of = |local: &UsageAggregator, q: &UsageQuery<'_>| {
        without_former_ids(local.facts(q.account_id, q.ip, q.payment_fingerprint, now))
    };

    // First pass: every entry read and cached.
    let cached_from = std::time::Instant::now();
    for question in &questions {
        let q = question.query(now);
        assert_eq!(
            without_former_ids(remote.facts(q).resolve().await),
            facts_of(&local, &q)
        );
    }
    let cached_until = std::time::Instant::now();
    assert!(
        cached_until - cached_from < ttl / 4,
        "the first pass took {:?}: too long to tell a refresh from an expiry",
        cached_until - cached_from
    );
    // New history for every account, which only a read from Redis can show.
    for account in 0..40u64 {
        let event = UsageEvent {
            ip: ip(account * 13),
            requests: 1_000 + account,
            ..linked(&format!("acct-{account}"), now, None, None)
        };
        let location = location(account * 13);
        assert!(UsageHistory::record(&local, &event, &location));
        assert!(remote.record(&event, &location));
    }
    remote.flush().await;

    // Second pass, every entry past three quarters of its life: answered from the cache as it
    // was, each asking for a refresh.
    tokio::time::sleep_until((cached_until + ttl / 4 * 3).into()).await;
    let mut changed = 0;
    for question in &questions {
        let q = question.query(now);
        let got = without_former_ids(remote.facts(q).resolve().await);
        let new = facts_of(&local, &q);
        if got != new {
            changed += 1;
        }
    }
    assert!(
        changed > 40,
        "the new history must change most answers ({changed})"
    );

    // Before any first-pass entry can expire, every answer is the new history: refreshed.
    loop {
        let stale: Vec<String> = questions
            .iter()
            .filter_map(|question| {
                let q = question.query(now);
                let got = match remote.facts(q) {
                    regionguard::usage::UsageLookup::Ready(facts) => facts,
                    regionguard::usage::UsageLookup::Pending(_) => {
                        panic!("{q:?}: not answered from the cache: its entry expired before a background read replaced it")
                    }
                };
                (without_former_ids(got) != facts_of(&local, &q)).then(|| format!("{q:?}"))
            })
            .collect();
        if stale.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < cached_from + ttl,
            "not refreshed before the entries expired: {stale:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(remote.stats().backend_errors, 0);
    assert_eq!(remote.stats().degraded_reads, 0);
}

/// The facts without the fleet's former ids: those name the fleets that existed on the way to
/// this one, so they depend on the order in which links arrived, which batching changes (the
/// ids themselves are compared in `both_adapters_keep_the_ids_a_fleet_had`).
fn without_former_ids(
    facts: Option<regionguard::classify::UsageFacts>,
) -> Option<regionguard::classify::UsageFacts> {
    facts.map(|mut f| {
        if let Some(fleet) = &mut f.fleet {
            fleet.formerly.clear();
        }
        f
    })
}

/// A Redis usage history on `redis` under `prefix`, answering every read from Redis.
fn history_on(redis: &RedisServer, prefix: &str) -> RedisUsage {
    RedisUsage::start(&settings(redis, prefix)).unwrap()
}

/// Settings for `redis` under `prefix`, answering every read from Redis.
fn settings(redis: &RedisServer, prefix: &str) -> RedisSettings {
    RedisSettings {
        url: redis.url(),
        prefix: prefix.into(),
        timeout: Duration::from_secs(2),
        cache_ttl: Duration::ZERO,
        max_pending_events: 100_000,
        fleet_max_accounts: 1_000_000,
    }
}

/// What the history holds of an account that has some, asked from `ip`.
async fn account_facts(
    history: &RedisUsage,
    account: &str,
    ip: IpAddr,
    now: i64,
) -> regionguard::classify::UsageFacts {
    history
        .facts(UsageQuery {
            account_id: Some(account),
            ip,
            payment_fingerprint: None,
            now,
        })
        .resolve()
        .await
        .unwrap_or_else(|| panic!("{account} has history"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_one_account_lose_no_event() {
    let redis = RedisServer::start();
    let settings = RedisSettings {
        url: redis.url(),
        prefix: "race:".into(),
        timeout: Duration::from_secs(2),
        cache_ttl: Duration::ZERO,
        max_pending_events: 100_000,
        fleet_max_accounts: 1_000_000,
    };
    let (a, b) = (
        RedisUsage::start(&settings).unwrap(),
        RedisUsage::start(&settings).unwrap(),
    );
    let now = now();
    for i in 0..2_000i64 {
        let event = UsageEvent {
            account_id: "shared".into(),
            ip: ip(i as u64 % 50),
            timestamp: now - i,
            api_key_id: None,
            requests: 1,
            input_tokens: 0,
            output_tokens: 0,
            payment_fingerprint: None,
            device_id: None,
            prompt_fingerprint: None,
            organization_domain: None,
        };
        let writer = if i % 2 == 0 { &a } else { &b };
        assert!(writer.record(&event, &location(i as u64 % 50)));
        if i % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    tokio::join!(a.flush(), b.flush());
    let facts = account_facts(&a, "shared", ip(1), now).await;
    assert_eq!(
        facts.requests_24h, 2_000,
        "compare-and-set keeps both writers' events"
    );
}

/// A TCP proxy to Redis that can lose replies: armed, it forwards a request holding a
/// compare-and-set (EVALSHA) to Redis, then closes the connection instead of passing the reply
/// on, so the writer cannot tell whether Redis applied it.
struct ReplyLosingProxy {
    port: u16,
    /// Replies still to lose.
    armed: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl ReplyLosingProxy {
    async fn start(upstream: u16) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = std::sync::Arc::new(AtomicU32::new(0));
        let shared = armed.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let armed = shared.clone();
                let lose = std::sync::Arc::new(AtomicBool::new(false));
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                let up = {
                    let (armed, lose) = (armed.clone(), lose.clone());
                    async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_rx.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            // Holds a compare-and-set: more script calls than fleet script
                            // calls (keyed `{f}gen`). A pipeline may send both in one read; a
                            // read holding only fleet calls does not count (the test once
                            // waited for a compare-and-set that came with a fleet call).
                            let count = |pattern: &[u8]| {
                                buf[..n]
                                    .windows(pattern.len())
                                    .filter(|w| *w == pattern)
                                    .count()
                            };
                            let cas = count(b"EVALSHA") > count(b"{f}gen");
                            if cas
                                && !lose.load(Ordering::SeqCst)
                                && armed
                                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| {
                                        a.checked_sub(1)
                                    })
                                    .is_ok()
                            {
                                lose.store(true, Ordering::SeqCst);
                            }
                            if server_tx.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if lose.load(Ordering::SeqCst) {
                            return; // the reply is lost with the connection
                        }
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::spawn(async move {
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Self { port, armed }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_cut_mid_reply_apply_each_event_once() {
    let redis = RedisServer::start();
    let proxy = ReplyLosingProxy::start(redis.port).await;
    let history = RedisUsage::start(&RedisSettings {
        url: format!("redis://127.0.0.1:{}/", proxy.port),
        prefix: "cut:".into(),
        timeout: Duration::from_secs(2),
        cache_ttl: Duration::ZERO,
        max_pending_events: 1_000_000,
        fleet_max_accounts: 1_000_000,
    })
    .unwrap();
    let now = now();
    const ACCOUNTS: u64 = 3_000;
    const EACH: u64 = 20;
    // Replies to compare-and-sets lost after Redis applied them.
    const LOST: u32 = 3;
    proxy.armed.store(LOST, std::sync::atomic::Ordering::SeqCst);
    for round in 0..EACH {
        for account in 0..ACCOUNTS {
            let event = UsageEvent {
                account_id: format!("acct-{account}").into(),
                ip: ip(account),
                timestamp: now - (round * 60) as i64,
                api_key_id: None,
                requests: 1,
                input_tokens: 0,
                output_tokens: 0,
                payment_fingerprint: None,
                device_id: None,
                prompt_fingerprint: None,
                organization_domain: None,
            };
            assert!(history.record(&event, &location(account)));
        }
        // A batch or more per round, so that there are compare-and-sets enough to lose.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if tokio::time::timeout(Duration::from_secs(60), history.flush())
        .await
        .is_err()
    {
        panic!("writes did not finish: {:?}", history.stats());
    }
    assert_eq!(
        proxy.armed.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "every armed reply was lost"
    );
    let stats = history.stats();
    assert_eq!(stats.written_events, ACCOUNTS * EACH);
    assert!(stats.backend_errors > 0, "the writer saw its writes fail");
    for account in 0..ACCOUNTS {
        let id = format!("acct-{account}");
        let facts = account_facts(&history, &id, ip(account), now).await;
        assert_eq!(
            facts.requests_24h, EACH,
            "{id}: every event once, none twice"
        );
    }
    support::record(format_args!(
        "redis write replies lost {LOST} times: {} backend errors, {} events each counted once",
        stats.backend_errors,
        ACCOUNTS * EACH
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_then_another_writer_still_counts_each_event_once() {
    let redis = RedisServer::start();
    let proxy = ReplyLosingProxy::start(redis.port).await;
    let settings = |port: u16| RedisSettings {
        url: format!("redis://127.0.0.1:{port}/"),
        prefix: "two:".into(),
        timeout: Duration::from_secs(2),
        cache_ttl: Duration::ZERO,
        max_pending_events: 100_000,
        fleet_max_accounts: 1_000_000,
    };
    // A writes through the proxy, which loses the reply to its first compare-and-set; B writes
    // the same accounts directly while A waits to retry.
    let a = RedisUsage::start(&settings(proxy.port)).unwrap();
    let b = RedisUsage::start(&settings(redis.port)).unwrap();
    let now = now();
    let event = |account: u64, t: i64| UsageEvent {
        account_id: format!("acct-{account}").into(),
        ip: ip(account),
        timestamp: t,
        api_key_id: None,
        requests: 1,
        input_tokens: 0,
        output_tokens: 0,
        payment_fingerprint: None,
        device_id: None,
        prompt_fingerprint: None,
        organization_domain: None,
    };
    proxy.armed.store(1, std::sync::atomic::Ordering::SeqCst);
    for account in 0..100 {
        assert!(a.record(&event(account, now - 10), &location(account)));
    }
    // A's batch is sent and its reply lost; its retry waits out a back-off of 50 ms or more.
    tokio::time::sleep(Duration::from_millis(25)).await;
    for account in 0..100 {
        assert!(b.record(&event(account, now - 5), &location(account)));
    }
    b.flush().await;
    tokio::time::timeout(Duration::from_secs(30), a.flush())
        .await
        .expect("A's writes finish");
    assert_eq!(
        proxy.armed.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the reply was lost"
    );
    assert!(a.stats().backend_errors > 0);
    for account in 0..100 {
        let facts = account_facts(&b, &format!("acct-{account}"), ip(account), now).await;
        assert_eq!(
            facts.requests_24h, 2,
            "acct-{account}: one event from each writer, once"
        );
    }
}

fn linked(account: &str, t: i64, card: Option<&str>, device: Option<&str>) -> UsageEvent {
    UsageEvent {
        account_id: account.into(),
        ip: ip(1),
        timestamp: t,
        api_key_id: None,
        requests: 1,
        input_tokens: 0,
        output_tokens: 0,
        payment_fingerprint: card.map(Into::into),
        device_id: device.map(Into::into),
        prompt_fingerprint: None,
        organization_domain: None,
    }
}

/// Union-find cannot split a fleet, so the shared graph is rebuilt into a new generation once an
/// hour of event time: links older than the window drop out, the fleet they made falls apart,
/// and the old generation's keys are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_links_leave_the_shared_fleet_graph() {
    let redis = RedisServer::start();
    let history = history_on(&redis, "expiry:");
    let now = now();
    let old = now - 9 * 86_400;
    for (account, t) in [("a", old), ("b", old + 60)] {
        assert!(history.record(&linked(account, t, Some("card-old"), None), &location(1)));
    }
    history.flush().await;
    let then = account_facts(&history, "a", ip(1), old + 120).await;
    let fleet = then.fleet.expect("a and b share a card");
    assert_eq!((fleet.size, fleet.links.len()), (2, 1), "{fleet:?}");

    // What a rebuild that died half-way (a killed replica) leaves behind: swept by the next.
    {
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let () = redis::pipe()
            .cmd("SADD")
            .arg("expiry:{f}gens")
            .arg("99")
            .ignore()
            .cmd("HSET")
            .arg("expiry:{f}99:A")
            .arg("x")
            .arg("1,1,0,0,1")
            .ignore()
            .cmd("HSET")
            .arg("expiry:{f}99:r")
            .arg("x")
            .arg("2,1,1,x")
            .ignore()
            .cmd("SADD")
            .arg("expiry:{f}99:m:x")
            .arg("x")
            .ignore()
            .query(&mut conn)
            .unwrap();
    }
    for account in ["a", "c"] {
        assert!(history.record(
            &linked(account, now, None, Some("device-new")),
            &location(1)
        ));
    }
    // b is still active (so it is in the new generation), with a device of its own: only the
    // expired card could link it.
    assert!(history.record(&linked("b", now, None, Some("device-b")), &location(1)));
    history.flush().await;
    let b = account_facts(&history, "b", ip(1), now).await;
    assert_eq!(b.fleet, None, "b is linked by nothing live");
    let a = account_facts(&history, "a", ip(1), now).await;
    let fleet = a.fleet.expect("a and c share a device");
    assert_eq!(
        fleet.size, 2,
        "the expired card no longer links b: {fleet:?}"
    );
    assert_eq!(
        fleet.links,
        [regionguard::classify::LinkKind::Device],
        "{fleet:?}"
    );
    let report = history
        .fleet(&fleet.id, now)
        .await
        .expect("Redis answers")
        .expect("the fleet is known by its id");
    let members: Vec<&str> = report.members.iter().map(|m| &*m.account_id).collect();
    assert_eq!(members, ["a", "c"]);
    assert_eq!(report.links.len(), 1, "{:?}", report.links);

    let keys = |pattern: &str| -> Vec<String> {
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("KEYS").arg(pattern).query(&mut conn).unwrap()
    };
    assert_eq!(
        keys("expiry:{f}1:*"),
        Vec::<String>::new(),
        "the old generation is deleted"
    );
    assert_eq!(
        keys("expiry:{f}99:*"),
        Vec::<String>::new(),
        "a dead rebuild's generation is swept"
    );
    assert!(
        !keys("expiry:{f}2:*").is_empty(),
        "the new generation holds the fleet"
    );
    assert_eq!(
        keys("expiry:{f}l:0:*"),
        Vec::<String>::new(),
        "the expired card is gone"
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let index: Vec<String> = redis::cmd("SMEMBERS")
        .arg("expiry:{f}index")
        .query(&mut conn)
        .unwrap();
    assert!(
        !index.iter().any(|k| k.contains("card-old")),
        "the index forgets the expired card: {index:?}"
    );
    let gens: Vec<String> = redis::cmd("SMEMBERS")
        .arg("expiry:{f}gens")
        .query(&mut conn)
        .unwrap();
    assert_eq!(gens, ["2"], "only the live generation is held");
}

/// The fleet graph is shared: events for a chained fleet split between two replicas make one
/// fleet, with one id, on both, and the same fleet as the in-process graph given every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_fleet_graph_and_name_each_fleet_alike() {
    let redis = RedisServer::start();
    let settings = RedisSettings {
        url: redis.url(),
        prefix: "fleet:".into(),
        timeout: Duration::from_secs(2),
        cache_ttl: Duration::ZERO,
        max_pending_events: 100_000,
        fleet_max_accounts: 1_000_000,
    };
    let replicas = [
        RedisUsage::start(&settings).unwrap(),
        RedisUsage::start(&settings).unwrap(),
    ];
    let local = UsageAggregator::new(256 << 20);
    let now = now();
    // Accounts 0..10 share a card, 9..19 a key, 18..30 a device; events arrive newest first.
    for i in 0..30u64 {
        let mut event = linked(
            &format!("chain-{i}"),
            now - 60 * i as i64,
            (i < 10).then_some("card-chain"),
            (i >= 18).then_some("device-chain"),
        );
        event.ip = format!("198.51.{i}.7").parse().unwrap();
        event.api_key_id = Some(if (9..19).contains(&i) {
            "key-chain".into()
        } else {
            format!("key-{i}").into()
        });
        assert!(UsageHistory::record(&local, &event, &location(i)));
        assert!(replicas[(i % 2) as usize].record(&event, &location(i)));
    }
    for i in 0..50u64 {
        let mut event = linked(
            &format!("own-{i}"),
            now - i as i64,
            Some(&format!("card-own-{i}")),
            None,
        );
        event.ip = format!("203.0.{i}.9").parse().unwrap();
        assert!(UsageHistory::record(&local, &event, &location(i)));
        assert!(replicas[(i % 2) as usize].record(&event, &location(i)));
    }
    tokio::join!(replicas[0].flush(), replicas[1].flush());
    let expected = local
        .facts(Some("chain-0"), ip(1), None, now)
        .and_then(|f| f.fleet)
        .map(|f| FleetFacts {
            formerly: Vec::new(),
            ..f
        })
        .expect("the in-process graph sees the fleet");
    assert_eq!(expected.size, 30);
    let shared_graph = account_facts(&replicas[0], "chain-0", ip(1), now)
        .await
        .fleet;
    for i in 0..30u64 {
        for replica in &replicas {
            let got = account_facts(replica, &format!("chain-{i}"), ip(1), now).await;
            assert_eq!(
                got.fleet, shared_graph,
                "chain-{i}: one graph, alike on both replicas"
            );
            let got = got.fleet.map(|f| FleetFacts {
                formerly: Vec::new(),
                ..f
            });
            assert_eq!(got.as_ref(), Some(&expected), "chain-{i}");
        }
    }
    for i in 0..50u64 {
        let got = account_facts(&replicas[1], &format!("own-{i}"), ip(1), now).await;
        assert_eq!(got.fleet, None, "own-{i} is in no fleet");
    }
    let mut shared = replicas[0].fleet(&expected.id, now).await.unwrap().unwrap();
    let mut alone = local.fleet(&expected.id, now).await.unwrap().unwrap();
    shared.facts.formerly.clear();
    alone.facts.formerly.clear();
    assert_eq!(shared, alone, "GetFleet answers alike on both adapters");
    assert_eq!(shared.members.len(), 30);
    assert_eq!(shared.links.len(), 3, "{:?}", shared.links);
    assert_eq!(
        replicas[1].fleet("fl_0000000000000000", now).await,
        Ok(None)
    );
}

/// A fleet script Redis no longer holds (a restart or failover, here SCRIPT FLUSH) costs a
/// decision its fleet facts only, marked degraded; the rest of the history stands, and the next
/// read has the fleet again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_fleet_script_costs_only_the_fleet_facts() {
    let redis = RedisServer::start();
    let history = history_on(&redis, "noscript:");
    let now = now();
    for account in ["a", "b"] {
        assert!(history.record(
            &linked(account, now - 60, Some("card-1"), None),
            &location(1)
        ));
    }
    history.flush().await;
    let before = account_facts(&history, "a", ip(1), now).await;
    assert!(before.fleet.is_some() && !before.degraded, "{before:?}");

    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
    let during = account_facts(&history, "a", ip(1), now).await;
    assert!(during.degraded, "{during:?}");
    assert_eq!(during.fleet, None);
    assert_eq!(
        (during.requests_24h, during.accounts_sharing_network),
        (before.requests_24h, before.accounts_sharing_network),
        "the rest of the history is read as before"
    );
    let after = account_facts(&history, "a", ip(1), now).await;
    assert_eq!(after.fleet, before.fleet, "the script is loaded again");
    assert!(!after.degraded);
}

/// A Redis that lost the fleet graph (a restart without persistence, a failover to an empty
/// replica; here FLUSHALL) gets it again from the events that follow: the writer sees a new
/// start of the graph and sends every link again, though it sent them within the hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_the_fleet_graph_is_sent_the_links_again() {
    let redis = RedisServer::start();
    let history = history_on(&redis, "lost:");
    let now = now();
    let round = |t: i64| {
        for account in ["a", "b"] {
            assert!(history.record(&linked(account, t, Some("card-1"), None), &location(1)));
        }
        history.flush()
    };
    round(now - 180).await;
    let before = account_facts(&history, "a", ip(1), now).await;
    assert_eq!(before.fleet.as_ref().map(|f| f.size), Some(2), "{before:?}");

    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
    // The first write after the loss tells the writer; what it had sent lately went with
    // Redis's keys, so the next events carry their links again.
    round(now - 120).await;
    round(now - 60).await;
    let after = account_facts(&history, "a", ip(1), now).await;
    assert_eq!(after.fleet.as_ref().map(|f| f.size), Some(2), "{after:?}");
    assert_eq!(
        after.fleet.as_ref().map(|f| &f.id),
        before.fleet.as_ref().map(|f| &f.id),
        "the fleet keeps its id (its founder)"
    );
}

/// One plain event of `account` at `t`, with a card if given.
fn plain(account: &str, t: i64, card: Option<&str>) -> UsageEvent {
    UsageEvent {
        payment_fingerprint: card.map(Into::into),
        ..linked(account, t, None, None)
    }
}

/// Keys Redis refuses for good (another application's values under our prefix: WRONGTYPE) cost
/// only what was meant for them: the account's events are counted lost, the sharing set's and
/// the fleet graph's updates dropped. The writer does not retry them for ever, so the accounts
/// beside them, and the events that follow, are written. (Before, the whole batch was retried
/// with back-off for ever, and every later event was lost to the full queue.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_redis_refuses_cost_only_what_was_meant_for_them() {
    let redis = RedisServer::start();
    for clash in [
        "RPUSH clash:{a:taken} another-app",
        "HSET clash:{p:card-taken} another app",
        "RPUSH clash:{f}gen another-app",
    ] {
        assert!(
            redis.command(clash).is_some_and(|r| r.starts_with(':')),
            "{clash}"
        );
    }
    let history = history_on(&redis, "clash:");
    let now = now();
    for round in 0..2 {
        let t = now - 120 + round * 60;
        assert!(history.record(&plain("taken", t, None), &location(1)));
        for i in 0..20 {
            let card = (i % 2 == 0).then_some("card-taken");
            assert!(history.record(&plain(&format!("ok-{i}"), t, card), &location(1)));
        }
        tokio::time::timeout(Duration::from_secs(30), history.flush())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "round {round}: writes never finished: {:?}",
                    history.stats()
                )
            });
    }
    let stats = history.stats();
    assert_eq!(
        stats.lost_events, 2,
        "taken's two events, counted: {stats:?}"
    );
    assert_eq!(stats.written_events, 40, "{stats:?}");
    assert!(stats.backend_errors > 0, "{stats:?}");
    for i in 0..20 {
        let facts = account_facts(&history, &format!("ok-{i}"), ip(1), now).await;
        assert_eq!(facts.requests_24h, 2, "ok-{i}: {facts:?}");
        // The fleet graph's key is another application's: no fleet facts, and the decision
        // says it went without them.
        assert!(facts.degraded && facts.fleet.is_none(), "ok-{i}: {facts:?}");
    }
    assert_eq!(
        redis.command("LRANGE clash:{a:taken} 0 -1").as_deref(),
        Some("*1\r\n$11\r\nanother-app\r\n"),
        "another application's value is left as it was"
    );
}

/// A TCP proxy whose connections can be cut silently: after [`SilentProxy::cut`], the
/// connections open until then swallow what they carry both ways and stay open (a firewall or
/// NAT that forgot the flow, a host that froze); connections opened later are carried.
struct SilentProxy {
    port: u16,
    cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SilentProxy {
    async fn start(upstream: u16) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let shared = cuts.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (cuts, born) = (shared.clone(), shared.load(Ordering::SeqCst));
                let pipe = |mut from: tokio::net::tcp::OwnedReadHalf,
                            mut to: tokio::net::tcp::OwnedWriteHalf| {
                    let cuts = cuts.clone();
                    async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if cuts.load(Ordering::SeqCst) > born {
                                continue; // swallowed; the connection stays open
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                };
                let (client_rx, client_tx) = client.into_split();
                let (server_rx, server_tx) = server.into_split();
                tokio::spawn(pipe(client_rx, server_tx));
                tokio::spawn(pipe(server_rx, client_tx));
            }
        });
        Self { port, cuts }
    }

    fn cut(&self) {
        self.cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A connection to Redis that goes silent (no reset, no reply) is replaced by one that
/// answers: decisions stop being degraded and writes go on, without restarting anything.
/// (Before, the connection manager kept the dead connection until the kernel gave up on it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_goes_silent_is_replaced() {
    let redis = RedisServer::start();
    let proxy = SilentProxy::start(redis.port).await;
    let history = RedisUsage::start(&RedisSettings {
        url: format!("redis://127.0.0.1:{}/", proxy.port),
        prefix: "silent:".into(),
        timeout: Duration::from_millis(100),
        cache_ttl: Duration::ZERO,
        max_pending_events: 100_000,
        fleet_max_accounts: 1_000_000,
    })
    .unwrap();
    let now = now();
    assert!(history.record(&plain("a", now - 60, None), &location(1)));
    history.flush().await;
    let before = account_facts(&history, "a", ip(1), now).await;
    assert!(!before.degraded && before.requests_24h == 1, "{before:?}");

    proxy.cut();
    assert!(history.record(&plain("a", now - 30, None), &location(1)));
    let cut = std::time::Instant::now();
    let mut degraded = 0;
    let after = loop {
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "still silent after 20 s: {degraded} degraded reads, {:?}",
            history.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let facts = history
            .facts(UsageQuery {
                account_id: Some("a"),
                ip: ip(1),
                payment_fingerprint: None,
                now,
            })
            .resolve()
            .await;
        match facts {
            Some(facts) if !facts.degraded => {
                if facts.requests_24h == 2 {
                    break facts;
                }
            }
            _ => degraded += 1,
        }
    };
    assert!(degraded > 0, "the cut was seen: {after:?}");
    let stats = history.stats();
    assert!(
        stats.reconnects >= 2,
        "both connections replaced: {stats:?}"
    );
    assert_eq!(stats.lost_events, 0, "{stats:?}");
    support::record(format_args!(
        "a silent Redis connection: answered again after {:.1} s ({degraded} degraded reads, {} connections replaced)",
        cut.elapsed().as_secs_f64(),
        stats.reconnects
    ));
}

/// A fleet keeps the ids it had, on both adapters alike when links arrive in the same order: a
/// young fleet that merges into an older one, then an earlier member that turns up, then the
/// hourly rebuild. An override on any of those ids holds for the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_adapters_keep_the_ids_a_fleet_had() {
    let redis = RedisServer::start();
    let remote = history_on(&redis, "former:");
    let local = UsageAggregator::new(256 << 20);
    let now = now();
    let t0 = now - 3 * 3600;
    let step = |events: Vec<UsageEvent>| {
        for event in &events {
            assert!(UsageHistory::record(&local, event, &location(1)));
            assert!(remote.record(event, &location(1)));
        }
        remote.flush()
    };
    let fleet_of = |account: &'static str| {
        let (local, remote) = (&local, &remote);
        async move {
            let expected = local
                .facts(Some(account), ip(1), None, now)
                .and_then(|f| f.fleet)
                .expect("in a fleet");
            let got = account_facts(remote, account, ip(1), now).await.fleet;
            assert_eq!(got.as_ref(), Some(&expected), "{account}");
            expected
        }
    };
    step(vec![
        linked("old-1", t0, Some("card-old"), None),
        linked("old-2", t0 + 1, Some("card-old"), None),
        linked("young-1", t0 + 100, None, Some("device-y")),
        linked("young-2", t0 + 101, None, Some("device-y")),
    ])
    .await;
    let (old, young) = (fleet_of("old-1").await, fleet_of("young-1").await);
    assert!(old.formerly.is_empty() && young.formerly.is_empty());

    step(vec![linked("young-2", t0 + 300, Some("card-old"), None)]).await;
    let merged = fleet_of("young-1").await;
    assert_eq!((&merged.id, merged.size), (&old.id, 4));
    assert_eq!(merged.formerly, std::slice::from_ref(&young.id));

    step(vec![linked("early", t0 - 50, Some("card-old"), None)]).await;
    let earlier = fleet_of("old-2").await;
    let mut expected = vec![old.id.clone(), young.id.clone()];
    expected.sort();
    assert_eq!(earlier.formerly, expected);

    // Two hours on: both rebuild the graph, and the ids stay.
    step(vec![linked("early", t0 + 2 * 3600, Some("card-old"), None)]).await;
    let rebuilt = fleet_of("young-2").await;
    assert_eq!((rebuilt.size, &rebuilt.formerly), (5, &expected));

    // A reviewer asking for a former id (from an older decision) gets the fleet now.
    for former in [&young.id, &old.id] {
        for (adapter, history) in [
            ("in-process", &local as &dyn UsageHistory),
            ("Redis", &remote as &dyn UsageHistory),
        ] {
            let fleet = history
                .fleet(former, now)
                .await
                .unwrap_or_else(|e| panic!("{adapter}: {e}"))
                .unwrap_or_else(|| panic!("{adapter}: {former} not found"));
            assert_eq!(
                (&fleet.facts.id, fleet.facts.size),
                (&rebuilt.id, 5),
                "{adapter}"
            );
            assert!(fleet.facts.formerly.contains(former), "{adapter}");
        }
    }
    for (adapter, history) in [
        ("in-process", &local as &dyn UsageHistory),
        ("Redis", &remote as &dyn UsageHistory),
    ] {
        let unknown = history.fleet("fl_0000000000000000", now).await;
        assert!(matches!(unknown, Ok(None)), "{adapter}");
    }
    assert_eq!(
        redis.command("GET former:{f}gen").as_deref(),
        Some("$1\r\n2\r\n"),
        "Redis rebuilt the graph into its second generation"
    );
    // Every key expires, the graph's bookkeeping included, after the rebuild as before it.
    let keys = redis.command("KEYS former:*").unwrap();
    let keys: Vec<&str> = keys
        .lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
        .collect();
    assert!(keys.len() > 10, "{keys:?}");
    let lasting: Vec<&str> = keys
        .into_iter()
        .filter(|key| redis.command(&format!("PTTL \"{key}\"")).as_deref() == Some(":-1\r\n"))
        .collect();
    assert!(lasting.is_empty(), "keys without a TTL: {lasting:?}");
}
