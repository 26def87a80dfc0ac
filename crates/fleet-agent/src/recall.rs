//! The fleets this node last saw, kept in a file (`STATE_DIR/fleets.json`), so that an agent
//! that starts while etcd does not answer can still probe the instances it adopts and serve
//! them through its gateway.
//!
//! What is recalled is used for that only: the planner acts on fleets read from the store, never
//! on recalled ones (a recalled fleet may be stale; the store may have deleted or changed it), so
//! until the store answers nothing is created, stopped or rolled out. The file is a cache: the
//! agent keeps no state it cannot rebuild, and a lost or unreadable file only means that a start
//! without etcd serves nothing until etcd answers, as before. Its contents are treated like the
//! store's (parsed and validated as any fleet document).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use fleet_store::FleetDoc;
use serde::{Deserialize, Serialize};

/// The largest recall file read (fleet documents are small; thousands fit).
const LIMIT: u64 = 64 << 20;

/// One fleet document as kept.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    name: String,
    value: String,
    revision: i64,
    created: i64,
}

/// The recall file.
#[derive(Debug)]
pub struct Recall {
    path: PathBuf,
    /// What was last written (or read): each fleet's name and revision.
    kept: Option<Vec<(String, i64)>>,
    /// Writes made, and the last one on disk (writes run in the background; an older one
    /// never lands after a newer one).
    made: u64,
    written: std::sync::Arc<std::sync::Mutex<u64>>,
}

impl Recall {
    /// The recall file at `path`.
    pub fn new(path: PathBuf) -> Recall {
        Recall {
            path,
            kept: None,
            made: 0,
            written: std::sync::Arc::default(),
        }
    }

    /// The fleets kept, if the file can be read (read once at start, off the async threads).
    pub async fn load(&mut self) -> Vec<FleetDoc> {
        let path = self.path.clone();
        let docs = tokio::task::spawn_blocking(move || read(&path))
            .await
            .unwrap_or_default();
        self.kept = Some(docs.iter().map(|d| (d.name.clone(), d.revision)).collect());
        docs
    }

    /// Keeps `docs` (the store's fleets) when they differ from what is kept: written in the
    /// background, to a temporary file renamed over the old one (never half written).
    pub fn keep(&mut self, docs: &BTreeMap<String, FleetDoc>) {
        let same = self.kept.as_ref().is_some_and(|kept| {
            kept.iter()
                .map(|(n, r)| (n.as_str(), *r))
                .eq(docs.values().map(|d| (d.name.as_str(), d.revision)))
        });
        if same {
            return;
        }
        self.kept = Some(
            docs.values()
                .map(|d| (d.name.clone(), d.revision))
                .collect(),
        );
        let kept: Vec<Kept> = docs
            .values()
            .map(|d| Kept {
                name: d.name.clone(),
                value: d.value.clone(),
                revision: d.revision,
                created: d.created,
            })
            .collect();
        let path = self.path.clone();
        self.made += 1;
        let (this, written) = (self.made, self.written.clone());
        tokio::task::spawn_blocking(move || {
            let mut last = written.lock().unwrap_or_else(|p| p.into_inner());
            if *last > this {
                return;
            }
            *last = this;
            if let Err(e) = write(&path, &kept) {
                tracing::warn!(file = %path.display(), error = %e, "cannot keep the fleets this node saw (an agent started while etcd is away would serve nothing until it answers)");
            }
        });
    }
}

/// The fleets kept at `path` (none when it is missing or unreadable: said once, at start).
fn read(path: &std::path::Path) -> Vec<FleetDoc> {
    let read = std::fs::File::open(path).and_then(|f| {
        let mut text = String::new();
        f.take(LIMIT).read_to_string(&mut text)?;
        Ok(text)
    });
    let text = match read {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the fleets this node last saw");
            return Vec::new();
        }
    };
    let kept: Vec<Kept> = match serde_json::from_str(&text) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "the fleets this node last saw cannot be parsed; ignored");
            return Vec::new();
        }
    };
    kept.into_iter()
        .filter(|k| fleet_store::check_segment("fleet", &k.name).is_ok())
        .map(|k| FleetDoc {
            name: k.name,
            value: k.value,
            revision: k.revision,
            created: k.created,
        })
        .collect()
}

fn write(path: &std::path::Path, kept: &[Kept]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    // Readable by root only: a fleet's env may carry what its instances need to keep private.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec(kept)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, revision: i64) -> FleetDoc {
        FleetDoc {
            name: name.into(),
            value: format!("metadata: {{name: {name}}}"),
            revision,
            created: 1,
        }
    }

    #[tokio::test]
    async fn kept_fleets_are_recalled_and_a_bad_file_recalls_nothing() {
        let dir = std::env::temp_dir().join(format!("recall-{}", std::process::id()));
        let path = dir.join("state/fleets.json");
        let mut recall = Recall::new(path.clone());
        assert!(recall.load().await.is_empty(), "no file yet");
        let docs: BTreeMap<String, FleetDoc> = [doc("a", 5), doc("b", 7)]
            .into_iter()
            .map(|d| (d.name.clone(), d))
            .collect();
        recall.keep(&docs);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !path.exists() {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let back = Recall::new(path.clone()).load().await;
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("meta").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "readable by root only");
        assert_eq!(
            back.iter()
                .map(|d| (d.name.as_str(), d.revision, d.value.as_str()))
                .collect::<Vec<_>>(),
            vec![
                ("a", 5, "metadata: {name: a}"),
                ("b", 7, "metadata: {name: b}")
            ]
        );
        // A name that is no key segment is not recalled; garbage recalls nothing.
        std::fs::write(
            &path,
            r#"[{"name":"../x","value":"","revision":1,"created":1}]"#,
        )
        .expect("write");
        assert!(Recall::new(path.clone()).load().await.is_empty());
        std::fs::write(&path, "{not json").expect("write");
        assert!(Recall::new(path).load().await.is_empty());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
