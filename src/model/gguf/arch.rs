//! The GGUF architectures loratch builds (`general.architecture`) and how llama.cpp's converter
//! stores each: tensor names against checkpoint keys (one table per architecture, read both ways:
//! loading a GGUF and writing one), Llama's q/k row permutation, and Gemma's norms stored as
//! `1 + weight`. The tables are transformers' (`get_gguf_hf_weights_map` over gguf-py's
//! `TENSOR_MAPPINGS`, transformers 5.24).

/// A GGUF architecture loratch builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

/// The tensors outside the blocks, the same in every architecture.
const GLOBAL: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// llama.cpp's block tensors (`blk.N.<name>`) and their module under `model.layers.N.`.
const LLAMA: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Gemma's four norms: llama.cpp's `ffn_norm` is the pre-feed-forward norm here, and the
/// post-attention norm has a name of its own.
const GEMMA: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
];

/// Phi-3's fused projections: `attn_qkv` holds q, k, v stacked, `ffn_up` gate and up.
const PHI3: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_up", "mlp.gate_up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

impl GgufArch {
    /// Every architecture, in the order error messages list them.
    pub const ALL: [GgufArch; 6] = [
        Self::Llama,
        Self::Qwen2,
        Self::Qwen3,
        Self::Gemma2,
        Self::Gemma3,
        Self::Phi3,
    ];

    /// The architecture named `name` (`general.architecture`), if loratch builds it.
    pub fn of(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// llama.cpp's name (`general.architecture`, the prefix of the hyper-parameter keys).
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
        }
    }

    /// The Hugging Face class (`architectures` in `config.json`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Gemma2 => "Gemma2ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
            Self::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// `model_type` in `config.json`: a Gemma 3 GGUF holds the text model only.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Gemma3 => "gemma3_text",
            other => other.name(),
        }
    }

    /// The block tensors: (llama.cpp name, module under `model.layers.N.`).
    pub fn block_tensors(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Llama | Self::Qwen2 | Self::Qwen3 => LLAMA,
            Self::Gemma2 | Self::Gemma3 => GEMMA,
            Self::Phi3 => PHI3,
        }
    }

    /// llama.cpp's converter permutes the q/k rows of Llama weights only.
    pub fn permuted(self) -> bool {
        self == Self::Llama
    }

    /// Gemma's norms scale by `1 + weight`; llama.cpp stores `1 + weight`, the checkpoint `weight`.
    fn shifted_norms(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }

    /// What llama.cpp adds to tensor `gguf_name` when it stores it: 1 for Gemma's norms (every
    /// `*norm.weight`, q/k norms and the final norm included, as transformers subtracts on load),
    /// else `None`.
    pub fn stored_offset(self, gguf_name: &str) -> Option<f32> {
        (self.shifted_norms() && gguf_name.ends_with("norm.weight")).then_some(1.0)
    }
}

