use super::writer::adopt_key;
use super::*;
use crate::store::writer::{self, Applied, Change, Overflow, Recorder};
use crate::store::{Broken, ChainBreak, ChainKey, verify, verify_keyed};

/// Must-record decisions wait this long for their commit at most.
const MUST: Option<std::time::Duration> = Some(std::time::Duration::from_secs(10));

fn decision_row(id: &str, verdict: &str) -> writer::RowBuilder {
    let row = AuditRow {
        kind: "decision".into(),
        ref_id: id.into(),
        recorded_at_ms: now_ms(),
        account_id: "acct-1".into(),
        verdict: verdict.into(),
        country: "IR".into(),
        reasons: "REGION_SANCTIONED".into(),
        body: "{}".into(),
        ..Default::default()
    };
    Box::new(move || row)
}

/// How many review-queue items are open (up to 100).
fn open_items(conn: &Connection) -> usize {
    let filter = QueueFilter {
        status: "open".into(),
        limit: 100,
        ..Default::default()
    };
    queue(conn, &filter).unwrap().len()
}

#[tokio::test]
async fn rows_are_chained_queued_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(dir.path(), 16, Overflow::Sample).unwrap();
    for i in 0..40 {
        recorder
            .decision(
                decision_row(&format!("d{i}"), if i % 4 == 0 { "REVIEW" } else { "DENY" }),
                MUST,
            )
            .await
            .unwrap();
    }
    recorder.flush().await;
    let stats = recorder.stats();
    assert_eq!(stats.recorded, 40);
    // Each call waited for its commit before the next was made: a transaction each.
    assert_eq!(stats.commits, 40);
    let conn = open_for_reading(dir.path()).unwrap();
    assert_eq!(verify(&conn).unwrap().map(|v| v.rows), Ok(40));
    assert_eq!(open_items(&conn), 10);
    drop(recorder);

    // A new writer continues the same chain.
    let recorder = Recorder::start(dir.path(), 16, Overflow::Sample).unwrap();
    recorder
        .decision(decision_row("after-restart", "ALLOW"), MUST)
        .await
        .unwrap();
    recorder.flush().await;
    assert_eq!(
        verify(&open_for_reading(dir.path()).unwrap())
            .unwrap()
            .map(|v| v.rows),
        Ok(41)
    );
}

#[tokio::test]
async fn a_decision_recorded_twice_is_kept_once_and_the_chain_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(dir.path(), 16, Overflow::Sample).unwrap();
    // Twice in one batch, and again in a later one.
    for id in ["d1", "d1", "d2"] {
        recorder
            .decision(decision_row(id, "DENY"), None)
            .await
            .unwrap();
    }
    recorder.flush().await;
    recorder
        .decision(decision_row("d1", "DENY"), MUST)
        .await
        .expect("a repeat is answered as recorded: it is on record");
    recorder
        .decision(decision_row("d3", "REVIEW"), MUST)
        .await
        .unwrap();
    recorder.flush().await;
    let conn = open_for_reading(dir.path()).unwrap();
    assert_eq!(verify(&conn).unwrap().map(|v| v.rows), Ok(3), "d1, d2, d3");
    let seqs: Vec<(i64, String)> = conn
        .prepare("SELECT seq, ref_id FROM audit_log ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        seqs,
        [(1, "d1".into()), (2, "d2".into()), (3, "d3".into())],
        "no gap where a repeat was skipped"
    );
    assert_eq!(open_items(&conn), 1);
}

/// Only a repeated (kind, ref_id) is skipped: a row whose place in the chain is taken (a second
/// writer on the same file) fails, and is never silently left out.
#[tokio::test]
async fn a_row_whose_place_is_taken_fails_rather_than_being_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(dir.path(), 16, Overflow::Sample).unwrap();
    recorder
        .decision(decision_row("d1", "DENY"), MUST)
        .await
        .unwrap();
    // Behind the writer's back, another connection takes seq 2.
    let other = open_for_writing(dir.path()).unwrap();
    other
        .execute(
            "INSERT INTO audit_log (seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash) \
             VALUES (2, 'decision', 'intruder', 0, '', '', 'ALLOW', '', '', '{}', '', '')",
            [],
        )
        .unwrap();
    let refused = recorder.decision(decision_row("d2", "DENY"), MUST).await;
    assert!(refused.is_err(), "{refused:?}");
    let stats = recorder.stats();
    assert_eq!((stats.failed, stats.unrecorded), (1, 1), "{stats:?}");
}

