//! `--source dir:<path>`: the same objects as the API server would give,
//! read from the `*.yaml`/`*.yml` files of a folder (recursively) and
//! followed with inotify. Each scan turns what changed on disk into
//! `Applied`/`Deleted` changes — the shape of watch events — so a file edit
//! takes the path a watch event takes. A file that stops parsing keeps the
//! objects it last gave: bad input never changes what is enforced.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use bulkhead_policy::{identity::stable_hash, manifest, snapshot::CommonParts, Change, Object, ObjectKey};

use super::Update;

/// A file followed, by its place in `DirSource::paths`.
type FileId = usize;

/// What identifies a file's version without reading it: length, mtime, inode.
type Stamp = (u64, i128, u64);

struct FileState {
    stamp: Stamp,
    content_hash: u64,
    /// The keys of the objects of the last version that parsed (the objects
    /// themselves are handed on, not kept), and that version's hash.
    keys: Vec<ObjectKey>,
    parsed_hash: u64,
}

/// Who holds one object, and which version of it was handed out.
#[derive(Default)]
struct Holders {
    /// The files holding it; the last by path wins, as a later `kubectl
    /// apply` would.
    files: Vec<FileId>,
    /// The file and the object's hash as last handed out.
    given: Option<(FileId, u64)>,
}

