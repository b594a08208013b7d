//! Tests of the chunked loss and the trainer on a tiny random Llama written here (config.json +
//! safetensors) with the default model's tokenizer (`LORATCH_DEFAULT_MODEL_DIR`, set by
//! `make test-rust`).
//!
//! An integration test (its own process), and every test holds [`RNG`]: torch's generator is
//! global, and exact-reproducibility checks need no other test drawing from it meanwhile.
use std::path::{Path, PathBuf};

use serde_json::json;
use tch::{Device, Kind, Tensor};

use std::sync::Mutex;

use loratch::data::batch::{packed_batch, pad_batch};
use loratch::data::{self, block_diagonal_mask, Example, Packing, IGNORE_INDEX};
use loratch::hf::loaded::{LoadOptions, LoadedModel};
use loratch::lora::targets::Targets;
use loratch::lora::LoraSpec;
use loratch::model::LoraMode;
use loratch::train::checkpoint;
use loratch::train::config::TrainConfig;
use loratch::train::lock::LOCK_FILE;
use loratch::train::loss::causal_lm_loss;
use loratch::train::trainer::{read_metrics, train, Hooks, NoHooks};

const VOCAB: i64 = 49152;

static RNG: Mutex<()> = Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn default_model_dir() -> PathBuf {
    std::env::var_os("LORATCH_DEFAULT_MODEL_DIR")
        .map(PathBuf::from)
        .expect("LORATCH_DEFAULT_MODEL_DIR must name the default model (make test-rust sets it)")
}

/// A tiny Llama (hidden 32, 2 layers, GQA 4/2 heads, tied head) with SmolLM2's vocabulary and
/// tokenizer, random weights from `seed`.
fn tiny_model(dir: &Path, seed: i64) {
    let (h, inter, layers, heads, kv, hd) = (32i64, 64i64, 2, 4i64, 2i64, 8i64);
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": VOCAB,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "hidden_act": "silu", "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    tch::manual_seed(seed);
    let mut t: Vec<(String, Tensor)> = vec![(
        "model.embed_tokens.weight".into(),
        Tensor::randn([VOCAB, h], (Kind::Float, Device::Cpu)) * 0.1,
    )];
    let lin = |o: i64, i: i64| Tensor::randn([o, i], (Kind::Float, Device::Cpu)) * 0.15;
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", (heads * hd, h)),
            ("self_attn.k_proj", (kv * hd, h)),
            ("self_attn.v_proj", (kv * hd, h)),
            ("self_attn.o_proj", (h, heads * hd)),
            ("mlp.gate_proj", (inter, h)),
            ("mlp.up_proj", (inter, h)),
            ("mlp.down_proj", (h, inter)),
        ] {
            t.push((format!("{p}.{name}.weight"), lin(shape.0, shape.1)));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.push((
                format!("{p}.{n}.weight"),
                Tensor::ones([h], (Kind::Float, Device::Cpu)),
            ));
        }
    }
    t.push((
        "model.norm.weight".into(),
        Tensor::ones([h], (Kind::Float, Device::Cpu)),
    ));
    loratch::io::safetensors::save(&dir.join("model.safetensors"), &t, &Default::default())
        .unwrap();
    let src = default_model_dir();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    ] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
    }
}

/// `n` alpaca records about numbers, as JSONL.
fn write_data(path: &Path, n: usize) {
    let mut text = String::new();
    for i in 0..n {
        let r = json!({
            "instruction": format!("What comes after {i}?"),
            "input": "",
            "output": format!("After {i} comes {}. It is the next whole number.", i + 1),
        });
        text.push_str(&r.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// A temp dir holding a tiny model (from `seed`) and `records` training records in data.jsonl.
fn tiny_run_dir(seed: i64, records: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), seed);
    write_data(&dir.path().join("data.jsonl"), records);
    dir
}

fn model_with_lora(dir: &Path) -> LoadedModel {
    let mut m = LoadedModel::load(
        dir,
        &LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            quantize: loratch::model::Quantize::Stored,
        },
    )
    .unwrap();
    tch::manual_seed(3);
    m.init_lora(LoraSpec::simple(4, 8.0, Targets::AllLinear), Kind::Float)
        .unwrap();
    // Non-zero B so adapters change the output and get a gradient in A too.
    tch::no_grad(|| {
        for (_, lin) in m.lm.linears() {
            if let Some(ad) = &lin.lora {
                let _ = ad.b.shallow_clone().normal_(0.0, 0.1);
            }
        }
    });
    m
}

fn example(ids: Vec<i64>, prompt: usize) -> Example {
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i < prompt { IGNORE_INDEX } else { t })
        .collect();
    Example {
        input_ids: ids,
        labels,
    }
}

fn grads(m: &LoadedModel) -> Vec<Tensor> {
    m.parameters()
        .unwrap()
        .iter()
        .map(|p| p.grad().copy())
        .collect()
}

