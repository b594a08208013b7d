use super::*;
use std::path::PathBuf;
use tch::Device;

const CPU: Device = Device::Cpu;

/// Runs `script` with the test Python and `args`; its standard output.
fn run_py(script: &str, args: &[&str]) -> String {
    crate::testing::run_py(script, args, "")
}

fn raw(t: &Tensor) -> Vec<u8> {
    crate::io::safetensors::tensor_bytes(t).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn sample() -> Vec<(String, Tensor)> {
    tch::manual_seed(7);
    let v = |n: &str, t: Tensor| (n.to_string(), t);
    vec![
        v("f32", Tensor::randn([3, 4], (Kind::Float, CPU))),
        v(
            "f16",
            Tensor::randn([5], (Kind::Float, CPU)).to_kind(Kind::Half),
        ),
        v(
            "bf16",
            Tensor::randn([2, 3], (Kind::Float, CPU)).to_kind(Kind::BFloat16),
        ),
        v("f64_0d", Tensor::scalar_tensor(2.5, (Kind::Double, CPU))),
        v("i64_empty", Tensor::zeros([0], (Kind::Int64, CPU))),
        v("i32_3x0x2", Tensor::zeros([3, 0, 2], (Kind::Int, CPU))),
        v("i64", Tensor::from_slice(&[-(1i64 << 52), -1, 0, 1 << 40])),
        v("i32", Tensor::from_slice(&[i32::MIN, 5, i32::MAX])),
        v("bool", Tensor::from_slice(&[true, false, true])),
        v(
            "u8",
            Tensor::arange(8, (Kind::Uint8, CPU)).reshape([2, 2, 2]),
        ),
        v(
            "transposed",
            Tensor::randn([3, 5], (Kind::Float, CPU)).transpose(0, 1),
        ),
        v(
            "base_model.model.layers.0.lora_A.weight",
            Tensor::ones([1, 1], (Kind::Float, CPU)),
        ),
    ]
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Float => "torch.float32",
        Kind::Half => "torch.float16",
        Kind::BFloat16 => "torch.bfloat16",
        Kind::Double => "torch.float64",
        Kind::Int64 => "torch.int64",
        Kind::Int => "torch.int32",
        Kind::Bool => "torch.bool",
        Kind::Uint8 => "torch.uint8",
        _ => "?",
    }
}

/// `path` with a zip of `records` under `archive/`.
fn zip_file(dir: &Path, archive: &str, records: &[(&str, &[u8])]) -> PathBuf {
    let recs: Vec<_> = records
        .iter()
        .map(|(n, d)| (n.to_string(), d.to_vec()))
        .collect();
    let p = dir.join("f.bin");
    std::fs::write(&p, zip_records(archive, &recs).unwrap()).unwrap();
    p
}

fn adapter_msg(r: Result<Vec<(String, Tensor)>>) -> String {
    match r {
        Err(Error::AdapterFormat { msg, .. }) => msg,
        Err(e) => panic!("expected AdapterFormat, got {e:?}"),
        Ok(_) => panic!("expected AdapterFormat, got Ok"),
    }
}

#[test]
fn round_trip_is_exact_and_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("adapter_model.bin");
    let src = sample();
    write_state_dict(&p, &src).unwrap();
    let back = read_state_dict(&p).unwrap();
    assert_eq!(back.len(), src.len());
    for ((n1, t1), (n2, t2)) in src.iter().zip(&back) {
        assert_eq!(n1, n2);
        assert_eq!(t1.kind(), t2.kind(), "{n1}");
        assert_eq!(t1.size(), t2.size(), "{n1}");
        assert_eq!(raw(t1), raw(t2), "{n1}");
    }
    let bytes = std::fs::read(&p).unwrap();
    let mut zip = ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
    assert_eq!(zip.name_for_index(0), Some("adapter_model/data.pkl"));
    for i in 0..zip.len() {
        let f = zip.by_index(i).unwrap();
        assert_eq!(f.compression(), CompressionMethod::Stored);
        if f.name().contains("/data/") {
            assert_eq!(f.data_start() % 64, 0, "{}", f.name());
        }
    }
}

