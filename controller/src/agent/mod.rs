//! `bulkhead agent`: one per node. A source (the API server or a folder)
//! feeds `Update`s into one loop that owns the snapshot and the datapath:
//! changes are gathered for a moment, compiled, and the difference written
//! to the pinned maps; local pods get the programs on their veth and cgroup.
//! The same loop reads the datapath's counters and events into metrics and
//! logs. Only this loop touches the datapath, so writes never interleave.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use bulkhead_crds::{ON_ANOMALY_LABEL, QUARANTINE_LABEL};
use datapath_common::{
    reason as drop_reason, Event, EGRESS, EVENT_AUDIT, EVENT_NEW_FLOW, INGRESS, RULE_DEFAULT_DENY, SOURCE_CGROUP,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use bulkhead_policy::{
    audit::{AuditFlows, Direction, Flow, FlowEnd, FlowKey},
    compile::Scope,
    coverage::{self, Isolation},
    state::address_key,
    Admission, Change, Changed, Compiler, DesiredState, Object, ObjectKey, Pod, PodRef, PolicyRef, Snapshot,
};

use crate::{
    dataplane::{self, sync::Programmer, Datapath, DropCount, LiveTargets, VerdictCount},
    report::NodeReport,
    source::Update,
};

pub mod audit_log;
pub mod host;
pub mod http;
pub mod metrics;
pub mod report;
pub mod state_file;

use audit_log::AuditLog;
use bulkhead_policy::baseline::{self, Destination, Edits, EgressBaselines, Workload};
use host::{Host, HostInterface, VethEvent, Wiring};
use metrics::Metrics;
use state_file::{EditsFile, StateFile};

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub pin_dir: PathBuf,
    /// Where kubelet's pod cgroups are (none: no socket hooks).
    pub cgroup_root: Option<PathBuf>,
    /// Pods without `spec.nodeName` are this node's: a folder describes one node.
    pub unscheduled_pods_are_local: bool,
    /// Quiet time that ends a burst of changes. Short: what arrives while a
    /// reconcile runs is gathered into the next one anyway, and every
    /// change waits this long before it is enforced.
    pub debounce: Duration,
    /// The longest a change waits for a burst to end.
    pub max_delay: Duration,
    /// Deny and audit events per second and CPU (the rest are only counted).
    pub events_per_second: Option<u64>,
    /// How long a workload's egress destinations are learned before a new
    /// one counts as an anomaly; `None` turns the baselines (and the
    /// datapath's new-flow events) off.
    pub egress_learning: Option<Duration>,
    /// Where the node keeps what must survive a restart (the audit flows);
    /// `None` keeps it in memory.
    pub state_dir: Option<PathBuf>,
    /// Quarantine pods with an egress anomaly in namespaces labelled
    /// `bulkhead.io/on-anomaly=quarantine` (Kubernetes mode).
    pub quarantine_on_anomaly: bool,
    /// The names the CNI gives pods' host-side veths begin with (`veth`,
    /// `cali`, `lxc`...): such a veth gets its programs as it appears,
    /// before its pod's address is known. Empty: at the pod's first reconcile.
    pub pod_interface_prefixes: Vec<String>,
}

impl Config {
    pub fn new(node_name: &str, pin_dir: PathBuf) -> Self {
        Self {
            node_name: node_name.to_string(),
            pin_dir,
            cgroup_root: None,
            unscheduled_pods_are_local: false,
            debounce: Duration::from_millis(1),
            max_delay: Duration::from_millis(50),
            events_per_second: None,
            egress_learning: Some(Duration::from_secs(600)),
            state_dir: None,
            quarantine_on_anomaly: false,
            pod_interface_prefixes: Vec::new(),
        }
    }
}

/// One verdict event, with names instead of numbers: what `/debug/events`
/// serves and `bulkhead flows` reads back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    /// Increasing, from the agent's start time in microseconds, so a
    /// successor's numbers follow its predecessor's.
    pub seq: u64,
    /// Unix milliseconds when the agent read it.
    pub time: u64,
    /// `deny`, `audit`, or `allow` (a new egress flow: sent while egress
    /// baselines are learned).
    pub verdict: Cow<'static, str>,
    pub direction: Cow<'static, str>,
    /// `namespace/pod` of the endpoint that judged it.
    pub pod: String,
    pub source: String,
    pub destination: String,
    pub protocol: String,
    pub policy: String,
    pub rule: Option<u32>,
    /// `tc` (a packet on the veth) or `connect` (the socket hook).
    pub hook: Cow<'static, str>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StateView {
    pub ready: bool,
    /// The source revision the datapath holds: a folder's content digest,
    /// or the resourceVersion of the last object change the API server sent
    /// (per kind's watch: not a promise about other kinds' older changes).
    pub revision: Option<String>,
    pub syncs: u64,
    /// Local pods and the interface each is enforced on.
    pub endpoints: BTreeMap<String, String>,
    /// Local pods not enforced yet, and why.
    pub waiting: BTreeMap<String, String>,
    pub failed_closed: Vec<String>,
    pub rejected: Vec<String>,
    /// Accepted policies in all.
    pub accepted_policies: usize,
    /// The policies that select this node's pods: the generation enforced
    /// and how many local pods each selects.
    pub policies: BTreeMap<String, PolicyView>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyView {
    pub generation: Option<i64>,
    pub selected_pods: usize,
}

/// What the HTTP endpoints read.
pub struct Shared {
    pub metrics: Metrics,
    /// When the agent started.
    pub started: Instant,
    ready: AtomicBool,
    heartbeat: Mutex<Instant>,
    state: Mutex<StateView>,
    /// The syncs published so far (`/debug/revision?after_sync=` waits on it).
    synced: tokio::sync::watch::Sender<u64>,
    events: Mutex<VecDeque<EventRecord>>,
    /// Local pods unenforced beyond the grace, and why.
    unenforced: Mutex<BTreeMap<String, String>>,
    /// What this node tells the controller, and a counter of its changes.
    report: Mutex<(u64, NodeReport)>,
    /// Where egress anomalies go to become Kubernetes Events: set in
    /// Kubernetes mode only, so dir mode builds none.
    anomalies: OnceLock<mpsc::Sender<Anomaly>>,
    /// The audit flows seen most recently, and how many more there are.
    audit_flows: Mutex<(Vec<Flow>, usize)>,
    /// This node's egress baselines, as last written.
    baselines: Mutex<Vec<baseline::Learned>>,
    /// Other nodes' baselines and the operator's edits, from the API
    /// server, for the loop to take.
    remote_baselines: Mutex<Option<(Vec<baseline::Learned>, Edits)>>,
}

/// An egress anomaly, for the Warning Event on its pod.
#[derive(Clone, Debug)]
pub struct Anomaly {
    pub pod: PodRef,
    pub uid: Option<String>,
    pub workload: String,
    pub destination: String,
    /// Label the pod `bulkhead.io/quarantine` too (its namespace asked for it).
    pub quarantine: bool,
}

/// Anomalies waiting for their Event; beyond this (the API server slow
/// or away) they are dropped, and counted.
const PENDING_ANOMALIES: usize = 256;

