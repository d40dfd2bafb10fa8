use super::*;

const NOW: i64 = 1_790_000_000;

fn event(account: &str, ip: &str, t: i64) -> UsageEvent {
    UsageEvent {
        account_id: account.into(),
        ip: ip.parse().unwrap(),
        timestamp: t,
        api_key_id: None,
        requests: 1,
        input_tokens: 0,
        output_tokens: 0,
        payment_fingerprint: None,
        device_id: None,
        prompt_fingerprint: None,
        organization_domain: None,
    }
}

fn graph() -> FleetGraph {
    FleetGraph::new(64 << 20, FleetRules::default())
}

/// 30 accounts: 0..10 share a card, 9..19 an API key, 18..28 a device and 27..30 the device
/// too, so groups overlap by one account and no value is shared by more than 10.
fn chained(g: &mut FleetGraph, t: i64) {
    for i in 0..30u32 {
        let mut e = event(
            &format!("fleet-{i}"),
            &format!("10.{i}.0.1"),
            t + i64::from(i),
        );
        if i < 10 {
            e.payment_fingerprint = Some("card-shared".into());
        }
        if (9..19).contains(&i) {
            e.api_key_id = Some("key-shared".into());
        }
        if i >= 18 {
            e.device_id = Some(if i < 28 { "device-a" } else { "device-b" }.into());
        }
        if i == 27 || i == 28 {
            // 27 carries both devices: the last group hangs on it.
            let mut both = e.clone();
            both.device_id = Some("device-b".into());
            g.record(&both);
        }
        g.record(&e);
    }
}

#[test]
fn a_chained_fleet_is_one_component_and_ordinary_accounts_are_in_none() {
    let mut g = graph();
    chained(&mut g, NOW);
    for i in 0..200u32 {
        let mut e = event(&format!("user-{i}"), &format!("172.16.{i}.9"), NOW + 100);
        e.payment_fingerprint = Some(format!("card-{i}").into());
        e.api_key_id = Some(format!("key-{i}").into());
        e.device_id = Some(format!("device-{i}").into());
        g.record(&e);
    }
    let now = NOW + 200;
    let (first, _) = g.facts("fleet-0", now);
    let first = first.expect("fleet-0 is in a fleet");
    assert_eq!(first.size, 30);
    assert_eq!(
        first.links,
        [
            LinkKind::PaymentFingerprint,
            LinkKind::ApiKey,
            LinkKind::Device
        ]
    );
    for i in 0..30 {
        let (fleet, _) = g.facts(&format!("fleet-{i}"), now);
        assert_eq!(fleet.as_ref().map(|f| &f.id), Some(&first.id), "fleet-{i}");
    }
    for i in 0..200 {
        assert_eq!(g.facts(&format!("user-{i}"), now).0, None, "user-{i}");
    }
    let report = g.report(&first.id, now).expect("the fleet by its id");
    assert_eq!(report.members.len(), 30);
    assert!(
        report
            .links
            .contains(&(LinkKind::PaymentFingerprint, "card-shared".into(), 10))
    );
    assert_eq!(g.report("fl_0000000000000000", now), None);
}

#[test]
fn the_fleet_id_is_the_same_whatever_order_events_arrive_in() {
    let mut forward = graph();
    chained(&mut forward, NOW);
    let mut events = Vec::new();
    let mut g = graph();
    chained(&mut g, NOW);
    let id = g.facts("fleet-5", NOW + 100).0.unwrap().id;
    // The same events, newest first.
    for i in (0..30u32).rev() {
        let mut e = event(
            &format!("fleet-{i}"),
            &format!("10.{i}.0.1"),
            NOW + i64::from(i),
        );
        e.payment_fingerprint = (i < 10).then(|| "card-shared".into());
        e.api_key_id = (9..19).contains(&i).then(|| "key-shared".into());
        e.device_id = (i >= 18).then(|| "device-a".into());
        events.push(e);
    }
    let mut backward = graph();
    for e in &events {
        backward.record(e);
    }
    assert_eq!(backward.facts("fleet-5", NOW + 100).0.unwrap().id, id);
    assert_eq!(forward.facts("fleet-29", NOW + 100).0.unwrap().id, id);
}

