//! Network faults for tests: a silent partition, where packets to and from a loopback port
//! are dropped (not refused), as a broken network path or a firewall change does.

use std::process::Command;

/// Packets to and from a loopback TCP port are dropped while this lives; dropping it heals.
#[derive(Debug)]
pub struct Partition {
    port: u16,
    healed: bool,
}

/// The iptables rules of a partition of `port`: both directions on loopback.
fn rules(port: u16) -> [Vec<String>; 2] {
    let rule = |dir: &str| {
        [
            "OUTPUT",
            "-o",
            "lo",
            "-p",
            "tcp",
            dir,
            &port.to_string(),
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
    };
    [rule("--dport"), rule("--sport")]
}

fn iptables(op: &str, rule: &[String]) -> bool {
    Command::new("iptables")
        .arg("-w")
        .arg(op)
        .args(rule)
        .status()
        .is_ok_and(|s| s.success())
}

impl Partition {
    /// Starts dropping packets of `port` (needs root and iptables: hack/install-deps.sh).
    pub fn drop_port(port: u16) -> Partition {
        for rule in rules(port) {
            assert!(
                iptables("-I", &rule),
                "iptables -I {rule:?} (root? iptables?)"
            );
        }
        Partition {
            port,
            healed: false,
        }
    }

    /// Lets packets through again.
    pub fn heal(&mut self) {
        if !self.healed {
            for rule in rules(self.port) {
                while iptables("-D", &rule) {}
            }
            self.healed = true;
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}
