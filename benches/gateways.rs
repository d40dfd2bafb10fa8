//! regionguard behind nginx (#13), against what a user would run instead, in alternating rounds
//! of one run, measured by `wrk` (Debian's) as an independent client:
//! - nginx alone, serving a small file;
//! - nginx + geoip2 (`libnginx-mod-http-geoip2`): plain country blocking from the same mmdb;
//! - nginx + `auth_request` to a location that answers 204 (the auth ceiling: an auth service
//!   that does nothing, behind the same keepalive proxy hop);
//! - nginx + regionguard forward-auth (the shipped policy and country database), store off and
//!   store on (SQLite, ALLOW api_request rows written asynchronously);
//! - nginx + `auth_request` to a second nginx process answering 204: what any auth server in a
//!   process of its own costs on the shared core (the ceiling's 204 is served by the same event
//!   loop, with no process switch).
//!
//! Every variant serves the same file for the same requests: an API call with a client address
//! in `X-Forwarded-For` (taken by nginx's realip module from the trusted load generator) drawn
//! from 65,536 addresses spread over the IPv4 space (each recurs every few seconds, past the
//! 1 s decision cache), an account id among 2,048 and an Accept-Language. nginx (one worker) and the auth servers share core 0; wrk runs on core 1.
//!
//! `cargo bench --bench gateways`. Under `cargo test` it runs a one-second smoke round of each.

#[path = "support/load.rs"]
mod load;

use load::free_port;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

const VARIANTS: [&str; 6] = [
    "nginx alone",
    "nginx + geoip2",
    "nginx + auth_request 204 (ceiling)",
    "nginx + regionguard",
    "nginx + regionguard (store on)",
    "nginx + auth_request 204 from a second nginx process",
];

/// The variants whose auth server is a regionguard (index into the servers).
fn regionguard_of(variant: usize) -> Option<usize> {
    (3..5).contains(&variant).then(|| variant - 3)
}

struct Nginx {
    child: Child,
    /// A second nginx answering 204: an auth server that does nothing, in its own process.
    other: Child,
    ports: [u16; 6],
}

