//! The key/value cache of incremental decoding: per layer, keys and values `[B, kv_heads, S, D]`.
use tch::Tensor;

/// Cached keys and values of every layer.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    len: i64,
}

impl KvCache {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| (Tensor::new(), Tensor::new()))
                .collect(),
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn advance(&mut self, t: i64) {
        self.len += t;
    }
}
