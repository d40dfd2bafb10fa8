//! A throwaway PostgreSQL server for tests: `initdb` into a temporary directory, `pg_ctl` on a
//! free loopback port with trust authentication, one database (`regionguard`). Tests stop and
//! start it (an outage) through `stop()` / `start()`; it stops itself when dropped.
//!
//! initdb refuses to run as root: as root, the binaries run as the `postgres` user
//! (`runuser -u postgres --`) in a directory it owns. The binaries are looked up on `PATH` and
//! in the usual Debian place; when they are missing the test fails saying so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
    running: bool,
}

const DATABASE: &str = "regionguard";

fn find_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut candidates: Vec<PathBuf> = on_path;
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: \
                 install the `postgresql` package to run the PostgreSQL store tests"
            )
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PgServer {
    /// Initialises a cluster, starts it and creates the database.
    pub async fn start_new() -> Self {
        let bin = find_bin();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("regionguard-pg")
            .tempdir()
            .unwrap();
        if as_postgres {
            let chown = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(chown.success(), "chown postgres {}", dir.path().display());
        }
        let mut server = Self {
            bin,
            dir,
            port: super::free_port(),
            as_postgres,
            running: false,
        };
        let data = server.data();
        let out = server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", text(&out));
        server.start();
        let client = server.connect("postgres").await;
        client
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await
            .unwrap();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let path = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", path.display()))
    }

    /// The URL of the test database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server (again), on the same port, waiting until it accepts connections.
    pub fn start(&mut self) {
        let log = self.dir.path().join("server.log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let data = self.data();
        let out = self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "30", "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            text(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.running = true;
    }

    /// Stops the server (fast shutdown: connections are closed at once).
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    fn stop_mode(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let data = self.data();
        let out = self.run("pg_ctl", &["-D", &data, "-m", mode, "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop failed: {}", text(&out));
        self.running = false;
    }

    /// A client on `database`, its connection driven in the background.
    pub async fn connect(&self, database: &str) -> tokio_postgres::Client {
        let url = format!("postgres://postgres@127.0.0.1:{}/{database}", self.port);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        tokio::spawn(connection);
        client
    }

    /// A client on the test database.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.connect(DATABASE).await
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
