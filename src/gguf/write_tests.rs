//! Tests of the GGUF writer: files read back by loratch's own parser and by gguf-py 0.19's
//! `GGUFReader` (the test Python, `LORATCH_TEST_PYTHON`), and refused inputs that leave no file.
use super::*;
use crate::testing::run_py;
use serde_json::Value as Json;

/// Metadata of every value type: scalars, arrays of numbers, strings and bools, nested arrays.
fn every_value() -> Vec<(&'static str, Value)> {
    let s = |x: &str| Value::String(x.to_string());
    vec![
        ("k.u8", Value::U8(200)),
        ("k.i8", Value::I8(-100)),
        ("k.u16", Value::U16(60000)),
        ("k.i16", Value::I16(-30000)),
        ("k.u32", Value::U32(4_000_000_000)),
        ("k.i32", Value::I32(-2_000_000_000)),
        ("k.u64", Value::U64((1 << 63) + 5)),
        ("k.i64", Value::I64(-(1 << 62))),
        ("k.f32", Value::F32(0.1)),
        ("k.f64", Value::F64(0.1)),
        ("k.bool", Value::Bool(true)),
        ("k.str", s("h\u{e9}llo \u{2713}")),
        ("k.empty", s("")),
        ("k.a_str", Value::Array(vec![s("a"), s(""), s("\u{fc}")])),
        ("k.a_i32", Value::Array(vec![Value::I32(1), Value::I32(-2)])),
        (
            "k.a_f32",
            Value::Array(vec![Value::F32(0.5), Value::F32(-1.25)]),
        ),
        (
            "k.a_bool",
            Value::Array(vec![Value::Bool(true), Value::Bool(false)]),
        ),
        ("k.a_u64", Value::Array(vec![Value::U64(u64::MAX)])),
        (
            "k.n_int",
            Value::Array(vec![
                Value::Array(vec![Value::U32(1), Value::U32(2)]),
                Value::Array(vec![Value::U32(3)]),
            ]),
        ),
    ]
}

/// Seeded values in [-2, 2).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            x as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

/// Tensors `w.<type>` of shape [3, 64] in each type the quantizer writes, plus a 1-D F32 one.
fn tensors() -> Vec<(String, Vec<i64>, QType, Vec<u8>)> {
    let mut out = vec![];
    for (i, ty) in [
        QType::F32,
        QType::F16,
        QType::BF16,
        QType::Q8_0,
        QType::Q4_0,
    ]
    .into_iter()
    .enumerate()
    {
        let bytes = quant::quantize(ty, &values(3 * 64, i as u32)).unwrap();
        out.push((format!("w.{ty}"), vec![3, 64], ty, bytes));
    }
    let v = quant::quantize(QType::F32, &values(7, 9)).unwrap();
    out.push(("w.vec".into(), vec![7], QType::F32, v));
    out
}

fn writer() -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    for (k, v) in every_value() {
        w.set(k, v).unwrap();
    }
    for (name, shape, ty, bytes) in tensors() {
        w.add_tensor(&name, &shape, ty, bytes).unwrap();
    }
    w
}

#[test]
fn round_trips_through_the_parser() {
    for align in [None, Some(64u32)] {
        let mut w = writer();
        if let Some(a) = align {
            w.set("general.alignment", Value::U32(a)).unwrap();
        }
        let bytes = w.to_bytes().unwrap();
        let f = GgufFile::from_bytes(&bytes, Path::new("t.gguf")).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), align.map_or(32, u64::from));
        for (k, v) in every_value() {
            assert_eq!(f.get(k), Some(&v), "{k}");
        }
        assert_eq!(
            f.metadata().len(),
            every_value().len() + usize::from(align.is_some())
        );
        let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        let want: Vec<String> = tensors().into_iter().map(|t| t.0).collect();
        assert_eq!(names, want);
        for (name, shape, ty, data) in tensors() {
            let t = f.tensor(&name).unwrap();
            assert_eq!((t.shape(), t.ty), (shape, ty), "{name}");
            assert_eq!(t.offset % f.alignment(), 0, "{name}");
            assert_eq!(f.tensor_bytes(&name).unwrap(), &data[..], "{name}");
        }
    }
}

/// Reads `argv[1]` with gguf-py and prints its fields (not `GGUF.*`) and tensors, dequantized.
const PY_READ: &str = r#"
import sys, json, numpy as np
from gguf import GGUFReader, quants
r = GGUFReader(sys.argv[1])
fields = {k: {"types": [int(t) for t in f.types], "value": f.contents()}
          for k, f in r.fields.items() if not k.startswith("GGUF.")}
tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                    "values": quants.dequantize(t.data, t.tensor_type).astype(np.float64).ravel().tolist()}
           for t in r.tensors}
print(json.dumps({"fields": fields, "tensors": tensors}))
"#;

#[test]
fn gguf_py_reads_what_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    writer().write(&path).unwrap();
    let out: Json = serde_json::from_str(&run_py(PY_READ, &[path.to_str().unwrap()], "")).unwrap();
    let ours = GgufFile::open(&path).unwrap();
    for (k, v) in every_value() {
        let f = &out["fields"][k];
        let mut types = vec![Json::from(write::type_id(&v))];
        if let Value::Array(items) = &v {
            types.push(write::type_id(&items[0]).into());
            if let Value::Array(inner) = &items[0] {
                types.push(write::type_id(&inner[0]).into());
            }
        }
        assert_eq!(f["types"], Json::Array(types), "{k}");
        // gguf-py's contents() flattens nested arrays (the reader's own tests see the nesting).
        assert_eq!(f["value"], flat(to_json(&v)), "{k}");
    }
    for (name, shape, ty, _) in tensors() {
        let t = &out["tensors"][&name];
        assert_eq!(t["type"], ty.name().to_uppercase().as_str(), "{name}");
        let dims: Vec<i64> = shape.iter().rev().copied().collect();
        assert_eq!(t["shape"], serde_json::json!(dims), "{name}");
        let theirs: Vec<f32> = t["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(theirs, ours.dequantize(&name).unwrap(), "{name}");
    }
}

/// An array of arrays as one flat array.
fn flat(v: Json) -> Json {
    match v {
        Json::Array(a) if a.iter().any(Json::is_array) => Json::Array(
            a.into_iter()
                .flat_map(|x| match flat(x) {
                    Json::Array(inner) => inner,
                    other => vec![other],
                })
                .collect(),
        ),
        other => other,
    }
}

/// A value as gguf-py's `contents()` gives it (f32 widened, nested arrays as lists).
fn to_json(v: &Value) -> Json {
    match v {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        Value::F32(x) => (*x as f64).into(),
        Value::F64(x) => (*x).into(),
        Value::Bool(x) => (*x).into(),
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
    }
}

#[test]
fn bad_tensors_and_values_are_refused() {
    let mut w = GgufWriter::new();
    let f32s = |n: usize| vec![0u8; 4 * n];
    w.add_tensor("a", &[2, 2], QType::F32, f32s(4)).unwrap();
    assert!(matches!(
        w.add_tensor("a", &[1], QType::F32, f32s(1)),
        Err(Error::Shape(_))
    ));
    assert!(w.add_tensor("b", &[2, 2], QType::F32, f32s(3)).is_err());
    assert!(w
        .add_tensor(&"n".repeat(64), &[1], QType::F32, f32s(1))
        .is_err());
    assert!(w.add_tensor("c", &[2, 3], QType::Q8_0, vec![]).is_err());
    assert!(w
        .add_tensor("d", &[1, 1, 1, 1, 1], QType::F32, f32s(1))
        .is_err());
    assert!(w.add_tensor("e", &[0], QType::F32, vec![]).is_err());
    assert!(w.add_tensor("f", &[64], QType::Nf4, vec![0; 36]).is_err());
    let mixed = Value::Array(vec![Value::U32(1), Value::I32(1)]);
    assert!(matches!(w.set("k", mixed), Err(Error::Config(_))));
    assert!(w.set("general.alignment", Value::U32(48)).is_err());
    assert!(w.set("general.alignment", Value::U64(64)).is_err());
    w.set("k", Value::U8(1)).unwrap();
    w.set("k", Value::U8(2)).unwrap();
    assert_eq!(w.get("k"), Some(&Value::U8(2)));
}

#[test]
fn a_failed_write_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    let mut w = writer();
    w.add_tensor_with("late", &[4], QType::F32, || Ok(vec![0u8; 15]))
        .unwrap();
    assert!(matches!(w.write(&path), Err(Error::Shape(_))));
    let mut w = writer();
    w.add_tensor_with("late", &[4], QType::F32, || {
        Err(Error::NonFinite("boom".into()))
    })
    .unwrap();
    assert!(matches!(w.write(&path), Err(Error::NonFinite(_))));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // An existing file is replaced only by a complete one.
    std::fs::write(&path, b"old").unwrap();
    let mut w = writer();
    w.add_tensor_with("late", &[4], QType::F32, || Ok(vec![0u8; 1]))
        .unwrap();
    assert!(w.write(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
