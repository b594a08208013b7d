//! Tests of the loader (shuffling, splits, packing, resuming) and of the whole pipeline on the
//! real construction-FAQ dataset.
use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::batch::rows_of;
use super::*;
use crate::tokenizer::test_tokenizer;

/// Example `i` has `1 + i % 7` tokens, ids `1000 * (i + 1) + p`, all trained.
fn synthetic(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let ids: Vec<i64> = (0..1 + i % 7)
                .map(|p| 1000 * (i as i64 + 1) + p as i64)
                .collect();
            Example {
                input_ids: ids.clone(),
                labels: ids,
            }
        })
        .collect()
}

fn config(packing: Packing, seed: u64) -> LoaderConfig {
    LoaderConfig {
        batch_size: 3,
        max_seq_length: 10,
        packing,
        shuffle: true,
        seed,
        pad_id: 0,
    }
}

fn all_input_rows(loader: &mut DataLoader) -> Vec<Vec<Vec<i64>>> {
    loader
        .by_ref()
        .map(|b| rows_of(&b.unwrap().input_ids))
        .collect()
}

#[test]
fn loader_shuffle_deterministic_per_seed_and_epoch() {
    let mut a = DataLoader::new(synthetic(20), config(Packing::Off, 7)).unwrap();
    let mut b = DataLoader::new(synthetic(20), config(Packing::Off, 7)).unwrap();
    let mut c = DataLoader::new(synthetic(20), config(Packing::Off, 8)).unwrap();
    let (a0, b0, c0) = (
        all_input_rows(&mut a),
        all_input_rows(&mut b),
        all_input_rows(&mut c),
    );
    assert_eq!(a0, b0);
    assert_ne!(a0, c0);
    assert_eq!(a.position(), Position { epoch: 1, batch: 0 });
    let a1 = all_input_rows(&mut a);
    assert_ne!(a0, a1, "epochs must differ");
    assert_eq!(a.epoch_order(1), b.epoch_order(1));
    let mut sorted = a.epoch_order(1);
    sorted.sort();
    assert_eq!(sorted, (0..20).collect::<Vec<_>>());
    // 20 examples / 3 per batch.
    assert_eq!(a0.len(), 7);
    let mut unshuffled = DataLoader::new(
        synthetic(5),
        LoaderConfig {
            shuffle: false,
            ..config(Packing::Off, 7)
        },
    )
    .unwrap();
    assert_eq!(unshuffled.epoch_order(3), vec![0, 1, 2, 3, 4]);
    assert_eq!(all_input_rows(&mut unshuffled)[0][0][0], 1000);
}

#[test]
fn loader_resume_yields_same_remaining_batches() {
    for packing in [Packing::Off, Packing::Rows, Packing::Examples] {
        let mut full = DataLoader::new(synthetic(30), config(packing, 3)).unwrap();
        all_input_rows(&mut full); // epoch 0
        let mut seen = Vec::new();
        let mut saved = None;
        loop {
            if seen.len() == 3 {
                saved = Some(full.position());
            }
            let Some(b) = full.next() else { break };
            seen.push(rows_of(&b.unwrap().labels));
        }
        let saved = saved.unwrap();
        assert_eq!(saved, Position { epoch: 1, batch: 3 });
        let mut resumed = DataLoader::new(synthetic(30), config(packing, 3)).unwrap();
        resumed.seek(saved).unwrap();
        let rest: Vec<_> = resumed
            .by_ref()
            .map(|b| rows_of(&b.unwrap().labels))
            .collect();
        assert_eq!(rest, seen[3..].to_vec(), "packing={packing:?}");
        assert!(resumed
            .seek(Position {
                epoch: 0,
                batch: 1000
            })
            .is_err());
    }
}

