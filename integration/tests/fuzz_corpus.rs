//! Replays the committed fuzz corpus (`fuzz/corpus/TARGET/`) through the same checks the
//! libFuzzer targets run (`fuzz/src/checks.rs`), on stable: every input found so far,
//! crashes fixed among them, stays passing.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(
            result.is_ok(),
            "{target}: {} fails its check",
            path.display()
        );
        n += 1;
    }
    assert!(n > 0, "{target}: no corpus in {}", dir.display());
    n
}

/// A fuzz target: its name and its check.
type Target = (&'static str, fn(&[u8]));

#[test]
fn every_committed_fuzz_input_passes_its_checks() {
    let targets: [Target; 7] = [
        ("chain_walk", checks::chain_walk),
        ("offload", checks::offload),
        ("relay", checks::relay),
        ("frame_parsers", checks::frame_parsers),
        ("config", checks::config),
        ("switching", checks::switching),
        ("rx_write", checks::rx_write),
    ];
    for (name, check) in targets {
        let n = replay(name, check);
        eprintln!("{name}: {n} inputs");
    }
}
