//! The node's audit flows on disk, `<state dir>/audit-flows.json`, read back
//! at start so a restarted agent goes on counting where it stopped.

use std::path::Path;

use bulkhead_policy::audit::{AuditFlows, Flow, FlowKey};
use serde::{Deserialize, Serialize};

use super::state_file::{self, StateFile};

/// Flows kept per node; beyond it the flow seen least recently goes.
pub const CAPACITY: usize = 4096;
const FILE: &str = "audit-flows.json";

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    flows: Vec<Flow>,
}

pub struct AuditLog {
    file: StateFile,
    pub flows: AuditFlows,
}

impl AuditLog {
    /// The flows under `state_dir` (none: kept in memory only), and why the
    /// file there could not be read, if it could not: counting starts again.
    pub fn open(state_dir: Option<&Path>) -> (Self, Option<String>) {
        let file = StateFile::new(state_dir, FILE);
        let mut flows = AuditFlows::new(CAPACITY);
        let unreadable = match file.read::<Stored>() {
            Ok(stored) => {
                flows.merge(stored.into_iter().flat_map(|s| s.flows));
                None
            }
            Err(error) => Some(error),
        };
        (Self { file, flows }, unreadable)
    }

    pub fn record(&mut self, key: FlowKey, policy: &str) {
        self.flows.record(key, policy, unix_now());
        self.file.touch();
    }

    /// Write the flows if they changed a moment ago; true when due.
    pub fn write_if_due(&mut self) -> std::io::Result<bool> {
        let flows = &self.flows;
        self.file.write_if_due(|| Stored { version: 1, flows: flows.flows() })
    }
}

/// The flows a state directory holds (what `bulkhead rollout report` reads in dir mode).
pub fn read(state_dir: &Path) -> anyhow::Result<Vec<Flow>> {
    let path = state_dir.join(FILE);
    match state_file::read_path::<Stored>(&path).map_err(anyhow::Error::msg)? {
        Some(stored) => Ok(stored.flows),
        None => anyhow::bail!("{}: no audit flows here (is it an agent's --state-dir?)", path.display()),
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use bulkhead_policy::audit::{Direction, FlowEnd};

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
        log.file.due_now();
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
