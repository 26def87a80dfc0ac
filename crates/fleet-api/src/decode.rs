//! Typed decoding of a [`Node`] tree that collects every error, each with its field path and
//! source position, instead of stopping at the first one.

use std::collections::BTreeMap;
use std::fmt;

use crate::units::{Duration, IntOrPercent, Quantity};
use crate::yaml::{Key, Node, Pos, Value};

/// One problem in a document: where (field path and position) and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Field path such as `spec.replicas.perNode` or `spec.env[FOO]`; empty for the document.
    pub path: String,
    /// What is wrong and what is allowed.
    pub message: String,
    /// Where in the source, when the error comes from a document.
    pub pos: Option<Pos>,
}

impl FieldError {
    /// A new error at `path`; path and message are clipped, whatever the document holds.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        let (path, message): (String, String) = (path.into(), message.into());
        FieldError {
            path: crate::clip(&path, MAX_PATH_BYTES).into_owned(),
            message: crate::clip(&message, MAX_MESSAGE_BYTES).into_owned(),
            pos: None,
        }
    }

    /// The same error with a source position.
    pub fn at(mut self, pos: Option<Pos>) -> Self {
        self.pos = pos;
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// The errors collected while decoding one document.
#[derive(Debug, Default)]
pub(crate) struct Errors(pub(crate) Vec<FieldError>);

/// The longest field path kept in an error (a hostile key can be kilobytes long).
const MAX_PATH_BYTES: usize = 256;
/// The longest message kept in an error.
const MAX_MESSAGE_BYTES: usize = 1024;

impl Errors {
    pub(crate) fn add(&mut self, path: &str, pos: Pos, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message).at(Some(pos)));
    }
}

/// Joins a field name onto a path.
pub(crate) fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// A type that can be read from a node; on failure it records errors and returns `None`.
pub(crate) trait Decode: Sized {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self>;
}

/// Longest string accepted in any field (a command argument, an env value, a label).
pub const MAX_STRING_BYTES: usize = 16 * 1024;
/// Most items of any list or mapping (`command`, `env`, labels).
pub const MAX_ITEMS: usize = 1024;

/// Records an error when a string is too long or holds a NUL byte (which no path, argument or
/// variable can carry); returns whether it is acceptable.
fn text_ok(text: &str, node: &Node, path: &str, errs: &mut Errors) -> bool {
    if text.len() > MAX_STRING_BYTES {
        errs.add(
            path,
            node.pos,
            format!(
                "is {} bytes long; the limit is {MAX_STRING_BYTES}",
                text.len()
            ),
        );
        false
    } else if text.contains('\0') {
        errs.add(path, node.pos, "must not contain NUL bytes");
        false
    } else {
        true
    }
}

/// Records an error when a list or mapping has more than [`MAX_ITEMS`] items.
fn count_ok(n: usize, node: &Node, path: &str, errs: &mut Errors) -> bool {
    if n > MAX_ITEMS {
        errs.add(
            path,
            node.pos,
            format!("has {n} items; the limit is {MAX_ITEMS}"),
        );
    }
    n <= MAX_ITEMS
}

fn type_error(node: &Node, path: &str, errs: &mut Errors, want: &str) {
    let got = match &node.value {
        Value::Str(s) => format!("a string ({:?})", crate::clip(s, 64)),
        Value::Int(i) => format!("an integer ({i})"),
        Value::Float(f) => format!("a number ({f})"),
        Value::Bool(b) => format!("a boolean ({b})"),
        _ => node.kind().to_string(),
    };
    errs.add(path, node.pos, format!("must be {want}, got {got}"));
}

impl Decode for String {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
        match &node.value {
            Value::Str(s) => text_ok(s, node, path, errs).then(|| s.clone()),
            _ => {
                type_error(node, path, errs, "a string");
                None
            }
        }
    }
}

impl Decode for bool {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
        match node.value {
            Value::Bool(b) => Some(b),
            _ => {
                type_error(node, path, errs, "true or false");
                None
            }
        }
    }
}

/// Reads an integer in `min..=max`, with a message that names the bound.
pub(crate) fn int_in(
    node: &Node,
    path: &str,
    errs: &mut Errors,
    min: i64,
    max: i64,
) -> Option<i64> {
    match node.value {
        Value::Int(i) if i < min => {
            errs.add(path, node.pos, format!("must be >= {min}, got {i}"));
            None
        }
        Value::Int(i) if i > max => {
            errs.add(path, node.pos, format!("must be <= {max}, got {i}"));
            None
        }
        Value::Int(i) => Some(i),
        _ => {
            type_error(node, path, errs, "an integer");
            None
        }
    }
}

