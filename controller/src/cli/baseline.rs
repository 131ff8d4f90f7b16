//! `bulkhead baseline list|reset|allow`: the egress baselines agents learned
//! (one per workload, merged across nodes), and the operator's edits to
//! them. In Kubernetes mode the baselines come from the agents' reports and
//! the edits go to the ConfigMap `bulkhead-baseline-edits` every agent reads;
//! in dir mode both are files of the agent's state directory.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use bulkhead_policy::baseline::{Change, Destination, Edit, Edits, Learned, Workload};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};

use super::cluster;
use crate::{
    agent::state_file::{read_path, write_atomically, EDITS_FILE},
    report::{BASELINE_EDITS_CONFIGMAP, EGRESS_BASELINES_ANNOTATION},
};

/// Where baselines and edits live.
pub enum Place {
    StateDir(std::path::PathBuf),
    Cluster { report_namespace: String },
}

/// Every workload's baseline, merged over nodes: destinations united, the
/// earliest start.
pub async fn list(place: &Place) -> Result<Vec<Learned>> {
    let reported: Vec<Learned> = match place {
        Place::StateDir(dir) => {
            let path = dir.join("egress-baselines.json");
            read_path(&path)
                .map_err(anyhow::Error::msg)?
                .with_context(|| format!("{}: no baselines", path.display()))?
        }
        Place::Cluster { report_namespace } => {
            cluster::reported::<Vec<Learned>>(&cluster::client().await?, report_namespace, EGRESS_BASELINES_ANNOTATION)
                .await?
                .into_iter()
                .flatten()
                .collect()
        }
    };
    let mut merged: BTreeMap<Workload, Learned> = BTreeMap::new();
    for learned in reported {
        match merged.get_mut(&learned.workload) {
            Some(known) => {
                known.since = known.since.min(learned.since);
                known.destinations.extend(learned.destinations);
            }
            None => {
                merged.insert(learned.workload.clone(), learned);
            }
        }
    }
    Ok(merged.into_values().collect())
}

pub fn print(baselines: &[Learned], namespace: Option<&str>) {
    for learned in baselines.iter().filter(|l| namespace.is_none_or(|ns| l.workload.namespace == ns)) {
        let since = k8s_openapi::jiff::Timestamp::from_second(learned.since as i64)
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        println!(
            "{}/{}  learning since {since} UTC, {} destination(s)",
            learned.workload.namespace,
            learned.workload.name,
            learned.destinations.len()
        );
        for destination in &learned.destinations {
            println!("  {}", destination_text(destination));
        }
    }
}

/// `peer:port/PROTOCOL`, as `allow` takes it.
pub fn destination_text(destination: &Destination) -> String {
    format!("{}:{}/{}", destination.peer, destination.port, crate::agent::protocol_name(destination.protocol))
}

/// `namespace/workload:443/TCP` or `203.0.113.7:443/TCP` (TCP when left out;
/// an IPv6 address in brackets: `[2001:db8::1]:443`).
pub fn parse_destination(text: &str) -> Result<Destination> {
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((rest, protocol)) if protocol.chars().all(|c| c.is_ascii_alphabetic()) => (rest, protocol),
        _ => (text, "TCP"),
    };
    let Some((peer, port)) = rest.rsplit_once(':') else { bail!("{text:?}: not peer:port[/protocol]") };
    use datapath_common::proto;
    let protocol = match protocol.to_ascii_uppercase().as_str() {
        "TCP" => proto::TCP,
        "UDP" => proto::UDP,
        "SCTP" => proto::SCTP,
        other => bail!("{text:?}: unknown protocol {other:?}: TCP, UDP or SCTP"),
    };
    let port = port.parse().with_context(|| format!("{text:?}: {port:?} is not a port"))?;
    let peer = peer.trim_start_matches('[').trim_end_matches(']').to_string();
    if peer.is_empty() {
        bail!("{text:?}: no peer");
    }
    Ok(Destination { peer, protocol, port })
}

/// Add an edit to the list every agent applies.
pub async fn edit(place: &Place, namespace: &str, workload: &str, change: Change) -> Result<()> {
    let at = crate::agent::audit_log::unix_now();
    let new = Edit { at, namespace: namespace.into(), workload: workload.into(), change };
    match place {
        Place::StateDir(dir) => {
            let path = dir.join(EDITS_FILE);
            let mut edits: Edits = read_path(&path).map_err(anyhow::Error::msg)?.unwrap_or_default();
            edits.edits.push(new);
            write_atomically(&path, &serde_json::to_string(&edits)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Place::Cluster { report_namespace } => {
            let configmaps: Api<ConfigMap> = Api::namespaced(cluster::client().await?, report_namespace);
            let current = configmaps.get_opt(BASELINE_EDITS_CONFIGMAP).await.context("reading the baseline edits")?;
            let mut edits: Edits = current
                .and_then(|cm| cm.data?.get("edits.json").cloned())
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .with_context(|| format!("ConfigMap {report_namespace}/{BASELINE_EDITS_CONFIGMAP} data edits.json"))?
                .unwrap_or_default();
            edits.edits.push(new);
            let configmap = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": BASELINE_EDITS_CONFIGMAP, "labels": { "app.kubernetes.io/name": "bulkhead" } },
                "data": { "edits.json": serde_json::to_string(&edits)? },
            });
            configmaps
                .patch(
                    BASELINE_EDITS_CONFIGMAP,
                    &PatchParams::apply("bulkhead-baseline").force(),
                    &Patch::Apply(&configmap),
                )
                .await
                .context("writing the baseline edits")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_read_as_they_print() {
        let d = parse_destination("shop/db:5432/TCP").unwrap();
        assert_eq!((d.peer.as_str(), d.port, d.protocol), ("shop/db", 5432, 6));
        assert_eq!(destination_text(&d), "shop/db:5432/TCP");
        assert_eq!(parse_destination("203.0.113.7:53/udp").unwrap().protocol, 17);
        assert_eq!(parse_destination("203.0.113.7:443").unwrap().protocol, 6, "TCP when left out");
        assert_eq!(parse_destination("[2001:db8::1]:443").unwrap().peer, "2001:db8::1");
        for bad in ["shop/db", "shop/db:http", "x:1/ICMP", ":80"] {
            assert!(parse_destination(bad).is_err(), "{bad}");
        }
    }
}
