//! GGUF checkpoints against transformers' reading of the same files: the real Gemma-3-270M (every
//! tensor bit for bit, and the config), and tiny Gemma 2, Gemma 3 and Phi-3 files written with
//! gguf-py (the config key by key, and the metadata loratch refuses).
use super::*;
use crate::testing::{gemma3_gguf, run_py};
use serde_json::json;

/// Keys of a transformers config that change the model: loratch's config must have each one
/// transformers' has (not null).
const MODEL_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "hidden_act",
    "hidden_activation",
    "rope_parameters",
    "layer_types",
    "sliding_window",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "original_max_position_embeddings",
];

/// JSON values equal, numbers by value (`256` equals `256.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// `ours` equals transformers' config `theirs` (its `to_dict()`, plus `"causal_lm"`: the class
/// `AutoModelForCausalLM` picks) on every key ours has and every model key theirs has.
fn assert_config_equal(ours: &Value, theirs: &Value, case: &str) {
    let ours = ours.as_object().unwrap();
    assert_eq!(
        ours["architectures"],
        json!([theirs["causal_lm"]]),
        "{case}"
    );
    for (k, v) in ours.iter().filter(|(k, _)| *k != "architectures") {
        let t = theirs.get(k).unwrap_or(&Value::Null);
        assert!(same(v, t), "{case}: {k}: loratch {v}, transformers {t}");
    }
    for k in MODEL_KEYS {
        if theirs.get(*k).is_some_and(|v| !v.is_null()) {
            assert!(
                ours.contains_key(*k),
                "{case}: {k} missing (transformers: {})",
                theirs[*k]
            );
        }
    }
}

/// transformers' model of the GGUF at argv[1] (float32): its state dict into argv[2] (a tied head
/// left out), its config as JSON on stdout.
const PY_GEMMA3: &str = r#"
import json, os, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CLM
path = sys.argv[1]
m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                         dtype=torch.float32)
sd = {k: v.contiguous() for k, v in m.state_dict().items()
      if not (k == "lm_head.weight" and m.config.tie_word_embeddings)}
save_file(sd, sys.argv[2])
c = m.config.to_dict()
c["causal_lm"] = CLM[c["model_type"]]
print(json.dumps(c))
"#;

#[test]
fn gemma3_270m_tensors_and_config_equal_transformers() {
    let Some(path) = gemma3_gguf() else { return };
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("hf.safetensors");
    let out = run_py(
        PY_GEMMA3,
        &[path.to_str().unwrap(), st.to_str().unwrap()],
        "",
    );
    let theirs: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let ck = GgufCheckpoint::open(&path).unwrap();
    assert_eq!(ck.arch(), GgufArch::Gemma3);
    assert_config_equal(&ck.config_json().unwrap(), &theirs, "gemma-3-270m");

    let hf = Tensor::read_safetensors(&st).unwrap();
    assert_eq!(
        hf.len(),
        ck.names.len(),
        "one tensor of the file per checkpoint key"
    );
    for (key, want) in &hf {
        assert!(ck.contains(key), "{key} missing");
        let got = ck
            .load(key, &want.size(), Kind::Float, Device::Cpu)
            .unwrap();
        assert!(
            got.equal(want),
            "{key}: max |diff| {}",
            crate::testing::max_diff(&got, want)
        );
    }
    // The norms were stored as 1 + w (every Gemma norm is near 1 + small, not near 0, in the file).
    let name = &ck.names["model.layers.0.self_attn.q_norm.weight"];
    let stored = ck.file.dequantize(name).unwrap();
    let loaded = ck.load(
        "model.layers.0.self_attn.q_norm.weight",
        &[256],
        Kind::Float,
        Device::Cpu,
    );
    let loaded = Vec::<f32>::try_from(loaded.unwrap()).unwrap();
    assert!(stored.iter().zip(&loaded).all(|(s, l)| *s - 1.0 == *l));
}

/// Tiny GGUFs (metadata, a token embedding, the tensors a case adds) written with gguf-py into
/// argv[1]; prints transformers' config of each (or its error) as JSON.
const PY_TINY: &str = r#"
import json, os, sys
import numpy as np
import gguf
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CLM
out = sys.argv[1]
V, H = 12, 16
def write(name, arch, kv, tensors=(), embd=True):
    w = gguf.GGUFWriter(os.path.join(out, name + ".gguf"), arch)
    base = {"context_length": 64, "embedding_length": H, "block_count": 7, "feed_forward_length": 32,
            "attention.head_count": 2, "attention.head_count_kv": 1,
            "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 5000.0}
    for k, v in {**base, **kv}.items():
        key = f"{arch}.{k}"
        if isinstance(v, str): w.add_string(key, v)
        elif isinstance(v, float): w.add_float32(key, v)
        else: w.add_uint32(key, v)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([1] * V)
    w.add_bos_token_id(2); w.add_eos_token_id(1); w.add_pad_token_id(0)
    if embd:
        w.add_tensor("token_embd.weight", np.zeros((V, H), np.float32))
    for t in tensors:
        w.add_tensor(t, np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
write("gemma3", "gemma3", {"attention.key_length": 8, "attention.value_length": 8,
                           "attention.sliding_window": 5})
write("gemma3-bare", "gemma3", {})
write("gemma2", "gemma2", {"attention.key_length": 8, "attention.value_length": 8,
                           "attention.sliding_window": 6, "attn_logit_softcapping": 50.0,
                           "final_logit_softcapping": 30.0})
write("phi3", "phi3", {"rope.dimension_count": 8}, ["output.weight"])
write("gemma3-linear", "gemma3", {"rope.scaling.type": "linear", "rope.scaling.factor": 8.0})
write("phi3-longrope", "phi3", {}, ["rope_factors_long.weight", "rope_factors_short.weight"])
write("phi3-partial", "phi3", {"rope.dimension_count": 6})
configs = {}
for name in ["gemma3", "gemma3-bare", "gemma2", "phi3"]:
    c = AutoConfig.from_pretrained(out, gguf_file=name + ".gguf").to_dict()
    c["causal_lm"] = CLM[c["model_type"]]
    configs[name] = c
print(json.dumps(configs))
"#;

#[test]
fn tiny_gemma_and_phi3_configs_equal_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_py(PY_TINY, &[dir.path().to_str().unwrap()], "");
    let theirs: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let open = |name: &str| GgufCheckpoint::open(&dir.path().join(format!("{name}.gguf")));
    for (name, c) in theirs.as_object().unwrap() {
        let ours = open(name).unwrap().config_json().unwrap();
        assert_config_equal(&ours, c, name);
    }
    for (name, wants) in [
        ("gemma3-linear", &["gemma3.rope.scaling.type", "linear"][..]),
        ("phi3-longrope", &["rope_factors_long.weight"]),
        ("phi3-partial", &["phi3.rope.dimension_count", "6 of 8"]),
    ] {
        let msg = open(name).err().expect(name).to_string();
        for want in wants {
            assert!(msg.contains(want), "{name}: {msg}");
        }
    }
}
