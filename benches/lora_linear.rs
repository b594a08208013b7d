//! Criterion benches of the Rust LoRA linear (`loratch::lora::LoraLinear`) against the same
//! computation written inline with plain tch ops ("raw_tch"), fp32 on the CPU, 256 rows unless
//! said, r=16, alpha=32, no bias (as in the SmolLM2 projections):
//!
//! - `forward`: no-grad forward, 576x576 (SmolLM2 hidden), 576x1536 (MLP up), 1024x1024 (the
//!   shape of the Python bench against PEFT);
//! - `forward_backward`: forward, `sum().backward()`, the grads of A and B, same shapes;
//! - `forward_1row`: no-grad forward of a single row (a decode step), 576x576;
//! - `merge`: no-grad forward before and after `LoraLinear::merge`, 576x576 (raw_tch_merged is
//!   `x W'^T` alone);
//! - `causal_attention`: forward and backward of the blocked causal attention the trainer runs
//!   (`loratch::ops::attention::blocked`, blocks of 64) against libtorch's
//!   `scaled_dot_product_attention` (its CPU flash attention), SmolLM2-135M's attention shape:
//!   9 query heads over 3 key/value heads, 256 positions, head dim 64.
//!
//! Function ids are `loratch<suffix>` and `raw_tch<suffix>` with the shape as the parameter, so
//! `benches/criterion_summary.py` can pair them: `cargo bench --bench lora_linear`.
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use loratch::lora::{LoraConfig, LoraLinear};
use std::hint::black_box;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const ROWS: i64 = 256;
const RANK: i64 = 16;
const ALPHA: f64 = 32.0;
/// `(in_features, out_features)`.
const SHAPES: [(i64, i64); 3] = [(576, 576), (576, 1536), (1024, 1024)];

/// A layer with a non-zero adapter (B random) and its `[ROWS, in_f]` input.
fn setup(in_f: i64, out_f: i64) -> (LoraLinear, Tensor) {
    setup_rows(in_f, out_f, ROWS)
}

fn setup_rows(in_f: i64, out_f: i64, rows: i64) -> (LoraLinear, Tensor) {
    tch::manual_seed(0);
    let config = LoraConfig::new(RANK, ALPHA, 0.0, false).expect("LoRA config");
    let mut layer = LoraLinear::new(in_f, out_f, config, false, Kind::Float, Device::Cpu)
        .expect("LoraLinear::new");
    tch::no_grad(|| {
        let _ = layer.adapter_mut().b.normal_(0.0, 0.02);
    });
    let x = Tensor::randn([rows, in_f], (Kind::Float, Device::Cpu));
    (layer, x)
}

/// The reference: `x W^T + scaling * (x A^T) B^T` in plain tch ops, on the layer's own tensors.
fn raw_forward(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Tensor {
    x.linear::<&Tensor>(w, None) + x.linear::<&Tensor>(a, None).linear::<&Tensor>(b, None) * scaling
}

fn shape_id(in_f: i64, out_f: i64) -> String {
    format!("{in_f}x{out_f}")
}

/// Pins the thread count to what libtorch already uses (it is not changed) and reports it.
fn pin_threads() {
    let threads = tch::get_num_threads();
    tch::set_num_threads(threads);
    eprintln!(
        "lora_linear: torch threads {threads}, rows {ROWS}, r={RANK}, alpha={ALPHA}, fp32 CPU"
    );
}

/// The no-grad forward of `layer` (`loratch{suffix}`) against [`raw_forward`] on the layer's own
/// tensors (`raw_tch{suffix}`), both on `x`.
fn nograd_pair(
    group: &mut BenchmarkGroup<WallTime>,
    suffix: &str,
    id: &str,
    layer: &LoraLinear,
    x: &Tensor,
) {
    let scaling = layer.config().scaling();
    let (w, a, b) = (layer.weight(), &layer.adapter().a, &layer.adapter().b);
    group.bench_with_input(
        BenchmarkId::new(format!("loratch{suffix}"), id),
        x,
        |bch, x| {
            bch.iter(|| tch::no_grad(|| black_box(layer.forward(black_box(x)).expect("forward"))))
        },
    );
    group.bench_with_input(
        BenchmarkId::new(format!("raw_tch{suffix}"), id),
        x,
        |bch, x| {
            bch.iter(|| tch::no_grad(|| black_box(raw_forward(black_box(x), w, a, b, scaling))))
        },
    );
}

fn bench_forward(c: &mut Criterion) {
    pin_threads();
    let mut group = c.benchmark_group("forward");
    for (in_f, out_f) in SHAPES {
        let (mut layer, x) = setup(in_f, out_f);
        layer.set_training(false);
        nograd_pair(&mut group, "", &shape_id(in_f, out_f), &layer, &x);
    }
    group.finish();
}

/// `sum().backward()`, then the grads of A and B, zeroed in place after each iteration (as
/// `optimizer.zero_grad(set_to_none=False)` would; the same for both contenders).
fn backward_and_grads(y: Tensor, a: &Tensor, b: &Tensor) {
    y.sum(Kind::Float).backward();
    for p in [a, b] {
        let mut grad = black_box(p.grad());
        tch::no_grad(|| {
            let _ = grad.zero_();
        });
    }
}

fn bench_forward_backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward_backward");
    for (in_f, out_f) in SHAPES {
        let (layer, x) = setup(in_f, out_f);
        let id = shape_id(in_f, out_f);
        let scaling = layer.config().scaling();
        let (w, a, b) = (layer.weight(), &layer.adapter().a, &layer.adapter().b);
        group.bench_with_input(BenchmarkId::new("loratch", &id), &x, |bch, x| {
            bch.iter(|| backward_and_grads(layer.forward(black_box(x)).expect("forward"), a, b))
        });
        group.bench_with_input(BenchmarkId::new("raw_tch", &id), &x, |bch, x| {
            bch.iter(|| backward_and_grads(raw_forward(black_box(x), w, a, b, scaling), a, b))
        });
    }
    group.finish();
}

