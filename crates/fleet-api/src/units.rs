//! Quantities (`64Mi`, `8Gi`, `1000000`), durations (`500ms`, `30s`, `5m`, `12h`, `7d`) and
//! int-or-percent values (`3`, `25%`), each with a canonical text form.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Serialize, Serializer};

/// A number of bytes, written as a plain integer or with a suffix: binary `Ki Mi Gi Ti Pi Ei`
/// or decimal `k M G T P E` (as in Kubernetes). Fractions round up to whole bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(pub u64);

const BINARY: [(&str, u64); 6] = [
    ("Ei", 1 << 60),
    ("Pi", 1 << 50),
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
];
const DECIMAL: [(&str, u64); 6] = [
    ("E", 1_000_000_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("T", 1_000_000_000_000),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("k", 1_000),
];

impl Quantity {
    /// `n` mebibytes.
    pub const fn mebibytes(n: u64) -> Quantity {
        Quantity(n << 20)
    }

    /// `n` gibibytes.
    pub const fn gibibytes(n: u64) -> Quantity {
        Quantity(n << 30)
    }

    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses the text form; the error says what is allowed.
    pub fn parse(text: &str) -> Result<Quantity, String> {
        let help =
            "use a number of bytes or a number with a suffix Ki, Mi, Gi, Ti (e.g. 512Mi, 8Gi)";
        let s = text.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(split);
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return Err(format!("invalid quantity {text:?}: {help}"));
        }
        let multiplier = match suffix {
            "" => 1,
            _ => BINARY
                .iter()
                .chain(DECIMAL.iter())
                .find(|(name, _)| *name == suffix)
                .map(|(_, m)| *m)
                .ok_or_else(|| {
                    format!("invalid quantity {text:?}: unknown suffix {suffix:?}; {help}")
                })?,
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if frac.contains('.') {
            return Err(format!("invalid quantity {text:?}: {help}"));
        }
        let too_big = || format!("invalid quantity {text:?}: too large");
        let int: u64 = int.parse().map_err(|_| too_big())?;
        let mut bytes = int.checked_mul(multiplier).ok_or_else(too_big)?;
        if !frac.is_empty() {
            // Exact fixed-point: frac digits / 10^len, times the multiplier, rounded up.
            let digits = frac.len().min(18);
            let frac_num: u128 = frac[..digits].parse().map_err(|_| too_big())?;
            let denom = 10u128.pow(u32::try_from(digits).unwrap_or(18));
            let extra = (frac_num * u128::from(multiplier)).div_ceil(denom);
            bytes = bytes
                .checked_add(u64::try_from(extra).map_err(|_| too_big())?)
                .ok_or_else(too_big)?;
        }
        Ok(Quantity(bytes))
    }
}

impl fmt::Display for Quantity {
    /// The largest binary suffix that divides exactly, else plain bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 {
            for (name, m) in BINARY {
                if self.0.is_multiple_of(m) {
                    return write!(f, "{}{name}", self.0 / m);
                }
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Bytes: a plain integer, or a number with a suffix Ki, Mi, Gi, Ti, Pi, Ei (binary) or k, M, G, T, P, E (decimal), e.g. 512Mi, 8Gi.",
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"}
            ]
        })
    }
}

/// A span of time written as `500ms`, `30s`, `5m`, `12h`, `7d` or a sum such as `1h30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl Duration {
    /// `n` seconds.
    pub const fn secs(n: u64) -> Duration {
        Duration(std::time::Duration::from_secs(n))
    }

    /// `n` milliseconds.
    pub const fn millis(n: u64) -> Duration {
        Duration(std::time::Duration::from_millis(n))
    }

    /// The standard library duration.
    pub fn std(self) -> std::time::Duration {
        self.0
    }

    /// Parses the text form; the error says what is allowed.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let help = "use a number with a unit ms, s, m, h or d (e.g. 500ms, 30s, 5m, 12h, 7d)";
        let s = text.trim();
        if s == "0" {
            return Ok(Duration::default());
        }
        if s.is_empty() {
            return Err(format!("invalid duration {text:?}: {help}"));
        }
        let mut rest = s;
        let mut total_ms: u128 = 0;
        while !rest.is_empty() {
            let n = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (number, tail) = rest.split_at(n);
            let u = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(u);
            let Some(&(_, unit_ms)) = UNITS.iter().find(|(name, _)| *name == unit) else {
                return Err(if unit.is_empty() {
                    format!("invalid duration {text:?}: missing unit; {help}")
                } else {
                    format!("invalid duration {text:?}: unknown unit {unit:?}; {help}")
                });
            };
            let value: f64 = number
                .parse()
                .ok()
                .filter(|v: &f64| {
                    v.is_finite() && !number.starts_with('.') && !number.ends_with('.')
                })
                .ok_or_else(|| format!("invalid duration {text:?}: {help}"))?;
            total_ms += (value * unit_ms as f64).round() as u128;
            rest = tail;
        }
        let ms = u64::try_from(total_ms)
            .ok()
            .filter(|ms| *ms < 100 * 365 * 86_400_000)
            .ok_or_else(|| format!("invalid duration {text:?}: longer than 100 years"))?;
        Ok(Duration::millis(ms))
    }
}

impl fmt::Display for Duration {
    /// Canonical form: largest units first, e.g. `7d`, `1h30m`, `1s500ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return f.write_str("0s");
        }
        for (name, unit) in UNITS {
            if ms >= unit {
                write!(f, "{}{name}", ms / unit)?;
                ms %= unit;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration: numbers with units ms, s, m, h, d, e.g. 500ms, 30s, 5m, 12h, 7d, 1h30m; or 0.",
            "type": "string",
            "pattern": "^(0|([0-9]+(\\.[0-9]+)?(ms|s|m|h|d))+)$"
        })
    }
}

