//! From a parsed packet (or a socket call) to a verdict: endpoint, peer
//! identity, conntrack, policy lookup, counters and events.

use core::sync::atomic::{compiler_fence, Ordering};

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_current_cgroup_id, bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_ns},
    maps::{lpm_trie::Key, PerCpuHashMap},
    programs::{SockAddrContext, TcContext},
};
use datapath_common::{
    capacity, identity, policy_prefix, prefixed_slot, proto, reason, verdict, Address, ConnKey, ConntrackValue,
    DropKey, EndpointInfo, Event, FragmentKey, FragmentValue, PolicyExactKey, PolicyKey, PolicyValue, VerdictKey,
    CONFIG_EVENTS_PER_SECOND, CONFIG_FLOW_EVENTS, CONFIG_POLICY_REVISION, CONNTRACK_FLAG_REVOKED, EGRESS,
    ENDPOINT_FLAG_FAIL_CLOSED, EVENT_AUDIT, EVENT_DENY, EVENT_NEW_FLOW, INGRESS, NO_ENDPOINT, SOURCE_CGROUP, SOURCE_TC,
    VERDICT_SLOT_CPUS,
};

use crate::{
    conntrack::{Found, Set, Stored},
    maps::{
        CGROUP_ENDPOINTS, CONFIG, DROPS, ENDPOINTS, ENDPOINTS_BY_IFINDEX, EVENTS, EVENT_BUDGET, FRAGMENTS, IPCACHE,
        IPCACHE_EXACT, IPCACHE_TABLE, LOCAL_ADDRS, POLICY, POLICY_EXACT, POLICY_PREFIXED, POLICY_TABLE, SCRATCH,
        VERDICTS, VERDICT_SLOTS,
    },
    parse::{parse, quoted_connection, Packet, ParseError, Parsed, Scratch, FRAG_FIRST, FRAG_LATER, L4},
    refusals::first_refusal,
    table::{self, Busy},
};

/// A packet whose exact-table lookup found the agent writing is dropped
/// (`?` in the functions that return a drop reason).
impl From<Busy> for u8 {
    fn from(_: Busy) -> u8 {
        reason::TABLE_BUSY
    }
}

const DEFAULT_EVENTS_PER_SECOND: u64 = 1000;
/// One TCP packet in this many, of those passed without conntrack, refreshes
/// its connection's entry (`judge_ip`).
const REFRESH_EVERY: u32 = 16;
const SOCK_RAW: u32 = 3;
/// cgroup sock_addr verdicts.
const SOCKET_ALLOW: i32 = 1;
const SOCKET_REFUSE: i32 = 0;

#[inline(always)]
pub fn judge_packet(ctx: &TcContext, direction: u8) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Fail closed: these programs are only attached to pod veths; a packet we
    // cannot attribute to an endpoint is dropped rather than let through.
    let Some(endpoint) = endpoint_of(ifindex) else {
        count_drop(direction, reason::NO_ENDPOINT);
        return TC_ACT_SHOT;
    };
    // SAFETY: a hash-map value pointer stays valid for this program run; the
    // agent replaces endpoint values whole.
    let endpoint = unsafe { &*endpoint };
    if endpoint.is_pending() {
        return TC_ACT_OK;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        count_drop(direction, reason::MALFORMED);
        return TC_ACT_SHOT;
    };
    // SAFETY: per-CPU scratch, used by one program run at a time on this CPU.
    let scratch = unsafe { &mut *scratch };
    match parse(ctx, &mut scratch.packet) {
        Ok(Parsed::Arp) => return TC_ACT_OK,
        Ok(Parsed::Ip) => {}
        Err(ParseError::Malformed) => {
            count_drop(direction, reason::MALFORMED);
            return TC_ACT_SHOT;
        }
        Err(ParseError::UnsupportedL3) => {
            count_drop(direction, reason::UNSUPPORTED_L3);
            return TC_ACT_SHOT;
        }
    };
    match judge_ip(ctx, endpoint, direction, scratch) {
        Ok(()) => TC_ACT_OK,
        Err(why) => {
            count_drop(direction, why);
            TC_ACT_SHOT
        }
    }
}