#[tokio::test]
async fn review_changes_commit_with_their_audit_row_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(dir.path(), 16, Overflow::Sample).unwrap();
    recorder
        .decision(decision_row("d1", "REVIEW"), MUST)
        .await
        .unwrap();
    let review = |id: &str| AuditRow {
        kind: "review".into(),
        ref_id: id.into(),
        actor: "alice".into(),
        recorded_at_ms: now_ms(),
        ..Default::default()
    };
    let resolve = |id: &str| Change::Resolve {
        decision_id: id.into(),
        outcome: "confirmed".into(),
        note: "".into(),
        by: "alice".into(),
        at_ms: now_ms(),
    };
    assert!(matches!(
        recorder.review(review("r1"), resolve("d1")).await,
        Ok(Applied::Queue(_))
    ));
    assert!(matches!(
        recorder.review(review("r2"), resolve("d1")).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        recorder.review(review("r3"), resolve("nope")).await,
        Err(StoreError::NotFound(_))
    ));
    let conn = open_for_reading(dir.path()).unwrap();
    assert_eq!(
        verify(&conn).unwrap().map(|v| v.rows),
        Ok(2),
        "the decision and the one successful review action"
    );
    assert_eq!(
        decision(&conn, "d1")
            .unwrap()
            .unwrap()
            .queue
            .unwrap()
            .status,
        "resolved"
    );
}

#[tokio::test]
async fn a_full_writer_samples_allow_decisions_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(dir.path(), 1, Overflow::Sample).unwrap();
    for i in 0..2000 {
        recorder
            .decision(decision_row(&format!("a{i}"), "ALLOW"), None)
            .await
            .unwrap();
    }
    recorder.flush().await;
    let stats = recorder.stats();
    assert_eq!(stats.recorded + stats.dropped, 2000);
    assert_eq!(
        verify(&open_for_reading(dir.path()).unwrap())
            .unwrap()
            .map(|v| v.rows),
        Ok(stats.recorded)
    );
}

#[tokio::test]
async fn direct_edits_and_deletions_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(dir.path(), 16, Overflow::Sample).unwrap();
    for i in 0..5 {
        recorder
            .decision(decision_row(&format!("d{i}"), "DENY"), MUST)
            .await
            .unwrap();
    }
    recorder.flush().await;
    let conn = Connection::open(db_path(dir.path())).unwrap();
    conn.execute("UPDATE audit_log SET verdict = 'ALLOW' WHERE seq = 3", [])
        .unwrap();
    let err = verify(&conn).unwrap().map(|v| v.rows).unwrap_err();
    assert_eq!(
        err.to_string(),
        "row seq 3 (decision d2): content does not match its hash (edited)"
    );
    conn.execute("UPDATE audit_log SET verdict = 'DENY' WHERE seq = 3", [])
        .unwrap();
    assert_eq!(verify(&conn).unwrap().map(|v| v.rows), Ok(5));
    conn.execute("DELETE FROM audit_log WHERE seq = 4", [])
        .unwrap();
    assert_eq!(
        verify(&conn)
            .unwrap()
            .map(|v| v.rows)
            .unwrap_err()
            .to_string(),
        "row seq 4 is missing (deleted): row seq 3 is followed by row seq 5"
    );
}

/// One row that cannot be written (here a trigger refuses it, as a constraint or a corrupt page
/// would) and one whose builder panics cost only themselves: the rest of their batch, and
/// everything after, is recorded and the chain stays intact.
#[tokio::test]
async fn a_bad_row_costs_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_for_writing(dir.path()).unwrap());
    Connection::open(db_path(dir.path()))
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON audit_log WHEN NEW.ref_id = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'poisoned row'); END;",
        )
        .unwrap();
    let recorder = Recorder::start(dir.path(), 64, Overflow::Sample).unwrap();
    for i in 0..10 {
        recorder
            .decision(decision_row(&format!("before{i}"), "DENY"), MUST)
            .await
            .unwrap();
    }
    recorder
        .decision(decision_row("poison", "DENY"), MUST)
        .await
        .expect_err("a row that cannot be committed is not answered as recorded");
    recorder
        .decision(Box::new(|| panic!("a row builder bug")), MUST)
        .await
        .expect_err("a row that cannot be built is not answered as recorded");
    for i in 0..10 {
        recorder
            .decision(decision_row(&format!("after{i}"), "REVIEW"), MUST)
            .await
            .unwrap();
    }
    recorder.flush().await;
    let stats = recorder.stats();
    assert_eq!((stats.recorded, stats.failed, stats.unrecorded), (20, 2, 2));

    // The writer is still alive, the chain has no gap, the REVIEW rows are queued.
    recorder
        .decision(decision_row("later", "DENY"), MUST)
        .await
        .unwrap();
    recorder.flush().await;
    assert_eq!(recorder.stats().recorded, 21);
    let conn = open_for_reading(dir.path()).unwrap();
    assert_eq!(verify(&conn).unwrap().map(|v| v.rows), Ok(21));
    assert_eq!(open_items(&conn), 10);
}

fn decision_at(id: &str, verdict: &str, recorded_at_ms: i64) -> writer::RowBuilder {
    let row = AuditRow {
        kind: "decision".into(),
        ref_id: id.into(),
        recorded_at_ms,
        account_id: "acct-1".into(),
        verdict: verdict.into(),
        body: "{}".into(),
        ..Default::default()
    };
    Box::new(move || row)
}

