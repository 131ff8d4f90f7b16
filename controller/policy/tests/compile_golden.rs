//! Golden tests: policies in, the exact map entries out, written with names
//! instead of numbers: `direction peer ports -> verdict by policy#rule`.

use std::net::IpAddr;

use bulkhead_policy::{self as policy, identity::IdentityKey, manifest, DesiredState, Snapshot};
use datapath_common::{identity, policy_prefix, verdict, EGRESS, RULE_DEFAULT_DENY};

const CLUSTER: &str = r#"
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
kind: Namespace
metadata: {name: edge, labels: {team: edge}}
---
kind: Pod
metadata: {namespace: shop, name: pay, labels: {app: pay}}
spec: {containers: [{name: c, ports: [{containerPort: 8443, name: https}, {containerPort: 9000, protocol: UDP, name: stats}]}]}
status: {podIPs: [{ip: 10.0.1.1}]}
---
kind: Pod
metadata: {namespace: shop, name: db, labels: {app: db}}
status: {podIPs: [{ip: 10.0.1.2}]}
---
kind: Pod
metadata: {namespace: edge, name: gw, labels: {app: gw}}
spec: {containers: [{name: c, ports: [{containerPort: 8080, name: https}]}]}
status: {podIPs: [{ip: 10.0.2.1}]}
"#;

fn snapshot(policies: &str) -> Snapshot {
    [CLUSTER, policies].into_iter().flat_map(|text| manifest::parse("test", text).unwrap()).collect()
}

fn peer_name(state: &DesiredState, id: u32) -> String {
    match id {
        identity::ANY => "any".into(),
        id => match &state.identities[&id] {
            IdentityKey::Pod { namespace, labels, cidr, .. } => {
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                match cidr {
                    Some(c) => format!("{namespace}{{{}}}@{c}", labels.join(",")),
                    None => format!("{namespace}{{{}}}", labels.join(",")),
                }
            }
            IdentityKey::Cidr(net) => format!("cidr:{net}"),
        },
    }
}

/// The entries of one pod, by name, sorted.
fn entries(state: &DesiredState, pod: &str) -> Vec<String> {
    let (ns, name) = pod.split_once('/').unwrap();
    let endpoint = state.endpoints[&policy::PodRef::new(ns, name)].id;
    let mut out: Vec<String> = state
        .policy
        .iter()
        .filter(|((_, key), _)| key.endpoint() == endpoint)
        .map(|((prefix_len, key), value)| {
            let direction = if key.direction() == EGRESS { "egress" } else { "ingress" };
            let ports = if *prefix_len == policy_prefix::ANY_PROTOCOL {
                "all".to_string()
            } else {
                let name = match key.protocol() {
                    6 => "tcp",
                    17 => "udp",
                    132 => "sctp",
                    _ => "?",
                };
                format!("{name}/{}/{}", key.port(), prefix_len - policy_prefix::ANY_PORT)
            };
            let verdict = if value.verdict == verdict::ALLOW { "allow" } else { "deny" };
            let by = match state.policy_names.get(&value.policy_id) {
                None => "default".to_string(),
                Some(p) if value.rule == RULE_DEFAULT_DENY => format!("{}#isolated", p.qualified_name()),
                Some(p) => format!("{}#{}", p.qualified_name(), value.rule),
            };
            let audit = if value.audit != 0 {
                format!(" audit:{}#{}", state.policy_names[&value.audit_policy_id].qualified_name(), value.audit_rule)
            } else {
                String::new()
            };
            format!("{direction} {} {ports} -> {verdict} {by}{audit}", peer_name(state, key.identity()))
        })
        .collect();
    out.sort();
    out
}

fn assert_entries(state: &DesiredState, pod: &str, expected: &[&str]) {
    let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(entries(state, pod), expected, "entries of {pod}");
}

const NO_POLICY: [&str; 2] = ["egress any all -> allow default", "ingress any all -> allow default"];

#[test]
fn unselected_pods_get_one_allow_entry_per_direction() {
    let state = policy::compile(&snapshot(""));
    assert_entries(&state, "shop/pay", &NO_POLICY);
}