fn zero_grads(m: &LoadedModel) {
    for p in m.parameters().unwrap() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

const MODE: LoraMode = LoraMode {
    enabled: true,
    training: false,
};

#[test]
fn chunked_loss_and_gradients_equal_full_logits_cross_entropy() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 1);
    let m = model_with_lora(dir.path());
    let a = example((0..40).map(|i| (i * 977 + 5) % VOCAB).collect(), 10);
    let b = example((0..23).map(|i| (i * 131 + 7) % VOCAB).collect(), 4);
    let batch = pad_batch(&[&a, &b], 2).unwrap();
    // Reference: full [B, T, V] logits, torch's cross_entropy (mean over targets), autograd.
    let logits =
        m.lm.forward(&batch.input_ids, Some(&batch.attention_mask), None, MODE)
            .unwrap();
    let t = batch.input_ids.size()[1];
    let shifted = logits.narrow(1, 0, t - 1).reshape([-1, VOCAB]);
    let targets = batch.labels.narrow(1, 1, t - 1).reshape([-1]);
    let reference = shifted.cross_entropy_loss::<&Tensor>(
        &targets,
        None,
        tch::Reduction::Mean,
        IGNORE_INDEX,
        0.0,
    );
    reference.backward();
    let ref_grads = grads(&m);
    zero_grads(&m);
    // loratch: chunked head, manual head backward, normalised by the target count.
    let hidden =
        m.lm.hidden_states_packed(&batch.input_ids, &batch.position_ids, None, MODE)
            .unwrap();
    let n = batch.n_target_tokens as f64;
    let out = causal_lm_loss(&m.lm, &hidden, &batch.labels, MODE, Some(1.0 / n)).unwrap();
    assert_eq!(out.n_tokens, batch.n_target_tokens);
    let diff = (out.sum / n - reference.double_value(&[])).abs();
    assert!(diff < 1e-5, "loss differs by {diff}");
    let g = grads(&m);
    let gdiff = max_diff(&g, &ref_grads);
    let scale = ref_grads
        .iter()
        .map(|x| x.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(scale > 0.0);
    assert!(
        gdiff <= 1e-5 * scale.max(1.0),
        "gradients differ by {gdiff} (max {scale})"
    );
}

#[test]
fn token_accuracy_counts_the_argmax_of_full_logits() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 1);
    let m = model_with_lora(dir.path());
    let a = example((0..40).map(|i| (i * 977 + 5) % VOCAB).collect(), 10);
    let b = example((0..23).map(|i| (i * 131 + 7) % VOCAB).collect(), 4);
    let mut batch = pad_batch(&[&a, &b], 2).unwrap();
    let logits =
        m.lm.forward(&batch.input_ids, Some(&batch.attention_mask), None, MODE)
            .unwrap();
    let (rows, t) = (batch.labels.size()[0], batch.labels.size()[1]);
    // predicted[b, t + 1]: the argmax of position t, the prediction for label t + 1.
    let predicted = Tensor::cat(
        &[
            Tensor::full([rows, 1], -1i64, (Kind::Int64, Device::Cpu)),
            logits.argmax(-1, false).narrow(1, 0, t - 1),
        ],
        1,
    );
    // A random model predicts no label: make every other target its position's argmax.
    let every_other = Tensor::arange(t, (Kind::Int64, Device::Cpu))
        .remainder(2)
        .eq(0)
        .unsqueeze(0);
    let targets = batch.labels.ne(IGNORE_INDEX);
    let chosen = targets.logical_and(&every_other);
    batch.labels = predicted.where_self(&chosen, &batch.labels);
    let expected = predicted
        .eq_tensor(&batch.labels)
        .logical_and(&targets)
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert!(expected >= 20, "{expected}");
    let hidden =
        m.lm.hidden_states_packed(&batch.input_ids, &batch.position_ids, None, MODE)
            .unwrap();
    for backward in [None, Some(1.0)] {
        let out = causal_lm_loss(&m.lm, &hidden, &batch.labels, MODE, backward).unwrap();
        assert_eq!(out.n_correct, expected, "backward {backward:?}");
        assert_eq!(out.n_tokens, batch.n_target_tokens);
    }
}

