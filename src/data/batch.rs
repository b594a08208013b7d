//! Collating [`Example`]s into [`Batch`] tensors: right-padded rows, or packed rows holding
//! several examples with per-example positions and segment ids.
use tch::{Device, Kind, Tensor};

use crate::data::tokenize::{Example, IGNORE_INDEX};
use crate::error::{Error, Result};

/// One batch of `B` rows of `T` tokens (all tensors `[B, T]` int64, on the CPU).
#[derive(Debug)]
pub struct Batch {
    /// Token ids; padding holds the pad id.
    pub input_ids: Tensor,
    /// Targets; [`IGNORE_INDEX`] (-100) where not trained, on padding and on the first token of
    /// every example. The loss shifts them: logits[t] predicts labels[t+1].
    pub labels: Tensor,
    /// 1 on tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// Position of each token within its example (restarting at 0 per packed example); 0 on
    /// padding.
    pub position_ids: Tensor,
    /// 1..=k for the k examples of a row, 0 on padding. Use [`block_diagonal_mask`] for the
    /// attention mask of packed rows.
    pub segment_ids: Tensor,
    /// The number of labels that are not [`IGNORE_INDEX`].
    pub n_target_tokens: i64,
    /// The number of tokens that are not padding (the attention mask's sum, known on the host, so
    /// counting them needs no device round trip).
    pub n_tokens: i64,
    /// Whether rows hold several examples (then attention must keep them apart: pass
    /// `segment_lengths` to [`crate::model::CausalLm::hidden_states_segments`], or use
    /// [`block_diagonal_mask`]).
    pub packed: bool,
    /// The lengths of the runs of the row-major flattened `[B * T]` tokens: each example, and each
    /// row's trailing padding (when it has any). They sum to `B * T`.
    pub segment_lengths: Vec<i64>,
}

fn tensor_2d(data: &[i64], rows: usize, cols: usize) -> Result<Tensor> {
    let t = Tensor::from_slice(data);
    Ok(t.f_reshape([rows as i64, cols as i64])?)
}

/// Builds a batch from rows, each a list of examples laid end to end.
fn collate(rows: &[Vec<&Example>], pad_id: i64, packed: bool) -> Result<Batch> {
    let width = rows
        .iter()
        .map(|r| r.iter().map(|e| e.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    if rows.is_empty() || width == 0 {
        return Err(Error::Input("cannot build a batch without tokens".into()));
    }
    let n = rows.len() * width;
    let mut input_ids = vec![pad_id; n];
    let mut labels = vec![IGNORE_INDEX; n];
    let mut mask = vec![0i64; n];
    let mut positions = vec![0i64; n];
    let mut segments = vec![0i64; n];
    let mut n_target_tokens = 0i64;
    let mut segment_lengths = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * width;
        for (k, ex) in row.iter().enumerate() {
            segment_lengths.push(ex.len() as i64);
            if ex.labels.len() != ex.len() {
                return Err(Error::Input(format!(
                    "example has {} tokens but {} labels",
                    ex.len(),
                    ex.labels.len()
                )));
            }
            for (p, (&id, &label)) in ex.input_ids.iter().zip(&ex.labels).enumerate() {
                input_ids[at] = id;
                labels[at] = if p == 0 { IGNORE_INDEX } else { label };
                n_target_tokens += i64::from(labels[at] != IGNORE_INDEX);
                mask[at] = 1;
                positions[at] = p as i64;
                segments[at] = k as i64 + 1;
                at += 1;
            }
        }
        let padding = (r + 1) * width - at;
        if padding > 0 {
            segment_lengths.push(padding as i64);
        }
    }
    let b = rows.len();
    Ok(Batch {
        input_ids: tensor_2d(&input_ids, b, width)?,
        labels: tensor_2d(&labels, b, width)?,
        attention_mask: tensor_2d(&mask, b, width)?,
        position_ids: tensor_2d(&positions, b, width)?,
        segment_ids: tensor_2d(&segments, b, width)?,
        n_target_tokens,
        n_tokens: mask.iter().sum(),
        packed,
        segment_lengths,
    })
}

/// A right-padded batch, one example a row, `T` = the longest example.
pub fn pad_batch(examples: &[&Example], pad_id: i64) -> Result<Batch> {
    let rows: Vec<Vec<&Example>> = examples.iter().map(|&e| vec![e]).collect();
    collate(&rows, pad_id, false)
}

/// A packed batch: each row holds the examples it lists, end to end, then right padding to the
/// longest row (a single row needs none).
pub fn packed_batch(rows: &[Vec<&Example>], pad_id: i64) -> Result<Batch> {
    collate(rows, pad_id, true)
}

/// Greedy first-fit packing of example lengths into rows of at most `max_len` tokens, in the
/// given order: each example goes into the first row with room, or a new row. Returns the
/// indices (into `lengths`) of each row.
pub fn pack_first_fit(lengths: &[usize], max_len: usize) -> Result<Vec<Vec<usize>>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    for (i, &len) in lengths.iter().enumerate() {
        if len > max_len {
            return Err(Error::Input(format!(
                "example {i} has {len} tokens, more than max_seq_length {max_len}"
            )));
        }
        match free.iter().position(|&f| f >= len) {
            Some(r) => {
                rows[r].push(i);
                free[r] -= len;
            }
            None => {
                rows.push(vec![i]);
                free.push(max_len - len);
            }
        }
    }
    Ok(rows)
}

