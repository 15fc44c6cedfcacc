//! Text normalisation and matching shared by the metrics.

/// Lower-cases, maps typographic variants to ASCII (µ -> u... see below), and collapses whitespace.
/// `µ`/`μ` become `u` so that "µg" and "ug" compare equal; "mcg" is handled by the unit table of the field
/// metric, not here.
pub fn normalize(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| match c {
            'µ' | 'μ' => 'u',
            '\u{2018}' | '\u{2019}' => '\'',
            '\u{201C}' | '\u{201D}' => '"',
            '\u{2010}'..='\u{2015}' | '\u{2212}' => '-',
            c => c,
        })
        .flat_map(char::to_lowercase)
        .collect();
    mapped.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// True when `needle` occurs in `haystack` (both normalised) delimited by non-word characters on both sides:
/// "42" does not match inside "142", "PT" does not match inside "PTT"; "7.9 %" matches "HbA1c 7.9 % H".
pub fn contains_word(haystack: &str, needle: &str) -> bool {
    let (h, n) = (normalize(haystack), normalize(needle));
    if n.is_empty() {
        return false;
    }
    let mut start = 0;
    while let Some(pos) = h[start..].find(&n) {
        let at = start + pos;
        let end = at + n.len();
        let before_ok = h[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word(c) || !n.starts_with(is_word));
        let after_ok = h[end..]
            .chars()
            .next()
            .is_none_or(|c| !is_word(c) || !n.ends_with(is_word));
        // A decimal point continues a number: "7" must not match "7.9".
        let number_continues = n.ends_with(|c: char| c.is_ascii_digit())
            && h[end..].starts_with('.')
            && h[end + 1..].starts_with(|c: char| c.is_ascii_digit());
        if before_ok && after_ok && !number_continues {
            return true;
        }
        start = at + h[at..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// Lower-cased word tokens with punctuation stripped (for token F1).
pub fn tokens(text: &str) -> Vec<String> {
    normalize(text)
        .split(|c: char| !is_word(c) && c != '.' && c != '/')
        .map(|t| t.trim_matches('.'))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_boundaries_stop_the_legacy_traps() {
        assert!(!contains_word("glucose 142 mg/dL", "42"));
        assert!(contains_word(
            "potassium 4.2, sodium 142, BUN 42 mg/dL",
            "42"
        ));
        assert!(!contains_word("PTT 38 s", "PT"));
        assert!(contains_word("PT 14.2 s, PTT 38 s", "pt"));
        assert!(!contains_word("HbA1c 7.9 %", "7"));
        assert!(contains_word("HbA1c 7.9 % (H)", "7.9 %"));
        assert!(contains_word("B12 1000 µg IM", "1000 ug"));
        assert!(contains_word("Dx:  Type 2\\n diabetes", "type 2"));
        assert!(!contains_word("anything", ""));
    }

    #[test]
    fn tokens_drop_punctuation() {
        assert_eq!(
            tokens("Yes, the margin is CLEAR."),
            vec!["yes", "the", "margin", "is", "clear"]
        );
        assert_eq!(tokens("10 mg/dL."), vec!["10", "mg/dl"]);
    }
}