/// The endpoint behind an interface: by index in the array for small
/// ifindexes (inlined by the verifier: no call, no hashing), else in the hash.
#[inline(always)]
fn endpoint_of(ifindex: u32) -> Option<*const EndpointInfo> {
    if ifindex < capacity::ENDPOINTS_BY_IFINDEX {
        let endpoint = ENDPOINTS_BY_IFINDEX.get_ptr(ifindex)?;
        // SAFETY: array value pointer valid for this run.
        return (unsafe { (*endpoint).endpoint_id } != NO_ENDPOINT).then_some(endpoint);
    }
    ENDPOINTS.get_ptr(ifindex)
}

#[inline(always)]
fn judge_ip(ctx: &TcContext, endpoint: &EndpointInfo, direction: u8, scratch: &mut Scratch) -> Result<(), u8> {
    let Scratch { packet, conn, passed_untracked } = scratch;
    let endpoint_id = endpoint.endpoint_id;
    if let L4::NeighbourDiscovery = packet.l4 {
        return Ok(());
    }
    let egress = direction == EGRESS;
    if egress && !endpoint.carries(&packet.saddr) {
        match LOCAL_ADDRS.get_ptr(&packet.saddr) {
            // SAFETY: map value pointer valid for this run.
            Some(owner) if unsafe { *owner } == endpoint_id => {}
            _ => return Err(reason::SPOOFED_SOURCE),
        }
    }
    if endpoint.flags & ENDPOINT_FLAG_FAIL_CLOSED != 0 {
        // Only the node's own traffic (kubelet probes) passes a failed-closed endpoint.
        let peer = peer_identity(if egress { &packet.daddr } else { &packet.saddr })?;
        return if peer == identity::HOST { Ok(()) } else { Err(reason::ENDPOINT_FAIL_CLOSED) };
    }
    let revision = policy_revision();

    if packet.fragment.kind == FRAG_LATER {
        let key = fragment_key(packet);
        let Some(ports) = FRAGMENTS.get_ptr(&key) else {
            return Err(reason::UNKNOWN_FRAGMENT);
        };
        // SAFETY: map value pointer valid for this run.
        let ports = unsafe { *ports };
        packet.sport = ports.sport;
        packet.dport = ports.dport;
    }

    if let L4::IcmpError { quote_offset } = packet.l4 {
        // The quoted packet travelled the other way: the endpoint sent it
        // when this error comes in.
        if quoted_connection(ctx, quote_offset as usize, packet.ipv6, !egress, conn).is_ok() {
            conn.endpoint = endpoint_id;
            (conn._pad, conn._pad2) = (0, 0);
            if let Some(found) = Set::of(conn).and_then(|set| set.find(conn).ok()) {
                if found.value.flags & CONNTRACK_FLAG_REVOKED == 0 {
                    return Ok(());
                }
            } else if conn.protocol == proto::TCP && tcp_allowed_both_ways(endpoint, conn) {
                // TCP that passes without conntrack (below) may have lost its
                // entry to newer connections: its errors (fragmentation
                // needed, above all) pass the same way as its segments.
                return Ok(());
            }
        }
    }

    // The connection's key, the endpoint's side first: one lookup finds it
    // whichever way this packet goes. Written field by field from the
    // chosen side's fields: building a whole `ConnKey` in each branch makes
    // LLVM build it on the stack and copy it over.
    let (local, remote, local_port, remote_port) = if egress {
        (&packet.saddr, &packet.daddr, packet.sport, packet.dport)
    } else {
        (&packet.daddr, &packet.saddr, packet.dport, packet.sport)
    };
    conn.local = *local;
    conn.remote = *remote;
    conn.endpoint = endpoint_id;
    conn.local_port = local_port;
    conn.remote_port = remote_port;
    conn.protocol = packet.protocol;
    (conn._pad, conn._pad2) = (0, 0);
    // TCP past its SYN, of a connection policy allows both ways: passed
    // without conntrack. Its entry is one connection's, cold at the first
    // packets and then moved between the CPUs of its two ends, where the
    // policy entries are shared by every connection between the same pods:
    // in real traffic those misses were most of what a packet cost
    // (BENCHMARKS.md). Anything else, a revoked connection above all, is
    // judged by conntrack as before, in the direction it was opened.
    if packet.acknowledges_tcp() && tcp_allowed_both_ways(endpoint, conn) {
        // Conntrack still has to know the connection is alive: a revoked
        // connection it has displaced would be picked up again (below) in
        // the direction policy still allows. One such packet in
        // `REFRESH_EVERY` on each CPU refreshes its connection's entry, so
        // a connection that carries traffic stays among the last its set
        // gives up, as it did when every packet refreshed it.
        *passed_untracked = passed_untracked.wrapping_add(1);
        if *passed_untracked % REFRESH_EVERY == 0 {
            if let Some(set) = Set::of(conn) {
                let _ = set.find(conn);
            }
        }
        remember_if_first_fragment(packet);
        return Ok(());
    }
    // Ports take part in policy for these only (ICMP echo's identifier does not).
    let has_ports = matches!(packet.l4, L4::Plain | L4::LaterFragment);
    let port = if has_ports { packet.dport } else { 0 };
    // A SYN opens a connection whatever conntrack holds, so policy alone
    // decides it, and a refused one never touches conntrack: under a scan
    // or a SYN flood the conntrack set's cache miss and its search were a
    // sixth of each refusal. (A SYN of a connection conntrack holds is a
    // retransmission under a policy that allowed it, or one that revoked it,
    // which `recheck` counts through the same refusal set.)
    let opens = packet.opens_tcp();
    let mut opened = None;
    if opens {
        let Some((peer, decision)) = judge_new(endpoint, conn, direction, port)? else {
            return Ok(());
        };
        if decision.verdict != verdict::ALLOW {
            return Err(refuse(conn, direction, peer, &decision, revision));
        }
        opened = Some((peer, decision));
    }
    // Never `None` (the set number is below the array's size); the verifier
    // wants the check, and failing closed is the safe answer anyway.
    let Some(set) = Set::of(conn) else {
        return Err(reason::MALFORMED);
    };
    let vacancy = match set.find(conn) {
        // A SYN the other way than the connection was opened starts a new
        // one, allowed above: a picked-up connection (below) never lets a
        // peer open what policy refuses it.
        Ok(found) if opens && found.value.origin != direction => return Ok(()),
        Ok(found) => {
            recheck(&set, &found, conn, has_ports, revision)?;
            // A reply's later fragments find their ports as a new flow's do.
            remember_if_first_fragment(packet);
            return Ok(());
        }
        Err(vacancy) => vacancy,
    };

    // A new connection.
    let (peer, mut decision) = match opened {
        Some(opened) => opened,
        None => match judge_new(endpoint, conn, direction, port)? {
            Some(judged) => judged,
            None => return Ok(()),
        },
    };
    let mut origin = direction;
    if decision.verdict != verdict::ALLOW && packet.continues_tcp() {
        // The middle of a TCP connection this datapath never saw open: one
        // older than the agent on this node (an install on a running
        // cluster), or whose entry was evicted. This packet may be the
        // answer to a connection opened the other way, to its source port:
        // picked up in that direction if policy allows it there.
        let opposite = if egress { INGRESS } else { EGRESS };
        let reverse = lookup_policy(endpoint_id, opposite, peer, packet.protocol, packet.sport)?;
        if reverse.verdict == verdict::ALLOW {
            (decision, origin) = (reverse, opposite);
        }
    }
    if decision.verdict == verdict::ALLOW {
        let entry = ConntrackValue { revision, peer_identity: peer, flags: 0, origin, _pad: [0; 2] };
        match set.store(conn, &entry, vacancy) {
            Stored::Free => {}
            Stored::Displaced | Stored::NotStored => count_drop(direction, reason::CONNTRACK_FULL),
        }
        remember_if_first_fragment(packet);
        if decision.audit != 0 {
            report(
                conn,
                origin,
                peer,
                &Reported {
                    kind: EVENT_AUDIT,
                    source: SOURCE_TC,
                    policy_id: decision.audit_policy_id,
                    rule: decision.audit_rule,
                },
            );
        } else if origin == EGRESS && flow_events_enabled() {
            report(
                conn,
                origin,
                peer,
                &Reported {
                    kind: EVENT_NEW_FLOW,
                    source: SOURCE_TC,
                    policy_id: decision.policy_id,
                    rule: decision.rule,
                },
            );
        }
        return Ok(());
    }
    Err(refuse(conn, direction, peer, &decision, revision))
}

