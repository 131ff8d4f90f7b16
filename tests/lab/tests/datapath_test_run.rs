//! Every parser branch and verdict of the TC programs, on crafted packets run
//! with BPF_PROG_TEST_RUN in this machine's kernel.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use bulkhead_lab::testbed::packet::{self, PacketSpec, L4, TCP_ACK, TCP_SYN};
use common::{TestDatapath, TC_ACT_OK, TC_ACT_SHOT};
use datapath_common::{
    capacity, identity, map_names, proto, reason, verdict, EndpointInfo, PolicyValue, VerdictKey, EGRESS,
    ENDPOINT_FLAG_OPEN_EGRESS, EVENT_DENY, INGRESS, IPV4_MAPPED_PREFIX, TABLE_WAYS, VERDICT_SLOTS_PER_CPU,
};

const POD: &str = "10.244.1.10";
const PEER: &str = "10.244.2.20";
const POD6: &str = "fd00:10:244::a";
const PEER6: &str = "fd00:10:244::14";
const PEER_ID: u32 = 1000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A datapath where endpoint 7 on loopback owns POD/POD6, the peer has
/// identity PEER_ID, and egress to PEER_ID on TCP 80, UDP 53 and SCTP 9000 is
/// allowed, plus ingress from PEER_ID on any protocol.
fn allowlist(name: &str) -> TestDatapath {
    let dp = TestDatapath::new(name);
    dp.endpoint_on_loopback(7, &[POD, POD6]);
    dp.identity(PEER, PEER_ID);
    dp.identity(PEER6, PEER_ID);
    for (protocol, port) in [(proto::TCP, 80), (proto::UDP, 53), (proto::SCTP, 9000)] {
        dp.rule(7, EGRESS, PEER_ID, Some((protocol, port, 16)), PolicyValue::new(verdict::ALLOW, 11, 0));
    }
    dp.rule(7, INGRESS, PEER_ID, None, PolicyValue::new(verdict::ALLOW, 12, 0));
    dp.rule(7, EGRESS, identity::ANY, None, PolicyValue::new(verdict::DENY, 13, 4));
    dp.rule(7, INGRESS, identity::ANY, None, PolicyValue::new(verdict::DENY, 13, 5));
    dp
}

fn out(src: &str, dst: &str, l4: L4) -> Vec<u8> {
    PacketSpec::new(ip(src), ip(dst), l4).frame()
}

#[test]
fn arp_passes_and_unknown_l3_is_dropped() {
    let dp = allowlist("arp");
    assert_eq!(dp.sent_by_pod(&packet::arp_frame()), TC_ACT_OK);
    let mut frame = packet::arp_frame();
    frame[12] = 0x88;
    frame[13] = 0xcc; // LLDP
    assert_eq!(dp.sent_by_pod(&frame), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::UNSUPPORTED_L3), 1);
}

#[test]
fn ipv4_tcp_allowed_port_passes_other_port_is_denied() {
    let dp = allowlist("v4tcp");
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 40000, dport: 80, flags: TCP_SYN })), TC_ACT_OK);
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 40001, dport: 81, flags: TCP_SYN })), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::POLICY_DENIED), 1);
    assert_eq!(dp.blocked(7, EGRESS, 13, 4), 1);
}

#[test]
fn replies_pass_through_conntrack_both_ways() {
    let dp = allowlist("reply");
    // Ingress from the peer on TCP 80 source is denied for a stranger...
    let stranger = "10.244.9.9";
    assert_eq!(
        dp.sent_to_pod(&out(stranger, POD, L4::Tcp { sport: 80, dport: 40000, flags: TCP_SYN | TCP_ACK })),
        TC_ACT_SHOT
    );
    // ...but the reply of a connection the pod opened passes.
    dp.identity(stranger, 2000);
    dp.rule(7, EGRESS, 2000, Some((proto::TCP, 443, 16)), PolicyValue::new(verdict::ALLOW, 14, 0));
    assert_eq!(dp.sent_by_pod(&out(POD, stranger, L4::Tcp { sport: 40002, dport: 443, flags: TCP_SYN })), TC_ACT_OK);
    assert_eq!(
        dp.sent_to_pod(&out(stranger, POD, L4::Tcp { sport: 443, dport: 40002, flags: TCP_SYN | TCP_ACK })),
        TC_ACT_OK
    );
    assert_eq!(dp.sent_by_pod(&out(POD, stranger, L4::Tcp { sport: 40002, dport: 443, flags: TCP_ACK })), TC_ACT_OK);
}

#[test]
fn a_connection_older_than_the_datapath_is_picked_up_only_the_way_policy_allows() {
    let dp = allowlist("pickup");
    let server = "10.244.9.9";
    dp.identity(server, 2000);
    dp.rule(7, EGRESS, 2000, Some((proto::TCP, 443, 16)), PolicyValue::new(verdict::ALLOW, 14, 0));
    // The pod's connection to the server's 443 was open before the programs
    // were attached: the server's next segment is its first packet seen.
    let answer = out(server, POD, L4::Tcp { sport: 443, dport: 40100, flags: TCP_ACK });
    assert_eq!(dp.sent_to_pod(&answer), TC_ACT_OK, "picked up as the pod's egress to 443");
    assert_eq!(dp.sent_by_pod(&out(POD, server, L4::Tcp { sport: 40100, dport: 443, flags: TCP_ACK })), TC_ACT_OK);
    // The server may not open a connection to the pod with that entry.
    let opening = out(server, POD, L4::Tcp { sport: 443, dport: 40100, flags: TCP_SYN });
    assert_eq!(dp.sent_to_pod(&opening), TC_ACT_SHOT, "a SYN the other way is judged as a new connection");
    assert_eq!(dp.drops(INGRESS, reason::POLICY_DENIED), 1);
    // Mid-stream segments that fit no allowed direction stay dropped.
    let stray = out(server, POD, L4::Tcp { sport: 5555, dport: 22, flags: TCP_ACK });
    assert_eq!(dp.sent_to_pod(&stray), TC_ACT_SHOT);
    assert_eq!(dp.drops(INGRESS, reason::POLICY_DENIED), 2);
}

