//! Adapter files of a single [`LoraLinear`]: a safetensors file with `lora_A.weight`,
//! `lora_B.weight` and the adapter's shape and hyper-parameters in the header metadata; or, for
//! a `.pt`/`.pth`/`.bin` path (as `torch_hf_lora_save`), a `torch.save` file with the same two
//! tensors and the same metadata as JSON in an extra record ([`PT_METADATA`]), which
//! `torch.load` ignores.
use super::adapter::all_finite;
use super::linear::LoraLinear;
use super::peft_keys::Factor;
use crate::error::{Error, Result};
use crate::io::safetensors::{save, MappedSafetensors};
use std::collections::HashMap;
use std::path::Path;

const KEY_A: &str = Factor::A.suffix();
const KEY_B: &str = Factor::B.suffix();
const FORMAT: &str = "loratch.lora_linear";
/// The record of a `.pt` adapter that holds its metadata.
pub const PT_METADATA: &str = "loratch_metadata.json";

/// Whether `path` names a `torch.save` file (as [`crate::hf::peft::Layout::Torch`]).
fn is_torch_file(path: &Path) -> bool {
    crate::hf::peft::Layout::of(path) == crate::hf::peft::Layout::Torch
}

/// Writes the layer's A and B (in their dtype) and metadata (`rank, alpha, in_features,
/// out_features, use_rslora, dropout`) to `path`, atomically.
pub fn save_linear_adapter(layer: &LoraLinear, path: &Path) -> Result<()> {
    let cfg = layer.config();
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("loratch_format".to_string(), FORMAT.to_string()),
        ("rank".to_string(), cfg.rank.to_string()),
        ("alpha".to_string(), cfg.alpha.to_string()),
        ("dropout".to_string(), cfg.dropout.to_string()),
        ("use_rslora".to_string(), cfg.use_rslora.to_string()),
        ("in_features".to_string(), layer.in_features().to_string()),
        ("out_features".to_string(), layer.out_features().to_string()),
    ]);
    let ad = layer.adapter();
    let tensors = [
        (KEY_A.to_string(), ad.a.shallow_clone()),
        (KEY_B.to_string(), ad.b.shallow_clone()),
    ];
    if is_torch_file(path) {
        let json = serde_json::to_vec(&meta).map_err(|e| Error::Config(e.to_string()))?;
        return crate::io::torch_pickle::write_state_dict_with(
            path,
            &tensors,
            &[(PT_METADATA, json)],
        );
    }
    save(path, &tensors, &meta)
}

/// Loads A and B from `path` into the layer, in place (the live tensors handed out before keep
/// working). Every check runs before anything is written: the file must hold exactly the two
/// tensors with finite values, and its metadata must agree with the layer. The layer must not be
/// merged.
pub fn load_linear_adapter(layer: &mut LoraLinear, path: &Path) -> Result<()> {
    if layer.merged() {
        return Err(Error::State(
            "cannot load adapters into a merged layer; unmerge it first".into(),
        ));
    }
    if is_torch_file(path) {
        let Some(json) = crate::io::torch_pickle::read_extra_record(path, PT_METADATA, 1 << 20)?
        else {
            return Err(Error::adapter(
                path,
                format!(
                    "no {PT_METADATA} record: a .pt LoRA-linear adapter must be written by \
                     torch_lora_save_adapters (which stores the layer's config); other files \
                     load from safetensors"
                ),
            ));
        };
        let meta: HashMap<String, String> = serde_json::from_slice(&json)
            .map_err(|e| Error::adapter(path, format!("malformed {PT_METADATA}: {e}")))?;
        let tensors = crate::io::torch_pickle::read_state_dict(path)?;
        return load_checked(layer, path, &meta, tensors);
    }
    load_linear_adapter_from(layer, &MappedSafetensors::open(path)?)
}

/// As [`load_linear_adapter`], from a safetensors file already opened (or read from bytes with
/// [`MappedSafetensors::from_bytes`]).
pub fn load_linear_adapter_from(layer: &mut LoraLinear, file: &MappedSafetensors) -> Result<()> {
    if layer.merged() {
        return Err(Error::State(
            "cannot load adapters into a merged layer; unmerge it first".into(),
        ));
    }
    let tensors = file
        .names()?
        .into_iter()
        .map(|n| Ok((n.clone(), file.tensor(&n)?)))
        .collect::<Result<Vec<_>>>()?;
    load_checked(layer, file.path(), &file.metadata()?, tensors)
}

/// Copies A and B of `tensors` (read from `path`, with `meta`) into the layer once every check
/// has passed.
fn load_checked(
    layer: &mut LoraLinear,
    path: &Path,
    meta: &HashMap<String, String>,
    tensors: Vec<(String, tch::Tensor)>,
) -> Result<()> {
    check_metadata(meta, path, layer)?;
    let bad = |msg: String| Error::adapter(path, msg);
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    if names != [KEY_A, KEY_B] {
        return Err(bad(format!(
            "expected tensors [{KEY_A:?}, {KEY_B:?}], found {names:?}"
        )));
    }
    let mut tensors = tensors.into_iter().map(|(_, t)| t);
    let (Some(a), Some(b)) = (tensors.next(), tensors.next()) else {
        return Err(bad("expected two tensors".into()));
    };
    let ad = layer.adapter_mut();
    for (key, t, live) in [(KEY_A, &a, &ad.a), (KEY_B, &b, &ad.b)] {
        if t.size() != live.size() {
            return Err(bad(format!(
                "{key} has shape {:?}, the layer expects {:?}",
                t.size(),
                live.size()
            )));
        }
        if !t.f_is_floating_point()? {
            return Err(bad(format!("{key} is not a floating-point tensor")));
        }
        if !all_finite(t)? {
            return Err(bad(format!("{key} contains NaN or Inf")));
        }
    }
    tch::no_grad(|| -> Result<()> {
        ad.a.f_copy_(&a)?;
        ad.b.f_copy_(&b)?;
        Ok(())
    })
}