const TORCH_SAVE: &str = r#"
import sys, json, collections, zipfile, torch
out = sys.argv[1]
base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
shared = torch.arange(10, dtype=torch.int64) * 3 - 7
d = collections.OrderedDict()
d["base"] = base
d["view"] = base[1:, 2:4]
d["t"] = base.t()
d["bf16"] = torch.tensor([1.5, -2.25, 3.0e38], dtype=torch.bfloat16)
d["f16"] = torch.tensor([0.5, -65504.0], dtype=torch.float16)
d["f64"] = torch.tensor(3.25, dtype=torch.float64)
d["i32"] = torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32)
d["bool"] = torch.tensor([True, False, True])
d["u8"] = torch.tensor([0, 255, 7], dtype=torch.uint8)
d["empty"] = torch.zeros(0, 3)
d["first"] = shared[:4]
d["second"] = shared[4:].view(2, 3)
d["param"] = torch.nn.Parameter(torch.ones(2, 2))
torch.save(d, out + "/ordered.bin")
torch.save(dict(d), out + "/plain.bin", pickle_protocol=4)
with zipfile.ZipFile(out + "/ordered.bin") as src, zipfile.ZipFile(out + "/deflated.bin", "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        dst.writestr("renamed/" + info.filename.split("/", 1)[1], src.read(info.filename))
exp = {k: [str(v.dtype), list(v.shape), v.detach().double().flatten().tolist()] for k, v in d.items()}
json.dump({"order": list(d), "tensors": exp}, open(out + "/expected.json", "w"))
"#;

#[test]
fn reads_files_written_by_torch_save() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    run_py(TORCH_SAVE, &[d]);
    let exp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("expected.json")).unwrap()).unwrap();
    let order: Vec<String> = serde_json::from_value(exp["order"].clone()).unwrap();
    for file in ["ordered.bin", "plain.bin", "deflated.bin"] {
        let sd = read_state_dict(&dir.path().join(file)).unwrap();
        let names: Vec<_> = sd.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, order, "{file}");
        for (n, t) in &sd {
            let (dtype, shape, vals): (String, Vec<i64>, Vec<f64>) =
                serde_json::from_value(exp["tensors"][n].clone()).unwrap();
            assert_eq!(kind_name(t.kind()), dtype, "{file} {n}");
            assert_eq!(t.size(), shape, "{file} {n}");
            assert_eq!(values(t), vals, "{file} {n}");
        }
        let get = |k: &str| &sd.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(get("view").stride(), [6, 1]);
        assert_eq!(get("t").stride(), [1, 6]);
        assert_eq!(
            get("view").data_ptr() as usize,
            get("base").data_ptr() as usize + 8 * 4
        );
        assert_eq!(
            get("second").data_ptr() as usize,
            get("first").data_ptr() as usize + 4 * 8
        );
    }
}

const TORCH_LOAD: &str = r#"
import sys, json, torch
exp = json.load(open(sys.argv[2]))
for mmap in (False, True):
    sd = torch.load(sys.argv[1], weights_only=True, mmap=mmap)
    assert list(sd) == exp["order"], (list(sd), exp["order"])
    for k, v in sd.items():
        dtype, shape, vals = exp["tensors"][k]
        assert str(v.dtype) == dtype, (k, v.dtype, dtype)
        assert list(v.shape) == shape, (k, v.shape, shape)
        assert v.double().flatten().tolist() == vals, (k, v, vals)
print("ok", len(exp["order"]))
"#;

#[test]
fn torch_load_reads_written_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("adapter_model.bin");
    let src = sample();
    write_state_dict(&p, &src).unwrap();
    let tensors: serde_json::Map<String, serde_json::Value> = src
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                serde_json::json!([kind_name(t.kind()), t.size(), values(t)]),
            )
        })
        .collect();
    let order: Vec<_> = src.iter().map(|(n, _)| n.clone()).collect();
    let exp = serde_json::json!({"order": order, "tensors": tensors});
    let e = dir.path().join("expected.json");
    std::fs::write(&e, exp.to_string()).unwrap();
    let out = run_py(TORCH_LOAD, &[p.to_str().unwrap(), e.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("ok {}", src.len()));
}

const EVIL: &str = r#"
import os, sys, builtins, torch
class Evil:
    def __init__(self, f, a): self.f, self.a = f, a
    def __reduce__(self): return (self.f, (self.a,))