#[test]
fn retransmitted_denied_syn_counts_one_blocked_connection() {
    let dp = allowlist("retrans");
    let syn = out(POD, PEER, L4::Tcp { sport: 40010, dport: 22, flags: TCP_SYN });
    for _ in 0..3 {
        assert_eq!(dp.sent_by_pod(&syn), TC_ACT_SHOT);
    }
    assert_eq!(dp.blocked(7, EGRESS, 13, 4), 1);
    assert_eq!(dp.drops(EGRESS, reason::POLICY_DENIED), 3);
    let events = dp.events();
    assert_eq!(events.len(), 1, "one deny event per refused flow: {events:?}");
    assert_eq!((events[0].policy_id, events[0].rule, events[0].dport), (13, 4, 22));
}

#[test]
fn a_refusal_counts_again_only_under_a_new_policy_revision() {
    let dp = allowlist("refusal-revision");
    let syn = out(POD, PEER, L4::Tcp { sport: 40020, dport: 22, flags: TCP_SYN });
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_SHOT);
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_SHOT);
    assert_eq!(dp.blocked(7, EGRESS, 13, 4), 1);
    // A policy change that still refuses it: judged again, counted again, once.
    dp.bump_revision();
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_SHOT);
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_SHOT);
    assert_eq!(dp.blocked(7, EGRESS, 13, 4), 2);
    assert_eq!(dp.events().len(), 2);
    // Allowed now: the remembered refusal does not stand in the way.
    dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, 22, 16)), PolicyValue::new(verdict::ALLOW, 11, 0));
    dp.bump_revision();
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_OK);
    assert_eq!(dp.blocked(7, EGRESS, 13, 4), 2);
}

#[test]
fn many_refused_connections_each_count_once_through_their_retransmissions() {
    let dp = allowlist("refusal-many");
    let syns: Vec<Vec<u8>> =
        (0..500).map(|i| out(POD, PEER, L4::Tcp { sport: 41000 + i, dport: 22, flags: TCP_SYN })).collect();
    for _ in 0..3 {
        for syn in &syns {
            assert_eq!(dp.sent_by_pod(syn), TC_ACT_SHOT);
        }
    }
    assert_eq!(dp.blocked(7, EGRESS, 13, 4), 500, "one count per connection, none per retransmission");
    assert_eq!(dp.drops(EGRESS, reason::POLICY_DENIED), 1500, "every packet dropped");
}

#[test]
fn udp_and_sctp_ports_are_enforced() {
    let dp = allowlist("udpsctp");
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Udp { sport: 5000, dport: 53 })), TC_ACT_OK);
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Udp { sport: 5000, dport: 54 })), TC_ACT_SHOT);
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Sctp { sport: 5000, dport: 9000 })), TC_ACT_OK);
    // TCP 9000 is not SCTP 9000.
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 5000, dport: 9000, flags: TCP_SYN })), TC_ACT_SHOT);
}

#[test]
fn icmp_echo_follows_any_protocol_rules_and_replies_pass() {
    let dp = allowlist("icmp");
    let echo = L4::Icmp { kind: 8, code: 0, rest: [0, 7, 0, 1], quoted: vec![] };
    // Egress allows only ports: ping out is denied.
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, echo.clone())), TC_ACT_SHOT);
    // Ingress allows any protocol from the peer: ping in passes, its reply too.
    assert_eq!(dp.sent_to_pod(&out(PEER, POD, echo)), TC_ACT_OK);
    let reply = L4::Icmp { kind: 0, code: 0, rest: [0, 7, 0, 1], quoted: vec![] };
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, reply)), TC_ACT_OK);
    let echo6 = L4::Icmp { kind: 128, code: 0, rest: [0, 9, 0, 1], quoted: vec![] };
    assert_eq!(dp.sent_to_pod(&out(PEER6, POD6, echo6)), TC_ACT_OK);
}

#[test]
fn icmp_errors_of_allowed_flows_pass_unrelated_ones_do_not() {
    let dp = allowlist("icmperr");
    let udp = PacketSpec::new(ip(POD), ip(PEER), L4::Udp { sport: 5001, dport: 53 });
    assert_eq!(dp.sent_by_pod(&udp.frame()), TC_ACT_OK);
    // Port unreachable from a host that is not the peer (a router): related.
    let router = "10.244.0.254";
    let quoted = udp.ip_bytes()[..28].to_vec();
    let error = L4::Icmp { kind: 3, code: 3, rest: [0; 4], quoted };
    assert_eq!(dp.sent_to_pod(&out(router, POD, error)), TC_ACT_OK);
    let unrelated = PacketSpec::new(ip(POD), ip(PEER), L4::Udp { sport: 5999, dport: 53 });
    let error = L4::Icmp { kind: 3, code: 3, rest: [0; 4], quoted: unrelated.ip_bytes()[..28].to_vec() };
    assert_eq!(dp.sent_to_pod(&out(router, POD, error)), TC_ACT_SHOT);
}

