//! `bulkhead demo` (what `cargo xtask demo` runs) shows real refusals, the
//! counters, and the rollout loop (plan, report, proposal, enforce) changing
//! only the verdict of the flow left out.

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
    assert!(text.contains("AUDIT") && text.contains("shop/bulkhead-default-deny"), "audit verdicts: {text}");
    assert!(text.contains("not switched") && text.contains("switched to Enforce"), "{text}");
    // The rollout: intruder -> frontend is allowed under Audit, denied once
    // the proposal (less intruder's flow) and Enforce are in; every
    // connection allowed before stays allowed.
    let sections: Vec<&str> = text.split("Verdicts with ").collect();
    assert_eq!(sections.len(), 4, "{text}");
    let refusal = text.split("5. Enforce?").nth(1).and_then(|t| t.split("6. ").next()).unwrap_or_default();
    assert!(
        refusal.contains("1 connection(s)")
            && refusal.contains("intruder/intruder")
            && refusal.contains("not switched"),
        "refused for intruder's connection alone: {refusal}"
    );
    let row = |section: &str, from: &str, to: &str| {
        section.lines().find(|l| l.contains(from) && l.contains(to)).map(str::to_string).unwrap_or_default()
    };
    let (audit, enforced) = (sections[1], sections[3]);
    assert!(row(audit, "intruder/intruder", "shop/frontend").contains("ALLOW"), "under Audit: {audit}");
    assert!(row(enforced, "intruder/intruder", "shop/frontend").contains("DENY"), "enforced: {enforced}");
    for (from, to) in [
        ("shop/frontend", "shop/api-gateway"),
        ("shop/api-gateway", "shop/payment-service"),
        ("shop/payment-service", "shop/postgres"),
        ("shop/frontend", "outside host"),
    ] {
        assert!(row(audit, from, to).contains("ALLOW"), "{from} -> {to} under Audit: {audit}");
        assert!(row(enforced, from, to).contains("ALLOW"), "{from} -> {to} broke: {enforced}");
    }
    let leftovers =
        String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .to_string();
    assert!(!leftovers.contains("bh-demo-"), "the demo cleans up: {leftovers}");
}
