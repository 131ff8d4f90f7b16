//! The shipped alerts (the PrometheusRule in manifests/monitoring.yaml) pass
//! their promtool unit tests (tests/monitoring/alerts.test.yaml), and every
//! alert has one; a real Prometheus scraping the demo's agent answers every
//! dashboard panel and alert.

mod common;

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::Duration,
};

use bulkhead_lab::testbed::{eventually, workspace_root};

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

/// `%`-encoding for a query string value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The shipped dashboard and alerts against a real Prometheus (Debian's)
/// scraping the demo's agent: every panel query returns series, every alert
/// rule loads and evaluates without error, and every metric an alert reads
/// exists — a renamed metric fails here, not silently in production.
#[test]
fn a_real_prometheus_scraping_the_demo_answers_every_panel_and_alert() {
    assert!(common::require_root(), "not root");
    let root = workspace_root();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifests/dashboards/bulkhead.json")).unwrap())
            .unwrap();
    let panels: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_string();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_string()))
        })
        .collect();
    let text = std::fs::read_to_string(root.join("manifests/monitoring.yaml")).unwrap();
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let groups = documents.iter().find(|d| d["kind"] == "PrometheusRule").unwrap()["spec"]["groups"].clone();

    let dir = std::env::temp_dir().join("bulkhead-test-prometheus");
    let watch = |topology: &bulkhead_lab::testbed::Topology| -> anyhow::Result<bulkhead_lab::testbed::Process> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("rules.yaml"), serde_json::json!({ "groups": groups }).to_string())?;
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [rules.yaml]\nscrape_configs:\n  - job_name: bulkhead-agent-metrics\n    static_configs: [{{targets: ['{}']}}]\n",
                bulkhead_lab::testbed::AGENT_ADDRESS
            ),
        )?;
        let prometheus = topology
            .node_command("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg("--web.listen-address=127.0.0.1:9490")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
            .spawn()?;
        Ok(bulkhead_lab::testbed::Process(prometheus))
    };
    let after = |topology: &bulkhead_lab::testbed::Topology, _prometheus| {
        let query = |expr: &str| -> serde_json::Value {
            let path = format!("/api/v1/query?query={}", encode(expr));
            topology
                .node_http_get("127.0.0.1:9490", &path)
                .ok()
                .and_then(|(_, body)| serde_json::from_str(&body).ok())
                .unwrap_or_default()
        };
        // An egress anomaly: frontend, past its learning, tries a destination it never used.
        std::thread::sleep(std::time::Duration::from_secs(5));
        let postgres = topology.pod("postgres").ipv4;
        assert_ne!(topology.probe("frontend", "TCP", postgres, 5432), "allow");
        eventually("Prometheus scrapes the agent twice over", Duration::from_secs(30), || {
            query("count_over_time(up{job=\"bulkhead-agent-metrics\"}[1m])")["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n >= 5)
        });
        for (title, expr) in &panels {
            eventually(&format!("panel {title:?}: {expr} returns series"), Duration::from_secs(10), || {
                let answer = query(expr);
                answer["status"] == "success" && answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty())
            });
        }
        eventually("every alert rule loaded and evaluated", Duration::from_secs(10), || {
            let path = "/api/v1/rules?type=alert";
            let rules: serde_json::Value = topology
                .node_http_get("127.0.0.1:9490", path)
                .ok()
                .and_then(|(_, body)| serde_json::from_str(&body).ok())
                .unwrap_or_default();
            let rules: Vec<&serde_json::Value> = rules["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().unwrap())
                .collect();
            rules.len() >= 8 && rules.iter().all(|r| r["health"] == "ok")
        });
        let alerts = groups.as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone());
        for alert in alerts {
            let expr = alert["expr"].as_str().unwrap();
            let mut metrics: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("bulkhead_") || *word == "up")
                .collect();
            metrics.dedup();
            for metric in metrics {
                let answer = query(&format!("count({{__name__=\"{metric}\"}})"));
                assert!(
                    answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty()),
                    "{}: {metric} has no series: {answer}",
                    alert["alert"]
                );
            }
        }
        Ok(())
    };
    let result = bulkhead_lab::demo::run_observed(watch, after);
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap();
}
