//! Export to llama.cpp (and Ollama, which runs its files): LoRA adapters as llama.cpp's adapter
//! GGUFs ([`adapter`]) and models with their adapters merged as model GGUFs ([`merged`]), laid out
//! as llama.cpp's own converters (`convert_lora_to_gguf.py`, `convert_hf_to_gguf.py`) write them:
//! llama.cpp's tensor names, its q/k row order for Llama-family weights, `<arch>.*`
//! hyper-parameters and `tokenizer.*` metadata ([`tokenizer`]).
//!
//! What differs between architectures is one [`ArchSpec`] entry in [`ARCHS`]: llama.cpp's name
//! for it, whether q/k rows are permuted, and its GGUF layout (tensor names and Gemma's norms
//! stored as `1 + weight`, from `model::gguf`'s tables, read the other way). Every check
//! runs before anything is written; an export that cannot be exact is refused with an error
//! that says why, and no file is left behind.
use super::gguf::{llama_cpp_name, GgufArch};
use super::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use tch::Tensor;

pub mod adapter;
pub mod merged;
pub mod tokenizer;

pub use adapter::save_adapter;
pub use merged::{save_merged, TYPES as MERGED_TYPES};

/// How one architecture is written for llama.cpp.
#[derive(Debug)]
pub struct ArchSpec {
    /// loratch's architecture.
    pub arch: Architecture,
    /// llama.cpp's `general.architecture`.
    pub name: &'static str,
    /// llama.cpp's converter permutes the q/k projection rows (Llama's interleaved RoPE).
    pub permute_qk: bool,
    /// The GGUF layout: tensor names and what llama.cpp adds to a tensor when storing it.
    pub gguf: GgufArch,
}

/// The architectures loratch exports, as llama.cpp's converter writes them (Mistral is
/// `LlamaModel` there: architecture "llama", rows permuted; Gemma 3 is `Gemma3Model`, rows as
/// they are, norms stored as `1 + weight`).
pub const ARCHS: &[ArchSpec] = &[
    ArchSpec {
        arch: Architecture::Llama,
        name: "llama",
        permute_qk: true,
        gguf: GgufArch::Llama,
    },
    ArchSpec {
        arch: Architecture::Mistral,
        name: "llama",
        permute_qk: true,
        gguf: GgufArch::Llama,
    },
    ArchSpec {
        arch: Architecture::Qwen2,
        name: "qwen2",
        permute_qk: false,
        gguf: GgufArch::Qwen2,
    },
    ArchSpec {
        arch: Architecture::Qwen3,
        name: "qwen3",
        permute_qk: false,
        gguf: GgufArch::Qwen3,
    },
    ArchSpec {
        arch: Architecture::Gemma3,
        name: "gemma3",
        permute_qk: false,
        gguf: GgufArch::Gemma3,
    },
];

/// The export spec of `arch`: [`Error::Config`] when llama.cpp (or loratch's export) has no
/// architecture for it.
pub fn arch_spec(arch: Architecture) -> Result<&'static ArchSpec> {
    find_spec(ARCHS, arch)
}

