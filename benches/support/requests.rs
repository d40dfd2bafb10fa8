//! The realistic requests of issue 16, shared by the wire mix (benches/mix.rs) and the
//! in-process decision benches (benches/decide.rs), so both measure the same calls.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use regionguard::grpc::pb;

/// Accounts with usage history.
pub const ACCOUNTS: u32 = 2_048;
/// Client addresses.
pub const ADDRESSES: u32 = 16_384;

pub const USER_AGENT: &str = "openai-python/1.55.0";
pub const LANGUAGE: &str = "en-US,en;q=0.9";

/// Address `n` of the pool: spread over the IPv4 space (a fixed multiplicative hash).
pub fn address(n: u32) -> String {
    let x = (n % ADDRESSES).wrapping_mul(2_654_435_761) | 0x0100_0000;
    std::net::Ipv4Addr::from(x & 0xdfff_ffff).to_string()
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn account_id(n: u32) -> String {
    format!("acct-{:05}", n % ACCOUNTS)
}

/// (b): an API request with account id, billing country and payment fingerprint, for an
/// account with history ([`history`]).
pub fn api_request(n: u32) -> pb::ClassifyRequest {
    let a = n % ACCOUNTS;
    pb::ClassifyRequest {
        ip: address(a),
        flow: pb::Flow::ApiRequest as i32,
        account: Some(pb::Account {
            account_id: account_id(a),
            billing_country: "DE".into(),
            payment_fingerprint: format!("card-{a}"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// (c): a signup with a full account (four countries, created now, a card), an organisation
/// with owners, and client hints.
pub fn signup_request(n: u32) -> pb::ClassifyRequest {
    let owner = |name: &str, country: &str, share: f64| pb::Owner {
        name: name.into(),
        country: country.into(),
        share_percent: share,
        owners: Vec::new(),
    };
    pb::ClassifyRequest {
        ip: address(n.wrapping_mul(7)),
        flow: pb::Flow::Signup as i32,
        account: Some(pb::Account {
            account_id: format!("new-{n:07}"),
            billing_country: "DE".into(),
            phone_country: "DE".into(),
            payment_country: "DE".into(),
            declared_country: "DE".into(),
            created_at_unix: now_secs(),
            payment_fingerprint: format!("card-new-{n}"),
            organization: Some(pb::Organization {
                name: "Example Analytics GmbH".into(),
                domain: "example-analytics.de".into(),
                headquarters_country: "DE".into(),
                owners: vec![
                    owner("Example Holding AG", "CH", 60.0),
                    owner("Founders", "DE", 40.0),
                ],
            }),
            verifications: Vec::new(),
        }),
        hints: Some(pb::ClientHints {
            accept_language: "de-DE,de;q=0.9,en-US;q=0.8,en;q=0.7".into(),
            timezone: "Europe/Berlin".into(),
            user_agent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36".into(),
        }),
        ..Default::default()
    }
}

/// Usage history for every account: 12 events over the last day.
pub fn history(now_ms: i64) -> Vec<pb::UsageEvent> {
    (0..ACCOUNTS)
        .flat_map(|a| {
            (0..12).map(move |i| pb::UsageEvent {
                account_id: account_id(a),
                ip: address(a),
                timestamp_unix_ms: now_ms - i * 7_200_000 - 1000,
                api_key_id: format!("key-{a}"),
                request_count: 1,
                input_tokens: 900,
                output_tokens: 300,
                model: "model-large".into(),
                payment_fingerprint: format!("card-{a}"),
                user_agent: USER_AGENT.into(),
                ..Default::default()
            })
        })
        .collect()
}
