//! `--source dir:<path>`: the same objects as the API server would give,
//! read from the `*.yaml`/`*.yml` files of a folder (recursively) and
//! followed with inotify. Each scan turns what changed on disk into
//! `Applied`/`Deleted` changes — the shape of watch events — so a file edit
//! takes the path a watch event takes. A file that stops parsing keeps the
//! objects it last gave: bad input never changes what is enforced.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use bulkhead_policy::{identity::stable_hash, manifest, Change, Object, ObjectKey};

use super::Update;

struct FileState {
    /// What identifies this version without reading it: length, mtime, inode.
    stamp: (u64, i128, u64),
    content_hash: u64,
    /// The objects of the last version that parsed, and that version's hash.
    objects: Vec<Object>,
    parsed_hash: u64,
}

pub struct DirSource {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Which files hold each object; the last (by path) wins, as a later
    /// `kubectl apply` would.
    owners: BTreeMap<ObjectKey, BTreeSet<PathBuf>>,
    /// Each object as last handed out, and the version of the file it came from.
    current: BTreeMap<ObjectKey, (PathBuf, u64)>,
    /// The folder's digest: a sum over files of (path, content), kept as
    /// files change so a scan of one file costs one file.
    digest: u64,
}

/// What one scan found.
pub struct Scan {
    pub changes: Vec<Change>,
    pub revision: String,
    /// Files that did not parse, with why; their last good objects stay.
    pub errors: Vec<String>,
}