/// The peer of a new connection and the policy entry for it; `None` for
/// the node itself, which Kubernetes requires to reach its pods (kubelet
/// probes).
#[inline(always)]
fn judge_new(
    endpoint: &EndpointInfo,
    conn: &ConnKey,
    direction: u8,
    port: u16,
) -> Result<Option<(u32, PolicyValue)>, u8> {
    let peer = peer_identity(&conn.remote)?;
    if peer == identity::HOST {
        return Ok(None);
    }
    if endpoint.is_open(direction) {
        return Ok(Some((peer, PolicyValue::UNRESTRICTED)));
    }
    Ok(Some((peer, lookup_policy(conn.endpoint, direction, peer, conn.protocol, port)?)))
}

/// Whether policy allows the TCP connection `conn` belongs to both ways:
/// opened by the endpoint to the remote's port, and by the remote to the
/// endpoint's. Then conntrack would pass its packets whichever way it was
/// opened, and need not be asked. Told only where it is cheap: for an
/// endpoint one of whose directions no policy restricts. That direction
/// allows its way at once; the other way's entry is the same for every
/// connection between the two (the endpoint's own port when it is connected
/// to, the peer's when it connects), so it is in cache. An entry an
/// Audit-mode rule marks is left to conntrack, which reports a connection
/// it picks up.
#[inline(always)]
fn tcp_allowed_both_ways(endpoint: &EndpointInfo, conn: &ConnKey) -> bool {
    let (open_egress, open_ingress) = (endpoint.is_open(EGRESS), endpoint.is_open(INGRESS));
    if !open_egress && !open_ingress {
        return false;
    }
    if open_egress && open_ingress {
        return true;
    }
    let Ok(peer) = peer_identity(&conn.remote) else {
        return false;
    };
    if peer == identity::HOST {
        return true;
    }
    let (direction, port) = if open_egress { (INGRESS, conn.local_port) } else { (EGRESS, conn.remote_port) };
    matches!(
        lookup_policy(conn.endpoint, direction, peer, proto::TCP, port),
        Ok(value) if value.verdict == verdict::ALLOW && value.audit == 0
    )
}