#[test]
fn links_expire_with_the_window_and_the_fleet_splits() {
    let mut g = graph();
    let mut a = event("a", "10.0.0.1", NOW);
    a.payment_fingerprint = Some("card".into());
    let mut b = event("b", "10.0.1.1", NOW);
    b.payment_fingerprint = Some("card".into());
    g.record(&a);
    g.record(&b);
    assert_eq!(g.facts("a", NOW).0.unwrap().size, 2);
    // Eight days on, only b is active again, with a new card.
    let later = NOW + 8 * DAY;
    b.timestamp = later;
    b.payment_fingerprint = Some("other".into());
    g.record(&b);
    assert_eq!(g.facts("b", later).0, None);
    assert_eq!(
        g.facts("a", later),
        (None, 0),
        "idle for the window: forgotten"
    );
}

#[test]
fn a_value_links_only_once_shared_by_its_minimum() {
    let mut g = graph();
    // Networks link from 20 accounts in the default rules.
    for i in 0..19 {
        g.record(&event(&format!("n-{i}"), &format!("192.0.2.{i}"), NOW));
    }
    assert_eq!(g.facts("n-0", NOW).0, None);
    g.record(&event("n-19", "192.0.2.200", NOW));
    assert_eq!(g.facts("n-0", NOW).0.unwrap().size, 20);
    // A rule change that turns networks off splits it at the next event.
    let mut rules = FleetRules::default();
    rules.links[LinkKind::Network as usize] = None;
    g.set_rules(rules);
    g.record(&event("n-1", "192.0.2.1", NOW + 1));
    assert_eq!(g.facts("n-0", NOW + 1).0, None);
}

#[test]
fn coordinated_members_are_far_above_chance_and_independent_ones_are_not() {
    let mut g = graph();
    // Ten accounts on one card, all active in the same three minutes.
    for i in 0..10 {
        for m in [0, 20, 40] {
            let mut e = event(&format!("c-{i}"), "10.9.9.9", NOW + m * 60);
            e.payment_fingerprint = Some("card".into());
            g.record(&e);
        }
    }
    let fleet = g.facts("c-0", NOW + 41 * 60).0.unwrap();
    assert_eq!(fleet.active_members_1h, 10);
    assert_eq!(fleet.coactive_pairs_1h, 3 * 45);
    assert!(fleet.coactive_pairs_1h as f64 > 10.0 * fleet.expected_coactive_pairs_1h);

    // Ten accounts on one card, each active in its own three minutes.
    let mut g = graph();
    for i in 0..10i64 {
        for m in [i, 20 + i, 40 + i] {
            let mut e = event(&format!("s-{i}"), "10.9.9.9", NOW + m * 60);
            e.payment_fingerprint = Some("card".into());
            g.record(&e);
        }
    }
    let fleet = g.facts("s-0", NOW + 50 * 60).0.unwrap();
    assert_eq!(fleet.coactive_pairs_1h, 0);
}

#[test]
fn templates_count_across_accounts_and_the_ceiling_holds() {
    let mut g = FleetGraph::new(40 * (ACCOUNT_BYTES + LINK_BYTES), FleetRules::default());
    for i in 0..100 {
        let mut e = event(&format!("t-{i}"), "10.1.1.1", NOW);
        e.prompt_fingerprint = Some("template-1".into());
        g.record(&e);
    }
    let held = g.stats().accounts;
    assert!(held > 2 && held < 100, "{held}");
    assert_eq!(g.stats().refused, 100 - held);
    assert!(g.bytes() <= 40 * (ACCOUNT_BYTES + LINK_BYTES));
    assert_eq!(u64::from(g.facts("t-0", NOW).1), held);
}

