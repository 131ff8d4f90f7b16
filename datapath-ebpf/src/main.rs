//! Bulkhead's eBPF datapath.
//!
//! TC programs on the host side of every local pod's veth judge each packet
//! against that pod's compiled allowlist (the `POLICY` trie), keep a
//! per-endpoint conntrack so replies pass, and count and report every refusal.
//! cgroup socket hooks apply the same egress verdicts at `connect()` and
//! `sendmsg()` time so a denied connection fails at once with EPERM.
#![no_std]
#![no_main]
// Compare-and-swap (BPF_CMPXCHG), which the BPF target's atomics leave out.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod conntrack;
mod maps;
mod parse;
mod refusals;
mod table;
mod verdict;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use datapath_common::{EGRESS, INGRESS};

/// Packets the pod sends (host-side veth ingress): the pod's egress.
#[classifier]
#[inline(always)]
pub fn bulkhead_from_pod(ctx: TcContext) -> i32 {
    verdict::judge_packet(&ctx, EGRESS)
}

/// Packets to the pod (host-side veth egress): the pod's ingress.
#[classifier]
#[inline(always)]
pub fn bulkhead_to_pod(ctx: TcContext) -> i32 {
    verdict::judge_packet(&ctx, INGRESS)
}

/// cgroup/connect4: 1 lets the connect() proceed, 0 fails it with EPERM.
#[cgroup_sock_addr(connect4)]
pub fn bulkhead_connect4(ctx: SockAddrContext) -> i32 {
    verdict::judge_socket(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn bulkhead_connect6(ctx: SockAddrContext) -> i32 {
    verdict::judge_socket(&ctx, true)
}

/// cgroup/sendmsg4: unconnected UDP sends, judged per destination.
#[cgroup_sock_addr(sendmsg4)]
pub fn bulkhead_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict::judge_socket(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bulkhead_sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict::judge_socket(&ctx, true)
}

/// Benchmark fixture, never loaded by the agent: moves the packet's source
/// port on by one, then judges it as `bulkhead_from_pod` does. The packet
/// persists across BPF_PROG_TEST_RUN's repeats, so every run is a connection
/// conntrack has not seen: `repeat` runs time that many new connections with
/// hot caches. Only IPv4 without options (the bench's packets) is moved on.
#[classifier]
#[inline(always)]
pub fn bulkhead_bench_new_flow(ctx: TcContext) -> i32 {
    const SOURCE_PORT_AT: usize = 14 + 20;
    let at = ctx.data() + SOURCE_PORT_AT;
    if at + 2 <= ctx.data_end() {
        // SAFETY: within the packet (checked against `data_end` just above).
        unsafe {
            let port = at as *mut u16;
            *port = u16::from_be(*port).wrapping_add(1).to_be();
        }
    }
    verdict::judge_packet(&ctx, EGRESS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the BPF target cannot unwind; a panic path is never taken at
    // run time (the verifier rejects programs that could reach it).
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
