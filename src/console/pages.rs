//! The console's pages as HTML (maud: escaped by default). Each takes what its handler fetched
//! and returns markup; nothing here reads the store.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::QueueQuery;
use super::charts::{self, Bar, Series};
use super::session::Session;
use crate::grpc::pb;
use crate::store::{Dashboard, OverrideRecord, QueueState};

/// Percent-encodes everything but unreserved characters (a path segment or query value).
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm), proleptic Gregorian.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `2026-12-02 07:05:09Z` for Unix milliseconds.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// "3 h 20 min", "2 d 4 h": how long ago or until, roughly.
pub fn span(ms: i64) -> String {
    let mins = ms.max(0) / 60_000;
    match mins {
        0 => "under a minute".into(),
        1..=59 => format!("{mins} min"),
        60..=1439 => format!("{} h {} min", mins / 60, mins % 60),
        _ => format!("{} d {} h", mins / 1440, mins / 60 % 24),
    }
}

fn verdict_name(verdict: i32) -> &'static str {
    match pb::Verdict::try_from(verdict) {
        Ok(pb::Verdict::Allow) => "ALLOW",
        Ok(pb::Verdict::Review) => "REVIEW",
        Ok(pb::Verdict::Deny) => "DENY",
        _ => "UNSPECIFIED",
    }
}

fn flow_name(flow: i32) -> &'static str {
    match pb::Flow::try_from(flow) {
        Ok(pb::Flow::Signup) => "signup",
        Ok(pb::Flow::Login) => "login",
        _ => "api_request",
    }
}

fn verdict_badge(verdict: &str) -> Markup {
    html! { span class=(format!("badge {}", verdict.to_ascii_lowercase())) { (verdict) } }
}

fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · regionguard review" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "regionguard" }
                    @if let Some(s) = session {
                        nav {
                            a href="/" { "Dashboard" }
                            a href="/queue" { "Queue" }
                            a href="/overrides" { "Overrides" }
                            a href="/replay" { "Replay" }
                            a href="/audit" { "Audit" }
                        }
                        form.signout method="post" action="/logout" {
                            span.who { "Signed in as " strong { (s.reviewer) } }
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    @if let Some(flash) = session.and_then(|s| s.flash.as_deref()) {
                        p.flash role="status" { (flash) }
                    }
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

pub fn error_page(status: StatusCode, message: &str) -> Markup {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    layout(
        &title,
        None,
        html! {
            p.error #error { (message) }
            p { a href="/" { "Dashboard" } " · " a href="/queue" { "Queue" } }
        },
    )
}

pub fn login(next: &str, problem: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            @if let Some(problem) = problem { p.error #error { (problem) } }
            form.card method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Reviewer token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Sign in" }
            }
            p.hint { "The token of a reviewer in " code { "[[auth.callers]]" } " (the one the CLI's " code { "--token" } " takes)." }
        },
    )
}

/// What the dashboard shows and for which range.
pub struct DashboardView<'a> {
    pub session: &'a Session,
    pub range: &'a str,
    pub first_ms: i64,
    pub bucket_ms: i64,
    pub buckets: usize,
    pub now_ms: i64,
    pub stats: &'a Dashboard,
    pub overrides: &'a [OverrideRecord],
}

const VERDICTS: [&str; 3] = ["ALLOW", "REVIEW", "DENY"];

