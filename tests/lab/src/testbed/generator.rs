//! A packet generator for floods: BPF_PROG_RUN of a tiny XDP program in
//! live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`). The kernel recycles
//! the frames from a page pool and sends each one the program returns
//! `XDP_TX` for out of the interface it names, so no socket buffer is
//! allocated or copied from userspace per packet. A veth hands the frames
//! to its peer, which builds socket buffers from them and runs its TC
//! programs on them, as for any packet sent through the veth.
//!
//! The program is nine instructions, loaded from raw bytecode: it writes a
//! random source port into the TCP or UDP header, so each frame is (almost
//! always) a new flow.
//!
//! Some kernels refuse live frames to a process without `CAP_SYS_RESOURCE`
//! (EPERM, even for a two-instruction program, while the same run without
//! the flag works): sandboxes drop that capability. There the generator
//! sends the same frames, ports randomised the same way, through a packet
//! socket bound to the interface with the qdisc bypassed. Each frame then
//! costs a socket buffer, so the rate is lower, but it takes the same path
//! from the veth on: the peer's TC programs judge every frame.
//! [`Generator::engine`] says which one sent.

use std::{
    cell::RefCell,
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};

use super::raw_program::{bpf, instruction, opcode, Instruction, RawProgram, BPF_PROG_TYPE_XDP};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const XDP_TX: i32 = 3;
const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
/// Ethernet (14) and IPv4 without options (20): the source port.
const SOURCE_PORT_AT: i16 = 34;
/// Frames per batch of the live mode (its maximum is 256).
const BATCH_SIZE: u32 = 256;
const ETHTOOL_SGRO: u32 = 0x2c;

/// `r6 = data; r7 = data_end; if data + 36 > data_end goto send;`
/// `*(u16 *)(data + 34) = bpf_get_prandom_u32(); send: return XDP_TX;`
fn program() -> [Instruction; 9] {
    use opcode::*;
    [
        instruction(LDX_W, 6, 1, 0, 0),
        instruction(LDX_W, 7, 1, 4, 0),
        instruction(MOV64_X, 8, 6, 0, 0),
        instruction(ADD64_K, 8, 0, 0, SOURCE_PORT_AT as i32 + 2),
        instruction(JGT_X, 8, 7, 2, 0),
        instruction(CALL, 0, 0, 0, BPF_FUNC_GET_PRANDOM_U32),
        instruction(STX_H, 6, 0, SOURCE_PORT_AT, 0),
        instruction(MOV64_K, 0, 0, 0, XDP_TX),
        instruction(EXIT, 0, 0, 0, 0),
    ]
}

/// The loaded generator program, and the packet socket that stands in
/// for it once the kernel has refused its live frames.
pub struct Generator {
    program: RawProgram,
    packet_socket: RefCell<Option<PacketSocket>>,
}

impl Generator {
    pub fn load() -> Result<Self> {
        Ok(Generator {
            program: RawProgram::load("the flood generator", BPF_PROG_TYPE_XDP, &program())?,
            packet_socket: RefCell::new(None),
        })
    }

