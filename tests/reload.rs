//! Hot reload while requests flow: replacing the policy or a database by atomic rename takes
//! effect without a restart and without one failed request; an invalid replacement is refused
//! and the loaded copy keeps serving.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use regionguard::grpc::pb::{Verdict, classifier_client::ClassifierClient};
use support::{TestServer, fixtures, replace_file, request, scenarios, verdict};
use tonic::transport::Channel;

/// Classifies `ip` from `workers` tasks until stopped; counts answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(client: ClassifierClient<Channel>, ips: &[&'static str], workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..workers)
            .map(|i| {
                let (mut client, stop, ok, failed) =
                    (client.clone(), stop.clone(), ok.clone(), failed.clone());
                let ip = ips[i % ips.len()];
                tokio::spawn(async move {
                    // Bounded: at most 200k calls per worker even if never stopped.
                    for _ in 0..200_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match client.classify(request(ip)).await {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Waits until at least `n` more requests have been answered, so a reload lands mid-flow.
    async fn answered(&self, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        while self.ok.load(Ordering::Relaxed) < target {
            assert_eq!(self.failed.load(Ordering::Relaxed), 0);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Polls until `ip` gets `want`, for at most five seconds.
async fn eventually(server: &TestServer, ip: &str, want: Verdict) {
    for _ in 0..250 {
        if verdict(&server.classify_ip(ip).await) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{ip} never became {want:?}");
}

/// Gives the reloader several polls to (wrongly) act, then checks `ip` still gets `want`.
async fn still(server: &TestServer, ip: &str, want: Verdict) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(verdict(&server.classify_ip(ip).await), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reload_under_load_fails_no_request() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let cn = scenario.ips.unsupported;
    assert_eq!(verdict(&server.classify_ip(cn).await), Verdict::Deny);
    let version_before = server.classify_ip(cn).await.policy_version;
    let load = Load::start(
        server.client.clone(),
        &[cn, scenario.ips.allowed, scenario.ips.sanctioned],
        8,
    );

    let without_cn = scenario.policy.replacen("  \"CN\",", "", 1);
    assert_ne!(without_cn, scenario.policy);
    load.answered(500).await;
    replace_file(&server.policy_path, without_cn.as_bytes());
    eventually(&server, cn, Verdict::Allow).await;
    assert_ne!(server.classify_ip(cn).await.policy_version, version_before);

    replace_file(&server.policy_path, b"[policy]\nname = \"broken\"\n");
    still(&server, cn, Verdict::Allow).await;
    replace_file(&server.policy_path, scenario.policy.as_bytes());
    eventually(&server, cn, Verdict::Deny).await;
    load.answered(500).await;

    let (ok, failed) = load.finish().await;
    support::record(format_args!(
        "policy reload under load: {ok} requests answered, {failed} failed"
    ));
    assert!(ok > 0);
    assert_eq!(failed, 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_reload_under_load_fails_no_request() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let us = scenario.ips.allowed;
    let load = Load::start(
        server.client.clone(),
        &[us, scenario.ips.unsupported, scenario.ips.vpn],
        8,
    );

    // The moved world places the allowed address in Iran.
    load.answered(500).await;
    replace_file(&server.location_path, &fixtures::city_db_moved());
    eventually(&server, us, Verdict::Deny).await;

    let mut corrupt = fixtures::city_db();
    corrupt.truncate(corrupt.len() / 3);
    replace_file(&server.location_path, &corrupt);
    still(&server, us, Verdict::Deny).await;
    replace_file(&server.location_path, fixtures::asn_db().as_slice());
    still(&server, us, Verdict::Deny).await;

    replace_file(&server.location_path, &fixtures::city_db());
    eventually(&server, us, Verdict::Allow).await;
    load.answered(500).await;

    let (ok, failed) = load.finish().await;
    support::record(format_args!(
        "database reload under load: {ok} requests answered, {failed} failed"
    ));
    assert!(ok > 0);
    assert_eq!(failed, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_missing_file_keeps_the_loaded_copy_until_it_returns() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    std::fs::remove_file(&server.policy_path).unwrap();
    std::fs::remove_file(&server.location_path).unwrap();
    still(&server, scenario.ips.sanctioned, Verdict::Deny).await;
    still(&server, scenario.ips.unsupported, Verdict::Deny).await;
    // The policy comes back without CN: the reloader noticed the gap and takes the new file.
    std::fs::write(
        &server.policy_path,
        scenario.policy.replacen("  \"CN\",", "", 1),
    )
    .unwrap();
    eventually(&server, scenario.ips.unsupported, Verdict::Allow).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_in_place_rewrite_is_picked_up() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    // Same inode, new content (no rename): what an editor or `cp` over the file does.
    std::fs::write(
        &server.policy_path,
        scenario.policy.replacen("  \"CN\",", "", 1),
    )
    .unwrap();
    eventually(&server, scenario.ips.unsupported, Verdict::Allow).await;
    std::fs::write(&server.location_path, fixtures::city_db_moved()).unwrap();
    eventually(&server, scenario.ips.allowed, Verdict::Deny).await;
    server.shutdown().await;
}

#[tokio::test]
async fn maxmind_broken_databases_are_refused_on_reload() {
    let Some(dir) = support::maxmind_dir() else {
        eprintln!(
            "{} not set: broken-database reload checks not run",
            support::MAXMIND_ENV
        );
        return;
    };
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    for name in [
        "GeoIP2-City-Test-Broken-Double-Format.mmdb",
        "GeoIP2-City-Test-Invalid-Node-Count.mmdb",
        "MaxMind-DB-test-broken-pointers-24.mmdb",
        "MaxMind-DB-test-broken-search-tree-24.mmdb",
    ] {
        replace_file(
            &server.location_path,
            &std::fs::read(dir.join(name)).unwrap(),
        );
        still(&server, scenario.ips.sanctioned, Verdict::Deny).await;
        still(&server, scenario.ips.allowed, Verdict::Allow).await;
    }
    server.shutdown().await;
}