impl Drop for Nginx {
    /// TERM first: nginx's master stops its workers on TERM, while KILL would leave them
    /// running (and listening) as orphans.
    fn drop(&mut self) {
        for child in [&mut self.child, &mut self.other] {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            for _ in 0..300 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn program(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed (scripts/test installs it)"))
}

/// One nginx with a server per variant; `auth` are the two regionguard forward-auth ports.
fn nginx(dir: &Path, auth: [u16; 2]) -> Nginx {
    let ports = [
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    ];
    let (ceiling, other_port) = (free_port(), free_port());
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("ok.json"), "{\"ok\":true}\n").unwrap();
    let module = Path::new("/usr/lib/nginx/modules/ngx_http_geoip2_module.so");
    assert!(
        module.is_file(),
        "libnginx-mod-http-geoip2 is not installed (scripts/test installs it)"
    );
    let db = std::fs::canonicalize("data/geo-whois-asn-country.mmdb").unwrap();
    let auth_location = |upstream: &str| {
        format!(
            "location = /.auth {{ internal; proxy_pass http://{upstream}/check; proxy_http_version 1.1;
               proxy_set_header Connection \"\"; proxy_pass_request_body off; proxy_set_header Content-Length \"\";
               proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
               proxy_set_header X-Original-URI $request_uri; proxy_set_header X-Original-Method $request_method; }}"
        )
    };
    let common = format!(
        "set_real_ip_from 127.0.0.1; real_ip_header X-Forwarded-For; root {};",
        root.display()
    );
    let conf = format!(
        "load_module {module};
worker_processes 1;
daemon off;
pid {pid};
error_log {log} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  geoip2 {db} {{ $geo_country country_code; }}
  map $geo_country $geo_blocked {{ default 0; CU 1; IR 1; KP 1; SY 1; RU 1; BY 1; CN 1; }}
  upstream ceiling {{ server 127.0.0.1:{ceiling}; keepalive 64; }}
  upstream regionguard {{ server 127.0.0.1:{auth0}; keepalive 64; }}
  upstream regionguard_store {{ server 127.0.0.1:{auth1}; keepalive 64; }}
  upstream other {{ server 127.0.0.1:{other_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{ceiling}; location / {{ return 204; }} }}
  server {{ listen 127.0.0.1:{p0}; {common} location / {{ try_files /ok.json =404; }} }}
  server {{ listen 127.0.0.1:{p1}; {common} location / {{ if ($geo_blocked) {{ return 403; }} try_files /ok.json =404; }} }}
  server {{ listen 127.0.0.1:{p2}; {common} location / {{ auth_request /.auth; try_files /ok.json =404; }} {a_ceiling} }}
  server {{ listen 127.0.0.1:{p3}; {common} location / {{ auth_request /.auth; try_files /ok.json =404; }} {a_rg} }}
  server {{ listen 127.0.0.1:{p4}; {common} location / {{ auth_request /.auth; try_files /ok.json =404; }} {a_rg_store} }}
  server {{ listen 127.0.0.1:{p5}; {common} location / {{ auth_request /.auth; try_files /ok.json =404; }} {a_other} }}
}}
",
        module = module.display(),
        pid = dir.join("nginx.pid").display(),
        log = dir.join("nginx-error.log").display(),
        db = db.display(),
        auth0 = auth[0],
        auth1 = auth[1],
        p0 = ports[0],
        p1 = ports[1],
        p2 = ports[2],
        p3 = ports[3],
        p4 = ports[4],
        p5 = ports[5],
        a_other = auth_location("other"),
        a_ceiling = auth_location("ceiling"),
        a_rg = auth_location("regionguard"),
        a_rg_store = auth_location("regionguard_store"),
    );
    let start = |name: &str, conf: &str, prefix: &Path| {
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        let file = prefix.join(name);
        std::fs::write(&file, conf).unwrap();
        load::pinned("0", program("nginx").to_str().unwrap())
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    let child = start("nginx.conf", &conf, dir);
    let other_dir = dir.join("other");
    let other = start(
        "other.conf",
        &format!(
            "worker_processes 1;\ndaemon off;\npid {};\nerror_log {} warn;\nevents {{ worker_connections 4096; }}\nhttp {{ access_log off; server {{ listen 127.0.0.1:{other_port}; location / {{ return 204; }} }} }}\n",
            other_dir.join("nginx.pid").display(),
            other_dir.join("error.log").display()
        ),
        &other_dir,
    );
    for port in ports.iter().copied().chain([other_port]) {
        for attempt in 0.. {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(attempt < 400, "nginx did not listen on {port}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    Nginx {
        child,
        other,
        ports,
    }
}

/// The requests wrk sends, built once (wrk's LuaJIT): addresses spread over IPv4 by a fixed
/// LCG, account ids, a browser's Accept-Language.
const SCRIPT: &str = r#"
local requests = {}
-- Built in init, once wrk has set the Host header.
init = function(args)
local x = 12345
for k = 1, 65536 do
  x = (x * 1103515245 + 12345) % 2147483648
  local a = 1 + x % 223
  local ip = a .. "." .. (math.floor(x / 256) % 256) .. "." .. (math.floor(x / 65536) % 256) .. "." .. (1 + k % 254)
  requests[k] = wrk.format("GET", "/v1/chat/completions", {
    ["X-Forwarded-For"] = ip,
    ["X-Account-Id"] = "acct-" .. (k % 2048),
    ["Accept-Language"] = "en-US,en;q=0.9",
  })
end
end
local i = 0
request = function()
  i = i % 65536 + 1
  return requests[i]
end
"#;

/// One wrk round: requests/s, p50 and p99 in µs, requests, denials (403), socket errors.
struct Round {
    errors: Option<String>,
    denied: f64,
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    requests: f64,
}

fn wrk(port: u16, seconds: u64, script: &Path) -> Round {
    let out = load::pinned("1", program("wrk").to_str().unwrap())
        .args(["-t1", "-c64", &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk: {text}");
    let value = |prefix: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::trim))
    };
    let duration_us = |v: &str| -> f64 {
        let (n, scale) = if let Some(n) = v.strip_suffix("us") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1000.0)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1e6)
        } else {
            (v, 1.0)
        };
        n.parse::<f64>().unwrap_or(f64::NAN) * scale
    };
    let requests = text
        .lines()
        .find_map(|l| {
            l.split_once(" requests in ")
                .map(|(n, _)| n.trim().to_owned())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    assert!(requests > 0.0, "wrk sent nothing: {text}");
    let errors = value("Socket errors:").map(str::to_owned);
    Round {
        errors,
        denied: value("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        rate: value("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_us: value("50%").map_or(f64::NAN, duration_us),
        p99_us: value("99%").map_or(f64::NAN, duration_us),
        requests,
    }
}

/// The status of one request from `client` through the gateway on `port`.
fn status(port: u16, client: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {client}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {text}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let benching = load::pin_load_generator();
    let (rounds, seconds) = if benching { (5, 4) } else { (1, 1) };
    let dir = tempfile::tempdir().unwrap();
    let auth = [free_port(), free_port()];
    let forward_auth = |port: u16| format!("[forward_auth]\nlisten = \"127.0.0.1:{port}\"\n");
    let plain = load::start(dir.path(), "regionguard", &forward_auth(auth[0])).await;
    let stored = load::start(
        dir.path(),
        "regionguard-store",
        &format!(
            "{}[store]\ndata_dir = \"{}\"\n",
            forward_auth(auth[1]),
            dir.path().join("store").display()
        ),
    )
    .await;
    let nginx = nginx(dir.path(), auth);
    let script = dir.path().join("requests.lua");
    std::fs::write(&script, SCRIPT).unwrap();
    if !benching {
        println!("(smoke run under cargo test: debug build, one-second rounds; not measurements)");
    }
    // Each variant answers as it should before it is measured.
    for (v, port) in nginx.ports.iter().enumerate() {
        let (se, cn) = (
            status(*port, "89.160.20.115"),
            status(*port, "175.16.199.10"),
        );
        assert_eq!(se, 200, "{}: SE", VARIANTS[v]);
        let expected = if matches!(v, 0 | 2 | 5) { 200 } else { 403 };
        assert_eq!(cn, expected, "{}: CN", VARIANTS[v]);
    }
    // Warm-up: caches, connections, the store's first pages.
    for port in nginx.ports {
        wrk(port, 1, &script);
    }
    let servers = [&plain, &stored];
    let mut results: Vec<Vec<Round>> = (0..VARIANTS.len()).map(|_| Vec::new()).collect();
    let mut cpu_us: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (v, port) in nginx.ports.iter().enumerate() {
            let server = regionguard_of(v).map(|i| (i, servers[i]));
            let before = server.map(|(_, s)| load::cpu_seconds(s.child.id()));
            let round = wrk(*port, seconds, &script);
            if let (Some((i, server)), Some(before)) = (server, before) {
                let spent = load::cpu_seconds(server.child.id()) - before;
                cpu_us[i].push(spent * 1e6 / round.requests.max(1.0));
            }
            if let Some(errors) = &round.errors {
                println!("{}: socket errors: {errors}", VARIANTS[v]);
            }
            results[v].push(round);
        }
    }
    let median = |v: usize, f: fn(&Round) -> f64| load::median(results[v].iter().map(f).collect());
    let ceiling = (median(2, |r| r.rate), median(2, |r| r.p99_us));
    println!(
        "| gateway (wrk, 64 connections, {rounds} rounds of {seconds}s, medians) | requests/s | p50 µs | p99 µs | vs ceiling: rate | vs ceiling: p99 | regionguard CPU µs/request |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (v, name) in VARIANTS.iter().enumerate() {
        let (rate, p50, p99) = (
            median(v, |r| r.rate),
            median(v, |r| r.p50_us),
            median(v, |r| r.p99_us),
        );
        let cpu = regionguard_of(v).map_or_else(
            || "–".to_owned(),
            |i| format!("{:.1}", load::median(cpu_us[i].clone())),
        );
        println!(
            "| {name} | {rate:.0} | {p50:.0} | {p99:.0} | {:.2} | {:.2} | {cpu} |",
            rate / ceiling.0,
            p99 / ceiling.1
        );
    }
    println!(
        "denied share: geoip2 {:.3}, regionguard {:.3}",
        median(1, |r| r.denied / r.requests.max(1.0)),
        median(3, |r| r.denied / r.requests.max(1.0))
    );
    println!(
        "gateway: regionguard {:.2}x the auth_request ceiling's rate (target >= 0.8), p99 {:.2}x (target <= 1.3)",
        median(3, |r| r.rate) / ceiling.0,
        median(3, |r| r.p99_us) / ceiling.1
    );
    println!(
        "gateway: an auth server that does nothing in its own process: {:.2}x the ceiling's rate, p99 {:.2}x; regionguard / it: {:.2}x",
        median(5, |r| r.rate) / ceiling.0,
        median(5, |r| r.p99_us) / ceiling.1,
        median(3, |r| r.rate) / median(5, |r| r.rate)
    );
}