    /// What has sent the frames: XDP live frames, or a packet socket where
    /// the kernel refused them.
    pub fn engine(&self) -> &'static str {
        if self.packet_socket.borrow().is_some() {
            "a packet socket (the kernel refused XDP live frames)"
        } else {
            "XDP live frames"
        }
    }

    /// Send `count` copies of `frame`, ports randomised, out of `ifindex`
    /// (an interface of the calling thread's network namespace).
    pub fn send(&self, ifindex: u32, frame: &[u8], count: u32) -> Result<()> {
        let mut packet_socket = self.packet_socket.borrow_mut();
        if packet_socket.is_none() {
            match self.send_live(ifindex, frame, count) {
                Err(error) if error.raw_os_error() == Some(libc::EPERM) => {
                    *packet_socket = Some(PacketSocket::bind(ifindex)?);
                }
                result => return result.context("the flood generator's run"),
            }
        }
        packet_socket.as_mut().expect("set above").send(frame, count)
    }

    fn send_live(&self, ifindex: u32, frame: &[u8], count: u32) -> std::io::Result<()> {
        // `struct xdp_md`: data 0, data_end the frame's length, data_meta 0,
        // ingress_ifindex; the rest zero.
        let mut context = [0u32; 6];
        context[1] = frame.len() as u32;
        context[3] = ifindex;
        let mut attr = [0u64; 10];
        attr[0] = self.program.fd() as u64; // prog_fd, retval
        attr[1] = frame.len() as u64; // data_size_in, data_size_out
        attr[2] = frame.as_ptr() as u64;
        attr[4] = u64::from(count); // repeat, duration
        attr[5] = std::mem::size_of_val(&context) as u64; // ctx_size_in, ctx_size_out
        attr[6] = context.as_ptr() as u64;
        attr[8] = u64::from(BPF_F_TEST_XDP_LIVE_FRAMES); // flags, cpu
        attr[9] = u64::from(BATCH_SIZE);
        if bpf(BPF_PROG_TEST_RUN, &mut attr) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A raw packet socket bound to one interface, its frames handed straight
/// to the driver (`PACKET_QDISC_BYPASS`), as live frames are.
struct PacketSocket {
    socket: OwnedFd,
    /// One batch of frames, back to back, rewritten per batch.
    batch: Vec<u8>,
    random: u64,
}

/// Frames per `sendmmsg`.
const SOCKET_BATCH: usize = 256;

impl PacketSocket {
    fn bind(ifindex: u32) -> Result<Self> {
        // SAFETY: a socket this function owns; `address` and `on` outlive
        // the calls that read them.
        unsafe {
            // Protocol 0: the socket sends and never receives.
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                bail!("a packet socket: {}", std::io::Error::last_os_error());
            }
            let socket = OwnedFd::from_raw_fd(fd);
            let mut address: libc::sockaddr_ll = std::mem::zeroed();
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_ifindex = ifindex as i32;
            let length = std::mem::size_of_val(&address) as u32;
            if libc::bind(fd, (&raw const address).cast(), length) != 0 {
                bail!("binding a packet socket to interface {ifindex}: {}", std::io::Error::last_os_error());
            }
            let on = 1i32;
            let size = std::mem::size_of_val(&on) as u32;
            if libc::setsockopt(fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, (&raw const on).cast(), size) != 0 {
                bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
            }
            Ok(PacketSocket { socket, batch: Vec::new(), random: 0x9e37_79b9_7f4a_7c15 })
        }
    }

    fn send(&mut self, frame: &[u8], count: u32) -> Result<()> {
        let mut left = count as usize;
        while left > 0 {
            let frames = left.min(SOCKET_BATCH);
            self.fill(frame, frames);
            let mut vectors: Vec<libc::iovec> = self
                .batch
                .chunks_exact_mut(frame.len())
                .map(|f| libc::iovec { iov_base: f.as_mut_ptr().cast(), iov_len: f.len() })
                .collect();
            // SAFETY: zeroed `mmsghdr`s are valid; each points at one iovec
            // of `vectors`, which outlives the call.
            let mut messages: Vec<libc::mmsghdr> = vectors
                .iter_mut()
                .map(|vector| {
                    let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    message.msg_hdr.msg_iov = vector;
                    message.msg_hdr.msg_iovlen = 1;
                    message
                })
                .collect();
            let mut sent = 0;
            while sent < frames {
                // SAFETY: `messages[sent..frames]` are valid headers (above).
                let n = unsafe {
                    libc::sendmmsg(self.socket.as_raw_fd(), messages[sent..].as_mut_ptr(), (frames - sent) as u32, 0)
                };
                if n < 0 {
                    let error = std::io::Error::last_os_error();
                    // A full queue on the peer: the frame did not go; again.
                    if error.raw_os_error() == Some(libc::ENOBUFS) {
                        std::thread::yield_now();
                        continue;
                    }
                    bail!("sending through the packet socket: {error}");
                }
                sent += n as usize;
            }
            left -= frames;
        }
        Ok(())
    }

    /// `frames` copies of `frame` in `batch`, each with a random source
    /// port, as the XDP program writes them.
    fn fill(&mut self, frame: &[u8], frames: usize) {
        self.batch.resize(frame.len() * frames, 0);
        for copy in self.batch.chunks_exact_mut(frame.len()) {
            copy.copy_from_slice(frame);
            // xorshift64: a source of ports, not of secrets.
            self.random ^= self.random << 13;
            self.random ^= self.random >> 7;
            self.random ^= self.random << 17;
            let at = SOURCE_PORT_AT as usize;
            if copy.len() >= at + 2 {
                copy[at..at + 2].copy_from_slice(&(self.random as u16).to_ne_bytes());
            }
        }
    }
}

/// Turn on GRO of a veth in the calling thread's namespace: a veth takes
/// the frames its peer sends with `XDP_TX` only when its NAPI is on, which
/// GRO turns on.
pub fn enable_veth_napi(interface: &str) -> Result<()> {
    // SAFETY: a socket this function owns, and an ifreq whose data pointer
    // outlives the ioctl.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(fd);
        let mut value = [ETHTOOL_SGRO, 1u32];
        let mut request: libc::ifreq = std::mem::zeroed();
        let name = CString::new(interface).context("interface name")?;
        for (to, from) in request.ifr_name.iter_mut().zip(name.as_bytes_with_nul()) {
            *to = *from as libc::c_char;
        }
        request.ifr_ifru.ifru_data = value.as_mut_ptr().cast();
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) != 0 {
            bail!("turning GRO on for {interface}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}