/// Checks that an adapter file's metadata names this format and agrees with `layer`'s rank,
/// features, alpha and rsLoRA setting.
fn check_metadata(meta: &HashMap<String, String>, path: &Path, layer: &LoraLinear) -> Result<()> {
    let bad = |msg: String| Error::adapter(path, msg);
    if meta.get("loratch_format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!(
            "not a loratch LoRA-linear adapter file (metadata loratch_format != {FORMAT:?})"
        )));
    }
    let field = |k: &str| -> Result<&String> {
        meta.get(k)
            .ok_or_else(|| Error::adapter(path, format!("metadata lacks {k:?}")))
    };
    let int = |k: &str| -> Result<i64> {
        field(k)?
            .parse()
            .map_err(|_| Error::adapter(path, format!("metadata {k:?} is not an integer")))
    };
    let cfg = *layer.config();
    let checks = [
        ("rank", int("rank")?, cfg.rank),
        ("in_features", int("in_features")?, layer.in_features()),
        ("out_features", int("out_features")?, layer.out_features()),
    ];
    for (name, got, want) in checks {
        if got != want {
            return Err(bad(format!(
                "{name} is {got} in the file but {want} in the layer"
            )));
        }
    }
    let alpha: f64 = field("alpha")?
        .parse()
        .map_err(|_| bad("metadata \"alpha\" is not a number".into()))?;
    if alpha != cfg.alpha {
        return Err(bad(format!(
            "alpha is {alpha} in the file but {} in the layer",
            cfg.alpha
        )));
    }
    let rslora: bool = field("use_rslora")?
        .parse()
        .map_err(|_| bad("metadata \"use_rslora\" is not a bool".into()))?;
    if rslora != cfg.use_rslora {
        return Err(bad(format!(
            "use_rslora is {rslora} in the file but {} in the layer",
            cfg.use_rslora
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraConfig;
    use tch::{Device, Kind};

    fn layer(r: i64, alpha: f64) -> LoraLinear {
        let cfg = LoraConfig::new(r, alpha, 0.0, false).unwrap();
        LoraLinear::new(6, 5, cfg, true, Kind::Float, Device::Cpu).unwrap()
    }

    #[test]
    fn roundtrip_is_exact_and_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ad.safetensors");
        let src = layer(3, 6.0);
        tch::no_grad(|| {
            let _ = src.adapter().b.shallow_clone().normal_(0.0, 1.0);
        });
        save_linear_adapter(&src, &p).unwrap();
        let mut dst = layer(3, 6.0);
        let live_b = dst.trainable_params().pop().unwrap();
        load_linear_adapter(&mut dst, &p).unwrap();
        assert!(dst.adapter().a.equal(&src.adapter().a));
        assert!(
            live_b.equal(&src.adapter().b),
            "the live handle sees the loaded values"
        );
    }

    /// A `.pt` path writes a `torch.save` file that carries the config, so a fresh layer
    /// loads it; one without the config record is refused.
    #[test]
    fn pt_roundtrip_carries_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ad.pt");
        let src = layer(3, 6.0);
        tch::no_grad(|| {
            let _ = src.adapter().b.shallow_clone().normal_(0.0, 1.0);
        });
        save_linear_adapter(&src, &p).unwrap();
        let read = crate::io::torch_pickle::read_state_dict(&p).unwrap();
        assert_eq!(read.len(), 2);
        let mut dst = layer(3, 6.0);
        load_linear_adapter(&mut dst, &p).unwrap();
        assert!(dst.adapter().b.equal(&src.adapter().b));
        assert!(matches!(
            load_linear_adapter(&mut layer(4, 6.0), &p),
            Err(Error::AdapterFormat { msg, .. }) if msg.contains("rank is 3")
        ));
        let bare = dir.path().join("bare.pt");
        crate::io::torch_pickle::write_state_dict(&bare, &read).unwrap();
        assert!(matches!(
            load_linear_adapter(&mut layer(3, 6.0), &bare),
            Err(Error::AdapterFormat { msg, .. }) if msg.contains(PT_METADATA)
        ));
    }

    #[test]
    fn mismatches_are_rejected_and_leave_the_layer_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ad.safetensors");
        save_linear_adapter(&layer(3, 6.0), &p).unwrap();
        for mut other in [layer(4, 6.0), layer(3, 5.0)] {
            let before = other.adapter().a.copy();
            assert!(matches!(
                load_linear_adapter(&mut other, &p),
                Err(Error::AdapterFormat { .. })
            ));
            assert!(other.adapter().a.equal(&before));
        }
        let missing = dir.path().join("nope.safetensors");
        assert!(matches!(
            load_linear_adapter(&mut layer(3, 6.0), &missing),
            Err(Error::Io { .. })
        ));
    }
}
