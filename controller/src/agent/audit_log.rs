//! The node's audit flows on disk: `<state dir>/audit-flows.json`, written
//! whole (to a temporary file, then renamed, so a crash leaves the old or the
//! new, never half) a moment after they change, read back at start so a
//! restarted agent goes on counting where it stopped.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use bulkhead_policy::audit::{AuditFlows, Flow};
use serde::{Deserialize, Serialize};

/// Flows kept per node; beyond it the flow seen least recently goes.
pub const CAPACITY: usize = 4096;
/// Changes are written at most this often.
const WRITE_EVERY: Duration = Duration::from_secs(2);
const FILE: &str = "audit-flows.json";

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    flows: Vec<Flow>,
}

pub struct AuditLog {
    path: Option<PathBuf>,
    pub flows: AuditFlows,
    dirty: bool,
    written: Instant,
}

impl AuditLog {
    /// The flows under `state_dir` (none: kept in memory only). A file that
    /// cannot be read is set aside as `audit-flows.json.unreadable` and
    /// counting starts again: the error says so.
    pub fn open(state_dir: Option<&Path>) -> (Self, Option<String>) {
        let mut log = Self {
            path: state_dir.map(|d| d.join(FILE)),
            flows: AuditFlows::new(CAPACITY),
            dirty: false,
            written: Instant::now(),
        };
        let Some(path) = log.path.clone() else { return (log, None) };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return (log, None),
            Err(error) => return (log, Some(format!("reading {}: {error}", path.display()))),
        };
        match serde_json::from_str::<Stored>(&text) {
            Ok(stored) => {
                log.flows.merge(stored.flows);
                (log, None)
            }
            Err(error) => {
                let aside = path.with_extension("json.unreadable");
                let _ = std::fs::rename(&path, &aside);
                (log, Some(format!("{}: {error}; set aside as {}", path.display(), aside.display())))
            }
        }
    }

    pub fn record(&mut self, key: bulkhead_policy::audit::FlowKey, policy: &str) {
        self.flows.record(key, policy, unix_now());
        self.dirty = true;
    }

    /// Write the flows if they changed and the last write is a moment ago;
    /// true when written.
    pub fn write_if_due(&mut self) -> std::io::Result<bool> {
        if !self.dirty || self.written.elapsed() < WRITE_EVERY {
            return Ok(false);
        }
        self.written = Instant::now();
        self.dirty = false;
        let Some(path) = &self.path else { return Ok(true) };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let stored = Stored { version: 1, flows: self.flows.flows() };
        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(serde_json::to_string(&stored).expect("serializable flows").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        Ok(true)
    }
}

/// The flows a state directory holds (what `bulkhead rollout report` reads in dir mode).
pub fn read(state_dir: &Path) -> anyhow::Result<Vec<Flow>> {
    let path = state_dir.join(FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let stored: Stored = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(stored.flows)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use bulkhead_policy::audit::{Direction, FlowEnd, FlowKey};

    use super::*;

    #[test]
    fn flows_survive_a_restart_and_a_broken_file_is_set_aside() {
        let dir = std::env::temp_dir().join(format!("bulkhead-audit-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let key = FlowKey {
            direction: Direction::Egress,
            source: FlowEnd::Address("10.0.0.1".parse().unwrap()),
            destination: FlowEnd::Address("203.0.113.9".parse().unwrap()),
            protocol: "TCP".into(),
            port: 443,
        };
        let (mut log, error) = AuditLog::open(Some(&dir));
        assert!(error.is_none());
        log.record(key.clone(), "shop/bulkhead-default-deny");
        log.written -= WRITE_EVERY;
        assert!(log.write_if_due().unwrap());
        assert!(!log.write_if_due().unwrap(), "nothing new");

        let (mut again, error) = AuditLog::open(Some(&dir));
        assert!(error.is_none());
        again.record(key, "shop/bulkhead-default-deny");
        assert_eq!(again.flows.flows()[0].stats.count, 2, "counting goes on");
        assert_eq!(read(&dir).unwrap().len(), 1);

        std::fs::write(dir.join(FILE), "{not json").unwrap();
        let (fresh, error) = AuditLog::open(Some(&dir));
        assert!(error.unwrap().contains("set aside"));
        assert!(fresh.flows.is_empty());
        assert!(dir.join("audit-flows.json.unreadable").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