macro_rules! decode_unsigned {
    ($($t:ty),*) => {$(
        impl Decode for $t {
            fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
                int_in(node, path, errs, 0, i64::try_from(<$t>::MAX).unwrap_or(i64::MAX))
                    .and_then(|i| <$t>::try_from(i).ok())
            }
        }
    )*};
}
decode_unsigned!(u16, u32, u64);

impl Decode for f64 {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
        match node.value {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) if f.is_finite() => Some(f),
            _ => {
                type_error(node, path, errs, "a number");
                None
            }
        }
    }
}

impl<T: Decode> Decode for Vec<T> {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
        match &node.value {
            Value::Null => Some(Vec::new()),
            Value::Seq(items) => {
                if !count_ok(items.len(), node, path, errs) {
                    return None;
                }
                let before = errs.0.len();
                let out: Vec<T> = items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| T::decode(item, &format!("{path}[{i}]"), errs))
                    .collect();
                (errs.0.len() == before).then_some(out)
            }
            _ => {
                type_error(node, path, errs, "a list");
                None
            }
        }
    }
}

/// A map of string to string; scalar values (numbers, booleans) are taken as their text,
/// so `OLLAMA_KEEP_ALIVE: -1` works unquoted.
impl Decode for BTreeMap<String, String> {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
        let entries = match &node.value {
            Value::Null => return Some(BTreeMap::new()),
            Value::Map(entries) => entries,
            _ => {
                type_error(node, path, errs, "a mapping of names to values");
                return None;
            }
        };
        if !count_ok(entries.len(), node, path, errs) {
            return None;
        }
        let before = errs.0.len();
        let mut out = BTreeMap::new();
        for (key, value) in entries {
            let entry = format!("{path}[{}]", crate::clip(&key.name, 64));
            if !text_ok(&key.name, value, &entry, errs) {
                continue;
            }
            let text = match &value.value {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Null => String::new(),
                _ => {
                    type_error(value, &entry, errs, "a string");
                    continue;
                }
            };
            if text_ok(&text, value, &entry, errs) {
                out.insert(key.name.clone(), text);
            }
        }
        (errs.0.len() == before).then_some(out)
    }
}

/// Reads a scalar's text (strings, and integers for types that also accept them).
fn scalar_text(node: &Node) -> Option<String> {
    match &node.value {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

impl Decode for Quantity {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
        if let Value::Int(i) = node.value
            && i < 0
        {
            errs.add(path, node.pos, format!("must be >= 0, got {i}"));
            return None;
        }
        let Some(text) = scalar_text(node) else {
            type_error(node, path, errs, "a quantity such as 512Mi or 8Gi");
            return None;
        };
        parse_at(node, path, errs, Quantity::parse(&text))
    }
}

impl Decode for Duration {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
        match &node.value {
            Value::Int(0) => Some(Duration::default()),
            Value::Str(s) => parse_at(node, path, errs, Duration::parse(s)),
            Value::Int(i) => {
                errs.add(
                    path,
                    node.pos,
                    format!("invalid duration {i}: missing unit; use e.g. {i}s or {i}m"),
                );
                None
            }
            _ => {
                type_error(node, path, errs, "a duration such as 30s or 5m");
                None
            }
        }
    }
}

impl Decode for IntOrPercent {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
        match &node.value {
            Value::Int(i) if *i < 0 => {
                errs.add(path, node.pos, format!("must be >= 0, got {i}"));
                None
            }
            Value::Int(_) | Value::Str(_) => {
                let text = scalar_text(node).unwrap_or_default();
                parse_at(node, path, errs, IntOrPercent::parse(&text))
            }
            _ => {
                type_error(node, path, errs, "an integer or a percentage such as 25%");
                None
            }
        }
    }
}

/// Records a parse error at the node, if any.
pub(crate) fn parse_at<T>(
    node: &Node,
    path: &str,
    errs: &mut Errors,
    parsed: Result<T, String>,
) -> Option<T> {
    parsed.map_err(|e| errs.add(path, node.pos, e)).ok()
}

