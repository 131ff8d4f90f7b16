//! Every invalid object yields an error naming kind, namespace/name, the
//! field path and why; it is left out of the compile and nothing else changes.

use bulkhead_policy::{self as policy, manifest, rules::Reason, Change, Snapshot};

fn policies(text: &str) -> Snapshot {
    manifest::parse("test", text).unwrap().into_iter().collect()
}

fn connection(spec: &str) -> String {
    format!("apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {{name: bad, namespace: shop}}\nspec:\n{spec}")
}

fn single_error(text: &str) -> policy::rules::ValidationError {
    let state = policy::compile(&policies(text));
    assert_eq!(state.rejected.len(), 1, "{:?}", state.rejected);
    state.rejected[0].clone()
}

#[test]
fn every_invalid_field_is_named() {
    let cases: &[(&str, &str, Reason, &str)] = &[
        (
            "  podSelector: {matchExpressions: [{key: app, operator: Near, values: [x]}]}\n",
            "spec.podSelector.matchExpressions[0].operator",
            Reason::InvalidSelector,
            "Near",
        ),
        (
            "  podSelector: {}\n  ingress:\n    - from: [{podSelector: {matchExpressions: [{key: app, operator: In}]}}]\n",
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
            Reason::InvalidSelector,
            "at least one value",
        ),
        (
            "  podSelector: {}\n  ingress:\n    - from: [{ipBlock: {cidr: 10.0.0.0/33}}]\n",
            "spec.ingress[0].from[0].ipBlock.cidr",
            Reason::InvalidCIDR,
            "10.0.0.0/33",
        ),
        (
            "  podSelector: {}\n  egress:\n    - to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]\n",
            "spec.egress[0].to[0].ipBlock.except[0]",
            Reason::InvalidCIDR,
            "not strictly inside cidr 10.0.0.0/16",
        ),
        (
            "  podSelector: {}\n  ingress:\n    - ports: [{port: 90, endPort: 80}]\n",
            "spec.ingress[0].ports[0].endPort",
            Reason::InvalidPort,
            "below port 90",
        ),
        (
            "  podSelector: {}\n  ingress:\n    - ports: [{port: http, endPort: 80}]\n",
            "spec.ingress[0].ports[0].endPort",
            Reason::InvalidPort,
            "named port",
        ),
        (
            "  podSelector: {}\n  ingress:\n    - ports: [{port: 0}]\n",
            "spec.ingress[0].ports[0].port",
            Reason::InvalidPort,
            "not a port number",
        ),
        (
            "  podSelector: {}\n  ingress:\n    - ports: [{port: Not_A_Name}]\n",
            "spec.ingress[0].ports[0].port",
            Reason::InvalidPort,
            "not a port name",
        ),
        (
            "  podSelector: {}\n  ingress:\n    - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n",
            "spec.ingress[0].from[0]",
            Reason::InvalidPeer,
            "cannot be combined",
        ),
        ("  podSelector: {}\n  ingress:\n    - from: [{}]\n", "spec.ingress[0].from[0]", Reason::InvalidPeer, "needs podSelector"),
    ];
    for (spec, field, reason, why) in cases {
        let error = single_error(&connection(spec));
        assert_eq!(error.field, *field, "{spec}");
        assert_eq!(error.reason, *reason, "{spec}");
        let text = error.to_string();
        assert!(text.starts_with("ConnectionPolicy shop/bad: "), "{text}");
        assert!(text.contains(field) && text.contains(why), "{text} should name {field} and say {why:?}");
    }
}

#[test]
fn cluster_priority_out_of_range() {
    let error = single_error("apiVersion: bulkhead.io/v1alpha1\nkind: ClusterConnectionPolicy\nmetadata: {name: guard}\nspec:\n  priority: 1001\n");
    assert_eq!((error.field.as_str(), error.reason), ("spec.priority", Reason::InvalidPriority));
    assert!(
        error.to_string().starts_with("ClusterConnectionPolicy guard: spec.priority: 1001 is outside 0..1000"),
        "{error}"
    );
}

