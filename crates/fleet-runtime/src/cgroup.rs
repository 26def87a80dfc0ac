//! An instance's memory as `rotation.maxMemory` measures it: anonymous memory plus swap of its
//! cgroup, found through `/proc/<pid>/cgroup` (cgroup v1 `memory` controller or the v2
//! unified hierarchy); OOM kills counted by the kernel (for an OOM event the agent missed); whether
//! the host can bound swap.

use std::path::{Path, PathBuf};

/// Where the host mounts its cgroups.
pub const ROOT: &str = "/sys/fs/cgroup";

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
    let dir = memory_dir(&text, Path::new(ROOT))
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

/// The `oom_kill` count of a v2 `memory.events` or a v1 `memory.oom_control` text (kernels
/// before 4.13 have no count in v1: 0).
pub fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == "oom_kill").then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// How many times the kernel's OOM killer ran in the cgroup `dir` (e.g.
/// `/ollama-fleet/ns/id`) under `root`: the unified hierarchy's `memory.events`, else the v1
/// memory controller's `memory.oom_control`.
pub async fn oom_kills(root: &Path, dir: &str) -> std::io::Result<u64> {
    let rel = dir.trim_start_matches('/');
    let v2 = root.join(rel).join("memory.events");
    let text = match tokio::fs::read_to_string(&v2).await {
        Ok(t) => t,
        Err(_) => {
            let v1 = root.join("memory").join(rel).join("memory.oom_control");
            tokio::fs::read_to_string(v1).await?
        }
    };
    Ok(oom_kill_count(&text))
}

/// How the host's cgroups can bound an instance's swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapControl {
    /// cgroup v2 with swap accounting (`memory.swap.max`).
    V2,
    /// cgroup v1 with swap accounting (`memory.memsw.limit_in_bytes`).
    V1,
    /// No swap accounting (a v1 kernel booted without `swapaccount=1`, or built without it):
    /// instances cannot be kept from swapping by their cgroup.
    None,
}

/// How the cgroups mounted at `root` bound swap. On v2 the file exists only in child cgroups,
/// so any child that has it answers.
pub fn swap_control(root: &Path) -> SwapControl {
    if root.join("cgroup.controllers").exists() {
        let any_child = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("memory.swap.max").exists());
        return if any_child {
            SwapControl::V2
        } else {
            SwapControl::None
        };
    }
    if root.join("memory/memory.memsw.limit_in_bytes").exists() {
        SwapControl::V1
    } else {
        SwapControl::None
    }
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
    fn counts_oom_kills_in_either_hierarchy() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kill_count(v2), 1);
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(oom_kill_count(v1), 3);
        assert_eq!(oom_kill_count("oom_kill_disable 0\nunder_oom 0\n"), 0);
    }

    #[tokio::test]
    async fn reads_oom_kills_and_swap_control_from_a_cgroup_tree() {
        let root = std::env::temp_dir().join(format!("cgroup-test-{}", std::process::id()));
        let v2 = root.join("v2");
        std::fs::create_dir_all(v2.join("ollama-fleet/ns/a")).expect("mkdir");
        std::fs::write(v2.join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        std::fs::write(
            v2.join("ollama-fleet/ns/a/memory.events"),
            "oom 2\noom_kill 2\n",
        )
        .expect("write");
        assert_eq!(oom_kills(&v2, "/ollama-fleet/ns/a").await.expect("read"), 2);
        assert!(oom_kills(&v2, "/ollama-fleet/ns/gone").await.is_err());
        assert_eq!(swap_control(&v2), SwapControl::None);
        std::fs::write(v2.join("ollama-fleet/memory.swap.max"), "max\n").expect("write");
        assert_eq!(swap_control(&v2), SwapControl::V2);

        let v1 = root.join("v1");
        std::fs::create_dir_all(v1.join("memory/ollama-fleet/ns/a")).expect("mkdir");
        std::fs::write(
            v1.join("memory/ollama-fleet/ns/a/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        )
        .expect("write");
        assert_eq!(oom_kills(&v1, "/ollama-fleet/ns/a").await.expect("read"), 0);
        assert_eq!(swap_control(&v1), SwapControl::None);
        std::fs::write(
            v1.join("memory/memory.memsw.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .expect("write");
        assert_eq!(swap_control(&v1), SwapControl::V1);
        std::fs::remove_dir_all(&root).expect("cleanup");
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