fn reviewer_row(id: &str) -> AuditRow {
    AuditRow {
        kind: "review".into(),
        ref_id: id.into(),
        actor: "alice".into(),
        recorded_at_ms: now_ms(),
        body: "{\"rpc\":\"test\"}".into(),
        ..Default::default()
    }
}

fn account_override(id: &str, value: &str, action: &str) -> OverrideRecord {
    OverrideRecord {
        id: id.into(),
        scope: "account".into(),
        value: value.into(),
        action: action.into(),
        reviewer: "alice".into(),
        reason: "test".into(),
        created_at_ms: now_ms(),
        expires_at_ms: None,
        removed_at_ms: None,
        removed_by: String::new(),
    }
}

/// `id=ACTION` of each override, sorted.
fn override_ids(all: &[OverrideRecord]) -> Vec<String> {
    let mut ids: Vec<String> = all
        .iter()
        .map(|o| format!("{}={}", o.id, o.action))
        .collect();
    ids.sort();
    ids
}

/// Sets an account override through `recorder`, as reviewer row `row` records it.
async fn set_account_override(recorder: &Recorder, row: &str, id: &str, value: &str) {
    recorder
        .review(
            reviewer_row(row),
            Change::SetOverride(account_override(id, value, "DENY")),
        )
        .await
        .unwrap();
}