#[test]
fn network_policy_unknown_protocol() {
    let error = single_error(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: web}\nspec:\n  podSelector: {}\n  ingress:\n    - ports: [{protocol: ICMP, port: 1}]\n",
    );
    assert_eq!((error.field.as_str(), error.reason), ("spec.ingress[0].ports[0].protocol", Reason::InvalidProtocol));
    assert!(error.to_string().starts_with("NetworkPolicy web/np: "), "{error}");
}

#[test]
fn an_unknown_crd_enum_value_is_named_at_parse_time() {
    let error =
        manifest::parse("policies.yaml", &connection("  podSelector: {}\n  mode: Loud\n")).unwrap_err().to_string();
    assert!(error.contains("ConnectionPolicy shop/bad") && error.contains("spec.mode"), "{error}");
}

#[test]
fn an_invalid_policy_is_left_out_and_the_rest_compiles_as_before() {
    let good = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: good, namespace: shop}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
    let mut snapshot = policies(good);
    snapshot.add_pod(policy::Pod {
        namespace: "shop".into(),
        name: "a".into(),
        labels: Default::default(),
        ips: vec!["10.0.0.1".parse().unwrap()],
        ports: Vec::new().into(),
        node_name: None,
        uid: None,
    });
    let before = policy::compile(&snapshot);
    for object in
        manifest::parse("bad", &connection("  podSelector: {}\n  ingress:\n    - ports: [{port: 70000}]\n")).unwrap()
    {
        snapshot.apply(Change::Applied(object));
    }
    let after = policy::compile(&snapshot);
    assert_eq!(after.rejected.len(), 1);
    assert_eq!(after.policy, before.policy);
    assert_eq!(after.ipcache, before.ipcache);
    assert!(policy::diff(&before, &after).is_empty(), "nothing to change in the datapath");
}

#[test]
fn host_bits_are_masked_off_with_a_warning_naming_the_field() {
    let with_host_bits = policies(&connection(
        "  podSelector: {}\n  ingress:\n    - from: [{ipBlock: {cidr: 10.1.2.3/16, except: [10.1.2.9/24]}}]\n",
    ));
    let masked = policies(&connection(
        "  podSelector: {}\n  ingress:\n    - from: [{ipBlock: {cidr: 10.1.0.0/16, except: [10.1.2.0/24]}}]\n",
    ));
    let policy = with_host_bits.policies.values().next().expect("accepted");
    let fields: Vec<&str> = policy.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(fields, ["spec.ingress[0].from[0].ipBlock.cidr", "spec.ingress[0].from[0].ipBlock.except[0]"]);
    assert!(policy.warnings[0].message.contains("enforced as 10.1.0.0/16"), "{:?}", policy.warnings);
    assert!(masked.policies.values().next().expect("accepted").warnings.is_empty());
    let (with_host_bits, masked) = (policy::compile(&with_host_bits), policy::compile(&masked));
    assert_eq!(with_host_bits.policy, masked.policy);
    assert!(with_host_bits.rejected.is_empty());
}

fn cluster_network(spec: &str) -> String {
    format!("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: guard}}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {{namespaces: {{}}}}\n{spec}")
}

