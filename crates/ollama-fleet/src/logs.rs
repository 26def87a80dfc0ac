//! `ollama-fleet logs INSTANCE [-f]`: an instance's log, read on the node that runs it from the
//! agent's state directory (STATE_DIR/logs/ID.log, and ID.log.1 once rotated).

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::ExitCode;
use std::time::Duration;

use fleet_runtime::logs;

/// Arguments of `logs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The instance's ID, as `ollama-fleet get instances` shows it.
    pub instance: String,
    /// Keep printing what the instance writes, until interrupted.
    #[arg(short, long)]
    pub follow: bool,
    /// Print only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    #[command(flatten)]
    pub state_dir: crate::global::StateDir,
}

/// The last `n` lines of `text`.
fn last_lines(text: &[u8], n: usize) -> &[u8] {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let start = body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1);
    if n == 0 { &[] } else { &text[start..] }
}

/// Runs `logs`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if !fleet_api::is_dns_label(&args.instance, 64) {
        eprintln!(
            "error: {:?} is not an instance ID; IDs look like devassist-3-7f2a91 (`ollama-fleet get instances` lists them)",
            fleet_api::clip(&args.instance, 80)
        );
        return Ok(ExitCode::FAILURE);
    }
    let dir = args.state_dir.logs();
    let Some(all) = logs::read(&dir, &args.instance) else {
        eprintln!(
            "error: no log of instance {:?} in {}: logs stay on the node that runs the instance \
             (`ollama-fleet get instances -o wide` shows it), and --state-dir must be the agent's",
            args.instance,
            dir.display()
        );
        return Ok(ExitCode::FAILURE);
    };
    let shown = match args.tail {
        Some(n) => last_lines(&all, n),
        None => &all[..],
    };
    let mut out = std::io::stdout().lock();
    out.write_all(shown)?;
    out.flush()?;
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    // Follow the current file from its end; start over when it shrinks (it was rotated).
    let path = logs::current(&dir, &args.instance);
    let mut pos = std::fs::metadata(&path).map_or(0, |m| m.len());
    let mut buf = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len < pos {
            pos = 0;
        }
        if len == pos {
            continue;
        }
        f.seek(SeekFrom::Start(pos))?;
        buf.clear();
        f.take(len - pos).read_to_end(&mut buf)?;
        pos += buf.len() as u64;
        out.write_all(&buf)?;
        out.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_takes_the_last_lines() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
        assert_eq!(last_lines(b"", 3), b"");
    }
}