#[test]
fn pod_and_namespace_selectors_alone_and_together() {
    let state = policy::compile(&snapshot(
        r#"
kind: ConnectionPolicy
apiVersion: bulkhead.io/v1alpha1
metadata: {name: pay-in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: pay}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: db}}}]
      ports: [{port: 8443}]
    - from: [{namespaceSelector: {matchLabels: {team: edge}}, podSelector: {matchLabels: {app: gw}}}]
      ports: [{protocol: SCTP, port: 7000}]
"#,
    ));
    assert_entries(
        &state,
        "shop/pay",
        &[
            "egress any all -> allow default",
            "ingress any all -> deny shop/pay-in#isolated",
            "ingress shop{app=db} tcp/8443/16 -> allow shop/pay-in#0",
            "ingress edge{app=gw} sctp/7000/16 -> allow shop/pay-in#1",
        ],
    );
    // db is not selected by the policy: untouched.
    assert_entries(&state, "shop/db", &NO_POLICY);
}

#[test]
fn ports_ranges_named_ports_and_protocols() {
    let state = policy::compile(&snapshot(
        r#"
kind: ConnectionPolicy
apiVersion: bulkhead.io/v1alpha1
metadata: {name: ports, namespace: shop}
spec:
  podSelector: {matchLabels: {app: pay}}
  ingress:
    - ports: [{port: 9000, endPort: 9007}, {protocol: UDP, port: 53}, {port: https}, {protocol: UDP, port: stats}, {protocol: SCTP, port: https}]
"#,
    ));
    assert_entries(
        &state,
        "shop/pay",
        &[
            "egress any all -> allow default",
            "ingress any all -> deny shop/ports#isolated",
            // 9000-9007 is one /13 prefix of the port space.
            "ingress any tcp/9000/13 -> allow shop/ports#0",
            "ingress any udp/53/16 -> allow shop/ports#0",
            // The named ports resolve against pay's own container ports;
            // no SCTP port is named https, so that entry opens nothing.
            "ingress any tcp/8443/16 -> allow shop/ports#0",
            "ingress any udp/9000/16 -> allow shop/ports#0",
        ],
    );
}

#[test]
fn egress_named_ports_resolve_per_destination_pod() {
    let state = policy::compile(&snapshot(
        r#"
kind: ConnectionPolicy
apiVersion: bulkhead.io/v1alpha1
metadata: {name: out, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Egress]
  egress:
    - to: [{namespaceSelector: {}}]
      ports: [{port: https}]
"#,
    ));
    assert_entries(
        &state,
        "shop/db",
        &[
            "ingress any all -> allow default",
            "egress any all -> deny shop/out#isolated",
            "egress shop{app=pay} tcp/8443/16 -> allow shop/out#0",
            "egress edge{app=gw} tcp/8080/16 -> allow shop/out#0",
        ],
    );
}

#[test]
fn ip_blocks_and_excepts_get_identities_and_ipcache_entries() {
    let state = policy::compile(&snapshot(
        r#"
kind: ConnectionPolicy
apiVersion: bulkhead.io/v1alpha1
metadata: {name: ext, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}]
      ports: [{port: 443}]
"#,
    ));
    assert_entries(
        &state,
        "shop/db",
        &[
            "ingress any all -> allow default",
            "egress any all -> deny shop/ext#isolated",
            "egress cidr:10.0.0.0/16 tcp/443/16 -> allow shop/ext#0",
            // Pod addresses inside the block carry the block in their identity.
            "egress shop{app=pay}@10.0.0.0/16 tcp/443/16 -> allow shop/ext#0",
            "egress shop{app=db}@10.0.0.0/16 tcp/443/16 -> allow shop/ext#0",
        ],
    );
    let mut named: Vec<(String, String)> = state
        .ipcache
        .iter()
        .map(|((len, addr), id)| {
            let ip = std::net::Ipv6Addr::from(*addr);
            let shown = match ip.to_ipv4_mapped() {
                Some(v4) => format!("{}/{}", IpAddr::V4(v4), len - 96),
                None => format!("{ip}/{len}"),
            };
            (shown, peer_name(&state, *id))
        })
        .collect();
    named.sort();
    assert_eq!(
        named,
        vec![
            ("10.0.0.0/16".to_string(), "cidr:10.0.0.0/16".to_string()),
            ("10.0.1.1/32".to_string(), "shop{app=pay}@10.0.0.0/16".to_string()),
            ("10.0.1.2/32".to_string(), "shop{app=db}@10.0.0.0/16".to_string()),
            ("10.0.2.0/24".to_string(), "cidr:10.0.2.0/24".to_string()),
            // gw sits in the except hole: its identity says so, and no entry opens it.
            ("10.0.2.1/32".to_string(), "edge{app=gw}@10.0.2.0/24".to_string()),
        ]
    );
}