#[test]
fn packed_rows_give_the_per_example_losses_of_unpacked_rows() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 2);
    let m = model_with_lora(dir.path());
    let exs: Vec<Example> = (0..5)
        .map(|k| {
            example(
                (0..(7 + 5 * k))
                    .map(|i| (i * 613 + 97 * k + 1) % VOCAB)
                    .collect(),
                3,
            )
        })
        .collect();
    let alone: Vec<Tensor> = exs
        .iter()
        .map(|e| {
            let b = pad_batch(&[e], 0).unwrap();
            let h =
                m.lm.hidden_states_packed(&b.input_ids, &b.position_ids, None, MODE)
                    .unwrap();
            tch::no_grad(|| causal_lm_loss(&m.lm, &h, &b.labels, MODE, None))
                .unwrap()
                .token_losses
        })
        .collect();
    let rows = vec![vec![&exs[0], &exs[1], &exs[2]], vec![&exs[3], &exs[4]]];
    let b = packed_batch(&rows, 0).unwrap();
    let mask = block_diagonal_mask(&b.segment_ids).unwrap();
    let h =
        m.lm.hidden_states_packed(&b.input_ids, &b.position_ids, Some(&mask), MODE)
            .unwrap();
    let packed = tch::no_grad(|| causal_lm_loss(&m.lm, &h, &b.labels, MODE, None)).unwrap();
    let expected = Tensor::cat(&alone, 0);
    assert_eq!(packed.token_losses.size(), expected.size());
    let diff = (&packed.token_losses - &expected)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "packed per-token losses differ by {diff}");
    // The same through per-example attention calls (what the trainer runs): the rows laid end to
    // end, each example and the padding of row 1 a segment of its own.
    assert_eq!(b.segment_lengths.len(), 6);
    let h =
        m.lm.hidden_states_segments(&b.input_ids, &b.position_ids, &b.segment_lengths, MODE)
            .unwrap();
    let segs = tch::no_grad(|| causal_lm_loss(&m.lm, &h, &b.labels, MODE, None)).unwrap();
    let diff = (&segs.token_losses - &expected)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "per-segment attention losses differ by {diff}");
    // Lengths that do not cover the batch, or that let a segment span two rows, are refused.
    assert!(m
        .lm
        .hidden_states_segments(&b.input_ids, &b.position_ids, &[3, 4], MODE)
        .is_err());
    let width = b.input_ids.size()[1];
    assert!(m
        .lm
        .hidden_states_segments(
            &b.input_ids,
            &b.position_ids,
            &[width - 1, 2, width - 1],
            MODE
        )
        .is_err());
    // Without the block mask, examples see each other: the losses differ (the test can fail).
    let leaky =
        m.lm.hidden_states_packed(&b.input_ids, &b.position_ids, None, MODE)
            .unwrap();
    let leaky = tch::no_grad(|| causal_lm_loss(&m.lm, &leaky, &b.labels, MODE, None)).unwrap();
    assert!(
        (&leaky.token_losses - &expected)
            .abs()
            .max()
            .double_value(&[])
            > 1e-3
    );
}

#[test]
fn accumulation_is_normalised_by_the_target_tokens_of_the_window() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 3);
    let m = model_with_lora(dir.path());
    // Micro-batches with very different target counts: 30 and 3.
    let long = example((0..34).map(|i| (i * 37 + 11) % VOCAB).collect(), 3);
    let short = example((0..6).map(|i| (i * 53 + 2) % VOCAB).collect(), 2);
    let whole = pad_batch(&[&long, &short], 0).unwrap();
    let n = whole.n_target_tokens as f64;
    let h =
        m.lm.hidden_states_packed(&whole.input_ids, &whole.position_ids, None, MODE)
            .unwrap();
    let one = causal_lm_loss(&m.lm, &h, &whole.labels, MODE, Some(1.0 / n)).unwrap();
    let g_whole = grads(&m);
    zero_grads(&m);
    let mut sum = 0.0;
    for e in [&long, &short] {
        let b = pad_batch(&[e], 0).unwrap();
        let h =
            m.lm.hidden_states_packed(&b.input_ids, &b.position_ids, None, MODE)
                .unwrap();
        sum += causal_lm_loss(&m.lm, &h, &b.labels, MODE, Some(1.0 / n))
            .unwrap()
            .sum;
    }
    let g_acc = grads(&m);
    assert!((sum / n - one.sum / n).abs() < 1e-6);
    assert!(
        max_diff(&g_acc, &g_whole) < 1e-6,
        "{}",
        max_diff(&g_acc, &g_whole)
    );
    // A mean of per-batch means (the original's way) weights the 3-token batch 10x: different.
    zero_grads(&m);
    for e in [&long, &short] {
        let b = pad_batch(&[e], 0).unwrap();
        let h =
            m.lm.hidden_states_packed(&b.input_ids, &b.position_ids, None, MODE)
                .unwrap();
        causal_lm_loss(
            &m.lm,
            &h,
            &b.labels,
            MODE,
            Some(0.5 / b.n_target_tokens as f64),
        )
        .unwrap();
    }
    assert!(max_diff(&grads(&m), &g_whole) > 1e-4);
}

/// A config for a short run on the tiny model in `dir`.
fn tiny_config(dir: &Path, out: &Path, steps: u64) -> TrainConfig {
    TrainConfig::from_toml_str(&tiny_toml(dir, out, steps), &[], "test").unwrap()
}

/// The TOML text of [`tiny_config`].
fn tiny_toml(dir: &Path, out: &Path, steps: u64) -> String {
    format!(
        "model = {:?}\ndata = {:?}\noutput_dir = {:?}\nseed = 5\nvalidation_split = 0.2\n\
         [lora]\nrank = 4\nalpha = 8\ntarget_modules = \"all-linear\"\ndropout = 0.1\n\
         [training]\nmax_steps = {steps}\nbatch_size = 2\ngradient_accumulation_steps = 2\n\
         learning_rate = 3e-3\nlogging_steps = 1\nsave_steps = 2\neval_steps = 3\n\
         warmup_steps = 1\nmax_seq_length = 64\n",
        dir.display().to_string(),
        dir.join("data.jsonl").display().to_string(),
        out.display().to_string(),
    )
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    read_metrics(&out.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?)))
        .collect()
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let f =
        loratch::io::safetensors::MappedSafetensors::open(&dir.join("adapter_model.safetensors"))
            .unwrap();
    f.names()
        .unwrap()
        .into_iter()
        .map(|n| (n.clone(), f.tensor(&n).unwrap()))
        .collect()
}

fn assert_same_tensors(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs");
    }
}