#[test]
fn spoofed_source_is_dropped_and_counted() {
    let dp = allowlist("spoof");
    assert_eq!(dp.sent_by_pod(&out("10.244.1.11", PEER, L4::Tcp { sport: 1, dport: 80, flags: TCP_SYN })), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::SPOOFED_SOURCE), 1);
    assert_eq!(
        dp.sent_by_pod(&out("fd00:10:244::b", PEER6, L4::Tcp { sport: 1, dport: 80, flags: TCP_SYN })),
        TC_ACT_SHOT
    );
    assert_eq!(dp.drops(EGRESS, reason::SPOOFED_SOURCE), 2);
}

#[test]
fn addresses_beyond_the_endpoint_entry_are_checked_in_the_address_map() {
    // The endpoint entry carries two addresses; a third is found in
    // LOCAL_ADDRS, and one owned by another endpoint is still a spoof.
    let dp = allowlist("spoof3");
    dp.endpoint_on_loopback(7, &[POD, POD6, "10.244.1.99"]);
    dp.endpoint_on_loopback(8, &["10.244.1.98"]);
    dp.endpoint_on_loopback(7, &[POD, POD6, "10.244.1.99"]);
    assert_eq!(dp.sent_by_pod(&out("10.244.1.99", PEER, L4::Tcp { sport: 1, dport: 80, flags: TCP_SYN })), TC_ACT_OK);
    assert_eq!(dp.sent_by_pod(&out("10.244.1.98", PEER, L4::Tcp { sport: 1, dport: 80, flags: TCP_SYN })), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::SPOOFED_SOURCE), 1);
}

#[test]
fn ipv6_tcp_and_udp_follow_the_same_rules() {
    let dp = allowlist("v6");
    assert_eq!(dp.sent_by_pod(&out(POD6, PEER6, L4::Tcp { sport: 40000, dport: 80, flags: TCP_SYN })), TC_ACT_OK);
    assert_eq!(dp.sent_by_pod(&out(POD6, PEER6, L4::Tcp { sport: 40000, dport: 81, flags: TCP_SYN })), TC_ACT_SHOT);
    assert_eq!(dp.sent_by_pod(&out(POD6, PEER6, L4::Udp { sport: 40000, dport: 53 })), TC_ACT_OK);
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_transport_header() {
    let dp = allowlist("v6ext");
    for (kind, body) in [(0u8, vec![0u8; 6]), (43, vec![0u8; 6]), (60, vec![0u8; 14]), (51, vec![0u8; 10])] {
        let mut spec =
            PacketSpec::new(ip(POD6), ip(PEER6), L4::Tcp { sport: 41000 + kind as u16, dport: 80, flags: TCP_SYN });
        spec.ipv6_extensions = vec![(kind, body.clone())];
        assert_eq!(dp.sent_by_pod(&spec.frame()), TC_ACT_OK, "allowed port behind extension header {kind}");
        let mut spec =
            PacketSpec::new(ip(POD6), ip(PEER6), L4::Tcp { sport: 42000 + kind as u16, dport: 22, flags: TCP_SYN });
        spec.ipv6_extensions = vec![(kind, body)];
        assert_eq!(dp.sent_by_pod(&spec.frame()), TC_ACT_SHOT, "denied port behind extension header {kind}");
    }
    // A chain longer than the parser walks is dropped as malformed.
    let mut spec = PacketSpec::new(ip(POD6), ip(PEER6), L4::Tcp { sport: 43000, dport: 80, flags: TCP_SYN });
    spec.ipv6_extensions = (0..9).map(|_| (60u8, vec![0u8; 6])).collect();
    assert_eq!(dp.sent_by_pod(&spec.frame()), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::MALFORMED), 1);
}

#[test]
fn ipv4_options_are_skipped() {
    let dp = allowlist("v4opt");
    let mut spec = PacketSpec::new(ip(POD), ip(PEER), L4::Tcp { sport: 40100, dport: 80, flags: TCP_SYN });
    spec.ipv4_options = vec![1, 1, 1, 1, 7, 7, 4, 0]; // NOPs and a record-route stub
    assert_eq!(dp.sent_by_pod(&spec.frame()), TC_ACT_OK);
    spec.l4 = L4::Tcp { sport: 40101, dport: 81, flags: TCP_SYN };
    assert_eq!(dp.sent_by_pod(&spec.frame()), TC_ACT_SHOT);
}

#[test]
fn later_fragments_pass_only_when_their_flow_is_known() {
    let dp = allowlist("frag");
    let mut first = PacketSpec::new(ip(POD), ip(PEER), L4::Udp { sport: 6000, dport: 53 });
    first.ipv4_fragment = Some((true, 0, 0x1234));
    let mut later = first.clone();
    later.ipv4_fragment = Some((false, 3, 0x1234));
    let mut stray = first.clone();
    stray.ipv4_fragment = Some((false, 3, 0x9999));
    assert_eq!(dp.sent_by_pod(&stray.frame()), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::UNKNOWN_FRAGMENT), 1);
    assert_eq!(dp.sent_by_pod(&first.frame()), TC_ACT_OK);
    assert_eq!(dp.sent_by_pod(&later.frame()), TC_ACT_OK);
    // The answer's fragments: its first finds the flow in conntrack, and
    // its later ones find the first's ports.
    let mut answer = PacketSpec::new(ip(PEER), ip(POD), L4::Udp { sport: 53, dport: 6000 });
    answer.ipv4_fragment = Some((true, 0, 0x5678));
    let mut answer_later = answer.clone();
    answer_later.ipv4_fragment = Some((false, 3, 0x5678));
    assert_eq!(dp.sent_to_pod(&answer.frame()), TC_ACT_OK);
    assert_eq!(dp.sent_to_pod(&answer_later.frame()), TC_ACT_OK);
    assert_eq!(dp.drops(INGRESS, reason::UNKNOWN_FRAGMENT), 0);

    // The same over IPv6's fragment header.
    let mut first6 = PacketSpec::new(ip(POD6), ip(PEER6), L4::Udp { sport: 6001, dport: 53 });
    first6.ipv6_extensions = vec![(44, packet::ipv6_fragment(0, true, 77))];
    let mut later6 = first6.clone();
    later6.ipv6_extensions = vec![(44, packet::ipv6_fragment(2, false, 77))];
    let mut stray6 = first6.clone();
    stray6.ipv6_extensions = vec![(44, packet::ipv6_fragment(2, false, 78))];
    assert_eq!(dp.sent_by_pod(&stray6.frame()), TC_ACT_SHOT);
    assert_eq!(dp.sent_by_pod(&first6.frame()), TC_ACT_OK);
    assert_eq!(dp.sent_by_pod(&later6.frame()), TC_ACT_OK);
    // A denied first fragment leaves its later fragments unknown.
    let mut denied = PacketSpec::new(ip(POD), ip(PEER), L4::Udp { sport: 6002, dport: 99 });
    denied.ipv4_fragment = Some((true, 0, 0x4444));
    let mut denied_later = denied.clone();
    denied_later.ipv4_fragment = Some((false, 3, 0x4444));
    assert_eq!(dp.sent_by_pod(&denied.frame()), TC_ACT_SHOT);
    assert_eq!(dp.sent_by_pod(&denied_later.frame()), TC_ACT_SHOT);
}

