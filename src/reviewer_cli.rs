//! `regionguard review …`, `audit verify` and `replay`: the reviewers' command line. `review`
//! talks to a running server's Review API (so it is authorised and audited like any reviewer);
//! `audit verify` and `replay` read a store directory directly, for auditors and for policy
//! authors before a change ships.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use regionguard::grpc::pb::{self, review_client::ReviewClient};
use regionguard::store;
use tonic::transport::Channel;

#[derive(Subcommand)]
pub enum ReviewCommand {
    /// List the review queue.
    Queue {
        #[arg(long, default_value = "open")]
        status: String,
        #[arg(long, default_value = "")]
        country: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Decisions of this fleet's members only (a fleet id, `fl_…`).
        #[arg(long, default_value = "")]
        fleet: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// A fleet: its members, their volume and countries, and the values linking them.
    Fleet { fleet_id: String },
    /// Explain one decision (inputs, reasons, verdict).
    Show { decision_id: String },
    /// An account's decisions and overrides.
    Account { account_id: String },
    /// Grant an override: SCOPE is account, domain, network or fleet; ACTION is ALLOW or DENY.
    Override {
        scope: String,
        value: String,
        action: String,
        #[arg(long)]
        reason: String,
        /// Expiry, in days from now (0: never).
        #[arg(long, default_value_t = 0)]
        days: u32,
    },
    /// Withdraw an override.
    RemoveOverride {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Close a queue item with an outcome.
    Resolve {
        decision_id: String,
        outcome: String,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Export decisions as JSON lines.
    Export {
        /// How far back, e.g. 24h or 30d.
        #[arg(long, default_value = "30d")]
        since: String,
    },
}

/// Parses "24h", "30d" or a Unix time in milliseconds into Unix milliseconds.
pub fn since_ms(text: &str) -> anyhow::Result<i64> {
    store::parse_since(text, store::now_ms()).map_err(|e| anyhow::anyhow!("--since {e}"))
}

fn authorised<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("token is not a valid header value")?,
    );
    Ok(request)
}

fn print<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    Ok(print_line(&serde_json::to_string_pretty(value)?)?)
}

/// Writes a line of output, and says so when it cannot: `println!` panics when the reader has
/// gone (`regionguard review export | head`); the caller ends quietly instead (see `main`).
pub fn print_line(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{line}")
}

