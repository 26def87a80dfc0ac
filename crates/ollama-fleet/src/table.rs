//! Plain-text tables (kubectl style) and ages.

use std::time::{Duration, SystemTime};

/// Columns padded to their widest cell, three spaces apart. An empty cell shows as `-`, so
/// every line splits into the same number of fields; control characters (from containers,
/// registries, hostile manifests) are escaped, so a cell cannot move the cursor or forge lines.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|c| {
                    if c.is_empty() {
                        "-".into()
                    } else {
                        fleet_api::printable(c).into_owned()
                    }
                })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                s.push_str(&cell);
            } else {
                s.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// An age the way kubectl prints it: 45s, 12m, 3h, 5d.
pub fn age(since: Option<SystemTime>, now: SystemTime) -> String {
    let Some(since) = since else {
        return "-".into();
    };
    let d = now
        .duration_since(since)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match d {
        0..=119 => format!("{d}s"),
        120..=7199 => format!("{}m", d / 60),
        7200..=172_799 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

/// Parses an RFC 3339 time.
pub fn time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_containers_are_escaped() {
        let t = render(
            &["ID", "MESSAGE"],
            &[vec!["a-0-abcdef".into(), "ok\u{1b}[2J\nFAKE LINE".into()]],
        );
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(!t.contains('\u{1b}') && t.contains("\\u{1b}[2J"), "{t}");
    }

    #[test]
    fn tables_and_ages() {
        let t = render(
            &["NAME", "READY"],
            &[vec!["devassist".into(), "1/2".into()]],
        );
        assert_eq!(t, "NAME        READY\ndevassist   1/2\n");
        let t = render(
            &["ID", "PHASE", "MESSAGE"],
            &[vec![String::new(), "Pending".into(), String::new()]],
        );
        assert_eq!(
            t, "ID   PHASE     MESSAGE\n-    Pending   -\n",
            "empty cells show"
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(age(Some(now - Duration::from_secs(30)), now), "30s");
        assert_eq!(age(Some(now - Duration::from_secs(600)), now), "10m");
        assert_eq!(age(Some(now - Duration::from_secs(3 * 86400)), now), "3d");
        assert_eq!(age(None, now), "-");
    }
}