#[test]
fn loader_packing_every_example_once_rows_bounded() {
    let examples = synthetic(41);
    let mut loader = DataLoader::new(examples.clone(), config(Packing::Rows, 11)).unwrap();
    let mut counts: BTreeMap<Vec<i64>, usize> = BTreeMap::new();
    let mut n_rows = 0;
    for batch in loader.by_ref() {
        let batch = batch.unwrap();
        assert!(batch.packed);
        let (b, t) = batch.shape();
        assert!(b <= 3 && t <= 10);
        let ids = rows_of(&batch.input_ids);
        let pos = rows_of(&batch.position_ids);
        let seg = rows_of(&batch.segment_ids);
        let labels = rows_of(&batch.labels);
        let mask = block_diagonal_mask(&batch.segment_ids).unwrap();
        for r in 0..b as usize {
            n_rows += 1;
            // Split the row into examples by segment id; check positions and labels.
            let mut start = 0;
            let mut k = 1;
            while start < t as usize && seg[r][start] != 0 {
                let mut end = start;
                while end < t as usize && seg[r][end] == k {
                    assert_eq!(pos[r][end], (end - start) as i64);
                    end += 1;
                }
                assert_eq!(labels[r][start], IGNORE_INDEX);
                assert_eq!(&labels[r][start + 1..end], &ids[r][start + 1..end]);
                *counts.entry(ids[r][start..end].to_vec()).or_default() += 1;
                // No query of this example attends to a key of another example.
                for q in start..end {
                    for key in 0..t as usize {
                        let allowed = mask.int64_value(&[r as i64, 0, q as i64, key as i64]) != 0;
                        assert_eq!(allowed, key >= start && key <= q, "row {r} q {q} k {key}");
                    }
                }
                start = end;
                k += 1;
            }
            assert!(seg[r][start..].iter().all(|&s| s == 0));
            assert!(labels[r][start..].iter().all(|&l| l == IGNORE_INDEX));
        }
    }
    let want: BTreeMap<Vec<i64>, usize> =
        examples.iter().map(|e| (e.input_ids.clone(), 1)).collect();
    assert_eq!(counts, want);
    // 41 examples of mean length ~4 in rows of 10: far fewer rows than examples.
    assert!(n_rows < 25, "{n_rows} rows");
}

