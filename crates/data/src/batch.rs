//! Batching for training over a stream: a seeded shuffle buffer ([`shuffled`]: order changes per seed, memory is
//! the buffer, not the dataset), fixed-size groups ([`batches`]) and [`collate`], which pads tokenised
//! conversations into one rectangular batch with the attention mask and the labels the loss reads (`-100`, the
//! ignore index of PyTorch's cross-entropy, on the prompt and the padding; labels are aligned with the inputs and
//! shifted by the loss, as in transformers).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The label of a position the loss ignores.
pub const IGNORE: i64 = -100;

/// `items` in a seeded pseudo-random order through a buffer of `capacity` (a buffer as large as the stream is a
/// full shuffle; 1 keeps the order). The same seed and stream give the same order.
pub fn shuffled<I: Iterator>(items: I, capacity: usize, seed: u64) -> Shuffled<I> {
    Shuffled {
        items,
        buffer: Vec::with_capacity(capacity.max(1)),
        capacity: capacity.max(1),
        rng: ChaCha8Rng::seed_from_u64(seed),
    }
}

/// See [`shuffled`].
pub struct Shuffled<I: Iterator> {
    items: I,
    buffer: Vec<I::Item>,
    capacity: usize,
    rng: ChaCha8Rng,
}

impl<I: Iterator> Iterator for Shuffled<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        while self.buffer.len() < self.capacity {
            match self.items.next() {
                Some(item) => self.buffer.push(item),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.buffer.len());
        Some(self.buffer.swap_remove(i))
    }
}

/// Groups of `size` consecutive items (the last one shorter, unless `drop_last`).
pub fn batches<I: Iterator>(items: I, size: usize, drop_last: bool) -> Batches<I> {
    Batches {
        items,
        size: size.max(1),
        drop_last,
    }
}

/// See [`batches`].
pub struct Batches<I> {
    items: I,
    size: usize,
    drop_last: bool,
}

impl<I: Iterator> Iterator for Batches<I> {
    type Item = Vec<I::Item>;

    fn next(&mut self) -> Option<Vec<I::Item>> {
        let batch: Vec<I::Item> = self.items.by_ref().take(self.size).collect();
        if batch.is_empty() || (self.drop_last && batch.len() < self.size) {
            None
        } else {
            Some(batch)
        }
    }
}

/// A tokenised conversation: the prompt (template, image placeholders, user text) then the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// All token ids, prompt first.
    pub ids: Vec<u32>,
    /// How many of `ids` are prompt (not trained on).
    pub prompt_len: usize,
}

/// A padded batch, row-major `[rows, len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collated {
    /// Sequences.
    pub rows: usize,
    /// Padded length (the longest sequence, or `max_len`).
    pub len: usize,
    /// Token ids, `pad_id` after each sequence's end.
    pub input_ids: Vec<u32>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
    /// The token id where it is trained on (the target), [`IGNORE`] elsewhere.
    pub labels: Vec<i64>,
    /// Target tokens in the batch (the loss's denominator).
    pub target_tokens: usize,
}

/// Pads `sequences` on the right to one length; a sequence longer than `max_len` is cut to it (its target loses
/// its end; the prompt, which holds the image, is never cut: a prompt longer than `max_len` is an error naming the
/// sequence).
pub fn collate(sequences: &[Encoded], pad_id: u32, max_len: usize) -> Result<Collated, String> {
    if let Some((i, s)) = sequences
        .iter()
        .enumerate()
        .find(|(_, s)| s.prompt_len > s.ids.len() || s.prompt_len >= max_len)
    {
        return Err(format!(
            "sequence {i}: prompt of {} tokens does not leave room for a target within {max_len} tokens ({} in all)",
            s.prompt_len,
            s.ids.len()
        ));
    }
    let len = sequences
        .iter()
        .map(|s| s.ids.len().min(max_len))
        .max()
        .unwrap_or(0);
    let rows = sequences.len();
    let mut collated = Collated {
        rows,
        len,
        input_ids: vec![pad_id; rows * len],
        attention_mask: vec![0; rows * len],
        labels: vec![IGNORE; rows * len],
        target_tokens: 0,
    };
    for (r, s) in sequences.iter().enumerate() {
        let n = s.ids.len().min(max_len);
        let row = r * len;
        collated.input_ids[row..row + n].copy_from_slice(&s.ids[..n]);
        collated.attention_mask[row..row + n].fill(1);
        for (label, &id) in collated.labels[row + s.prompt_len..row + n]
            .iter_mut()
            .zip(&s.ids[s.prompt_len..n])
        {
            *label = i64::from(id);
        }
        collated.target_tokens += n - s.prompt_len;
    }
    Ok(collated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_pads_masks_and_labels_by_hand() {
        let a = Encoded {
            ids: vec![10, 11, 12, 13, 14],
            prompt_len: 3,
        };
        let b = Encoded {
            ids: vec![20, 21, 22],
            prompt_len: 2,
        };
        let c = collate(&[a.clone(), b.clone()], 0, 100).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.rows, c.len, c.target_tokens), (2, 5, 3));
        assert_eq!(c.input_ids, vec![10, 11, 12, 13, 14, 20, 21, 22, 0, 0]);
        assert_eq!(c.attention_mask, vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(
            c.labels,
            vec![-100, -100, -100, 13, 14, -100, -100, 22, -100, -100]
        );
        // Cut to max_len: the target loses its end.
        let c = collate(&[a.clone(), b], 7, 4).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.len, c.target_tokens), (4, 2));
        assert_eq!(c.input_ids, vec![10, 11, 12, 13, 20, 21, 22, 7]);
        assert_eq!(c.labels, vec![-100, -100, -100, 13, -100, -100, 22, -100]);
        // A prompt that fills the budget is an error naming the sequence.
        let err = collate(&[a], 0, 3).unwrap_err();
        assert!(err.starts_with("sequence 0: prompt of 3 tokens"), "{err}");
    }

    #[test]
    fn shuffles_are_seeded_permutations_and_batches_cover_the_stream() {
        let order = |seed| shuffled(0..100, 16, seed).collect::<Vec<i32>>();
        let a = order(1);
        assert_eq!(a, order(1));
        assert_ne!(a, order(2));
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        // A buffer of 16 never moves an item more than 15 places earlier.
        for (position, &item) in a.iter().enumerate() {
            assert!(position as i32 >= item - 15, "{item} at {position}");
        }
        assert_eq!(
            shuffled(0..5, 1, 9).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );

        let sizes = |drop| batches(0..10, 4, drop).map(|b| b.len()).collect::<Vec<_>>();
        assert_eq!(sizes(false), vec![4, 4, 2]);
        assert_eq!(sizes(true), vec![4, 4]);
        assert_eq!(
            batches(0..10, 4, false).flatten().collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
    }
}
