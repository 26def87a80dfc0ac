//! The JSON Schema of the manifest, generated from the Rust types.
//!
//! Draft-07, the dialect editors (yaml-language-server, VS Code) understand best. The output is
//! checked in at `schemas/ollamafleet.schema.json`, and a test fails when the two drift.

use schemars::generate::SchemaSettings;

use crate::manifest::OllamaFleet;

/// The schema's `$id`, where editors may fetch it from.
pub const SCHEMA_ID: &str = "https://raw.githubusercontent.com/ollama-fleet/ollama-fleet/main/schemas/ollamafleet.schema.json";

/// The schema as pretty-printed JSON with a final newline: the exact bytes of the checked-in file.
pub fn schema_json() -> String {
    let mut schema = SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<OllamaFleet>();
    schema.insert("$id".into(), SCHEMA_ID.into());
    let mut out = serde_json::to_string_pretty(&schema).unwrap_or_default();
    out.push('\n');
    out
}