impl DirSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), files: BTreeMap::new(), owners: BTreeMap::new(), current: BTreeMap::new(), digest: 0 }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The revision of what the last scan saw.
    pub fn revision(&self) -> String {
        format!("{:016x}", self.digest)
    }

    /// Look at the whole folder again (a file is read only when its length
    /// or mtime moved) and say what changed since the last scan.
    pub fn scan(&mut self) -> std::io::Result<Scan> {
        let listed: BTreeSet<PathBuf> = followed_files(&self.root)?.into_iter().collect();
        let mut paths: BTreeSet<PathBuf> = self.files.keys().filter(|p| !listed.contains(*p)).cloned().collect();
        paths.extend(listed);
        self.look_at(&paths, true)
    }

    /// Look at these paths only (what inotify named): read them again, drop
    /// the ones that are gone.
    pub fn scan_paths(&mut self, paths: &BTreeSet<PathBuf>) -> std::io::Result<Scan> {
        self.look_at(paths, false)
    }

    /// `trust_stamps`: skip a file whose length, mtime and inode are as
    /// last read (mtimes are coarse: a file inotify names is read anyway).
    fn look_at(&mut self, paths: &BTreeSet<PathBuf>, trust_stamps: bool) -> std::io::Result<Scan> {
        let mut errors = Vec::new();
        let mut touched = Vec::new();
        for path in paths.iter().filter(|p| is_manifest(p)) {
            let stamp = match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => {
                    use std::os::unix::fs::MetadataExt;
                    (meta.len(), meta.modified().map(nanos).unwrap_or(0), meta.ino())
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(gone) = self.files.remove(path) {
                        self.digest = self.digest.wrapping_sub(file_digest(&self.root, path, gone.content_hash));
                        touched.push((path.clone(), gone.objects, Vec::new()));
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if trust_stamps && self.files.get(path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let text = match std::fs::read(path) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                // Removed between the look and the read: the next event says so.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let content_hash = stable_hash(&text);
            let before = self.files.remove(path);
            if let Some(before) = &before {
                self.digest = self.digest.wrapping_sub(file_digest(&self.root, path, before.content_hash));
            }
            self.digest = self.digest.wrapping_add(file_digest(&self.root, path, content_hash));
            let (old_objects, old_parsed) = before.map(|f| (f.objects, f.parsed_hash)).unwrap_or_default();
            let state = if old_parsed == content_hash && !old_objects.is_empty() {
                FileState { stamp, content_hash, objects: old_objects.clone(), parsed_hash: content_hash }
            } else {
                match manifest::parse(&path.display().to_string(), &text) {
                    Ok(objects) => FileState { stamp, content_hash, objects, parsed_hash: content_hash },
                    Err(error) => {
                        errors.push(error.to_string());
                        FileState { stamp, content_hash, objects: old_objects.clone(), parsed_hash: old_parsed }
                    }
                }
            };
            touched.push((path.clone(), old_objects, state.objects.clone()));
            self.files.insert(path.clone(), state);
        }
        let mut keys = BTreeSet::new();
        for (path, old, new) in &touched {
            for object in old {
                let key = object.key();
                if let Some(owners) = self.owners.get_mut(&key) {
                    owners.remove(path);
                }
                keys.insert(key);
            }
            for object in new {
                let key = object.key();
                self.owners.entry(key.clone()).or_default().insert(path.clone());
                keys.insert(key);
            }
        }
        let mut changes = Vec::new();
        for key in keys {
            let winner = self.owners.get(&key).and_then(|owners| owners.last()).cloned();
            match winner {
                None => {
                    self.owners.remove(&key);
                    if self.current.remove(&key).is_some() {
                        changes.push(Change::Deleted(key));
                    }
                }
                Some(path) => {
                    let file = &self.files[&path];
                    let origin = (path.clone(), file.parsed_hash);
                    if self.current.get(&key) != Some(&origin) {
                        let object = file.objects.iter().rev().find(|o| o.key() == key).expect("the file holds it");
                        changes.push(Change::Applied(object.clone()));
                        self.current.insert(key, origin);
                    }
                }
            }
        }
        Ok(Scan { changes, revision: self.revision(), errors })
    }
}

fn nanos(time: std::time::SystemTime) -> i128 {
    match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => since.as_nanos() as i128,
        Err(before) => -(before.duration().as_nanos() as i128),
    }
}

/// One file's part of the folder's digest.
fn file_digest(root: &Path, path: &Path, content_hash: u64) -> u64 {
    let relative = path.strip_prefix(root).unwrap_or(path);
    stable_hash(&format!("{}={content_hash:016x}", relative.display()))
}

fn is_manifest(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    // Hidden files are editors' and writers' temporaries, renamed into place when complete.
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

fn followed_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let file_type = entry.file_type()?;
            if file_type.is_dir() && !entry.file_name().to_string_lossy().starts_with('.') {
                pending.push(path);
            } else if is_manifest(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The revision an agent following `root` reports once it has enforced the
/// folder's present content.
pub fn revision(root: &Path) -> std::io::Result<String> {
    Ok(DirSource::new(root).scan()?.revision)
}

/// How long a burst of file events is gathered before a scan: an editor's
/// write, rename and chmod arrive as one change.
const SETTLE: Duration = Duration::from_millis(3);
/// A whole look now and then, in case inotify lost events (its queue overflowed).
const RESCAN: Duration = Duration::from_secs(10);

/// What inotify says: paths that changed, or that everything must be looked at.
enum Wake {
    Paths(Vec<PathBuf>, Instant),
    Everything(Instant),
}

/// Scan once, report it with `Synced`, then follow the folder until `updates` closes.
pub async fn run(mut source: DirSource, updates: mpsc::Sender<Update>) -> anyhow::Result<()> {
    use notify::Watcher;
    let (wake, mut woken) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let wake_up = match event {
            // Reads are events too (our own scans among them): only changes wake us.
            Ok(event) if matches!(event.kind, notify::EventKind::Access(_)) => return,
            // A directory appeared or went, or inotify lost count: look at everything.
            Ok(event) if event.need_rescan() || event.paths.iter().any(|p| p.is_dir() || p.extension().is_none()) => {
                Wake::Everything(Instant::now())
            }
            Ok(event) => Wake::Paths(event.paths, Instant::now()),
            Err(_) => Wake::Everything(Instant::now()),
        };
        let _ = wake.send(wake_up);
    })?;
    watcher.watch(source.root(), notify::RecursiveMode::Recursive)?;

    let observed = Instant::now();
    let first = source.scan()?;
    report_errors(&first.errors);
    let mut changes = first.changes;
    changes.push(Change::Synced);
    let mut revision = first.revision;
    if updates.send(Update { changes, observed, revision: Some(revision.clone()) }).await.is_err() {
        return Ok(());
    }
    loop {
        let (mut paths, mut everything, observed) = match tokio::time::timeout(RESCAN, woken.recv()).await {
            Ok(Some(Wake::Paths(paths, at))) => (paths.into_iter().collect::<BTreeSet<_>>(), false, at),
            Ok(Some(Wake::Everything(at))) => (BTreeSet::new(), true, at),
            Ok(None) => return Ok(()),
            Err(_) => (BTreeSet::new(), true, Instant::now()),
        };
        tracing::debug!(after_ms = observed.elapsed().as_secs_f64() * 1e3, "folder changed");
        tokio::time::sleep(SETTLE).await;
        while let Ok(more) = woken.try_recv() {
            match more {
                Wake::Paths(more, _) => paths.extend(more),
                Wake::Everything(_) => everything = true,
            }
        }
        let scan = if everything { source.scan() } else { source.scan_paths(&paths) };
        let scan = match scan {
            Ok(scan) => scan,
            Err(error) => {
                tracing::error!(folder = %source.root().display(), %error, "cannot read the policy folder; what is enforced stays");
                continue;
            }
        };
        report_errors(&scan.errors);
        // Events that changed no byte (a touch, a file we do not follow) change nothing.
        if scan.changes.is_empty() && scan.revision == revision {
            continue;
        }
        revision = scan.revision.clone();
        if updates.send(Update { changes: scan.changes, observed, revision: Some(scan.revision) }).await.is_err() {
            return Ok(());
        }
    }
}

fn report_errors(errors: &[String]) {
    for error in errors {
        tracing::error!(%error, "manifest rejected; the objects it last gave stay enforced");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bulkhead-dir-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const POLICY: &str = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: []\n";

    fn kinds(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Applied(o) => format!("applied {:?}", o.key()),
                Change::Deleted(k) => format!("deleted {k:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn edits_become_watch_shaped_changes_and_a_bad_file_keeps_its_objects() {
        let dir = temp_dir("edits");
        std::fs::write(dir.join("p.yaml"), POLICY).unwrap();
        std::fs::write(dir.join("notes.txt"), "not followed").unwrap();
        let mut source = DirSource::new(&dir);
        let first = source.scan().unwrap();
        assert_eq!(first.changes.len(), 1, "{:?}", kinds(&first.changes));
        assert_eq!(first.revision, revision(&dir).unwrap(), "a fresh reader computes the same revision");

        let again = source.scan().unwrap();
        assert!(again.changes.is_empty(), "nothing changed: {:?}", kinds(&again.changes));
        assert_eq!(again.revision, first.revision);

        std::fs::write(dir.join("p.yaml"), POLICY.replace("ingress: []", "ingress: [{}]")).unwrap();
        let edited = source.scan().unwrap();
        assert_eq!(kinds(&edited.changes).len(), 1);
        assert!(kinds(&edited.changes)[0].starts_with("applied"));
        assert_ne!(edited.revision, first.revision);

        std::fs::write(
            dir.join("p.yaml"),
            "kind: ConnectionPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: 7}\n",
        )
        .unwrap();
        let broken = source.scan().unwrap();
        assert!(broken.changes.is_empty(), "a bad file changes nothing: {:?}", kinds(&broken.changes));
        assert!(
            broken.errors[0].contains("p.yaml") && broken.errors[0].contains("spec.podSelector"),
            "{:?}",
            broken.errors
        );

        std::fs::remove_file(dir.join("p.yaml")).unwrap();
        let removed = source.scan().unwrap();
        assert_eq!(
            kinds(&removed.changes),
            vec!["deleted Policy(PolicyRef { kind: ConnectionPolicy, namespace: \"x\", name: \"p\" })".to_string()]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
