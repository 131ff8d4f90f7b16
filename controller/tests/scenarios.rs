//! Every scenario under tests/scenarios passes `bulkhead check`.

use std::path::{Path, PathBuf};

use bulkhead::cli::scenario::{self, Scenario};

fn scenario_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expect.yaml").exists())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_scenario_passes_check() {
    let dirs = scenario_dirs();
    assert!(dirs.len() >= 19, "scenarios missing: {dirs:?}");
    let mut failures = Vec::new();
    for dir in dirs {
        let report = scenario::check(&Scenario::load(&dir).unwrap()).unwrap();
        assert!(report.probes > 0, "{} has no probes", report.scenario);
        if !report.failed.is_empty() {
            failures.push(serde_json::to_string_pretty(&report).unwrap());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_wrong_expectation_is_reported_with_the_deciding_policy() {
    let dir = tempdir("wrong-expectation");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios/default-deny-ingress");
    std::fs::copy(source.join("policies.yaml"), dir.join("policies.yaml")).unwrap();
    let cluster = source.join("../../clusters/xyz.yaml");
    std::fs::write(
        dir.join("expect.yaml"),
        format!("cluster: {}\n", cluster.display()) + "steps:\n  - apply: [policies.yaml]\n    probes:\n      - {from: y/a, to: x/a, port: 80, protocol: TCP, expect: allow}\n",
    )
    .unwrap();
    let report = scenario::check(&Scenario::load(&dir).unwrap()).unwrap();
    assert_eq!((report.probes, report.passed), (1, 0));
    let failure = &report.failed[0];
    assert_eq!(failure.observed, scenario::Verdict::Deny);
    assert_eq!(failure.policy.as_deref(), Some("x/deny-all"));
    assert!(failure.rule.as_deref().unwrap().contains("ingress"), "{:?}", failure.rule);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bulkhead-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn coverage_names_the_open_pods_of_each_namespace() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios/egress");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["coverage", "-o", "json"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let coverage: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(coverage["x"]["pods"], 3, "{coverage}");
    assert_eq!(coverage["x"]["egress_isolated"], 2, "{coverage}");
    assert_eq!(coverage["x"]["open_pods"], serde_json::json!(["c"]), "{coverage}");
    assert_eq!(coverage["y"]["open_pods"].as_array().map(Vec::len), Some(3), "{coverage}");
}

/// The upstream kind answers as ours do: explained by name and rule,
/// validated by field path (a misspelt field too).
#[test]
fn explain_and_validate_treat_a_cluster_network_policy_as_our_kinds() {
    let bulkhead = || std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios/cnp-admin-tier-priority-field");
    let out = bulkhead()
        .arg("explain")
        .arg(&dir)
        .args(["--from", "network-policy-conformance-slytherin/draco-malfoy-0"])
        .args(["--to", "network-policy-conformance-gryffindor/harry-potter-0", "--port", "80/TCP"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "denied: {text}");
    assert!(text.contains("deny by ClusterNetworkPolicy priority-50-example rule 0"), "{text}");

    let file = tempdir("cnp-validate").join("guard.yaml");
    std::fs::write(
        &file,
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Admin\n  priority: 3\n  subject: {namespaces: {}}\n  egress:\n    - action: Accept\n      too: [{networks: [10.0.0.0/8]}]\n    - action: Deny\n      to: [{nodes: {}}]\n",
    )
    .unwrap();
    let out = bulkhead().arg("validate").arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ClusterNetworkPolicy guard") && text.contains("spec.egress[0].too"), "{text}");
    std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
}
