//! OCI image documents: picking the platform's manifest from an index, reading the config,
//! and computing the chain ID that names the unpacked rootfs snapshot. Pure functions.

use serde_json::Value;

use crate::ImageConfig;

/// Media types of an image index / manifest list.
pub fn is_index(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.index.v1+json"
            | "application/vnd.docker.distribution.manifest.list.v2+json"
    )
}

/// The digest of the linux/amd64 manifest in an index (or the first manifest, if no
/// platform says otherwise).
pub fn pick_manifest(index: &Value, arch: &str) -> Option<String> {
    let manifests = index["manifests"].as_array()?;
    let matches = |m: &&Value| {
        let p = &m["platform"];
        p["os"].as_str().is_none_or(|os| os == "linux")
            && p["architecture"].as_str().is_none_or(|a| a == arch)
    };
    manifests
        .iter()
        .find(matches)
        .and_then(|m| m["digest"].as_str())
        .map(str::to_string)
}

/// The config digest of a manifest.
pub fn config_digest(manifest: &Value) -> Option<String> {
    manifest["config"]["digest"].as_str().map(str::to_string)
}

/// The container configuration and the layers' diff IDs of an image config.
pub fn parse_config(config: &Value) -> (ImageConfig, Vec<String>) {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let c = &config["config"];
    let image = ImageConfig {
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
        env: strings(&c["Env"]),
        working_dir: c["WorkingDir"].as_str().unwrap_or("").to_string(),
        user: c["User"].as_str().unwrap_or("").to_string(),
    };
    (image, strings(&config["rootfs"]["diff_ids"]))
}

/// The chain ID of layers with these diff IDs: `chain(0) = diff(0)`,
/// `chain(n) = sha256(chain(n-1) + " " + diff(n))`.
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    let mut iter = diff_ids.iter();
    let mut chain = iter.next()?.clone();
    for diff in iter {
        chain = format!(
            "sha256:{}",
            fleet_api::sha256_hex(format!("{chain} {diff}").as_bytes())
        );
    }
    Some(chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chain_ids() {
        assert_eq!(chain_id(&[]), None);
        assert_eq!(chain_id(&["sha256:a".into()]).as_deref(), Some("sha256:a"));
        // `echo -n "sha256:a sha256:b" | sha256sum`
        let two = chain_id(&["sha256:a".into(), "sha256:b".into()]).expect("chain");
        assert_eq!(
            two,
            "sha256:970a948bffa8de94d6e22d747ba8c95030e6e546909f98f54e99a13005e173a8"
        );
    }

    #[test]
    fn index_and_config() {
        let index = json!({"manifests": [
            {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
        ]});
        assert_eq!(
            pick_manifest(&index, "amd64").as_deref(),
            Some("sha256:amd")
        );
        assert!(is_index("application/vnd.oci.image.index.v1+json"));
        let config = json!({"config": {"Entrypoint": ["/bin/ollama"], "Cmd": ["serve"], "Env": ["A=b"]},
                            "rootfs": {"diff_ids": ["sha256:1"]}});
        let (c, diffs) = parse_config(&config);
        assert_eq!(c.entrypoint, ["/bin/ollama"]);
        assert_eq!(c.cmd, ["serve"]);
        assert_eq!(diffs, ["sha256:1"]);
    }
}
