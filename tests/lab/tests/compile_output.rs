//! `bulkhead compile` prints exactly what the datapath holds: every
//! scenario's allowlists are loaded into this kernel's maps, read back, and
//! compared entry for entry with what `compile` prints.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use bulkhead::{
    cli,
    dataplane::{sync::Programmer, Datapath},
};

const PIN_DIR: &str = "/sys/fs/bpf/bulkhead-test-compile-output";

/// One entry's key as prefix length, direction, peer identity, protocol, port.
type Entry = (u32, u8, u32, u8, u16);

struct Unpin;

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = Datapath::unpin_all(PIN_DIR);
    }
}

#[test]
fn compile_prints_exactly_the_entries_the_datapath_holds() {
    if !common::require_root() {
        return;
    }
    let scenarios = bulkhead_lab::testbed::workspace_root().join("tests/scenarios");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&scenarios).unwrap().flatten().map(|e| e.path()).collect();
    dirs.sort();
    let mut compared = 0;
    for dir in dirs.iter().filter(|d| d.join("expect.yaml").exists()) {
        let _unpin = Unpin;
        let _ = Datapath::unpin_all(PIN_DIR);
        let state = bulkhead_policy::compile(&cli::load(dir).unwrap());
        let mut programmer = Programmer::adopt(Datapath::load(PIN_DIR).unwrap());
        let report = programmer.apply(&state, Vec::new()).unwrap();
        assert!(report.failed_closed.is_empty(), "{}: every allowlist fits", dir.display());

        let mut held: BTreeMap<u32, BTreeSet<Entry>> = BTreeMap::new();
        for (prefix_len, key, _) in programmer.datapath().policy_entries() {
            held.entry(key.endpoint()).or_default().insert((
                prefix_len,
                key.direction(),
                key.identity(),
                key.protocol(),
                key.port(),
            ));
        }
        let printed = cli::allowlists_json(&state);
        for pod in printed["pods"].as_array().unwrap() {
            let endpoint = pod["endpoint"].as_u64().unwrap() as u32;
            let entries = pod["entries"].as_array().unwrap();
            let in_kernel = held.remove(&endpoint).unwrap_or_default();
            assert_eq!(
                entries.len(),
                in_kernel.len(),
                "{}: {} prints as many entries as it holds",
                dir.display(),
                pod["pod"]
            );
            let listed: BTreeSet<Entry> = state
                .entries_of(endpoint)
                .map(|((prefix_len, key), _)| {
                    (*prefix_len, key.direction(), key.identity(), key.protocol(), key.port())
                })
                .collect();
            assert_eq!(listed, in_kernel, "{}: {}", dir.display(), pod["pod"]);
            compared += entries.len();
        }
        assert!(
            held.is_empty(),
            "{}: the datapath holds entries of endpoints compile does not print: {held:?}",
            dir.display()
        );
    }
    assert!(compared > 100, "only {compared} entries compared");
}