struct StopAt(u64, u64);
impl Hooks for StopAt {
    fn should_stop(&mut self) -> bool {
        self.1 += 1;
        self.1 > self.0
    }
}

#[test]
fn a_run_learns_and_resuming_reproduces_it_exactly() {
    let _rng = rng_lock();
    let dir = tiny_run_dir(4, 40);
    let full_out = dir.path().join("full");
    let cfg = tiny_config(dir.path(), &full_out, 8);
    let full = train(&cfg, None, &mut NoHooks).unwrap();
    assert_eq!(full.global_step, 8);
    assert!(!full.interrupted);
    let (before, after) = (
        full.initial_eval_loss.unwrap(),
        full.final_eval_loss.unwrap(),
    );
    assert!(after < before - 0.1, "held-out loss {before} -> {after}");
    let full_losses = losses(&full_out);
    assert_eq!(full_losses.len(), 8);
    // The final adapter at the root (PEFT layout), the last checkpoint's.
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(full_out.join(f).is_file());
    }
    assert!(!full_out.join("adapter").exists());
    assert_eq!(full.adapter_dir.as_deref(), Some(full_out.as_path()));
    assert_same_tensors(
        &adapter_tensors(&full_out),
        &adapter_tensors(&full_out.join("checkpoint-8")),
    );
    assert!(full_out.join("loss.svg").is_file());
    let steps: Vec<u64> = checkpoint::list(&full_out)
        .unwrap()
        .iter()
        .filter_map(|p| checkpoint::step_of(p))
        .collect();
    assert_eq!(steps, vec![2, 4, 6, 8]);
    let info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(full_out.join("checkpoint-4").join("training_info.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "epoch",
        "global_step",
        "best_loss",
        "current_lr",
        "lora_config",
        "training_config",
    ] {
        assert!(info.get(key).is_some(), "training_info.json lacks {key}");
    }

    // Interrupted after 3 steps (a checkpoint is saved at the stop), then resumed.
    let part_out = dir.path().join("part");
    let cfg2 = tiny_config(dir.path(), &part_out, 8);
    let stopped = train(&cfg2, None, &mut StopAt(3, 0)).unwrap();
    assert!(stopped.interrupted);
    assert_eq!(stopped.global_step, 3);
    assert!(stopped.adapter_dir.is_none());
    let resumed = train(&cfg2, Some(&part_out), &mut NoHooks).unwrap();
    assert_eq!(resumed.global_step, 8);
    assert_eq!(
        losses(&part_out),
        full_losses,
        "resumed losses differ from the uninterrupted run"
    );
    let (a, b) = (adapter_tensors(&full_out), adapter_tensors(&part_out));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resume");
    }
}

#[test]
fn padding_free_packing_trains_like_padded_batches() {
    // `packing = "examples"` puts each step's examples into one row without padding (attention
    // per example); with dropout off it must take the same steps with the same losses and reach
    // the same adapter.
    let _rng = rng_lock();
    let dir = tiny_run_dir(6, 40);
    let run = |packing: Packing, name: &str| {
        let out = dir.path().join(name);
        let mut cfg = tiny_config(dir.path(), &out, 4);
        cfg.lora.dropout = 0.0;
        cfg.training.packing = packing;
        cfg.training.save_steps = 0;
        // A per-example limit: the packed row of 4 ~35-token examples is longer.
        cfg.training.max_seq_length = 128;
        train(&cfg, None, &mut NoHooks).unwrap();
        (losses(&out), adapter_tensors(&out))
    };
    let (padded_losses, padded) = run(Packing::Off, "padded");
    let (packed_losses, packed) = run(Packing::Examples, "packed");
    assert_eq!(padded_losses.len(), 4);
    for ((sa, la), (sb, lb)) in padded_losses.iter().zip(&packed_losses) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs().max(1.0),
            "step {sa}: {la} vs {lb}"
        );
    }
    let (a, b): (Vec<Tensor>, Vec<Tensor>) = (
        padded.into_iter().map(|(_, t)| t).collect(),
        packed.into_iter().map(|(_, t)| t).collect(),
    );
    let diff = max_diff(&a, &b);
    assert!(diff <= 1e-5, "adapters differ by {diff}");
    // Rows packing takes fewer, larger steps over the same data: different losses.
    let (rows_losses, _) = run(Packing::Rows, "rows");
    assert_ne!(rows_losses, padded_losses);
}