/// Reads the fields of one mapping, remembering which were asked for, so that
/// [`Fields::finish`] can report every unknown one.
pub(crate) struct Fields<'a> {
    entries: &'a [(Key, Node)],
    used: Vec<bool>,
    known: Vec<&'static str>,
    path: String,
    pos: Pos,
    pub(crate) errs: &'a mut Errors,
}

impl<'a> Fields<'a> {
    /// Starts reading `node`, which must be a mapping (null counts as an empty one).
    pub(crate) fn new(node: &'a Node, path: &str, errs: &'a mut Errors) -> Option<Fields<'a>> {
        let entries: &'a [(Key, Node)] = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => &[],
            _ => {
                type_error(node, path, errs, "a mapping");
                return None;
            }
        };
        Some(Fields {
            used: vec![false; entries.len()],
            entries,
            known: Vec::new(),
            path: path.to_string(),
            pos: node.pos,
            errs,
        })
    }

    /// This mapping's path.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The path of a field of this mapping.
    pub(crate) fn path_of(&self, name: &str) -> String {
        join(&self.path, name)
    }

    /// The node of a field, if present and not null.
    pub(crate) fn node(&mut self, name: &'static str) -> Option<&'a Node> {
        if !self.known.contains(&name) {
            self.known.push(name);
        }
        let i = self.entries.iter().position(|(k, _)| k.name == name)?;
        self.used[i] = true;
        let node = &self.entries[i].1;
        (node.value != Value::Null).then_some(node)
    }

    /// An optional field.
    pub(crate) fn opt<T: Decode>(&mut self, name: &'static str) -> Option<T> {
        let node = self.node(name)?;
        T::decode(node, &self.path_of(name), self.errs)
    }

    /// A field with a default (used also when the value is invalid; the error is recorded).
    pub(crate) fn or<T: Decode>(&mut self, name: &'static str, default: T) -> T {
        self.opt(name).unwrap_or(default)
    }

    /// A field that must be present.
    pub(crate) fn req<T: Decode>(&mut self, name: &'static str) -> Option<T> {
        if self
            .entries
            .iter()
            .all(|(k, v)| k.name != name || v.value == Value::Null)
        {
            self.node(name);
            let path = self.path_of(name);
            self.errs.add(&path, self.pos, "required field is missing");
            return None;
        }
        self.opt(name)
    }

    /// A nested object decoded by `decode`, or its default when absent.
    pub(crate) fn object<T: Default>(
        &mut self,
        name: &'static str,
        decode: impl FnOnce(&mut Fields<'_>) -> T,
    ) -> T {
        let Some(node) = self.node(name) else {
            return T::default();
        };
        let path = self.path_of(name);
        match Fields::new(node, &path, self.errs) {
            Some(mut fields) => {
                let value = decode(&mut fields);
                fields.finish();
                value
            }
            None => T::default(),
        }
    }

    /// An optional field checked by `parse` after reading it as `T`.
    pub(crate) fn parsed<T: Decode, U>(
        &mut self,
        name: &'static str,
        parse: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        let node = self.node(name)?;
        let path = self.path_of(name);
        let raw = T::decode(node, &path, self.errs)?;
        parse_at(node, &path, self.errs, parse(&raw))
    }

    /// The position of a field's value, else of this mapping.
    pub(crate) fn pos_of(&self, name: &str) -> Pos {
        self.entries
            .iter()
            .find(|(k, _)| k.name == name)
            .map_or(self.pos, |(_, v)| v.pos)
    }

    /// Reports every field that was not asked for.
    pub(crate) fn finish(self) {
        for ((key, _), used) in self.entries.iter().zip(&self.used) {
            if *used {
                continue;
            }
            let hint = match closest(&key.name, &self.known) {
                Some(near) => format!("; did you mean {near:?}?"),
                None => format!("; known fields: {}", self.known.join(", ")),
            };
            self.errs.add(
                &join(&self.path, &crate::clip(&key.name, 64)),
                key.pos,
                format!("unknown field{hint}"),
            );
        }
    }
}

/// The known name closest to `name`, if it is a plausible typo.
fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(&name.to_lowercase(), &k.to_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typo_suggestions() {
        assert_eq!(
            closest("replica", &["replicas", "resources"]),
            Some("replicas")
        );
        assert_eq!(
            closest("imagePullpolicy", &["image", "imagePullPolicy"]),
            Some("imagePullPolicy")
        );
        assert_eq!(closest("zzz", &["model", "image"]), None);
    }
}