/// An absolute count or a percentage of some total (`3` or `25%`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IntOrPercent {
    /// An absolute count.
    Int(u32),
    /// A percentage, 0 to 100.
    Percent(u32),
}

impl IntOrPercent {
    /// Parses `"25%"` (or a plain integer in a string).
    pub fn parse(text: &str) -> Result<IntOrPercent, String> {
        let help = "use a non-negative integer or a percentage from 0% to 100% (e.g. 1 or 25%)";
        let s = text.trim();
        if let Some(p) = s.strip_suffix('%') {
            return match p.parse::<u32>() {
                Ok(p) if p <= 100 => Ok(IntOrPercent::Percent(p)),
                _ => Err(format!("invalid value {text:?}: {help}")),
            };
        }
        s.parse::<u32>()
            .map(IntOrPercent::Int)
            .map_err(|_| format!("invalid value {text:?}: {help}"))
    }

    /// The count this stands for out of `total`; percentages round up or down as asked.
    pub fn resolve(self, total: u32, round_up: bool) -> u32 {
        match self {
            IntOrPercent::Int(n) => n,
            IntOrPercent::Percent(p) => {
                let scaled = u64::from(total) * u64::from(p);
                let n = if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                u32::try_from(n).unwrap_or(u32::MAX)
            }
        }
    }

    /// Whether this is zero (as a count or as a percentage).
    pub fn is_zero(self) -> bool {
        matches!(self, IntOrPercent::Int(0) | IntOrPercent::Percent(0))
    }
}

impl fmt::Display for IntOrPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrPercent::Int(n) => write!(f, "{n}"),
            IntOrPercent::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for IntOrPercent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrPercent::Int(n) => s.serialize_u32(*n),
            IntOrPercent::Percent(_) => s.collect_str(self),
        }
    }
}

impl JsonSchema for IntOrPercent {
    fn schema_name() -> Cow<'static, str> {
        "IntOrPercent".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A count (e.g. 1) or a percentage (e.g. 25%).",
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^([0-9]|[1-9][0-9]|100)%$"}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        let ok = [
            ("0", 0),
            ("1000000", 1_000_000),
            ("64Mi", 64 << 20),
            ("8Gi", 8 << 30),
            ("1.5Gi", 3 << 29),
            ("1Ki", 1024),
            ("2k", 2000),
            ("1M", 1_000_000),
            ("0.5Ki", 512),
            ("0.3", 1),
            ("7Gi", 7 << 30),
        ];
        for (text, bytes) in ok {
            assert_eq!(Quantity::parse(text), Ok(Quantity(bytes)), "{text}");
        }
        for bad in [
            "",
            "12Qi",
            "Gi",
            "-1Gi",
            "1.2.3Mi",
            "8 GB",
            "1e9",
            ".5Gi",
            "99999999999Ei",
        ] {
            assert!(Quantity::parse(bad).is_err(), "{bad} should fail");
        }
        assert!(
            Quantity::parse("12Qi")
                .expect_err("bad")
                .contains("unknown suffix \"Qi\"")
        );
    }

    #[test]
    fn quantity_display_round_trips() {
        for text in ["8Gi", "64Mi", "1000000", "3Ki", "0", "1Ti"] {
            let q = Quantity::parse(text).expect("parses");
            assert_eq!(q.to_string(), text);
            assert_eq!(Quantity::parse(&q.to_string()), Ok(q));
        }
        assert_eq!(Quantity(1536 << 20).to_string(), "1536Mi");
    }

    #[test]
    fn durations() {
        let ok = [
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("12h", 43_200_000),
            ("7d", 604_800_000),
            ("1h30m", 5_400_000),
            ("1.5s", 1500),
            ("0", 0),
            ("0s", 0),
        ];
        for (text, ms) in ok {
            assert_eq!(Duration::parse(text), Ok(Duration::millis(ms)), "{text}");
        }
        for bad in ["", "5", "5x", "1w", "-1s", "s", "1.s", "m5", "1000000d"] {
            assert!(Duration::parse(bad).is_err(), "{bad} should fail");
        }
        assert!(
            Duration::parse("5")
                .expect_err("bad")
                .contains("missing unit")
        );
    }

    #[test]
    fn duration_display_is_canonical() {
        for (ms, text) in [
            (0, "0s"),
            (500, "500ms"),
            (90_000, "1m30s"),
            (604_800_000, "7d"),
            (1500, "1s500ms"),
        ] {
            assert_eq!(Duration::millis(ms).to_string(), text);
            assert_eq!(Duration::parse(text), Ok(Duration::millis(ms)));
        }
    }

    #[test]
    fn int_or_percent() {
        assert_eq!(IntOrPercent::parse("25%"), Ok(IntOrPercent::Percent(25)));
        assert_eq!(IntOrPercent::parse("3"), Ok(IntOrPercent::Int(3)));
        for bad in ["101%", "-1", "x%", "%", "1.5"] {
            assert!(IntOrPercent::parse(bad).is_err(), "{bad}");
        }
        // Kubernetes rounding: unavailable rounds down, surge rounds up.
        assert_eq!(IntOrPercent::Percent(25).resolve(58, false), 14);
        assert_eq!(IntOrPercent::Percent(25).resolve(58, true), 15);
        assert_eq!(IntOrPercent::Percent(10).resolve(5, false), 0);
        assert_eq!(IntOrPercent::Int(7).resolve(3, false), 7);
        assert!(IntOrPercent::Percent(0).is_zero());
    }
}