#[test]
fn truncated_and_malformed_headers_are_dropped() {
    let dp = allowlist("malformed");
    let good = out(POD, PEER, L4::Tcp { sport: 40200, dport: 80, flags: TCP_SYN });
    // Cut inside the TCP header, and right after the IP header. (The kernel's
    // BPF_PROG_TEST_RUN refuses frames that end inside the IP header itself;
    // an IHL pointing past the packet is tested below instead.)
    for cut in [14 + 20 + 10, 14 + 20 + 1, 14 + 20] {
        assert_eq!(dp.sent_by_pod(&good[..cut]), TC_ACT_SHOT, "cut at {cut}");
    }
    // IHL below 5, and IHL beyond the packet.
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    assert_eq!(dp.sent_by_pod(&bad_ihl), TC_ACT_SHOT);
    let mut long_ihl = good.clone();
    long_ihl[14] = 0x4f;
    assert_eq!(dp.sent_by_pod(&long_ihl), TC_ACT_SHOT);
    // Version 6 in an IPv4 ethertype.
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    assert_eq!(dp.sent_by_pod(&bad_version), TC_ACT_SHOT);
    // Total length beyond the frame.
    let mut long = good.clone();
    long[16] = 0x05;
    assert_eq!(dp.sent_by_pod(&long), TC_ACT_SHOT);
    // TCP data offset below 5.
    let mut bad_doff = good.clone();
    bad_doff[14 + 20 + 12] = 0x40;
    assert_eq!(dp.sent_by_pod(&bad_doff), TC_ACT_SHOT);
    // Truncated UDP, SCTP, ICMP and IPv6.
    for (l4, keep) in [
        (L4::Udp { sport: 1, dport: 53 }, 4),
        (L4::Sctp { sport: 1, dport: 9000 }, 8),
        (L4::Icmp { kind: 8, code: 0, rest: [0; 4], quoted: vec![] }, 4),
    ] {
        let mut spec = PacketSpec::new(ip(POD), ip(PEER), l4);
        let mut frame = spec.frame();
        frame.truncate(14 + 20 + keep);
        let total = (20 + keep) as u16;
        frame[16..18].copy_from_slice(&total.to_be_bytes());
        assert_eq!(dp.sent_by_pod(&frame), TC_ACT_SHOT);
        spec.src = ip(POD6);
        spec.dst = ip(PEER6);
        let frame = spec.frame();
        assert_eq!(dp.sent_by_pod(&frame[..14 + 40 + keep]), TC_ACT_SHOT);
    }
    assert_eq!(dp.drops(EGRESS, reason::MALFORMED), 14);
    assert_eq!(dp.drops(EGRESS, reason::POLICY_DENIED), 0, "no malformed packet reached the policy");
}

#[test]
fn node_traffic_and_neighbour_discovery_always_pass() {
    let dp = allowlist("host");
    let node = "10.244.1.1";
    dp.identity(node, identity::HOST);
    assert_eq!(dp.sent_to_pod(&out(node, POD, L4::Tcp { sport: 50000, dport: 8080, flags: TCP_SYN })), TC_ACT_OK);
    assert_eq!(
        dp.sent_by_pod(&out(POD, node, L4::Tcp { sport: 8080, dport: 50000, flags: TCP_SYN | TCP_ACK })),
        TC_ACT_OK
    );
    let ns = L4::Icmp { kind: 135, code: 0, rest: [0; 4], quoted: vec![0; 16] };
    assert_eq!(dp.sent_by_pod(&out("fe80::1", "ff02::1:ff00:1", ns)), TC_ACT_OK);
}

#[test]
fn most_specific_port_prefix_wins_and_ranges_cover_exactly() {
    let dp = allowlist("ranges");
    // 8000-8007 allowed as one /13 prefix of the port; 8003 denied by a longer one.
    dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, 8000, 13)), PolicyValue::new(verdict::ALLOW, 20, 0));
    dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, 8003, 16)), PolicyValue::new(verdict::DENY, 21, 0));
    for (port, expect) in
        [(7999, TC_ACT_SHOT), (8000, TC_ACT_OK), (8003, TC_ACT_SHOT), (8007, TC_ACT_OK), (8008, TC_ACT_SHOT)]
    {
        assert_eq!(
            dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 30000 + port, dport: port, flags: TCP_SYN })),
            expect,
            "port {port}"
        );
    }
}

