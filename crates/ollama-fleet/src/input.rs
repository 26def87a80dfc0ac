//! Reading manifests named by `-f FILE|DIR|-`, the way kubectl does.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Where manifests come from, as `validate` and `apply` take them.
#[derive(Debug, clap::Args)]
pub struct ManifestArgs {
    /// A manifest file, a directory of them (*.yaml, *.yml, *.json), or - for standard input.
    /// May be given more than once.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true
    )]
    pub files: Vec<String>,
    /// Also read the directories below a directory given to -f.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// CPU sockets assumed for `replicas.perSocket` when checking port ranges (the agent checks
    /// again with the real count of its node).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2,
        env = "OLLAMA_FLEET_VALIDATE_SOCKETS"
    )]
    pub sockets: u32,
}

impl ManifestArgs {
    /// Reads every source named.
    pub fn read(&self) -> anyhow::Result<Vec<Source>> {
        anyhow::ensure!(self.sockets > 0, "--sockets must be at least 1");
        read_sources(&self.files, self.recursive)
    }

    /// The validation context.
    pub fn context(&self) -> fleet_api::Context {
        fleet_api::Context {
            sockets: self.sockets.max(1),
        }
    }
}

/// One manifest source: a file or standard input.
#[derive(Debug)]
pub struct Source {
    /// How errors name it: the path as given, or `<stdin>`.
    pub name: String,
    /// Its text.
    pub text: String,
}

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Reads every source named by `args`: files, directories (their `*.yaml`, `*.yml` and
/// `*.json` files in name order, recursing when asked) and `-` for standard input.
pub fn read_sources(args: &[String], recursive: bool) -> anyhow::Result<Vec<Source>> {
    let mut out = Vec::new();
    for arg in args {
        if arg == "-" {
            let text = read_bounded(std::io::stdin().lock(), "<stdin>")?;
            out.push(Source {
                name: "<stdin>".into(),
                text,
            });
            continue;
        }
        let path = Path::new(arg);
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read {arg}: check the path given to -f"))?;
        if meta.is_dir() {
            let mut files = Vec::new();
            collect(path, recursive, &mut files)?;
            if files.is_empty() {
                bail!("no manifests in {arg}: -f DIR reads its *.yaml, *.yml and *.json files");
            }
            for file in files {
                out.push(read_file(&file)?);
            }
        } else {
            out.push(read_file(path)?);
        }
    }
    Ok(out)
}

fn collect(dir: &Path, recursive: bool, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            if recursive {
                collect(&path, recursive, files)?;
            }
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e))
        {
            files.push(path);
        }
    }
    Ok(())
}

fn read_file(path: &Path) -> anyhow::Result<Source> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {name}"))?;
    let text = read_bounded(file, &name)?;
    Ok(Source { name, text })
}

/// Reads UTF-8 text of at most the size a manifest may have (`/dev/zero` or a huge file
/// fails at once instead of filling memory).
pub fn read_bounded(reader: impl Read, name: &str) -> anyhow::Result<String> {
    let limit = fleet_api::yaml::MAX_INPUT_BYTES;
    let mut bytes = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {name}"))?;
    if bytes.len() > limit {
        bail!(
            "{name} is larger than {limit} bytes, the most a manifest may have; split it into several files"
        );
    }
    String::from_utf8(bytes).with_context(|| format!("cannot read {name} as UTF-8 text"))
}