const RECENT_EVENTS: usize = 2048;
/// The egress baselines in the state directory.
const BASELINES_FILE: &str = "egress-baselines.json";
/// Audit flows in this node's report: the Lease's annotations must stay
/// well under the API server's 256 KiB.
const REPORTED_FLOWS: usize = 300;
const HOUSEKEEPING: Duration = Duration::from_millis(200);
/// How often the verdict slots of pods gone are freed (a read of every slot).
const FREE_VERDICT_SLOTS: Duration = Duration::from_secs(10);
/// How often the datapath is swept of what pods gone while no agent ran left.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// The loop is stuck when it has not ticked for this long.
const STUCK: Duration = Duration::from_secs(10);

impl Shared {
    pub fn new() -> Self {
        Self {
            metrics: Metrics::new(),
            started: Instant::now(),
            ready: AtomicBool::new(false),
            heartbeat: Mutex::new(Instant::now()),
            state: Mutex::new(StateView::default()),
            synced: tokio::sync::watch::Sender::new(0),
            events: Mutex::new(VecDeque::new()),
            unenforced: Mutex::new(BTreeMap::new()),
            report: Mutex::new((0, NodeReport::default())),
            anomalies: OnceLock::new(),
            audit_flows: Mutex::new((Vec::new(), 0)),
            baselines: Mutex::new(Vec::new()),
            remote_baselines: Mutex::new(None),
        }
    }

    /// From now on, egress anomalies are sent here (once; later calls are ignored).
    pub fn anomalies_to_publish(&self) -> mpsc::Receiver<Anomaly> {
        let (sender, receiver) = mpsc::channel(PENDING_ANOMALIES);
        let _ = self.anomalies.set(sender);
        receiver
    }

