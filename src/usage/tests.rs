use super::*;

const NOW: i64 = 1_790_000_000;

fn event(account: &str, ip: &str, t: i64) -> UsageEvent {
    UsageEvent {
        account_id: account.into(),
        ip: ip.parse().unwrap(),
        timestamp: t,
        api_key_id: Some("key-1".into()),
        requests: 1,
        input_tokens: 100,
        output_tokens: 50,
        payment_fingerprint: None,
        device_id: None,
        prompt_fingerprint: None,
        organization_domain: None,
    }
}

fn located(country: &str) -> EventLocation {
    EventLocation {
        country: CountryCode::parse(country).ok(),
        ..Default::default()
    }
}

#[test]
fn shared_payment_and_network_count_accounts_including_this_one() {
    let usage = UsageAggregator::new(64 << 20);
    for i in 0..5 {
        let mut e = event(&format!("fleet-{i}"), &format!("198.51.100.{i}"), NOW - 60);
        e.payment_fingerprint = Some("card-1".into());
        usage.record(&e, &located("US"));
    }
    let facts = usage
        .facts(
            Some("fleet-0"),
            "198.51.100.200".parse().unwrap(),
            Some("card-1"),
            NOW,
        )
        .unwrap();
    assert_eq!(facts.accounts_sharing_payment, 5);
    assert_eq!(facts.accounts_sharing_network, 5, "same /24");
    let newcomer = usage
        .facts(
            Some("new"),
            "198.51.100.9".parse().unwrap(),
            Some("card-1"),
            NOW,
        )
        .unwrap();
    assert_eq!(
        newcomer.accounts_sharing_payment, 6,
        "a new account on the card is the sixth"
    );
    assert_eq!(newcomer.requests_24h, 0);
    assert!(
        usage
            .facts(Some("nobody"), "203.0.113.1".parse().unwrap(), None, NOW)
            .is_none()
    );
    let tomorrow = usage.facts(
        Some("x"),
        "198.51.100.9".parse().unwrap(),
        None,
        NOW + 2 * DAY,
    );
    assert_eq!(
        tomorrow, None,
        "network sharing is a 24-hour window: accounts seen before it are not counted"
    );
    let card_tomorrow = usage
        .facts(
            Some("x"),
            "198.51.100.9".parse().unwrap(),
            Some("card-1"),
            NOW + 2 * DAY,
        )
        .unwrap();
    assert_eq!(
        (
            card_tomorrow.accounts_sharing_payment,
            card_tomorrow.accounts_sharing_network
        ),
        (6, 0),
        "payment sharing is a 7-day window; the network's has passed"
    );
}

#[test]
fn account_history_counts_countries_switches_and_volume() {
    let usage = UsageAggregator::new(64 << 20);
    let hops = [("US", 0), ("DE", 600), ("US", 1200), ("JP", 1500)];
    for (country, offset) in hops {
        usage.record(
            &event("a", "203.0.113.7", NOW - 3000 + offset),
            &located(country),
        );
    }
    let mut burst = event("a", "203.0.113.7", NOW - 60);
    burst.requests = 900;
    usage.record(&burst, &located("JP"));
    let facts = usage
        .facts(Some("a"), "203.0.113.7".parse().unwrap(), None, NOW)
        .unwrap();
    assert_eq!(facts.distinct_countries_24h, 3);
    assert_eq!(facts.country_switches_24h, 3);
    assert_eq!(facts.fastest_country_switch_secs, Some(300));
    assert_eq!(facts.requests_1h, 904);
    assert_eq!(facts.api_keys_24h, 1);
    assert_eq!(facts.regions_7d.len(), 3);
}

#[test]
fn memory_stays_under_the_ceiling_by_evicting() {
    let ceiling = 8 << 20;
    let usage = UsageAggregator::new(ceiling);
    for i in 0..50_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i * 256);
        usage.record(
            &event(&format!("acct-{i}"), &ip.to_string(), NOW),
            &located("US"),
        );
    }
    let stats = usage.stats();
    assert!(stats.bytes <= ceiling, "{stats:?}");
    assert!(stats.accounts < 50_000, "evicted: {stats:?}");
    assert!(stats.accounts > 1000, "but still holds many: {stats:?}");
}

#[test]
fn bytes_per_typical_account_are_bounded() {
    let usage = UsageAggregator::new(1 << 30);
    // A day of use: a request every 5 minutes, two networks, one country.
    for step in 0..288 {
        let ip = if step % 2 == 0 {
            "203.0.113.7"
        } else {
            "198.51.100.7"
        };
        usage.record(
            &event("typical", ip, NOW - DAY + step * 300),
            &located("DE"),
        );
    }
    let stats = usage.stats();
    let per_account = stats.bytes as f64;
    println!(
        "weighted bytes for one account with a full day of 5-minute buckets: {per_account} ({stats:?})"
    );
    assert!(per_account < 24_576.0, "{per_account}");
}

#[test]
fn facts_read_twice_in_a_second_follow_every_event_in_between() {
    let usage = UsageAggregator::new(64 << 20);
    let ip = "203.0.113.7";
    let ask = |now| {
        usage
            .facts(Some("a"), ip.parse().unwrap(), None, now)
            .unwrap()
    };
    usage.record(&event("a", ip, NOW - 3000), &located("DE"));
    assert_eq!(ask(NOW).requests_1h, 1);
    assert_eq!(ask(NOW).requests_1h, 1, "the same second, nothing new");
    usage.record(&event("a", ip, NOW - 5), &located("FR"));
    let facts = ask(NOW);
    assert_eq!(facts.requests_1h, 2, "an event in between is seen");
    assert_eq!(facts.distinct_countries_24h, 2);
    assert_eq!(facts.regions_7d.len(), 2);
    // A later second reads the state again: the first event is out of its hour.
    assert_eq!(ask(NOW + 1200).requests_1h, 1);
    assert_eq!(ask(NOW).requests_1h, 2, "and an earlier one too");
}