pub async fn review(addr: &str, token: &str, command: ReviewCommand) -> anyhow::Result<ExitCode> {
    let channel = Channel::from_shared(addr.to_owned())?
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut client = ReviewClient::new(channel);
    match command {
        ReviewCommand::Queue {
            status,
            country,
            reason,
            fleet,
            limit,
        } => {
            let request = pb::ListQueueRequest {
                status,
                country,
                reason_code: reason,
                fleet_id: fleet,
                page_size: limit,
                ..Default::default()
            };
            print(
                &client
                    .list_queue(authorised(request, token)?)
                    .await?
                    .into_inner(),
            )?;
        }
        ReviewCommand::Fleet { fleet_id } => print(
            &client
                .get_fleet(authorised(pb::GetFleetRequest { fleet_id }, token)?)
                .await?
                .into_inner(),
        )?,
        ReviewCommand::Show { decision_id } => print(
            &client
                .explain(authorised(pb::ExplainRequest { decision_id }, token)?)
                .await?
                .into_inner(),
        )?,
        ReviewCommand::Account { account_id } => print(
            &client
                .get_account(authorised(
                    pb::GetAccountRequest {
                        account_id,
                        limit: 100,
                    },
                    token,
                )?)
                .await?
                .into_inner(),
        )?,
        ReviewCommand::Override {
            scope,
            value,
            action,
            reason,
            days,
        } => {
            let expires = if days == 0 {
                0
            } else {
                store::now_ms() + i64::from(days) * 86_400_000
            };
            let request = pb::SetOverrideRequest {
                scope,
                value,
                action,
                reason,
                expires_at_unix_ms: expires,
            };
            print(
                &client
                    .set_override(authorised(request, token)?)
                    .await?
                    .into_inner(),
            )?;
        }
        ReviewCommand::RemoveOverride { id, reason } => print(
            &client
                .remove_override(authorised(pb::RemoveOverrideRequest { id, reason }, token)?)
                .await?
                .into_inner(),
        )?,
        ReviewCommand::Resolve {
            decision_id,
            outcome,
            note,
        } => print(
            &client
                .resolve(authorised(
                    pb::ResolveRequest {
                        decision_id,
                        outcome,
                        note,
                    },
                    token,
                )?)
                .await?
                .into_inner(),
        )?,
        ReviewCommand::Export { since } => {
            let request = pb::ExportDecisionsRequest {
                since_unix_ms: since_ms(&since)?,
                until_unix_ms: 0,
            };
            let mut stream = client
                .export_decisions(authorised(request, token)?)
                .await?
                .into_inner();
            while let Some(record) = stream.message().await? {
                print_line(&serde_json::to_string(&record)?)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The store a command reads.
pub enum StoreSource {
    Sqlite(PathBuf),
    Postgres(String),
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `regionguard audit verify`: exit 0 when the chain holds, 1 naming the first broken row.
/// A chain cannot show that rows were cut from its end; `expect_head` ("SEQ:HASH", as printed by
/// an earlier run and kept outside the store) checks that that row is still there, unchanged.
pub fn audit_verify(
    source: StoreSource,
    expect_head: Option<&str>,
    min_retain_days: Option<u32>,
    key_file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let key = key_file
        .map(store::ChainKey::from_file)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let expected = expect_head
        .map(|expected| -> anyhow::Result<(i64, &str)> {
            let (seq, hash) = expected
                .split_once(':')
                .context("--expect-head takes SEQ:HASH")?;
            Ok((seq.parse().context("--expect-head: SEQ is a number")?, hash))
        })
        .transpose()?;
    let data_dir = match source {
        StoreSource::Sqlite(dir) => dir,
        StoreSource::Postgres(url) => {
            let report = runtime()?.block_on(store::postgres::verify::verify(
                &url,
                key.as_ref(),
                expected.map(|(seq, _)| seq),
            ))?;
            if let Some((seq, hash)) = expected {
                match &report.expected_row_hash {
                    Some(found) if found == hash => {}
                    Some(_) => {
                        return Ok(head_broken(seq, false));
                    }
                    None => {
                        return Ok(head_broken(seq, true));
                    }
                }
            }
            let location = store::postgres::redact(&url);
            return Ok(verify_outcome(
                report.result,
                report.head,
                Vec::new(),
                min_retain_days,
                &location,
            ));
        }
    };
    let data_dir = data_dir.as_path();
    let conn = store::open_for_reading(data_dir)?;
    let mut notes = Vec::new();
    if let Some((seq, hash)) = expected {
        match store::row_hash(&conn, seq)? {
            Some(found) if found != hash => {
                return Ok(head_broken(seq, false));
            }
            Some(_) => {}
            None => match store::retention::latest(&conn)? {
                // Older than the retained window: the checkpoint vouches for its hash only
                // when it is the very row it names.
                Some((_, Ok(c))) if seq < c.through_seq => notes.push(format!(
                    "the recorded head seq {seq} is older than retention kept; record the new head"
                )),
                Some((_, Ok(c))) if seq == c.through_seq && c.through_hash != hash => {
                    return Ok(head_broken(seq, false));
                }
                Some((_, Ok(c))) if seq == c.through_seq => {}
                _ => {
                    return Ok(head_broken(seq, true));
                }
            },
        }
    }
    let result = store::verify_keyed(&conn, key.as_ref())?;
    let head = store::head(&conn)?;
    let location = store::db_path(data_dir).display().to_string();
    Ok(verify_outcome(
        result,
        head,
        notes,
        min_retain_days,
        &location,
    ))
}

/// A line of verify's report: printed if anyone reads it. The exit code is the verdict either
/// way (a reader that went away must not turn BROKEN into success).
fn say(line: &str) {
    let _ = print_line(line);
}

/// The expected head (`--expect-head`) is not in the log as recorded: changed, or gone.
fn head_broken(seq: i64, gone: bool) -> ExitCode {
    say(&if gone {
        format!("BROKEN: row seq {seq} recorded as the head is gone (rows deleted from the end)")
    } else {
        format!("BROKEN: row seq {seq} does not have the recorded head hash")
    });
    ExitCode::from(1)
}

/// Prints what verify found (either adapter) and gives the exit code.
fn verify_outcome(
    result: Result<store::Verified, store::Broken>,
    head: Option<(i64, String)>,
    notes: Vec<String>,
    min_retain_days: Option<u32>,
    location: &str,
) -> ExitCode {
    let (ok, mut lines) = store::VerifyReport { result, head }.lines(location, min_retain_days);
    if ok {
        // What the expected head showed comes first, after the verdict line.
        lines.splice(1..1, notes.into_iter().map(|note| format!("  {note}")));
    }
    for line in lines {
        say(&line);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `regionguard audit adopt-key`: keys an existing plain store.
pub fn adopt_key(data_dir: &Path, key_file: &Path) -> anyhow::Result<ExitCode> {
    let key = store::ChainKey::from_file(key_file).map_err(anyhow::Error::msg)?;
    let seq = store::sqlite::writer::adopt_key(data_dir, &key)?;
    print_line(&format!(
        "keyed: row seq {seq} and every row after it carry an HMAC under {}; start the server with [store] chain_key_file = that file",
        key_file.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `regionguard replay`: what a candidate policy would change, over recorded decisions.
pub fn replay(
    source: StoreSource,
    policy: &Path,
    since: &str,
    samples: usize,
) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(policy).with_context(|| format!("reading {}", policy.display()))?;
    let candidate = regionguard::policy::parse_policy(&text, &policy.display().to_string())?;
    let reads = match source {
        StoreSource::Sqlite(dir) => {
            // Fail here, naming the directory, rather than on the first page.
            store::open_for_reading(&dir)?;
            store::Reads::sqlite_at(dir)
        }
        StoreSource::Postgres(url) => store::postgres::reads(&url)?,
    };
    let since = since_ms(since)?;
    let report = runtime()?.block_on(regionguard::grpc::replay_store(
        &reads, since, &candidate, samples,
    ))?;
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}