/// The attention mask of (packed) rows from their `[B, T]` segment ids: a bool `[B, 1, T, T]`
/// tensor, true where the key is at or before the query and in the same nonzero segment, and on
/// the diagonal (so no row, padding included, is all false).
pub fn block_diagonal_mask(segment_ids: &Tensor) -> Result<Tensor> {
    let size = segment_ids.size();
    if size.len() != 2 {
        return Err(Error::Shape(format!(
            "segment_ids must be [B, T], got {size:?}"
        )));
    }
    let t = size[1];
    let device = segment_ids.device();
    let q = segment_ids.f_unsqueeze(2)?; // [B, T, 1]
    let k = segment_ids.f_unsqueeze(1)?; // [B, 1, T]
    let same = q.f_eq_tensor(&k)?.f_logical_and(&q.f_ne(0)?)?;
    let causal = Tensor::f_ones([t, t], (Kind::Bool, device))?.f_tril(0)?;
    let diag = Tensor::f_eye(t, (Kind::Bool, device))?;
    let mask = same.f_logical_and(&causal)?.f_logical_or(&diag)?;
    Ok(mask.f_unsqueeze(1)?)
}

impl Batch {
    /// The batch on `device` (an error, not a panic, when the copy fails, e.g. out of memory).
    pub fn to_device(&self, device: Device) -> Result<Batch> {
        Ok(Batch {
            input_ids: self.input_ids.f_to_device(device)?,
            labels: self.labels.f_to_device(device)?,
            attention_mask: self.attention_mask.f_to_device(device)?,
            position_ids: self.position_ids.f_to_device(device)?,
            segment_ids: self.segment_ids.f_to_device(device)?,
            n_target_tokens: self.n_target_tokens,
            n_tokens: self.n_tokens,
            packed: self.packed,
            segment_lengths: self.segment_lengths.clone(),
        })
    }

    /// `[B, T]`.
    pub fn shape(&self) -> (i64, i64) {
        let s = self.input_ids.size();
        (s[0], s[1])
    }
}

