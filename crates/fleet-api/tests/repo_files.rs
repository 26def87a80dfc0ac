//! Checks on files checked into the repository: the generated schema and the manifests.

use std::path::{Path, PathBuf};

use fleet_api::{Context, parse_fleets};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The checked-in schema is exactly what the types generate. To update it after changing
/// the types: `OLLAMA_FLEET_BLESS=1 cargo test -p fleet-api --test repo_files`.
#[test]
fn checked_in_schema_matches_the_types() {
    let path = repo_root().join("schemas/ollamafleet.schema.json");
    let generated = fleet_api::schema_json();
    if std::env::var_os("OLLAMA_FLEET_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write schema");
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "schemas/ollamafleet.schema.json is out of date; regenerate it with \
         `OLLAMA_FLEET_BLESS=1 cargo test -p fleet-api --test repo_files`"
    );
}

fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("list manifests/") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            manifest_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
}

#[test]
fn every_manifest_in_the_repository_is_valid() {
    let mut files = Vec::new();
    manifest_files(&repo_root().join("manifests"), &mut files);
    assert!(files.len() >= 3, "expected the examples, found {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        if text.contains("kind: OllamaFleet") || text.contains("\"kind\": \"OllamaFleet\"") {
            let docs = parse_fleets(&text, &Context::default());
            assert!(!docs.is_empty(), "{} holds no fleet", file.display());
            for doc in docs {
                if let Err(errs) = doc {
                    panic!("{} is invalid: {errs:#?}", file.display());
                }
            }
            if file.extension().is_some_and(|e| e != "json") {
                assert!(
                    text.starts_with("# yaml-language-server: $schema="),
                    "{} should start with the yaml-language-server schema line",
                    file.display()
                );
            }
        }
    }
}

/// Serialising a decoded fleet and decoding the result gives the same fleet: the serde names
/// (which the schema is generated from) and the decoder agree on every field.
#[test]
fn serialised_fleets_decode_to_themselves() {
    let mut files = Vec::new();
    manifest_files(&repo_root().join("manifests/examples"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for fleet in parse_fleets(&text, &Context::default()) {
            let fleet = fleet.expect("valid example");
            let json = serde_json::to_string(&fleet).expect("serialise");
            let again = fleet_api::parse_fleet(&json, &Context::default()).unwrap_or_else(|e| {
                panic!("{}: re-decoding {json} failed: {e:#?}", file.display())
            });
            assert_eq!(again, fleet, "{}", file.display());
        }
    }
}

/// Every keys file in `manifests/` (the gateway's example) reads without a mistake.
#[test]
fn every_keys_file_in_the_repository_is_valid() {
    let mut files = Vec::new();
    manifest_files(&repo_root().join("manifests"), &mut files);
    let keys: Vec<&PathBuf> = files
        .iter()
        .filter(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("keys"))
        })
        .collect();
    assert!(!keys.is_empty(), "expected manifests/gateway/keys.yaml");
    for file in keys {
        let text = std::fs::read_to_string(file).expect("read");
        let parsed = fleet_api::keys::parse_keys(&text)
            .unwrap_or_else(|e| panic!("{} is invalid: {e:#?}", file.display()));
        assert!(parsed.keys.len() >= 2, "{}", file.display());
    }
}