/// A connection policy refuses: counted and reported once, the first time;
/// its retransmissions under the same policy revision are dropped silently.
#[inline(always)]
fn refuse(conn: &ConnKey, direction: u8, peer: u32, decision: &PolicyValue, revision: u64) -> u8 {
    if first_refusal(conn, revision) {
        report(conn, direction, peer, &Reported::deny(decision, SOURCE_TC));
    }
    reason::POLICY_DENIED
}

/// Where the fragments of one packet find each other: addresses, IP id, protocol.
#[inline(always)]
fn fragment_key(packet: &Packet) -> FragmentKey {
    FragmentKey {
        saddr: packet.saddr,
        daddr: packet.daddr,
        id: packet.fragment.id,
        protocol: packet.protocol,
        _pad: 0,
        _pad2: 0,
    }
}

#[inline(always)]
fn remember_if_first_fragment(packet: &Packet) {
    if packet.fragment.kind == FRAG_FIRST {
        remember_fragment(packet);
    }
}

#[inline(never)]
fn remember_fragment(packet: &Packet) {
    let key = fragment_key(packet);
    let ports = FragmentValue { sport: packet.sport, dport: packet.dport, _pad: 0 };
    let _ = FRAGMENTS.insert(&key, &ports, 0);
}

/// An existing connection: admitted under `found.value.revision`. When
/// policy has changed since, the connection is judged again in the direction
/// it was opened, so a revoked allow cuts live connections instead of
/// lingering.
#[inline(always)]
fn recheck(set: &Set, found: &Found, conn: &ConnKey, has_ports: bool, revision: u64) -> Result<(), u8> {
    let entry = found.value;
    if entry.revision == revision {
        return if entry.flags & CONNTRACK_FLAG_REVOKED != 0 { Err(reason::POLICY_REVOKED) } else { Ok(()) };
    }
    let peer = peer_identity(&conn.remote)?;
    if peer == identity::HOST {
        return Ok(());
    }
    let origin = entry.origin;
    // The port the connection was opened to.
    let port = match (has_ports, origin == EGRESS) {
        (false, _) => 0,
        (true, true) => conn.remote_port,
        (true, false) => conn.local_port,
    };
    let decision = lookup_policy(conn.endpoint, origin, peer, conn.protocol, port)?;
    let allowed = decision.verdict == verdict::ALLOW;
    let flags = if allowed { 0 } else { CONNTRACK_FLAG_REVOKED };
    set.rewrite(found, revision, peer, flags);
    if allowed {
        Ok(())
    } else {
        // Through the refusal set: a retransmitted SYN may have been
        // refused under this revision already (`judge_ip`).
        if first_refusal(conn, revision) {
            report(conn, origin, peer, &Reported::deny(&decision, SOURCE_TC));
        }
        Err(reason::POLICY_REVOKED)
    }
}