#[cfg(test)]
pub(crate) fn rows_of(t: &Tensor) -> Vec<Vec<i64>> {
    let (b, w) = (t.size()[0], t.size()[1]);
    let flat: Vec<i64> = Vec::<i64>::try_from(t.reshape([-1])).unwrap();
    (0..b as usize)
        .map(|r| flat[r * w as usize..(r + 1) * w as usize].to_vec())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[i64], labels: &[i64]) -> Example {
        Example {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
        }
    }

    const M: i64 = IGNORE_INDEX;

    #[test]
    fn batch_padded_right() {
        let a = ex(&[5, 6, 7], &[M, 6, 7]);
        let b = ex(&[8, 9], &[M, 9]);
        let batch = pad_batch(&[&a, &b], 0).unwrap();
        assert_eq!(batch.shape(), (2, 3));
        assert_eq!(
            rows_of(&batch.input_ids),
            vec![vec![5, 6, 7], vec![8, 9, 0]]
        );
        assert_eq!(rows_of(&batch.labels), vec![vec![M, 6, 7], vec![M, 9, M]]);
        assert_eq!(
            rows_of(&batch.attention_mask),
            vec![vec![1, 1, 1], vec![1, 1, 0]]
        );
        assert_eq!(
            rows_of(&batch.position_ids),
            vec![vec![0, 1, 2], vec![0, 1, 0]]
        );
        assert_eq!(
            rows_of(&batch.segment_ids),
            vec![vec![1, 1, 1], vec![1, 1, 0]]
        );
        assert_eq!(batch.n_target_tokens, 3);
        assert_eq!(batch.n_tokens, 5);
        assert!(!batch.packed);
        assert_eq!(batch.segment_lengths, vec![3, 2, 1]);
        assert!(pad_batch(&[], 0).is_err());
    }

    #[test]
    fn batch_packed_positions_segments_labels() {
        // Labels of each example's first token are masked even if the example trains them.
        let a = ex(&[1, 2, 3], &[1, 2, 3]);
        let b = ex(&[4, 5], &[4, 5]);
        let c = ex(&[6, 7, 8, 9], &[M, M, 8, 9]);
        let batch = packed_batch(&[vec![&a, &b], vec![&c]], 0).unwrap();
        assert_eq!(batch.shape(), (2, 5));
        assert_eq!(
            rows_of(&batch.input_ids),
            vec![vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9, 0]]
        );
        // a, b (row 0, full); c and one padding token (row 1).
        assert_eq!(batch.segment_lengths, vec![3, 2, 4, 1]);
        assert_eq!(
            rows_of(&batch.labels),
            vec![vec![M, 2, 3, M, 5], vec![M, M, 8, 9, M]]
        );
        assert_eq!(
            rows_of(&batch.position_ids),
            vec![vec![0, 1, 2, 0, 1], vec![0, 1, 2, 3, 0]]
        );
        assert_eq!(
            rows_of(&batch.segment_ids),
            vec![vec![1, 1, 1, 2, 2], vec![1, 1, 1, 1, 0]]
        );
        assert_eq!(batch.n_target_tokens, 5);
    }

    #[test]
    fn batch_first_fit_packing() {
        let rows = pack_first_fit(&[5, 4, 3, 2, 6, 1], 8).unwrap();
        assert_eq!(rows, vec![vec![0, 2], vec![1, 3, 5], vec![4]]);
        assert!(pack_first_fit(&[9], 8).is_err());
    }

    #[test]
    fn batch_block_diagonal_mask_blocks_cross_example_attention() {
        let seg = Tensor::from_slice(&[1i64, 1, 2, 2, 0]).reshape([1, 5]);
        let mask = block_diagonal_mask(&seg).unwrap();
        assert_eq!(mask.size(), vec![1, 1, 5, 5]);
        assert_eq!(mask.kind(), Kind::Bool);
        let m = rows_of(&mask.reshape([5, 5]).to_kind(Kind::Int64));
        assert_eq!(
            m,
            vec![
                vec![1, 0, 0, 0, 0],
                vec![1, 1, 0, 0, 0],
                vec![0, 0, 1, 0, 0],
                vec![0, 0, 1, 1, 0],
                vec![0, 0, 0, 0, 1],
            ]
        );
        assert!(block_diagonal_mask(&Tensor::from_slice(&[1i64])).is_err());
    }
}