#[test]
fn cluster_network_policy_fields_that_need_exactly_one_are_named() {
    let cases: &[(&str, &str, Reason, &str)] = &[
        (
            "  egress:\n    - action: Accept\n      to: [{namespaces: {}, networks: [10.0.0.0/8]}]\n",
            "spec.egress[0].to[0]",
            Reason::InvalidPeer,
            "exactly one of namespaces, pods, networks",
        ),
        ("  ingress:\n    - action: Deny\n      from: []\n", "spec.ingress[0].from", Reason::InvalidPeer, "at least one peer"),
        (
            "  egress:\n    - action: Deny\n      to: [{networks: [10.0.0.0/33]}]\n",
            "spec.egress[0].to[0].networks[0]",
            Reason::InvalidCIDR,
            "10.0.0.0/33",
        ),
        (
            "  ingress:\n    - action: Deny\n      from: [{namespaces: {}}]\n      protocols: [{tcp: {}, udp: {}}]\n",
            "spec.ingress[0].protocols[0]",
            Reason::InvalidProtocol,
            "exactly one of tcp, udp, sctp and destinationNamedPort",
        ),
        (
            "  ingress:\n    - action: Deny\n      from: [{namespaces: {}}]\n      protocols: [{udp: {destinationPort: {range: {start: 90, end: 80}}}}]\n",
            "spec.ingress[0].protocols[0].udp.destinationPort.range",
            Reason::InvalidPort,
            "start 90 must be below end 80",
        ),
        (
            "  ingress:\n    - action: Deny\n      from: [{namespaces: {}}]\n      protocols: [{destinationNamedPort: Web_Port}]\n",
            "spec.ingress[0].protocols[0].destinationNamedPort",
            Reason::InvalidPort,
            "not a port name",
        ),
    ];
    for (spec, field, reason, why) in cases {
        let error = single_error(&cluster_network(spec));
        assert_eq!((error.field.as_str(), error.reason), (*field, *reason), "{spec}");
        let text = error.to_string();
        assert!(text.starts_with("ClusterNetworkPolicy guard: "), "{text}");
        assert!(text.contains(why), "{text} should say {why:?}");
    }
    let subject = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Baseline\n  priority: 10\n  subject: {namespaces: {}, pods: {namespaceSelector: {}, podSelector: {}}}\n";
    assert_eq!(single_error(subject).field, "spec.subject");
}

/// A peer Bulkhead does not support never widens what is allowed: through it
/// an Accept or Pass rule matches nothing (a Pass matching more would skip the
/// tier's later Deny rules), a Deny rule every destination; a warning names it.
#[test]
fn unsupported_cluster_network_peers_fail_closed_with_a_warning() {
    let snapshot = policies(&cluster_network(
        "  egress:\n    - action: Accept\n      to: [{domainNames: [example.com]}, {networks: [10.9.0.0/16]}]\n    - action: Pass\n      to: [{nodes: {}}]\n    - action: Deny\n      to: [{nodes: {}}]\n",
    ));
    let policy = snapshot.policies.values().next().expect("accepted");
    let [_, egress] = &policy.rules;
    let accept = egress[0].peers.as_ref().expect("the Accept rule keeps only its networks");
    assert!(matches!(&accept[..], [policy::rules::Peer::IpBlock { .. }]), "{accept:?}");
    assert_eq!(egress[1].peers, Some(Vec::new()), "the Pass rule matches nothing");
    assert_eq!(egress[2].peers, None, "the Deny rule matches every destination");
    let fields: Vec<&str> = policy.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.egress[0].to[0].domainNames", "spec.egress[1].to[0].nodes", "spec.egress[2].to[0].nodes"]
    );
    assert!(policy.warnings.iter().all(|w| w.reason == "UnsupportedPeer"), "{:?}", policy.warnings);
}

#[test]
fn a_destination_named_port_matches_the_name_whatever_its_protocol() {
    let snapshot = policies(&cluster_network(
        "  ingress:\n    - action: Accept\n      from: [{namespaces: {}}]\n      protocols: [{destinationNamedPort: web}, {sctp: {}}]\n",
    ));
    let policy = snapshot.policies.values().next().expect("accepted");
    let ports = policy.rules[0][0].ports.as_ref().expect("ports");
    let named = ports.iter().filter(|p| matches!(p, policy::rules::PortMatch::Named { name, .. } if name == "web"));
    assert_eq!(named.count(), 3, "{ports:?}");
    assert!(ports.contains(&policy::rules::PortMatch::Range {
        protocol: bulkhead_crds::Protocol::SCTP,
        start: 0,
        end: u16::MAX
    }));
}
