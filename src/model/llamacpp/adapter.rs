//! A model's LoRA adapters as a llama.cpp adapter GGUF, the layout of llama.cpp's
//! `convert_lora_to_gguf.py` and what `src/llama-adapter.cpp` loads: metadata `general.type =
//! "adapter"`, `general.architecture` (the base model's), `adapter.type = "lora"`,
//! `adapter.lora.alpha`; for each adapted linear two f32 tensors `<base tensor>.lora_a` (PEFT's A,
//! `[r, in]`) and `<base tensor>.lora_b` (B, `[out, r]`, its rows in llama.cpp's q/k order).
//!
//! llama.cpp scales every adapter by `alpha / rank`, one alpha for the whole file and the rank of
//! each tensor pair; loratch's scaling is `alpha / r` or, with rsLoRA, `alpha / sqrt(r)`, and
//! rank and alpha may differ per module (`rank_pattern`, `alpha_pattern`). The file's alpha is
//! chosen so that `alpha / r_m` equals each module's scaling, which needs `scaling_m * r_m` to be
//! the same for every module; when it is not, the export is refused rather than written wrong.
use super::{arch_spec, permute_rows, to_f32_vec, ArchSpec};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufWriter, Value};
use crate::model::CausalLm;
use crate::quant::QType;
use crate::tokenizer::source::is_gguf;
use std::path::Path;
use tch::Tensor;

/// Relative difference under which two modules' `scaling * rank` count as one alpha (f32 keeps
/// ~7 digits; the file stores alpha as f32).
const ALPHA_RTOL: f64 = 1e-6;

/// One adapted linear, ready to write.
struct Pair {
    /// llama.cpp's name of the base weight (`blk.0.attn_q.weight`).
    name: String,
    a: Tensor,
    b: Tensor,
}

/// Writes the adapters of `lm` (loaded from `source`, a directory or a GGUF) to `path` as a
/// llama.cpp LoRA GGUF, atomically. Refused before anything is written ([`Error::Config`]): no
/// adapters, an architecture llama.cpp lacks, a GGUF source of another architecture, a LoRA on a
/// tied output head (llama.cpp's converter refuses those), a module with no llama.cpp tensor, or
/// scalings that no single alpha reproduces.
pub fn save_adapter(lm: &CausalLm, source: &Path, path: &Path) -> Result<()> {
    let config = &lm.config;
    let spec = arch_spec(config.architecture)?;
    check_gguf_base(source, spec)?;
    let mut pairs = Vec::new();
    let mut alphas: Vec<(String, f64)> = Vec::new();
    for (module, lin) in lm.linears() {
        let Some(ad) = &lin.lora else { continue };
        let key = format!("{module}.weight");
        if module == "lm_head" && config.tie_word_embeddings {
            return Err(refuse(format!(
                "{module} is tied to the token embedding; llama.cpp does not apply a LoRA on a \
                 tied output head"
            )));
        }
        let name = spec.tensor_name(&key).ok_or_else(|| {
            refuse(format!(
                "module {module} has no tensor in llama.cpp's {} architecture",
                spec.name
            ))
        })?;
        let b = match spec.permuted_heads(&key, config) {
            Some(heads) => permute_rows(&ad.b, heads)?,
            None => ad.b.shallow_clone(),
        };
        let cfg = ad.config;
        alphas.push((module, cfg.scaling() * cfg.rank as f64));
        pairs.push(Pair {
            name,
            a: ad.a.shallow_clone(),
            b,
        });
    }
    let alpha = common_alpha(&alphas)?;
    let mut w = GgufWriter::new();
    let s = |x: &str| Value::String(x.to_string());
    w.set("general.architecture", s(spec.name))?;
    w.set("general.type", s("adapter"))?;
    if let Some(stem) = path.file_stem().and_then(|n| n.to_str()) {
        w.set("general.name", s(stem))?;
    }
    w.set("adapter.type", s("lora"))?;
    w.set("adapter.lora.alpha", Value::F32(alpha as f32))?;
    for p in pairs {
        for (suffix, t) in [("lora_a", p.a), ("lora_b", p.b)] {
            let shape = t.size();
            let name = format!("{}.{suffix}", p.name);
            w.add_tensor_with(&name, &shape, QType::F32, move || {
                crate::quant::quantize(QType::F32, &to_f32_vec(&t)?)
            })?;
        }
    }
    w.write(path)
}

fn refuse(msg: String) -> Error {
    Error::Config(format!("cannot export the adapter to llama.cpp: {msg}"))
}

/// The one alpha that gives every module its scaling (`alpha / r_m = scaling_m`), or an error
/// naming two modules that need different ones.
fn common_alpha(alphas: &[(String, f64)]) -> Result<f64> {
    let Some((first, alpha)) = alphas.first() else {
        return Err(refuse("the model has no adapters".into()));
    };
    for (module, a) in alphas {
        if (a - alpha).abs() > ALPHA_RTOL * alpha.abs() {
            return Err(refuse(format!(
                "llama.cpp scales every adapter by alpha/rank with one alpha per file, but \
                 {first} needs alpha {alpha} and {module} needs {a} (scaling × rank differs \
                 between modules: rank_pattern/alpha_pattern, or rsLoRA with several ranks)"
            )));
        }
    }
    Ok(*alpha)
}

/// A GGUF base must be of the architecture the adapter names (llama.cpp refuses a mismatch).
fn check_gguf_base(source: &Path, spec: &ArchSpec) -> Result<()> {
    if !is_gguf(source) {
        return Ok(());
    }
    let file = GgufFile::open(source)?;
    let arch = file.get_str("general.architecture")?.unwrap_or_default();
    if arch != spec.name {
        return Err(refuse(format!(
            "the base GGUF's architecture is {arch:?}, llama.cpp's name for this model is {:?}",
            spec.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_alpha_or_a_clear_refusal() {
        let m = |n: &str, a: f64| (n.to_string(), a);
        assert_eq!(common_alpha(&[m("q", 16.0), m("v", 16.0)]).unwrap(), 16.0);
        let err = common_alpha(&[m("q", 16.0), m("v", 32.0)]).unwrap_err();
        assert!(
            err.to_string().contains("q needs alpha 16 and v needs 32"),
            "{err}"
        );
        assert!(common_alpha(&[]).is_err());
    }
}
