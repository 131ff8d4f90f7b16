//! The shipped alerts (the PrometheusRule in manifests/monitoring.yaml) pass
//! their promtool unit tests (tests/monitoring/alerts.test.yaml), and every
//! alert has one.

use std::{collections::BTreeSet, process::Command};

use bulkhead_lab::testbed::workspace_root;

#[test]
fn every_shipped_alert_passes_its_promtool_unit_test() {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("manifests/monitoring.yaml")).unwrap();
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let rule = documents.iter().find(|d| d["kind"] == "PrometheusRule").expect("a PrometheusRule");
    let groups = &rule["spec"]["groups"];

    let tests = std::fs::read_to_string(root.join("tests/monitoring/alerts.test.yaml")).unwrap();
    let alerts: BTreeSet<&str> = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    for alert in &alerts {
        assert!(tests.contains(&format!("alertname: {alert}\n")), "{alert} has no unit test");
    }

    // promtool reads the rule groups from a file of its own; JSON is YAML.
    let dir = std::env::temp_dir().join(format!("bulkhead-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rules.yaml"), serde_json::json!({ "groups": groups }).to_string()).unwrap();
    std::fs::write(dir.join("alerts.test.yaml"), &tests).unwrap();
    let out = Command::new("promtool").args(["test", "rules", "alerts.test.yaml"]).current_dir(&dir).output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("promtool (Debian's prometheus package) is missing: `cargo xtask setup` installs it");
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