/// What the store hands the engine is what the chain records: a row planted in the overrides
/// table, one edited and one deleted there change nothing, read incrementally, after reopening
/// and after a retention checkpoint (from which the read then starts).
#[tokio::test]
async fn the_overrides_enforced_are_the_chains_not_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let backend = crate::store::Backend::Sqlite {
        dir: dir.path().to_path_buf(),
    };
    let opened = crate::store::open(&backend, 64, Overflow::Sample, None).unwrap();
    let (recorder, reads) = (opened.recorder, opened.reads);
    let set = |id: &str, value: &str, action: &str| {
        Change::SetOverride(account_override(id, value, action))
    };
    recorder
        .review(reviewer_row("r1"), set("kept", "acct-1", "DENY"))
        .await
        .unwrap();
    recorder
        .review(reviewer_row("r2"), set("edited", "acct-2", "DENY"))
        .await
        .unwrap();
    assert_eq!(
        override_ids(&reads.overrides().await.unwrap()),
        ["edited=DENY", "kept=DENY"]
    );

    let raw = Connection::open(db_path(dir.path())).unwrap();
    raw.execute_batch(
        "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms) \
           VALUES ('planted', 'account', 'acct-9', 'ALLOW', 'alice', 'x', 1);
         UPDATE overrides SET action = 'ALLOW' WHERE id = 'edited';
         DELETE FROM overrides WHERE id = 'kept';",
    )
    .unwrap();
    // A change through the writer after the tampering is read on top of what was read before.
    recorder
        .review(reviewer_row("r3"), set("later", "acct-3", "DENY"))
        .await
        .unwrap();
    let expected = ["edited=DENY", "kept=DENY", "later=DENY"];
    assert_eq!(override_ids(&reads.overrides().await.unwrap()), expected);
    assert!(
        overrides(&raw).unwrap().iter().any(|o| o.id == "planted"),
        "the table still holds what was written into it"
    );
    // A reviewer row written around the writer, far past the head, is not taken, and the
    // next read still starts after the last row taken.
    let head: i64 = raw
        .query_row("SELECT MAX(seq) FROM audit_log", [], |r| r.get(0))
        .unwrap();
    let forged = AuditRow {
        body: serde_json::json!({ "rpc": "SetOverride", "applied": { "override": account_override("forged", "acct-9", "ALLOW") } })
            .to_string(),
        ..reviewer_row("forged")
    };
    raw.execute(
        "INSERT INTO audit_log (seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash) \
         VALUES (?1, 'review', 'forged', 0, 'x', '', '', '', 'SetOverride', ?2, 'x', ?3)",
        params![head + 1000, forged.body, forged.hash(head + 1000, "x")],
    )
    .unwrap();
    assert_eq!(override_ids(&reads.overrides().await.unwrap()), expected);
    recorder
        .review(reviewer_row("r4"), set("after-forged", "acct-4", "DENY"))
        .await
        .unwrap();
    let mut expected = expected.to_vec();
    expected.insert(0, "after-forged=DENY");
    assert_eq!(override_ids(&reads.overrides().await.unwrap()), expected);
    raw.execute("DELETE FROM audit_log WHERE ref_id = 'forged'", [])
        .unwrap();

    // What was deleted or edited in the table can still be removed through the writer, which
    // puts the row back as the log records it.
    let remove = |id: &str| Change::RemoveOverride {
        id: id.into(),
        by: "bob".into(),
        at_ms: now_ms(),
    };
    for (n, id) in ["kept", "edited"].into_iter().enumerate() {
        match recorder
            .review(reviewer_row(&format!("rm{n}")), remove(id))
            .await
        {
            Ok(Applied::Override(removed)) => {
                assert_eq!(
                    (removed.action.as_str(), removed.removed_by.as_str()),
                    ("DENY", "bob")
                );
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    assert!(
        recorder
            .review(reviewer_row("rm-planted"), remove("planted"))
            .await
            .is_err(),
        "not on record: nothing to remove"
    );
    raw.execute("DELETE FROM overrides WHERE id = 'planted'", [])
        .unwrap();
    let conn = open_for_reading(dir.path()).unwrap();
    assert!(
        verify(&conn).unwrap().is_ok(),
        "the table agrees with the log again"
    );
    let removed: Vec<String> = reads
        .overrides()
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.removed_at_ms.is_some())
        .map(|o| o.id)
        .collect();
    assert_eq!(removed.len(), 2, "{removed:?}");
    recorder.flush().await;
    drop(recorder);

    let reopened = crate::store::open(&backend, 64, Overflow::Sample, None).unwrap();
    assert_eq!(
        override_ids(&reopened.overrides),
        expected,
        "read whole on opening"
    );

    // After a checkpoint the read starts from its copy, which comes from the chain too; a
    // reader that last read before it takes the changes in between from that copy.
    reopened
        .recorder
        .review(
            reviewer_row("r5"),
            set("before-checkpoint", "acct-5", "DENY"),
        )
        .await
        .unwrap();
    expected.insert(1, "before-checkpoint=DENY");
    reopened
        .recorder
        .decision(decision_at("d1", "ALLOW", now_ms() - 1000), MUST)
        .await
        .unwrap();
    // Nor is a row edited into a reviewer's laundered into the checkpoint's copy.
    raw.execute(
        "UPDATE audit_log SET kind = 'review', body = ?1 WHERE kind = 'decision' AND ref_id = 'd1'",
        [&forged.body],
    )
    .unwrap();
    assert!(
        reopened
            .recorder
            .retain(now_ms(), std::time::Duration::ZERO)
            .await
            .unwrap()
            > 0
    );
    assert_eq!(
        override_ids(
            &crate::store::Reads::sqlite_at(dir.path().to_path_buf())
                .overrides()
                .await
                .unwrap()
        ),
        expected
    );
    assert_eq!(
        override_ids(&reopened.reads.overrides().await.unwrap()),
        expected
    );
    assert_eq!(
        override_ids(&reads.overrides().await.unwrap()),
        expected,
        "an older reader"
    );
    let copy = match retention::latest(&raw).unwrap() {
        Some((_, Ok(checkpoint))) => checkpoint.overrides,
        other => panic!("{other:?}"),
    };
    assert!(copy.iter().all(|o| o.id != "forged"), "{copy:?}");
}

/// On a keyed chain, someone who can write the file but lacks the key cannot move the
/// overrides: a checkpoint appended around the writer is passed over (nothing is deleted on its
/// word, and the next checkpoint does not copy it), a keyed reviewer row whose neighbour was
/// deleted still counts, and a server started with another key is refused.
#[tokio::test]
async fn a_keyed_chain_keeps_its_overrides_against_the_file_writer() {
    let dir = tempfile::tempdir().unwrap();
    let key = ChainKey::new(&[5; 32]).unwrap();
    let backend = crate::store::Backend::Sqlite {
        dir: dir.path().to_path_buf(),
    };
    let open = || crate::store::open(&backend, 64, Overflow::Sample, Some(key.clone()));
    let opened = open().unwrap();
    let old = now_ms() - 10 * 86_400_000;
    let mut set_row = reviewer_row("r1");
    set_row.recorded_at_ms = old;
    let mut kept = account_override("kept", "acct-1", "DENY");
    kept.created_at_ms = old;
    opened
        .recorder
        .review(set_row, Change::SetOverride(kept))
        .await
        .unwrap();
    for i in 0..5 {
        opened
            .recorder
            .decision(decision_at(&format!("d{i}"), "ALLOW", old + i), MUST)
            .await
            .unwrap();
    }
    set_account_override(&opened.recorder, "r2", "late", "acct-2").await;
    assert!(
        opened
            .recorder
            .retain(now_ms() - 86_400_000, std::time::Duration::ZERO)
            .await
            .unwrap()
            > 0
    );
    opened
        .recorder
        .decision(decision_at("mid", "ALLOW", now_ms()), MUST)
        .await
        .unwrap();
    set_account_override(&opened.recorder, "r3", "later", "acct-3").await;
    opened.recorder.flush().await;
    drop(opened);
    let raw = Connection::open(db_path(dir.path())).unwrap();
    let count = |raw: &Connection| -> i64 {
        raw.query_row("SELECT count(*) FROM audit_log", [], |r| r.get(0))
            .unwrap()
    };
    let before = count(&raw);

    // A checkpoint appended without the key, claiming every row is due and another override.
    let (head, head_hash): (i64, String) = raw
        .query_row(
            "SELECT seq, row_hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let forged = retention::Checkpoint {
        through_seq: head,
        through_hash: head_hash.clone(),
        cutoff_ms: now_ms(),
        overrides: vec![account_override("forged", "acct-9", "ALLOW")],
        legacy: false,
    };
    raw.execute(
        "INSERT INTO audit_log (seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash) \
         VALUES (?1, 'checkpoint', 'forged', ?2, 'regionguard', '', '', '', '', ?3, ?4, ?5)",
        params![head + 1, now_ms(), serde_json::to_string(&forged).unwrap(), head_hash, format!("k1:{}", "0".repeat(64))],
    )
    .unwrap();
    // And the decision row before the later override's reviewer row deleted.
    assert_eq!(
        raw.execute("DELETE FROM audit_log WHERE ref_id = 'mid'", [])
            .unwrap(),
        1
    );

    let reopened = open().unwrap();
    let expected = ["kept=DENY", "late=DENY", "later=DENY"];
    assert_eq!(override_ids(&reopened.overrides), expected);
    reopened
        .recorder
        .decision(decision_at("new", "ALLOW", now_ms()), MUST)
        .await
        .unwrap();
    reopened.recorder.flush().await;
    assert_eq!(
        count(&raw),
        before + 1,
        "the forged row in, the deleted one out, the new one in: nothing deleted on the forged checkpoint's word"
    );
    drop(reopened);
    raw.execute("DELETE FROM audit_log WHERE ref_id = 'forged'", [])
        .unwrap();

    // Junk keyed rows appended at the end do not make the right key look wrong.
    let head: i64 = raw
        .query_row("SELECT MAX(seq) FROM audit_log", [], |r| r.get(0))
        .unwrap();
    for n in 1..=20 {
        raw.execute(
            "INSERT INTO audit_log (seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash) \
             VALUES (?1, 'decision', ?2, 0, '', '', 'ALLOW', '', '', '{}', 'x', ?3)",
            params![head + n, format!("junk{n}"), format!("k1:{n:064}")],
        )
        .unwrap();
    }
    drop(open().unwrap());
    raw.execute("DELETE FROM audit_log WHERE ref_id LIKE 'junk%'", [])
        .unwrap();

    let other = ChainKey::new(&[6; 32]).unwrap();
    let refused = crate::store::open(&backend, 64, Overflow::Sample, Some(other))
        .err()
        .unwrap()
        .to_string();
    assert!(
        refused.contains("the configured chain key is not the audit chain's"),
        "{refused}"
    );

    // The checkpoint deleted: what it carried cannot be told from the log, so the table stands
    // (intact here), and retention removes nothing, nor vouches for the gap, until verify passes.
    raw.execute("DELETE FROM audit_log WHERE kind = 'checkpoint'", [])
        .unwrap();
    let reopened = open().unwrap();
    assert_eq!(override_ids(&reopened.overrides), expected);
    let before = count(&raw);
    assert_eq!(
        reopened
            .recorder
            .retain(now_ms(), std::time::Duration::ZERO)
            .await
            .unwrap(),
        0
    );
    assert_eq!(count(&raw), before, "no checkpoint over the gap");
}

/// Retention removes what is due, never an open queue item's decision, and leaves a store that
/// verifies, tables included (the override whose setting row went is vouched for by the
/// checkpoint); a row missing beyond what the checkpoint covers is still a deletion.
#[tokio::test]
async fn retention_removes_due_rows_and_the_rest_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(dir.path(), 64, Overflow::Sample).unwrap();
    let day = 86_400_000;
    let old = now_ms() - 10 * day;
    let set = Change::SetOverride(OverrideRecord {
        id: "o1".into(),
        scope: "account".into(),
        value: "acct-1".into(),
        action: "DENY".into(),
        reviewer: "alice".into(),
        reason: "shell".into(),
        created_at_ms: old,
        expires_at_ms: None,
        removed_at_ms: None,
        removed_by: String::new(),
    });
    let mut set_row = reviewer_row("r-set");
    set_row.recorded_at_ms = old;
    recorder.review(set_row, set).await.unwrap(); // seq 1
    for i in 0..30 {
        let verdict = if i == 19 { "REVIEW" } else { "ALLOW" };
        recorder
            .decision(decision_at(&format!("old{i}"), verdict, old + i), MUST)
            .await
            .unwrap(); // seq 2..=31; old19 (seq 21) stays open
    }
    for i in 0..10 {
        recorder
            .decision(decision_at(&format!("new{i}"), "ALLOW", now_ms()), MUST)
            .await
            .unwrap(); // seq 32..=41
    }
    recorder.flush().await;
    let cutoff = now_ms() - 5 * day;
    assert_eq!(
        recorder
            .retain(cutoff, std::time::Duration::ZERO)
            .await
            .unwrap(),
        20,
        "up to the open item"
    );
    let conn = open_for_reading(dir.path()).unwrap();
    let verified = verify(&conn).unwrap().unwrap();
    assert_eq!(verified.pruned_through, Some(20));
    assert_eq!(verified.rows, 22, "seq 21..=41 and the checkpoint");
    assert_eq!(open_items(&conn), 1);
    assert_eq!(
        recorder
            .retain(cutoff, std::time::Duration::ZERO)
            .await
            .unwrap(),
        0,
        "nothing new is due"
    );

    // Once resolved, the rest of the old rows go, the resolution row with them staying valid.
    let resolve = Change::Resolve {
        decision_id: "old19".into(),
        outcome: "confirmed".into(),
        note: String::new(),
        by: "alice".into(),
        at_ms: now_ms(),
    };
    recorder
        .review(reviewer_row("r-resolve"), resolve)
        .await
        .unwrap();
    assert_eq!(
        recorder
            .retain(cutoff, std::time::Duration::ZERO)
            .await
            .unwrap(),
        11
    );
    let verified = verify(&conn).unwrap().unwrap();
    assert_eq!(verified.pruned_through, Some(31));
    assert_eq!(verified.tables_unchecked_from, None);
    assert_eq!(
        overrides(&conn).unwrap().len(),
        1,
        "overrides are not log rows"
    );
    assert_eq!(recorder.stats().pruned, 31);
    // The account index keeps no entry of a row that went, whether it took the row before or
    // after retention, and still finds the rest.
    index_caught_up(&conn).await;
    let dangling: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit_account WHERE seq NOT IN (SELECT seq FROM audit_log)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dangling, 0);
    assert_eq!(account_decisions(&conn, "acct-1", 100).unwrap().len(), 10);

    // An override written into the table behind the writer's back is not laundered into the
    // next checkpoint's copy: that copy comes from the chain, and verify still names it.
    let raw = Connection::open(db_path(dir.path())).unwrap();
    raw.execute(
        "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms) \
         VALUES ('planted', 'account', 'acct-9', 'ALLOW', 'alice', 'x', 1)",
        [],
    )
    .unwrap();
    for i in 0..3 {
        recorder
            .decision(
                decision_at(&format!("late{i}"), "ALLOW", old + 100 + i),
                MUST,
            )
            .await
            .unwrap();
    }
    recorder.flush().await;
    assert!(
        recorder
            .retain(now_ms() - 1, std::time::Duration::ZERO)
            .await
            .unwrap()
            > 0
    );
    assert!(
        verify(&conn)
            .unwrap()
            .unwrap_err()
            .to_string()
            .starts_with("overrides: planted: no reviewer row"),
    );
    raw.execute("DELETE FROM overrides WHERE id = 'planted'", [])
        .unwrap();
    assert!(verify(&conn).unwrap().is_ok());

    // Deleting past the checkpoint is still a deletion.
    let first: i64 = conn
        .query_row("SELECT MIN(seq) FROM audit_log", [], |r| r.get(0))
        .unwrap();
    raw.execute("DELETE FROM audit_log WHERE seq = ?1", [first])
        .unwrap();
    assert_eq!(
        verify(&conn).unwrap().unwrap_err().to_string(),
        format!(
            "the chain starts at row seq {}: the rows before it are missing and no retention checkpoint covers them (deleted)",
            first + 1
        )
    );
}

