//! One file of the node's state directory: what must survive an agent
//! restart. Written whole — to a temporary file, synced, then renamed, so a
//! crash leaves the old or the new, never half — a moment after it changes;
//! read back at start. A file that cannot be read is set aside (as
//! `<name>.unreadable`) and the agent starts afresh, saying so.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{de::DeserializeOwned, Serialize};

/// Changes are written at most this often.
pub const WRITE_EVERY: Duration = Duration::from_secs(2);

pub struct StateFile {
    /// `None`: no state directory, nothing kept.
    path: Option<PathBuf>,
    dirty: bool,
    written: Instant,
}

impl StateFile {
    pub fn new(state_dir: Option<&Path>, name: &str) -> Self {
        Self { path: state_dir.map(|d| d.join(name)), dirty: false, written: Instant::now() }
    }

    /// What the file holds: `Ok(None)` when there is none yet, `Err` (after
    /// setting it aside) when it cannot be read.
    pub fn read<T: DeserializeOwned>(&self) -> Result<Option<T>, String> {
        let Some(path) = &self.path else { return Ok(None) };
        read_path(path)
    }

    /// Something changed: write at the next `write_if_due` a moment on.
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Write what `value` makes if it changed and the last write is a
    /// moment ago; true when due. `value` is called only then: the loop
    /// asks every tick, and a copy of thousands of flows is not for nothing.
    pub fn write_if_due<T: Serialize>(&mut self, value: impl FnOnce() -> T) -> std::io::Result<bool> {
        if !self.dirty || self.written.elapsed() < WRITE_EVERY {
            return Ok(false);
        }
        self.written = Instant::now();
        self.dirty = false;
        let Some(path) = &self.path else { return Ok(true) };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_atomically(path, &serde_json::to_string(&value()).expect("serializable state"))?;
        Ok(true)
    }

    #[cfg(test)]
    pub fn due_now(&mut self) {
        self.written -= WRITE_EVERY;
    }
}

/// Write a whole file so that a crash leaves the old or the new: a
/// temporary beside it, synced, renamed into place.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// Read a state file: `Ok(None)` when absent; set aside when unreadable.
pub fn read_path<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("reading {}: {error}", path.display())),
    };
    serde_json::from_str(&text).map(Some).map_err(|error| {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".unreadable");
        let _ = std::fs::rename(path, &aside);
        format!("{}: {error}; set aside as {}", path.display(), Path::new(&aside).display())
    })
}

/// The edits file of a state directory, `baseline-edits.json`: how
/// `bulkhead baseline reset|allow --state-dir` reaches a dir-mode agent.
pub struct EditsFile {
    path: std::path::PathBuf,
    seen: Option<std::time::SystemTime>,
}

/// The edits file's name.
pub const EDITS_FILE: &str = "baseline-edits.json";

impl EditsFile {
    pub fn new(state_dir: &std::path::Path) -> Self {
        Self { path: state_dir.join(EDITS_FILE), seen: None }
    }

    /// The edits, when the file is new or changed since last asked.
    pub fn changed(&mut self) -> Option<bulkhead_policy::baseline::Edits> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok()?;
        if self.seen == Some(modified) {
            return None;
        }
        self.seen = Some(modified);
        match std::fs::read_to_string(&self.path).map(|text| serde_json::from_str(&text)) {
            Ok(Ok(edits)) => Some(edits),
            Ok(Err(error)) => {
                tracing::warn!(path = %self.path.display(), %error, "baseline edits unreadable; ignored");
                None
            }
            Err(_) => None,
        }
    }
}
