//! `--source dir:<path>`: the same objects as the API server would give,
//! read from the `*.yaml`/`*.yml` files of a folder (recursively) and
//! followed with inotify. Each scan turns what changed on disk into
//! `Applied`/`Deleted` changes — the shape of watch events — so a file edit
//! takes the path a watch event takes. A file that stops parsing keeps the
//! objects it last gave: bad input never changes what is enforced.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use bulkhead_policy::{identity::stable_hash, manifest, Change, Object, ObjectKey};

use super::Update;

struct FileState {
    content_hash: u64,
    /// The objects of the last version that parsed, and that version's hash.
    objects: Vec<Object>,
    parsed_hash: u64,
}

pub struct DirSource {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Which file and which version of it each object came from.
    origins: BTreeMap<ObjectKey, (PathBuf, u64)>,
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
        Self { root: root.into(), files: BTreeMap::new(), origins: BTreeMap::new() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Read the folder again and say what changed since the last scan.
    pub fn scan(&mut self) -> std::io::Result<Scan> {
        let mut errors = Vec::new();
        let mut seen = BTreeMap::new();
        for path in followed_files(&self.root)? {
            let text = match std::fs::read(&path) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                // Removed between the listing and the read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let content_hash = stable_hash(&text);
            let unchanged = self.files.get(&path).is_some_and(|f| f.content_hash == content_hash);
            if !unchanged {
                match manifest::parse(&path.display().to_string(), &text).map_err(|e| e.to_string()) {
                    Ok(objects) => {
                        self.files.insert(path.clone(), FileState { content_hash, objects, parsed_hash: content_hash });
                    }
                    Err(error) => {
                        errors.push(error);
                        let (objects, parsed_hash) =
                            self.files.remove(&path).map(|f| (f.objects, f.parsed_hash)).unwrap_or_default();
                        self.files.insert(path.clone(), FileState { content_hash, objects, parsed_hash });
                    }
                }
            }
            seen.insert(path, content_hash);
        }
        self.files.retain(|path, _| seen.contains_key(path));

        // Later files win for an object defined twice, as a later `kubectl apply` would.
        let mut current: BTreeMap<ObjectKey, (&Object, (PathBuf, u64))> = BTreeMap::new();
        for (path, file) in &self.files {
            for object in &file.objects {
                current.insert(object.key(), (object, (path.clone(), file.parsed_hash)));
            }
        }
        let mut changes = Vec::new();
        for key in self.origins.keys() {
            if !current.contains_key(key) {
                changes.push(Change::Deleted(key.clone()));
            }
        }
        for (key, (object, origin)) in &current {
            if self.origins.get(key) != Some(origin) {
                changes.push(Change::Applied((*object).clone()));
            }
        }
        self.origins = current.into_iter().map(|(key, (_, origin))| (key, origin)).collect();
        Ok(Scan { changes, revision: revision_of(&self.root, &seen), errors })
    }
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

fn revision_of(root: &Path, files: &BTreeMap<PathBuf, u64>) -> String {
    let mut text = String::new();
    for (path, hash) in files {
        let relative = path.strip_prefix(root).unwrap_or(path);
        text.push_str(&format!("{}={hash:016x};", relative.display()));
    }
    format!("{:016x}", stable_hash(&text))
}

/// The revision an agent following `root` reports once it has enforced the
/// folder's present content.
pub fn revision(root: &Path) -> std::io::Result<String> {
    Ok(DirSource::new(root).scan()?.revision)
}

/// How long a burst of file events is gathered before a scan: an editor's
/// write, rename and chmod arrive as one change.
const SETTLE: Duration = Duration::from_millis(3);
/// A scan now and then, in case inotify lost events (its queue overflowed).
const RESCAN: Duration = Duration::from_secs(10);

/// Scan once, report it with `Synced`, then follow the folder until `updates` closes.
pub async fn run(mut source: DirSource, updates: mpsc::Sender<Update>) -> anyhow::Result<()> {
    use notify::Watcher;
    let (wake, mut woken) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads are events too (our own scans among them): only changes wake us.
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = wake.send(Instant::now());
        }
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
        let observed = match tokio::time::timeout(RESCAN, woken.recv()).await {
            Ok(Some(at)) => at,
            Ok(None) => return Ok(()),
            Err(_) => Instant::now(),
        };
        tracing::debug!(after_ms = observed.elapsed().as_secs_f64() * 1e3, "folder changed");
        tokio::time::sleep(SETTLE).await;
        while woken.try_recv().is_ok() {}
        let scan = match source.scan() {
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