/// A keyed chain is only continued keyed, and a plain one is keyed only by adoption: the
/// writer refuses both mismatches, so a chain replaced by a plain one behind its back cannot be
/// keyed past.
#[tokio::test]
async fn keying_is_adopted_once_and_never_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let key = ChainKey::new(&[9; 32]).unwrap();
    let plain = Recorder::start(dir.path(), 16, Overflow::Sample).unwrap();
    plain
        .decision(decision_row("p1", "DENY"), MUST)
        .await
        .unwrap();
    plain.flush().await;
    drop(plain);

    let refused = Recorder::start_keyed(dir.path(), 16, Overflow::Sample, Some(key.clone()));
    assert!(
        refused
            .err()
            .unwrap()
            .to_string()
            .contains("head (row seq 1) is not keyed"),
    );
    assert_eq!(adopt_key(dir.path(), &key).unwrap(), 2);
    assert!(adopt_key(dir.path(), &key).is_err(), "already keyed");
    let keyed = Recorder::start_keyed(dir.path(), 16, Overflow::Sample, Some(key.clone())).unwrap();
    keyed
        .decision(decision_row("k1", "DENY"), MUST)
        .await
        .unwrap();
    keyed.flush().await;
    drop(keyed);
    let conn = open_for_reading(dir.path()).unwrap();
    let verified = verify_keyed(&conn, Some(&key)).unwrap().unwrap();
    assert_eq!((verified.rows, verified.keyed_from), (3, Some(2)));
    assert_eq!(
        verify(&conn).unwrap().unwrap_err(),
        Broken::Chain(ChainBreak::NeedsKey { seq: 2 })
    );
    let unkeyed = Recorder::start(dir.path(), 16, Overflow::Sample);
    assert!(
        unkeyed
            .err()
            .unwrap()
            .to_string()
            .contains("the audit chain is keyed")
    );
}