out, cmd = sys.argv[1], "touch " + sys.argv[2]
torch.save({"w": torch.ones(2), "x": Evil(os.system, cmd)}, out + "/system.bin")
torch.save({"w": torch.ones(2), "x": Evil(os.system, cmd)}, out + "/system4.bin", pickle_protocol=4)
code = "__import__('os').system(%r)" % cmd
torch.save({"x": Evil(builtins.eval, code), "w": torch.ones(2)}, out + "/eval.bin")
"#;

#[test]
fn malicious_pickles_are_rejected_not_executed() {
    let dir = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let marker =
        std::env::temp_dir().join(format!("pwned-{}-{}", std::process::id(), nanos.as_nanos()));
    run_py(
        EVIL,
        &[dir.path().to_str().unwrap(), marker.to_str().unwrap()],
    );
    for (file, what) in [
        ("system.bin", "system"),
        ("system4.bin", "system"),
        ("eval.bin", "eval"),
    ] {
        let msg = adapter_msg(read_state_dict(&dir.path().join(file)));
        assert!(
            msg.contains("is not allowed") && msg.contains(what),
            "{file}: {msg}"
        );
        assert!(!marker.exists(), "{file} executed code");
    }
}

#[test]
fn crafted_pickles_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[u8], &str); 19] = [
        (
            b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.",
            "global os.system is not allowed",
        ),
        (
            b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.",
            "global builtins.eval is not allowed",
        ),
        (
            b"\x80\x02cposix\nsystem\n.",
            "global posix.system is not allowed",
        ),
        (
            b"\x80\x04\x8c\x02os\x8c\x06system\x93.",
            "global os.system is not allowed",
        ),
        (
            b"\x80\x02ctorch\nload\n.",
            "global torch.load is not allowed",
        ),
        (
            b"\x80\x02ctorch._utils\n_rebuild_tensor\n.",
            "is not allowed",
        ),
        (b"\x80\x02(ios\nsystem\n.", "opcode 0x69"),
        (b"\x80\x02}}b.", "opcode 0x62"),
        (b"\x80\x02ctorch\nFloatStorage\n)R.", "cannot be called"),
        (
            b"\x80\x02ccollections\nOrderedDict\n]\x85R.",
            "unsupported arguments",
        ),
        (b"\x80\x02K\x01.", "not a dict"),
        (b"\x80\x02}X\x01\x00\x00\x00aK\x01s.", "not a tensor"),
        // BINFLOAT (what `torch.save({"a": 1.5})` writes): read, then rejected as a non-tensor.
        (
            b"\x80\x02}X\x01\x00\x00\x00aG?\xf8\x00\x00\x00\x00\x00\x00s.",
            "value of \"a\" is not a tensor",
        ),
        (b"\x80\x02G?\xf8\x00.", "truncated"),
        (b"\x80\x02}", "without STOP"),
        (b"\x80\x02R.", "underflow"),
        (b"\x80\x02}u.", "MARK missing"),
        (b"\x80\x02h\x05.", "memo"),
        (b"\x80\x02K\x01Q.", "tuple"),
    ];
    for (pkl, want) in cases {
        let p = zip_file(
            dir.path(),
            "archive",
            &[("data.pkl", pkl), ("version", &b"3\n"[..])],
        );
        let msg = adapter_msg(read_state_dict(&p));
        assert!(msg.contains(want), "{pkl:?}: {msg}");
    }
}

fn entry(
    class: &'static str,
    key: &str,
    numel: i64,
    size: &[i64],
    stride: &[i64],
) -> Entry<'static> {
    Entry {
        name: "w",
        class,
        key: key.into(),
        numel,
        size: size.into(),
        stride: stride.into(),
    }
}