/// One row (a decode step), 576x576: little arithmetic, so the per-call cost of the library
/// (input checks, `Result` plumbing) shows.
fn bench_forward_1row(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward_1row");
    let (in_f, out_f) = SHAPES[0];
    let (mut layer, x) = setup_rows(in_f, out_f, 1);
    layer.set_training(false);
    nograd_pair(&mut group, "", &shape_id(in_f, out_f), &layer, &x);
    group.finish();
}

fn bench_merge(c: &mut Criterion) {
    let (in_f, out_f) = SHAPES[0];
    let id = shape_id(in_f, out_f);
    let mut group = c.benchmark_group("merge");
    let (mut layer, x) = setup(in_f, out_f);
    layer.set_training(false);
    nograd_pair(&mut group, "_unmerged", &id, &layer, &x);
    layer.merge().expect("merge");
    let w = layer.weight();
    group.bench_with_input(BenchmarkId::new("loratch_merged", &id), &x, |bch, x| {
        bch.iter(|| tch::no_grad(|| black_box(layer.forward(black_box(x)).expect("forward"))))
    });
    group.bench_with_input(BenchmarkId::new("raw_tch_merged", &id), &x, |bch, x| {
        bch.iter(|| tch::no_grad(|| black_box(black_box(x).linear::<&Tensor>(w, None))))
    });
    group.finish();
}

fn bench_causal_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("causal_attention");
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let (heads, kv_heads, len, dim) = (9, 3, 256, 64);
    let q = Tensor::randn([1, heads, len, dim], opts).set_requires_grad(true);
    let k = Tensor::randn([1, kv_heads, len, dim], opts).set_requires_grad(true);
    let v = Tensor::randn([1, kv_heads, len, dim], opts).set_requires_grad(true);
    let upstream = Tensor::randn([1, heads, len, dim], opts);
    let scale = 1.0 / (dim as f64).sqrt();
    // Backward from a random upstream gradient; the gradients are taken, not accumulated.
    let backward = |out: Tensor| {
        let loss = (out * &upstream).sum(Kind::Float);
        black_box(Tensor::run_backward(&[loss], &[&q, &k, &v], false, false));
    };
    let id = format!("1x{heads}/{kv_heads}x{len}x{dim}");
    group.bench_function(BenchmarkId::new("loratch", &id), |bch| {
        bch.iter(|| {
            backward(loratch::ops::attention::blocked(&q, &k, &v, scale, 64).expect("attention"))
        })
    });
    group.bench_function(BenchmarkId::new("raw_tch", &id), |bch| {
        bch.iter(|| {
            backward(Tensor::scaled_dot_product_attention::<&Tensor>(
                &q, &k, &v, None, 0.0, true, None, true,
            ))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_forward, bench_forward_backward, bench_forward_1row, bench_merge,
        bench_causal_attention
}
criterion_main!(benches);