/// A writer that never pauses (rows always queued behind the commit) still lets the WAL start
/// again from its beginning and be cut back to `journal_size_limit` (64 MiB): 240 MB of rows
/// written with no pause leave a WAL of at most that. Before the writer ran checkpoints of its
/// own between transactions, the WAL held every row written (2.4 GB after 13 s at 27k rows/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_a_writer_that_never_pauses() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(
        dir.path(),
        4_096,
        Overflow::Block(std::time::Duration::from_secs(10)),
    )
    .unwrap();
    let body = "x".repeat(4_000);
    let rows = 60_000;
    for i in 0..rows {
        let body = body.clone();
        let row = move || AuditRow {
            kind: "decision".into(),
            ref_id: format!("d{i}"),
            recorded_at_ms: now_ms(),
            account_id: "acct-1".into(),
            verdict: "ALLOW".into(),
            country: "SE".into(),
            body,
            ..Default::default()
        };
        recorder.decision(Box::new(row), None).await.unwrap();
    }
    recorder.flush().await;
    assert_eq!(recorder.stats().recorded, rows);
    let wal = std::fs::metadata(dir.path().join(format!("{DB_FILE}-wal")))
        .map(|m| m.len())
        .unwrap_or(0);
    let written = std::fs::metadata(dir.path().join(DB_FILE)).unwrap().len();
    assert!(written > 200 << 20, "the rows take {written} bytes");
    // Bounded, with room for a checkpoint that lags on a loaded machine (95 MB seen with the
    // rest of the suite running on both cores); without the writer's own checkpoints it held
    // every row (403 MB here).
    assert!(
        wal <= 2 * (64 << 20),
        "the WAL holds {wal} bytes after {written} bytes of rows"
    );
}