fn find_spec(specs: &'static [ArchSpec], arch: Architecture) -> Result<&'static ArchSpec> {
    specs.iter().find(|s| s.arch == arch).ok_or_else(|| {
        Error::Config(format!(
            "cannot export to llama.cpp: no llama.cpp architecture for {arch:?} (loratch exports {})",
            specs
                .iter()
                .map(|s| format!("{:?}", s.arch))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

impl ArchSpec {
    /// llama.cpp's tensor name of checkpoint key `key` (`model.layers.3.self_attn.q_proj.weight`
    /// → `blk.3.attn_q.weight`), `None` when llama.cpp has no such tensor.
    pub fn tensor_name(&self, key: &str) -> Option<String> {
        llama_cpp_name(self.gguf, key)
    }

    /// What llama.cpp's converter adds to tensor `name` (llama.cpp's name) when it stores it: 1
    /// for Gemma's norms, which scale by `1 + weight` (the checkpoint holds `weight`).
    pub fn stored_offset(&self, name: &str) -> Option<f32> {
        self.gguf.stored_offset(name)
    }

    /// The head count whose rows llama.cpp permutes in the tensor of checkpoint key `key`
    /// (weight or bias of a q or k projection), `None` for every other tensor.
    pub fn permuted_heads(&self, key: &str, config: &ModelConfig) -> Option<i64> {
        if !self.permute_qk {
            return None;
        }
        let module = key.rsplit_once('.').map_or(key, |(m, _)| m);
        if module.ends_with("self_attn.q_proj") {
            Some(config.num_attention_heads)
        } else if module.ends_with("self_attn.k_proj") {
            Some(config.num_key_value_heads)
        } else {
            None
        }
    }
}

/// llama.cpp's converter's row order for a q/k projection's output rows (dimension 0) of
/// `heads` heads: each head's two rotary halves interleaved (`reshape(heads, 2, d/2, ..)`,
/// swap the middle axes). `model::gguf` undoes it on reading.
pub fn permute_rows(t: &Tensor, heads: i64) -> Result<Tensor> {
    let shape = t.size();
    let rows = shape[0];
    if heads <= 0 || rows % (2 * heads) != 0 {
        return Err(Error::Shape(format!(
            "cannot permute {rows} rows into {heads} heads of two rotary halves"
        )));
    }
    let mut split = vec![heads, 2, rows / heads / 2];
    split.extend_from_slice(&shape[1..]);
    Ok(t.f_reshape(&split)?
        .f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape(&shape)?)
}

/// A float tensor's values as f32, row-major (any dtype, any device).
pub(crate) fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    let flat = t
        .f_detach()?
        .f_to_device(tch::Device::Cpu)?
        .f_to_kind(tch::Kind::Float)?
        .f_contiguous()?
        .f_reshape([-1])?;
    Ok(Vec::<f32>::try_from(&flat)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        let s = arch_spec(Architecture::Llama).unwrap();
        let cases = [
            (
                "model.layers.12.self_attn.o_proj.weight",
                "blk.12.attn_output.weight",
            ),
            ("model.layers.0.self_attn.q_proj.bias", "blk.0.attn_q.bias"),
            (
                "model.layers.1.mlp.down_proj.weight",
                "blk.1.ffn_down.weight",
            ),
            (
                "model.layers.1.post_attention_layernorm.weight",
                "blk.1.ffn_norm.weight",
            ),
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        for (hf, ours) in cases {
            assert_eq!(s.tensor_name(hf).as_deref(), Some(ours), "{hf}");
        }
        let g = arch_spec(Architecture::Gemma3).unwrap();
        assert_eq!(
            g.tensor_name("model.layers.2.pre_feedforward_layernorm.weight")
                .as_deref(),
            Some("blk.2.ffn_norm.weight")
        );
        assert_eq!(g.stored_offset("blk.2.ffn_norm.weight"), Some(1.0));
        assert_eq!(g.stored_offset("blk.2.attn_q.weight"), None);
        assert_eq!(s.stored_offset("blk.2.ffn_norm.weight"), None);
        for none in [
            "model.layers.0.mlp.fused_proj.weight",
            "model.layers.x.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.scale",
        ] {
            assert_eq!(s.tensor_name(none), None, "{none}");
        }
    }

    #[test]
    fn an_architecture_without_an_entry_is_refused() {
        let err = find_spec(&ARCHS[..1], Architecture::Qwen3).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("no llama.cpp architecture for Qwen3")),
            "{err}"
        );
        for s in ARCHS {
            assert_eq!(arch_spec(s.arch).unwrap().name, s.name);
            // llama.cpp's name and row order are those of the GGUF layout loratch reads.
            assert_eq!(s.gguf.name(), s.name);
            assert_eq!(s.gguf.permuted(), s.permute_qk);
        }
    }

    #[test]
    fn permutation_matches_the_converter_and_model_gguf_undoes_it() {
        // Converter: w.reshape(h, 2, d/2, ..).swapaxes(1, 2): with 2 heads of 4 rows, rows
        // [a0 a1 a2 a3 b0 b1 b2 b3] become [a0 a2 a1 a3 b0 b2 b1 b3].
        let t = Tensor::arange(8, (tch::Kind::Float, tch::Device::Cpu)).reshape([8, 1]);
        let p = to_f32_vec(&permute_rows(&t, 2).unwrap()).unwrap();
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert!(permute_rows(&t, 3).is_err());
    }
}
