//! The model store, in Ollama's on-disk layout under `OLLAMA_MODELS`:
//! `manifests/<host>/<namespace>/<model>/<tag>` (JSON) and `blobs/sha256-<hex>`.
//!
//! Blobs are small (a model's "weights" are a few KiB); the memory a model holds when loaded is
//! recorded in its config blob. Like Ollama, a pull writes the blobs first and the manifest last,
//! and a start without `OLLAMA_NOPRUNE` deletes blobs that no manifest references, so the
//! hazards of a shared cache are real here too.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fleet_api::ModelRef;
use serde_json::{Value, json};

/// A model found in the store.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The name as Ollama shows it (`smollm2:135m`).
    pub name: String,
    /// The full reference.
    pub reference: ModelRef,
    /// Digest of the manifest.
    pub digest: String,
    /// Sum of the layer sizes on disk.
    pub size: u64,
    /// Memory the model holds when loaded.
    pub memory: u64,
    /// When the manifest was written.
    pub modified: SystemTime,
    /// Parameters from the params layer (`num_thread`, ...).
    pub parameters: BTreeMap<String, Value>,
    /// Digest of the model (weights) layer.
    pub model_blob: String,
    /// The system prompt layer, if any.
    pub system: Option<String>,
    /// The template layer, if any.
    pub template: Option<String>,
}

impl ModelInfo {
    /// Whether the model only embeds (no completion): Ollama reads it from the weights; the sim
    /// goes by the names of the embedding models in Ollama's library (`nomic-embed-text`,
    /// `mxbai-embed-large`, `all-minilm`, `bge-m3`, ...).
    pub fn embedding_only(&self) -> bool {
        let m = self.reference.model.to_ascii_lowercase();
        m.contains("embed") || m.contains("minilm") || m.starts_with("bge")
    }

    /// What the model can do, as `/api/show` lists it.
    pub fn capabilities(&self) -> Vec<&'static str> {
        if self.embedding_only() {
            vec!["embedding"]
        } else {
            vec!["completion"]
        }
    }
}

/// The store rooted at a models directory.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

const MEDIA_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MEDIA_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const MEDIA_MODEL: &str = "application/vnd.ollama.image.model";
const MEDIA_PARAMS: &str = "application/vnd.ollama.image.params";
const MEDIA_SYSTEM: &str = "application/vnd.ollama.image.system";
const MEDIA_TEMPLATE: &str = "application/vnd.ollama.image.template";

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", fleet_api::sha256_hex(bytes))
}

impl Store {
    /// A store at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    /// Where `r`'s manifest is: the path of a name that matches it case-insensitively when
    /// there is one (Ollama compares names that way), else the exact one.
    fn manifest_path(&self, r: &ModelRef) -> PathBuf {
        let exact = self
            .dir
            .join("manifests")
            .join(&r.host)
            .join(&r.namespace)
            .join(&r.model)
            .join(&r.tag);
        if exact.exists() {
            return exact;
        }
        let mut at = self.dir.join("manifests");
        for part in [&r.host, &r.namespace, &r.model, &r.tag] {
            let found = std::fs::read_dir(&at).ok().and_then(|entries| {
                entries
                    .filter_map(Result::ok)
                    .find(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(part))
            });
            match found {
                Some(e) => at = e.path(),
                None => return exact,
            }
        }
        at
    }

