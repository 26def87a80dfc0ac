//! Instance logs: one file per container, `<dir>/<id>.log`, written by containerd's shim (which
//! appends). Kept in bounds by [`tend`]: a log past its size limit is copied to `<id>.log.1`
//! (replacing the previous one) and truncated, so the shim goes on writing at its start; the
//! logs of containers gone for a while are deleted. [`read`] gives the rotated part and the
//! current one in order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The current log of container `id` in `dir`.
pub fn current(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.log"))
}

/// The rotated (previous) part of the log of container `id`.
pub fn rotated(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.log.1"))
}

/// What [`tend`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tended {
    /// Logs rotated.
    pub rotated: usize,
    /// Logs of departed containers deleted.
    pub deleted: usize,
}

/// Rotates logs larger than `max_bytes` and deletes the logs of containers not in `live` whose
/// last write is older than `keep_gone`.
pub fn tend(
    dir: &Path,
    max_bytes: u64,
    live: &HashSet<String>,
    keep_gone: Duration,
) -> std::io::Result<Tended> {
    let mut out = Tended::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let id = name
            .strip_suffix(".log.1")
            .or_else(|| name.strip_suffix(".log"))
            .map(str::to_string);
        let (Some(id), Ok(meta)) = (id, entry.metadata()) else {
            continue;
        };
        if !live.contains(&id) {
            let idle = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if idle > keep_gone && std::fs::remove_file(entry.path()).is_ok() {
                out.deleted += 1;
            }
            continue;
        }
        if name.ends_with(".log") && meta.len() > max_bytes {
            std::fs::copy(entry.path(), rotated(dir, &id))?;
            std::fs::OpenOptions::new()
                .write(true)
                .open(entry.path())?
                .set_len(0)?;
            out.rotated += 1;
        }
    }
    Ok(out)
}

/// The whole log of container `id`: the rotated part, then the current one; `None` when there
/// is neither.
pub fn read(dir: &Path, id: &str) -> Option<Vec<u8>> {
    let old = std::fs::read(rotated(dir, id)).ok();
    let new = std::fs::read(current(dir, id)).ok();
    if old.is_none() && new.is_none() {
        return None;
    }
    let mut all = old.unwrap_or_default();
    all.extend(new.unwrap_or_default());
    Some(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rotates_big_logs_and_forgets_old_ones() {
        let dir = std::env::temp_dir().join(format!("fleet-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        // An appending writer, as the shim is.
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(current(&dir, "a-0-1"))
            .expect("open");
        w.write_all(&[b'x'; 100]).expect("write");
        std::fs::write(current(&dir, "gone-0-1"), b"old").expect("write");
        let live: HashSet<String> = ["a-0-1".to_string()].into();
        let t = tend(&dir, 50, &live, Duration::from_secs(3600)).expect("tend");
        assert_eq!(
            t,
            Tended {
                rotated: 1,
                deleted: 0
            },
            "a recent log of a gone container stays"
        );
        w.write_all(b"after").expect("write");
        drop(w);
        assert_eq!(
            std::fs::read(current(&dir, "a-0-1")).expect("read"),
            b"after",
            "the writer goes on at the start"
        );
        let all = read(&dir, "a-0-1").expect("log");
        assert_eq!(all.len(), 105);
        assert!(all.ends_with(b"after"));
        let t = tend(&dir, 50, &live, Duration::ZERO).expect("tend");
        assert_eq!(t.deleted, 1);
        assert!(read(&dir, "gone-0-1").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
