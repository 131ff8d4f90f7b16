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

use std::{
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

/// The loaded generator program.
pub struct Generator {
    program: RawProgram,
}

impl Generator {
    pub fn load() -> Result<Self> {
        Ok(Generator { program: RawProgram::load("the flood generator", BPF_PROG_TYPE_XDP, &program())? })
    }

    /// Send `count` copies of `frame`, ports randomised, out of `ifindex`
    /// (an interface of the calling thread's network namespace).
    pub fn send(&self, ifindex: u32, frame: &[u8], count: u32) -> Result<()> {
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
            bail!("the flood generator's run: {}", std::io::Error::last_os_error());
        }
        Ok(())
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