    fn push_anomaly(&self, anomaly: Anomaly) {
        if let Some(sender) = self.anomalies.get() {
            if sender.try_send(anomaly).is_err() {
                self.metrics.sync_errors.with_label_values(&["event"]).inc();
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// `/readyz`: the first complete view of the source is in the datapath,
    /// and every local pod is enforced (or not yet for `ENFORCE_GRACE`).
    pub fn readiness(&self) -> Result<&'static str, String> {
        if !self.is_ready() {
            return Err("the first full sync is not in the datapath yet".into());
        }
        let unenforced = self.unenforced.lock().expect("unenforced lock");
        if !unenforced.is_empty() {
            let pods: Vec<String> = unenforced.iter().map(|(pod, why)| format!("{pod}: {why}")).collect();
            return Err(format!("{} local pod(s) not enforced: {}", pods.len(), pods.join("; ")));
        }
        Ok("ready")
    }

    pub fn health(&self) -> Result<(), String> {
        let since = self.heartbeat.lock().expect("heartbeat lock").elapsed();
        if since > STUCK {
            return Err(format!("the agent loop has not run for {since:?}"));
        }
        Ok(())
    }

    fn set_report(&self, report: NodeReport) {
        let mut current = self.report.lock().expect("report lock");
        if current.1 != report {
            *current = (current.0 + 1, report);
        }
    }

    /// What this node tells the controller, with a counter that moves when it changes.
    pub fn report(&self) -> (u64, NodeReport) {
        self.report.lock().expect("report lock").clone()
    }

    /// The audit flows this node reports, newest first, at most
    /// `REPORTED_FLOWS`, and how many were left out.
    pub fn audit_flows(&self) -> (Vec<Flow>, usize) {
        self.audit_flows.lock().expect("audit flows lock").clone()
    }

    /// This node's egress baselines, as its report carries them.
    pub fn baselines(&self) -> Vec<baseline::Learned> {
        self.baselines.lock().expect("baselines lock").clone()
    }

    /// What other nodes learned, and the operator's edits: the loop merges
    /// them at its next tick.
    pub fn offer_remote_baselines(&self, others: Vec<baseline::Learned>, edits: Edits) {
        *self.remote_baselines.lock().expect("remote baselines lock") = Some((others, edits));
    }

    fn set_audit_flows(&self, flows: &AuditFlows) {
        *self.audit_flows.lock().expect("audit flows lock") = flows.newest(REPORTED_FLOWS);
    }

    pub fn state(&self) -> StateView {
        self.state.lock().expect("state lock").clone()
    }

    pub fn state_json(&self) -> String {
        serde_json::to_string_pretty(&self.state()).expect("serializable state")
    }

    /// `/debug/revision`: the source revision the datapath holds, local pods
    /// enforced and map writes so far; small enough to poll.
    pub fn revision_json(&self) -> String {
        let state = self.state.lock().expect("state lock");
        serde_json::json!({
            "revision": state.revision,
            "endpoints": state.endpoints.len(),
            "syncs": state.syncs,
            "map_writes": self.metrics.map_writes.get(),
        })
        .to_string()
    }

    /// The recent events after `after` (a `seq`), oldest first.
    pub fn events_json(&self, after: u64) -> String {
        let events = self.events.lock().expect("events lock");
        let newer: Vec<&EventRecord> = events.iter().filter(|e| e.seq > after).collect();
        serde_json::to_string_pretty(&newer).expect("serializable events")
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

/// The next veth event, when they are followed; `None` when they stopped.
async fn next_veth_event(veths: &mut Option<mpsc::UnboundedReceiver<VethEvent>>) -> Option<VethEvent> {
    match veths {
        Some(veths) => veths.recv().await,
        None => std::future::pending().await,
    }
}

/// One connection counter series of a pod: Audit mode, direction, policy.
type PodCounter = (bool, u8, PolicyRef);

/// A local pod the programs are attached for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Attached {
    endpoint_id: u32,
    interface: HostInterface,
    addresses: Vec<IpAddr>,
    cgroup: Option<PathBuf>,
}

/// A local pod not enforced yet.
struct Waiting {
    since: Instant,
    why: String,
    /// Overdue and logged as such.
    warned: bool,
}

/// How long a local pod may stay unenforced (the CNI wiring it) before the
/// agent says so loudly.
const ENFORCE_GRACE: Duration = Duration::from_secs(5);

struct Pending {
    first_observed: Instant,
    last_change: Instant,
}

pub struct Agent {
    config: Config,
    shared: Arc<Shared>,
    host: Host,
    programmer: Programmer,
    snapshot: Snapshot,
    /// What the snapshot compiles to, kept up to date change by change.
    compiler: Option<Compiler>,
    /// Objects changed since the last compile; `compile_all` after a re-list.
    changed: BTreeSet<Changed>,
    compile_all: bool,
    /// Local pods by endpoint id: what events and counters name.
    pods_by_endpoint: HashMap<u32, PodRef>,
    attached: BTreeMap<PodRef, Attached>,
    /// Interfaces given programs behind a pending entry while the first
    /// compile ran; each gets its endpoint in `attach_missing` or loses them.
    attached_pending: Vec<HostInterface>,
    /// Veths given programs behind a pending entry as they appeared, by
    /// ifindex, until a pod claims them or they go.
    attached_ahead: BTreeMap<u32, HostInterface>,
    /// The kernel dropped announcements of the node's links: the veths are
    /// listed again at the next housekeeping, once those it had queued
    /// before the loss are read (read after the listing, they would undo it).
    veths_lost: bool,
    /// The `bulkhead_endpoints` series last published, so gone ones are removed.
    published_endpoints: BTreeSet<(String, &'static str)>,
    /// Local pods not enforced yet, since when and why.
    waiting: BTreeMap<PodRef, Waiting>,
    source_synced: bool,
    pending: Option<Pending>,
    /// The source revision of the newest update taken.
    revision: Option<String>,
    /// The last sync failed; try again at the next tick.
    retry: bool,
    counted_verdicts: VerdictCount,
    /// When the verdict slots of gone pods were last freed.
    verdict_slots_freed: Instant,
    counted_drops: DropCount,
    /// The connection counters made at 0 for each enforced pod, policy
    /// and direction, so a rate() alert sees a series from the start.
    zero_counters: BTreeMap<PodRef, Vec<PodCounter>>,
    syncs: u64,
    baselines: Option<EgressBaselines>,
    /// When the datapath was last swept (after the first full sync).
    swept: Option<Instant>,
    audit_log: AuditLog,
    baselines_file: StateFile,
    /// Dir mode: the operator's baseline edits, in the state directory.
    edits_file: Option<EditsFile>,
    /// Pods whose quarantine was asked for and whose label is not back yet.
    quarantining: BTreeSet<PodRef>,
    /// The `seq` of the last event record.
    last_seq: u64,
    /// Something local changed since the state view was last built whole
    /// (a failed sync publishes nothing; the retry must build it).
    local_unpublished: bool,
}

impl Agent {
    /// Load (or adopt) the datapath pinned under `config.pin_dir`.
    pub fn new(config: Config, shared: Arc<Shared>) -> anyhow::Result<Self> {
        let mut datapath = Datapath::load(&config.pin_dir)?;
        if let Some(limit) = config.events_per_second {
            datapath.set_events_per_second(limit)?;
        }
        datapath.set_flow_events(config.egress_learning.is_some())?;
        let mut baselines = config.egress_learning.map(EgressBaselines::new);
        let baselines_file = StateFile::new(config.state_dir.as_deref(), BASELINES_FILE);
        let edits_file = config.state_dir.as_deref().map(EditsFile::new);
        match (baselines.as_mut(), baselines_file.read::<Vec<baseline::Learned>>()) {
            (Some(baselines), Ok(Some(kept))) => {
                baselines.restore(kept);
                *shared.baselines.lock().expect("baselines lock") = baselines.learned();
            }
            (Some(_), Err(error)) => {
                tracing::warn!(%error, "the egress baselines kept on this node could not be read; learning starts again");
                shared.metrics.sync_errors.with_label_values(&["state"]).inc();
            }
            _ => {}
        }
        let (audit_log, unreadable) = AuditLog::open(config.state_dir.as_deref());
        if let Some(error) = unreadable {
            tracing::warn!(%error, "the audit flows kept on this node could not be read; counting starts again");
            shared.metrics.sync_errors.with_label_values(&["state"]).inc();
        }
        shared.set_audit_flows(&audit_log.flows);
        let programmer = Programmer::adopt(datapath);
        let host = Host::new(config.cgroup_root.clone())?;
        for (map, capacity) in [
            ("policy", datapath_common::capacity::POLICY + datapath_common::capacity::POLICY_EXACT),
            ("ipcache", datapath_common::capacity::IPCACHE + datapath_common::capacity::IPCACHE_EXACT),
            ("endpoints", datapath_common::capacity::ENDPOINTS),
            ("local_addresses", datapath_common::capacity::LOCAL_ADDRS),
        ] {
            shared.metrics.map_capacity.with_label_values(&[map]).set(capacity as i64);
        }
        Ok(Self {
            config,
            shared,
            host,
            programmer,
            snapshot: Snapshot::default(),
            compiler: None,
            changed: BTreeSet::new(),
            compile_all: true,
            pods_by_endpoint: HashMap::new(),
            attached: BTreeMap::new(),
            attached_pending: Vec::new(),
            attached_ahead: BTreeMap::new(),
            veths_lost: false,
            published_endpoints: BTreeSet::new(),
            waiting: BTreeMap::new(),
            source_synced: false,
            pending: None,
            revision: None,
            retry: false,
            counted_verdicts: VerdictCount::new(),
            verdict_slots_freed: Instant::now(),
            zero_counters: BTreeMap::new(),
            counted_drops: DropCount::new(),
            syncs: 0,
            baselines,
            swept: None,
            audit_log,
            baselines_file,
            edits_file,
            quarantining: BTreeSet::new(),
            last_seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
            local_unpublished: true,
        })
    }

    /// Run until the source closes its channel.
    pub async fn run(mut self, mut updates: mpsc::Receiver<Update>) {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut veths = match self.config.pod_interface_prefixes.is_empty() {
            true => None,
            false => host::veth_events()
                .inspect_err(|error| {
                    tracing::warn!(%error, "cannot follow the node's veths: pods get their programs at their first reconcile")
                })
                .ok(),
        };
        loop {
            let deadline = self
                .pending
                .as_ref()
                .filter(|_| self.source_synced)
                .map(|p| (p.last_change + self.config.debounce).min(p.first_observed + self.config.max_delay));
            let due = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                update = updates.recv() => match update {
                    Some(update) => self.take(update),
                    None => return,
                },
                () = due => self.reconcile().await,
                _ = housekeeping.tick() => self.housekeeping().await,
                event = next_veth_event(&mut veths) => match event {
                    Some(event) => self.veth_event(event),
                    None => {
                        tracing::warn!("the node's veths are no longer followed: pods get their programs at their first reconcile");
                        veths = None;
                    }
                },
            }
        }
    }

    /// A veth named as the CNI names pods' gets its programs as it appears,
    /// behind a pending entry that passes everything, as a veth with no
    /// programs would: each TCX link waits for an RCU grace period (about
    /// 15 ms, serialised by the kernel), and so that wait is over before
    /// kubelet reports the pod's address. The pod's real entry replaces the
    /// pending one (`attach_missing`); a veth that goes unclaimed loses them.
    fn veth_event(&mut self, event: VethEvent) {
        match event {
            VethEvent::Added(interface) => self.attach_ahead(interface),
            VethEvent::Removed(gone) => self.forget_ahead(&gone),
            VethEvent::Lost => {
                self.shared.metrics.sync_errors.with_label_values(&["link_events"]).inc();
                self.veths_lost = true;
            }
        }
    }

    fn attach_ahead(&mut self, interface: HostInterface) {
        let prefixes = &self.config.pod_interface_prefixes;
        if !prefixes.iter().any(|prefix| interface.name.starts_with(prefix.as_str()))
            || self.attached_ahead.contains_key(&interface.ifindex)
        {
            return;
        }
        // False when links are pinned for it already: a pod's, or a previous agent's.
        match self.programmer.attach_pending(&interface.name, interface.ifindex) {
            Ok(true) => {
                tracing::info!(interface = %interface.name, "attached ahead of its pod");
                self.attached_ahead.insert(interface.ifindex, interface);
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(interface = %interface.name, %error, "attaching ahead of the pod failed; retrying at its first reconcile");
                self.shared.metrics.sync_errors.with_label_values(&["attach"]).inc();
            }
        }
    }

    fn forget_ahead(&mut self, gone: &HostInterface) {
        let Some(interface) = self.attached_ahead.remove(&gone.ifindex) else { return };
        if let Err(error) = self.programmer.detach_pending(&interface.name, interface.ifindex) {
            tracing::warn!(interface = %interface.name, %error, "removing the programs of a veth gone unclaimed failed");
            self.shared.metrics.sync_errors.with_label_values(&["detach"]).inc();
        }
    }

    /// After lost announcements, the node's veths as they are: those
    /// attached ahead that went (or whose ifindex a new veth took) let go
    /// of their programs, and those that came unannounced get theirs.
    /// Enforcement never waited on the announcements (each reconcile
    /// attaches what is missing), so nothing was open meanwhile; this only
    /// restores the head start and the clean-up.
    async fn resync_veths(&mut self) {
        let veths = match self.host.veth_interfaces().await {
            Ok(veths) => veths,
            Err(error) => {
                tracing::warn!(%error, "the kernel dropped announcements of the node's links, and listing its veths failed: pods get their programs at their first reconcile");
                return;
            }
        };
        let gone: Vec<HostInterface> =
            self.attached_ahead.values().filter(|interface| !veths.contains(interface)).cloned().collect();
        tracing::warn!(
            veths = veths.len(),
            gone_unclaimed = gone.len(),
            "the kernel dropped announcements of the node's links (its buffer overflowed); resynchronised the veths"
        );
        for interface in &gone {
            self.forget_ahead(interface);
        }
        for interface in veths {
            self.attach_ahead(interface);
        }
    }

    fn take(&mut self, update: Update) {
        let now = Instant::now();
        match &mut self.pending {
            Some(pending) => {
                pending.first_observed = pending.first_observed.min(update.observed);
                pending.last_change = now;
            }
            None => self.pending = Some(Pending { first_observed: update.observed, last_change: now }),
        }
        if update.revision.is_some() {
            self.revision = update.revision;
        }
        for mut change in update.changes {
            match &mut change {
                Change::Applied(object) => self.forget_remote_uid(object),
                Change::Relisted(_, objects) => objects.iter_mut().for_each(|object| self.forget_remote_uid(object)),
                Change::Deleted(_) | Change::Synced => {}
            }
            match &change {
                // A full compile is due (at start-up, with every pod of the
                // cluster changed): it needs no list of what changed.
                Change::Applied(_) | Change::Deleted(_) if self.compile_all => {}
                Change::Applied(object) => {
                    self.changed.insert(changed_of(object.key()));
                }
                Change::Deleted(key) => {
                    self.changed.insert(changed_of(key.clone()));
                }
                Change::Relisted(..) => self.compile_all = true,
                Change::Synced => {}
            }
            if matches!(change, Change::Synced) && !self.source_synced {
                self.source_synced = true;
                self.shared.metrics.source_synced_seconds.set(self.shared.started.elapsed().as_secs_f64());
            }
            for admission in self.snapshot.apply(change) {
                log_admission(&admission);
            }
        }
    }

    /// A uid finds a local pod's cgroup; the pods of other nodes, nearly
    /// all of a large cluster's, need not keep theirs.
    fn forget_remote_uid(&self, object: &mut Object) {
        if let Object::Pod(pod) = object {
            if pod.node_name.as_ref().is_some_and(|node| *node != self.config.node_name) {
                pod.uid = None;
            }
        }
    }

    /// The pod an address belongs to, any node's.
    fn pod_at(&self, address: IpAddr) -> Option<&PodRef> {
        self.compiler.as_ref()?.pod_at(address)
    }

    async fn reconcile(&mut self) {
        let Some(pending) = self.pending.take() else { return };
        match self.host.node_addresses().await {
            Ok(addresses) if addresses != self.snapshot.node_addresses => {
                self.snapshot.node_addresses = addresses;
                self.changed.insert(Changed::NodeAddresses);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot read the node's addresses; keeping the last known"),
        }
        tracing::debug!(
            waited_ms = pending.first_observed.elapsed().as_secs_f64() * 1e3,
            changed = self.changed.len(),
            "reconciling"
        );
        // When only other nodes' pods changed, what selects this node's pods
        // (and so its counters and coverage gauges) stayed as it was.
        let endpoints_before = &self.state().endpoints;
        let mut local_pods_changed = self.compile_all
            || self.changed.iter().any(|c| !matches!(c, Changed::Pod(pod) if !endpoints_before.contains_key(pod)));
        let changed_pods: Vec<PodRef> = match local_pods_changed {
            true => Vec::new(),
            false => self
                .changed
                .iter()
                .filter_map(|c| if let Changed::Pod(pod) = c { Some(pod.clone()) } else { None })
                .collect(),
        };
        let scope = Scope::Node {
            name: self.config.node_name.clone(),
            unscheduled_are_local: self.config.unscheduled_pods_are_local,
        };
        let compiles_everything = self.compiler.is_none() || self.compile_all;
        // Creating a TCX link waits for an RCU grace period (about 15 ms, two
        // per pod, serialised by the kernel): the links of pods not attached
        // yet are made while their allowlists compile.
        let head_start = self.veths_to_attach_ahead(&scope).await;
        let started = Instant::now();
        let (programmer, snapshot, changed) = (&mut self.programmer, &self.snapshot, &self.changed);
        let (compiler, compile_all) = (&mut self.compiler, self.compile_all);
        self.attached_pending = std::thread::scope(|threads| {
            let attaching = (!head_start.is_empty()).then(|| threads.spawn(|| attach_pending(programmer, head_start)));
            match compiler.as_mut() {
                Some(compiler) if compile_all => compiler.recompile(snapshot),
                Some(compiler) => compiler.update(snapshot, changed),
                None => *compiler = Some(Compiler::scoped(snapshot, scope).tracking_changes()),
            }
            attaching.map(|attaching| attaching.join().unwrap_or_default()).unwrap_or_default()
        });
        self.changed.clear();
        self.compile_all = false;
        let compiled = started.elapsed();
        self.shared.metrics.compile_seconds.observe(compiled.as_secs_f64());
        let compiler = self.compiler.as_mut().expect("compiled above");
        let ops = compiler.take_ops();
        // The compiler's endpoints are this node's pods.
        let local = &compiler.state().endpoints;
        local_pods_changed |= changed_pods.iter().any(|pod| local.contains_key(pod));

        // Pods gone, moved or renumbered lose their programs before their entries go.
        let stale: Vec<PodRef> = self
            .attached
            .iter()
            .filter(|(pod, attached)| {
                local.get(*pod).is_none_or(|e| e.id != attached.endpoint_id || e.addresses != attached.addresses)
            })
            .map(|(pod, _)| pod.clone())
            .collect();
        for pod in stale {
            self.detach(&pod);
        }
        let endpoints = &self.compiler.as_ref().expect("compiled above").state().endpoints;
        self.waiting.retain(|pod, _| endpoints.contains_key(pod));

        let started = Instant::now();
        let writes_before = self.programmer.writes();
        let operations = ops.len();
        let synced = self.programmer.apply(self.compiler.as_ref().expect("compiled above").state(), ops);
        self.shared.metrics.map_writes.inc_by(self.programmer.writes() - writes_before);
        let written = started.elapsed();
        self.shared.metrics.sync_seconds.observe(written.as_secs_f64());
        let ok = match synced {
            Ok(report) => {
                for (endpoint, error) in &report.failed_closed {
                    let pod = self.state().endpoint_by_id(*endpoint).map(|p| p.to_string()).unwrap_or_default();
                    tracing::error!(%pod, endpoint, %error, "datapath map full: the pod is failed closed (only node traffic passes) until its allowlist fits");
                    self.shared.metrics.sync_errors.with_label_values(&["map_full"]).inc();
                }
                for endpoint in &report.reopened {
                    let pod = self.state().endpoint_by_id(*endpoint).map(|p| p.to_string()).unwrap_or_default();
                    tracing::info!(%pod, endpoint, "allowlist complete again: the pod is enforced normally");
                }
                local_pods_changed |= !report.failed_closed.is_empty() || !report.reopened.is_empty();
                true
            }
            Err(error) => {
                tracing::error!(%error, "datapath sync failed; retrying");
                self.shared.metrics.sync_errors.with_label_values(&["sync"]).inc();
                false
            }
        };
        self.pods_by_endpoint = self.state().endpoints.iter().map(|(p, e)| (e.id, p.clone())).collect();
        let started = Instant::now();
        local_pods_changed |= self.attach_missing().await || !self.waiting.is_empty();
        self.detach_unclaimed_pending();
        self.local_unpublished |= local_pods_changed;
        if local_pods_changed {
            self.publish_endpoints();
            self.keep_counters();
        }
        tracing::debug!(
            compile_ms = compiled.as_secs_f64() * 1e3,
            operations,
            write_ms = written.as_secs_f64() * 1e3,
            attach_ms = started.elapsed().as_secs_f64() * 1e3,
            "reconciled"
        );
        if let Some(baselines) = self.baselines.as_mut() {
            let present = self.attached.keys().filter_map(|p| self.snapshot.pods.get(p)).map(Workload::of).collect();
            baselines.retain(&present);
        }
        if compiles_everything {
            crate::release_free_memory();
        }
        if !ok {
            self.retry = true;
            return;
        }
        self.retry = false;
        self.syncs += 1;
        self.shared.metrics.policy_convergence.observe(pending.first_observed.elapsed().as_secs_f64());
        match std::mem::take(&mut self.local_unpublished) {
            true => self.publish(),
            false => self.publish_revision(),
        }
        if !self.shared.ready.swap(true, Ordering::Relaxed) {
            self.shared.metrics.ready_seconds.set(self.shared.started.elapsed().as_secs_f64());
            tracing::info!(
                endpoints = self.attached.len(),
                policies = self.snapshot.policies.len(),
                "first full sync in the datapath: ready"
            );
            self.sweep().await;
        }
    }

    /// Remove what pods deleted while no agent ran left in the datapath (see
    /// `dataplane::sweep`): links and entries of interfaces that are gone,
    /// of cgroups of no local pod (kubelet may leave a deleted pod's cgroup
    /// v2 directory on hybrid hosts), local addresses of no local pod.
    async fn sweep(&mut self) {
        self.swept = Some(Instant::now());
        let interfaces = match self.host.interfaces().await {
            Ok(interfaces) => interfaces,
            Err(error) => {
                tracing::warn!(%error, "cannot list the node's interfaces; not sweeping the datapath this time");
                return;
            }
        };
        let local_addresses =
            self.state().endpoints.values().flat_map(|e| e.addresses.iter().map(|a| address_key(*a))).collect();
        let local_uids: BTreeSet<&str> =
            self.state().endpoints.keys().filter_map(|pod| self.snapshot.pods.get(pod)?.uid.as_deref()).collect();
        let cgroups = self.host.pod_cgroups(&local_uids);
        let live = LiveTargets { interfaces, cgroups, local_addresses };
        match dataplane::sweep(self.programmer.datapath_mut(), &live) {
            Ok(swept) if swept.is_empty() => {}
            Ok(swept) => tracing::info!(
                links = ?swept.links,
                endpoints = swept.endpoints,
                cgroup_endpoints = swept.cgroup_endpoints,
                local_addresses = swept.local_addresses,
                "swept the datapath of what pods gone while no agent ran left"
            ),
            Err(error) => {
                tracing::warn!(%error, "sweeping the datapath failed");
                self.shared.metrics.sync_errors.with_label_values(&["sweep"]).inc();
            }
        }
    }

    /// The compiled state (empty before the first compile).
    fn state(&self) -> &DesiredState {
        static EMPTY: std::sync::OnceLock<DesiredState> = std::sync::OnceLock::new();
        self.compiler.as_ref().map(Compiler::state).unwrap_or_else(|| EMPTY.get_or_init(DesiredState::default))
    }

    /// Attach the programs for local pods that do not have them yet;
    /// whether any was.
    async fn attach_missing(&mut self) -> bool {
        let before = self.attached.len();
        let local: Vec<(PodRef, u32, Vec<IpAddr>)> = self
            .state()
            .endpoints
            .iter()
            .filter(|(pod, e)| !self.attached.contains_key(*pod) && !e.addresses.is_empty())
            .map(|(pod, e)| (pod.clone(), e.id, e.addresses.clone()))
            .collect();
        for (pod, endpoint_id, addresses) in local {
            let interface = match self.host.wiring(addresses[0]).await {
                Ok(Wiring::Veth(interface)) => interface,
                Ok(Wiring::Missing(why)) => {
                    self.wait(&pod, why);
                    continue;
                }
                Err(error) => {
                    self.wait(&pod, format!("looking up its interface failed: {error}"));
                    continue;
                }
            };
            let uid = self.snapshot.pods.get(&pod).and_then(|p| p.uid.clone());
            let cgroup = uid.as_deref().and_then(|uid| self.host.cgroup_of(uid));
            match self.programmer.attach_endpoint(
                endpoint_id,
                &interface.name,
                interface.ifindex,
                &addresses,
                cgroup.as_deref(),
            ) {
                Ok(()) => {
                    tracing::info!(%pod, interface = %interface.name, cgroup = ?cgroup, endpoint = endpoint_id, "enforcing");
                    self.attached_ahead.remove(&interface.ifindex);
                    if let Some(waited) = self.waiting.remove(&pod).filter(|w| w.warned) {
                        tracing::warn!(%pod, after_s = waited.since.elapsed().as_secs_f64(), "enforced at last");
                    }
                    if let (Some(baselines), Some(object)) = (self.baselines.as_mut(), self.snapshot.pods.get(&pod)) {
                        baselines.start(&Workload::of(object), audit_log::unix_now());
                    }
                    self.attached.insert(pod, Attached { endpoint_id, interface, addresses, cgroup });
                }
                Err(error) => {
                    self.shared.metrics.sync_errors.with_label_values(&["attach"]).inc();
                    self.wait(&pod, format!("attaching to {} failed: {error}", interface.name));
                }
            }
        }
        self.report_overdue();
        self.attached.len() != before
    }

    /// The host-side veths, as far as the node has wired them now, of the
    /// pods `scope` holds that have no programs yet: all of them at start-up
    /// or after a re-list, else those among the changed objects.
    async fn veths_to_attach_ahead(&self, scope: &Scope) -> Vec<HostInterface> {
        let candidates: Vec<(&PodRef, &Pod)> = match self.compiler.is_none() || self.compile_all {
            true => self.snapshot.pods.iter().collect(),
            false => self
                .changed
                .iter()
                .filter_map(|c| if let Changed::Pod(pod) = c { self.snapshot.pods.get_key_value(pod) } else { None })
                .collect(),
        };
        let mut veths = Vec::new();
        let unattached =
            candidates.into_iter().filter(|(key, pod)| scope.includes(pod) && !self.attached.contains_key(*key));
        for (_, pod) in unattached {
            if let Some(address) = pod.ips.first() {
                if let Ok(Wiring::Veth(interface)) = self.host.wiring(*address).await {
                    veths.push(interface);
                }
            }
        }
        veths
    }

    /// Interfaces attached pending that no pod's real entry replaced (it
    /// left, its wiring changed, or its attach failed before the entry was
    /// written) lose their programs: none may stay open.
    fn detach_unclaimed_pending(&mut self) {
        for interface in std::mem::take(&mut self.attached_pending) {
            if let Err(error) = self.programmer.detach_pending(&interface.name, interface.ifindex) {
                tracing::warn!(interface = %interface.name, %error, "removing programs attached ahead of their compile failed");
                self.shared.metrics.sync_errors.with_label_values(&["attach"]).inc();
            }
        }
    }

    /// `bulkhead_endpoints{namespace,isolation}`: the enforced local pods by
    /// the directions an enforced policy governs (README: coverage).
    fn publish_endpoints(&mut self) {
        let gauge = &self.shared.metrics.endpoints;
        let mut counts: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        if let Some(compiler) = &self.compiler {
            for pod in self.attached.keys() {
                let policies = compiler.policies_selecting(pod).iter().filter_map(|p| compiler.policy(p));
                *counts.entry((pod.namespace.to_string(), Isolation::of(policies).label())).or_default() += 1;
            }
        }
        for gone in self.published_endpoints.iter().filter(|key| !counts.contains_key(*key)) {
            let _ = gauge.remove_label_values(&[&gone.0, gone.1]);
        }
        for ((namespace, isolation), count) in &counts {
            gauge.with_label_values(&[namespace.as_str(), isolation]).set(*count);
        }
        self.published_endpoints = counts.into_keys().collect();
    }

    /// A local pod that could not be enforced this time, and why.
    fn wait(&mut self, pod: &PodRef, why: String) {
        let waiting = self.waiting.entry(pod.clone()).or_insert_with(|| {
            tracing::debug!(%pod, %why, "not enforced yet; retrying");
            Waiting { since: Instant::now(), why: String::new(), warned: false }
        });
        waiting.why = why;
    }

    /// Local pods unenforced beyond `ENFORCE_GRACE` are loud: a WARN each
    /// (once), the `bulkhead_endpoints_unenforced` gauge, and `/readyz`.
    fn report_overdue(&mut self) {
        let mut overdue = BTreeMap::new();
        for (pod, waiting) in &mut self.waiting {
            if waiting.since.elapsed() < ENFORCE_GRACE {
                continue;
            }
            if !waiting.warned {
                waiting.warned = true;
                tracing::warn!(%pod, why = %waiting.why, "local pod not enforced after {} s: its connections are not policed", ENFORCE_GRACE.as_secs());
            }
            overdue.insert(pod.to_string(), waiting.why.clone());
        }
        self.shared.metrics.endpoints_unenforced.set(overdue.len() as i64);
        *self.shared.unenforced.lock().expect("unenforced lock") = overdue;
    }

    fn detach(&mut self, pod: &PodRef) {
        let Some(attached) = self.attached.remove(pod) else { return };
        match self.programmer.detach_endpoint(
            &attached.interface.name,
            attached.interface.ifindex,
            &attached.addresses,
            attached.cgroup.as_deref(),
        ) {
            Ok(()) => {
                tracing::info!(%pod, interface = %attached.interface.name, "no longer enforcing: the pod left this node")
            }
            Err(error) => {
                tracing::warn!(%pod, interface = %attached.interface.name, %error, "detaching left something behind");
                self.shared.metrics.sync_errors.with_label_values(&["detach"]).inc();
            }
        }
    }

    async fn housekeeping(&mut self) {
        *self.shared.heartbeat.lock().expect("heartbeat lock") = Instant::now();
        self.read_datapath();
        self.keep_state();
        if self.swept.is_some_and(|at| at.elapsed() >= SWEEP_EVERY) {
            self.sweep().await;
        }
        if std::mem::take(&mut self.veths_lost) {
            self.resync_veths().await;
        }
        if self.retry && self.pending.is_none() {
            self.pending = Some(Pending { first_observed: Instant::now(), last_change: Instant::now() });
        }
        if !self.waiting.is_empty() && self.shared.is_ready() && self.attach_missing().await {
            self.publish_endpoints();
            self.keep_counters();
            self.publish();
        }
    }

    /// What must survive a restart into the state directory, a moment after it changed.
    fn keep_state(&mut self) {
        let audit = self.audit_log.write_if_due();
        if matches!(audit, Ok(true)) {
            self.shared.set_audit_flows(&self.audit_log.flows);
        }
        let baselines = match self.baselines.as_mut() {
            Some(baselines) => {
                let remote = self.shared.remote_baselines.lock().expect("remote baselines lock").take();
                let edits = self.edits_file.as_mut().and_then(EditsFile::changed);
                if let Some((others, edits)) = remote {
                    baselines.apply(&edits);
                    baselines.merge(others, &edits);
                }
                if let Some(edits) = edits {
                    baselines.apply(&edits);
                }
                if baselines.take_changed() {
                    self.baselines_file.touch();
                }
                let written = self.baselines_file.write_if_due(|| baselines.learned());
                if matches!(written, Ok(true)) {
                    *self.shared.baselines.lock().expect("baselines lock") = baselines.learned();
                }
                written
            }
            None => Ok(false),
        };
        for (what, result) in [("audit flows", audit), ("egress baselines", baselines)] {
            if let Err(error) = result {
                tracing::warn!(%error, "cannot keep the {what} in the state directory");
                self.shared.metrics.sync_errors.with_label_values(&["state"]).inc();
            }
        }
    }

    /// Give the datapath's verdict slots of pods gone back to new keys; what
    /// they counted leaves the totals already turned into metrics too.
    fn free_verdict_slots(&mut self) {
        let pods = &self.pods_by_endpoint;
        let freed = self.programmer.datapath_mut().free_verdict_slots(|endpoint| pods.contains_key(&endpoint));
        for (key, count) in freed {
            if let Some(counted) = self.counted_verdicts.get_mut(&key) {
                *counted = counted.saturating_sub(count);
            }
        }
    }

    /// Counters into metrics, events into logs.
    fn read_datapath(&mut self) {
        let events = self.programmer.datapath_mut().drain_events();
        for event in &events {
            if event.direction == EGRESS {
                self.check_baseline(event);
            }
            if event.kind == EVENT_AUDIT {
                self.record_audit(event);
            }
            let mut record = self.describe(event);
            self.last_seq += 1;
            record.seq = self.last_seq;
            self.shared.metrics.events_received.with_label_values(&[record.verdict.as_ref()]).inc();
            if record.verdict == "allow" {
                // Not logged: only `bulkhead flows` shows them.
            } else if record.verdict == "audit" {
                tracing::info!(
                    verdict = %record.verdict, direction = %record.direction, pod = %record.pod, source = %record.source,
                    destination = %record.destination, protocol = %record.protocol, policy = %record.policy, rule = %rule_text(record.rule), hook = %record.hook,
                    "connection would be denied (audit)"
                );
            } else {
                tracing::warn!(
                    verdict = %record.verdict, direction = %record.direction, pod = %record.pod, source = %record.source,
                    destination = %record.destination, protocol = %record.protocol, policy = %record.policy, rule = %rule_text(record.rule), hook = %record.hook,
                    "connection denied"
                );
            }
            let mut recent = self.shared.events.lock().expect("events lock");
            if recent.len() == RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back(record);
        }

        let verdicts = self.programmer.datapath().verdicts();
        for (key, count) in &verdicts {
            let before = self.counted_verdicts.get(key).copied().unwrap_or(0);
            if *count <= before {
                continue;
            }
            let pod = self.pods_by_endpoint.get(&key.endpoint).cloned().unwrap_or_else(|| PodRef::new("", ""));
            let policy =
                self.state().policy_names.get(&key.policy_id).map(PolicyRef::qualified_name).unwrap_or_default();
            let labels = [direction_name(key.direction), pod.namespace.as_str(), pod.name.as_str(), policy.as_str()];
            let metric = if key.kind == EVENT_AUDIT {
                &self.shared.metrics.audit_denied_connections
            } else {
                &self.shared.metrics.blocked_connections
            };
            metric.with_label_values(&labels).inc_by(count - before);
        }
        self.counted_verdicts = verdicts;
        if self.verdict_slots_freed.elapsed() >= FREE_VERDICT_SLOTS {
            self.verdict_slots_freed = Instant::now();
            self.free_verdict_slots();
        }

        let drops = self.programmer.datapath().drops();
        for (key, count) in &drops {
            let before = self.counted_drops.get(key).copied().unwrap_or(0);
            if *count > before {
                self.shared
                    .metrics
                    .dropped_packets
                    .with_label_values(&[direction_name(key.direction), drop_reason::name(key.reason)])
                    .inc_by(count - before);
            }
        }
        self.counted_drops = drops;
    }

    /// A counter series at 0 for every enforced pod, each policy selecting it
    /// and each direction that policy governs (blocked, or audit-denied for
    /// an Audit-mode policy); series whose pod or policy went, go.
    fn keep_counters(&mut self) {
        let Some(compiler) = self.compiler.as_ref() else { return };
        let metrics = &self.shared.metrics;
        let counter =
            |audit: bool| if audit { &metrics.audit_denied_connections } else { &metrics.blocked_connections };
        let add = |pod: &PodRef, (audit, direction, policy): &PodCounter| {
            let policy = policy.qualified_name();
            counter(*audit).with_label_values(&[direction_name(*direction), &pod.namespace, &pod.name, &policy]);
        };
        let remove = |pod: &PodRef, (audit, direction, policy): &PodCounter| {
            let policy = policy.qualified_name();
            let _ =
                counter(*audit).remove_label_values(&[direction_name(*direction), &pod.namespace, &pod.name, &policy]);
        };
        // Most reconciles change no pod's policies: compare borrowed series
        // pod by pod, and build label strings only for what differs.
        let mut wanted: Vec<(bool, u8, &PolicyRef)> = Vec::new();
        for pod in self.attached.keys() {
            wanted.clear();
            for id in compiler.policies_selecting(pod) {
                let Some(policy) = compiler.policy(id) else { continue };
                for direction in [INGRESS, EGRESS] {
                    if coverage::governs(policy, direction) {
                        wanted.push((policy.audit, direction, id));
                    }
                }
            }
            wanted.sort_unstable();
            wanted.dedup();
            if !self.zero_counters.contains_key(pod) {
                self.zero_counters.insert(pod.clone(), Vec::new());
            }
            let had = self.zero_counters.get_mut(pod).expect("inserted above");
            if had.len() == wanted.len() && had.iter().zip(&wanted).all(|(h, w)| (h.0, h.1, &h.2) == (w.0, w.1, w.2)) {
                continue;
            }
            let now: Vec<PodCounter> = wanted.iter().map(|(a, d, id)| (*a, *d, (*id).clone())).collect();
            for series in had.iter().filter(|s| !now.contains(s)) {
                remove(pod, series);
            }
            for series in now.iter().filter(|s| !had.contains(s)) {
                add(pod, series);
            }
            *had = now;
        }
        // Pods no longer enforced lose their series.
        let attached = &self.attached;
        self.zero_counters.retain(|pod, had| {
            let enforced = attached.contains_key(pod);
            if !enforced {
                had.iter().for_each(|series| remove(pod, series));
            }
            enforced
        });
    }

    /// An egress connection (allowed, denied or audited) against its workload's baseline.
    fn check_baseline(&mut self, event: &Event) {
        if self.baselines.is_none() {
            return;
        }
        let Some(pod) = self.pods_by_endpoint.get(&event.endpoint).and_then(|p| self.snapshot.pods.get(p)) else {
            return;
        };
        let workload = Workload::of(pod);
        let address = event_address(event.daddr.octets());
        let peer = match self.pod_at(address).and_then(|p| self.snapshot.pods.get(p)) {
            Some(peer) => {
                let peer = Workload::of(peer);
                format!("{}/{}", peer.namespace, peer.name)
            }
            None => address.to_string(),
        };
        let destination = Destination { peer, protocol: event.protocol, port: event.dport };
        let quarantined = pod.labels.contains_key(QUARANTINE_LABEL);
        if quarantined && !self.quarantining.is_empty() {
            self.quarantining.remove(&pod.pod_ref());
        }
        let baselines = self.baselines.as_mut().expect("checked above");
        if baselines.observe(&workload, destination.clone(), audit_log::unix_now()) {
            let asked = self.config.quarantine_on_anomaly
                && !quarantined
                && self
                    .snapshot
                    .namespaces
                    .get(pod.namespace.as_str())
                    .and_then(|ns| ns.labels.get(ON_ANOMALY_LABEL))
                    .map(String::as_str)
                    == Some("quarantine");
            // A label no policy isolates would only pretend.
            let quarantine = asked && self.snapshot.policies.contains_key(&quarantine_policy());
            if asked && !quarantine {
                tracing::warn!(pod = %pod.pod_ref(), "namespace asks for quarantine, but the ClusterConnectionPolicy {QUARANTINE_POLICY} is not installed (manifests/quarantine.yaml): not quarantined");
                self.shared.metrics.sync_errors.with_label_values(&["quarantine"]).inc();
            }
            self.shared
                .metrics
                .egress_anomalies
                .with_label_values(&[workload.namespace.as_str(), workload.name.as_str()])
                .inc();
            tracing::warn!(
                namespace = %workload.namespace, workload = %workload.name, pod = %pod.pod_ref(), destination = %destination.peer,
                protocol = protocol_name(destination.protocol), port = destination.port,
                "egress to a destination outside the workload's learned baseline"
            );
            self.shared.push_anomaly(Anomaly {
                pod: pod.pod_ref(),
                uid: pod.uid.clone(),
                workload: workload.name.clone(),
                destination: format!(
                    "{} {}/{}",
                    destination.peer,
                    destination.port,
                    protocol_name(destination.protocol)
                ),
                // Once: the label takes a moment to come back through the watch.
                quarantine: quarantine && self.quarantining.insert(pod.pod_ref()),
            });
        }
    }

    /// An audit verdict into this node's audit flows, by workload.
    fn record_audit(&mut self, event: &Event) {
        let Some(judged) = self.pods_by_endpoint.get(&event.endpoint).and_then(|p| self.snapshot.pods.get(p)) else {
            return;
        };
        let judged = FlowEnd::of_pod(judged);
        let peer_address = event_address(if event.direction == EGRESS { event.daddr } else { event.saddr }.octets());
        let peer = match self.pod_at(peer_address).and_then(|p| self.snapshot.pods.get(p)) {
            Some(pod) => FlowEnd::of_pod(pod),
            None => FlowEnd::Address(peer_address),
        };
        let (direction, source, destination) = if event.direction == EGRESS {
            (Direction::Egress, judged, peer)
        } else {
            (Direction::Ingress, peer, judged)
        };
        let key = FlowKey {
            direction,
            source,
            destination,
            protocol: protocol_name(event.protocol).into(),
            port: event.dport,
        };
        let policy = self.state().policy_names.get(&event.policy_id).map(PolicyRef::qualified_name).unwrap_or_default();
        self.audit_log.record(key, &policy);
    }

    /// The event with names; `seq` is the caller's to set.
    fn describe(&self, event: &Event) -> EventRecord {
        let pod = self
            .pods_by_endpoint
            .get(&event.endpoint)
            .map(PodRef::to_string)
            .unwrap_or_else(|| format!("endpoint {}", event.endpoint));
        let name = |address: [u8; 16], port: u16| {
            let address = event_address(address);
            match self.pod_at(address) {
                Some(pod) => format!("{pod} ({address}:{port})"),
                None => format!("{address}:{port}"),
            }
        };
        let policy = self.state().policy_names.get(&event.policy_id).map(PolicyRef::qualified_name).unwrap_or_default();
        let cgroup = event.source == SOURCE_CGROUP;
        EventRecord {
            seq: 0,
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            verdict: Cow::Borrowed(match event.kind {
                EVENT_AUDIT => "audit",
                EVENT_NEW_FLOW => "allow",
                _ => "deny",
            }),
            direction: Cow::Borrowed(direction_name(event.direction)),
            pod: pod.clone(),
            source: if cgroup { pod } else { name(event.saddr.octets(), event.sport) },
            destination: name(event.daddr.octets(), event.dport),
            protocol: protocol_name(event.protocol).to_string(),
            policy,
            rule: (event.rule != RULE_DEFAULT_DENY).then_some(event.rule),
            hook: Cow::Borrowed(if cgroup { "connect" } else { "tc" }),
        }
    }

    /// What changes when only other nodes' pods did: the revision held,
    /// the syncs, the entries in the maps.
    fn publish_revision(&self) {
        let mut state = self.shared.state.lock().expect("state lock");
        state.revision.clone_from(&self.revision);
        state.syncs = self.syncs;
        drop(state);
        self.shared.synced.send_replace(self.syncs);
        self.publish_map_entries();
    }

    fn publish_map_entries(&self) {
        let metrics = &self.shared.metrics;
        let state = self.state();
        let policy_entries = state.policy.len() - self.programmer.unwritten();
        metrics.map_entries.with_label_values(&["policy"]).set(policy_entries as i64);
        metrics.map_entries.with_label_values(&["ipcache"]).set(state.ipcache.len() as i64);
        metrics.map_entries.with_label_values(&["endpoints"]).set(self.attached.len() as i64);
        metrics
            .map_entries
            .with_label_values(&["local_addresses"])
            .set(self.attached.values().map(|a| a.addresses.len()).sum::<usize>() as i64);
    }

    fn publish(&self) {
        let failed = self.programmer.failed_closed();
        let view = StateView {
            ready: true,
            revision: self.revision.clone(),
            syncs: self.syncs,
            endpoints: self.attached.iter().map(|(p, a)| (p.to_string(), a.interface.name.clone())).collect(),
            waiting: self.waiting.iter().map(|(pod, w)| (pod.to_string(), w.why.clone())).collect(),
            failed_closed: self
                .pods_by_endpoint
                .iter()
                .filter(|(id, _)| failed.contains(id))
                .map(|(_, p)| p.to_string())
                .collect(),
            rejected: self.snapshot.rejected.values().map(|r| r.error.to_string()).collect(),
            accepted_policies: self.snapshot.policies.len(),
            policies: self
                .state()
                .selected_pods
                .iter()
                .filter(|(_, selected)| **selected > 0)
                .filter_map(|(key, selected)| {
                    let generation = self.snapshot.policies.get(key)?.generation;
                    Some((key.to_string(), PolicyView { generation, selected_pods: *selected }))
                })
                .collect(),
        };
        let report = NodeReport {
            programmed: view.policies.iter().map(|(k, v)| (k.clone(), v.generation.unwrap_or(0))).collect(),
            enforced: view.endpoints.keys().cloned().collect(),
            unenforced: self.shared.unenforced.lock().expect("unenforced lock").clone(),
            ..Default::default()
        };
        self.shared.set_report(report);
        let metrics = &self.shared.metrics;
        metrics.endpoints_failed_closed.set(view.failed_closed.len() as i64);
        metrics.policies_rejected.set(self.snapshot.rejected.len() as i64);
        self.publish_map_entries();
        *self.shared.state.lock().expect("state lock") = view;
        self.shared.synced.send_replace(self.syncs);
    }
}

/// Give each interface its programs behind a pending entry (see
/// `Programmer::attach_pending`); what is attached is returned. A failure
/// only costs the head start: `attach_missing` tries again and reports it.
fn attach_pending(programmer: &mut Programmer, interfaces: Vec<HostInterface>) -> Vec<HostInterface> {
    interfaces
        .into_iter()
        .filter(|interface| match programmer.attach_pending(&interface.name, interface.ifindex) {
            Ok(attached) => attached,
            Err(error) => {
                tracing::debug!(interface = %interface.name, %error, "attaching ahead of the compile failed");
                false
            }
        })
        .collect()
}

/// Each rejected version is logged once, by every agent that sees it, at
/// WARN: the agent goes on enforcing the last good state. The Event on the
/// object is the controller's alone.
fn log_admission(admission: &Admission) {
    match admission {
        Admission::Accepted { policy, was_rejected: true } => tracing::info!(%policy, "policy accepted again"),
        Admission::Rejected { rejection, kept_last_good, seen_before: false } => tracing::warn!(
            policy = %rejection.error.policy, generation = ?rejection.generation, field = %rejection.error.field,
            reason = %rejection.error.reason, error = %rejection.error.message, kept_last_good,
            "policy rejected; what it enforced before stays enforced"
        ),
        _ => {}
    }
}

/// The shipped policy that isolates quarantined pods.
const QUARANTINE_POLICY: &str = "bulkhead-quarantine";

fn quarantine_policy() -> PolicyRef {
    PolicyRef {
        kind: bulkhead_policy::PolicyKind::ClusterConnectionPolicy,
        namespace: String::new(),
        name: QUARANTINE_POLICY.into(),
    }
}

fn changed_of(key: ObjectKey) -> Changed {
    match key {
        ObjectKey::Namespace(name) => Changed::Namespace(name),
        ObjectKey::Pod(pod) => Changed::Pod(pod),
        ObjectKey::Policy(policy) => Changed::Policy(*policy),
    }
}

fn direction_name(direction: u8) -> &'static str {
    if direction == INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// Event addresses are IPv6, IPv4 mapped into it.
fn event_address(address: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(address);
    v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
}

pub(crate) fn protocol_name(number: u8) -> &'static str {
    use datapath_common::proto;
    match number {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        proto::ICMP => "ICMP",
        proto::ICMPV6 => "ICMPv6",
        _ => "other",
    }
}

fn rule_text(rule: Option<u32>) -> String {
    match rule {
        Some(rule) => rule.to_string(),
        None => "none (the pod is isolated and no rule allows)".to_string(),
    }
}
