//! Container image references (the OCI distribution grammar, with Docker's normalisation)
//! and Ollama model references (`[host/][namespace/]model[:tag]`).

use std::fmt;

/// A parsed container image reference such as `docker.io/ollama/ollama:0.4.0`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host (with port), `docker.io` when the reference names none.
    pub domain: String,
    /// Repository path, e.g. `ollama/ollama` (`library/` added for Docker Hub short names).
    pub path: String,
    /// Tag, `latest` when neither tag nor digest is given.
    pub tag: Option<String>,
    /// Digest such as `sha256:…`.
    pub digest: Option<String>,
}

const DOCKER_HUB: &str = "docker.io";

impl ImageRef {
    /// Parses and normalises a reference; the error says what is wrong.
    pub fn parse(text: &str) -> Result<ImageRef, String> {
        let bad = |why: &str| format!("invalid image reference {text:?}: {why}");
        if text.is_empty() {
            return Err(bad("empty"));
        }
        if text.len() > 255 {
            return Err(bad("longer than 255 characters"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (text, None),
        };
        if let Some(d) = digest {
            check_digest(d).map_err(|why| bad(&why))?;
        }
        // The tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok {
                return Err(bad(&format!(
                    "tag {t:?} must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
                )));
            }
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                check_domain(first).map_err(|why| bad(&why))?;
                (first.to_string(), remainder.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if path.is_empty() {
            return Err(bad("missing repository name"));
        }
        for component in path.split('/') {
            check_path_component(component).map_err(|why| bad(&why))?;
        }
        let path = if domain == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t.map(str::to_string),
        };
        Ok(ImageRef {
            domain,
            path,
            tag,
            digest: digest.map(str::to_string),
        })
    }
}

impl fmt::Display for ImageRef {
    /// The fully normalised reference, the name containerd stores the image under.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn check_domain(domain: &str) -> Result<(), String> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || domain.starts_with('[') => (h, Some(p)),
        _ => (domain, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err())
    {
        return Err(format!("registry port {p:?} is not a port number"));
    }
    if host.starts_with('[') && host.ends_with(']') {
        return host[1..host.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("registry {host:?} is not a valid IPv6 address"));
    }
    let ok = !host.is_empty()
        && host.split('.').all(|c| {
            !c.is_empty()
                && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
                && !c.starts_with('-')
                && !c.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("registry host {host:?} is not a valid host name"))
    }
}

fn check_path_component(c: &str) -> Result<(), String> {
    let why = || {
        format!(
            "repository component {c:?} must be lowercase letters and digits, separated by '.', '_', '__' or '-'"
        )
    };
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(why());
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__' or a run of '-'.
        let start = i;
        match b {
            b'.' => i += 1,
            b'_' => {
                i += if bytes.get(i + 1) == Some(&b'_') {
                    2
                } else {
                    1
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return Err(why()),
        }
        if i == start || !bytes.get(i).is_some_and(|b| alnum(*b)) {
            return Err(why());
        }
    }
    Ok(())
}

fn check_digest(d: &str) -> Result<(), String> {
    let (algo, hex) = d
        .split_once(':')
        .ok_or_else(|| format!("digest {d:?} must look like sha256:<64 hex digits>"))?;
    let algo_ok = !algo.is_empty()
        && algo.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && algo
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-' | '_'));
    let hex_ok = hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit());
    let len_ok = algo != "sha256" || hex.len() == 64;
    if algo_ok && hex_ok && len_ok {
        Ok(())
    } else {
        Err(format!(
            "digest {d:?} must look like sha256:<64 hex digits>"
        ))
    }
}

/// A parsed Ollama model reference such as `llama3.1:8b-instruct-q4_0` or
/// `hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelRef {
    /// Registry host, `registry.ollama.ai` by default.
    pub host: String,
    /// Namespace, `library` by default.
    pub namespace: String,
    /// Model name.
    pub model: String,
    /// Tag, `latest` by default.
    pub tag: String,
}

