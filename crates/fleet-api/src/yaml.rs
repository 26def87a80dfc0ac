//! A small, positioned YAML (and JSON) document tree, built from `saphyr-parser` events.
//!
//! Every manifest goes through here, including documents that anyone with etcd access can
//! write, so the builder enforces hard limits: input size, nesting depth, the number of nodes
//! and the bytes of text they hold (aliases are expanded against both budgets, so a "billion
//! laughs" document, or one long string used a thousand times, fails fast instead of eating
//! memory), and duplicate keys are found in linear time. Scalars are resolved with the YAML 1.2 core schema:
//! `yes`/`no`/`on`/`off` are strings, quoted scalars are always strings.

use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// Largest document accepted, in bytes (etcd's default request limit is 1.5 MiB).
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;
/// Deepest nesting of mappings and sequences accepted.
pub const MAX_DEPTH: usize = 64;
/// Most nodes one stream may produce, counting every alias expansion.
pub const MAX_NODES: usize = 100_000;
/// Most bytes of text (scalars and keys) one stream may produce, counting every alias
/// expansion: a 1 MiB document cannot grow past this in memory.
pub const MAX_EXPANDED_BYTES: usize = 4 * 1024 * 1024;

/// A position in the source text, both 1-based.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    /// Line, starting at 1.
    pub line: u32,
    /// Column in characters, starting at 1.
    pub col: u32,
}