#[test]
fn gradient_checkpointing_trains_exactly_as_without() {
    // Checkpointing reruns each layer in the backward with the forward's generator state: the
    // same ops on the same values, so the same losses and the same adapter, bit for bit, with
    // dropout on, for both packings (attention per example through segment lengths) and for
    // right-padded rows (causal attention).
    let _rng = rng_lock();
    let dir = tiny_run_dir(7, 40);
    let run = |packing: Packing, checkpointing: bool| {
        let out = dir
            .path()
            .join(format!("{packing:?}-{checkpointing}").to_lowercase());
        let mut cfg = tiny_config(dir.path(), &out, 3);
        cfg.training.packing = packing;
        cfg.training.save_steps = 0;
        cfg.training.eval_steps = 0;
        cfg.training.max_seq_length = 128;
        cfg.training.gradient_checkpointing = checkpointing;
        let outcome = train(&cfg, None, &mut NoHooks).unwrap();
        (losses(&out), outcome.final_eval_loss, adapter_tensors(&out))
    };
    for packing in [Packing::Rows, Packing::Examples, Packing::Off] {
        let (plain_losses, plain_eval, plain) = run(packing, false);
        let (losses, eval, adapter) = run(packing, true);
        assert_eq!(plain_losses.len(), 3);
        assert_eq!(losses, plain_losses, "{packing:?}");
        assert_eq!(eval, plain_eval, "{packing:?}");
        assert_eq!(adapter.len(), plain.len());
        for ((na, ta), (nb, tb)) in adapter.iter().zip(&plain) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{packing:?}: {na} differs");
        }
    }
    let toml = tiny_toml(dir.path(), &dir.path().join("x"), 1) + "gradient_checkpointing = true\n";
    let cfg = TrainConfig::from_toml_str(&toml, &[], "test").unwrap();
    assert!(cfg.training.gradient_checkpointing);
}

/// Replaces the loss of the listed steps with NaN.
struct NanAt(Vec<u64>);
impl Hooks for NanAt {
    fn inspect_loss(&mut self, step: u64, loss: f64) -> f64 {
        if self.0.contains(&step) {
            f64::NAN
        } else {
            loss
        }
    }
}

#[test]
fn non_finite_steps_are_skipped_and_too_many_in_a_row_abort() {
    let _rng = rng_lock();
    let dir = tiny_run_dir(5, 30);
    let out = dir.path().join("skip");
    let cfg = tiny_config(dir.path(), &out, 6);
    let done = train(&cfg, None, &mut NanAt(vec![1, 2])).unwrap();
    assert_eq!(done.global_step, 6);
    let records = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let skipped: Vec<u64> = records
        .iter()
        .filter(|r| r["skipped"] == json!(true))
        .filter_map(|r| r["step"].as_u64())
        .collect();
    assert_eq!(skipped, vec![2, 3]);
    let state = checkpoint::read_state(&out.join("checkpoint-6")).unwrap();
    assert_eq!(state.optimizer_steps, 4);
    // Three in a row (the default limit) abort, naming the last good checkpoint, which stays.
    let out2 = dir.path().join("abort");
    let cfg2 = tiny_config(dir.path(), &out2, 8);
    let err = train(&cfg2, None, &mut NanAt(vec![2, 3, 4])).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, loratch::Error::NonFinite(_)), "{msg}");
    assert!(msg.contains("checkpoint-2"), "{msg}");
    assert_eq!(
        checkpoint::list(&out2).unwrap(),
        vec![out2.join("checkpoint-2")]
    );
    LoadedModel::load(
        dir.path(),
        &LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            quantize: loratch::model::Quantize::Stored,
        },
    )
    .and_then(|mut m| loratch::hf::peft::load(&mut m, &out2.join("checkpoint-2")))
    .unwrap();
}

#[test]
fn data_problems_are_clear_errors() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 6);
    std::fs::write(
        dir.path().join("data.jsonl"),
        "{\"instruction\": \"q\", \"output\": \"a\"}\n{\"bogus\": 1}\n",
    )
    .unwrap();
    let cfg = tiny_config(dir.path(), &dir.path().join("o"), 2);
    let e = train(&cfg, None, &mut NoHooks).unwrap_err().to_string();
    assert!(e.contains("data.jsonl") && e.contains('2'), "{e}");
    let cfg = tiny_config(dir.path(), &dir.path().join("o"), 2);
    let e = train(
        &cfg,
        Some(&dir.path().join("no-such-checkpoint")),
        &mut NoHooks,
    )
    .unwrap_err();
    assert!(e.to_string().contains("no-such-checkpoint"), "{e}");
    let _ = data::IGNORE_INDEX;
}

#[test]
fn a_fresh_run_into_a_used_output_dir_is_refused_unless_overwrite_is_set() {
    let _rng = rng_lock();
    let dir = tiny_run_dir(7, 20);
    let out = dir.path().join("used");
    // An earlier run's checkpoint, further along than the new run will get.
    let old = checkpoint::write(&out, 50, |d| {
        std::fs::write(d.join(checkpoint::STATE_FILE), "{}").map_err(|e| loratch::Error::io(d, e))
    })
    .unwrap();
    // Its final adapter: in the layout of earlier versions, and at the root.
    std::fs::create_dir_all(out.join("adapter")).unwrap();
    std::fs::write(out.join("adapter").join("stale"), "old run").unwrap();
    std::fs::write(out.join("adapter_model.safetensors"), "old run").unwrap();
    let cfg = tiny_config(dir.path(), &out, 2);
    let err = train(&cfg, None, &mut NoHooks).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, loratch::Error::Config(_)), "{msg}");
    for part in ["checkpoint-50", "--resume", "overwrite_output_dir"] {
        assert!(msg.contains(part), "{msg} lacks {part}");
    }
    assert!(
        old.join(checkpoint::STATE_FILE).is_file(),
        "the refusal deleted something"
    );
    let mut cfg = cfg;
    cfg.training.overwrite_output_dir = true;
    let done = train(&cfg, None, &mut NoHooks).unwrap();
    assert_eq!(done.global_step, 2);
    assert!(!old.exists() && !out.join("adapter").exists());
    assert_same_tensors(
        &adapter_tensors(&out),
        &adapter_tensors(&out.join("checkpoint-2")),
    );
    // A later resume finds this run's checkpoint, not the old run's.
    assert_eq!(checkpoint::resolve(&out).unwrap(), out.join("checkpoint-2"));
}

