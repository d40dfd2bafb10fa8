//! A replica: the real `regionguard serve` binary in its own process, on its own ports, with the
//! fixture databases and a config of the test's choosing; killed when dropped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use regionguard::grpc::pb::{
    classifier_client::ClassifierClient, review_client::ReviewClient, usage_client::UsageClient,
};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_regionguard");

pub struct Replica {
    pub child: Child,
    pub addr: String,
    pub metrics: String,
    log: PathBuf,
}

impl Replica {
    /// Starts `name` with `config` (TOML, appended after its own `metrics_listen`) and waits
    /// until it serves; panics with its log if it exits first.
    pub async fn start(dir: &Path, name: &str, config: &str) -> Self {
        Self::start_under(dir, name, config, &[], None).await
    }

    /// As `start`, run under `wrapper` (e.g. `["prlimit", "--nofile=1024"]`), with the policy
    /// file `policy` (default: the repository's).
    pub async fn start_under(
        dir: &Path,
        name: &str,
        config: &str,
        wrapper: &[&str],
        policy: Option<&Path>,
    ) -> Self {
        let location = dir.join("city.mmdb");
        let anonymous = dir.join("anonymous.mmdb");
        if !location.exists() {
            std::fs::write(&location, super::fixtures::city_db()).unwrap();
            std::fs::write(&anonymous, super::fixtures::anonymous_db()).unwrap();
        }
        let (port, metrics_port) = (super::free_port(), super::free_port());
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n{config}\n"),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut command = match wrapper {
            [] => Command::new(BIN),
            [program, args @ ..] => {
                let mut command = Command::new(program);
                command.args(args).arg(BIN);
                command
            }
        };
        let child = command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--policy")
            .arg(policy.unwrap_or(Path::new("data/policy.toml")))
            .arg("--location-db")
            .arg(&location)
            .arg("--anonymous-db")
            .arg(&anonymous)
            .env("REGIONGUARD_CONFIG", &file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut replica = Self {
            child,
            addr: format!("http://127.0.0.1:{port}"),
            metrics: format!("127.0.0.1:{metrics_port}"),
            log,
        };
        replica.wait_ready().await;
        replica
    }

    /// Until the server says it is ready (`/readyz`: every port it serves is accepting). The
    /// gRPC port alone was not enough: it is bound first, and a connection to it succeeds while
    /// the forward-auth and console ports are still to be bound (a test on a slow machine was
    /// refused by the forward-auth port after this returned).
    async fn wait_ready(&mut self) {
        for _ in 0..400 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "replica exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if self.ops_status("/readyz") == Some(200)
                && Channel::from_shared(self.addr.clone())
                    .unwrap()
                    .connect()
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("replica at {} did not start", self.addr);
    }

    /// The status of a GET on the ops port, if it answers.
    fn ops_status(&self, path: &str) -> Option<u16> {
        let mut stream = std::net::TcpStream::connect(&self.metrics).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        answer.split(' ').nth(1)?.parse().ok()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn classifier(&self) -> ClassifierClient<Channel> {
        ClassifierClient::new(self.channel().await)
    }

    pub async fn review(&self) -> ReviewClient<Channel> {
        ReviewClient::new(self.channel().await)
    }

    pub async fn usage(&self) -> UsageClient<Channel> {
        UsageClient::new(self.channel().await)
    }

    /// The server's resident memory, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap()
    }

    /// What the replica has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One metric's value from the ops port (its exposition name, `_total` included).
    pub fn metric(&self, name: &str) -> f64 {
        let mut stream = std::net::TcpStream::connect(&self.metrics).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
