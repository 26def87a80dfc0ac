//! An instance's memory as `rotation.maxMemory` measures it: anonymous memory plus swap of its
//! cgroup, found through `/proc/<pid>/cgroup` (cgroup v1 `memory` controller or the v2
//! unified hierarchy).

use std::path::{Path, PathBuf};

/// The memory cgroup directory of a process, from the text of `/proc/<pid>/cgroup`.
pub fn memory_dir(proc_cgroup: &str, root: &Path) -> Option<PathBuf> {
    let mut unified = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return Some(root.join("memory").join(rel));
        }
        if controllers.is_empty() {
            unified = Some(root.join(rel));
        }
    }
    unified
}

/// Anonymous plus swap bytes from a `memory.stat` text: v1 `total_rss` + `total_swap` (the
/// hierarchy's totals; `rss` + `swap` without them), v2 `anon` (swap comes from
/// `memory.swap.current`, added by the caller).
pub fn anon_and_swap(stat: &str) -> u64 {
    let get = |key: &str| {
        stat.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u64>().ok()).flatten()
        })
    };
    if let Some(anon) = get("anon") {
        return anon;
    }
    get("total_rss").or_else(|| get("rss")).unwrap_or(0)
        + get("total_swap").or_else(|| get("swap")).unwrap_or(0)
}

/// The anonymous plus swap memory of the cgroup of process `pid`.
pub async fn memory_of_pid(pid: u32) -> std::io::Result<u64> {
    let text = tokio::fs::read_to_string(format!("/proc/{pid}/cgroup")).await?;
    let dir = memory_dir(&text, Path::new("/sys/fs/cgroup"))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no memory cgroup"))?;
    let stat = tokio::fs::read_to_string(dir.join("memory.stat")).await?;
    let swap_v2 = tokio::fs::read_to_string(dir.join("memory.swap.current"))
        .await
        .ok()
        .filter(|_| stat.lines().any(|l| l.starts_with("anon ")))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok(anon_and_swap(&stat) + swap_v2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_memory_cgroup() {
        let v1 = "12:pids:/ollama-fleet/ns/x\n4:memory:/ollama-fleet/ns/x\n0::/user.slice\n";
        assert_eq!(
            memory_dir(v1, Path::new("/sys/fs/cgroup")),
            Some(PathBuf::from("/sys/fs/cgroup/memory/ollama-fleet/ns/x"))
        );
        let v2 = "0::/ollama-fleet/ns/x\n";
        assert_eq!(
            memory_dir(v2, Path::new("/sys/fs/cgroup")),
            Some(PathBuf::from("/sys/fs/cgroup/ollama-fleet/ns/x"))
        );
    }

    #[test]
    fn sums_anonymous_and_swap() {
        assert_eq!(
            anon_and_swap("cache 10\nrss 100\nswap 5\ntotal_rss 200\ntotal_swap 7\n"),
            207
        );
        assert_eq!(anon_and_swap("cache 10\nrss 100\n"), 100);
        assert_eq!(anon_and_swap("anon 4096\nfile 10\n"), 4096);
    }
}