/// Starts `loratch train` (the binary) on the tiny run `steps` steps long into `out`, and waits
/// until it holds the output directory's lock (its pid in the lock file).
fn start_cli_run(dir: &Path, out: &Path, steps: u64, name: &str) -> std::process::Child {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, tiny_toml(dir, out, steps)).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_loratch"))
        .args(["train", "--config"])
        .arg(&cfg)
        .env("OMP_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(LOCK_FILE);
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&lock).ok() != Some(child.id().to_string()) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it took the lock"
        );
        assert!(start.elapsed().as_secs() < 300, "no lock after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child
}

#[test]
fn a_second_run_into_a_locked_output_dir_fails_at_once_naming_the_first() {
    let _rng = rng_lock();
    let dir = tiny_run_dir(8, 30);
    let out = dir.path().join("shared");
    let mut first = start_cli_run(dir.path(), &out, 6, "first");
    // Fresh or resumed, overwriting or not: refused before anything is read or deleted.
    let mut cfg = tiny_config(dir.path(), &out, 6);
    for (overwrite, resume) in [(false, None), (true, None), (false, Some(out.as_path()))] {
        cfg.training.overwrite_output_dir = overwrite;
        let err = train(&cfg, resume, &mut NoHooks).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, loratch::Error::State(_)), "{msg}");
        for part in [
            format!("pid {}", first.id()),
            "in use".into(),
            LOCK_FILE.into(),
        ] {
            assert!(msg.contains(&part), "{msg} lacks {part}");
        }
    }
    assert!(
        first.try_wait().unwrap().is_none(),
        "the second run did not fail at once"
    );
    assert!(first.wait().unwrap().success());
    // The first run's output is whole: one record per step, its own checkpoints, no lock left.
    let steps: Vec<u64> = losses(&out).iter().map(|p| p.0).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<u64>>());
    assert_eq!(
        checkpoint::list(&out).unwrap(),
        [2, 4, 6].map(|s| out.join(format!("checkpoint-{s}")))
    );
    assert!(!out.join(LOCK_FILE).exists());
}

#[test]
fn a_lock_left_by_a_killed_run_does_not_block_the_next_one() {
    let _rng = rng_lock();
    let dir = tiny_run_dir(9, 30);
    let out = dir.path().join("killed");
    let mut first = start_cli_run(dir.path(), &out, 1000, "killed");
    first.kill().unwrap(); // SIGKILL: no destructor runs
    first.wait().unwrap();
    let lock = out.join(LOCK_FILE);
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        first.id().to_string(),
        "the killed run's lock file is gone: the test checks nothing"
    );
    let cfg = tiny_config(dir.path(), &out, 2);
    let done = train(&cfg, None, &mut NoHooks).unwrap();
    assert_eq!(done.global_step, 2);
    assert!(!lock.exists());
}

/// Adds the model files of `model_dir` to a Hugging Face cache at `cache` as huggingface_hub
/// lays them out: each file a blob, symlinked from `snapshots/<commit>/`, and `refs/<name>`
/// holding the commit for each of `refs`.
fn add_to_hub_cache(cache: &Path, id: &str, commit: &str, refs: &[&str], model_dir: &Path) {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (i, entry) in std::fs::read_dir(model_dir).unwrap().enumerate() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let is_model_file =
            name.ends_with(".json") || name.ends_with(".safetensors") || name.ends_with(".jinja");
        if !path.is_file() || !is_model_file {
            continue;
        }
        // Blobs are named by a digest of their content; any unique name does here.
        let blob = format!("{commit}{i:04}");
        std::fs::copy(&path, repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(&name)).unwrap();
    }
    for r in refs {
        std::fs::write(repo.join("refs").join(r), commit).unwrap();
    }
}