/// The policy entry for one connection: the peer's own entries first, then
/// the "any peer" ones. Within each, a full-length entry (exact table) is the
/// most specific there can be; failing that the trie picks the most specific
/// protocol and port prefix. No entry at all is a deny: fail closed.
#[inline(always)]
pub fn lookup_policy(endpoint: u32, direction: u8, peer: u32, protocol: u8, port: u16) -> Result<PolicyValue, Busy> {
    if let Some(value) = policy_for(endpoint, direction, peer, protocol, port)? {
        return Ok(value);
    }
    if let Some(value) = policy_for(endpoint, direction, identity::ANY, protocol, port)? {
        return Ok(value);
    }
    Ok(PolicyValue::NO_ENTRY)
}

#[inline(always)]
fn policy_for(endpoint: u32, direction: u8, peer: u32, protocol: u8, port: u16) -> Result<Option<PolicyValue>, Busy> {
    let exact = PolicyExactKey::new(endpoint, peer, protocol, port, direction);
    if let Some(value) = table::lookup(&POLICY_TABLE, capacity::POLICY_TABLE_SETS, &POLICY_EXACT, &exact)? {
        return Ok(Some(value));
    }
    // No trie entry for this endpoint, direction and peer: no walk. Most
    // refusals end here (a default deny has no entry at all).
    if let Some(0) = POLICY_PREFIXED.get(prefixed_slot(endpoint, direction, peer)) {
        return Ok(None);
    }
    let key = Key::new(policy_prefix::FULL, PolicyKey::new(endpoint, direction, peer, protocol, port));
    Ok(POLICY.get(&key).copied())
}

#[inline(always)]
fn peer_identity(address: &Address) -> Result<u32, Busy> {
    if let Some(value) = table::lookup(&IPCACHE_TABLE, capacity::IPCACHE_TABLE_SETS, &IPCACHE_EXACT, address)? {
        return Ok(value.identity);
    }
    Ok(match IPCACHE.get(Key::new(128, *address)) {
        Some(value) => value.identity,
        None => identity::WORLD,
    })
}

#[inline(always)]
fn policy_revision() -> u64 {
    match CONFIG.get(CONFIG_POLICY_REVISION) {
        Some(revision) => *revision,
        None => 0,
    }
}

#[inline(always)]
fn bump<K>(map: &PerCpuHashMap<K, u64>, key: &K) {
    match map.get_ptr_mut(key) {
        // SAFETY: per-CPU value: no other writer on this CPU during the run.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = map.insert(key, 1, 0);
        }
    }
}

