//! Deterministic 80/10/10 splits by document: a document's samples always land in the same split, and the
//! assignment depends only on the seed and the document ids (a stable FNV-1a hash), not on order or platform.

use serde::{Deserialize, Serialize};

/// A split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// 80%.
    Train,
    /// 10%.
    Validation,
    /// 10%.
    Test,
}

impl std::str::FromStr for Split {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Self::Train),
            "validation" => Ok(Self::Validation),
            "test" => Ok(Self::Test),
            other => Err(format!("unknown split `{other}` (train, validation, test)")),
        }
    }
}

fn fnv1a(seed: u64, text: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Assigns each distinct document to a split: documents sorted by their seeded hash, the first 80% (rounded
/// down) to train, the next 10% (rounded) to validation, the rest to test. Returns one split per input id.
pub fn assign(documents: &[&str], seed: u64) -> Vec<Split> {
    let mut distinct: Vec<&str> = documents.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    distinct.sort_by_key(|d| (fnv1a(seed, d), *d));
    let n = distinct.len();
    let train = n * 8 / 10;
    let validation = (n as f64 * 0.1).round() as usize;
    let of = |d: &str| {
        let rank = distinct
            .binary_search_by_key(&(fnv1a(seed, d), d), |x| (fnv1a(seed, x), *x))
            .unwrap_or(0);
        if rank < train {
            Split::Train
        } else if rank < train + validation {
            Split::Validation
        } else {
            Split::Test
        }
    };
    documents.iter().map(|d| of(d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_counts_for_4896_documents() {
        // The reference pipeline's 431 + 4,465 = 4,896 samples split 3,916 / 490 / 490.
        let ids: Vec<String> = (0..4896).map(|i| format!("doc-{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let splits = assign(&refs, 42);
        let count = |s| splits.iter().filter(|&&x| x == s).count();
        assert_eq!(
            (
                count(Split::Train),
                count(Split::Validation),
                count(Split::Test)
            ),
            (3916, 490, 490)
        );
    }

    #[test]
    fn documents_never_straddle_and_order_does_not_matter() {
        let docs = ["a", "b", "a", "c", "d", "b", "e", "f", "g", "h", "i", "j"];
        let s = assign(&docs, 7);
        assert_eq!(s[0], s[2]);
        assert_eq!(s[1], s[5]);
        let mut reversed = docs;
        reversed.reverse();
        let r = assign(&reversed, 7);
        for (i, d) in docs.iter().enumerate() {
            let j = reversed.iter().position(|x| x == d).unwrap();
            assert_eq!(s[i], r[j], "{d}");
        }
        assert_ne!(
            assign(&docs, 7),
            assign(&docs, 8),
            "another seed, another split"
        );
        assert_eq!("validation".parse(), Ok(Split::Validation));
        assert_eq!(
            "dev".parse::<Split>(),
            Err("unknown split `dev` (train, validation, test)".to_string())
        );
    }
}