#[test]
fn hub_ids_load_from_the_local_cache_at_a_revision() {
    use loratch::hf::hub_cache;
    let _rng = rng_lock();
    let (a, b, cache) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    tiny_model(a.path(), 21);
    tiny_model(b.path(), 22);
    let (ca, cb) = ("a1".repeat(20), "b2".repeat(20));
    add_to_hub_cache(cache.path(), "org/tiny", &ca, &["main"], a.path());
    add_to_hub_cache(cache.path(), "org/tiny", &cb, &["v2"], b.path());
    // Only this test reads the variable (a model given by an existing path never does).
    std::env::set_var("HF_HUB_CACHE", cache.path());
    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::Float,
        quantize: loratch::model::Quantize::Stored,
    };
    let ids = Tensor::from_slice(&[1i64, 500, 1000, 42, 7]).view([1, 5]);
    let logits = |spec: &str| {
        LoadedModel::load(Path::new(spec), &opts)
            .unwrap()
            .forward(&ids, None)
            .unwrap()
    };
    let a_dir = a.path().to_str().unwrap();
    let b_dir = b.path().to_str().unwrap();
    assert!(logits("org/tiny").equal(&logits(a_dir)));
    assert!(logits("org/tiny@main").equal(&logits(a_dir)));
    assert!(logits("org/tiny@v2").equal(&logits(b_dir)));
    assert!(logits(&format!("org/tiny@{cb}")).equal(&logits(b_dir)));
    assert!(!logits("org/tiny@v2").equal(&logits(a_dir)));
    let repo = cache.path().join("models--org--tiny");
    assert_eq!(
        hub_cache::resolve(Path::new("org/tiny")).unwrap(),
        repo.join("snapshots").join(&ca)
    );
    assert_eq!(
        hub_cache::resolve_revision(Path::new("org/tiny"), Some("v2")).unwrap(),
        repo.join("snapshots").join(&cb)
    );
    loratch::tokenizer::Tokenizer::for_model("org/tiny").unwrap();

    let e = LoadedModel::load(Path::new("org/missing"), &opts).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, loratch::Error::HubCache { .. }), "{msg}");
    for part in [
        cache.path().to_str().unwrap(),
        "HF_HUB_CACHE",
        "models--org--missing",
        "`hf download org/missing`",
        "huggingface-cli download org/missing",
    ] {
        assert!(msg.contains(part), "{msg} lacks {part}");
    }
    let msg = LoadedModel::load(Path::new("org/tiny@nope"), &opts)
        .unwrap_err()
        .to_string();
    for part in [
        "refs there: main, v2",
        &format!("snapshots there: {ca}, {cb}"),
        "--revision nope",
    ] {
        assert!(msg.contains(part), "{msg} lacks {part}");
    }
    let e = hub_cache::resolve_revision(Path::new("org/tiny@v2"), Some("main")).unwrap_err();
    assert!(e.to_string().contains("\"v2\""), "{e}");
    std::env::remove_var("HF_HUB_CACHE");
}

#[test]
fn a_yaml_config_with_other_tools_names_and_a_long_warm_up_trains_with_notes_and_a_warning() {
    let _rng = rng_lock();
    let dir = tiny_run_dir(23, 12);
    let cache = dir.path().join("hub");
    add_to_hub_cache(&cache, "org/tiny", &"c3".repeat(20), &["main"], dir.path());
    let out = dir.path().join("out");
    let yaml = format!(
        "base_model: org/tiny\ndata: {:?}\noutput_dir: {:?}\nseed: 5\nval_set_size: 0.2\n\
         r: 4\nlora_alpha: 8\nlora_target_linear: true\nnum_train_epochs: 1\n\
         per_device_train_batch_size: 2\ngradient_accumulation_steps: 1\n\
         learning_rate: 3.0e-3\nwarmup_steps: 100\nsequence_len: 64\n",
        dir.path().join("data.jsonl").display().to_string(),
        out.display().to_string(),
    );
    let cfg = dir.path().join("run.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_loratch"))
        .args(["train", "--config"])
        .arg(&cfg)
        .args(["logging_steps=1", "--set", "training.eval_steps=0"])
        .env("HF_HUB_CACHE", &cache)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    for part in [
        "note: \"base_model\" is loratch's model\n",
        "note: \"r\" is loratch's [lora] rank\n",
        "note: \"num_train_epochs\" is loratch's [training] num_epochs\n",
        "note: \"learning_rate\" at the top level is loratch's [training] learning_rate\n",
        "warning: the warm-up (warmup_steps = 100) is as long as the run (",
    ] {
        assert!(err.contains(part), "{err} lacks {part}");
    }
    // The clamped warm-up: a tenth of the run's steps.
    let steps = losses(&out).last().unwrap().0;
    assert!(
        err.contains(&format!(
            "({steps} optimizer steps) or longer; warming up over {} steps",
            steps / 10
        )),
        "{err}"
    );
    // Every step logged (logging_steps=1, a bare override), the last at the end of the epoch.
    assert_eq!(losses(&out).len() as u64, steps);
}

#[test]
fn config_and_data_errors_come_before_the_model_loads() {
    let _rng = rng_lock();
    let dir = tiny_run_dir(24, 12);
    // Without weights, any error after the model's load would be the missing weights.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let mut cfg = tiny_config(dir.path(), &dir.path().join("o"), 2);
    // A schedule error (min_lr above learning_rate): known once the steps are planned.
    cfg.training.min_lr = 1.0;
    let e = train(&cfg, None, &mut NoHooks).unwrap_err();
    assert!(
        matches!(e, loratch::Error::Config(_)) && e.to_string().contains("min_lr"),
        "{e}"
    );
    // A nonexistent model and a config error: the config error.
    cfg.training.min_lr = 0.0;
    cfg.model = dir.path().join("no-such-model");
    cfg.training.warmup_ratio = 0.5; // with warmup_steps = 1
    let e = train(&cfg, None, &mut NoHooks).unwrap_err();
    assert!(e.to_string().contains("both set the warm-up"), "{e}");
    // A nonexistent model and a missing data file: the data file.
    cfg.training.warmup_ratio = 0.0;
    cfg.data = dir.path().join("missing.jsonl");
    let e = train(&cfg, None, &mut NoHooks).unwrap_err();
    assert!(e.to_string().contains("missing.jsonl"), "{e}");
}

