//! A small YAML emitter for the tree of [`crate::yaml`] and for JSON values: block style, keys in
//! document order, strings plain when that reads back as the same string and double-quoted
//! (JSON escapes, valid YAML) otherwise. `apply` stores manifests in this normalised form.

use std::fmt::Write as _;

use crate::yaml::{Node, Value};

/// The node as normalised YAML (ending with a newline).
pub fn to_yaml(node: &Node) -> String {
    let mut out = String::new();
    emit(&node.value, 0, &mut out, true);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// A JSON value as YAML.
pub fn json_to_yaml(value: &serde_json::Value) -> String {
    to_yaml(&from_json(value))
}

/// Converts a JSON value into a tree (positions are zero).
pub fn from_json(value: &serde_json::Value) -> Node {
    use serde_json::Value as J;
    let value = match value {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(0.0)),
        },
        J::String(s) => Value::Str(s.clone()),
        J::Array(items) => Value::Seq(items.iter().map(from_json).collect()),
        J::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| {
                    (
                        crate::yaml::Key {
                            name: k.clone(),
                            pos: Default::default(),
                        },
                        from_json(v),
                    )
                })
                .collect(),
        ),
    };
    Node {
        value,
        pos: Default::default(),
    }
}

fn is_collection(v: &Value) -> bool {
    matches!(v, Value::Seq(s) if !s.is_empty()) || matches!(v, Value::Map(m) if !m.is_empty())
}

fn emit(v: &Value, indent: usize, out: &mut String, top: bool) {
    let pad = " ".repeat(indent);
    match v {
        Value::Map(entries) if !entries.is_empty() => {
            for (i, (k, val)) in entries.iter().enumerate() {
                if i > 0 || !top {
                    out.push_str(&pad);
                }
                out.push_str(&scalar_str(&k.name));
                out.push(':');
                if is_collection(&val.value) {
                    out.push('\n');
                    let child = if matches!(val.value, Value::Seq(_)) {
                        indent
                    } else {
                        indent + 2
                    };
                    emit(&val.value, child, out, false);
                } else {
                    out.push(' ');
                    emit(&val.value, indent + 2, out, true);
                    out.push('\n');
                }
            }
        }
        Value::Seq(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 || !top {
                    out.push_str(&pad);
                }
                out.push_str("- ");
                if is_collection(&item.value) {
                    emit(&item.value, indent + 2, out, true);
                } else {
                    emit(&item.value, indent + 2, out, true);
                    out.push('\n');
                }
            }
        }
        Value::Map(_) => out.push_str("{}"),
        Value::Seq(_) => out.push_str("[]"),
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) => out.push_str(&float_str(*f)),
        Value::Str(s) => out.push_str(&scalar_str(s)),
    }
}

fn float_str(f: f64) -> String {
    if f.is_nan() {
        ".nan".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            ".inf".into()
        } else {
            "-.inf".into()
        }
    } else if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// A string as a plain scalar when it reads back as itself, else double-quoted.
fn scalar_str(s: &str) -> String {
    if plain_ok(s) {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
    }
}

fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if "-?:,[]{}#&*!|>'\"%@`".contains(first) || first.is_whitespace() {
        // "-x" and "/x" style strings are common; allow "-" only when followed by a non-space.
        if !(first == '-' && s.len() > 1 && !s[1..].starts_with(' ')) {
            return false;
        }
    }
    if s.ends_with(' ')
        || s.ends_with(':')
        || s.contains(": ")
        || s.contains(" #")
        || s.contains(['\n', '\t', '\r'])
    {
        return false;
    }
    if s.chars().any(|c| c.is_control()) || s.contains([',', '[', ']', '{', '}']) {
        return false;
    }
    // It must not read back as something else (null, a boolean, a number).
    matches!(
        crate::yaml::parse_stream(&format!("k: {s}")).ok().and_then(|d| d.into_iter().next()),
        Some(Node { value: Value::Map(ref m), .. }) if m.len() == 1 && m[0].1.value == Value::Str(s.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse_stream;

    fn round_trip(src: &str) -> String {
        let node = parse_stream(src).expect("parses").remove(0);
        let yaml = to_yaml(&node);
        let again = parse_stream(&yaml)
            .unwrap_or_else(|e| panic!("re-parse of\n{yaml}\nfailed: {e}"))
            .remove(0);
        assert_eq!(again.to_json(), node.to_json(), "round trip of\n{yaml}");
        yaml
    }

    #[test]
    fn manifests_round_trip() {
        let yaml = round_trip(
            "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {name: a, labels: {team: x}}\nspec:\n  model: llama3.1:8b\n  env: {A: \"-1\", B: 'true', C: '1.5', D: '', E: 'a: b', F: '#x', G: ' lead'}\n  command: [/bin/ollama, serve]\n  replicas: {perNode: 3}\n  resources: {cpus: 0.5, memory: 8Gi}\n  nested: [{a: 1, b: [x, y]}, [1, 2], {}, []]\n",
        );
        assert!(
            yaml.starts_with(
                "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata:\n  name: a\n"
            ),
            "{yaml}"
        );
        assert!(yaml.contains("  A: \"-1\"\n"), "{yaml}");
        assert!(yaml.contains("  B: \"true\"\n"), "{yaml}");
        assert!(yaml.contains("  model: llama3.1:8b\n"), "{yaml}");
        assert!(
            yaml.contains("  command:\n  - /bin/ollama\n  - serve\n"),
            "{yaml}"
        );
    }

    #[test]
    fn odd_scalars_round_trip() {
        round_trip(
            "a: [null, true, 1, -2, 1.5, 2.0, .inf, \"\", \"null\", \"0x1\", \"1e3\", \"~\", \"multi\\nline\", \"tab\\tx\", \"quote\\\"x\", \"-\", \"- x\", \"x,y\", \"{x}\"]\n",
        );
        round_trip("\"key with: colon\": 1\n\"1\": 2\n");
    }

    #[test]
    fn json_values() {
        let v = serde_json::json!({"items": [{"name": "a", "ready": 2}], "empty": {}});
        let yaml = json_to_yaml(&v);
        let back = parse_stream(&yaml).expect("parses").remove(0).to_json();
        assert_eq!(back, v);
    }
}
