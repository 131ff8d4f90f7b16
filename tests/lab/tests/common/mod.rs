//! Shared by the datapath tests: a datapath loaded under its own pin
//! directory, removed by name when the test ends, pass or fail.
#![allow(dead_code)]

use std::{cell::RefCell, net::IpAddr, path::PathBuf};

use bulkhead::dataplane::Datapath;
use datapath_common::{
    ipv4_mapped, policy_prefix, program_names, DropKey, EndpointInfo, Event, PolicyKey, PolicyValue, VerdictKey,
    EVENT_AUDIT, EVENT_DENY, IPV4_MAPPED_PREFIX,
};

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

/// Tests that need root fail loudly in CI instead of skipping.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("this test needs root (BPF, network namespaces) and CI runs as root");
        }
        eprintln!("skipping: not root");
    }
    root
}

pub fn address_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub struct TestDatapath {
    pub dp: RefCell<Datapath>,
    pin_dir: PathBuf,
}

impl TestDatapath {
    pub fn new(name: &str) -> Self {
        assert!(require_root(), "not root");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-test-{name}"));
        let _ = Datapath::unpin_all(&pin_dir);
        let dp = Datapath::load(&pin_dir).unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        Self { dp: RefCell::new(dp), pin_dir }
    }

    /// BPF_PROG_TEST_RUN runs a TC program with loopback (ifindex 1) as its device.
    pub fn endpoint_on_loopback(&self, endpoint_id: u32, addresses: &[&str]) {
        self.endpoint_on(1, endpoint_id, addresses);
    }

    pub fn endpoint_on(&self, ifindex: u32, endpoint_id: u32, addresses: &[&str]) {
        let mut dp = self.dp.borrow_mut();
        let keys: Vec<[u8; 16]> = addresses.iter().map(|a| address_bytes(a.parse().unwrap())).collect();
        dp.set_endpoint(ifindex, EndpointInfo::new(endpoint_id, 0, &keys)).unwrap();
        for a in addresses {
            dp.set_local_address(address_bytes(a.parse().unwrap()), endpoint_id).unwrap();
        }
    }

    pub fn identity(&self, address: &str, identity: u32) {
        let ip: IpAddr = address.parse().unwrap();
        let prefix = if ip.is_ipv4() { IPV4_MAPPED_PREFIX + 32 } else { 128 };
        self.dp.borrow_mut().set_ipcache(prefix, address_bytes(ip), identity).unwrap();
    }

    /// One policy entry; `ports` is (protocol, port, port prefix bits) or all.
    pub fn rule(&self, endpoint: u32, direction: u8, peer: u32, ports: Option<(u8, u16, u32)>, value: PolicyValue) {
        self.entry(endpoint, direction, peer, ports, value);
    }

    /// An allow entry an Audit-mode rule would have denied.
    pub fn rule_audit(
        &self,
        endpoint: u32,
        direction: u8,
        peer: u32,
        ports: Option<(u8, u16, u32)>,
        policy_id: u32,
        rule: u32,
    ) {
        self.entry(
            endpoint,
            direction,
            peer,
            ports,
            PolicyValue::new(datapath_common::verdict::ALLOW, 0, 0).with_audit(policy_id, rule),
        );
    }

    fn entry(&self, endpoint: u32, direction: u8, peer: u32, ports: Option<(u8, u16, u32)>, value: PolicyValue) {
        let (prefix, key) = policy_key(endpoint, direction, peer, ports);
        self.dp.borrow_mut().set_policy(prefix, key, value).unwrap();
    }

    pub fn remove_rule(&self, endpoint: u32, direction: u8, peer: u32, ports: Option<(u8, u16, u32)>) {
        let (prefix, key) = policy_key(endpoint, direction, peer, ports);
        self.dp.borrow_mut().remove_policy(prefix, key).unwrap();
    }

    /// Load the datapath again over its pins, as a restarted agent adopts it.
    pub fn reload(&self) {
        *self.dp.borrow_mut() = Datapath::load(&self.pin_dir).unwrap_or_else(|e| panic!("reloading: {e}"));
    }

    /// Load the datapath again over its pins, `pin` removed first (as if an
    /// older datapath without that map had pinned the rest).
    pub fn reload_without(&self, pin: &str) {
        std::fs::remove_file(self.pin_dir.join(pin)).unwrap();
        self.reload();
    }

    pub fn bump_revision(&self) {
        self.dp.borrow_mut().bump_policy_revision().unwrap();
    }

    pub fn fail_closed(&self, endpoint: u32) {
        self.dp.borrow_mut().fail_closed(endpoint).unwrap();
    }

    pub fn sent_by_pod_on(&self, ifindex: u32, frame: &[u8]) -> i32 {
        self.dp.borrow().test_run_on(program_names::FROM_POD, frame, ifindex, 1).unwrap().0
    }

    pub fn sent_by_pod(&self, frame: &[u8]) -> i32 {
        self.dp.borrow().test_run(program_names::FROM_POD, frame, 1).unwrap().0
    }

    pub fn sent_to_pod(&self, frame: &[u8]) -> i32 {
        self.dp.borrow().test_run(program_names::TO_POD, frame, 1).unwrap().0
    }

    pub fn drops(&self, direction: u8, reason: u8) -> u64 {
        let key = DropKey { direction, reason };
        self.dp.borrow().drops().get(&key).copied().unwrap_or(0)
    }

    fn verdicts(&self, endpoint: u32, direction: u8, policy_id: u32, rule: u32, kind: u8) -> u64 {
        let key = VerdictKey { endpoint, policy_id, rule, direction, kind, _pad: [0; 2] };
        self.dp.borrow().verdicts().get(&key).copied().unwrap_or(0)
    }

    pub fn blocked(&self, endpoint: u32, direction: u8, policy_id: u32, rule: u32) -> u64 {
        self.verdicts(endpoint, direction, policy_id, rule, EVENT_DENY)
    }

    pub fn audited(&self, endpoint: u32, direction: u8, policy_id: u32, rule: u32) -> u64 {
        self.verdicts(endpoint, direction, policy_id, rule, EVENT_AUDIT)
    }

    pub fn events(&self) -> Vec<Event> {
        self.dp.borrow_mut().drain_events()
    }
}

fn policy_key(endpoint: u32, direction: u8, peer: u32, ports: Option<(u8, u16, u32)>) -> (u32, PolicyKey) {
    match ports {
        None => (policy_prefix::ANY_PROTOCOL, PolicyKey::new(endpoint, direction, peer, 0, 0)),
        Some((protocol, port, bits)) => {
            (policy_prefix::ANY_PORT + bits, PolicyKey::new(endpoint, direction, peer, protocol, port))
        }
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        if let Err(e) = Datapath::unpin_all(&self.pin_dir) {
            eprintln!("cleaning up {}: {e}", self.pin_dir.display());
        }
    }
}
