//! The `OllamaFleet` API: the manifest types, their parsing from YAML or JSON, validation that
//! reports every error with its field path and position, quantities and durations, image and
//! model references, and the JSON Schema generated from the types.
//!
//! No I/O and no async: everything here is a pure function of its input, so the CLI, the agent
//! and the tests all share it.
//!
//! ```
//! let src = "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\n\
//!            metadata: {name: demo}\nspec: {model: smollm2, replicas: {perNode: 2}}\n";
//! let fleet = fleet_api::parse_fleet(src, &fleet_api::Context::default()).unwrap();
//! assert_eq!(fleet.spec.replicas.count(2), 2);
//! ```

mod decode;
pub mod emit;
pub mod keys;
mod manifest;
pub mod refs;
mod schema;
mod status;
pub mod text;
pub mod units;
mod validate;
pub mod yaml;

pub use decode::FieldError;
pub use manifest::{
    API_VERSION, CpuPinning, DEFAULT_IMAGE, DEFAULT_MODELS_PATH, EPHEMERAL_PORT_START, FleetSpec,
    KIND, MAX_CPUS, MAX_MEMORY, MIN_MEMORY, MIN_PORT, Metadata, Models, Network, OllamaFleet,
    Probe, Probes, PromptCache, PullPolicy, Replicas, Resources, RestartBackoff, Rollout, Rotation,
    RuntimeSpec, SecurityContext, is_dns_label, is_normalised_path,
};
pub use refs::{ImageRef, ModelRef};
pub use schema::schema_json;
pub use status::{
    Capacity, Condition, ExitReason, FleetStatus, InstanceStatus, LABEL_CREATED_AT, LABEL_FLEET,
    LABEL_PORT, LABEL_SLOT, LABEL_SPEC_HASH, LastExit, NodeInfo, Phase, Versions, sha256_hex,
    spec_hash,
};
pub use text::{clip, go_json_key_is, printable};
pub use units::{Duration, IntOrPercent, Quantity};
pub use validate::{Context, validate};

/// Decodes and validates one parsed document; every error is returned at once.
pub fn decode_document(node: &yaml::Node, ctx: &Context) -> Result<OllamaFleet, Vec<FieldError>> {
    let (fleet, mut errors) = manifest::decode(node);
    let cross = validate::validate_except(&fleet, ctx, Some(node), &errors);
    errors.extend(cross);
    if errors.is_empty() {
        Ok(fleet)
    } else {
        errors.sort_by_key(|e| e.pos);
        Err(errors)
    }
}

/// Parses and validates every document of a YAML or JSON stream (`---` separates documents;
/// empty ones are skipped). A syntax error ends the stream with one error.
pub fn parse_fleets(src: &str, ctx: &Context) -> Vec<Result<OllamaFleet, Vec<FieldError>>> {
    match yaml::parse_stream(src) {
        Ok(docs) => docs.iter().map(|d| decode_document(d, ctx)).collect(),
        Err(e) => vec![Err(vec![FieldError::new("", e.message).at(e.pos)])],
    }
}

/// Parses and validates a source that must hold exactly one fleet (an etcd value, say).
pub fn parse_fleet(src: &str, ctx: &Context) -> Result<OllamaFleet, Vec<FieldError>> {
    let mut docs = parse_fleets(src, ctx);
    match docs.len() {
        1 => docs.remove(0),
        0 => Err(vec![FieldError::new("", "the document is empty")]),
        n => Err(vec![FieldError::new(
            "",
            format!("expected one document, found {n}"),
        )]),
    }
}