#[test]
fn a_fleet_keeps_the_ids_it_had_when_it_merges_or_finds_an_earlier_member() {
    let mut g = graph();
    let linked = |account: &str, t: i64, card: Option<&str>, device: Option<&str>| {
        let mut e = event(account, "10.9.0.1", t);
        e.payment_fingerprint = card.map(Into::into);
        e.device_id = device.map(Into::into);
        e
    };
    // An older fleet on a card, a younger one on a device.
    g.record(&linked("old-1", NOW, Some("card-old"), None));
    g.record(&linked("old-2", NOW + 1, Some("card-old"), None));
    g.record(&linked("young-1", NOW + 100, None, Some("device-y")));
    g.record(&linked("young-2", NOW + 101, None, Some("device-y")));
    let old = g.facts("old-1", NOW + 200).0.unwrap();
    let young = g.facts("young-1", NOW + 200).0.unwrap();
    assert!(old.formerly.is_empty() && young.formerly.is_empty());
    // A young member uses the old card: one fleet, named after the older founder, that still
    // answers to the young fleet's id (an override on it holds).
    g.record(&linked("young-2", NOW + 300, Some("card-old"), None));
    let merged = g.facts("young-1", NOW + 400).0.unwrap();
    assert_eq!((merged.id.as_str(), merged.size), (old.id.as_str(), 4));
    assert_eq!(merged.formerly, std::slice::from_ref(&young.id));
    assert_eq!(
        g.facts("old-2", NOW + 400).0.unwrap().formerly,
        std::slice::from_ref(&young.id)
    );
    // An earlier member turns up (events out of order): the fleet takes its id, and keeps the
    // one it had.
    g.record(&linked("early", NOW - 50, Some("card-old"), None));
    let earlier = g.facts("old-1", NOW + 400).0.unwrap();
    assert_eq!(earlier.id, fleet_id("early"));
    let mut expected = vec![old.id.clone(), young.id.clone()];
    expected.sort();
    assert_eq!(earlier.formerly, expected);
    // The hourly rebuild keeps them while their founders are held.
    g.rebuild(NOW + 500);
    assert_eq!(g.facts("young-2", NOW + 500).0.unwrap().formerly, expected);
    // Eight days on only young-2 and early are active, still on the card: the fleet of two
    // keeps only the ids whose founders are still held.
    let later = NOW + 8 * DAY;
    g.record(&linked("early", later, Some("card-old"), None));
    g.record(&linked("young-2", later, Some("card-old"), None));
    let kept = g.facts("young-2", later).0.unwrap();
    assert_eq!(
        (kept.id.as_str(), kept.size),
        (fleet_id("early").as_str(), 2)
    );
    assert!(kept.formerly.is_empty(), "{kept:?}");
}

#[test]
fn an_id_stays_with_its_founder_when_a_fleet_splits() {
    let mut g = graph();
    let on = |account: &str, t: i64, card: Option<&str>, device: &str| {
        let mut e = event(account, "10.8.0.1", t);
        e.payment_fingerprint = card.map(Into::into);
        e.device_id = Some(device.into());
        e
    };
    // A legitimate fleet, and a younger one (to be denied) that links to it by a card once.
    g.record(&on("good-1", NOW, None, "device-good"));
    g.record(&on("good-2", NOW + 1, None, "device-good"));
    g.record(&on("bad-1", NOW + 100, None, "device-bad"));
    g.record(&on("bad-2", NOW + 101, Some("card-x"), "device-bad"));
    let bad = g.facts("bad-1", NOW + 150).0.unwrap().id;
    g.record(&on("good-2", NOW + 200, Some("card-x"), "device-good"));
    let merged = g.facts("good-1", NOW + 300).0.unwrap();
    assert_eq!(merged.formerly, std::slice::from_ref(&bad));
    // Eight days on, all four are active on their own devices; the card has expired, so the
    // rebuild splits them. The denied id goes with its founder, not to the good fleet.
    let later = NOW + 8 * DAY;
    for (account, device) in [
        ("good-1", "device-good"),
        ("good-2", "device-good"),
        ("bad-1", "device-bad"),
        ("bad-2", "device-bad"),
    ] {
        g.record(&on(account, later, None, device));
    }
    let good = g.facts("good-1", later).0.unwrap();
    assert_eq!(good.size, 2);
    assert!(good.formerly.is_empty(), "{good:?}");
    assert_eq!(g.facts("bad-2", later).0.unwrap().id, bad);
}
