//! `bulkhead demo` (what `cargo xtask demo` runs) shows real refusals, the
//! counters, and the Audit-then-Enforce rollout changing verdicts.

mod common;

#[test]
fn the_demo_blocks_counts_and_rolls_out_default_deny() {
    assert!(common::require_root(), "not root");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-lab")).arg("demo").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\x1b', "");
    assert!(out.status.success(), "demo failed: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    let blocked: u64 = text
        .lines()
        .filter(|l| l.contains("bulkhead_blocked_connections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(blocked > 0, "blocked counters: {text}");
    assert!(text.contains("AUDIT") && text.contains("cluster/default-deny-shop rule 1"), "audit verdicts: {text}");
    // The rollout: intruder -> frontend is allowed under Audit, denied once enforced.
    let sections: Vec<&str> = text.split("Verdicts with default-deny-shop").collect();
    assert_eq!(sections.len(), 3, "{text}");
    let row = |section: &str| {
        section
            .lines()
            .find(|l| l.contains("intruder/intruder") && l.contains("shop/frontend"))
            .map(str::to_string)
            .unwrap_or_default()
    };
    assert!(row(sections[1]).contains("ALLOW"), "under Audit: {}", row(sections[1]));
    assert!(row(sections[2]).contains("DENY"), "enforced: {}", row(sections[2]));
    let leftovers =
        String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .to_string();
    assert!(!leftovers.contains("bh-demo-"), "the demo cleans up: {leftovers}");
}