#[test]
fn resuming_with_another_rank_names_the_config_keys_to_set() {
    let _rng = rng_lock();
    let dir = tiny_run_dir(25, 12);
    let out = dir.path().join("o");
    let mut cfg = tiny_config(dir.path(), &out, 2);
    train(&cfg, None, &mut NoHooks).unwrap();
    cfg.lora.rank = 2;
    let e = train(&cfg, Some(&out), &mut NoHooks).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, loratch::Error::Checkpoint { .. }), "{msg}");
    for part in [
        "rank: 4 in the checkpoint, 2 in the config",
        "set lora.rank = 4 in the config (or lora.rank=4 on the command line)",
    ] {
        assert!(msg.contains(part), "{msg} lacks {part}");
    }
    assert!(!msg.contains("torch_hf"), "{msg}");
}

#[test]
fn outputs_follow_hugging_face_best_checkpoint_rotation_and_tensorboard() {
    let _rng = rng_lock();
    let dir = tiny_run_dir(8, 40);
    let out = dir.path().join("hf");
    let mut cfg = tiny_config(dir.path(), &out, 8);
    cfg.training.eval_steps = 2;
    cfg.training.save_total_limit = Some(2);
    cfg.training.load_best_at_end = true;
    cfg.training.report_to = vec!["tensorboard".into()];
    // The last two updates are skipped (a non-finite loss), so the last checkpoint is no better
    // than the one before: the best stays the earlier one.
    struct NanAfter6;
    impl Hooks for NanAfter6 {
        fn inspect_loss(&mut self, step: u64, loss: f64) -> f64 {
            if step >= 6 {
                f64::NAN
            } else {
                loss
            }
        }
    }
    let done = train(&cfg, None, &mut NanAfter6).unwrap();
    let records = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let evals: Vec<(u64, f64)> = records
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("eval_loss")?.as_f64()?)))
        .collect();
    // Hugging Face's (and TRL's) keys, plus loratch's.
    for r in &records {
        let has = |k: &str| r.get(k).is_some();
        if has("skipped") {
            continue;
        }
        if has("eval_loss") {
            let acc = r["eval_mean_token_accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc), "{r}");
        } else {
            for k in [
                "loss",
                "learning_rate",
                "grad_norm",
                "epoch",
                "tokens_per_s",
                "rss_bytes",
            ] {
                assert!(has(k), "{r} lacks {k}");
            }
            assert!(!has("lr"), "{r}");
            // None with no update in the window (the skipped steps), as the loss.
            match r["loss"].as_f64() {
                Some(_) => {
                    let acc = r["mean_token_accuracy"].as_f64().unwrap();
                    assert!((0.0..=1.0).contains(&acc), "{r}");
                }
                None => assert!(r["mean_token_accuracy"].is_null(), "{r}"),
            }
        }
    }
    // The best checkpoint: the lowest validation loss among the checkpointed steps (all even).
    let &(best_step, best_loss) = evals
        .iter()
        .filter(|(s, _)| *s > 0)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let best = out.join(format!("checkpoint-{best_step}"));
    assert_eq!(done.best_checkpoint.as_deref(), Some(best.as_path()));
    assert_eq!(best_step, 6, "{evals:?}");
    assert_eq!(evals.last().unwrap().1, best_loss, "{evals:?}");
    // save_total_limit = 2: the newest and the best (and the one before the newest when the
    // best is the newest).
    let kept: Vec<u64> = checkpoint::list(&out)
        .unwrap()
        .iter()
        .filter_map(|p| checkpoint::step_of(p))
        .collect();
    assert_eq!(kept, vec![best_step, 8]);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-8").join(checkpoint::STATE_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(state["best_checkpoint"], format!("checkpoint-{best_step}"));
    assert_eq!(state["best_metric"].as_f64(), Some(best_loss));
    assert_eq!(state["best_global_step"], best_step);
    assert_eq!(state["best_model_checkpoint"], best.display().to_string());
    assert_eq!(state["global_step"], 8);
    assert_eq!(state["max_steps"], 8);
    assert!(state["epoch"].as_f64().unwrap() > 0.0);
    // log_history: the metrics file's records as of the save (the final evaluation included).
    assert_eq!(state["log_history"].as_array().unwrap(), &records);
    // load_best_at_end: the final adapter at the root is the best checkpoint's.
    assert_same_tensors(&adapter_tensors(&out), &adapter_tensors(&best));
    // TensorBoard: one run directory with one event file.
    let tb = done.tensorboard_dir.unwrap();
    assert_eq!(tb, out.join("runs"));
    let runs: Vec<_> = std::fs::read_dir(&tb)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    let files: Vec<_> = std::fs::read_dir(&runs[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    assert!(files[0].to_string_lossy().contains("events.out.tfevents."));

    // Unknown reporters are refused, before anything loads, with the known ones.
    let mut bad = tiny_config(dir.path(), &dir.path().join("bad"), 2);
    bad.training.report_to = vec!["wandb".into()];
    let e = train(&bad, None, &mut NoHooks).unwrap_err().to_string();
    assert!(e.contains("wandb") && e.contains("tensorboard"), "{e}");
    assert!(!dir.path().join("bad").exists());
}