#[test]
fn admin_and_baseline_tiers_priorities_pass_and_rule_order() {
    let state = policy::compile(&snapshot(
        r#"
kind: ClusterConnectionPolicy
apiVersion: bulkhead.io/v1alpha1
metadata: {name: b-second}
spec:
  priority: 10
  subject: {namespaceSelector: {matchLabels: {team: shop}}}
  ingress:
    - {action: Allow, from: [{podSelector: {matchLabels: {app: gw}}}]}
---
kind: ClusterConnectionPolicy
apiVersion: bulkhead.io/v1alpha1
metadata: {name: a-first}
spec:
  priority: 10
  subject: {namespaceSelector: {matchLabels: {team: shop}}}
  ingress:
    - {action: Deny, from: [{podSelector: {matchLabels: {app: gw}}}], ports: [{port: 22}]}
    - {action: Pass, from: [{podSelector: {matchLabels: {app: db}}}]}
    - {action: Allow, from: [{podSelector: {matchLabels: {app: db}}}]}
---
kind: ClusterConnectionPolicy
apiVersion: bulkhead.io/v1alpha1
metadata: {name: floor}
spec:
  tier: Baseline
  priority: 0
  subject: {podSelector: {matchLabels: {app: pay}}}
  ingress:
    - {action: Deny}
"#,
    ));
    assert_entries(
        &state,
        "shop/pay",
        &[
            "egress any all -> allow default",
            // Nothing names the peer: the Baseline floor denies.
            "ingress any all -> deny cluster/floor#0",
            // a-first before b-second (same priority, by name): port 22 from gw denied, the rest allowed.
            "ingress edge{app=gw} all -> allow cluster/b-second#0",
            "ingress edge{app=gw} tcp/22/16 -> deny cluster/a-first#0",
            // db: Pass skips the later Allow of the Admin tier; Baseline denies.
        ],
    );
    // db is not selected by the Baseline policy: Pass leads to "allowed".
    assert_entries(
        &state,
        "shop/db",
        &[
            "egress any all -> allow default",
            "ingress any all -> allow default",
            "ingress edge{app=gw} all -> allow cluster/b-second#0",
            "ingress edge{app=gw} tcp/22/16 -> deny cluster/a-first#0",
        ],
    );
}

#[test]
fn audit_policies_change_no_verdict_but_mark_would_be_denials() {
    let state = policy::compile(&snapshot(
        r#"
kind: ClusterConnectionPolicy
apiVersion: bulkhead.io/v1alpha1
metadata: {name: rollout}
spec:
  tier: Baseline
  priority: 100
  mode: Audit
  subject: {namespaceSelector: {matchLabels: {team: shop}}}
  ingress:
    - {action: Allow, from: [{namespaceSelector: {matchLabels: {team: edge}}}]}
    - {action: Deny}
"#,
    ));
    assert_entries(
        &state,
        "shop/pay",
        &[
            "egress any all -> allow default",
            "ingress any all -> allow default audit:cluster/rollout#1",
            "ingress edge{app=gw} all -> allow default",
        ],
    );
}

#[test]
fn a_new_pod_with_known_labels_reuses_its_identity() {
    let mut snap = snapshot("");
    let before = policy::compile(&snap);
    let mut twin = snap.pods[&policy::PodRef::new("shop", "pay")].clone();
    twin.name = "pay-2".into();
    twin.ips = vec!["10.0.1.9".parse().unwrap()];
    snap.add_pod(twin);
    let after = policy::compile(&snap);
    assert_eq!(before.identities, after.identities, "no new identity for a pod with known labels");
}

