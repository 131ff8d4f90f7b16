//! Packet parsing for the TC programs: Ethernet, IPv4 (options, fragments),
//! IPv6 (extension-header chain, fragments), TCP, UDP, SCTP, ICMPv4/v6.
//!
//! Headers in the skb's linear area are read directly (bounds-checked against
//! `data_end`, which the verifier enforces); anything beyond it, or deeper
//! than `DIRECT_READ_LIMIT`, through `bpf_skb_load_bytes`, which fails on a
//! short packet. Either way a truncated header is an error the caller drops,
//! never a read past the end.

use aya_ebpf::programs::TcContext;
use datapath_common::{proto, Address, ConnKey};

/// Per-CPU working memory of one TC program run: the packet as parsed, and
/// its connection as the endpoint sees it; and, across runs, how many TCP
/// packets this CPU passed without conntrack (see `judge_ip`).
pub struct Scratch {
    pub packet: Packet,
    pub conn: ConnKey,
    pub passed_untracked: u32,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_NONE: u8 = 59;
const NEXTHDR_DEST: u8 = 60;
/// Longest extension-header chain we walk; a longer one is dropped as
/// malformed rather than passed unparsed.
const MAX_IPV6_EXT_HEADERS: usize = 8;

pub enum Parsed {
    /// ARP: passes, as Kubernetes networking needs it.
    Arp,
    /// An IP packet, now in the `Packet` passed in.
    Ip,
}

/// What the datapath needs of one IP packet.
pub struct Packet {
    pub saddr: Address,
    pub daddr: Address,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// TCP's flags byte; 0 for other protocols and later fragments.
    pub tcp_flags: u8,
    pub ipv6: bool,
    pub l4: L4,
    pub fragment: Fragment,
}

pub enum L4 {
    /// TCP, UDP, SCTP or a protocol without ports.
    Plain,
    IcmpEcho,
    /// ICMP error about an earlier packet, quoted at this packet offset.
    IcmpError {
        quote_offset: u32,
    },
    /// Neighbour discovery and MLD: link-local control that always passes.
    NeighbourDiscovery,
    /// Another ICMP message.
    IcmpOther,
    /// A non-first fragment: ports come from the fragment map.
    LaterFragment,
}

pub struct Fragment {
    /// 0: not a fragment; 1: first fragment with more to come; 2: later fragment.
    pub kind: u8,
    pub id: u32,
}
pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

impl Packet {
    /// The first packet of a TCP handshake: SYN without ACK.
    #[inline(always)]
    pub fn opens_tcp(&self) -> bool {
        self.protocol == proto::TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A TCP packet past the connection's first: its ACK flag is set (a
    /// SYN's answer, or any later segment).
    #[inline(always)]
    pub fn acknowledges_tcp(&self) -> bool {
        self.protocol == proto::TCP && self.tcp_flags & TCP_ACK != 0
    }

    /// A TCP packet from the middle of a connection (ACK set, no SYN).
    #[inline(always)]
    pub fn continues_tcp(&self) -> bool {
        self.protocol == proto::TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK
    }
}

/// Parse failure: the packet is malformed or truncated, or not an L3 we know.
pub enum ParseError {
    Malformed,
    UnsupportedL3,
}

/// Direct reads only this deep, so the verifier sees a small bounded offset.
const DIRECT_READ_LIMIT: usize = 256;

/// Read a header at `offset`. Headers are read as structs of `u16`/`u32`
/// fields with plain loads, although a header may sit at any alignment in
/// the packet: the verifier allows unaligned packet reads where the CPU makes
/// them cheap (x86-64, arm64) and the JIT emits them as ordinary moves.
/// `read_unaligned` would be the textbook call, but LLVM's BPF backend then
/// splits every field into single-byte loads and shifts, which was a third
/// of the cost of a conntrack hit.
#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, ParseError> {
    if offset < DIRECT_READ_LIMIT {
        let start = ctx.data() + offset;
        if start + core::mem::size_of::<T>() <= ctx.data_end() {
            // SAFETY: `start..start + size_of::<T>()` lies within the linear
            // packet data (checked just above against `data_end`); on the
            // BPF target the load is one instruction per field whatever the
            // address's alignment (see above).
            return Ok(unsafe { (start as *const T).read() });
        }
    }
    ctx.load::<T>(offset).map_err(|_| ParseError::Malformed)
}

/// Parse into `packet`, which lives in per-CPU scratch memory: the BPF stack
/// (512 bytes) cannot hold it beside the flow keys.
#[inline(always)]
pub fn parse(ctx: &TcContext, packet: &mut Packet) -> Result<Parsed, ParseError> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, packet).map(|()| Parsed::Ip),
        ETH_P_IPV6 => parse_ipv6(ctx, packet).map(|()| Parsed::Ip),
        ETH_P_ARP => Ok(Parsed::Arp),
        _ => Err(ParseError::UnsupportedL3),
    }
}