/// Count one verdict: in the key's slot of this CPU when it holds the key or
/// is free (an array element the verifier inlines), else in the hash.
#[inline(always)]
fn count_verdict(key: &VerdictKey) {
    // SAFETY: a helper without preconditions (inlined by the verifier).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if cpu < VERDICT_SLOT_CPUS {
        if let Some(slot) = VERDICT_SLOTS.get_ptr_mut(key.slot(cpu)) {
            // SAFETY: this CPU's slot: no other program writes it meanwhile;
            // the agent only frees a slot whose key names a pod gone.
            let slot = unsafe { &mut *slot };
            if slot.key.words() == key.words() {
                slot.count += 1;
                return;
            }
            if slot.is_free() {
                // The count, then the key with its endpoint last: the agent
                // reads the endpoint first, so it sees this key whole with
                // its count, or a free slot.
                slot.count = 1;
                slot.key = VerdictKey { endpoint: NO_ENDPOINT, ..*key };
                compiler_fence(Ordering::Release);
                slot.key.endpoint = key.endpoint;
                return;
            }
        }
    }
    bump(&VERDICTS, key);
}

#[inline(always)]
fn count_drop(direction: u8, why: u8) {
    if let Some(count) = DROPS.get_ptr_mut(DropKey { direction, reason: why }.slot()) {
        // SAFETY: per-CPU value: no other writer on this CPU during the run.
        unsafe { *count += 1 };
    }
}

/// What `report` says of a flow (a struct: BPF functions take at most five arguments).
#[derive(Clone, Copy)]
struct Reported {
    kind: u8,
    source: u8,
    policy_id: u32,
    rule: u32,
}

impl Reported {
    #[inline(always)]
    fn deny(decision: &PolicyValue, source: u8) -> Self {
        Reported { kind: EVENT_DENY, source, policy_id: decision.policy_id, rule: decision.rule }
    }
}

/// Count a deny or audit verdict of one connection, seen in `direction`,
/// and send an event (a new flow's only the event), within the per-CPU event
/// budget so a flood cannot starve userspace. One call frame with the event
/// written inline: the programs' own frame leaves little of the 512 bytes a
/// chain of calls may take.
#[inline(never)]
fn report(conn: &ConnKey, direction: u8, peer: u32, verdict: &Reported) {
    let Reported { kind, policy_id, rule, .. } = *verdict;
    if kind != EVENT_NEW_FLOW {
        count_verdict(&VerdictKey { endpoint: conn.endpoint, policy_id, rule, direction, kind, _pad: [0; 2] });
    }
    send_event(conn, direction, peer, verdict);
}

#[inline(always)]
fn flow_events_enabled() -> bool {
    matches!(CONFIG.get(CONFIG_FLOW_EVENTS), Some(enabled) if *enabled != 0)
}

/// Send an event of a connection seen in `direction` (addresses and ports as
/// a packet that way carries them), within the per-CPU budget; what the
/// budget keeps back is counted.
#[inline(always)]
fn send_event(conn: &ConnKey, direction: u8, peer: u32, verdict: &Reported) {
    let Reported { kind, source, policy_id, rule } = *verdict;
    let Some(now) = take_event_budget() else {
        count_drop(direction, reason::EVENT_RATE_LIMITED);
        return;
    };
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        count_drop(direction, reason::EVENT_RATE_LIMITED);
        return;
    };
    let (saddr, daddr, sport, dport) = if direction == EGRESS {
        (&conn.local, &conn.remote, conn.local_port, conn.remote_port)
    } else {
        (&conn.remote, &conn.local, conn.remote_port, conn.local_port)
    };
    // Written in place field by field: an Event (or its addresses) staged
    // on the stack would not fit beside the callers' frames.
    let event = slot.as_mut_ptr();
    // SAFETY: `event` points to reserved ring-buffer memory the size of an
    // Event; every field is written before `submit`.
    unsafe {
        (*event).timestamp_ns = now;
        (*event).saddr = *saddr;
        (*event).daddr = *daddr;
        (*event).endpoint = conn.endpoint;
        (*event).peer_identity = peer;
        (*event).policy_id = policy_id;
        (*event).rule = rule;
        (*event).sport = sport;
        (*event).dport = dport;
        (*event).protocol = conn.protocol;
        (*event).direction = direction;
        (*event).kind = kind;
        (*event).source = source;
    }
    slot.submit(0);
}