#[test]
fn a_named_port_to_every_peer_resolves_on_each_pod_that_names_it() {
    // Found by the property test: with no `to`, the destinations still need
    // entries of their own, since "any peer" resolves no port name.
    let state = policy::compile(&snapshot(
        r#"
kind: ClusterConnectionPolicy
apiVersion: bulkhead.io/v1alpha1
metadata: {name: no-https-out}
spec:
  priority: 1
  subject: {podSelector: {matchLabels: {app: db}}}
  egress:
    - {action: Deny, ports: [{port: https}]}
"#,
    ));
    assert_entries(
        &state,
        "shop/db",
        &[
            "ingress any all -> allow default",
            "egress any all -> allow default",
            "egress shop{app=pay} tcp/8443/16 -> deny cluster/no-https-out#0",
            "egress edge{app=gw} tcp/8080/16 -> deny cluster/no-https-out#0",
        ],
    );
}

#[test]
fn everyday_changes_are_compiled_incrementally() {
    // A label change, a new pod, a policy edit and a deletion each update the
    // compiler in place; only a namespace relabel compiles everything again.
    let policy = |port: u16| {
        format!(
            "kind: ConnectionPolicy\napiVersion: bulkhead.io/v1alpha1\nmetadata: {{name: db-in, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: pay}}}}}}], ports: [{{port: {port}}}]}}]\n"
        )
    };
    let mut snap = snapshot(&policy(5432));
    let mut compiler = policy::Compiler::new(&snap).tracking_changes();
    let mut untracked = policy::Compiler::new(&snap);
    type Edit = Box<dyn Fn(&mut Snapshot) -> policy::Changed>;
    let steps: Vec<(&str, Edit)> = vec![
        (
            "relabel",
            Box::new(|s: &mut Snapshot| {
                std::sync::Arc::make_mut(&mut s.pods.get_mut(&policy::PodRef::new("shop", "pay")).unwrap().labels)
                    .insert("tier".into(), "api".into());
                policy::Changed::Pod(policy::PodRef::new("shop", "pay"))
            }),
        ),
        (
            "new pod",
            Box::new(|s: &mut Snapshot| {
                let mut twin = s.pods[&policy::PodRef::new("shop", "pay")].clone();
                twin.name = "pay-2".into();
                twin.ips = vec!["10.0.1.9".parse().unwrap()];
                s.add_pod(twin);
                policy::Changed::Pod(policy::PodRef::new("shop", "pay-2"))
            }),
        ),
        (
            "policy edit",
            Box::new(move |s: &mut Snapshot| {
                let edited = snapshot(&policy(5433));
                let (key, object) = edited.policies.into_iter().next().unwrap();
                s.policies.insert(key.clone(), object);
                policy::Changed::Policy(key)
            }),
        ),
        (
            "pod deleted",
            Box::new(|s: &mut Snapshot| {
                s.pods.remove(&policy::PodRef::new("shop", "db"));
                policy::Changed::Pod(policy::PodRef::new("shop", "db"))
            }),
        ),
    ];
    for (what, step) in steps {
        let changed = step(&mut snap);
        compiler.update(&snap, [&changed]);
        untracked.update(&snap, [&changed]);
        assert_eq!(compiler.state(), &policy::compile(&snap), "{what}");
        assert_eq!(untracked.state(), compiler.state(), "{what}");
        assert!(untracked.take_ops().is_empty(), "a compiler not asked to track changes keeps none");
        assert_eq!(compiler.full_compiles(), 1, "{what} compiled everything again");
        assert!(!compiler.take_ops().is_empty(), "{what} changed no map entry");
    }
    let mut shop = snap.namespaces["shop"].clone();
    shop.labels.insert("env".into(), "prod".into());
    snap.add_namespace(shop);
    compiler.update(&snap, [&policy::Changed::Namespace("shop".into())]);
    assert_eq!(compiler.full_compiles(), 1, "a relabelled namespace with pods is compiled incrementally");
    assert_eq!(compiler.state(), &policy::compile(&snap));
}
