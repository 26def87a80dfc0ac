//! Registry access settings: Docker-style credentials, plain-HTTP registries, mirrors. Pure.

use std::collections::BTreeMap;

/// How to reach registries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryOptions {
    /// `host:port` of registries spoken to over plain HTTP (only those listed).
    pub insecure: Vec<String>,
    /// Registry → mirror URL (`docker.io` → `http://127.0.0.1:5000`): pulls go to the mirror.
    pub mirrors: BTreeMap<String, String>,
    /// Registry → (user, password).
    pub auths: BTreeMap<String, (String, String)>,
}

/// Where to fetch an image from: the registry (or its mirror) and whether it speaks plain HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// `host[:port]` to connect to.
    pub host: String,
    /// Plain HTTP.
    pub insecure: bool,
    /// Credentials, if any.
    pub auth: Option<(String, String)>,
}

impl RegistryOptions {
    /// The source of images of `registry` (a normalised reference's domain).
    pub fn source(&self, registry: &str) -> Source {
        if let Some(url) = self.mirrors.get(registry) {
            let (insecure, rest) = match url.split_once("://") {
                Some(("http", rest)) => (true, rest),
                Some((_, rest)) => (false, rest),
                None => (self.insecure.iter().any(|h| h == url), url.as_str()),
            };
            let host = rest.trim_end_matches('/').to_string();
            let auth = self.auths.get(&host).cloned();
            return Source {
                insecure: insecure || self.insecure.contains(&host),
                host,
                auth,
            };
        }
        // oci-client maps docker.io to Docker Hub's registry host itself.
        let host = registry.to_string();
        Source {
            insecure: self.insecure.iter().any(|h| h == registry),
            auth: self
                .auths
                .get(registry)
                .or_else(|| {
                    (registry == "docker.io")
                        .then(|| self.auths.get("https://index.docker.io/v1/"))
                        .flatten()
                })
                .cloned(),
            host,
        }
    }
}

/// Credentials from a Docker `config.json` (`{"auths": {"host": {"auth": base64("user:pass")}}}`,
/// or `username`/`password` fields). Credential helpers are not supported.
pub fn parse_docker_config(text: &str) -> Result<BTreeMap<String, (String, String)>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let mut out = BTreeMap::new();
    for (host, entry) in v["auths"].as_object().into_iter().flatten() {
        let host = host
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let host = if host == "index.docker.io/v1" {
            "docker.io".to_string()
        } else {
            host
        };
        if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
            out.insert(host, (u.to_string(), p.to_string()));
        } else if let Some(auth) = entry["auth"].as_str() {
            let decoded =
                base64_decode(auth).ok_or_else(|| format!("auth of {host} is not base64"))?;
            let text =
                String::from_utf8(decoded).map_err(|_| format!("auth of {host} is not UTF-8"))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| format!("auth of {host} is not user:password"))?;
            out.insert(host, (u.to_string(), p.to_string()));
        }
    }
    Ok(out)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.trim().bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        buf = (buf << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials() {
        let cfg = r#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
            "127.0.0.1:5000": {"username": "u", "password": "p:w"},
            "ghcr.io": {}
        }}"#;
        let auths = parse_docker_config(cfg).expect("parses");
        assert_eq!(auths["docker.io"], ("user".to_string(), "pass".to_string()));
        assert_eq!(
            auths["127.0.0.1:5000"],
            ("u".to_string(), "p:w".to_string())
        );
        assert!(!auths.contains_key("ghcr.io"));
        assert!(parse_docker_config("{").is_err());
        assert!(parse_docker_config(r#"{"auths": {"x": {"auth": "!!"}}}"#).is_err());
    }

    #[test]
    fn sources_mirrors_and_insecure() {
        let opts = RegistryOptions {
            insecure: vec!["127.0.0.1:5000".into()],
            mirrors: [("docker.io".to_string(), "http://127.0.0.1:5001".to_string())].into(),
            auths: [("ghcr.io".to_string(), ("a".to_string(), "b".to_string()))].into(),
        };
        assert_eq!(
            opts.source("docker.io"),
            Source {
                host: "127.0.0.1:5001".into(),
                insecure: true,
                auth: None
            }
        );
        assert!(opts.source("127.0.0.1:5000").insecure);
        assert!(
            !opts.source("quay.io").insecure,
            "plain HTTP only when listed"
        );
        assert_eq!(opts.source("ghcr.io").auth, Some(("a".into(), "b".into())));
        assert_eq!(
            RegistryOptions::default().source("docker.io").host,
            "docker.io"
        );
    }
}