pub fn dashboard(v: &DashboardView<'_>) -> Markup {
    let mut bars: Vec<Bar> = (0..v.buckets)
        .map(|i| {
            let start = v.first_ms + v.bucket_ms * i as i64;
            let text = utc(start);
            Bar {
                label: if v.bucket_ms < 86_400_000 {
                    if v.bucket_ms == 3_600_000 {
                        text[11..16].to_owned()
                    } else {
                        format!("{} {}", &text[5..10], &text[11..13])
                    }
                } else {
                    text[5..10].to_owned()
                },
                values: vec![0; 3],
            }
        })
        .collect();
    let mut totals = [0i64; 3];
    for (hour, verdict, n) in &v.stats.hourly {
        let Some(j) = VERDICTS.iter().position(|x| x == verdict) else {
            continue;
        };
        let i = (hour - v.first_ms).div_euclid(v.bucket_ms);
        if let Some(bar) = usize::try_from(i).ok().and_then(|i| bars.get_mut(i)) {
            bar.values[j] += n;
            totals[j] += n;
        }
    }
    let mut countries: BTreeMap<&str, [i64; 2]> = BTreeMap::new();
    for (country, verdict, n) in &v.stats.by_country {
        let entry = countries.entry(country.as_str()).or_default();
        entry[usize::from(verdict == "DENY")] += n;
    }
    let mut countries: Vec<_> = countries.into_iter().collect();
    countries.sort_by(|a, b| (b.1[0] + b.1[1]).cmp(&(a.1[0] + a.1[1])).then(a.0.cmp(b.0)));
    let expiring: Vec<&OverrideRecord> = v
        .overrides
        .iter()
        .filter(|o| {
            o.active_at(v.now_ms)
                && o.expires_at_ms
                    .is_some_and(|t| t - v.now_ms <= 7 * 86_400_000)
        })
        .collect();
    let label_every = (v.buckets / 8).max(1);
    let series = Series {
        names: &VERDICTS,
        classes: &["allow", "review", "deny"],
    };
    layout(
        "Dashboard",
        Some(v.session),
        html! {
            nav.ranges {
                "Range: "
                @for (name, _, _) in super::RANGES {
                    @if name == v.range { strong { (name) } } @else { a href=(format!("/?range={name}")) { (name) } }
                }
            }
            section.tiles {
                div.tile { span.n #queue-open { (v.stats.queue_open) } " open in the queue" }
                div.tile {
                    @match v.stats.oldest_open_ms {
                        Some(t) => { "oldest waiting " span.n #queue-age { (span(v.now_ms - t)) } }
                        None => { "nothing waiting" }
                    }
                }
                @for (j, name) in VERDICTS.iter().enumerate() {
                    div.tile { span.n { (totals[j]) } " " (verdict_badge(name)) " in " (v.range) }
                }
            }
            section {
                h2 { "Verdicts over time (UTC)" }
                (charts::stacked_bars("verdicts-chart", &bars, &series, label_every))
            }
            div.columns {
                section {
                    h2 { "Top reason codes" }
                    @if v.stats.top_reasons.is_empty() { p.empty { "No reasons in this range." } }
                    @else {
                        (charts::horizontal_bars("reasons-chart", &v.stats.top_reasons, "reason"))
                        table {
                            thead { tr { th { "Reason" } th.num { "Decisions" } th {} } }
                            tbody {
                                @for (code, n) in &v.stats.top_reasons {
                                    tr { td { code { (code) } } td.num { (n) } td { a href=(format!("/queue?reason={}", url_encode(code))) { "queue" } } }
                                }
                            }
                        }
                    }
                }
                section {
                    h2 { "DENY and REVIEW by country" }
                    @if countries.is_empty() { p.empty { "None in this range." } }
                    @else {
                        @let rows: Vec<(String, i64)> = countries.iter().map(|(c, n)| (if c.is_empty() { "(unknown)".to_owned() } else { (*c).to_owned() }, n[0] + n[1])).collect();
                        (charts::horizontal_bars("countries-chart", &rows, "deny"))
                        table #countries {
                            thead { tr { th { "Country" } th.num { "REVIEW" } th.num { "DENY" } } }
                            tbody {
                                @for (country, n) in &countries {
                                    tr { td { a href=(format!("/queue?country={}", url_encode(country))) { (if country.is_empty() { "(unknown)" } else { country }) } } td.num { (n[0]) } td.num { (n[1]) } }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Overrides expiring within 7 days" }
                @if expiring.is_empty() { p.empty { "None." } }
                @else { (override_table(v.session, &expiring, v.now_ms, "/")) }
            }
        },
    )
}

fn override_table(session: &Session, list: &[&OverrideRecord], now: i64, back: &str) -> Markup {
    html! {
        table.overrides {
            thead { tr { th { "Scope" } th { "Value" } th { "Action" } th { "Reason" } th { "By" } th { "Created" } th { "Expires" } th { "State" } th {} } }
            tbody {
                @for o in list {
                    tr {
                        td { (o.scope) }
                        td {
                            @if o.scope == "account" { a href=(format!("/accounts/{}", url_encode(&o.value))) { (o.value) } }
                            @else if o.scope == "fleet" { a href=(format!("/fleets/{}", url_encode(&o.value))) { (o.value) } }
                            @else { code { (o.value) } }
                        }
                        td { (verdict_badge(&o.action)) }
                        td { (o.reason) }
                        td { (o.reviewer) }
                        td { (utc(o.created_at_ms)) }
                        td { @match o.expires_at_ms { Some(t) => { (utc(t)) }, None => { "never" } } }
                        td {
                            @if let Some(t) = o.removed_at_ms { "removed " (utc(t)) " by " (o.removed_by) }
                            @else if !o.active_at(now) { "expired" }
                            @else { "active" }
                        }
                        td {
                            @if o.active_at(now) {
                                form.inline method="post" action=(format!("/overrides/{}/remove", url_encode(&o.id))) {
                                    (csrf(session))
                                    input type="hidden" name="return_to" value=(back);
                                    input type="text" name="reason" placeholder="why it goes" required aria-label="reason for removing";
                                    button type="submit" { "Remove" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The `n` reason codes that counted most.
fn top_reasons(answer: Option<&pb::ClassifyResponse>, n: usize) -> Vec<&str> {
    let mut reasons: Vec<&pb::Reason> = answer
        .map(|a| a.reasons.iter().collect())
        .unwrap_or_default();
    reasons.sort_by_key(|r| (!r.hard, -r.contribution));
    reasons
        .into_iter()
        .take(n)
        .map(|r| r.code.as_str())
        .collect()
}

fn anonymizer_flags(location: Option<&pb::Location>) -> Vec<&'static str> {
    let Some(a) = location.and_then(|l| l.anonymizer.as_ref()) else {
        return Vec::new();
    };
    [
        (a.vpn, "VPN"),
        (a.tor, "Tor"),
        (a.public_proxy, "proxy"),
        (a.residential_proxy, "residential proxy"),
        (a.hosting, "hosting"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect()
}

pub fn queue(session: &Session, q: &QueueQuery, page: &pb::ListQueueResponse, now: i64) -> Markup {
    let status = if q.status.is_empty() {
        "open"
    } else {
        q.status.as_str()
    };
    // The same filters, on another page.
    let link = |token: &str| {
        let mut params = vec![
            ("status", status.to_owned()),
            ("country", q.country.clone()),
            ("reason", q.reason.clone()),
            ("account", q.account.clone()),
            ("fleet", q.fleet.clone()),
            ("since", q.since.clone()),
            ("page_token", token.to_owned()),
        ];
        if let Some(size) = q.page_size {
            params.push(("page_size", size.to_string()));
        }
        params
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}={}", url_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    };
    let (next, first) = (link(&page.next_page_token), link(""));
    layout(
        "Review queue",
        Some(session),
        html! {
            form.filters method="get" action="/queue" {
                label { "Status " select name="status" {
                    @for s in ["open", "resolved", "all"] { option value=(s) selected[s == status] { (s) } }
                } }
                label { "Country " input type="text" name="country" value=(q.country) size="4" placeholder="IR"; }
                label { "Reason " input type="text" name="reason" value=(q.reason) placeholder="VPN"; }
                label { "Account " input type="text" name="account" value=(q.account); }
                label { "Fleet " input type="text" name="fleet" value=(q.fleet) size="20" placeholder="fl_…"; }
                label { "Since " input type="text" name="since" value=(q.since) size="6" placeholder="24h, 7d"; }
                button type="submit" { "Filter" }
            }
            @if page.items.is_empty() { p.empty #queue-empty { "No queue items match." } }
            @else {
                table #queue {
                    thead { tr { th { "Recorded" } th { "Age" } th { "Account" } th { "Country" } th { "Top reasons" } th { "Anonymizer" } th { "ASN" } th { "Status" } } }
                    tbody {
                        @for item in &page.items {
                            @if let Some(d) = item.decision.as_ref() {
                                @let answer = d.decision.as_ref();
                                @let location = answer.and_then(|a| a.location.as_ref());
                                @let id = answer.map_or("", |a| a.decision_id.as_str());
                                tr {
                                    td { a.decision href=(format!("/decisions/{}", url_encode(id))) { (utc(d.recorded_at_unix_ms)) } }
                                    td { (span(now - d.recorded_at_unix_ms)) }
                                    td { @if d.account_id.is_empty() { "—" } @else { a href=(format!("/accounts/{}", url_encode(&d.account_id))) { (d.account_id) } } }
                                    td { (location.map_or("", |l| l.country.as_str())) }
                                    td { @for code in top_reasons(answer, 3) { code.reason { (code) } " " } }
                                    td { (anonymizer_flags(location).join(", ")) }
                                    td { @if let Some(l) = location { @if l.asn != 0 { "AS" (l.asn) " " (l.as_org) } } }
                                    td { (item.status) @if !item.outcome.is_empty() { " (" (item.outcome) ")" } }
                                }
                            }
                        }
                    }
                }
            }
            p.paging {
                @if !q.page_token.is_empty() { a #first-page href=(format!("/queue?{}", first)) { "← First page" } " " }
                @if !page.next_page_token.is_empty() { a #next-page href=(format!("/queue?{next}")) { "Next page →" } }
            }
        },
    )
}

/// The ownership chain in a decision's inputs (`account.organization`), as nested lists.
fn ownership_tree(inputs: &serde_json::Value) -> Option<Markup> {
    let org = inputs.get("account")?.get("organization")?;
    if org.is_null() {
        return None;
    }
    fn owners(list: Option<&serde_json::Value>) -> Markup {
        let list = list.and_then(|l| l.as_array()).cloned().unwrap_or_default();
        html! {
            @if !list.is_empty() {
                ul {
                    @for o in &list {
                        li {
                            strong { (o.get("name").and_then(|v| v.as_str()).unwrap_or("(unnamed)")) }
                            " — " (o.get("share_percent").and_then(|v| v.as_f64()).unwrap_or(0.0)) " %"
                            @if let Some(region) = o.get("region").and_then(|v| v.as_str()) { " · " code { (region) } }
                            (owners(o.get("owners")))
                        }
                    }
                }
            }
        }
    }
    let hq = org
        .get("headquarters")
        .and_then(|v| v.as_str())
        .unwrap_or("unknown");
    Some(html! {
        div.tree #ownership {
            "Organisation, headquarters " code { (hq) }
            (owners(org.get("owners")))
        }
    })
}

fn usage_table(usage: &pb::UsageSummary) -> Markup {
    let rows: [(&str, String); 13] = [
        ("requests in the last hour", usage.requests_1h.to_string()),
        (
            "baseline requests per hour",
            format!("{:.1}", usage.baseline_requests_per_hour),
        ),
        ("requests in 24 h", usage.requests_24h.to_string()),
        (
            "anonymised requests in 24 h",
            usage.anonymized_requests_24h.to_string(),
        ),
        (
            "distinct countries in 24 h",
            usage.distinct_countries_24h.to_string(),
        ),
        (
            "country switches in 24 h",
            usage.country_switches_24h.to_string(),
        ),
        (
            "fastest country switch (s)",
            usage.fastest_country_switch_seconds.to_string(),
        ),
        (
            "accounts sharing the payment method",
            usage.accounts_sharing_payment.to_string(),
        ),
        (
            "accounts sharing the network",
            usage.accounts_sharing_network.to_string(),
        ),
        ("regions in 7 days", usage.regions_7d.join(", ")),
        ("distinct IPs in 24 h", usage.distinct_ips_24h.to_string()),
        (
            "distinct networks in 24 h",
            usage.distinct_networks_24h.to_string(),
        ),
        ("API keys in 24 h", usage.api_keys_24h.to_string()),
    ];
    html! {
        table.kv #usage {
            tbody {
                @for (k, v) in rows { tr { th { (k) } td { (v) } } }
                @if let Some(f) = &usage.fleet {
                    tr { th { "fleet" } td {
                        a #fleet-link href=(format!("/fleets/{}", url_encode(&f.fleet_id))) { (f.fleet_id) }
                        " (" (f.size) " accounts; " (f.links.join(", ")) ")"
                    } }
                }
                @if usage.accounts_sharing_template > 0 {
                    tr { th { "accounts sharing a prompt template" } td { (usage.accounts_sharing_template) } }
                }
            }
        }
        @if usage.degraded { p.warn { "Degraded: the shared usage history could not be read; counts may be low." } }
    }
}

fn override_form(session: &Session, scope: &str, value: &str, back: &str) -> Markup {
    html! {
        form.card #override-form method="post" action="/overrides" {
            (csrf(session))
            input type="hidden" name="return_to" value=(back);
            label { "Scope " select name="scope" {
                @for s in ["account", "domain", "network", "fleet"] { option value=(s) selected[s == scope] { (s) } }
            } }
            label { "Value " input type="text" name="value" value=(value) required; }
            label { "Action " select name="action" { option value="ALLOW" { "ALLOW" } option value="DENY" { "DENY" } } }
            label { "Reason " input type="text" name="reason" required placeholder="why, for the audit log"; }
            label { "Expires " select name="expires_in_days" {
                option value="" { "never" }
                @for d in [1, 7, 30, 90, 365] { option value=(d) selected[d == 30] { "in " (d) (if d == 1 { " day" } else { " days" }) } }
            } }
            button type="submit" { "Set override" }
        }
    }
}

pub fn decision(
    session: &Session,
    record: &pb::DecisionRecord,
    queue: Option<&QueueState>,
    history: Option<&pb::AccountHistory>,
    now: i64,
) -> Markup {
    let answer = record.decision.clone().unwrap_or_default();
    let verdict = verdict_name(answer.verdict);
    let location = answer.location.clone().unwrap_or_default();
    let inputs: serde_json::Value = serde_json::from_str(&record.inputs_json).unwrap_or_default();
    let pretty =
        serde_json::to_string_pretty(&inputs).unwrap_or_else(|_| record.inputs_json.clone());
    let back = format!("/decisions/{}", url_encode(&answer.decision_id));
    let domain = inputs
        .pointer("/account/organization/domain")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let (scope, value) = if !record.account_id.is_empty() {
        ("account", record.account_id.as_str())
    } else if !domain.is_empty() {
        ("domain", domain)
    } else {
        ("network", location.network.as_str())
    };
    layout(
        &format!("Decision {}", answer.decision_id),
        Some(session),
        html! {
            section.summary {
                (verdict_badge(verdict))
                span.score #score { "score " strong { (answer.risk_score) } " / 100" }
                span { "flow " strong { (flow_name(record.flow)) } }
                span { "recorded " (utc(record.recorded_at_unix_ms)) " (seq " (record.seq) ")" }
                span { "policy " code #policy-version { (answer.policy_version) } }
                @if !record.account_id.is_empty() { span { "account " a href=(format!("/accounts/{}", url_encode(&record.account_id))) { (record.account_id) } } }
                span { "IP " code { (record.ip) } }
            }
            @if !answer.required_verifications.is_empty() {
                p { "Verifications asked for: " @for v in &answer.required_verifications { code { (v) } " " } }
            }
            @if let Some(list) = inputs.pointer("/account/verifications").and_then(|v| v.as_array()).filter(|l| !l.is_empty()) {
                section {
                    h2 { "Verifications the account carried" }
                    table #verifications {
                        thead { tr { th { "Kind" } th { "Country" } th { "Passed" } } }
                        tbody {
                            @for v in list {
                                tr {
                                    td { code { (v.get("kind").and_then(|k| k.as_str()).unwrap_or("")) } }
                                    td { (v.get("country").and_then(|c| c.as_str()).unwrap_or("")) }
                                    td { (v.get("verified_at_unix").and_then(|t| t.as_i64()).map(|t| utc(t.saturating_mul(1000))).unwrap_or_default()) }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Reasons" }
                @if answer.reasons.is_empty() { p.empty { "No reasons: nothing counted against this request." } }
                table #reasons {
                    thead { tr { th { "Code" } th { "Hard" } th.num { "Contribution" } th { "Message" } th { "Evidence" } } }
                    tbody {
                        @for r in &answer.reasons {
                            tr {
                                td { code { (r.code) } }
                                td { @if r.hard { "hard" } }
                                td.num { (r.contribution) }
                                td { (r.message) }
                                td {
                                    dl.evidence { @for (k, v) in &r.evidence { dt { (k) } dd { (v) } } }
                                }
                            }
                        }
                    }
                }
                @if let Some(tree) = ownership_tree(&inputs) { h3 { "Ownership" } (tree) }
            }
            div.columns {
                section {
                    h2 { "Location" }
                    table.kv #location {
                        tbody {
                            tr { th { "country" } td { (location.country) } }
                            tr { th { "subdivisions" } td { (if location.subdivisions.is_empty() { location.subdivision.clone() } else { location.subdivisions.join(", ") }) } }
                            tr { th { "registered country" } td { (location.registered_country) } }
                            tr { th { "network" } td { code { (location.network) } } }
                            tr { th { "ASN" } td { @if location.asn != 0 { "AS" (location.asn) " " (location.as_org) } } }
                            tr { th { "anonymizer" } td { (anonymizer_flags(Some(&location)).join(", ")) } }
                            tr { th { "accuracy radius" } td { @if location.accuracy_radius_km != 0 { (location.accuracy_radius_km) " km" } } }
                        }
                    }
                    @if !location.databases.is_empty() {
                        table #databases {
                            thead { tr { th { "Database" } th { "Type" } th { "Built" } th {} } }
                            tbody {
                                @for db in &location.databases {
                                    tr { td { (db.role) } td { (db.database_type) } td { (utc(i64::try_from(db.build_epoch).unwrap_or(i64::MAX / 1000).saturating_mul(1000))) } td { @if db.stale { span.warn { "stale" } } } }
                                }
                            }
                        }
                    }
                }
                section {
                    h2 { "Usage" }
                    @match &answer.usage { Some(u) => { (usage_table(u)) }, None => { p.empty { "No usage history for this decision." } } }
                }
            }
            section {
                h2 { "Review" }
                @match queue {
                    None => { p { "Not in the review queue (only REVIEW decisions are)." } }
                    Some(q) if q.status == "resolved" => {
                        p #queue-state { "Resolved as " strong { (q.outcome) } " by " (q.resolved_by)
                            @if let Some(t) = q.resolved_at_ms { " at " (utc(t)) }
                            @if !q.note.is_empty() { ": " (q.note) } }
                    }
                    Some(_) => {
                        p #queue-state { "Open in the review queue." }
                        form.card #resolve-form method="post" action=(format!("{back}/resolve")) {
                            (csrf(session))
                            label { "Outcome " input type="text" name="outcome" list="outcomes" required placeholder="cleared"; }
                            datalist #outcomes { @for o in ["cleared", "confirmed", "escalated", "false_positive"] { option value=(o) {} } }
                            label { "Note " input type="text" name="note" placeholder="optional"; }
                            button type="submit" { "Resolve" }
                        }
                    }
                }
                h3 { "Override" }
                (override_form(session, scope, value, &back))
            }
            @if let Some(h) = history {
                section {
                    h2 { "The account's other decisions" }
                    (decision_table(h.decisions.iter().filter(|d| d.decision.as_ref().map(|a| a.decision_id.as_str()) != Some(answer.decision_id.as_str()))))
                    h3 { "The account's overrides" }
                    @let list: Vec<OverrideRecord> = h.overrides.iter().map(override_record).collect();
                    @let refs: Vec<&OverrideRecord> = list.iter().collect();
                    @if refs.is_empty() { p.empty { "None." } } @else { (override_table(session, &refs, now, &back)) }
                }
            }
            section {
                h2 { "Inputs as recorded" }
                pre #inputs { (pretty) }
            }
        },
    )
}

fn override_record(o: &pb::Override) -> OverrideRecord {
    let some = |t: i64| (t != 0).then_some(t);
    OverrideRecord {
        id: o.id.clone(),
        scope: o.scope.clone(),
        value: o.value.clone(),
        action: o.action.clone(),
        reviewer: o.reviewer.clone(),
        reason: o.reason.clone(),
        created_at_ms: o.created_at_unix_ms,
        expires_at_ms: some(o.expires_at_unix_ms),
        removed_at_ms: some(o.removed_at_unix_ms),
        removed_by: o.removed_by.clone(),
    }
}

fn decision_table<'a>(decisions: impl Iterator<Item = &'a pb::DecisionRecord>) -> Markup {
    let decisions: Vec<_> = decisions.collect();
    html! {
        @if decisions.is_empty() { p.empty { "None." } }
        @else {
            table.decisions {
                thead { tr { th { "Recorded" } th { "Verdict" } th.num { "Score" } th { "Flow" } th { "Country" } th { "Reasons" } } }
                tbody {
                    @for d in decisions {
                        @let a = d.decision.clone().unwrap_or_default();
                        tr {
                            td { a href=(format!("/decisions/{}", url_encode(&a.decision_id))) { (utc(d.recorded_at_unix_ms)) } }
                            td { (verdict_badge(verdict_name(a.verdict))) }
                            td.num { (a.risk_score) }
                            td { (flow_name(d.flow)) }
                            td { (a.location.as_ref().map_or("", |l| l.country.as_str())) }
                            td { @for r in &a.reasons { code.reason { (r.code) } " " } }
                        }
                    }
                }
            }
        }
    }
}

pub fn account(session: &Session, h: &pb::AccountHistory, now: i64) -> Markup {
    let back = format!("/accounts/{}", url_encode(&h.account_id));
    let list: Vec<OverrideRecord> = h.overrides.iter().map(override_record).collect();
    let refs: Vec<&OverrideRecord> = list.iter().collect();
    layout(
        &format!("Account {}", h.account_id),
        Some(session),
        html! {
            section {
                h2 { "Decisions, newest first" }
                (decision_table(h.decisions.iter()))
            }
            section {
                h2 { "Overrides" }
                @if refs.is_empty() { p.empty { "None." } } @else { (override_table(session, &refs, now, &back)) }
                (override_form(session, "account", &h.account_id, &back))
            }
        },
    )
}

/// A fleet (`Review/GetFleet`): what holds it together, its members and the values they share,
/// the overrides on it and a form for a new one.
pub fn fleet(
    session: &Session,
    fleet: &pb::Fleet,
    overrides: &[OverrideRecord],
    queue_link: &str,
    now: i64,
) -> Markup {
    let summary = fleet.summary.clone().unwrap_or_default();
    let back = format!("/fleets/{}", url_encode(&summary.fleet_id));
    let refs: Vec<&OverrideRecord> = overrides.iter().collect();
    let rows: [(&str, String); 8] = [
        ("accounts", summary.size.to_string()),
        ("formerly", summary.former_fleet_ids.join(", ")),
        ("held together by", summary.links.join(", ")),
        (
            "members active in the last hour",
            summary.active_members_1h.to_string(),
        ),
        (
            "pairs active in the same minute (last hour)",
            format!(
                "{} (chance: {:.1})",
                summary.coactive_pairs_1h, summary.expected_coactive_pairs_1h
            ),
        ),
        (
            "requests in 24 h (members listed)",
            fleet.requests_24h.to_string(),
        ),
        ("countries in 7 days", fleet.countries.join(", ")),
        ("members listed", fleet.members.len().to_string()),
    ];
    layout(
        &format!("Fleet {}", summary.fleet_id),
        Some(session),
        html! {
            table.kv #fleet-summary {
                tbody { @for (k, v) in rows { tr { th { (k) } td { (v) } } } }
            }
            p { a #fleet-queue href=(queue_link) { "This fleet's decisions in the review queue" } }
            section {
                h2 { "Members" }
                table #fleet-members {
                    thead { tr { th { "Account" } th { "Requests in 24 h" } th { "Countries in 7 days" } } }
                    tbody {
                        @for m in &fleet.members {
                            tr {
                                td { a href=(format!("/accounts/{}", url_encode(&m.account_id))) { (m.account_id) } }
                                td { (m.requests_24h) }
                                td { (m.countries_7d.join(", ")) }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Shared values" }
                @if fleet.links.is_empty() { p.empty { "None listed." } }
                @else {
                    table #fleet-links {
                        thead { tr { th { "Kind" } th { "Value" } th { "Accounts" } } }
                        tbody { @for l in &fleet.links { tr { td { (l.kind) } td { code { (l.value) } } td { (l.accounts) } } } }
                    }
                }
            }
            section #fleet-overrides {
                h2 { "Overrides" }
                @if refs.is_empty() { p.empty { "None." } } @else { (override_table(session, &refs, now, &back)) }
                (override_form(session, "fleet", &summary.fleet_id, &back))
            }
        },
    )
}

pub fn overrides(session: &Session, list: &[OverrideRecord], all: bool, now: i64) -> Markup {
    let refs: Vec<&OverrideRecord> = list.iter().collect();
    let back = if all {
        "/overrides?show=all"
    } else {
        "/overrides"
    };
    layout(
        "Overrides",
        Some(session),
        html! {
            p {
                @if all { a href="/overrides" { "Active only" } " · all" } @else { "Active · " a href="/overrides?show=all" { "all, removed and expired too" } }
            }
            @if refs.is_empty() { p.empty { "No overrides." } } @else { (override_table(session, &refs, now, back)) }
            h2 { "New override" }
            (override_form(session, "account", "", back))
        },
    )
}

/// The replay form's fields, as `Replay` takes them (`since`: `30d`, `24h`, Unix ms).
#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct ReplayInput {
    pub policy_toml: String,
    pub since: String,
    pub max_samples: String,
}

fn replay_form(session: &Session, input: &ReplayInput) -> Markup {
    html! {
        form.card #replay-form method="post" action="/replay" {
            (csrf(session))
            label for="policy_toml" { "Candidate policy (TOML): paste it, or choose a file" }
            input #policy-file type="file" accept=".toml,text/plain";
            textarea #policy_toml name="policy_toml" rows="14" required { (input.policy_toml) }
            label { "Decisions since " input type="text" name="since" value=(if input.since.is_empty() { "30d" } else { input.since.as_str() }) size="8"; }
            label { "Samples per transition " input type="number" name="max_samples" min="0" max="100" value=(if input.max_samples.is_empty() { "5" } else { input.max_samples.as_str() }); }
            button type="submit" { "Replay" }
        }
    }
}

pub fn replay_error(session: &Session, input: &ReplayInput, problem: &str) -> Markup {
    layout(
        "Replay",
        Some(session),
        html! {
            p.error #error { (problem) }
            (replay_form(session, input))
        },
    )
}

fn counts(id: &str, title: &str, rows: &[pb::Count]) -> Markup {
    html! {
        section id=(id) {
            h3 { (title) }
            @if rows.is_empty() { p.empty { "None." } }
            @else {
                table {
                    tbody { @for c in rows { tr { td { code { (c.key) } } td.num { (c.count) } } } }
                }
            }
        }
    }
}

pub fn replay(session: &Session, input: &ReplayInput, report: Option<&pb::ReplayReport>) -> Markup {
    layout(
        "Replay",
        Some(session),
        html! {
            @if let Some(r) = report {
                section #report {
                    p { "Candidate policy " code { (r.candidate_policy_version) } ": "
                        strong #replayed { (r.replayed) } " decisions replayed, "
                        strong #changed { (r.changed) } " would change." }
                    h2 { "Transitions (from → to)" }
                    table #transitions {
                        thead { tr { th { "from \\ to" } @for to in VERDICTS { th.num { (to) } } } }
                        tbody {
                            @for from in VERDICTS {
                                tr {
                                    th { (from) }
                                    @for to in VERDICTS {
                                        @let t = r.transitions.iter().find(|t| t.from == from && t.to == to);
                                        td.num class=[(from != to && t.is_some()).then_some("changed")] {
                                            @match t {
                                                Some(t) if from != to => { a href=(format!("#samples-{from}-{to}")) { (t.count) } }
                                                Some(t) => { (t.count) }
                                                None => { "0" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    @for t in r.transitions.iter().filter(|t| t.from != t.to) {
                        div.samples id=(format!("samples-{}-{}", t.from, t.to)) {
                            h3 { (t.from) " → " (t.to) ": " (t.count) }
                            ul { @for id in &t.sample_decision_ids { li { a href=(format!("/decisions/{}", url_encode(id))) { (id) } } } }
                        }
                    }
                    div.columns {
                        (counts("reasons-added", "Reasons added", &r.reasons_added))
                        (counts("reasons-removed", "Reasons removed", &r.reasons_removed))
                        (counts("changed-by-country", "Changed, by country", &r.changed_by_country))
                    }
                }
            }
            (replay_form(session, input))
        },
    )
}

pub fn audit(
    session: &Session,
    ok: bool,
    lines: &[String],
    head: &str,
    age: std::time::Duration,
) -> Markup {
    layout(
        "Audit log",
        Some(session),
        html! {
            p class=(if ok { "verify ok" } else { "verify broken" }) #verify { (if ok { "The chain holds." } else { "The chain does NOT hold." }) }
            pre #verify-output { @for line in lines { (line) "\n" } }
            p.hint { "Walked " (span(age.as_millis() as i64)) " ago (a walk is reused for 30 s)." }
            p { "Head (keep it outside the store; " code { "regionguard audit verify --expect-head" } " takes it):" }
            input #head type="text" readonly value=(head) size="80";
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_are_civil() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_796_195_109_000), "2026-12-02 07:05:09Z");
    }

    #[test]
    fn encoding_keeps_only_unreserved_characters() {
        assert_eq!(url_encode("a b/<c>&d~"), "a%20b%2F%3Cc%3E%26d~");
        assert_eq!(url_encode("é"), "%C3%A9");
    }

    #[test]
    fn spans_are_rough() {
        assert_eq!(span(30_000), "under a minute");
        assert_eq!(span(125 * 60_000), "2 h 5 min");
        assert_eq!(span(50 * 3_600_000), "2 d 2 h");
    }
}
