//! Helpers shared by the workspace-level integration tests (see tests/tests/).

pub mod cluster;
pub mod dataflow;
pub mod otlp;
pub mod serving;

use std::path::PathBuf;

/// tests/golden: cases written by tools/reference/make_golden.py.
pub fn golden_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden")
}

/// Every golden case directory (those holding a checkpoint/), sorted by name.
pub fn golden_cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_root())
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("checkpoint").is_dir())
                .collect()
        })
        .unwrap_or_default();
    cases.sort();
    cases
}

/// max |a - b| and the index where it occurs.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .enumerate()
        .fold(
            (0.0, 0),
            |(m, mi), (i, d)| if d > m || d.is_nan() { (d, i) } else { (m, mi) },
        )
}