#[test]
fn peer_entries_come_before_any_peer_entries_whichever_map_holds_them() {
    let dp = allowlist("peerfirst");
    let other = "10.244.3.30";
    dp.identity(other, 2000);
    // Any peer may reach TCP 8080 (a full-length entry: the exact hash), but
    // PEER_ID is denied 8080-8087 (a range: the trie). The peer's own entry wins.
    dp.rule(7, EGRESS, identity::ANY, Some((proto::TCP, 8080, 16)), PolicyValue::new(verdict::ALLOW, 50, 0));
    dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, 8080, 13)), PolicyValue::new(verdict::DENY, 51, 0));
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 47000, dport: 8080, flags: TCP_SYN })), TC_ACT_SHOT);
    assert_eq!(dp.blocked(7, EGRESS, 51, 0), 1);
    assert_eq!(dp.sent_by_pod(&out(POD, other, L4::Tcp { sport: 47001, dport: 8080, flags: TCP_SYN })), TC_ACT_OK);
    // And the other way round: the peer's exact allow beats any peer's range deny.
    dp.rule(7, EGRESS, identity::ANY, Some((proto::TCP, 9000, 13)), PolicyValue::new(verdict::DENY, 52, 0));
    dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, 9001, 16)), PolicyValue::new(verdict::ALLOW, 53, 0));
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 47002, dport: 9001, flags: TCP_SYN })), TC_ACT_OK);
    assert_eq!(dp.sent_by_pod(&out(POD, other, L4::Tcp { sport: 47003, dport: 9001, flags: TCP_SYN })), TC_ACT_SHOT);
    assert_eq!(dp.blocked(7, EGRESS, 52, 0), 1);
    // Removing the exact entry falls back to the range.
    dp.remove_rule(7, EGRESS, PEER_ID, Some((proto::TCP, 9001, 16)));
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 47004, dport: 9001, flags: TCP_SYN })), TC_ACT_SHOT);
}

#[test]
fn a_peers_prefix_entries_are_found_as_long_as_one_is_left_and_after_a_reload() {
    let dp = allowlist("prefixed");
    let tcp = |sport| out(PEER, POD, L4::Tcp { sport, dport: 8080, flags: TCP_SYN });
    let udp = |sport| out(PEER, POD, L4::Udp { sport, dport: 5353 });
    // The peer's ingress: any protocol (from `allowlist`), and any TCP port.
    dp.rule(7, INGRESS, PEER_ID, Some((proto::TCP, 0, 0)), PolicyValue::new(verdict::ALLOW, 60, 0));
    dp.rule(7, INGRESS, PEER_ID, Some((proto::TCP, 0, 0)), PolicyValue::new(verdict::ALLOW, 61, 0));
    assert_eq!(dp.sent_to_pod(&udp(41000)), TC_ACT_OK);
    // One of the two prefix entries removed: the other is still walked to.
    dp.remove_rule(7, INGRESS, PEER_ID, None);
    assert_eq!(dp.sent_to_pod(&udp(41001)), TC_ACT_SHOT, "any protocol is gone");
    assert_eq!(dp.sent_to_pod(&tcp(41002)), TC_ACT_OK, "any TCP port is still there");
    // A datapath from before the counts: they are taken from the trie at load.
    dp.reload_without(map_names::POLICY_PREFIXED);
    assert_eq!(dp.sent_to_pod(&tcp(41003)), TC_ACT_OK, "found after the reload");
    // The last one removed: the peer falls to the any-peer deny.
    dp.remove_rule(7, INGRESS, PEER_ID, Some((proto::TCP, 0, 0)));
    assert_eq!(dp.sent_to_pod(&tcp(41004)), TC_ACT_SHOT);
    assert_eq!(dp.blocked(7, INGRESS, 13, 5), 2);
}

#[test]
fn exact_entries_beyond_a_full_set_overflow_to_the_hash_and_are_still_found() {
    let dp = allowlist("overflow");
    // More addresses than the ipcache table has ways: sets fill, and their
    // later addresses go to the overflow hash.
    let count = capacity::IPCACHE_TABLE_SETS * TABLE_WAYS as u32 + 40_000;
    let address = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a64_0000 + i));
    let prefix = IPV4_MAPPED_PREFIX + 32;
    for i in 0..count {
        dp.dp.borrow_mut().set_ipcache(prefix, common::address_bytes(address(i)), PEER_ID).unwrap();
    }
    let (overflowed, _) = dp.dp.borrow().exact_overflow();
    assert!(overflowed >= 40_000, "{overflowed} addresses overflowed");
    assert_eq!(dp.dp.borrow().ipcache_entries().len(), count as usize + 2);
    // A restarted agent knows which keys are in the hash: writing them
    // again updates them where they are, overflowing nothing more.
    dp.reload();
    for i in 0..count {
        dp.dp.borrow_mut().set_ipcache(prefix, common::address_bytes(address(i)), PEER_ID).unwrap();
    }
    assert_eq!(dp.dp.borrow().exact_overflow().0, overflowed);
    assert_eq!(dp.dp.borrow().ipcache_entries().len(), count as usize + 2);
    // Each address has PEER_ID, whichever place holds it: TCP 80 passes.
    let syn = |i: u32, sport: u16| out(POD, &address(i).to_string(), L4::Tcp { sport, dport: 80, flags: TCP_SYN });
    let refused: Vec<u32> = (0..count).filter(|&i| dp.sent_by_pod(&syn(i, 40000)) != TC_ACT_OK).collect();
    assert!(
        refused.is_empty(),
        "{} addresses not found, first {:?}",
        refused.len(),
        refused.first().map(|&i| address(i))
    );
    // Half of them removed: the sets' overflow filters are made again from
    // the keys left in the hash, and those are still found.
    for i in (0..count).step_by(2) {
        dp.dp.borrow_mut().remove_ipcache(prefix, common::address_bytes(address(i))).unwrap();
    }
    let lost: Vec<u32> = (1..count).step_by(2).filter(|&i| dp.sent_by_pod(&syn(i, 40002)) != TC_ACT_OK).collect();
    assert!(lost.is_empty(), "{} addresses left not found, first {:?}", lost.len(), lost.first().map(|&i| address(i)));
    // Removed from both places: the addresses are world again, denied.
    for i in 0..count {
        dp.dp.borrow_mut().remove_ipcache(prefix, common::address_bytes(address(i))).unwrap();
    }
    assert_eq!(dp.dp.borrow().exact_overflow().0, 0);
    assert_eq!(dp.dp.borrow().ipcache_entries().len(), 2);
    let passed = (0..count).step_by(97).filter(|&i| dp.sent_by_pod(&syn(i, 40001)) == TC_ACT_OK).count();
    assert_eq!(passed, 0, "removed addresses still resolve");
}

