//! The Prometheus text format (version 0.0.4), written in one place. Every figure on the agent's
//! `/metrics` goes through an [`Exposition`]: it declares each family once (`# HELP`, `# TYPE`),
//! escapes label values, and renders histograms; [`check`] reads an exposition back strictly
//! (the tests' stand-in for `promtool check metrics`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the agent restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Label names and values of one sample (names are fixed per family, values are escaped).
pub type Labels<'a> = &'a [(&'static str, &'a str)];

/// Something that adds families to the agent's `/metrics` (the gateway does).
pub trait Expose: Send + Sync {
    /// Appends its families to `out`.
    fn expose(&self, out: &mut Exposition);
}

/// An exposition being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Declares a family: its help text and type. Its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.as_str()
        );
    }

    /// One sample of the family declared last.
    pub fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        self.out.push(' ');
        write_value(&mut self.out, value);
        self.out.push('\n');
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The samples of histogram `h` (declared with [`Exposition::family`]).
    pub fn histogram(&mut self, name: &str, labels: Labels<'_>, h: &Histogram) {
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(h.counts) {
            cumulative += n;
            self.bucket(name, labels, &bound.to_string(), cumulative);
        }
        self.bucket(name, labels, "+Inf", h.count);
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }

    fn bucket(&mut self, name: &str, labels: Labels<'_>, le: &str, n: u64) {
        let _ = write!(self.out, "{name}_bucket");
        write_labels(&mut self.out, labels, Some(le));
        let _ = writeln!(self.out, " {n}");
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: Labels<'_>, le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let le = le.map(|v| ("le", v));
    for (i, (name, value)) in labels.iter().copied().chain(le).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

fn write_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Bucket bounds (seconds) of the latency histograms: 5 ms to 10 min.
pub const BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// A latency histogram over [`BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative).
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Counts one observation of `seconds`.
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// One sample read back by [`check`].
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum` or `_count` for histograms).
    pub name: String,
    /// Labels, unescaped.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Reads an exposition strictly: every sample belongs to a family declared before it (once,
/// with HELP and TYPE), names and labels are well formed, values parse, no series appears
/// twice, and histogram buckets are cumulative and end with `+Inf` equal to `_count`.
pub fn check(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |why: String| format!("line {}: {why}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !helped.insert(name.to_string()) {
                return Err(at("HELP given twice".into()));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap_or_default(), parts.next());
            if !matches!(kind, Some("counter" | "gauge" | "histogram")) || parts.next().is_some() {
                return Err(at("bad TYPE".into()));
            }
            if types
                .insert(name.into(), kind.unwrap_or_default().into())
                .is_some()
            {
                return Err(at("TYPE given twice".into()));
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let sample = parse_sample(line).map_err(at)?;
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                let base = sample.name.strip_suffix(s)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(&sample.name);
        if !types.contains_key(family) || !helped.contains(family) {
            return Err(at(format!("sample of undeclared family {family}")));
        }
        if !seen.insert(format!("{}{:?}", sample.name, sample.labels)) {
            return Err(at("series given twice".into()));
        }
        samples.push(sample);
    }
    check_histograms(&types, &samples)?;
    Ok(samples)
}

fn check_histograms(types: &BTreeMap<String, String>, samples: &[Sample]) -> Result<(), String> {
    for (name, _) in types.iter().filter(|(_, k)| *k == "histogram") {
        // Buckets by series (labels without `le`), in order.
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == format!("{name}_bucket"))
        {
            let mut labels = s.labels.clone();
            let le = labels
                .remove("le")
                .ok_or(format!("{name}: a bucket without le"))?;
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().map_err(|_| format!("{name}: bad le {le}"))?
            };
            series
                .entry(format!("{labels:?}"))
                .or_default()
                .push((le, s.value));
        }
        for (labels, buckets) in series {
            let monotonic = buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
            let last = buckets.last().copied().unwrap_or((0.0, 0.0));
            let count = samples
                .iter()
                .find(|s| s.name == format!("{name}_count") && format!("{:?}", s.labels) == labels)
                .map(|s| s.value);
            if !monotonic || last.0 != f64::INFINITY || count != Some(last.1) {
                return Err(format!(
                    "{name}{labels}: buckets not cumulative up to +Inf = count"
                ));
            }
        }
    }
    Ok(())
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if c == '}' {
                end = Some(i);
                break;
            }
            if c == ',' {
                continue;
            }
            let start = i;
            let mut eq = None;
            for (j, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(j);
                    break;
                }
            }
            let eq = eq.ok_or("a label without =")?;
            let label = &body[start..eq];
            if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {label:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("a label value without quotes".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some('\n') | None => return Err("an unterminated label value".into()),
                    Some(c) => value.push(c),
                }
            }
            if labels.insert(label.to_string(), value).is_some() {
                return Err(format!("label {label} given twice"));
            }
        }
        let end = end.ok_or("labels without }")?;
        rest = &body[end + 1..];
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exposition_reads_back() {
        let mut e = Exposition::new();
        e.family("x_total", Kind::Counter, "Things.\nMore.");
        e.sample("x_total", &[("fleet", "a\"b\\c\nd"), ("code", "200")], 3.0);
        e.single("up", Kind::Gauge, "Up.", 1.0);
        let mut h = Histogram::default();
        for s in [0.001, 0.2, 0.2, 7.0, 1e6] {
            h.observe(s);
        }
        e.family("lat_seconds", Kind::Histogram, "Latency.");
        e.histogram("lat_seconds", &[("fleet", "f")], &h);
        e.histogram("lat_seconds", &[("fleet", "g")], &Histogram::default());
        let text = e.finish();
        let samples = check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(samples[0].labels["fleet"], "a\"b\\c\nd", "escaped and back");
        let bucket = |le: &str| {
            samples
                .iter()
                .find(|s| {
                    s.name == "lat_seconds_bucket"
                        && s.labels["le"] == le
                        && s.labels["fleet"] == "f"
                })
                .map(|s| s.value)
        };
        assert_eq!(
            (
                bucket("0.005"),
                bucket("0.25"),
                bucket("10"),
                bucket("+Inf")
            ),
            (Some(1.0), Some(3.0), Some(4.0), Some(5.0)),
            "cumulative buckets; 1e6 s only in +Inf"
        );
    }

    #[test]
    fn check_refuses_what_prometheus_would() {
        let bad = [
            "x 1",                                                // undeclared
            "# HELP x X.\n# TYPE x gauge\nx{a=\"1} 1",            // unterminated
            "# HELP x X.\n# TYPE x gauge\nx{a=1} 1",              // unquoted
            "# HELP x X.\n# TYPE x gauge\nx 1\nx 2",              // twice
            "# HELP x X.\n# TYPE x gauge\nx one",                 // value
            "# HELP x X.\n# TYPE x gauge\n# TYPE x counter\nx 1", // TYPE twice
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1",
        ];
        for text in bad {
            assert!(check(text).is_err(), "{text}");
        }
    }
}