impl ModelRef {
    /// Parses a model reference the way Ollama does; the error says what is allowed.
    pub fn parse(text: &str) -> Result<ModelRef, String> {
        let bad = |why: String| format!("invalid model reference {text:?}: {why}");
        let s = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .unwrap_or(text);
        if s.is_empty() {
            return Err(bad("empty".into()));
        }
        let last_slash = s.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match s[last_slash..].rfind(':') {
            Some(i) => (&s[..last_slash + i], &s[last_slash + i + 1..]),
            None => (s, "latest"),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts.as_slice() {
            [m] => ("registry.ollama.ai", "library", *m),
            [n, m] => ("registry.ollama.ai", *n, *m),
            [h, n, m] => (*h, *n, *m),
            _ => {
                return Err(bad(
                    "use [host/][namespace/]model[:tag], e.g. llama3.1:8b-instruct-q4_0".into(),
                ));
            }
        };
        let part_ok = |p: &str, max: usize, extra: &[char], first_extra: &[char]| {
            !p.is_empty()
                && p.len() <= max
                && p.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || first_extra.contains(&c))
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
        };
        if !part_ok(host, 350, &['-', '_', '.', ':'], &[]) {
            return Err(bad(format!("host {host:?} is not a valid host name")));
        }
        if !part_ok(namespace, 80, &['-', '_'], &[]) {
            return Err(bad(format!(
                "namespace {namespace:?} must be 1-80 letters, digits, '-' or '_'"
            )));
        }
        if !part_ok(model, 80, &['-', '_', '.'], &[]) {
            return Err(bad(format!(
                "model name {model:?} must be 1-80 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )));
        }
        if !part_ok(tag, 80, &['-', '_', '.'], &['_']) {
            return Err(bad(format!(
                "tag {tag:?} must be 1-80 letters, digits, '-', '_' or '.', starting with a letter, digit or '_'"
            )));
        }
        Ok(ModelRef {
            host: host.to_string(),
            namespace: namespace.to_string(),
            model: model.to_string(),
            tag: tag.to_string(),
        })
    }

    /// The short form Ollama shows: `model:tag` for the default registry and namespace.
    pub fn short(&self) -> String {
        if self.host == "registry.ollama.ai" && self.namespace == "library" {
            format!("{}:{}", self.model, self.tag)
        } else if self.host == "registry.ollama.ai" {
            format!("{}/{}:{}", self.namespace, self.model, self.tag)
        } else {
            self.to_string()
        }
    }
}

impl ModelRef {
    /// Whether two references name the same model: Ollama compares names case-insensitively
    /// (`Llama3` is `llama3:latest`).
    pub fn same_as(&self, other: &ModelRef) -> bool {
        self.host.eq_ignore_ascii_case(&other.host)
            && self.namespace.eq_ignore_ascii_case(&other.namespace)
            && self.model.eq_ignore_ascii_case(&other.model)
            && self.tag.eq_ignore_ascii_case(&other.tag)
    }

    /// A key under which every spelling of one model is the same (full, lowercase): what the
    /// node's model cache and its workers are keyed by.
    pub fn key(text: &str) -> String {
        ModelRef::parse(text)
            .map_or_else(|_| text.to_string(), |r| r.to_string())
            .to_ascii_lowercase()
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}:{}",
            self.host, self.namespace, self.model, self.tag
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_compare_as_ollama_does() {
        let p = |s: &str| ModelRef::parse(s).expect("valid");
        assert!(p("Llama3").same_as(&p("llama3:latest")));
        assert!(p("registry.ollama.ai/library/LLAMA3:8B").same_as(&p("llama3:8b")));
        assert!(!p("llama3:8b").same_as(&p("llama3:70b")));
        assert_eq!(
            ModelRef::key("Llama3"),
            ModelRef::key("registry.ollama.ai/library/llama3:latest")
        );
    }

    #[test]
    fn image_references_normalise() {
        let cases = [
            ("ollama/ollama", "docker.io/ollama/ollama:latest"),
            ("ollama/ollama:0.4.0", "docker.io/ollama/ollama:0.4.0"),
            ("busybox", "docker.io/library/busybox:latest"),
            (
                "docker.io/ollama/ollama:0.4.0",
                "docker.io/ollama/ollama:0.4.0",
            ),
            ("localhost/ollama-sim:dev", "localhost/ollama-sim:dev"),
            ("localhost:5000/a/b/c:v1.2", "localhost:5000/a/b/c:v1.2"),
            ("127.0.0.1:5000/sim:1", "127.0.0.1:5000/sim:1"),
            (
                "ghcr.io/org/my_image__x-y:tag_1",
                "ghcr.io/org/my_image__x-y:tag_1",
            ),
            (
                "ollama/ollama@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "docker.io/ollama/ollama@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                ImageRef::parse(input).map(|r| r.to_string()),
                Ok(want.to_string()),
                "{input}"
            );
        }
    }

    #[test]
    fn bad_image_references() {
        for bad in [
            "",
            "Ollama/Ollama",
            "ollama/",
            "/ollama",
            "ollama//ollama",
            "ollama/ollama:",
            "ollama/ollama:-x",
            "ollama/ollama@sha256:1234",
            "ollama/ollama@md5",
            "registry:notaport/x",
            "a..b/x",
            "ollama_/x",
            "ollama ollama",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn model_references() {
        let m = ModelRef::parse("llama3.1:8b-instruct-q4_0").expect("ok");
        assert_eq!(
            m.to_string(),
            "registry.ollama.ai/library/llama3.1:8b-instruct-q4_0"
        );
        assert_eq!(m.short(), "llama3.1:8b-instruct-q4_0");
        let m = ModelRef::parse("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M").expect("ok");
        assert_eq!(m.host, "hf.co");
        assert_eq!(m.namespace, "bartowski");
        assert_eq!(ModelRef::parse("smollm2").expect("ok").tag, "latest");
        assert_eq!(
            ModelRef::parse("me/mine:v1").expect("ok").short(),
            "me/mine:v1"
        );
        for bad in [
            "", "a/b/c/d", "-model", "model:", "model:-x", "mo del", "x/:t",
        ] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