/// The objects of a folder. It keeps keys and hashes, not objects: the
/// agent's snapshot is the one copy of the cluster.
pub struct DirSource {
    root: PathBuf,
    paths: Vec<PathBuf>,
    ids: BTreeMap<PathBuf, FileId>,
    files: BTreeMap<FileId, FileState>,
    objects: HashMap<ObjectKey, Holders>,
    /// Shared as parsed, so even a first listing holds them once.
    common: CommonParts,
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
        Self {
            root: root.into(),
            paths: Vec::new(),
            ids: BTreeMap::new(),
            files: BTreeMap::new(),
            objects: HashMap::new(),
            common: CommonParts::default(),
            digest: 0,
        }
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
        let mut paths: BTreeSet<PathBuf> =
            self.files.keys().map(|id| &self.paths[*id]).filter(|p| !listed.contains(*p)).cloned().collect();
        paths.extend(listed);
        self.look_at(&paths, true)
    }

    /// Look at these paths only (what inotify named): read them again, drop
    /// the ones that are gone.
    pub fn scan_paths(&mut self, paths: &BTreeSet<PathBuf>) -> std::io::Result<Scan> {
        self.look_at(paths, false)
    }

    fn id_of(&mut self, path: &Path) -> FileId {
        if let Some(id) = self.ids.get(path) {
            return *id;
        }
        self.paths.push(path.to_path_buf());
        self.ids.insert(path.to_path_buf(), self.paths.len() - 1);
        self.paths.len() - 1
    }

    /// `trust_stamps`: skip a file whose length, mtime and inode are as
    /// last read (mtimes are coarse: a file inotify names is read anyway).
    fn look_at(&mut self, paths: &BTreeSet<PathBuf>, trust_stamps: bool) -> std::io::Result<Scan> {
        let mut errors = Vec::new();
        // Files whose objects changed, with the keys each held before; and their objects now.
        let mut touched: Vec<(FileId, Vec<ObjectKey>)> = Vec::new();
        let mut parsed: HashMap<FileId, HashMap<ObjectKey, Object>> = HashMap::new();
        let mut to_read = Vec::new();
        for path in paths.iter().filter(|p| is_manifest(p)) {
            let stamp = match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => {
                    use std::os::unix::fs::MetadataExt;
                    (meta.len(), meta.modified().map(nanos).unwrap_or(0), meta.ino())
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let Some(id) = self.ids.get(path).copied() else { continue };
                    if let Some(gone) = self.files.remove(&id) {
                        self.digest = self.digest.wrapping_sub(file_digest(&self.root, path, gone.content_hash));
                        touched.push((id, gone.keys));
                        parsed.insert(id, HashMap::new());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let id = self.id_of(path);
            if trust_stamps && self.files.get(&id).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let parsed_hash = self.files.get(&id).map(|f| f.parsed_hash);
            to_read.push((id, stamp, parsed_hash));
        }
        let reads = read_files(&self.paths, &to_read);
        for ((id, stamp, _), read) in to_read.into_iter().zip(reads) {
            let path = &self.paths[id];
            let (content_hash, parse) = match read {
                Ok(Some(read)) => read,
                // Removed between the look and the read: the next event says so.
                Ok(None) => continue,
                Err(e) => return Err(e),
            };
            let before = self.files.remove(&id);
            if let Some(before) = &before {
                self.digest = self.digest.wrapping_sub(file_digest(&self.root, path, before.content_hash));
            }
            self.digest = self.digest.wrapping_add(file_digest(&self.root, path, content_hash));
            let (old_keys, old_parsed) = before.map(|f| (f.keys, f.parsed_hash)).unwrap_or_default();
            match parse {
                // The same bytes as last parsed (a touch, a rewrite): nothing to hand on.
                None => {
                    self.files.insert(id, FileState { stamp, content_hash, keys: old_keys, parsed_hash: old_parsed });
                }
                Some(Ok(mut objects)) => {
                    for object in &mut objects {
                        if let Object::Pod(pod) = object {
                            self.common.share(pod);
                        }
                    }
                    let keys = objects.iter().map(Object::key).collect();
                    self.files.insert(id, FileState { stamp, content_hash, keys, parsed_hash: content_hash });
                    touched.push((id, old_keys));
                    parsed.insert(id, by_key(objects));
                }
                Some(Err(error)) => {
                    errors.push(error.to_string());
                    self.files.insert(id, FileState { stamp, content_hash, keys: old_keys, parsed_hash: old_parsed });
                }
            }
        }
        let mut keys = BTreeSet::new();
        for (id, old_keys) in &touched {
            for key in old_keys {
                if let Some(holders) = self.objects.get_mut(key) {
                    holders.files.retain(|f| f != id);
                }
                keys.insert(key.clone());
            }
            for key in &self.files.get(id).map(|f| f.keys.clone()).unwrap_or_default() {
                let holders = self.objects.entry(key.clone()).or_default();
                if !holders.files.contains(id) {
                    // Almost always the one file: one per object of the folder.
                    holders.files.reserve_exact(1);
                    holders.files.push(*id);
                }
                keys.insert(key.clone());
            }
        }
        let mut changes = Vec::new();
        for key in keys {
            let paths = &self.paths;
            let holders = self.objects.get(&key);
            let winner = holders.and_then(|h| h.files.iter().copied().max_by(|a, b| paths[*a].cmp(&paths[*b])));
            let Some(winner) = winner else {
                if self.objects.remove(&key).is_some_and(|h| h.given.is_some()) {
                    changes.push(Change::Deleted(key));
                }
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(slot) = parsed.entry(winner) {
                // An object another file also holds, whose winning file was
                // not read this time: read it again.
                let path = &self.paths[winner];
                match std::fs::read_to_string(path).map(|text| manifest::parse(&path.display().to_string(), &text)) {
                    Ok(Ok(objects)) => {
                        slot.insert(by_key(objects));
                    }
                    Ok(Err(error)) => errors.push(error.to_string()),
                    Err(error) => errors.push(format!("{}: {error}", path.display())),
                }
            }
            let Some(object) = parsed.get_mut(&winner).and_then(|objects| objects.remove(&key)) else {
                continue;
            };
            let given = Some((winner, object_hash(&object)));
            let holders = self.objects.get_mut(&key).expect("a winner holds it");
            if holders.given != given {
                holders.given = given;
                changes.push(Change::Applied(object));
            }
        }
        Ok(Scan { changes, revision: self.revision(), errors })
    }
}

/// A file's objects by key; of two with one key, the later wins.
fn by_key(objects: Vec<Object>) -> HashMap<ObjectKey, Object> {
    objects.into_iter().map(|object| (object.key(), object)).collect()
}

/// What reading one file gave: the hash of its bytes and, unless they are
/// the bytes last parsed, their objects. `None`: the file is gone.
type Read = Option<(u64, Option<Result<Vec<Object>, manifest::ManifestError>>)>;

/// A file to read: its id, its stamp, and the hash of the bytes last parsed.
type ToRead = (FileId, Stamp, Option<u64>);

/// Read and parse files, on every core when there are many (a first scan
/// of a large cluster): parsing YAML is most of a folder's start.
fn read_files(paths: &[PathBuf], files: &[ToRead]) -> Vec<std::io::Result<Read>> {
    let read = |(id, _, parsed_hash): &ToRead| -> std::io::Result<Read> {
        let path = &paths[*id];
        let text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let content_hash = stable_hash(&text);
        let parse = (*parsed_hash != Some(content_hash)).then(|| manifest::parse(&path.display().to_string(), &text));
        Ok(Some((content_hash, parse)))
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(files.len() / 16).max(1);
    if workers == 1 {
        return files.iter().map(read).collect();
    }
    let mut results: Vec<(usize, std::io::Result<Read>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                scope.spawn(move || {
                    files
                        .iter()
                        .enumerate()
                        .skip(worker)
                        .step_by(workers)
                        .map(|(i, f)| (i, read(f)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a reader thread does not panic")).collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// A hash of an object's content, so an edit of one document of a file
/// hands on that object only.
fn object_hash(object: &Object) -> u64 {
    struct Fnv(u64);
    impl std::fmt::Write for Fnv {
        fn write_str(&mut self, text: &str) -> std::fmt::Result {
            for byte in text.bytes() {
                self.0 ^= byte as u64;
                self.0 = self.0.wrapping_mul(0x100000001b3);
            }
            Ok(())
        }
    }
    let mut hash = Fnv(0xcbf29ce484222325);
    let _ = std::fmt::Write::write_fmt(&mut hash, format_args!("{object:?}"));
    hash.0
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
        tracing::debug!(
            since_change_ms = observed.elapsed().as_secs_f64() * 1e3,
            changes = scan.changes.len(),
            "folder scanned"
        );
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

    #[test]
    fn an_edit_hands_on_the_objects_it_changed_and_a_shadowed_copy_returns() {
        let dir = temp_dir("shadow");
        let second = POLICY.replace("name: p,", "name: q,");
        std::fs::write(dir.join("a.yaml"), format!("{POLICY}---\n{second}")).unwrap();
        let mut source = DirSource::new(&dir);
        assert_eq!(source.scan().unwrap().changes.len(), 2);

        // One document of two edited: one object handed on.
        std::fs::write(dir.join("a.yaml"), format!("{POLICY}---\n{}", second.replace("ingress: []", "ingress: [{}]")))
            .unwrap();
        let edited = kinds(&source.scan().unwrap().changes);
        assert_eq!(edited.len(), 1, "{edited:?}");
        assert!(edited[0].contains("name: \"q\""), "{edited:?}");

        // b.yaml (later by path) shadows p; when it drops p, a.yaml's p is back.
        std::fs::write(dir.join("b.yaml"), POLICY.replace("ingress: []", "ingress: [{}, {}]")).unwrap();
        let shadowed = source.scan().unwrap().changes;
        assert_eq!(kinds(&shadowed).len(), 1);
        std::fs::write(dir.join("b.yaml"), "# nothing here\n").unwrap();
        let back = source.scan().unwrap().changes;
        match &back[..] {
            [Change::Applied(Object::Policy(policy))] => {
                assert!(format!("{policy:?}").contains("ingress: Some([])"), "a.yaml's version: {policy:?}")
            }
            other => panic!("expected a.yaml's p again, got {:?}", kinds(other)),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
