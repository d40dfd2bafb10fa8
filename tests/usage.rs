//! Usage signals end to end: a simulated fleet and ordinary accounts streamed through
//! `Usage/Report`, then `Classify` for every account over real gRPC.
//!
//! The fleet: 200 accounts rotating through one proxy /24 (a VPN exit in DE) with excursions
//! through a Tor exit (NL) and a GB network, minutes apart, paying with 3 shared cards. Beside
//! them: 200 ordinary accounts, each on its own home /24 in the US with its own card, 20 of which
//! sometimes use a corporate VPN.

mod support;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use regionguard::grpc::pb::{self, Verdict, usage_client::UsageClient};
use support::{TestServer, codes, request, scenarios, verdict};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn event(account: &str, ip: String, ms: i64, card: &str, requests: u64) -> pb::UsageEvent {
    pb::UsageEvent {
        account_id: account.into(),
        ip,
        timestamp_unix_ms: ms,
        api_key_id: format!("key-{account}"),
        request_count: requests,
        input_tokens: requests * 800,
        output_tokens: requests * 300,
        model: "model-large".into(),
        payment_fingerprint: card.into(),
        user_agent: "sdk/1.0".into(),
        ..Default::default()
    }
}

struct World {
    events: Vec<pb::UsageEvent>,
    bad: usize,
}

