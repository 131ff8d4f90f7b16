//! `bulkhead flows`: a live tail of verdicts from agents, like `hubble
//! observe` without a separate system. It reads each agent's
//! `/debug/events` (loopback on its node by default: run it there, or give
//! the agent a reachable `--debug-address`), asking only for the events
//! after the last one it printed.

use std::{
    io::{Read, Write},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::agent::EventRecord;

#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    /// `name` or `namespace/name`.
    pub pod: Option<String>,
    pub verdict: Option<String>,
}

impl Filter {
    pub fn admits(&self, verdict: &EventRecord) -> bool {
        // Either end: the judging pod, or the peer as the agent named it
        // (`namespace/pod (address:port)`).
        let ends = [verdict.pod.as_str(), end_pod(&verdict.source), end_pod(&verdict.destination)];
        let namespace_ok = self
            .namespace
            .as_ref()
            .is_none_or(|ns| ends.iter().any(|end| end.split_once('/').is_some_and(|(n, _)| n == ns)));
        let pod_ok = self.pod.as_ref().is_none_or(|pod| {
            ends.iter().any(|end| *end == pod || end.split_once('/').is_some_and(|(_, name)| name == pod))
        });
        let verdict_ok = self.verdict.as_ref().is_none_or(|v| *v == verdict.verdict);
        namespace_ok && pod_ok && verdict_ok
    }
}

/// `namespace/pod` of an end named `namespace/pod (address:port)`; an
/// address alone is no pod.
fn end_pod(end: &str) -> &str {
    match end.split_once(" (") {
        Some((pod, _)) => pod,
        None => "",
    }
}

/// The verdicts an agent at `address` holds after `after`.
pub fn fetch(address: &str, after: u64) -> Result<Vec<EventRecord>> {
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("connecting to the agent's debug address {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /debug/events?after={after} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else { bail!("{address}: not an HTTP response") };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{address}: {}", head.lines().next().unwrap_or_default());
    }
    serde_json::from_str(body).with_context(|| format!("{address}: not the agent's events"))
}

/// Print what the agents hold (and, following, what comes) through the
/// filter, as a table or one JSON object per line.
pub fn tail(agents: &[String], filter: &Filter, follow: bool, json: bool) -> Result<()> {
    let mut after = vec![0u64; agents.len()];
    if !json {
        println!(
            "{:<12} {:<6} {:<7} {:<44} {:<44} {:<6} POLICY",
            "TIME (UTC)", "VERDICT", "DIR", "SOURCE", "DESTINATION", "PROTO"
        );
    }
    loop {
        for (agent, last) in agents.iter().zip(after.iter_mut()) {
            let verdicts = match fetch(agent, *last) {
                Ok(verdicts) => verdicts,
                Err(error) if follow => {
                    eprintln!("{error:#}; retrying");
                    continue;
                }
                Err(error) => return Err(error),
            };
            for verdict in verdicts {
                *last = (*last).max(verdict.seq);
                if !filter.admits(&verdict) {
                    continue;
                }
                if json {
                    println!("{}", serde_json::to_string(&verdict)?);
                } else {
                    print_row(&verdict);
                }
            }
        }
        std::io::stdout().flush()?;
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_row(verdict: &EventRecord) {
    let time = k8s_openapi::jiff::Timestamp::from_millisecond(verdict.time as i64)
        .map(|t| t.strftime("%H:%M:%S%.3f").to_string())
        .unwrap_or_default();
    let source =
        if verdict.hook == "connect" { format!("{} (connect)", verdict.source) } else { verdict.source.clone() };
    let policy = match verdict.rule {
        Some(rule) => format!("{} rule {rule}", verdict.policy),
        None if verdict.policy.is_empty() => "-".into(),
        None => format!("{} (no rule allows)", verdict.policy),
    };
    println!(
        "{time:<12} {:<6} {:<7} {source:<44} {:<44} {:<6} {policy}",
        verdict.verdict.to_uppercase(),
        verdict.direction,
        verdict.destination,
        verdict.protocol
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(verdict: &str, pod: &str, source: &str, destination: &str) -> EventRecord {
        EventRecord {
            seq: 1,
            time: 0,
            verdict: verdict.to_string().into(),
            direction: "ingress".into(),
            pod: pod.into(),
            source: source.into(),
            destination: destination.into(),
            protocol: "TCP".into(),
            policy: "shop/db-in".into(),
            rule: None,
            hook: "tc".into(),
        }
    }

    #[test]
    fn filters_match_either_end() {
        let denied = verdict("deny", "shop/db", "lab/probe (10.0.0.9:4000)", "shop/db (10.0.0.2:5432)");
        let filter = |namespace: Option<&str>, pod: Option<&str>, verdict: Option<&str>| Filter {
            namespace: namespace.map(String::from),
            pod: pod.map(String::from),
            verdict: verdict.map(String::from),
        };
        assert!(filter(None, None, None).admits(&denied));
        assert!(filter(Some("lab"), None, None).admits(&denied), "the source's namespace");
        assert!(filter(Some("shop"), Some("db"), Some("deny")).admits(&denied));
        assert!(filter(None, Some("lab/probe"), None).admits(&denied));
        assert!(!filter(Some("kube-system"), None, None).admits(&denied));
        assert!(!filter(None, Some("web"), None).admits(&denied));
        assert!(!filter(None, None, Some("audit")).admits(&denied));
        let outside = verdict("allow", "shop/web", "shop/web (10.0.0.1:5000)", "203.0.113.9:443");
        assert!(!filter(None, Some("203.0.113.9:443"), None).admits(&outside), "an address is no pod");
    }
}
