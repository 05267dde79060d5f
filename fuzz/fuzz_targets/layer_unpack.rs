//! Any bytes as a layer: extraction must never panic, never write outside its root, and
//! stay within its limits.
#![no_main]

use auraed::image::unpack::{Limits, Policy, unpack};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(outside) = tempfile::tempdir() else { return };
    let root = outside.path().join("root");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    let limits = Limits { max_stream_bytes: 1 << 20, max_file_bytes: 1 << 20, max_entries: 1000, max_path: 4095, max_depth: 64 };
    let _ = unpack(data, &root, &limits, &Policy::default());
    let names: Vec<_> = std::fs::read_dir(outside.path()).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert_eq!(names, ["root"], "something was written outside the layer root");
});
