//! BPF programs written as raw instructions and loaded with the `bpf`
//! system call: the lab's own tiny programs (the flood generator, the
//! empty TC program of `bench connections`), which need no object file,
//! no BTF and no aya.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// The opcodes the lab's programs use (`linux/bpf.h`, `bpf_common.h`).
pub mod opcode {
    /// `BPF_LDX | BPF_MEM | BPF_W`
    pub const LDX_W: u8 = 0x61;
    /// `BPF_STX | BPF_MEM | BPF_H`
    pub const STX_H: u8 = 0x6b;
    /// `BPF_STX | BPF_MEM | BPF_W`
    pub const STX_W: u8 = 0x63;
    pub const MOV64_X: u8 = 0xbf;
    pub const MOV64_K: u8 = 0xb7;
    pub const ADD64_K: u8 = 0x07;
    pub const OR64_X: u8 = 0x4f;
    pub const JGT_X: u8 = 0x2d;
    pub const CALL: u8 = 0x85;
    pub const EXIT: u8 = 0x95;
}

/// One BPF instruction, as `struct bpf_insn` lays it out.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Instruction {
    code: u8,
    registers: u8,
    offset: i16,
    immediate: i32,
}

pub const fn instruction(code: u8, dst: u8, src: u8, offset: i16, immediate: i32) -> Instruction {
    Instruction { code, registers: (src << 4) | dst, offset, immediate }
}

pub fn bpf(command: libc::c_long, attr: &mut [u64]) -> i64 {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size passed.
    unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), std::mem::size_of_val(attr)) }
}

/// A loaded program; unloaded when dropped and no link holds it.
pub struct RawProgram {
    fd: OwnedFd,
}

impl RawProgram {
    /// Load `instructions` as a program of `program_type`; `what` names it in errors.
    pub fn load(what: &str, program_type: u32, instructions: &[Instruction]) -> Result<Self> {
        let license = CString::new("GPL")?;
        let mut attr = [0u64; 16];
        attr[0] = u64::from(program_type) | ((instructions.len() as u64) << 32);
        attr[1] = instructions.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        // Without a log first, as libbpf does: a verifier log longer than
        // its buffer fails a load that would succeed (ENOSPC).
        let fd = bpf(BPF_PROG_LOAD, &mut attr);
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            let mut log = vec![0u8; 1 << 20];
            attr[3] = 1 | ((log.len() as u64) << 32); // log_level, log_size
            attr[4] = log.as_mut_ptr() as u64;
            bpf(BPF_PROG_LOAD, &mut attr);
            let log = String::from_utf8_lossy(&log);
            bail!("loading {what}: {error}\n{}", log.trim_end_matches('\0'));
        }
        // SAFETY: a descriptor the kernel just returned, owned here alone.
        Ok(RawProgram { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Attach to TCX of `ifindex` (in the calling thread's network
    /// namespace), after the programs already there; detached when the
    /// returned link is dropped.
    pub fn attach_tcx(&self, ifindex: u32, ingress: bool) -> Result<OwnedFd> {
        let attach_type = if ingress { BPF_TCX_INGRESS } else { BPF_TCX_EGRESS };
        let mut attr = [0u64; 8];
        attr[0] = self.fd() as u64 | (u64::from(ifindex) << 32); // prog_fd, target_ifindex
        attr[1] = u64::from(attach_type); // attach_type, flags
        let fd = bpf(BPF_LINK_CREATE, &mut attr);
        if fd < 0 {
            bail!("attaching a TCX program to interface {ifindex}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just returned, owned here alone.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
}