#[test]
fn verdict_counts_are_exact_in_slots_and_hash_and_gone_pods_slots_are_freed() {
    let dp = allowlist("verdict-slots");
    // More keys than a CPU has slots: some share a slot, and the later ones
    // are counted in the hash.
    let keys = 2 * VERDICT_SLOTS_PER_CPU;
    let port = |i: u32| 20_000 + i as u16;
    for i in 0..keys {
        dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, port(i), 16)), PolicyValue::new(verdict::DENY, 100 + i, i));
    }
    let refuse_each = |sport: u16| {
        for i in 0..keys {
            let syn = out(POD, PEER, L4::Tcp { sport, dport: port(i), flags: TCP_SYN });
            assert_eq!(dp.sent_by_pod(&syn), TC_ACT_SHOT);
        }
    };
    refuse_each(50_000);
    refuse_each(50_001);
    let counts = |i: u32| dp.blocked(7, EGRESS, 100 + i, i);
    let wrong: Vec<(u32, u64)> = (0..keys).map(|i| (i, counts(i))).filter(|&(_, n)| n != 2).collect();
    assert!(wrong.is_empty(), "keys not counted twice (key, count): {wrong:?}");
    // A live pod's slots stay; a gone pod's are freed, and their counts
    // leave the totals.
    assert!(dp.dp.borrow_mut().free_verdict_slots(|_| true).is_empty());
    let freed = dp.dp.borrow_mut().free_verdict_slots(|endpoint| endpoint != 7);
    let in_slots: u64 = freed.values().sum();
    // Keys that share a slot: some counts in slots, the rest in the hash.
    assert!((u64::from(VERDICT_SLOTS_PER_CPU)..2 * u64::from(keys)).contains(&in_slots), "{in_slots} counts in slots");
    for i in 0..keys {
        let key =
            VerdictKey { endpoint: 7, policy_id: 100 + i, rule: i, direction: EGRESS, kind: EVENT_DENY, _pad: [0; 2] };
        assert_eq!(counts(i) + freed.get(&key).copied().unwrap_or(0), 2, "key {i}");
    }
    // The freed slots count again from 0, taken by whichever keys come first.
    refuse_each(50_002);
    for i in 0..keys {
        let key =
            VerdictKey { endpoint: 7, policy_id: 100 + i, rule: i, direction: EGRESS, kind: EVENT_DENY, _pad: [0; 2] };
        assert_eq!(counts(i) + freed.get(&key).copied().unwrap_or(0), 3, "key {i}");
    }
}

/// A veth with a chosen ifindex (this kernel has no dummy driver), removed
/// by name, with its peer, when dropped.
struct IndexedLink(&'static str);

impl IndexedLink {
    fn new(name: &'static str, ifindex: u32) -> Self {
        let _ = std::process::Command::new("ip").args(["link", "del", name]).status();
        let peer = format!("{name}p");
        let status = std::process::Command::new("ip")
            .args(["link", "add", name, "index", &ifindex.to_string(), "type", "veth", "peer", "name", &peer])
            .status()
            .unwrap();
        assert!(status.success(), "ip link add {name} index {ifindex}");
        IndexedLink(name)
    }
}

impl Drop for IndexedLink {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", self.0]).status();
    }
}

#[test]
fn endpoints_are_found_by_any_ifindex_and_gone_once_removed() {
    let dp = TestDatapath::new("ifindex");
    let syn = out(POD, PEER, L4::Tcp { sport: 48000, dport: 80, flags: TCP_SYN });
    // Beyond the ifindex-indexed array: the endpoint hash answers.
    let high = datapath_common::capacity::ENDPOINTS_BY_IFINDEX + 4464;
    let _link = IndexedLink::new("bh-test-ix", high);
    dp.endpoint_on(high, 8, &[POD]);
    dp.identity(PEER, PEER_ID);
    dp.rule(8, EGRESS, PEER_ID, Some((proto::TCP, 80, 16)), PolicyValue::new(verdict::ALLOW, 60, 0));
    assert_eq!(dp.sent_by_pod_on(high, &syn), TC_ACT_OK);
    assert_eq!(
        dp.sent_by_pod_on(high, &out(POD, PEER, L4::Tcp { sport: 48001, dport: 81, flags: TCP_SYN })),
        TC_ACT_SHOT
    );
    assert_eq!(dp.drops(EGRESS, reason::POLICY_DENIED), 1);
    // Loopback (ifindex 1) is in the array: nothing there until set.
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::NO_ENDPOINT), 1);
    dp.endpoint_on_loopback(8, &[POD]);
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_OK);
    // Removed endpoints drop everything again, whichever map held them.
    dp.dp.borrow_mut().remove_endpoint(1).unwrap();
    dp.dp.borrow_mut().remove_endpoint(high).unwrap();
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_SHOT);
    assert_eq!(dp.sent_by_pod_on(high, &syn), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::NO_ENDPOINT), 3);
}

