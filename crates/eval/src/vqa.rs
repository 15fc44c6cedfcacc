//! Visual question answering metrics: PathVQA's closed (yes/no) accuracy, open-ended exact match and token F1
//! (SQuAD-style), and DocVQA's ANLS (average normalised Levenshtein similarity, threshold 0.5).

use crate::text::{normalize, tokens};

/// For a yes/no question: does the prediction's first word give the expected answer?
pub fn yes_no_correct(prediction: &str, expected: &str) -> Option<bool> {
    let expected = normalize(expected);
    if expected != "yes" && expected != "no" {
        return None;
    }
    Some(tokens(prediction).first().is_some_and(|w| *w == expected))
}

/// Equal after normalisation and punctuation removal.
pub fn exact_match(prediction: &str, expected: &str) -> bool {
    tokens(prediction) == tokens(expected)
}

/// Harmonic mean of token precision and recall (tokens counted with multiplicity).
pub fn token_f1(prediction: &str, expected: &str) -> f64 {
    let (p, e) = (tokens(prediction), tokens(expected));
    if p.is_empty() || e.is_empty() {
        return f64::from(u8::from(p == e));
    }
    let mut remaining = e.clone();
    let mut common = 0;
    for t in &p {
        if let Some(i) = remaining.iter().position(|r| r == t) {
            remaining.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / e.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

fn levenshtein(a: &[char], b: &[char]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// ANLS of one answer against its accepted answers: `max(1 - NL)` where NL is the Levenshtein distance over the
/// longer length of the lower-cased, whitespace-collapsed strings, and 0 when NL >= 0.5.
pub fn anls(prediction: &str, accepted: &[&str]) -> f64 {
    let p: Vec<char> = normalize(prediction).chars().collect();
    accepted
        .iter()
        .map(|g| {
            let g: Vec<char> = normalize(g).chars().collect();
            let longest = p.len().max(g.len());
            if longest == 0 {
                return 1.0;
            }
            let nl = levenshtein(&p, &g) as f64 / longest as f64;
            if nl < 0.5 { 1.0 - nl } else { 0.0 }
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_no_reads_the_first_word() {
        assert_eq!(
            yes_no_correct("Yes, the margin is clear.", "yes"),
            Some(true)
        );
        assert_eq!(yes_no_correct("No.", "yes"), Some(false));
        assert_eq!(yes_no_correct("It is not clear", "no"), Some(false));
        assert_eq!(yes_no_correct("anything", "adenocarcinoma"), None);
    }

    #[test]
    fn exact_match_and_f1_hand_worked() {
        assert!(exact_match(
            "Squamous cell carcinoma.",
            "squamous  cell carcinoma"
        ));
        assert!(!exact_match(
            "squamous carcinoma",
            "squamous cell carcinoma"
        ));
        // prediction 2 tokens, truth 3, 2 common: P = 1, R = 2/3, F1 = 0.8.
        assert!((token_f1("squamous carcinoma", "squamous cell carcinoma") - 0.8).abs() < 1e-12);
        assert_eq!(token_f1("benign", "malignant"), 0.0);
        assert_eq!(token_f1("", ""), 1.0);
    }

    #[test]
    fn anls_hand_worked() {
        assert_eq!(anls("Metformin", &["metformin"]), 1.0);
        // "metformn" vs "metformin": distance 1 over 9 -> 1 - 1/9.
        assert!((anls("metformn", &["metformin", "glucophage"]) - (1.0 - 1.0 / 9.0)).abs() < 1e-12);
        // Too far (NL >= 0.5) scores 0.
        assert_eq!(anls("aspirin", &["metformin"]), 0.0);
    }
}