    /// The path of a blob, `blobs/sha256-<hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs").join(digest.replace(':', "-"))
    }

    /// Writes `bytes` as `<blob>-partial`, returning its digest and the partial path; call
    /// [`Store::commit_blob`] to make it visible.
    pub fn stage_blob(&self, bytes: &[u8]) -> std::io::Result<(String, PathBuf)> {
        let digest = digest_of(bytes);
        let final_path = self.blob_path(&digest);
        std::fs::create_dir_all(final_path.parent().unwrap_or(&self.dir))?;
        let partial = PathBuf::from(format!("{}-partial", final_path.display()));
        let mut f = std::fs::File::create(&partial)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok((digest, partial))
    }

    /// Renames a staged blob to its final name.
    pub fn commit_blob(&self, digest: &str, partial: &Path) -> std::io::Result<()> {
        std::fs::rename(partial, self.blob_path(digest))
    }

    fn write_blob(&self, bytes: &[u8]) -> std::io::Result<String> {
        let (digest, partial) = self.stage_blob(bytes)?;
        self.commit_blob(&digest, &partial)?;
        Ok(digest)
    }

    /// The deterministic blobs of a pulled model: (model layer, config), so every node that
    /// pulls the same name gets the same digests.
    pub fn pulled_blobs(r: &ModelRef, memory: u64) -> (Vec<u8>, Vec<u8>) {
        let line = format!("ollama-sim weights for {r}\n");
        let weights = line.repeat(4096 / line.len() + 1).into_bytes();
        let config = json!({
            "model_format": "gguf",
            "model_family": "llama",
            "model_families": ["llama"],
            "model_type": "135M",
            "file_type": "Q4_0",
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest_of(&weights)]},
            "sim_memory_bytes": memory,
        });
        (weights, config.to_string().into_bytes())
    }

    /// Writes the manifest of `r` naming the given layers (digest, media type, size).
    pub fn write_manifest(
        &self,
        r: &ModelRef,
        config: (&str, u64),
        layers: &[(String, &str, u64)],
    ) -> std::io::Result<()> {
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config.0, "size": config.1},
            "layers": layers.iter().map(|(d, m, s)| json!({"mediaType": m, "digest": d, "size": s})).collect::<Vec<_>>(),
        });
        let path = self.manifest_path(r);
        std::fs::create_dir_all(path.parent().unwrap_or(&self.dir))?;
        // In place (truncate, then write), as Ollama writes manifests: a reader in between sees
        // a short file.
        std::fs::write(path, manifest.to_string())
    }

    /// Finishes a pull whose model blob is already committed: writes the config and manifest.
    pub fn finish_pull(
        &self,
        r: &ModelRef,
        weights: &str,
        weights_size: u64,
        config: &[u8],
    ) -> std::io::Result<()> {
        let config_digest = self.write_blob(config)?;
        self.write_manifest(
            r,
            (&config_digest, config.len() as u64),
            &[(weights.to_string(), MEDIA_MODEL, weights_size)],
        )
    }

    /// Reads a model, if its manifest and blobs are all present.
    pub fn get(&self, r: &ModelRef) -> Option<ModelInfo> {
        let path = self.manifest_path(r);
        let text = std::fs::read(&path).ok()?;
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        let manifest: Value = serde_json::from_slice(&text).ok()?;
        let config_digest = manifest["config"]["digest"].as_str()?;
        let config: Value =
            serde_json::from_slice(&std::fs::read(self.blob_path(config_digest)).ok()?).ok()?;
        let mut size = manifest["config"]["size"].as_u64().unwrap_or(0);
        let mut parameters = BTreeMap::new();
        let mut model_blob = String::new();
        let (mut system, mut template) = (None, None);
        for layer in manifest["layers"].as_array()? {
            let digest = layer["digest"].as_str()?;
            let blob = self.blob_path(digest);
            if !blob.exists() {
                return None;
            }
            size += layer["size"].as_u64().unwrap_or(0);
            match layer["mediaType"].as_str() {
                Some(MEDIA_PARAMS) => {
                    let params: BTreeMap<String, Value> =
                        serde_json::from_slice(&std::fs::read(&blob).ok()?).ok()?;
                    parameters.extend(params);
                }
                Some(MEDIA_MODEL) => model_blob = digest.to_string(),
                Some(MEDIA_SYSTEM) => system = std::fs::read_to_string(&blob).ok(),
                Some(MEDIA_TEMPLATE) => template = std::fs::read_to_string(&blob).ok(),
                _ => {}
            }
        }
        Some(ModelInfo {
            name: r.short(),
            reference: r.clone(),
            digest: digest_of(&text),
            size,
            memory: config["sim_memory_bytes"].as_u64().unwrap_or(0),
            modified,
            parameters,
            model_blob,
            system,
            template,
        })
    }

    /// Every complete model in the store, sorted by name.
    pub fn list(&self) -> Vec<ModelInfo> {
        let mut out = Vec::new();
        let root = self.dir.join("manifests");
        let dirs = |p: &Path| -> Vec<(String, PathBuf)> {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                        .collect()
                })
                .unwrap_or_default()
        };
        for (host, hp) in dirs(&root) {
            for (ns, np) in dirs(&hp) {
                for (model, mp) in dirs(&np) {
                    for (tag, _) in dirs(&mp) {
                        let r = ModelRef {
                            host: host.clone(),
                            namespace: ns.clone(),
                            model: model.clone(),
                            tag,
                        };
                        if let Some(info) = self.get(&r) {
                            out.push(info);
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Creates `new` from `base` with extra parameters (merged over the base's).
    pub fn create(
        &self,
        new: &ModelRef,
        base: &ModelInfo,
        params: &BTreeMap<String, Value>,
        texts: (Option<&str>, Option<&str>),
    ) -> std::io::Result<()> {
        let text = std::fs::read(self.manifest_path(&base.reference))?;
        let manifest: Value = serde_json::from_slice(&text).map_err(std::io::Error::other)?;
        let mut merged = base.parameters.clone();
        merged.extend(params.clone());
        let mut layers: Vec<(String, &str, u64)> = Vec::new();
        let (system, template) = texts;
        for layer in manifest["layers"].as_array().into_iter().flatten() {
            let media = match layer["mediaType"].as_str() {
                Some(MEDIA_PARAMS) => continue,
                Some(MEDIA_SYSTEM) if system.is_some() => continue,
                Some(MEDIA_TEMPLATE) if template.is_some() => continue,
                Some(MEDIA_SYSTEM) => MEDIA_SYSTEM,
                Some(MEDIA_TEMPLATE) => MEDIA_TEMPLATE,
                _ => MEDIA_MODEL,
            };
            layers.push((
                layer["digest"].as_str().unwrap_or_default().to_string(),
                media,
                layer["size"].as_u64().unwrap_or(0),
            ));
        }
        for (text, media) in [(system, MEDIA_SYSTEM), (template, MEDIA_TEMPLATE)] {
            if let Some(t) = text {
                let digest = self.write_blob(t.as_bytes())?;
                layers.push((digest, media, t.len() as u64));
            }
        }
        if !merged.is_empty() {
            let bytes = serde_json::to_vec(&merged).map_err(std::io::Error::other)?;
            let digest = self.write_blob(&bytes)?;
            layers.push((digest, MEDIA_PARAMS, bytes.len() as u64));
        }
        let config_digest = manifest["config"]["digest"].as_str().unwrap_or_default();
        let config_size = manifest["config"]["size"].as_u64().unwrap_or(0);
        self.write_manifest(new, (config_digest, config_size), &layers)
    }

    /// Ollama's walk of `blobs/` at start (fixBlobs): every entry listed, then looked at one by
    /// one (`delay` apart); an entry gone by then is an error, which ends Ollama's start.
    pub async fn walk_blobs(&self, delay: Duration) -> Result<(), String> {
        let dir = self.dir.join("blobs");
        let mut names: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(_) => return Ok(()),
        };
        names.sort();
        for path in names {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Err(e) = std::fs::symlink_metadata(&path) {
                return Err(format!(
                    "lstat {}: {}",
                    path.display(),
                    e.to_string().to_lowercase()
                ));
            }
        }
        Ok(())
    }

    /// Copies a model's manifest to another name (the blobs are shared).
    pub fn copy(&self, from: &ModelRef, to: &ModelRef) -> std::io::Result<()> {
        let text = std::fs::read(self.manifest_path(from))?;
        let path = self.manifest_path(to);
        std::fs::create_dir_all(path.parent().unwrap_or(&self.dir))?;
        std::fs::write(path, text)
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).exists()
    }

    /// Stores `bytes` as the blob `digest`, when they hash to it.
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), String> {
        let actual = digest_of(bytes);
        if actual != digest {
            return Err(format!(
                "digest mismatch, expected {digest:?}, got {actual:?}"
            ));
        }
        self.write_blob(bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Deletes a model's manifest (blobs stay until the next prune).
    pub fn delete(&self, r: &ModelRef) -> std::io::Result<()> {
        std::fs::remove_file(self.manifest_path(r))
    }

    /// Deletes every blob no manifest references (and partial downloads), as Ollama does at
    /// start unless `OLLAMA_NOPRUNE` is set. Returns how many files were removed.
    pub fn prune(&self) -> usize {
        let mut referenced = HashSet::new();
        let mut stack = vec![self.dir.join("manifests")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(m) =
                    serde_json::from_slice::<Value>(&std::fs::read(&path).unwrap_or_default())
                {
                    if let Some(d) = m["config"]["digest"].as_str() {
                        referenced.insert(d.replace(':', "-"));
                    }
                    for layer in m["layers"].as_array().into_iter().flatten() {
                        if let Some(d) = layer["digest"].as_str() {
                            referenced.insert(d.replace(':', "-"));
                        }
                    }
                }
            }
        }
        let mut removed = 0;
        if let Ok(entries) = std::fs::read_dir(self.dir.join("blobs")) {
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !referenced.contains(&name) && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// A parameter value as Ollama stores it: numbers as numbers, the rest as strings.
pub fn param_value(v: &str) -> Value {
    if let Ok(i) = v.parse::<i64>() {
        json!(i)
    } else if let Ok(f) = v.parse::<f64>() {
        json!(f)
    } else {
        json!(v.trim_matches('"'))
    }
}

/// `parameters` as `/api/show` prints them: a key padded to 30 columns, then the value.
pub fn parameters_text(params: &BTreeMap<String, Value>) -> String {
    params
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => format!("\"{s}\""),
                other => other.to_string(),
            };
            format!("{k:<30} {v}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "sim-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        (Store::new(&dir), dir)
    }

    fn pull(store: &Store, name: &str, memory: u64) -> ModelRef {
        let r = ModelRef::parse(name).expect("valid");
        let (weights, config) = Store::pulled_blobs(&r, memory);
        let (digest, partial) = store.stage_blob(&weights).expect("stage");
        store.commit_blob(&digest, &partial).expect("commit");
        store
            .finish_pull(&r, &digest, weights.len() as u64, &config)
            .expect("finish");
        r
    }

    #[test]
    fn pull_get_list_create_delete_prune() {
        let (store, dir) = temp_store();
        let r = pull(&store, "smollm2:135m", 1 << 20);
        assert!(
            dir.join("manifests/registry.ollama.ai/library/smollm2/135m")
                .exists()
        );
        let info = store.get(&r).expect("present");
        assert_eq!(info.name, "smollm2:135m");
        assert_eq!(info.memory, 1 << 20);
        assert!(store.blob_path(&info.model_blob).exists());

        let params: BTreeMap<String, Value> = [("num_thread".to_string(), json!(2))].into();
        let derived = ModelRef::parse("smollm2-2t").expect("valid");
        store
            .create(&derived, &info, &params, (None, None))
            .expect("create");
        let d = store.get(&derived).expect("derived");
        assert_eq!(d.parameters["num_thread"], json!(2));
        assert_eq!(d.model_blob, info.model_blob, "shares the weights");
        assert_eq!(store.list().len(), 2);

        // A blob no manifest references is pruned; referenced ones stay.
        let (_, partial) = store.stage_blob(b"orphan").expect("stage");
        assert_eq!(store.prune(), 1);
        assert!(!partial.exists());
        assert!(store.get(&r).is_some());
        store.delete(&derived).expect("delete");
        assert_eq!(store.prune(), 1, "the params blob of the deleted model");
        assert!(store.get(&r).is_some());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn pulls_are_deterministic() {
        let r = ModelRef::parse("llama3").expect("valid");
        assert_eq!(Store::pulled_blobs(&r, 5), Store::pulled_blobs(&r, 5));
    }

    #[test]
    fn parameters_print_like_ollama() {
        let params = BTreeMap::from([
            ("num_thread".to_string(), param_value("2")),
            ("stop".to_string(), param_value("\"<|end|>\"")),
        ]);
        assert_eq!(params["stop"], json!("<|end|>"));
        assert!(parameters_text(&params).starts_with("num_thread                     2"));
    }
}