/// The checkpoint key of llama.cpp tensor `name` in architecture `arch` (`None` for tensors
/// loratch does not read).
pub fn hf_key(arch: GgufArch, name: &str) -> Option<String> {
    let (module, param) = name.rsplit_once('.')?;
    if !matches!(param, "weight" | "bias") {
        return None;
    }
    if let Some((_, hf)) = GLOBAL.iter().find(|(g, _)| *g == module) {
        return Some(format!("{hf}.{param}"));
    }
    let (layer, module) = module.strip_prefix("blk.")?.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (_, hf) = arch.block_tensors().iter().find(|(g, _)| *g == module)?;
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// llama.cpp's tensor name for checkpoint key `key` in architecture `arch` (`None` for keys
/// llama.cpp has no tensor for): the inverse of [`hf_key`].
pub fn llama_cpp_name(arch: GgufArch, key: &str) -> Option<String> {
    let (module, param) = key.rsplit_once('.')?;
    if !matches!(param, "weight" | "bias") {
        return None;
    }
    if let Some((g, _)) = GLOBAL.iter().find(|(_, hf)| *hf == module) {
        return Some(format!("{g}.{param}"));
    }
    let (layer, module) = module.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (g, _) = arch.block_tensors().iter().find(|(_, hf)| *hf == module)?;
    Some(format!("blk.{layer}.{g}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_names_map_to_checkpoint_keys() {
        let llama = GgufArch::Llama;
        assert_eq!(
            hf_key(llama, "blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_key(llama, "blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_key(llama, "token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(
            hf_key(llama, "output.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_key(llama, "blk.x.attn_q.weight"), None);
        assert_eq!(hf_key(llama, "blk.0.attn_q.scale"), None);
        assert_eq!(hf_key(llama, "rope_freqs.weight"), None);
    }

    #[test]
    fn each_family_names_its_norms_and_fused_projections() {
        let cases = [
            (GgufArch::Llama, "ffn_norm", "post_attention_layernorm"),
            (GgufArch::Gemma3, "ffn_norm", "pre_feedforward_layernorm"),
            (
                GgufArch::Gemma3,
                "post_attention_norm",
                "post_attention_layernorm",
            ),
            (
                GgufArch::Gemma2,
                "post_ffw_norm",
                "post_feedforward_layernorm",
            ),
            (GgufArch::Gemma3, "attn_k_norm", "self_attn.k_norm"),
            (GgufArch::Phi3, "attn_qkv", "self_attn.qkv_proj"),
            (GgufArch::Phi3, "ffn_up", "mlp.gate_up_proj"),
            (GgufArch::Phi3, "ffn_norm", "post_attention_layernorm"),
        ];
        for (arch, gguf, hf) in cases {
            let name = format!("blk.3.{gguf}.weight");
            let key = format!("model.layers.3.{hf}.weight");
            assert_eq!(
                hf_key(arch, &name).as_deref(),
                Some(key.as_str()),
                "{arch:?}"
            );
            assert_eq!(llama_cpp_name(arch, &key).as_deref(), Some(name.as_str()));
        }
        // Names another family has are not read.
        assert_eq!(hf_key(GgufArch::Llama, "blk.0.post_ffw_norm.weight"), None);
        assert_eq!(hf_key(GgufArch::Phi3, "blk.0.attn_q.weight"), None);
        assert_eq!(
            llama_cpp_name(GgufArch::Phi3, "model.layers.0.mlp.up_proj.weight"),
            None
        );
    }

    #[test]
    fn the_tables_invert() {
        for arch in GgufArch::ALL {
            assert_eq!(GgufArch::of(arch.name()), Some(arch));
            let names = GLOBAL.iter().map(|(g, _)| g.to_string()).chain(
                arch.block_tensors()
                    .iter()
                    .map(|(g, _)| format!("blk.7.{g}")),
            );
            for name in names {
                for param in ["weight", "bias"] {
                    let name = format!("{name}.{param}");
                    let key = hf_key(arch, &name).unwrap();
                    assert_eq!(llama_cpp_name(arch, &key), Some(name), "{arch:?}");
                }
            }
        }
        assert_eq!(GgufArch::of("gemma"), None);
    }

    #[test]
    fn only_gemma_norms_are_stored_shifted() {
        for name in [
            "output_norm.weight",
            "blk.0.attn_norm.weight",
            "blk.0.ffn_norm.weight",
            "blk.0.post_attention_norm.weight",
            "blk.0.post_ffw_norm.weight",
            "blk.0.attn_q_norm.weight",
            "blk.0.attn_k_norm.weight",
        ] {
            assert_eq!(GgufArch::Gemma3.stored_offset(name), Some(1.0), "{name}");
            assert_eq!(GgufArch::Gemma2.stored_offset(name), Some(1.0), "{name}");
            assert_eq!(GgufArch::Qwen3.stored_offset(name), None, "{name}");
        }
        assert_eq!(GgufArch::Gemma3.stored_offset("blk.0.attn_q.weight"), None);
        assert_eq!(GgufArch::Gemma3.stored_offset("token_embd.weight"), None);
    }
}