#[test]
fn revoked_allow_cuts_an_established_connection() {
    let dp = allowlist("revoke");
    let syn = out(POD, PEER, L4::Tcp { sport: 45000, dport: 80, flags: TCP_SYN });
    let ack = out(POD, PEER, L4::Tcp { sport: 45000, dport: 80, flags: TCP_ACK });
    let reply = out(PEER, POD, L4::Tcp { sport: 80, dport: 45000, flags: TCP_ACK });
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_OK);
    assert_eq!(dp.sent_to_pod(&reply), TC_ACT_OK);
    dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, 80, 16)), PolicyValue::new(verdict::DENY, 30, 2));
    // Unchanged revision: conntrack still admits the flow.
    assert_eq!(dp.sent_by_pod(&ack), TC_ACT_OK);
    dp.bump_revision();
    assert_eq!(dp.sent_by_pod(&ack), TC_ACT_SHOT);
    assert_eq!(dp.sent_to_pod(&reply), TC_ACT_SHOT, "replies of a revoked connection are dropped too");
    assert_eq!(dp.drops(EGRESS, reason::POLICY_REVOKED), 1);
    assert_eq!(dp.blocked(7, EGRESS, 30, 2), 1);
    // Allowed again: the connection resumes.
    dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, 80, 16)), PolicyValue::new(verdict::ALLOW, 11, 0));
    dp.bump_revision();
    assert_eq!(dp.sent_by_pod(&ack), TC_ACT_OK);
}

#[test]
fn a_direction_no_policy_restricts_passes_without_entries_and_revocations_still_cut() {
    let dp = TestDatapath::new("open");
    dp.endpoint_on_loopback(9, &[POD]);
    dp.identity(PEER, PEER_ID);
    let open_egress = || {
        let flags = |endpoint| if endpoint == 9 { ENDPOINT_FLAG_OPEN_EGRESS } else { 0 };
        dp.dp.borrow_mut().set_open_directions(flags).unwrap();
    };
    let syn_out = |sport| out(POD, PEER, L4::Tcp { sport, dport: 443, flags: TCP_SYN });
    assert_eq!(dp.sent_by_pod(&syn_out(47000)), TC_ACT_SHOT, "no entries: refused");
    open_egress();
    assert_eq!(dp.sent_by_pod(&syn_out(47001)), TC_ACT_OK, "egress no policy restricts");
    // Ingress is still judged by its entries: the peer may open port 80 only.
    dp.rule(9, INGRESS, PEER_ID, Some((proto::TCP, 80, 16)), PolicyValue::new(verdict::ALLOW, 21, 0));
    assert_eq!(dp.sent_to_pod(&out(PEER, POD, L4::Tcp { sport: 47002, dport: 22, flags: TCP_SYN })), TC_ACT_SHOT);
    let syn_in = out(PEER, POD, L4::Tcp { sport: 47003, dport: 80, flags: TCP_SYN });
    let ack_in = out(PEER, POD, L4::Tcp { sport: 47003, dport: 80, flags: TCP_ACK });
    let reply = out(POD, PEER, L4::Tcp { sport: 80, dport: 47003, flags: TCP_ACK });
    assert_eq!(dp.sent_to_pod(&syn_in), TC_ACT_OK);
    assert_eq!(dp.sent_to_pod(&ack_in), TC_ACT_OK);
    assert_eq!(dp.sent_by_pod(&reply), TC_ACT_OK);
    // Revoked: the connection was opened to the pod, so it is cut both
    // ways, though the pod's egress is open and would allow it opened the
    // other way.
    dp.rule(9, INGRESS, PEER_ID, Some((proto::TCP, 80, 16)), PolicyValue::new(verdict::DENY, 22, 1));
    dp.bump_revision();
    assert_eq!(dp.sent_to_pod(&ack_in), TC_ACT_SHOT);
    assert_eq!(dp.sent_by_pod(&reply), TC_ACT_SHOT);
    assert_eq!(dp.drops(INGRESS, reason::POLICY_REVOKED), 1);
    assert_eq!(dp.drops(EGRESS, reason::POLICY_REVOKED), 1);
    // Without the flag, egress is judged by its entries again: none.
    dp.dp.borrow_mut().set_open_directions(|_| 0).unwrap();
    assert_eq!(dp.sent_by_pod(&syn_out(47004)), TC_ACT_SHOT);
    // A failed-closed endpoint stays closed whatever the flag says.
    open_egress();
    dp.fail_closed(9);
    assert_eq!(dp.sent_by_pod(&syn_out(47005)), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::ENDPOINT_FAIL_CLOSED), 1);
}

#[test]
fn a_handshake_cut_by_a_policy_change_is_counted_once() {
    let dp = allowlist("resyn");
    let syn = out(POD, PEER, L4::Tcp { sport: 45100, dport: 80, flags: TCP_SYN });
    let syn_ack = out(PEER, POD, L4::Tcp { sport: 80, dport: 45100, flags: TCP_SYN | TCP_ACK });
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_OK);
    dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, 80, 16)), PolicyValue::new(verdict::DENY, 31, 2));
    dp.bump_revision();
    // The SYN again before any answer: judged by policy alone, refused.
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::POLICY_DENIED), 1);
    // The answer to the first SYN finds the connection and revokes it: one
    // connection, one refusal counted and reported.
    assert_eq!(dp.sent_to_pod(&syn_ack), TC_ACT_SHOT);
    assert_eq!(dp.drops(INGRESS, reason::POLICY_REVOKED), 1);
    assert_eq!(dp.blocked(7, EGRESS, 31, 2), 1);
    assert_eq!(dp.events().iter().filter(|event| event.kind == EVENT_DENY).count(), 1);
    // Allowed again under a newer revision: the SYN opens it.
    dp.rule(7, EGRESS, PEER_ID, Some((proto::TCP, 80, 16)), PolicyValue::new(verdict::ALLOW, 11, 0));
    dp.bump_revision();
    assert_eq!(dp.sent_by_pod(&syn), TC_ACT_OK);
    assert_eq!(dp.sent_to_pod(&syn_ack), TC_ACT_OK);
}

