//! Crafted packets for BPF_PROG_TEST_RUN tests and benchmarks: Ethernet,
//! IPv4 (with options and fragment fields) or IPv6 (with an extension-header
//! chain), and a TCP, UDP, SCTP or ICMP header.

use std::net::IpAddr;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMPv4 or ICMPv6 (by address family) with type, code and the 4 bytes after the checksum.
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
        quoted: Vec<u8>,
    },
    /// Any other protocol number with a raw payload.
    Raw {
        protocol: u8,
        payload: Vec<u8>,
    },
}

impl L4 {
    fn protocol(&self, ipv6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Sctp { .. } => 132,
            L4::Icmp { .. } => {
                if ipv6 {
                    58
                } else {
                    1
                }
            }
            L4::Raw { protocol, .. } => *protocol,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            L4::Tcp { sport, dport, flags } => {
                let mut b = vec![0u8; 20];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[12] = 5 << 4;
                b[13] = *flags;
                b[14..16].copy_from_slice(&64240u16.to_be_bytes());
                b
            }
            L4::Udp { sport, dport } => {
                let mut b = vec![0u8; 8];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[4..6].copy_from_slice(&8u16.to_be_bytes());
                b
            }
            L4::Sctp { sport, dport } => {
                let mut b = vec![0u8; 12];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b
            }
            L4::Icmp { kind, code, rest, quoted } => {
                let mut b = vec![*kind, *code, 0, 0];
                b.extend_from_slice(rest);
                b.extend_from_slice(quoted);
                b
            }
            L4::Raw { payload, .. } => payload.clone(),
        }
    }
}

/// One IP packet to craft.
#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// IPv4 options (padded to 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv4: (more fragments, offset in 8-byte units, id).
    pub ipv4_fragment: Option<(bool, u16, u16)>,
    /// IPv6 extension headers as (next-header number, body); a fragment
    /// header (44) body is (offset, more, id) encoded by `ipv6_fragment`.
    pub ipv6_extensions: Vec<(u8, Vec<u8>)>,
}

impl PacketSpec {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self { src, dst, l4, ipv4_options: vec![], ipv4_fragment: None, ipv6_extensions: vec![] }
    }

    /// The IP packet without the Ethernet header (as quoted in ICMP errors).
    pub fn ip_bytes(&self) -> Vec<u8> {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let payload = if matches!(self.ipv4_fragment, Some((_, off, _)) if off != 0) {
                    vec![0u8; 16]
                } else {
                    self.l4.bytes()
                };
                let mut options = self.ipv4_options.clone();
                while !options.len().is_multiple_of(4) {
                    options.push(0);
                }
                let header_len = 20 + options.len();
                let mut b = vec![0u8; header_len];
                b[0] = 0x40 | (header_len / 4) as u8;
                b[2..4].copy_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
                if let Some((more, offset, id)) = self.ipv4_fragment {
                    b[4..6].copy_from_slice(&id.to_be_bytes());
                    let field = (if more { 0x2000 } else { 0 }) | (offset & 0x1fff);
                    b[6..8].copy_from_slice(&field.to_be_bytes());
                }
                b[8] = 64;
                b[9] = self.l4.protocol(false);
                b[12..16].copy_from_slice(&src.octets());
                b[16..20].copy_from_slice(&dst.octets());
                b[20..].copy_from_slice(&options);
                let checksum = internet_checksum(&b);
                b[10..12].copy_from_slice(&checksum.to_be_bytes());
                b.extend_from_slice(&payload);
                b
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut chain = Vec::new();
                let mut later_fragment = false;
                for (index, (kind, body)) in self.ipv6_extensions.iter().enumerate() {
                    let next = match self.ipv6_extensions.get(index + 1) {
                        Some((next, _)) => *next,
                        None => self.l4.protocol(true),
                    };
                    let mut header = vec![next];
                    match *kind {
                        44 => {
                            header.push(0);
                            header.extend_from_slice(body);
                            if body.len() >= 2 && u16::from_be_bytes([body[0], body[1]]) >> 3 != 0 {
                                later_fragment = true;
                            }
                        }
                        51 => {
                            // AH: length in 4-byte units minus 2.
                            header.push(((body.len() + 2) / 4 - 2) as u8);
                            header.extend_from_slice(body);
                        }
                        _ => {
                            header.push(((body.len() + 2) / 8 - 1) as u8);
                            header.extend_from_slice(body);
                        }
                    }
                    chain.extend_from_slice(&header);
                }
                let first_next = match self.ipv6_extensions.first() {
                    Some((kind, _)) => *kind,
                    None => self.l4.protocol(true),
                };
                let payload = if later_fragment { vec![0u8; 16] } else { self.l4.bytes() };
                let mut b = vec![0u8; 40];
                b[0] = 0x60;
                b[4..6].copy_from_slice(&((chain.len() + payload.len()) as u16).to_be_bytes());
                b[6] = first_next;
                b[7] = 64;
                b[8..24].copy_from_slice(&src.octets());
                b[24..40].copy_from_slice(&dst.octets());
                b.extend_from_slice(&chain);
                b.extend_from_slice(&payload);
                b
            }
            _ => panic!("source and destination of a crafted packet must share a family"),
        }
    }

    /// The whole Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        let mut b = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        b.extend_from_slice(&ethertype.to_be_bytes());
        b.extend_from_slice(&self.ip_bytes());
        b
    }
}

/// Body of an IPv6 fragment header (after next-header and reserved).
pub fn ipv6_fragment(offset_units: u16, more: bool, id: u32) -> Vec<u8> {
    let field = (offset_units << 3) | more as u16;
    let mut body = field.to_be_bytes().to_vec();
    body.extend_from_slice(&id.to_be_bytes());
    body
}

/// An ARP request frame.
pub fn arp_frame() -> Vec<u8> {
    let mut b = vec![0xff; 6];
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06]);
    b.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    b.extend_from_slice(&[0u8; 20]);
    b
}

pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word =
            if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from_be_bytes([chunk[0], 0]) };
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