#[test]
fn bad_storages_and_containers_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let f4: &[u8] = &[0u8; 16];
    let cases: Vec<(Vec<Entry>, &[u8], &str)> = vec![
        (
            vec![entry("FloatStorage", "0", 100, &[100], &[1])],
            f4,
            "holds 16 bytes, expected 400",
        ),
        (
            vec![entry("FloatStorage", "7", 4, &[4], &[1])],
            f4,
            "archive/data/7",
        ),
        (
            vec![entry("FloatStorage", "0", 4, &[5], &[1])],
            f4,
            "out of bounds",
        ),
        (vec![entry("FloatStorage", "0", 4, &[2], &[2])], f4, ""),
        (
            vec![entry("FloatStorage", "0", 4, &[-1], &[1])],
            f4,
            "invalid tensor view",
        ),
        (
            vec![entry("FloatStorage", "0", 4, &[2, 2], &[i64::MAX, 1])],
            f4,
            "out of bounds",
        ),
        (
            vec![entry("FloatStorage", "0", 4, &[2], &[1, 1])],
            f4,
            "invalid tensor view",
        ),
        (
            vec![entry("BoolStorage", "0", 16, &[16], &[1])],
            &[2u8; 16][..],
            "0/1",
        ),
        (
            vec![
                entry("FloatStorage", "0", 4, &[4], &[1]),
                entry("IntStorage", "0", 4, &[4], &[1]),
            ],
            f4,
            "different dtypes",
        ),
    ];
    for (entries, data, want) in cases {
        let pkl = encode::encode(&entries);
        let p = zip_file(
            dir.path(),
            "archive",
            &[("data.pkl", &pkl[..]), ("data/0", data)],
        );
        let r = read_state_dict(&p);
        if want.is_empty() {
            assert!(r.is_ok());
            continue;
        }
        let msg = adapter_msg(r);
        assert!(msg.contains(want), "{want}: {msg}");
    }
    let ok = encode::encode(&[entry("FloatStorage", "0", 4, &[4], &[1])]);
    let p = zip_file(
        dir.path(),
        "a",
        &[
            ("data.pkl", &ok[..]),
            ("data/0", f4),
            ("byteorder", &b"big"[..]),
        ],
    );
    assert!(adapter_msg(read_state_dict(&p)).contains("byteorder"));
    let p = zip_file(dir.path(), "", &[("data.pkl", &ok[..]), ("data/0", f4)]);
    assert!(adapter_msg(read_state_dict(&p)).contains("archive folder"));
    std::fs::write(
        &p,
        b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19",
    )
    .unwrap();
    assert!(adapter_msg(read_state_dict(&p)).contains("legacy"));
    std::fs::write(&p, b"").unwrap();
    assert!(adapter_msg(read_state_dict(&p)).contains("not a torch.save zip"));
    // LONG1 integers (numel >= 2^31) parse; the storage is then simply missing.
    let big = encode::encode(&[entry("ByteStorage", "9", 1 << 40, &[1 << 40], &[1])]);
    let st = pickle::parse(&big).map_err(|e| e.to_string()).unwrap();
    assert_eq!(st.storages[0].numel, 1 << 40);
    let err = read_state_dict(Path::new("/nonexistent-loratch/adapter_model.bin")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}

#[test]
fn truncated_and_corrupted_inputs_error_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.bin");
    write_state_dict(&good, &sample()[..4]).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let p = dir.path().join("bad.bin");
    for n in 0..bytes.len() {
        std::fs::write(&p, &bytes[..n]).unwrap();
        adapter_msg(read_state_dict(&p));
    }
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= (next() as u8) | 1;
        std::fs::write(&p, &b).unwrap();
        let _ = read_state_dict(&p); // must not panic; most corruptions fail the CRC check
    }
    // Valid zips around broken pickles.
    let src = sample();
    let entries: Vec<_> = src
        .iter()
        .enumerate()
        .map(|(i, (n, t))| Entry {
            name: n,
            class: pickle::storage_class(t.kind()).unwrap(),
            key: i.to_string(),
            numel: t.numel() as i64,
            size: t.size(),
            stride: t.contiguous().stride(),
        })
        .collect();
    let pkl = encode::encode(&entries);
    let data: Vec<_> = src.iter().map(|(_, t)| raw(t)).collect();
    let names: Vec<_> = (0..src.len()).map(|i| format!("data/{i}")).collect();
    let with_pkl = |pkl: &[u8]| {
        let mut recs = vec![("data.pkl", pkl)];
        recs.extend(
            names
                .iter()
                .map(String::as_str)
                .zip(data.iter().map(Vec::as_slice)),
        );
        zip_file(dir.path(), "archive", &recs)
    };
    assert_eq!(read_state_dict(&with_pkl(&pkl)).unwrap().len(), src.len());
    for n in 0..pkl.len() {
        adapter_msg(read_state_dict(&with_pkl(&pkl[..n])));
    }
    for _ in 0..3000 {
        let mut b = pkl.clone();
        for _ in 0..1 + next() % 3 {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        let _ = read_state_dict(&with_pkl(&b));
    }
}