#[test]
fn loader_packing_by_examples_keeps_batch_size_examples_per_batch() {
    // Padding-free batches hold the same examples, in the same order of batches, as unpacked
    // ones (so the same optimizer steps), end to end in one row without padding.
    let examples = synthetic(41);
    let mut off = DataLoader::new(examples.clone(), config(Packing::Off, 5)).unwrap();
    let mut by_examples = DataLoader::new(examples, config(Packing::Examples, 5)).unwrap();
    assert_eq!(off.num_batches(), by_examples.num_batches());
    let seg_count = |b: &Batch| -> usize {
        rows_of(&b.segment_ids)
            .iter()
            .map(|r| r.iter().copied().max().unwrap_or(0) as usize)
            .sum()
    };
    let mut fewer_rows = false;
    for (a, b) in off.by_ref().zip(by_examples.by_ref()) {
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(b.packed && !a.packed);
        assert_eq!(seg_count(&b), a.shape().0 as usize);
        assert_eq!(b.shape().0, 1);
        // No padding: one segment per example, their lengths summing to the row.
        assert_eq!(b.segment_lengths.len(), a.shape().0 as usize);
        assert_eq!(b.segment_lengths.iter().sum::<i64>(), b.shape().1);
        assert_eq!(b.n_target_tokens, a.n_target_tokens);
        for batch in [&a, &b] {
            let mask_sum = batch.attention_mask.sum(Kind::Int64).int64_value(&[]);
            assert_eq!(batch.n_tokens, mask_sum);
        }
        assert_eq!(b.n_tokens, b.shape().1);
        let mut want: Vec<Vec<i64>> = rows_of(&a.input_ids)
            .into_iter()
            .zip(rows_of(&a.attention_mask))
            .map(|(ids, m)| {
                ids.into_iter()
                    .zip(m)
                    .filter(|(_, m)| *m != 0)
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let mut got: Vec<Vec<i64>> = Vec::new();
        for (ids, seg) in rows_of(&b.input_ids)
            .into_iter()
            .zip(rows_of(&b.segment_ids))
        {
            for k in 1..=seg.iter().copied().max().unwrap_or(0) {
                got.push(
                    ids.iter()
                        .zip(&seg)
                        .filter(|(_, s)| **s == k)
                        .map(|(i, _)| *i)
                        .collect(),
                );
            }
        }
        want.sort();
        got.sort();
        assert_eq!(got, want);
        fewer_rows |= b.shape().0 < a.shape().0;
    }
    assert!(
        fewer_rows,
        "packing by examples never used fewer rows than padding"
    );
}

#[test]
fn packing_setting_reads_bools_and_names() {
    #[derive(Debug, serde::Deserialize)]
    struct S {
        packing: Packing,
    }
    let read =
        |v: serde_json::Value| serde_json::from_value::<S>(serde_json::json!({ "packing": v }));
    assert_eq!(
        read(serde_json::json!(true)).unwrap().packing,
        Packing::Rows
    );
    assert_eq!(
        read(serde_json::json!(false)).unwrap().packing,
        Packing::Off
    );
    assert_eq!(
        read(serde_json::json!("examples")).unwrap().packing,
        Packing::Examples
    );
    assert_eq!(
        read(serde_json::json!("rows")).unwrap().packing,
        Packing::Rows
    );
    let err = read(serde_json::json!("yes")).unwrap_err().to_string();
    assert!(err.contains("examples"), "{err}");
    assert_eq!(
        serde_json::to_value(Packing::Examples).unwrap(),
        serde_json::json!("examples")
    );
    assert_eq!(
        serde_json::to_value(Packing::Rows).unwrap(),
        serde_json::json!(true)
    );
}

#[test]
fn loader_rejects_bad_input() {
    assert!(DataLoader::new(Vec::new(), config(Packing::Off, 0)).is_err());
    let long = Example {
        input_ids: vec![1; 11],
        labels: vec![1; 11],
    };
    assert!(DataLoader::new(vec![long], config(Packing::Rows, 0)).is_err());
    let zero = LoaderConfig {
        batch_size: 0,
        ..config(Packing::Off, 0)
    };
    assert!(DataLoader::new(synthetic(3), zero).is_err());
}

#[test]
fn split_deterministic_and_disjoint() {
    let items: Vec<usize> = (0..100).collect();
    let (t1, v1) = train_validation_split(items.clone(), 0.1, 5).unwrap();
    let (t2, v2) = train_validation_split(items.clone(), 0.1, 5).unwrap();
    let (_, v3) = train_validation_split(items.clone(), 0.1, 6).unwrap();
    assert_eq!((&t1, &v1), (&t2, &v2));
    assert_ne!(v1, v3);
    assert_eq!(v1.len(), 10);
    assert_eq!(t1.len(), 90);
    let mut all: Vec<usize> = t1.iter().chain(&v1).copied().collect();
    all.sort();
    assert_eq!(all, items);
    let (t, v) = train_validation_split(vec![1, 2, 3], 0.01, 0).unwrap();
    assert_eq!((t.len(), v.len()), (2, 1));
    let (t, v) = train_validation_split(vec![1, 2, 3], 0.0, 0).unwrap();
    assert_eq!((t.len(), v.len()), (3, 0));
    assert!(train_validation_split(vec![1, 2], 1.0, 0).is_err());
    assert!(train_validation_split(vec![1], 0.5, 0).is_err());
}

#[test]
fn pipeline_padded_batch_from_jsonl() {
    let tok = test_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"Say hi.\", \"completion\": \" Hi!\"}\n\
         {\"prompt\": \"A much longer prompt that will certainly be cut.\", \"completion\": \" x\"}\n",
    )
    .unwrap();
    let ex = load_examples(&path, tok, 6, false).unwrap();
    assert_eq!((ex.n_records, ex.n_skipped, ex.examples.len()), (2, 1, 1));
    let pad = pad_id(tok).unwrap();
    assert_eq!(pad, i64::from(tok.pad_token_id().unwrap()));
    let batch = batch::pad_batch(&[&ex.examples[0]], pad).unwrap();
    assert_eq!(batch.input_ids.kind(), Kind::Int64);
    assert_eq!(batch.n_target_tokens, ex.examples[0].n_targets() as i64);
}

/// The 503 English Alpaca Q&As of the `zaragoza-construction-faq` package, located by
/// `$LORATCH_FAQ_JSONL` (…/zaragoza_construction_faq/data/faq-en-alpaca.jsonl).
#[test]
fn pipeline_real_faq_dataset() {
    let Some(path) = std::env::var_os("LORATCH_FAQ_JSONL") else {
        panic!(
            "LORATCH_FAQ_JSONL is not set: point it at faq-en-alpaca.jsonl of the \
             zaragoza-construction-faq package (pip install zaragoza-construction-faq in a \
             separate venv)"
        );
    };
    let tok = test_tokenizer();
    let records = read_records(&path).unwrap();
    assert_eq!(records.len(), 503);
    let Record::Chat(first) = &records[0] else {
        panic!("alpaca records must become chats");
    };
    let ex = tokenize_records(&records, tok, 512, false, "faq").unwrap();
    assert_eq!(ex.n_skipped, 0);
    // The trained tokens of each example decode to its answer + <|im_end|>.
    let trained: Vec<u32> = ex.examples[0]
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(
        tok.decode(&trained, false).unwrap(),
        format!("{}<|im_end|>", first[1].content)
    );
    let (train, val) = train_validation_split(ex.examples, 0.1, 42).unwrap();
    assert_eq!((train.len(), val.len()), (453, 50));
    let cfg = LoaderConfig {
        batch_size: 8,
        max_seq_length: 512,
        packing: Packing::Rows,
        shuffle: true,
        seed: 42,
        pad_id: pad_id(tok).unwrap(),
    };
    let total_targets: i64 = train.iter().map(|e| e.n_targets() as i64).sum();
    let mut loader = DataLoader::new(train, cfg).unwrap();
    let mut got = 0;
    for b in loader.by_ref() {
        let b = b.unwrap();
        assert!(b.shape().1 <= 512);
        got += b.n_target_tokens;
    }
    assert_eq!(got, total_targets);
    let m = block_diagonal_mask(&Tensor::zeros([2, 4], (Kind::Int64, tch::Device::Cpu))).unwrap();
    assert_eq!(m.sum(Kind::Int64).int64_value(&[]), 8);
}
