//! Parsing device and dtype names ("cpu", "cuda:1", "bfloat16", ...) into tch values, with errors
//! that say what is available.
use crate::error::{Error, Result};
use tch::{Device, Kind};

/// Parses a device string: "cpu", "cuda", "cuda:N", "mps". A device that this process cannot
/// use (no CUDA, index out of range, no MPS) is an [`Error::Device`].
pub fn parse_device(name: &str) -> Result<Device> {
    let lower = name.trim().to_ascii_lowercase();
    let device = match lower.as_str() {
        "cpu" => Device::Cpu,
        "mps" => Device::Mps,
        "cuda" => Device::Cuda(0),
        s if s.starts_with("cuda:") => {
            let idx: usize = s[5..].parse().map_err(|_| {
                Error::Device(format!("malformed device {name:?}: expected \"cuda:N\""))
            })?;
            Device::Cuda(idx)
        }
        _ => {
            return Err(Error::Device(format!(
                "unknown device {name:?}: expected \"cpu\", \"cuda\", \"cuda:N\" or \"mps\""
            )))
        }
    };
    check_available(device, name)?;
    Ok(device)
}

fn check_available(device: Device, name: &str) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(idx) => {
            let count = tch::Cuda::device_count() as usize;
            if idx < count {
                Ok(())
            } else if count == 0 {
                Err(Error::Device(format!(
                    "device {name:?} requested but CUDA is not available"
                )))
            } else {
                Err(Error::Device(format!(
                    "device {name:?} requested but only {count} CUDA device(s) exist"
                )))
            }
        }
        Device::Mps => {
            if tch::utils::has_mps() {
                Ok(())
            } else {
                Err(Error::Device(format!(
                    "device {name:?} requested but MPS is not available"
                )))
            }
        }
        Device::Vulkan => Err(Error::Device(format!("device {name:?} is not supported"))),
    }
}

/// The canonical name of a device ("cpu", "cuda:0", "mps").
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// Parses a floating dtype name: "float32"/"float", "bfloat16", "float16"/"half", "float64"/"double".
pub fn parse_dtype(name: &str) -> Result<Kind> {
    match name
        .trim()
        .to_ascii_lowercase()
        .trim_start_matches("torch.")
    {
        "float32" | "float" | "fp32" => Ok(Kind::Float),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float16" | "half" | "fp16" => Ok(Kind::Half),
        "float64" | "double" | "fp64" => Ok(Kind::Double),
        _ => Err(Error::Dtype(format!(
            "unknown dtype {name:?}: expected \"float32\", \"bfloat16\", \"float16\" or \"float64\""
        ))),
    }
}

/// The canonical name of a dtype, as torch prints it without the `torch.` prefix.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Int16 => "int16",
        Kind::Int8 => "int8",
        Kind::Uint8 => "uint8",
        Kind::Bool => "bool",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device(" CPU ").unwrap(), Device::Cpu);
    }

    #[test]
    fn bad_devices_are_errors() {
        assert!(matches!(parse_device("tpu"), Err(Error::Device(_))));
        assert!(matches!(parse_device("cuda:x"), Err(Error::Device(_))));
        if tch::Cuda::device_count() == 0 {
            let err = parse_device("cuda").unwrap_err().to_string();
            assert!(err.contains("not available"), "{err}");
        }
    }

    #[test]
    fn dtypes_parse_and_print() {
        for (name, kind) in [
            ("float32", Kind::Float),
            ("bfloat16", Kind::BFloat16),
            ("half", Kind::Half),
        ] {
            assert_eq!(parse_dtype(name).unwrap(), kind);
        }
        assert_eq!(dtype_name(parse_dtype("torch.float16").unwrap()), "float16");
        assert!(matches!(parse_dtype("int8"), Err(Error::Dtype(_))));
    }
}
