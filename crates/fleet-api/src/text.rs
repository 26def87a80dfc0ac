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

/// Whether Go's `encoding/json` (which Ollama decodes requests with) takes the JSON object key
/// `key` for the struct field tagged `field` (ASCII, lower case): keys match without regard to
/// case, folding each character as Go does (`unicode.ToUpper(unicode.ToLower(r))`, or
/// `bytes.EqualFold` in older Go), under which `\u{212A}` (Kelvin sign) is `k`, `\u{17F}` (long s)
/// is `s`, and `\u{130}` and `\u{131}` (dotted and dotless I) are `i`.
pub fn go_json_key_is(key: &str, field: &str) -> bool {
    let mut key = key.chars();
    for want in field.chars() {
        let folded = match key.next() {
            Some('\u{212A}') => 'k',
            Some('\u{17F}') => 's',
            Some('\u{130}' | '\u{131}') => 'i',
            Some(c) => c.to_ascii_lowercase(),
            None => return false,
        };
        if folded != want {
            return false;
        }
    }
    key.next().is_none()
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

    #[test]
    fn json_keys_match_as_go_matches_them() {
        for key in [
            "keep_alive",
            "KEEP_ALIVE",
            "Keep_Alive",
            "\u{212A}eep_alive",
            "keep_al\u{130}ve",
            "keep_al\u{131}ve",
        ] {
            assert!(go_json_key_is(key, "keep_alive"), "{key}");
        }
        assert!(go_json_key_is("\u{17F}tream", "stream"));
        assert!(go_json_key_is("Options", "options"));
        for key in [
            "keep_alive ",
            "keepalive",
            "keep-alive",
            "k\u{e9}ep_alive",
            "",
        ] {
            assert!(!go_json_key_is(key, "keep_alive"), "{key}");
        }
    }
}
