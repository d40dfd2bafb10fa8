//! Replays the fuzz corpus through the fuzz targets' bodies (fuzz/src/lib.rs), so every CI run
//! checks the inputs libFuzzer kept for their coverage, and each crash it once found stays fixed.
//! `scripts/fuzz` grows the corpus; this test only reads it.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

/// Runs `target` on every file of `fuzz/corpus/<name>/`; fails naming each input that panics.
fn replay(name: &str, target: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz/corpus/{name}: {e}"))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    let failed: Vec<String> = inputs
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap();
            catch_unwind(AssertUnwindSafe(|| target(&data))).is_err()
        })
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    // A corpus that shrank to its seeds would make this test pass without testing much.
    assert!(
        inputs.len() >= 20,
        "fuzz/corpus/{name} holds only {} inputs",
        inputs.len()
    );
    assert!(
        failed.is_empty(),
        "fuzz/corpus/{name}: {} of {} inputs fail: {failed:?}",
        failed.len(),
        inputs.len()
    );
}

#[test]
fn policy_parser_corpus() {
    replay("policy_toml", targets::policy_toml);
}

#[test]
fn request_conversion_and_decision_corpus() {
    replay("classify_request", targets::classify_request);
}

#[test]
fn owner_graph_corpus() {
    replay("owner_graph", targets::owner_graph);
}

/// The replay is only as good as the targets' checks: a broken invariant must fail it.
#[test]
#[should_panic(expected = "inputs fail")]
fn a_target_check_that_breaks_fails_the_replay() {
    fn broken(data: &[u8]) {
        targets::owner_graph(data);
        // Broken for some inputs only, as a real regression would be (and to keep output short).
        assert!(data.len() % 16 != 3, "a deliberately broken check");
    }
    replay("owner_graph", broken);
}
