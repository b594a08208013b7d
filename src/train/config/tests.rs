//! The configuration's parsing, aliases, overrides and checks.
use std::path::{Path, PathBuf};

use super::*;

const BASE: &str = "model = \"m\"\ndata = \"d.jsonl\"\noutput_dir = \"out\"\n";

#[test]
fn defaults_follow_the_spec() {
    let c = TrainConfig::from_toml_str(BASE, &[], "t").unwrap();
    assert_eq!(c.training.learning_rate, 2e-4);
    assert_eq!(c.training.gradient_accumulation_steps, 4);
    assert_eq!(c.training.scheduler_type, "linear_warmup_cosine");
    assert_eq!(c.lora.rank, 16);
    assert_eq!(c.seed, 42);
}

#[test]
fn unknown_keys_are_errors() {
    for text in [
        format!("{BASE}learning_rat = 1.0\n"),
        format!("{BASE}[training]\nlearning_rat = 1.0\n"),
        format!("{BASE}[lora]\nrnak = 4\n"),
        format!("{BASE}[optimizer]\nlr = 4\n"),
    ] {
        let e = TrainConfig::from_toml_str(&text, &[], "t").unwrap_err();
        assert!(e.to_string().contains("unknown"), "{e}");
    }
    let e = TrainConfig::from_json_str(
        r#"{"model": "m", "data": "d", "output_dir": "o", "training": {"lr": 1}}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `lr`"), "{e}");
}

#[test]
fn overrides_apply_before_validation() {
    let c = TrainConfig::from_toml_str(
        BASE,
        &[
            "training.learning_rate=1e-3".into(),
            "training.packing=false".into(),
            "lora.target_modules=[\"q_proj\"]".into(),
            "training.scheduler_type=cosine".into(),
            "seed=7".into(),
        ],
        "t",
    )
    .unwrap();
    assert_eq!(c.training.learning_rate, 1e-3);
    assert_eq!(c.training.packing, Packing::Off);
    assert_eq!(c.lora.target_modules, serde_json::json!(["q_proj"]));
    assert_eq!(c.training.scheduler_type, "cosine");
    assert_eq!(c.seed, 7);
    for bad in ["training.nope=1", "training.batch_size=0", "=3", "novalue"] {
        assert!(
            TrainConfig::from_toml_str(BASE, &[bad.into()], "t").is_err(),
            "{bad}"
        );
    }
}

#[test]
fn invalid_values_are_errors() {
    for (key, value) in [
        ("lora.rank", "0"),
        ("lora.dropout", "1.0"),
        ("training.learning_rate", "-1.0"),
        ("training.scheduler_type", "\"warp\""),
        ("training.device", "\"tpu\""),
        ("training.dtype", "\"int8\""),
        ("validation_split", "1.5"),
        ("training.max_steps", "0"),
    ] {
        let e = TrainConfig::from_toml_str(BASE, &[format!("{key}={value}")], "t");
        assert!(e.is_err(), "{key}={value} was accepted");
    }
}

fn parse_yaml(text: &str, overrides: &[&str]) -> Result<Parsed> {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    TrainConfig::parse(text, Format::Yaml, &o, "c.yaml")
}

const YAML_BASE: &str = "model: m\ndata: d.jsonl\noutput_dir: out\n";

#[test]
fn the_key_lists_are_the_structs_fields() {
    let keys =
        |v: serde_json::Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    let mut c = TrainConfig::from_toml_str(BASE, &[], "t").unwrap();
    c.quantize = Some("none".into());
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let list = |l: &[&str]| sorted(l.iter().map(|s| s.to_string()).collect());
    assert_eq!(sorted(keys(c.to_json())), list(&TOP_KEYS));
    assert_eq!(
        sorted(keys(serde_json::to_value(&c.lora).unwrap())),
        list(&LORA_KEYS)
    );
    assert_eq!(
        sorted(keys(serde_json::to_value(&c.training).unwrap())),
        list(&TRAINING_KEYS)
    );
}

#[test]
fn yaml_and_toml_read_into_the_same_config() {
    let toml = format!(
        "{BASE}seed = 7\n[lora]\nrank = 8\ntarget_modules = \"all-linear\"\n\
         [training]\nlearning_rate = 1e-3\npacking = \"examples\"\nmax_steps = 5\n"
    );
    let yaml = format!(
        "{YAML_BASE}seed: 7\nlora:\n  rank: 8\n  target_modules: all-linear\n\
         training:\n  learning_rate: 1.0e-3\n  packing: examples\n  max_steps: 5\n"
    );
    let a = TrainConfig::from_toml_str(&toml, &[], "t").unwrap();
    let b = parse_yaml(&yaml, &[]).unwrap();
    assert_eq!(a, b.config);
    assert!(b.notes.is_empty());
    assert_eq!(Format::from_path(Path::new("x.YML")), Format::Yaml);
    assert_eq!(Format::from_path(Path::new("x.yaml")), Format::Yaml);
    assert_eq!(Format::from_path(Path::new("x.toml")), Format::Toml);
    // A YAML syntax error names the file.
    let e = parse_yaml("model: [unclosed\n", &[]).unwrap_err();
    assert!(e.to_string().contains("c.yaml"), "{e}");
    // An empty section is no section.
    let c = parse_yaml(&format!("{YAML_BASE}training:\n"), &[]).unwrap();
    assert_eq!(c.config.training, TrainingSection::default());
}

#[test]
fn other_tools_key_names_map_to_loratchs_with_a_note() {
    let yaml = String::from(
        "base_model: org/model\ndata: d.jsonl\noutput_dir: out\nr: 8\nlora_alpha: 16\n\
         lora_dropout: 0.1\nlora_target_modules: [q_proj, v_proj]\nnum_train_epochs: 2.0\n\
         lr_scheduler_type: cosine\nper_device_train_batch_size: 4\nsequence_len: 512\n\
         val_set_size: 0.05\nwarmup_ratio: 0.1\nlearning_rate: 1.0e-4\n\
         gradient_accumulation_steps: 8\n",
    );
    let p = parse_yaml(&yaml, &[]).unwrap();
    let c = &p.config;
    assert_eq!(c.model, PathBuf::from("org/model"));
    assert_eq!((c.lora.rank, c.lora.alpha, c.lora.dropout), (8, 16.0, 0.1));
    assert_eq!(
        c.lora.target_modules,
        serde_json::json!(["q_proj", "v_proj"])
    );
    let t = &c.training;
    assert_eq!((t.num_epochs, t.batch_size, t.max_seq_length), (2, 4, 512));
    assert_eq!(t.scheduler_type, "linear_warmup_cosine");
    assert_eq!((t.warmup_ratio, t.learning_rate), (0.1, 1e-4));
    assert_eq!(t.gradient_accumulation_steps, 8);
    assert_eq!(c.validation_split, 0.05);
    assert_eq!(p.notes.len(), 13, "{:#?}", p.notes);
    assert!(p
        .notes
        .contains(&"\"lora_alpha\" is loratch's [lora] alpha".to_string()));
    assert!(p
        .notes
        .contains(&"\"base_model\" is loratch's model".to_string()));
    assert!(p.notes.contains(
        &"\"learning_rate\" at the top level is loratch's [training] learning_rate".to_string()
    ));
    // In the section too, as PEFT's LoraConfig and TRL's SFTConfig keys would be pasted.
    let p = parse_yaml(
        &format!("{YAML_BASE}lora:\n  r: 4\n  lora_alpha: 8\ntraining:\n  max_length: 128\n  micro_batch_size: 2\n"),
        &[],
    )
    .unwrap();
    assert_eq!((p.config.lora.rank, p.config.lora.alpha), (4, 8.0));
    assert_eq!(
        (
            p.config.training.max_seq_length,
            p.config.training.batch_size
        ),
        (128, 2)
    );
    // axolotl's lora_target_linear.
    let p = parse_yaml(&format!("{YAML_BASE}lora_target_linear: true\n"), &[]).unwrap();
    assert_eq!(
        p.config.lora.target_modules,
        serde_json::json!("all-linear")
    );
    // The same aliases in a Python dict.
    let p = TrainConfig::from_json(
        r#"{"model_name_or_path": "m", "data": "d", "output_dir": "o", "lora_r": 2}"#,
    )
    .unwrap();
    assert_eq!((p.config.lora.rank, p.notes.len()), (2, 2));
}

#[test]
fn aliases_whose_meaning_differs_are_refused_with_the_difference() {
    for (extra, words) in [
        ("val_set_size: 200\n", "count of held-out examples"),
        ("num_train_epochs: 2.5\n", "whole epochs"),
        (
            "lr_scheduler_type: constant_with_warmup\n",
            "no loratch equivalent",
        ),
        ("bf16: true\n", "mixed precision"),
        (
            "lora_parameters: {rank: 8, scale: 20.0}\n",
            "alpha = scale * rank",
        ),
        ("lora_target_linear: false\n", "list the modules"),
        // Two names for one key.
        ("r: 8\nlora:\n  rank: 4\n", "both set loratch's [lora] rank"),
        ("r: 8\nlora_r: 4\n", "keep one"),
        (
            "warmup_steps: 10\nwarmup_ratio: 0.1\n",
            "both set the warm-up",
        ),
    ] {
        let e = parse_yaml(&format!("{YAML_BASE}{extra}"), &[]).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        assert!(e.to_string().contains(words), "{extra}: {e}");
    }
}

#[test]
fn unknown_keys_say_what_was_meant() {
    for (extra, words) in [
        (
            "learning_rat: 1.0\n",
            "unknown field `learning_rat`; did you mean `learning_rate`?",
        ),
        (
            "lora:\n  rnak: 4\n",
            "lora: unknown field `rnak`; did you mean `rank`?",
        ),
        (
            "training:\n  rank: 4\n",
            "unknown field `rank`; it is a [lora] key",
        ),
        (
            "training:\n  zzz: 4\n",
            "unknown field `zzz`; expected one of: learning_rate",
        ),
    ] {
        let e = parse_yaml(&format!("{YAML_BASE}{extra}"), &[]).unwrap_err();
        assert!(e.to_string().contains(words), "{extra}: {e}");
    }
}

#[test]
fn overrides_take_aliases_and_win_over_the_file() {
    let p = parse_yaml(
        &format!("{YAML_BASE}lora:\n  rank: 16\n"),
        &[
            "r=4",
            "lora_alpha=8",
            "learning_rate=1e-3",
            "training.warmup_ratio=0.2",
        ],
    )
    .unwrap();
    let c = &p.config;
    assert_eq!((c.lora.rank, c.lora.alpha), (4, 8.0));
    assert_eq!(
        (c.training.learning_rate, c.training.warmup_ratio),
        (1e-3, 0.2)
    );
    assert_eq!(p.notes.len(), 3);
    let e = parse_yaml(YAML_BASE, &["lora.rnak=3"]).unwrap_err();
    assert!(e.to_string().contains("override \"lora.rnak=3\""), "{e}");
    assert!(e.to_string().contains("did you mean `rank`"), "{e}");
}

#[test]
fn a_warm_up_as_long_as_the_run_is_clamped_with_a_warning() {
    let c = TrainConfig::from_toml_str(BASE, &["training.warmup_steps=100".into()], "t").unwrap();
    let (w, warning) = c.warmup_for(30).unwrap();
    assert_eq!(w, 3);
    let warning = warning.unwrap();
    assert!(
        warning.contains("warmup_steps = 100") && warning.contains("over 3 steps"),
        "{warning}"
    );
    assert_eq!(c.warmup_for(101).unwrap(), (100, None));
    let c = TrainConfig::from_toml_str(BASE, &["training.warmup_ratio=0.1".into()], "t").unwrap();
    assert_eq!(c.warmup_for(25).unwrap(), (3, None)); // ceil(2.5), as Hugging Face
                                                      // Schedules without a warm-up ignore it, as before.
    let c = TrainConfig::from_toml_str(
        BASE,
        &[
            "training.warmup_steps=100".into(),
            "training.scheduler_type=\"cosine\"".into(),
        ],
        "t",
    )
    .unwrap();
    assert_eq!(c.warmup_for(10).unwrap(), (0, None));
}

#[test]
fn the_readme_aliases_table_is_the_codes() {
    let readme = include_str!("../../../README.md");
    assert!(
        readme.contains(&aliases::markdown_table()),
        "README.md's aliases table differs from aliases::markdown_table():\n{}",
        aliases::markdown_table()
    );
}