fn simulate(now: i64) -> World {
    const MIN: i64 = 60_000;
    let mut events = Vec::new();
    for i in 0..200u32 {
        let account = format!("fleet-{i:03}");
        let card = format!("card-shared-{}", i % 3);
        for step in 0..30i64 {
            let ms = now - 20 * 60 * MIN + step * 40 * MIN / 3 + i64::from(i) * 1000;
            let ip = match step % 5 {
                3 => format!("65.1.0.{}", (i + step as u32) % 250 + 1),
                4 => format!("81.2.69.{}", 160 + (i + step as u32) % 30),
                _ => format!("1.2.3.{}", (i * 7 + step as u32) % 250 + 1),
            };
            events.push(event(&account, ip, ms, &card, 40));
        }
    }
    for i in 0..200u32 {
        let account = format!("user-{i:03}");
        let card = format!("card-{account}");
        let home = format!("24.{}.{}.{}", i / 100 + 1, i % 100, 10 + i % 200);
        for step in 0..24i64 {
            let ms = now - 6 * 24 * 60 * MIN + step * 6 * 60 * MIN + i64::from(i) * 1000;
            let corporate_vpn = i < 20 && step % 6 == 0;
            let ip = if corporate_vpn {
                format!("1.2.{}.9", 100 + i)
            } else {
                home.clone()
            };
            events.push(event(&account, ip, ms, &card, 3));
        }
    }
    // Bad events mixed in: they are named in the summary, their neighbours still count.
    let mut bad = vec![
        event("fleet-000", "999.1.1.1".into(), now, "card-shared-0", 1),
        event("", "1.2.3.4".into(), now, "", 1),
        event("user-000", "24.1.0.10".into(), now + 3_600_000, "", 1),
        event(
            "user-001",
            "24.1.1.11".into(),
            now - 8 * 24 * 3_600_000,
            "",
            1,
        ),
    ];
    let count = bad.len();
    for (k, e) in bad.drain(..).enumerate() {
        events.insert(1000 * (k + 1), e);
    }
    World { events, bad: count }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_fleet_is_flagged_and_ordinary_accounts_are_not() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let now = now_ms();
    let world = simulate(now);
    let total = world.events.len();

    let started = std::time::Instant::now();
    let summary = UsageClient::new(server.channel.clone())
        .report(tokio_stream::iter(world.events))
        .await
        .unwrap()
        .into_inner();
    let elapsed = started.elapsed();
    support::record(format_args!(
        "ingested {} events in {:.2}s over one Report stream ({:.0} events/s, debug build)",
        summary.accepted,
        elapsed.as_secs_f64(),
        summary.accepted as f64 / elapsed.as_secs_f64()
    ));
    assert_eq!(summary.rejected as usize, world.bad);
    assert_eq!(
        summary.accepted as usize,
        total - world.bad,
        "no good event lost"
    );
    let fields: Vec<&str> = summary
        .rejections
        .iter()
        .map(|r| r.field.as_str())
        .collect();
    assert_eq!(
        fields,
        ["ip", "account_id", "timestamp_unix_ms", "timestamp_unix_ms"]
    );
    assert_eq!(summary.rejections[0].index, 1000);

    let mut outcomes: BTreeMap<(bool, Verdict), usize> = BTreeMap::new();
    let mut fleet_reasons: BTreeMap<String, usize> = BTreeMap::new();
    for fleet in [true, false] {
        for i in 0..200u32 {
            let (account, ip, card) = if fleet {
                (
                    format!("fleet-{i:03}"),
                    format!("1.2.3.{}", i % 250 + 1),
                    format!("card-shared-{}", i % 3),
                )
            } else {
                (
                    format!("user-{i:03}"),
                    format!("24.{}.{}.{}", i / 100 + 1, i % 100, 10 + i % 200),
                    format!("card-user-{i:03}"),
                )
            };
            let response = server
                .classify(pb::ClassifyRequest {
                    account: Some(pb::Account {
                        account_id: account.clone(),
                        payment_fingerprint: card,
                        ..Default::default()
                    }),
                    ..request(&ip)
                })
                .await
                .unwrap();
            let v = verdict(&response);
            *outcomes.entry((fleet, v)).or_default() += 1;
            if fleet {
                for code in codes(&response) {
                    *fleet_reasons.entry(code.to_owned()).or_default() += 1;
                }
                assert!(
                    response
                        .usage
                        .as_ref()
                        .is_some_and(|u| u.accounts_sharing_payment >= 60),
                    "{account}: {:?}",
                    response.usage
                );
            } else if v != Verdict::Allow {
                panic!(
                    "ordinary {account} got {v:?}: {:?} {:?}",
                    codes(&response),
                    response.usage
                );
            }
        }
    }
    let true_positives = outcomes
        .iter()
        .filter(|((fleet, v), _)| *fleet && *v != Verdict::Allow)
        .map(|(_, n)| n)
        .sum::<usize>();
    let false_positives = outcomes
        .iter()
        .filter(|((fleet, v), _)| !*fleet && *v != Verdict::Allow)
        .map(|(_, n)| n)
        .sum::<usize>();
    let precision = true_positives as f64 / (true_positives + false_positives).max(1) as f64;
    let recall = true_positives as f64 / 200.0;
    support::record(format_args!("fleet simulation: outcomes {outcomes:?}"));
    support::record(format_args!(
        "fleet simulation: reasons on fleet accounts {fleet_reasons:?}"
    ));
    support::record(format_args!(
        "fleet simulation: precision {precision:.3}, recall {recall:.3} (200 fleet, 200 ordinary accounts)"
    ));
    assert_eq!(
        true_positives, 200,
        "every fleet account is in REVIEW or DENY"
    );
    assert_eq!(false_positives, 0);
    for code in [
        "USAGE_SHARED_PAYMENT",
        "USAGE_SHARED_NETWORK",
        "USAGE_COUNTRY_HOPPING",
        "USAGE_IMPOSSIBLE_TRAVEL",
        "USAGE_ANONYMIZER_SHARE",
    ] {
        assert_eq!(
            fleet_reasons.get(code),
            Some(&200),
            "{code} on every fleet account: {fleet_reasons:?}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn restricted_region_history_and_inline_usage() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let now = now_ms();
    // Used from Iran yesterday, now from the US.
    let events = vec![
        event("traveller", "5.1.2.3".into(), now - 86_400_000, "", 1),
        event("traveller", "216.160.83.57".into(), now - 1000, "", 1),
    ];
    let summary = UsageClient::new(server.channel.clone())
        .report(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, 2);
    let response = server
        .classify(pb::ClassifyRequest {
            account: Some(pb::Account {
                account_id: "traveller".into(),
                ..Default::default()
            }),
            ..request(scenario.ips.allowed)
        })
        .await
        .unwrap();
    assert!(
        codes(&response).contains(&"USAGE_RESTRICTED_REGION_HISTORY"),
        "{:?}",
        codes(&response)
    );
    assert_eq!(
        verdict(&response),
        Verdict::Allow,
        "history alone (45) stays under review (50)"
    );

    // A caller with its own counters sends usage inline; no aggregator state is needed.
    let inline = pb::UsageSummary {
        requests_1h: 5000,
        baseline_requests_per_hour: 20.0,
        accounts_sharing_payment: 9,
        ..Default::default()
    };
    let response = server
        .classify(pb::ClassifyRequest {
            usage: Some(inline),
            ..request(scenario.ips.allowed)
        })
        .await
        .unwrap();
    assert_eq!(
        codes(&response),
        ["USAGE_VOLUME_SPIKE", "USAGE_SHARED_PAYMENT"]
    );
    assert_eq!(verdict(&response), Verdict::Review);

    let bad = pb::UsageSummary {
        regions_7d: vec!["Persia".into()],
        ..Default::default()
    };
    let status = server
        .classify(pb::ClassifyRequest {
            usage: Some(bad),
            ..request(scenario.ips.allowed)
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("usage.regions_7d[0]: "),
        "{}",
        status.message()
    );
    server.shutdown().await;
}

/// A fleet that spreads its links: 30 accounts, 10 on one card, 10 on one API key, 10 on one
/// device, each group overlapping the next by one account, so no value is shared by more than
/// 10; beside it 200 ordinary accounts with their own cards, keys and devices. Everyone on their
/// own /24, so networks (which link from 20 accounts) do not join them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_fleet_is_seen_whole_and_ordinary_accounts_are_not() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let now = now_ms();
    let mut events = Vec::new();
    for i in 0..30u32 {
        let mut e = event(
            &format!("chain-{i}"),
            format!("198.51.{i}.7"),
            now - 60_000 * i64::from(i),
            if i < 10 { "card-chain" } else { "" },
            1,
        );
        // Groups 0..10 (card), 9..19 (key), 18..28 and 27..30 (device).
        e.api_key_id = if (9..19).contains(&i) {
            "key-chain".into()
        } else {
            format!("key-chain-{i}")
        };
        e.device_id = if i >= 18 {
            "device-chain".into()
        } else {
            format!("device-{i}")
        };
        events.push(e);
    }
    for i in 0..200u32 {
        let mut e = event(
            &format!("own-{i}"),
            format!("203.0.{i}.9"),
            now - 1000 * i64::from(i),
            &format!("card-own-{i}"),
            1,
        );
        e.device_id = format!("device-own-{i}");
        events.push(e);
    }
    let summary = UsageClient::new(server.channel.clone())
        .report(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, 230, "{summary:?}");
    let mut fleet_ids = std::collections::BTreeSet::new();
    let (mut true_positives, mut false_positives) = (0usize, 0usize);
    for (prefix, n, member) in [("chain", 30u32, true), ("own", 200, false)] {
        for i in 0..n {
            let response = server
                .classify(pb::ClassifyRequest {
                    account: Some(pb::Account {
                        account_id: format!("{prefix}-{i}"),
                        ..Default::default()
                    }),
                    ..request(scenario.ips.allowed)
                })
                .await
                .unwrap();
            let flagged = codes(&response).contains(&"USAGE_FLEET");
            match (member, flagged) {
                (true, true) => true_positives += 1,
                (false, true) => false_positives += 1,
                _ => {}
            }
            if member {
                let fleet = response.usage.as_ref().and_then(|u| u.fleet.clone());
                let fleet = fleet.unwrap_or_else(|| panic!("{prefix}-{i}: {response:?}"));
                assert_eq!(fleet.size, 30, "{prefix}-{i}");
                assert_eq!(fleet.links, ["PAYMENT_FINGERPRINT", "API_KEY", "DEVICE"]);
                fleet_ids.insert(fleet.fleet_id);
            }
        }
    }
    let precision = true_positives as f64 / (true_positives + false_positives).max(1) as f64;
    let recall = true_positives as f64 / 30.0;
    support::record(format_args!(
        "chained fleet: precision {precision:.3}, recall {recall:.3} (30 fleet, 200 ordinary accounts)"
    ));
    assert_eq!((true_positives, false_positives), (30, 0));
    assert_eq!(fleet_ids.len(), 1, "one fleet: {fleet_ids:?}");
    server.shutdown().await;
}
