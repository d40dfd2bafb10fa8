//! The review console end to end in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by scripts/test) driven over WebDriver against a real server on
//! loopback. A reviewer signs in, finds a REVIEW decision in the queue, opens it, sets an
//! override through the form (the next Classify carries OVERRIDE_ALLOW), resolves it (it leaves
//! the open queue), sees the dashboard's charts; a cross-origin post changes nothing.
//!
//! The screenshots in docs/screenshots/ are made here: `REGIONGUARD_UPDATE_SCREENSHOTS=1`
//! writes them there; otherwise they go to target/console-screenshots/.

mod support;
#[path = "support/webdriver.rs"]
mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use regionguard::auth::{CallerConfig, Role, token_sha256};
use regionguard::grpc::pb;
use support::{TestServer, codes, scenarios, verdict};
use webdriver::{Driver, Session};

const ALICE: &str = "alice-console-token";
const WAIT: Duration = Duration::from_secs(10);

fn screenshot(session: &Session, name: &str) {
    let png = session.screenshot_png().expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    let dir = if std::env::var_os("REGIONGUARD_UPDATE_SCREENSHOTS").is_some() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots")
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Waits until `css` is on the page with `needle` in its text (a click's navigation may not
/// have replaced the page yet when this starts).
fn wait_text(session: &Session, css: &str, needle: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = session.find(css).and_then(|el| session.text(&el));
        match text {
            Ok(text) if text.contains(needle) => return,
            other if std::time::Instant::now() > deadline => {
                panic!("{css} never said {needle:?}: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn account(ip: &str, id: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        ip: ip.into(),
        account: Some(pb::Account {
            account_id: id.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn chromedriver_present() -> bool {
    let driver = std::env::var(webdriver::CHROMEDRIVER_ENV).unwrap_or("chromedriver".into());
    std::process::Command::new(driver)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A server with the console on and alice as its reviewer (chromedriver checked first).
async fn console_server(scenario: &support::Scenario) -> TestServer {
    assert!(
        chromedriver_present(),
        "chromedriver is not installed: scripts/test (the README's test command) installs chromium and chromium-driver"
    );
    TestServer::start_with(scenario, |config| {
        config.auth.callers = vec![CallerConfig {
            name: "alice@compliance".into(),
            role: Role::Reviewer,
            token_sha256: token_sha256(ALICE),
            client_cert_sha256: Vec::new(),
        }];
        config.console.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_works_the_queue_in_a_real_browser() {
    let scenario = &scenarios()[0];
    let server = console_server(scenario).await;
    let tor = server
        .classify(account(scenario.ips.tor, "acct-tor"))
        .await
        .unwrap();
    assert_eq!(verdict(&tor), pb::Verdict::Review);
    for (ip, id) in [
        (scenario.ips.allowed, "acct-a"),
        (scenario.ips.allowed, "acct-b"),
        (scenario.ips.sanctioned, "acct-c"),
        (scenario.ips.vpn, "acct-d"),
    ] {
        server.classify(account(ip, id)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let base = format!("http://{}", server.console_addr.unwrap());
    let data_dir = server.data_dir();
    let client = server.client.clone();
    let runtime = tokio::runtime::Handle::current();
    let tor_ip = scenario.ips.tor.to_owned();
    let decision_id = tor.decision_id.clone();
    tokio::task::spawn_blocking(move || {
        let driver = Driver::start().expect("chromedriver starts");
        let s = driver.session().expect("a Chromium session");

        // Signed out, any page leads to sign-in, and back to the page asked for.
        s.goto(&format!("{base}/queue")).unwrap();
        assert!(s.current_url().unwrap().contains("/login?next=%2Fqueue"));
        s.send_keys(&s.find("input[name=token]").unwrap(), ALICE)
            .unwrap();
        s.click(&s.find("form.card button[type=submit]").unwrap())
            .unwrap();
        let row = s
            .wait_for("#queue a.decision", WAIT)
            .expect("the queue lists the REVIEW decision");
        assert!(s.source().unwrap().contains("alice@compliance"));
        assert!(
            s.text(&s.find("#queue").unwrap())
                .unwrap()
                .contains("acct-tor")
        );
        screenshot(&s, "queue");

        // The decision, in one screen.
        s.click(&row).unwrap();
        s.wait_for("#reasons", WAIT).unwrap();
        assert!(
            s.current_url()
                .unwrap()
                .ends_with(&format!("/decisions/{decision_id}"))
        );
        let reasons = s.text(&s.find("#reasons").unwrap()).unwrap();
        assert!(reasons.contains("ANONYMIZER_TOR"), "{reasons}");
        assert!(
            s.text(&s.find("#queue-state").unwrap())
                .unwrap()
                .contains("Open")
        );
        screenshot(&s, "decision");

        // An override through the form; the next Classify carries it.
        let form = s.find("#override-form").unwrap();
        s.select(&s.find_in(&form, "select[name=action]").unwrap(), "ALLOW")
            .unwrap();
        s.send_keys(
            &s.find_in(&form, "input[name=reason]").unwrap(),
            "known researcher on Tor",
        )
        .unwrap();
        s.click(&s.find_in(&form, "button[type=submit]").unwrap())
            .unwrap();
        wait_text(&s, "p.flash", "account acct-tor → ALLOW");
        let again = runtime
            .block_on(client.clone().classify(account(&tor_ip, "acct-tor")))
            .unwrap()
            .into_inner();
        assert!(
            codes(&again).contains(&"OVERRIDE_ALLOW"),
            "{:?}",
            codes(&again)
        );
        assert_eq!(verdict(&again), pb::Verdict::Allow);

        // Resolve: it leaves the open queue.
        let form = s.find("#resolve-form").unwrap();
        s.send_keys(&s.find_in(&form, "input[name=outcome]").unwrap(), "cleared")
            .unwrap();
        s.send_keys(
            &s.find_in(&form, "input[name=note]").unwrap(),
            "override set",
        )
        .unwrap();
        s.click(&s.find_in(&form, "button[type=submit]").unwrap())
            .unwrap();
        // The page before had a flash too: wait for the new page's words, not any flash.
        wait_text(
            &s,
            "#queue-state",
            "Resolved as cleared by alice@compliance",
        );
        s.goto(&format!("{base}/queue")).unwrap();
        s.wait_for("#queue-empty", WAIT).expect("nothing left open");

        // The dashboard's charts.
        s.goto(&format!("{base}/?range=24h")).unwrap();
        s.wait_for("#verdicts-chart", WAIT).unwrap();
        let bars = s.find_all("#verdicts-chart rect").unwrap();
        assert!(!bars.is_empty(), "the verdicts chart has bars");
        assert!(!s.find_all("#reasons-chart rect").unwrap().is_empty());
        assert!(
            s.text(&s.find("#countries").unwrap())
                .unwrap()
                .contains("REVIEW")
        );
        screenshot(&s, "dashboard");

        // A page elsewhere posting to the console: refused, nothing changes.
        let before = overrides(&data_dir);
        let forged = format!(
            r#"<form id="f" method="post" action="{base}/overrides">
               <input name="scope" value="account"><input name="value" value="victim">
               <input name="action" value="ALLOW"><input name="reason" value="forged"></form>
               <script>document.getElementById("f").submit()</script>"#
        );
        s.goto(&webdriver::data_url(&forged)).unwrap();
        s.wait_for("#error", WAIT).expect("the console's refusal");
        let refusal = s.text(&s.find("#error").unwrap()).unwrap();
        assert!(
            refusal.contains("cross-origin request refused"),
            "{refusal}"
        );
        assert_eq!(
            overrides(&data_dir),
            before,
            "a cross-origin post changed the overrides"
        );
        assert_eq!(before, 1);

        // Sign-out ends the session.
        s.goto(&format!("{base}/")).unwrap();
        s.click(&s.find("form.signout button").unwrap()).unwrap();
        s.wait_for("input[name=token]", WAIT).unwrap();
        s.goto(&format!("{base}/overrides")).unwrap();
        assert!(s.current_url().unwrap().contains("/login"));
    })
    .await
    .unwrap();
    server.shutdown().await;
}

/// #14: a fleet, whole, in the browser: the queue searched by fleet, the decision's fleet link,
/// the fleet page's members and shared values, and a DENY override on the whole fleet through
/// its form that the next Classify of another member carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_sees_a_fleet_whole_and_denies_it_in_a_real_browser() {
    let scenario = &scenarios()[0];
    let server = console_server(scenario).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // fl-a and fl-b share a card, fl-b and fl-c a device.
    let event = |account: &str, card: &str, device: &str| pb::UsageEvent {
        account_id: account.into(),
        ip: scenario.ips.allowed.into(),
        timestamp_unix_ms: now - 1000,
        request_count: 1,
        payment_fingerprint: card.into(),
        device_id: device.into(),
        ..Default::default()
    };
    let events = vec![
        event("fl-a", "card-7", ""),
        event("fl-b", "card-7", "phone-7"),
        event("fl-c", "", "phone-7"),
    ];
    pb::usage_client::UsageClient::new(server.channel.clone())
        .report(tokio_stream::iter(events))
        .await
        .unwrap();
    let queued = server
        .classify(account(scenario.ips.tor, "fl-b"))
        .await
        .unwrap();
    assert_eq!(verdict(&queued), pb::Verdict::Review);
    let fleet_id = queued.usage.clone().unwrap().fleet.unwrap().fleet_id;
    server
        .classify(account(scenario.ips.tor, "not-in-it"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let base = format!("http://{}", server.console_addr.unwrap());
    let client = server.client.clone();
    let runtime = tokio::runtime::Handle::current();
    let allowed_ip = scenario.ips.allowed.to_owned();
    tokio::task::spawn_blocking(move || {
        let driver = Driver::start().expect("chromedriver starts");
        let s = driver.session().expect("a Chromium session");
        s.goto(&format!("{base}/queue")).unwrap();
        s.send_keys(&s.find("input[name=token]").unwrap(), ALICE)
            .unwrap();
        s.click(&s.find("form.card button[type=submit]").unwrap())
            .unwrap();
        s.wait_for("#queue a.decision", WAIT).unwrap();

        // The queue searched by fleet lists the member's decision only.
        let filters = s.find("form.filters").unwrap();
        s.send_keys(
            &s.find_in(&filters, "input[name=fleet]").unwrap(),
            &fleet_id,
        )
        .unwrap();
        s.click(&s.find_in(&filters, "button[type=submit]").unwrap())
            .unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while !s.current_url().unwrap().contains("fleet=fl_") {
            assert!(
                std::time::Instant::now() < deadline,
                "the filter was not applied"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let row = s.wait_for("#queue a.decision", WAIT).unwrap();
        let listed = s.text(&s.find("#queue").unwrap()).unwrap();
        assert!(
            listed.contains("fl-b") && !listed.contains("not-in-it"),
            "{listed}"
        );

        // The decision links to its fleet; the fleet page shows it whole.
        s.click(&row).unwrap();
        let link = s.wait_for("#fleet-link", WAIT).unwrap();
        s.click(&link).unwrap();
        s.wait_for("#fleet-members", WAIT).unwrap();
        assert!(
            s.current_url()
                .unwrap()
                .ends_with(&format!("/fleets/{fleet_id}"))
        );
        let members = s.text(&s.find("#fleet-members").unwrap()).unwrap();
        for member in ["fl-a", "fl-b", "fl-c"] {
            assert!(members.contains(member), "{members}");
        }
        let links = s.text(&s.find("#fleet-links").unwrap()).unwrap();
        assert!(
            links.contains("card-7") && links.contains("phone-7"),
            "{links}"
        );
        let summary = s.text(&s.find("#fleet-summary").unwrap()).unwrap();
        assert!(
            summary.contains("DEVICE") && summary.contains("PAYMENT_FINGERPRINT"),
            "{summary}"
        );
        screenshot(&s, "fleet");

        // Deny the whole fleet from its page: another member is denied next time.
        let form = s.find("#override-form").unwrap();
        s.select(&s.find_in(&form, "select[name=action]").unwrap(), "DENY")
            .unwrap();
        s.send_keys(
            &s.find_in(&form, "input[name=reason]").unwrap(),
            "one operator behind these accounts",
        )
        .unwrap();
        s.click(&s.find_in(&form, "button[type=submit]").unwrap())
            .unwrap();
        wait_text(&s, "p.flash", &format!("fleet {fleet_id} → DENY"));
        let overrides = s.text(&s.find("#fleet-overrides").unwrap()).unwrap();
        assert!(overrides.contains("alice@compliance"), "{overrides}");
        let member = runtime
            .block_on(client.clone().classify(account(&allowed_ip, "fl-c")))
            .unwrap()
            .into_inner();
        assert_eq!(verdict(&member), pb::Verdict::Deny, "{:?}", codes(&member));
        assert!(codes(&member).contains(&"OVERRIDE_DENY"));
        let outsider = runtime
            .block_on(client.clone().classify(account(&allowed_ip, "not-in-it")))
            .unwrap()
            .into_inner();
        assert_eq!(verdict(&outsider), pb::Verdict::Allow);

        // A fleet the history does not hold: the console's 404 page, not a stack trace.
        s.goto(&format!("{base}/fleets/fl_0000000000000000"))
            .unwrap();
        s.wait_for("#error", WAIT).unwrap();
        s.goto(&format!("{base}/fleets/not-a-fleet")).unwrap();
        let error = s.wait_for("#error", WAIT).unwrap();
        assert!(s.text(&error).unwrap().contains("fleet_id"));
    })
    .await
    .unwrap();
    server.shutdown().await;
}

fn overrides(data_dir: &std::path::Path) -> usize {
    let conn = regionguard::store::open_for_reading(data_dir).unwrap();
    regionguard::store::overrides(&conn).unwrap().len()
}