/// Waits until the writer's account index has every row (it adds them in batches, within about
/// a second of a quiet spell).
async fn index_caught_up(conn: &Connection) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let head = head(conn).unwrap().map_or(0, |(seq, _)| seq);
        if account_index_through(conn).unwrap() >= head {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the account index did not catch up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn decision_of(account: &str, id: &str) -> writer::RowBuilder {
    let row = AuditRow {
        kind: "decision".into(),
        ref_id: id.into(),
        recorded_at_ms: now_ms(),
        account_id: account.into(),
        verdict: "ALLOW".into(),
        body: "{}".into(),
        ..Default::default()
    };
    Box::new(move || row)
}

/// An account's decisions are found newest first whether the account index has taken them yet
/// (the log's tail) or not, and a page that spans both is in order.
#[tokio::test]
async fn an_accounts_decisions_are_found_before_and_after_the_index_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(dir.path(), 64, Overflow::Sample).unwrap();
    for i in 0..30 {
        let account = if i % 2 == 0 { "acct-a" } else { "acct-b" };
        recorder
            .decision(decision_of(account, &format!("d{i}")), MUST)
            .await
            .unwrap();
    }
    recorder
        .decision(decision_of("", "anonymous"), MUST)
        .await
        .unwrap();
    let conn = open_for_reading(dir.path()).unwrap();
    let ids = |account: &str, limit: u32| -> Vec<String> {
        let rows = account_decisions(&conn, account, limit).unwrap();
        assert!(rows.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");
        assert!(rows.iter().all(|r| r.row.account_id == account));
        rows.into_iter().map(|r| r.row.ref_id).collect()
    };
    let before = ids("acct-a", 100);
    assert_eq!(before.len(), 15);
    assert_eq!(before[0], "d28");
    assert_eq!(recorder.stats().account_index_behind, 31);

    index_caught_up(&conn).await;
    // The gauge follows the mark (set just after the slice that moved it commits).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while recorder.stats().account_index_behind != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the gauge stays behind"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let indexed: i64 = conn
        .query_row("SELECT count(*) FROM audit_account", [], |r| r.get(0))
        .unwrap();
    assert_eq!(indexed, 30, "every row with an account, once");
    assert_eq!(ids("acct-a", 100), before);

    // Newer rows, not taken yet: a page takes them first, then the indexed ones.
    for i in 30..34 {
        recorder
            .decision(decision_of("acct-a", &format!("d{i}")), MUST)
            .await
            .unwrap();
    }
    assert_eq!(ids("acct-a", 6), ["d33", "d32", "d31", "d30", "d28", "d26"]);
    assert_eq!(ids("acct-a", 100).len(), 19);
    assert_eq!(ids("acct-b", 100).len(), 15);
    assert!(ids("acct-c", 100).is_empty());
    index_caught_up(&conn).await;
    assert_eq!(ids("acct-a", 6), ["d33", "d32", "d31", "d30", "d28", "d26"]);
}

/// The account index is held to the log by `verify`: an entry deleted would hide a decision
/// from reviewers asking by account while the chain itself verifies (hostile pass), an entry
/// added would lend an account another's row.
#[tokio::test]
async fn verify_holds_the_account_index_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start(dir.path(), 64, Overflow::Sample).unwrap();
    for i in 0..6 {
        recorder
            .decision(
                decision_of(&format!("acct-{}", i % 2), &format!("d{i}")),
                MUST,
            )
            .await
            .unwrap();
    }
    let conn = open_for_reading(dir.path()).unwrap();
    index_caught_up(&conn).await;
    drop(recorder);
    assert_eq!(verify(&conn).unwrap().map(|v| v.rows), Ok(6));
    let edit = Connection::open(db_path(dir.path())).unwrap();
    let problem = |sql: &str, undo: &str| {
        edit.execute_batch(sql).unwrap();
        let found = verify(&conn).unwrap().unwrap_err().to_string();
        edit.execute_batch(undo).unwrap();
        assert!(verify(&conn).unwrap().is_ok(), "undone: {sql}");
        found
    };
    assert_eq!(
        problem(
            "DELETE FROM audit_account WHERE account_id = 'acct-0' AND seq = 3",
            "INSERT INTO audit_account VALUES ('acct-0', 3)",
        ),
        "audit_account: \"acct-0\" row seq 3: missing (deleted): the account's row is not found by account"
    );
    assert_eq!(
        problem(
            "INSERT INTO audit_account VALUES ('acct-1', 3)",
            "DELETE FROM audit_account WHERE account_id = 'acct-1' AND seq = 3",
        ),
        "audit_account: \"acct-1\" row seq 3: names a row the log does not hold for that account"
    );
    assert_eq!(
        problem(
            "UPDATE audit_account_through SET seq = 60",
            "UPDATE audit_account_through SET seq = 6",
        ),
        "audit_account_through: seq 60: marks rows as indexed past the log's last row (seq 6)"
    );
}