#[test]
fn a_full_conntrack_set_displaces_its_least_recently_seen_connection() {
    let dp = allowlist("ctfull");
    let server = "10.244.3.30";
    dp.identity(server, 3000);
    dp.rule(7, EGRESS, 3000, Some((proto::TCP, 0, 0)), PolicyValue::new(verdict::ALLOW, 15, 0));
    // Ports with one sum: one conntrack set whatever the seed; nine of them
    // for eight ways. Ingress from the server is not allowed, so a reply
    // passes only while its connection is in conntrack.
    let ports = |i: u16| (41000 + i, 2000 - i);
    let open = |i: u16| {
        let (sport, dport) = ports(i);
        dp.sent_by_pod(&out(POD, server, L4::Tcp { sport, dport, flags: TCP_SYN }))
    };
    let reply = |i: u16| {
        let (sport, dport) = ports(i);
        dp.sent_to_pod(&out(server, POD, L4::Tcp { sport: dport, dport: sport, flags: TCP_SYN | TCP_ACK }))
    };
    for i in 0..8 {
        assert_eq!(open(i), TC_ACT_OK);
    }
    assert_eq!(dp.drops(EGRESS, reason::CONNTRACK_FULL), 0);
    // Let the clock (jiffies) move on, then see connection 0 again.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(reply(0), TC_ACT_OK);
    assert_eq!(open(8), TC_ACT_OK);
    assert_eq!(dp.drops(EGRESS, reason::CONNTRACK_FULL), 1, "the ninth connection displaced one");
    assert_eq!(reply(1), TC_ACT_SHOT, "connection 1, the least recently seen, was displaced");
    for i in [0, 2, 3, 4, 5, 6, 7, 8] {
        assert_eq!(reply(i), TC_ACT_OK, "connection {i} is still tracked");
    }
}

#[test]
fn audit_entries_never_drop_but_count_and_report() {
    let dp = allowlist("audit");
    dp.rule_audit(7, EGRESS, PEER_ID, Some((proto::TCP, 8443, 16)), 40, 1);
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 46000, dport: 8443, flags: TCP_SYN })), TC_ACT_OK);
    assert_eq!(dp.audited(7, EGRESS, 40, 1), 1);
    let events = dp.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, datapath_common::EVENT_AUDIT);
}

#[test]
fn endpoint_without_entries_and_fail_closed_endpoints_deny() {
    let dp = TestDatapath::new("failclosed");
    dp.endpoint_on_loopback(9, &[POD]);
    // No policy entries at all: fail closed.
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 1, dport: 80, flags: TCP_SYN })), TC_ACT_SHOT);
    dp.rule(9, EGRESS, identity::ANY, None, PolicyValue::new(verdict::ALLOW, 1, 0));
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 2, dport: 80, flags: TCP_SYN })), TC_ACT_OK);
    dp.fail_closed(9);
    assert_eq!(dp.sent_by_pod(&out(POD, PEER, L4::Tcp { sport: 3, dport: 80, flags: TCP_SYN })), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::ENDPOINT_FAIL_CLOSED), 1);
}

#[test]
fn a_pending_endpoint_passes_everything_until_its_real_entry_replaces_it() {
    let dp = allowlist("pending");
    let denied = out(POD, PEER, L4::Tcp { sport: 5000, dport: 81, flags: TCP_SYN });
    let denied_in = out("10.244.3.30", POD, L4::Tcp { sport: 5001, dport: 22, flags: TCP_SYN });
    let spoofed = out("10.244.9.9", PEER, L4::Udp { sport: 5002, dport: 53 });
    dp.dp.borrow_mut().set_endpoint(1, EndpointInfo::pending()).unwrap();
    // As if the programs were not attached: nothing is judged or counted.
    assert_eq!(dp.sent_by_pod(&denied), TC_ACT_OK);
    assert_eq!(dp.sent_to_pod(&denied_in), TC_ACT_OK);
    assert_eq!(dp.sent_by_pod(&spoofed), TC_ACT_OK);
    for direction in [EGRESS, INGRESS] {
        for why in [reason::POLICY_DENIED, reason::SPOOFED_SOURCE] {
            assert_eq!(dp.drops(direction, why), 0);
        }
    }
    assert!(dp.events().is_empty());
    // The compiled entry takes over: the same packets are judged.
    dp.endpoint_on_loopback(7, &[POD, POD6]);
    assert_eq!(dp.sent_by_pod(&denied), TC_ACT_SHOT);
    assert_eq!(dp.sent_to_pod(&denied_in), TC_ACT_SHOT);
    assert_eq!(dp.sent_by_pod(&spoofed), TC_ACT_SHOT);
    assert_eq!(dp.drops(EGRESS, reason::POLICY_DENIED), 1);
    assert_eq!(dp.drops(INGRESS, reason::POLICY_DENIED), 1);
    assert_eq!(dp.drops(EGRESS, reason::SPOOFED_SOURCE), 1);
}
