//! Text from elsewhere made safe to print: control characters (terminal escapes, carriage
//! returns, NULs, bidi overrides) are shown escaped, so a device or a client cannot rewrite
//! an operator's terminal or forge log lines with what it reports.

use std::borrow::Cow;

/// `s` with every control character (and Unicode bidirectional control) written as an
/// escape (`\u{1b}`, `\r`); `s` itself when there are none. Tabs are kept.
pub fn escaped(s: &str) -> Cow<'_, str> {
    let bad = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(
                c,
                '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
            )
    };
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        for (raw, shown) in [
            ("plain text", "plain text"),
            ("tab\there", "tab\there"),
            ("\u{1b}[2Jgone", "\\u{1b}[2Jgone"),
            ("fake\r\nline", "fake\\r\\nline"),
            ("nul\0", "nul\\u{0}"),
            ("a\u{202e}b", "a\\u{202e}b"),
            ("rtl\u{200f}mark", "rtl\\u{200f}mark"),
            ("ünïcode", "ünïcode"),
        ] {
            assert_eq!(escaped(raw), shown, "{raw:?}");
        }
        assert!(matches!(escaped("ok"), Cow::Borrowed(_)));
    }
}