/// One event from this CPU's budget: the time it was taken (the event's
/// timestamp), or `None` when the budget of this second is spent.
#[inline(always)]
fn take_event_budget() -> Option<u64> {
    let limit = match CONFIG.get(CONFIG_EVENTS_PER_SECOND) {
        Some(limit) if *limit != 0 => *limit,
        _ => DEFAULT_EVENTS_PER_SECOND,
    };
    let budget = EVENT_BUDGET.get_ptr_mut(0)?;
    // SAFETY: per-CPU value, one writer per CPU at a time.
    let budget = unsafe { &mut *budget };
    if budget.sent >= limit {
        // Spent: whether the window has ended is asked once per clock tick
        // (jiffies, inlined by the verifier) instead of at every refusal,
        // where reading the clock cost more than counting the refusal. A new
        // window is seen at most one tick late.
        // SAFETY: a helper without preconditions.
        let tick = unsafe { bpf_jiffies64() };
        if tick == budget.spent_tick {
            return None;
        }
        budget.spent_tick = tick;
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(budget.window_start_ns) >= 1_000_000_000 {
        budget.window_start_ns = now;
        budget.sent = 0;
    }
    if budget.sent >= limit {
        return None;
    }
    budget.sent += 1;
    Some(now)
}

/// Egress verdict at connect()/sendmsg() time. Allows (1) or refuses with
/// EPERM (0). Anything this hook cannot judge completely is allowed here and
/// judged by the TC program on the pod's veth, which sees every packet:
/// raw sockets (their ports are in the payload), protocols other than TCP
/// and UDP, and sockets of cgroups that are no pod of ours.
#[inline(always)]
pub fn judge_socket(ctx: &SockAddrContext, ipv6: bool) -> i32 {
    // SAFETY: `sock_addr` is the context pointer the kernel passed in.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ == SOCK_RAW {
        return SOCKET_ALLOW;
    }
    let protocol = sa.protocol as u8;
    if protocol != proto::TCP && protocol != proto::UDP {
        return SOCKET_ALLOW;
    }
    // SAFETY: a helper without preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let Some(endpoint) = CGROUP_ENDPOINTS.get_ptr(cgroup) else {
        return SOCKET_ALLOW;
    };
    // SAFETY: map value pointer valid for this run.
    let endpoint = unsafe { *endpoint };
    // The words hold the address in network byte order as laid out in memory.
    let daddr = if ipv6 {
        Address::from_words([sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]])
    } else {
        Address::ipv4_mapped_word(sa.user_ip4)
    };
    if daddr.is_loopback() {
        return SOCKET_ALLOW;
    }
    if let Some(owner) = LOCAL_ADDRS.get_ptr(&daddr) {
        // SAFETY: map value pointer valid for this run.
        if unsafe { *owner } == endpoint.endpoint_id {
            return SOCKET_ALLOW; // a pod talking to itself never leaves it
        }
    }
    // An exact table the agent is writing: judged by TC, as above.
    let Ok(peer) = peer_identity(&daddr) else {
        return SOCKET_ALLOW;
    };
    if peer == identity::HOST {
        return SOCKET_ALLOW;
    }
    let port = u16::from_be(sa.user_port as u16);
    // The source address and port are not chosen yet at connect() time.
    let conn = ConnKey {
        local: Address::UNSPECIFIED,
        remote: daddr,
        endpoint: endpoint.endpoint_id,
        local_port: 0,
        remote_port: port,
        protocol,
        _pad: 0,
        _pad2: 0,
    };
    let decision = if endpoint.flags & ENDPOINT_FLAG_FAIL_CLOSED != 0 {
        PolicyValue::NO_ENTRY
    } else {
        match lookup_policy(endpoint.endpoint_id, EGRESS, peer, protocol, port) {
            Ok(decision) => decision,
            Err(Busy) => return SOCKET_ALLOW,
        }
    };
    if decision.verdict == verdict::ALLOW {
        // Audit verdicts are reported by TC, which sees the flow's first packet.
        return SOCKET_ALLOW;
    }
    if first_refusal(&conn, policy_revision()) {
        report(&conn, EGRESS, peer, &Reported::deny(&decision, SOURCE_CGROUP));
    }
    SOCKET_REFUSE
}