/// A store from before the account index (schema 4) has its rows taken in when it opens.
#[tokio::test]
async fn the_account_index_migration_takes_in_the_rows_already_there() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(db_path(dir.path())).unwrap();
        conn.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL)")
            .unwrap();
        for (version, sql) in &MIGRATIONS[..4] {
            conn.execute_batch(sql).unwrap();
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, 0)",
                [version],
            )
            .unwrap();
        }
        for seq in 1..=5_i64 {
            let account = ["acct-a", "acct-b", ""][seq as usize % 3];
            conn.execute(
                "INSERT INTO audit_log (seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash) \
                 VALUES (?1, 'decision', ?2, 0, '', ?3, 'ALLOW', '', '', '{}', '', '')",
                params![seq, format!("d{seq}"), account],
            )
            .unwrap();
        }
    }
    let conn = open_for_writing(dir.path()).unwrap();
    assert_eq!(account_index_through(&conn).unwrap(), 5);
    let found = |account: &str| -> Vec<i64> {
        account_decisions(&conn, account, 10)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    };
    assert_eq!(found("acct-a"), [3]);
    assert_eq!(found("acct-b"), [4, 1]);
    let index: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE name = 'audit_log_account'",
            [],
            |r| r.get(0),
        )
        .optional()
        .unwrap();
    assert_eq!(index, None, "the per-row index is gone");
}

/// The log's own queries read what they need through an index or by seq: none scans the log or
/// sorts it (schema 6 left decision rows out of audit_log_kind, which the export used to walk).
#[test]
fn the_logs_queries_neither_scan_nor_sort_it() {
    let dir = tempfile::tempdir().unwrap();
    let conn = open_for_writing(dir.path()).unwrap();
    let plan = |sql: &str| -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let count = stmt.parameter_count();
        let steps = stmt
            .query_map(rusqlite::params_from_iter((0..count).map(|_| 0)), |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap();
        steps.join("; ")
    };
    for (what, sql, uses) in [
        (
            "the latest checkpoint",
            retention::LATEST.to_string(),
            "audit_log_kind",
        ),
        (
            "reviewer rows after a checkpoint",
            format!("SELECT seq {}", retention::REVIEWS_AFTER),
            "audit_log_kind",
        ),
        (
            "reviewer rows that may change an override",
            format!("SELECT seq {}", retention::OVERRIDES_REVIEWS_AFTER),
            "audit_log_kind",
        ),
        (
            "reviewer rows that may change one override",
            format!("SELECT seq {}", retention::OVERRIDE_REVIEWS_AFTER),
            "audit_log_kind",
        ),
        (
            "a page of the export",
            format!("{DECISION_SELECT} {DECISIONS_SINCE}"),
            "INTEGER PRIMARY KEY",
        ),
    ] {
        let plan = plan(&sql);
        assert!(plan.contains(uses), "{what}: {plan}");
        assert!(
            !plan.contains("SCAN a")
                && !plan.contains("SCAN audit_log")
                && !plan.contains("TEMP B-TREE"),
            "{what}: {plan}"
        );
    }
}
