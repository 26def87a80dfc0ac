//! Text from untrusted sources (manifests, containers, instances) made safe to show and store:
//! bounded in length, free of control characters.

use std::borrow::Cow;

/// `s` cut to at most `max` bytes (on a character boundary), with `…` when cut.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &s[..end]))
}

/// `s` with control characters (escape sequences, NUL, newlines, ...) written as `\u{..}`
/// escapes, so text from a container cannot move a terminal's cursor or forge lines.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_cuts_on_char_boundaries() {
        assert_eq!(clip("hello", 5), "hello");
        assert_eq!(clip("hello world", 8), "hello…");
        let cut = clip("ééééé", 6);
        assert!(cut.len() <= 6 && cut.ends_with('…'), "{cut}");
    }

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\u{a}");
        assert_eq!(printable("nul\0"), "nul\\u{0}");
    }
}