impl Pos {
    fn of(span: &Span) -> Pos {
        Pos {
            line: u32::try_from(span.start.line()).unwrap_or(u32::MAX),
            col: u32::try_from(span.start.col() + 1).unwrap_or(u32::MAX),
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A value in the tree.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`, `~` or nothing.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// Any other number.
    Float(f64),
    /// A string (every quoted scalar, and plain scalars that are nothing else).
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order; keys are unique.
    Map(Vec<(Key, Node)>),
}

/// A mapping key: always a string (scalar keys such as `1` or `true` keep their text).
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    /// The key's text.
    pub name: String,
    /// Where the key starts.
    pub pos: Pos,
}

/// A value and where it starts in the source.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where the value starts.
    pub pos: Pos,
}

impl Node {
    /// A short name of the node's type for error messages ("a string", "a mapping", ...).
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Number of nodes in this subtree, this one included, and the bytes of text they hold.
    fn size(&self) -> (usize, usize) {
        let add = |(n, b): (usize, usize), (m, c): (usize, usize)| (n + m, b + c);
        match &self.value {
            Value::Seq(items) => items.iter().map(Node::size).fold((1, 0), add),
            Value::Map(entries) => entries
                .iter()
                .map(|(k, v)| add((0, k.name.len()), v.size()))
                .fold((1, 0), add),
            Value::Str(s) => (1, s.len()),
            _ => (1, 0),
        }
    }

    /// Converts to a JSON value (keys keep their document order only as far as
    /// `serde_json::Map` does: sorted).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// A document that could not be read as YAML.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    /// What is wrong.
    pub message: String,
    /// Where, when known.
    pub pos: Option<Pos>,
}

impl SyntaxError {
    fn at(pos: Pos, message: impl Into<String>) -> Self {
        SyntaxError {
            message: message.into(),
            pos: Some(pos),
        }
    }
}

enum Frame {
    Seq {
        items: Vec<Node>,
        pos: Pos,
        anchor: usize,
    },
    Map {
        entries: Vec<(Key, Node)>,
        /// The keys so far, for the duplicate check.
        seen: std::collections::HashSet<String>,
        key: Option<Key>,
        pos: Pos,
        anchor: usize,
    },
}

/// Parses every document of a YAML (or JSON) stream. Empty documents are skipped.
pub fn parse_stream(src: &str) -> Result<Vec<Node>, SyntaxError> {
    if src.len() > MAX_INPUT_BYTES {
        return Err(SyntaxError {
            message: format!(
                "document is {} bytes; the limit is {MAX_INPUT_BYTES} bytes",
                src.len()
            ),
            pos: None,
        });
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(src);
    while let Some(event) = parser.next_event() {
        let (event, span) = event.map_err(|e| {
            SyntaxError::at(
                Pos {
                    line: u32::try_from(e.marker().line()).unwrap_or(u32::MAX),
                    col: u32::try_from(e.marker().col() + 1).unwrap_or(u32::MAX),
                },
                e.info().to_string(),
            )
        })?;
        builder.event(event, &span)?;
    }
    Ok(builder.docs)
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    stack: Vec<Frame>,
    anchors: std::collections::HashMap<usize, Node>,
    nodes: usize,
    bytes: usize,
}

impl Builder {
    fn event(&mut self, event: Event<'_>, span: &Span) -> Result<(), SyntaxError> {
        let pos = Pos::of(span);
        match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd => Ok(()),
            Event::DocumentStart(_) => {
                self.anchors.clear();
                Ok(())
            }
            Event::DocumentEnd => Ok(()),
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| SyntaxError::at(pos, "alias to an unknown anchor"))?;
                self.budget(node.size(), pos)?;
                self.push(Node { pos, ..node })
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.budget((1, text.len()), pos)?;
                let tag = tag.map(|t| (t.handle.clone(), t.suffix.clone()));
                let value = resolve_scalar(&text, style, tag, pos)?;
                let node = Node { value, pos };
                if anchor != 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push(node)
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                if let Some(t) = tag {
                    return Err(SyntaxError::at(
                        pos,
                        format!(
                            "tag {}{} is not supported on collections",
                            t.handle, t.suffix
                        ),
                    ));
                }
                self.budget((1, 0), pos)?;
                if self.stack.len() >= MAX_DEPTH {
                    return Err(SyntaxError::at(
                        pos,
                        format!("nesting deeper than {MAX_DEPTH} levels"),
                    ));
                }
                let frame = if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq {
                        items: Vec::new(),
                        pos,
                        anchor,
                    }
                } else {
                    Frame::Map {
                        entries: Vec::new(),
                        seen: Default::default(),
                        key: None,
                        pos,
                        anchor,
                    }
                };
                self.stack.push(frame);
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { items, pos, anchor }) => (
                        Node {
                            value: Value::Seq(items),
                            pos,
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        entries,
                        pos,
                        anchor,
                        ..
                    }) => (
                        Node {
                            value: Value::Map(entries),
                            pos,
                        },
                        anchor,
                    ),
                    None => return Err(SyntaxError::at(pos, "unbalanced collection end")),
                };
                if anchor != 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push(node)
            }
        }
    }

    /// Counts `(nodes, bytes)` more against the stream's budgets.
    fn budget(&mut self, (nodes, bytes): (usize, usize), pos: Pos) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(nodes);
        self.bytes = self.bytes.saturating_add(bytes);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError::at(
                pos,
                format!("document has more than {MAX_NODES} nodes (aliases count once per use)"),
            ));
        }
        if self.bytes > MAX_EXPANDED_BYTES {
            return Err(SyntaxError::at(
                pos,
                format!(
                    "document holds more than {MAX_EXPANDED_BYTES} bytes of text (aliases count once per use)"
                ),
            ));
        }
        Ok(())
    }

    fn push(&mut self, node: Node) -> Result<(), SyntaxError> {
        match self.stack.last_mut() {
            None => {
                // An empty document yields a single null scalar: skip it, as kubectl does.
                if node.value != Value::Null {
                    self.docs.push(node);
                }
                Ok(())
            }
            Some(Frame::Seq { items, .. }) => {
                items.push(node);
                Ok(())
            }
            Some(Frame::Map {
                entries, seen, key, ..
            }) => match key.take() {
                None => {
                    let name = match node.value {
                        Value::Str(s) => s,
                        Value::Null => String::new(),
                        Value::Bool(b) => b.to_string(),
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) => f.to_string(),
                        Value::Seq(_) | Value::Map(_) => {
                            return Err(SyntaxError::at(
                                node.pos,
                                "a mapping key must be a plain value, not a list or mapping",
                            ));
                        }
                    };
                    if !seen.insert(name.clone()) {
                        return Err(SyntaxError::at(
                            node.pos,
                            format!("duplicate key {:?}", crate::clip(&name, 64)),
                        ));
                    }
                    *key = Some(Key {
                        name,
                        pos: node.pos,
                    });
                    Ok(())
                }
                Some(k) => {
                    entries.push((k, node));
                    Ok(())
                }
            },
        }
    }
}

fn resolve_scalar(
    text: &str,
    style: ScalarStyle,
    tag: Option<(String, String)>,
    pos: Pos,
) -> Result<Value, SyntaxError> {
    if let Some((handle, suffix)) = tag {
        let core = handle == "tag:yaml.org,2002:" || handle == "!!";
        return match (core, suffix.as_str()) {
            (true, "str") => Ok(Value::Str(text.to_string())),
            (true, "int" | "float" | "bool" | "null") => {
                let v = resolve_plain(text);
                let ok = matches!(
                    (suffix.as_str(), &v),
                    ("int", Value::Int(_))
                        | ("float", Value::Float(_) | Value::Int(_))
                        | ("bool", Value::Bool(_))
                        | ("null", Value::Null)
                );
                if ok {
                    Ok(match (suffix.as_str(), v) {
                        ("float", Value::Int(i)) => Value::Float(i as f64),
                        (_, v) => v,
                    })
                } else {
                    Err(SyntaxError::at(
                        pos,
                        format!("{text:?} is not a valid !!{suffix}"),
                    ))
                }
            }
            _ => Err(SyntaxError::at(
                pos,
                format!("tag {handle}{suffix} is not supported"),
            )),
        };
    }
    Ok(match style {
        ScalarStyle::Plain => resolve_plain(text),
        _ => Value::Str(text.to_string()),
    })
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    if let Some(hex) = text.strip_prefix("0x")
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return Value::Int(i);
    }
    if let Some(oct) = text.strip_prefix("0o")
        && let Ok(i) = i64::from_str_radix(oct, 8)
    {
        return Value::Int(i);
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(i) = text.parse::<i64>()
    {
        return Value::Int(i);
    }
    if is_yaml_float(digits)
        && let Ok(f) = text.parse::<f64>()
    {
        return Value::Float(f);
    }
    Value::Str(text.to_string())
}

/// `[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?` or `\.[0-9]+(...)`, without the sign.
fn is_yaml_float(s: &str) -> bool {
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match frac {
        Some(f) => digits(int) && digits(f) && !(int.is_empty() && f.is_empty()),
        None => !int.is_empty() && digits(int),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(src: &str) -> Node {
        let mut docs = parse_stream(src).expect("parses");
        assert_eq!(docs.len(), 1, "one document in {src:?}");
        docs.remove(0)
    }

    #[test]
    fn core_schema_scalars() {
        let cases = [
            ("a: 1", Value::Int(1)),
            ("a: -3", Value::Int(-3)),
            ("a: 0x1f", Value::Int(31)),
            ("a: 0.5", Value::Float(0.5)),
            ("a: 1e3", Value::Float(1000.0)),
            ("a: true", Value::Bool(true)),
            ("a: yes", Value::Str("yes".into())),
            ("a: off", Value::Str("off".into())),
            ("a: ~", Value::Null),
            ("a:", Value::Null),
            ("a: '1'", Value::Str("1".into())),
            ("a: \"true\"", Value::Str("true".into())),
            ("a: 8Gi", Value::Str("8Gi".into())),
            ("a: 10%", Value::Str("10%".into())),
            ("a: 1.2.3", Value::Str("1.2.3".into())),
            ("a: !!str 42", Value::Str("42".into())),
            ("a: 99999999999999999999", Value::Float(1e20)),
        ];
        for (src, want) in cases {
            let Value::Map(entries) = one(src).value else {
                panic!("{src}: not a map")
            };
            assert_eq!(entries[0].1.value, want, "{src}");
        }
    }

    #[test]
    fn positions_are_one_based() {
        let node = one("a:\n  b: [1, 2]\n");
        let Value::Map(entries) = node.value else {
            panic!()
        };
        let Value::Map(inner) = &entries[0].1.value else {
            panic!()
        };
        assert_eq!(inner[0].0.pos, Pos { line: 2, col: 3 });
        assert_eq!(inner[0].1.pos, Pos { line: 2, col: 6 });
    }

    #[test]
    fn json_parses_too() {
        let node = one(r#"{"a": {"b": [1, "x", null, true]}, "c": 1.5}"#);
        assert_eq!(
            node.to_json(),
            serde_json::json!({"a": {"b": [1, "x", null, true]}, "c": 1.5})
        );
    }

    #[test]
    fn multiple_documents_and_empty_ones() {
        let docs = parse_stream("---\na: 1\n---\n# only a comment\n---\nb: 2\n").expect("ok");
        assert_eq!(docs.len(), 2);
        assert!(parse_stream("").expect("ok").is_empty());
    }

    #[test]
    fn aliases_expand() {
        let node = one("a: &x {b: 1}\nc: *x\n");
        assert_eq!(
            node.to_json(),
            serde_json::json!({"a": {"b": 1}, "c": {"b": 1}})
        );
    }

    #[test]
    fn hostile_input_fails_fast() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p}]\n"
            ));
        }
        let err = parse_stream(&bomb).expect_err("alias bomb");
        assert!(err.message.contains("more than"), "{err:?}");

        let deep_flow = "[".repeat(100_000);
        assert!(parse_stream(&deep_flow).is_err());

        let mut deep_block = String::new();
        for i in 0..200 {
            deep_block.push_str(&" ".repeat(i));
            deep_block.push_str("k:\n");
        }
        let err = parse_stream(&deep_block).expect_err("too deep");
        assert!(err.message.contains("nesting"), "{err:?}");

        let huge = "a: ".to_string() + &"x".repeat(MAX_INPUT_BYTES + 1);
        assert!(parse_stream(&huge).is_err());

        // One long string used many times: few nodes, gigabytes once expanded.
        let mut strings = format!("a: &a \"{}\"\nb: [", "x".repeat(800 * 1024));
        strings.push_str(&vec!["*a"; 1000].join(","));
        strings.push_str("]\n");
        assert!(strings.len() < MAX_INPUT_BYTES);
        let err = parse_stream(&strings).expect_err("string bomb");
        assert!(err.message.contains("bytes of text"), "{err:?}");
    }

    #[test]
    fn duplicates_among_many_keys() {
        // 49k keys took 5 s per parse with the quadratic duplicate check (now a set).
        let src: String = (0..49_000).map(|i| format!("k{i}: {i}\n")).collect();
        let node = one(&src);
        assert!(matches!(node.value, Value::Map(ref e) if e.len() == 49_000));
        let dup = format!("{src}k48999: 1\n");
        assert!(
            parse_stream(&dup)
                .expect_err("dup")
                .message
                .contains("duplicate key")
        );
    }

    #[test]
    fn syntax_errors_carry_positions() {
        let err = parse_stream("a: [1, 2\nb: 3\n").expect_err("bad");
        assert!(err.pos.is_some());
        let err = parse_stream("a: 1\na: 2\n").expect_err("duplicate");
        assert_eq!(err.pos, Some(Pos { line: 2, col: 1 }));
        assert!(err.message.contains("duplicate key"));
    }

    #[test]
    fn unsupported_tags_are_errors() {
        assert!(parse_stream("a: !!binary aGVsbG8=").is_err());
        assert!(parse_stream("a: !custom x").is_err());
    }
}
