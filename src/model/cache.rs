//! The key/value cache of incremental decoding: per layer, keys and values `[B, kv_heads, S, D]`
//! held in buffers with room for more positions, so that a decoding step writes its one new
//! position in place instead of copying the whole cache (`cat`) and allocating a new one.
use crate::error::Result;
use tch::Tensor;

/// The smallest buffer a layer allocates (positions): a short prompt's first steps then grow it
/// once or twice, not every step.
const MIN_CAPACITY: i64 = 64;

/// One layer's keys and values: buffers `[B, kv_heads, capacity, D]` whose first `len`
/// positions (the cache's) are filled.
#[derive(Debug, Default)]
pub struct LayerCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

impl LayerCache {
    /// Writes `k` and `v` `[B, kv_heads, T, D]` after the `past` cached positions and returns
    /// views of all `past + T` of them. A buffer too small for them is replaced by one of at
    /// least twice its size (or `reserve` positions, when more), the cached positions copied over.
    pub(crate) fn append(
        &mut self,
        past: i64,
        reserve: i64,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let total = past + k.size()[2];
        let keys = Self::write(&mut self.keys, past, total, reserve, k)?;
        let values = Self::write(&mut self.values, past, total, reserve, v)?;
        Ok((keys, values))
    }

    fn write(
        buf: &mut Option<Tensor>,
        past: i64,
        total: i64,
        reserve: i64,
        x: &Tensor,
    ) -> Result<Tensor> {
        let capacity = buf.as_ref().map_or(0, |b| b.size()[2]);
        if total > capacity {
            let size = x.size();
            let grown = total.max(2 * capacity).max(reserve).max(MIN_CAPACITY);
            let fresh = Tensor::f_empty(
                [size[0], size[1], grown, size[3]],
                (x.f_kind()?, x.device()),
            )?;
            if let Some(old) = buf.as_ref().filter(|_| past > 0) {
                fresh
                    .f_narrow(2, 0, past)?
                    .f_copy_(&old.f_narrow(2, 0, past)?)?;
            }
            *buf = Some(fresh);
        }
        let Some(b) = buf.as_ref() else {
            unreachable!("the buffer was allocated above");
        };
        b.f_narrow(2, past, total - past)?.f_copy_(x)?;
        Ok(b.f_narrow(2, 0, total)?)
    }
}

/// Cached keys and values of every layer.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    len: i64,
    /// Positions the buffers are first allocated for (the caller's expected total length).
    reserve: i64,
}

impl KvCache {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self::with_capacity(n_layers, 0)
    }

    /// An empty cache whose buffers, once allocated, hold `positions` positions before growing
    /// (a generation's prompt plus its new tokens).
    pub fn with_capacity(n_layers: usize, positions: i64) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerCache::default()).collect(),
            len: 0,
            reserve: positions,
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

    /// Layer `i`'s part, the cached length and the positions to reserve, for a forward.
    pub(crate) fn layer(&mut self, i: usize) -> LayerSlot<'_> {
        LayerSlot {
            cache: &mut self.layers[i],
            past: self.len,
            reserve: self.reserve,
        }
    }

    pub(crate) fn advance(&mut self, t: i64) {
        self.len += t;
    }
}

/// What one layer's attention appends to: its buffers and where the new positions go.
pub struct LayerSlot<'a> {
    cache: &'a mut LayerCache,
    past: i64,
    reserve: i64,
}

impl LayerSlot<'_> {
    /// Appends `k` and `v` `[B, kv_heads, T, D]`; returns every cached position's keys and values.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.cache.append(self.past, self.reserve, k, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Appending step by step, across buffer growth, holds what one `cat` of the steps holds.
    #[test]
    fn appends_equal_one_concatenation() {
        let mut cache = KvCache::with_capacity(1, 3);
        let steps: Vec<Tensor> = [2, 1, 1, 70, 1]
            .iter()
            .map(|&t| Tensor::randn([2, 3, t, 4], (Kind::Float, Device::Cpu)))
            .collect();
        for (n, x) in steps.iter().enumerate() {
            let neg = x.neg();
            let (k, v) = cache.layer(0).append(x, &neg).unwrap();
            cache.advance(x.size()[2]);
            let want = Tensor::cat(&steps[..=n], 2);
            assert_eq!(k.size(), want.size());
            assert!(k.equal(&want) && v.equal(&want.neg()), "step {n}");
        }
        assert_eq!(cache.len(), 75);
    }
}
