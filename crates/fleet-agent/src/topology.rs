//! The node's CPU topology: sockets and their cpus and NUMA nodes, read from sysfs.

use std::collections::BTreeMap;
use std::path::Path;

/// One CPU socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Socket {
    /// Logical cpus of the socket.
    pub cpus: Vec<u32>,
    /// NUMA nodes whose cpus are on the socket.
    pub mems: Vec<u32>,
}

/// The node's sockets, in order of their physical package ID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Sockets.
    pub sockets: Vec<Socket>,
}

impl Topology {
    /// Reads `/sys/devices/system/cpu/cpu*/topology/physical_package_id` and
    /// `/sys/devices/system/node/node*/cpulist` under `root` (normally `/`).
    pub fn read(root: &Path) -> Topology {
        let mut by_package: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let cpu_dir = root.join("sys/devices/system/cpu");
        for entry in std::fs::read_dir(&cpu_dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("cpu").and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let package =
                std::fs::read_to_string(entry.path().join("topology/physical_package_id"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .unwrap_or(0);
            by_package.entry(package).or_default().push(n);
        }
        let mut numa: Vec<(u32, Vec<u32>)> = Vec::new();
        let node_dir = root.join("sys/devices/system/node");
        for entry in std::fs::read_dir(&node_dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let list = std::fs::read_to_string(entry.path().join("cpulist")).unwrap_or_default();
            numa.push((n, parse_cpulist(&list)));
        }
        numa.sort();
        let mut sockets: Vec<Socket> = by_package
            .into_values()
            .map(|mut cpus| {
                cpus.sort_unstable();
                let mems = numa
                    .iter()
                    .filter(|(_, ncpus)| ncpus.iter().any(|c| cpus.contains(c)))
                    .map(|(n, _)| *n)
                    .collect();
                Socket { cpus, mems }
            })
            .collect();
        if sockets.is_empty() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            sockets.push(Socket {
                cpus: (0..n).collect(),
                mems: vec![0],
            });
        }
        Topology { sockets }
    }

    /// All logical cpus.
    pub fn cpus(&self) -> u32 {
        self.sockets.iter().map(|s| s.cpus.len() as u32).sum()
    }
}

/// Parses `0-3,8,10-11` into cpu numbers.
pub fn parse_cpulist(text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.trim().parse::<u32>().ok()),
        }
    }
    out
}

/// Formats cpu numbers as a cpulist (`0-3,8`).
pub fn format_cpulist(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// This process's hard `RLIMIT_NOFILE`, from /proc/self/limits.
pub fn hard_nofile() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // "Max open files  <soft>  <hard>  files"
    line.split_whitespace().nth(4)?.parse().ok()
}

/// Total memory from /proc/meminfo, in bytes.
pub fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpulist(&[]), "");
    }

    #[test]
    fn reads_a_two_socket_sysfs() {
        let root = std::env::temp_dir().join(format!("topo-{}", std::process::id()));
        for cpu in 0..4u32 {
            let dir = root.join(format!("sys/devices/system/cpu/cpu{cpu}/topology"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("physical_package_id"), format!("{}\n", cpu / 2))
                .expect("write");
        }
        for (node, list) in [(0, "0-1"), (1, "2-3")] {
            let dir = root.join(format!("sys/devices/system/node/node{node}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("cpulist"), list).expect("write");
        }
        let t = Topology::read(&root);
        assert_eq!(t.sockets.len(), 2);
        assert_eq!(
            t.sockets[1],
            Socket {
                cpus: vec![2, 3],
                mems: vec![1]
            }
        );
        assert_eq!(t.cpus(), 4);
        let _ = std::fs::remove_dir_all(root);
    }
}
