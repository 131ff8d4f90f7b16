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
//! Some hosts refuse live frames (EPERM, even for a two-instruction
//! program, while the same run without the flag works; the only capability
//! a root process lacks on those we met is `CAP_SYS_RESOURCE`). There the generator
//! runs a TC program instead, without the flag: each repetition writes a
//! random source port into the run's one socket buffer and sends a clone
//! of it out of the interface (`bpf_clone_redirect`), eight times over.
//! Each frame then costs a clone and a copy of its head, but it takes the
//! same path from the veth on: the peer's TC programs judge every frame.
//! (A packet socket with `sendmmsg` was tried first: it sent 0.6–0.8× as
//! many frames a second as single clones, side by side.)
//! [`Generator::engine`] says which one sent.

use std::{
    cell::RefCell,
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};

use super::raw_program::{
    bpf, instruction, opcode, Instruction, RawProgram, BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP,
};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const XDP_TX: i32 = 3;
const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
const BPF_FUNC_SKB_STORE_BYTES: i32 = 9;
const BPF_FUNC_CLONE_REDIRECT: i32 = 13;
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

/// Clones sent by one repetition of the cloning program. A repetition's
/// clones are received in the one softirq pass that follows it; with one
/// clone a repetition, that pass was paid for each (bench flood: 0.93M
/// frames a second with one, 1.39M with 4, 1.52M with 8, 1.40M with 16).
const CLONES_PER_RUN: u32 = 8;

/// The loaded generator program, and the cloning programs that stand in
/// for it (loaded for one interface) once the kernel has refused its live
/// frames.
pub struct Generator {
    program: RawProgram,
    cloning: RefCell<Option<Cloning>>,
}

/// Cloning programs for one interface: one sending [`CLONES_PER_RUN`]
/// clones a repetition, one sending one for the rest of a count.
struct Cloning {
    ifindex: u32,
    batched: RawProgram,
    single: RawProgram,
}

impl Cloning {
    fn load(ifindex: u32) -> Result<Self> {
        let load = |clones| {
            RawProgram::load("the cloning generator", BPF_PROG_TYPE_SCHED_CLS, &clone_program(ifindex, clones))
        };
        Ok(Cloning { ifindex, batched: load(CLONES_PER_RUN)?, single: load(1)? })
    }

    fn send(&self, frame: &[u8], count: u32) -> Result<()> {
        run_cloning(&self.batched, frame, count / CLONES_PER_RUN)?;
        run_cloning(&self.single, frame, count % CLONES_PER_RUN)
    }
}

/// `repetitions` test runs of a cloning `program` on `frame`.
fn run_cloning(program: &RawProgram, frame: &[u8], repetitions: u32) -> Result<()> {
    // The kernel takes a repeat of 0 as 1.
    if repetitions == 0 {
        return Ok(());
    }
    let mut attr = [0u64; 10];
    attr[0] = program.fd() as u64; // prog_fd, retval
    attr[1] = frame.len() as u64; // data_size_in, data_size_out
    attr[2] = frame.as_ptr() as u64;
    attr[4] = u64::from(repetitions); // repeat, duration
    if bpf(BPF_PROG_TEST_RUN, &mut attr) != 0 {
        bail!("the cloning generator's run: {}", std::io::Error::last_os_error());
    }
    // The last repetition's redirects, ORed: nonzero if one failed.
    let returned = (attr[0] >> 32) as i32;
    if returned != 0 {
        bail!("the cloning generator's redirect failed ({returned:#x})");
    }
    Ok(())
}

impl Generator {
    pub fn load() -> Result<Self> {
        Ok(Generator {
            program: RawProgram::load("the flood generator", BPF_PROG_TYPE_XDP, &program())?,
            cloning: RefCell::new(None),
        })
    }

    /// What has sent the frames: XDP live frames, or clones where the
    /// kernel refused them.
    pub fn engine(&self) -> &'static str {
        if self.cloning.borrow().is_some() {
            "clones of one socket buffer (the kernel refused XDP live frames)"
        } else {
            "XDP live frames"
        }
    }

    /// Send `count` copies of `frame`, ports randomised, out of `ifindex`
    /// (an interface of the calling thread's network namespace).
    pub fn send(&self, ifindex: u32, frame: &[u8], count: u32) -> Result<()> {
        let mut cloning = self.cloning.borrow_mut();
        if cloning.is_none() {
            match self.send_live(ifindex, frame, count) {
                Err(error) if error.raw_os_error() == Some(libc::EPERM) => {}
                result => return result.context("the flood generator's run"),
            }
        }
        if cloning.as_ref().is_none_or(|loaded| loaded.ifindex != ifindex) {
            *cloning = Some(Cloning::load(ifindex)?);
        }
        cloning.as_ref().expect("set above").send(frame, count)
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

/// `clones` times over: `*(u32 *)(r10 - 4) = bpf_get_prandom_u32();`
/// `bpf_skb_store_bytes(skb, 34, r10 - 4, 2, 0);`
/// `r7 |= bpf_clone_redirect(skb, ifindex, 0);` and then `return r7`:
/// each repetition, `clones` clones of the run's buffer, each with a new
/// source port, out of `ifindex`; nonzero if any redirect failed.
fn clone_program(ifindex: u32, clones: u32) -> Vec<Instruction> {
    use opcode::*;
    let mut program = vec![instruction(MOV64_X, 6, 1, 0, 0), instruction(MOV64_K, 7, 0, 0, 0)];
    for _ in 0..clones {
        program.extend([
            instruction(CALL, 0, 0, 0, BPF_FUNC_GET_PRANDOM_U32),
            instruction(STX_W, 10, 0, -4, 0),
            instruction(MOV64_X, 1, 6, 0, 0),
            instruction(MOV64_K, 2, 0, 0, SOURCE_PORT_AT as i32),
            instruction(MOV64_X, 3, 10, 0, 0),
            instruction(ADD64_K, 3, 0, 0, -4),
            instruction(MOV64_K, 4, 0, 0, 2),
            instruction(MOV64_K, 5, 0, 0, 0),
            instruction(CALL, 0, 0, 0, BPF_FUNC_SKB_STORE_BYTES),
            instruction(MOV64_X, 1, 6, 0, 0),
            instruction(MOV64_K, 2, 0, 0, ifindex as i32),
            instruction(MOV64_K, 3, 0, 0, 0),
            instruction(CALL, 0, 0, 0, BPF_FUNC_CLONE_REDIRECT),
            instruction(OR64_X, 7, 0, 0, 0),
        ]);
    }
    program.extend([instruction(MOV64_X, 0, 7, 0, 0), instruction(EXIT, 0, 0, 0, 0)]);
    program
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
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL as _, &mut request) != 0 {
            bail!("turning GRO on for {interface}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}