/// Multi-byte fields in network byte order, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, packet: &mut Packet) -> Result<(), ParseError> {
    let ip = load::<Ipv4Header>(ctx, ETH_HLEN)?;
    if ip.version_ihl >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let header_len = ((ip.version_ihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be(ip.total_len) as usize;
    if header_len < 20 || total_len < header_len || ETH_HLEN + total_len > ctx.len() as usize {
        return Err(ParseError::Malformed);
    }
    let frag = u16::from_be(ip.frag);
    let more_fragments = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    let fragment = Fragment {
        kind: if offset != 0 {
            FRAG_LATER
        } else if more_fragments {
            FRAG_FIRST
        } else {
            FRAG_NONE
        },
        id: u16::from_be(ip.id) as u32,
    };
    packet.ipv6 = false;
    packet.saddr = Address::ipv4_mapped_word(ip.saddr);
    packet.daddr = Address::ipv4_mapped_word(ip.daddr);
    packet.protocol = ip.protocol;
    packet.sport = 0;
    packet.dport = 0;
    packet.tcp_flags = 0;
    packet.l4 = L4::LaterFragment;
    packet.fragment = fragment;
    if packet.fragment.kind == FRAG_LATER {
        return Ok(());
    }
    parse_l4(ctx, ETH_HLEN + header_len, false, packet)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

impl Ipv6Header {
    #[inline(always)]
    fn version(&self) -> u8 {
        self.version_class_flow.to_ne_bytes()[0] >> 4
    }
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, packet: &mut Packet) -> Result<(), ParseError> {
    let ip = load::<Ipv6Header>(ctx, ETH_HLEN)?;
    if ip.version() != 6 {
        return Err(ParseError::Malformed);
    }
    if ETH_HLEN + IPV6_HLEN + u16::from_be(ip.payload_len) as usize > ctx.len() as usize {
        return Err(ParseError::Malformed);
    }
    packet.ipv6 = true;
    packet.saddr = Address::from_words(ip.saddr);
    packet.daddr = Address::from_words(ip.daddr);
    packet.protocol = ip.next_header;
    packet.sport = 0;
    packet.dport = 0;
    packet.tcp_flags = 0;
    packet.l4 = L4::LaterFragment;
    packet.fragment = Fragment { kind: FRAG_NONE, id: 0 };
    let mut offset = ETH_HLEN + IPV6_HLEN;
    let mut next = ip.next_header;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let hdr = load::<[u8; 2]>(ctx, offset)?;
                next = hdr[0];
                offset += (hdr[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let hdr = load::<[u8; 2]>(ctx, offset)?;
                next = hdr[0];
                offset += (hdr[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let hdr = load::<[u8; 8]>(ctx, offset)?;
                next = hdr[0];
                let offset_flags = u16::from_be_bytes([hdr[2], hdr[3]]);
                packet.fragment.id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                packet.fragment.kind = if offset_flags >> 3 != 0 {
                    FRAG_LATER
                } else if offset_flags & 1 != 0 {
                    FRAG_FIRST
                } else {
                    FRAG_NONE
                };
                offset += 8;
                if packet.fragment.kind == FRAG_LATER {
                    packet.protocol = next;
                    return Ok(());
                }
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Err(ParseError::Malformed);
    }
    packet.protocol = next;
    if next == NEXTHDR_NONE {
        packet.l4 = L4::Plain;
        return Ok(());
    }
    parse_l4(ctx, offset, true, packet)
}

/// The fixed 20 bytes of a TCP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHeader {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    data_offset: u8,
    flags: u8,
    window: u16,
    check: u16,
    urgent: u16,
}

/// The first bytes of UDP and SCTP (whose common header is 12 bytes: the
/// ports, a verification tag and a checksum).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ports<const LEN: usize> {
    sport: u16,
    dport: u16,
    rest: [u16; LEN],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHeader {
    kind: u8,
    code: u8,
    check: u16,
    id: u16,
    sequence: u16,
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, offset: usize, ipv6: bool, packet: &mut Packet) -> Result<(), ParseError> {
    match packet.protocol {
        proto::TCP => {
            let hdr = load::<TcpHeader>(ctx, offset)?;
            if (hdr.data_offset >> 4) < 5 {
                return Err(ParseError::Malformed);
            }
            packet.sport = u16::from_be(hdr.sport);
            packet.dport = u16::from_be(hdr.dport);
            packet.tcp_flags = hdr.flags;
            packet.l4 = L4::Plain;
        }
        proto::UDP => {
            let hdr = load::<Ports<2>>(ctx, offset)?;
            packet.sport = u16::from_be(hdr.sport);
            packet.dport = u16::from_be(hdr.dport);
            packet.l4 = L4::Plain;
        }
        proto::SCTP => {
            let hdr = load::<Ports<4>>(ctx, offset)?;
            packet.sport = u16::from_be(hdr.sport);
            packet.dport = u16::from_be(hdr.dport);
            packet.l4 = L4::Plain;
        }
        proto::ICMP | proto::ICMPV6 if (packet.protocol == proto::ICMPV6) == ipv6 => {
            let hdr = load::<IcmpHeader>(ctx, offset)?;
            packet.l4 = icmp_message(hdr.kind, ipv6, (offset + 8) as u32);
            if let L4::IcmpEcho = packet.l4 {
                // An echo and its reply are one connection, keyed by the identifier.
                let id = u16::from_be(hdr.id);
                packet.sport = id;
                packet.dport = id;
            }
        }
        _ => packet.l4 = L4::Plain,
    }
    Ok(())
}

/// What an ICMP or ICMPv6 message is, by its type.
#[inline(always)]
fn icmp_message(kind: u8, ipv6: bool, quote_offset: u32) -> L4 {
    match (ipv6, kind) {
        // Echo request and reply.
        (false, 0 | 8) | (true, 128 | 129) => L4::IcmpEcho,
        // Destination unreachable, time exceeded, parameter problem (and,
        // for IPv6, packet too big).
        (false, 3 | 11 | 12) | (true, 1..=4) => L4::IcmpError { quote_offset },
        // MLD query/report/done, router/neighbour solicitation and
        // advertisement, redirect, MLDv2 report.
        (true, 130..=137 | 143) => L4::NeighbourDiscovery,
        _ => L4::IcmpOther,
    }
}

/// Fill `conn` with the addresses, protocol and ports of the packet an ICMP
/// error quotes, the endpoint's side first: `quoted_from_endpoint` says
/// whether the endpoint sent the quoted packet. Extension headers in a quoted
/// IPv6 packet are not walked: such a quote matches no connection and the
/// error is judged on its own.
#[inline(always)]
pub fn quoted_connection(
    ctx: &TcContext,
    offset: usize,
    ipv6: bool,
    quoted_from_endpoint: bool,
    conn: &mut ConnKey,
) -> Result<(), ParseError> {
    let (saddr, daddr, header_len, protocol) = if ipv6 {
        let ip = load::<Ipv6Header>(ctx, offset)?;
        if ip.version() != 6 {
            return Err(ParseError::Malformed);
        }
        (Address::from_words(ip.saddr), Address::from_words(ip.daddr), IPV6_HLEN, ip.next_header)
    } else {
        let ip = load::<Ipv4Header>(ctx, offset)?;
        let header_len = ((ip.version_ihl & 0x0f) as usize) * 4;
        if ip.version_ihl >> 4 != 4 || header_len < 20 {
            return Err(ParseError::Malformed);
        }
        (Address::ipv4_mapped_word(ip.saddr), Address::ipv4_mapped_word(ip.daddr), header_len, ip.protocol)
    };
    let ports_at = offset + header_len;
    let (sport, dport) = match protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            let hdr = load::<Ports<0>>(ctx, ports_at)?;
            (u16::from_be(hdr.sport), u16::from_be(hdr.dport))
        }
        proto::ICMP | proto::ICMPV6 => {
            let id = u16::from_be(load::<IcmpHeader>(ctx, ports_at)?.id);
            (id, id)
        }
        _ => (0, 0),
    };
    conn.protocol = protocol;
    if quoted_from_endpoint {
        (conn.local, conn.remote, conn.local_port, conn.remote_port) = (saddr, daddr, sport, dport);
    } else {
        (conn.local, conn.remote, conn.local_port, conn.remote_port) = (daddr, saddr, dport, sport);
    }
    Ok(())
}
