//! AdamW, gradient clipping and state save/restore checked against torch (run through the
//! test Python, `LORATCH_TEST_PYTHON`), and the optimizer's argument checks.
use super::{AdamW, AdamWConfig};
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;
const LR: f64 = 1e-2;
const WD: f64 = 0.1;
const BETAS: (f64, f64) = (0.9, 0.95);
const EPS: f64 = 1e-8;

/// [`AdamW::new`] with the hyperparameters as separate arguments.
fn new_adamw(
    params: Vec<Tensor>,
    lr: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
) -> Result<AdamW> {
    let config = AdamWConfig {
        lr,
        betas,
        eps,
        weight_decay,
    };
    AdamW::new(params, config)
}

/// Runs `script` with the test Python, `input` on stdin; its stdout parsed as JSON.
fn run_py(script: &str, input: &Value) -> Value {
    serde_json::from_str(&crate::testing::run_py(script, &[], &input.to_string())).unwrap()
}

/// The Python side: tensors from `{"shape", "dtype", "values"}` specs.
const PY_COMMON: &str = r#"
import json, sys, torch
spec = json.load(sys.stdin)
def mk(values, meta):
    t = torch.tensor(values, dtype=torch.float64).reshape(meta["shape"])
    return t.to(getattr(torch, meta["dtype"])).float()
def flat(t):
    return t.detach().double().flatten().tolist()
"#;

/// torch AdamW (fp32, single-tensor) over fp32 copies of the parameters; `null` grads are
/// `None` (the parameter is skipped).
const PY_ADAMW: &str = r#"
params = [mk(p["values"], p).requires_grad_() for p in spec["params"]]
h = spec["hyper"]
opt = torch.optim.AdamW(params, lr=h["lr"], weight_decay=h["wd"], betas=tuple(h["betas"]),
                        eps=h["eps"], foreach=False, fused=False)
for step in spec["steps"]:
    for g in opt.param_groups:
        g["lr"] = step["lr"]
    for p, g, meta in zip(params, step["grads"], spec["params"]):
        p.grad = None if g is None else mk(g, meta)
    opt.step()
st = [opt.state[p] for p in params]
print(json.dumps({
    "params": [flat(p) for p in params],
    "exp_avg": [flat(s["exp_avg"]) for s in st],
    "exp_avg_sq": [flat(s["exp_avg_sq"]) for s in st],
    "step": [float(s["step"]) for s in st],
}))
"#;

const PY_CLIP: &str = r#"
out = []
for case in spec["cases"]:
    params = [mk(p["values"], p).requires_grad_() for p in spec["params"]]
    for p, g, meta in zip(params, case["grads"], spec["params"]):
        p.grad = None if g is None else mk(g, meta)
    total = torch.nn.utils.clip_grad_norm_(params, case["max_norm"])
    out.append({"total": float(total),
                "grads": [None if p.grad is None else flat(p.grad) for p in params]})
print(json.dumps(out))
"#;

struct Meta {
    shape: Vec<i64>,
    kind: Kind,
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        k => panic!("no name for {k:?}"),
    }
}

fn numel(shape: &[i64]) -> usize {
    shape.iter().product::<i64>() as usize
}

/// Deterministic values `scale * sin(i * 0.37 + phase)`.
fn wave(n: usize, phase: f64, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|i| scale * (i as f64 * 0.37 + phase).sin())
        .collect()
}

fn tensor(values: &[f64], meta: &Meta) -> Tensor {
    Tensor::from_slice(values)
        .reshape(meta.shape.as_slice())
        .to_kind(meta.kind)
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn json_vec(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn meta_json(metas: &[Meta], init: &[Vec<f64>]) -> Value {
    Value::Array(
        metas
            .iter()
            .zip(init)
            .map(|(m, v)| json!({"shape": m.shape, "dtype": kind_name(m.kind), "values": v}))
            .collect(),
    )
}

/// Sets each parameter's `.grad` to `g` (after `zero_grad`) by backpropagating `sum(p * g)`;
/// `None` leaves the gradient as it is.
fn set_grads(opt: &mut AdamW, grads: &[Option<Tensor>]) {
    opt.zero_grad().unwrap();
    for (p, g) in opt.params().iter().zip(grads) {
        if let Some(g) = g {
            (p * g).sum(p.kind()).backward();
        }
    }
}

fn leaf(values: &[f64], meta: &Meta) -> Tensor {
    tensor(values, meta).set_requires_grad(true)
}

/// The gradient of parameter `k` at step `t`, or `None` where the test skips it.
fn grad_values(k: usize, t: usize, n: usize) -> Option<Vec<f64>> {
    // Parameter 1 gets no gradient for its first two steps (torch skips it; so do we).
    if k == 1 && t < 2 {
        return None;
    }
    let scale = [0.1, 1.0, 0.02, 3.0][k % 4];
    Some(wave(n, 1.3 * t as f64 + 0.7 * k as f64, scale))
}

/// Runs 5 AdamW steps (lr changed at step 3) in Rust and in torch (fp32 copies) and
/// compares parameters (or masters) and moments.
fn check_against_torch(kinds: &[Kind]) {
    let metas: Vec<Meta> = [vec![3, 4], vec![5], vec![2, 3, 2], vec![7]]
        .into_iter()
        .zip(kinds)
        .map(|(shape, &kind)| Meta { shape, kind })
        .collect();
    let init: Vec<Vec<f64>> = metas
        .iter()
        .enumerate()
        .map(|(k, m)| wave(numel(&m.shape), k as f64, 1.0))
        .collect();
    let params: Vec<Tensor> = metas.iter().zip(&init).map(|(m, v)| leaf(v, m)).collect();
    // The caller's handles: they must see the optimizer's in-place updates.
    let handles: Vec<Tensor> = params.iter().map(|p| p.shallow_clone()).collect();
    let mut opt = new_adamw(params, LR, WD, BETAS, EPS).unwrap();
    let mut steps = Vec::new();
    for t in 0..5 {
        let lr = if t < 3 { LR } else { LR * 0.5 };
        opt.set_lr(lr).unwrap();
        let gv: Vec<Option<Vec<f64>>> = metas
            .iter()
            .enumerate()
            .map(|(k, m)| grad_values(k, t, numel(&m.shape)))
            .collect();
        let grads: Vec<Option<Tensor>> = gv
            .iter()
            .zip(&metas)
            .map(|(g, m)| g.as_ref().map(|g| tensor(g, m)))
            .collect();
        set_grads(&mut opt, &grads);
        opt.step().unwrap();
        steps.push(json!({"lr": lr, "grads": gv}));
    }
    assert_eq!(opt.step_count(), 5);
    let spec = json!({
        "params": meta_json(&metas, &init),
        "hyper": {"lr": LR, "wd": WD, "betas": [BETAS.0, BETAS.1], "eps": EPS},
        "steps": steps,
    });
    let reference = run_py(&format!("{PY_COMMON}{PY_ADAMW}"), &spec);
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    for (k, (h, m)) in handles.iter().zip(&metas).enumerate() {
        let want = json_vec(&reference["params"][k]);
        let master = state.get(&format!("state.{k}.master"));
        assert_eq!(master.is_some(), m.kind != Kind::Float, "param {k}");
        let got = match master {
            Some(master) => {
                // The parameter is its fp32 master rounded to its dtype.
                assert!(h.equal(&master.to_kind(m.kind)), "param {k}");
                values(master)
            }
            None => values(h),
        };
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-6, "param {k} ({:?}): max abs diff {d}", m.kind);
        for f in ["exp_avg", "exp_avg_sq"] {
            let got = values(&state[&format!("state.{k}.{f}")]);
            let d = max_abs_diff(&got, &json_vec(&reference[f][k]));
            assert!(d <= 1e-6, "param {k} {f}: max abs diff {d}");
        }
        let step = state[&format!("state.{k}.step")].int64_value(&[]);
        assert_eq!(
            step as f64,
            reference["step"][k].as_f64().unwrap(),
            "param {k}"
        );
    }
    // The update did move every parameter.
    for (h, v) in handles.iter().zip(&init) {
        assert!(max_abs_diff(&values(h), v) > 1e-3);
    }
}

#[test]
fn adamw_fp32_matches_torch() {
    check_against_torch(&[Kind::Float; 4]);
}

#[test]
fn adamw_bf16_fp16_masters_match_torch_fp32() {
    check_against_torch(&[Kind::BFloat16, Kind::Float, Kind::Half, Kind::BFloat16]);
}

#[test]
fn clip_grad_norm_matches_torch() {
    let metas = [
        Meta {
            shape: vec![3, 4],
            kind: Kind::Float,
        },
        Meta {
            shape: vec![5],
            kind: Kind::Float,
        },
        Meta {
            shape: vec![2, 2],
            kind: Kind::Float,
        },
    ];
    let init: Vec<Vec<f64>> = metas
        .iter()
        .map(|m| wave(numel(&m.shape), 0.0, 1.0))
        .collect();
    let mut cases = Vec::new();
    let mut rust = Vec::new();
    // Clipping, no clipping, and a parameter without gradient (left out of the norm).
    for (max_norm, with_last) in [(0.5, true), (100.0, true), (0.25, false)] {
        let params: Vec<Tensor> = metas.iter().zip(&init).map(|(m, v)| leaf(v, m)).collect();
        let mut opt = new_adamw(params, LR, WD, BETAS, EPS).unwrap();
        let gv: Vec<Option<Vec<f64>>> = metas
            .iter()
            .enumerate()
            .map(|(k, m)| {
                (with_last || k < 2).then(|| wave(numel(&m.shape), k as f64, 0.7 + k as f64))
            })
            .collect();
        let grads: Vec<Option<Tensor>> = gv
            .iter()
            .zip(&metas)
            .map(|(g, m)| g.as_ref().map(|g| tensor(g, m)))
            .collect();
        set_grads(&mut opt, &grads);
        let total = opt.clip_grad_norm(max_norm).unwrap();
        let clipped: Vec<Option<Vec<f64>>> = opt
            .params()
            .iter()
            .map(|p| {
                let g = p.grad();
                g.defined().then(|| values(&g))
            })
            .collect();
        rust.push((total, clipped));
        cases.push(json!({"max_norm": max_norm, "grads": gv}));
    }
    let spec = json!({"params": meta_json(&metas, &init), "cases": cases});
    let reference = run_py(&format!("{PY_COMMON}{PY_CLIP}"), &spec);
    for (c, (total, clipped)) in rust.iter().enumerate() {
        let want = reference[c]["total"].as_f64().unwrap();
        assert!(
            (total - want).abs() <= 1e-6 * want,
            "case {c}: {total} vs {want}"
        );
        for (k, g) in clipped.iter().enumerate() {
            let w = &reference[c]["grads"][k];
            match g {
                None => assert!(w.is_null(), "case {c} param {k}"),
                Some(g) => {
                    let d = max_abs_diff(g, &json_vec(w));
                    assert!(d <= 1e-7, "case {c} param {k}: max abs diff {d}");
                }
            }
        }
    }
    // Case 0 clips (the norm is well above 0.5), case 1 does not.
    assert!(rust[0].0 > 1.0 && rust[1].0 < 100.0);
}

#[test]
fn clip_grad_norm_edge_cases() {
    let m = Meta {
        shape: vec![4],
        kind: Kind::BFloat16,
    };
    let p = leaf(&[1.0, 2.0, 3.0, 4.0], &m);
    let mut opt = new_adamw(vec![p], LR, WD, BETAS, EPS).unwrap();
    assert_eq!(opt.clip_grad_norm(1.0).unwrap(), 0.0); // no gradient yet
    assert!(matches!(opt.clip_grad_norm(0.0), Err(Error::Config(_))));
    assert!(matches!(
        opt.clip_grad_norm(f64::NAN),
        Err(Error::Config(_))
    ));
    // bf16 gradient [3, 4, 0, 0]: fp32 norm 5, scaled by 1/5 (rounded to bf16).
    set_grads(&mut opt, &[Some(tensor(&[3.0, 4.0, 0.0, 0.0], &m))]);
    let total = opt.clip_grad_norm(1.0).unwrap();
    assert!((total - 5.0).abs() < 1e-6);
    let g = values(&opt.params()[0].grad());
    let coef = (1.0f32 / (5.0f32 + 1e-6)) as f64;
    let coef = values(&Tensor::from(coef).to_kind(Kind::BFloat16))[0];
    let want = values(&tensor(&[3.0 * coef, 4.0 * coef, 0.0, 0.0], &m));
    assert_eq!(g, want);
    // Non-finite: returned as is, gradients untouched.
    set_grads(
        &mut opt,
        &[Some(tensor(&[f64::INFINITY, 1.0, 0.0, 0.0], &m))],
    );
    assert_eq!(opt.clip_grad_norm(1.0).unwrap(), f64::INFINITY);
    assert_eq!(values(&opt.params()[0].grad())[1], 1.0);
    set_grads(&mut opt, &[Some(tensor(&[f64::NAN, 1.0, 0.0, 0.0], &m))]);
    assert!(opt.clip_grad_norm(1.0).unwrap().is_nan());
    assert_eq!(values(&opt.params()[0].grad())[1], 1.0);
}

type Named = Vec<(String, Tensor)>;

fn deep_copy(state: &[(String, Tensor)]) -> Named {
    state.iter().map(|(n, t)| (n.clone(), t.copy())).collect()
}

#[test]
fn state_round_trip_continues_identically() {
    let metas = [
        Meta {
            shape: vec![3, 4],
            kind: Kind::Float,
        },
        Meta {
            shape: vec![5],
            kind: Kind::BFloat16,
        },
        Meta {
            shape: vec![6],
            kind: Kind::Float,
        },
    ];
    let init: Vec<Vec<f64>> = metas
        .iter()
        .enumerate()
        .map(|(k, m)| wave(numel(&m.shape), k as f64, 1.0))
        .collect();
    let grads_at = |t: usize| -> Vec<Option<Tensor>> {
        metas
            .iter()
            .enumerate()
            .map(|(k, m)| grad_values(k, t, numel(&m.shape)).map(|g| tensor(&g, m)))
            .collect()
    };
    let mk = || -> AdamW {
        let params = metas.iter().zip(&init).map(|(m, v)| leaf(v, m)).collect();
        new_adamw(params, LR, WD, BETAS, EPS).unwrap()
    };
    let mut a = mk();
    for t in 0..3 {
        set_grads(&mut a, &grads_at(t));
        a.step().unwrap();
    }
    let saved = deep_copy(&a.state_tensors());
    let saved_params: Vec<Tensor> = a.params().iter().map(|p| p.copy()).collect();
    let names: Vec<&str> = saved.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "state.0.exp_avg",
            "state.0.exp_avg_sq",
            "state.0.step",
            "state.1.exp_avg",
            "state.1.exp_avg_sq",
            "state.1.master",
            "state.1.step",
            "state.2.exp_avg",
            "state.2.exp_avg_sq",
            "state.2.step",
        ]
    );
    // 12+5+6 elements: two fp32 moments each, plus the 5-element fp32 master.
    assert_eq!(a.state_bytes(), (2 * (12 + 5 + 6) + 5) * 4);

    // A fresh optimizer over freshly built parameters (the bf16 one is restored from the
    // master; the fp32 ones from the saved weights, as a checkpoint of the model would).
    let mut b = mk();
    tch::no_grad(|| {
        for (k, p) in b.params().iter().enumerate() {
            if metas[k].kind == Kind::Float {
                p.shallow_clone().copy_(&saved_params[k]);
            }
        }
    });
    b.load_state(&saved, a.step_count()).unwrap();
    assert_eq!(b.step_count(), 3);
    for (pa, pb) in a.params().iter().zip(b.params()) {
        assert!(pa.equal(pb));
    }
    for t in 3..6 {
        for opt in [&mut a, &mut b] {
            opt.set_lr(LR * 0.7).unwrap();
            set_grads(opt, &grads_at(t));
            opt.step().unwrap();
        }
    }
    for (pa, pb) in a.params().iter().zip(b.params()) {
        assert!(pa.equal(pb));
    }
    for ((na, ta), (nb, tb)) in a.state_tensors().iter().zip(&b.state_tensors()) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na}");
    }
}

#[test]
fn load_state_rejects_mismatches() {
    let m32 = Meta {
        shape: vec![4],
        kind: Kind::Float,
    };
    let m16 = Meta {
        shape: vec![2],
        kind: Kind::BFloat16,
    };
    let mk = || {
        let params = vec![leaf(&[0.0; 4], &m32), leaf(&[0.0; 2], &m16)];
        new_adamw(params, LR, WD, BETAS, EPS).unwrap()
    };
    let good = deep_copy(&mk().state_tensors());
    let mut opt = mk();
    opt.load_state(&good, 7).unwrap();
    assert_eq!(opt.step_count(), 7);
    let with = |f: &dyn Fn(&mut Named)| {
        let mut s = deep_copy(&good);
        f(&mut s);
        mk().load_state(&s, 1)
    };
    let z = |n: i64| Tensor::zeros([n], (Kind::Float, CPU));
    assert!(matches!(
        with(&|s| s.push(("state.9.exp_avg".into(), z(4)))),
        Err(Error::State(_))
    ));
    assert!(matches!(
        with(&|s| s.push(("state.0.master".into(), z(4)))),
        Err(Error::State(_))
    ));
    assert!(matches!(
        with(&|s| s.push(("bogus".into(), z(4)))),
        Err(Error::State(_))
    ));
    assert!(matches!(
        with(&|s| s.push(("state.0.exp_avg".into(), z(4)))),
        Err(Error::State(_))
    ));
    assert!(matches!(
        with(&|s| s.retain(|(n, _)| n != "state.1.master")),
        Err(Error::State(_))
    ));
    assert!(matches!(
        with(&|s| s.retain(|(n, _)| n != "state.0.exp_avg_sq")),
        Err(Error::State(_))
    ));
    assert!(matches!(with(&|s| s[0].1 = z(5)), Err(Error::Shape(_))));
    assert!(matches!(
        with(&|s| s[0].1 = Tensor::zeros([4], (Kind::Int64, CPU))),
        Err(Error::Dtype(_))
    ));
    assert!(matches!(
        with(&|s| s[2].1 = Tensor::from(-1i64)),
        Err(Error::State(_))
    ));
    // Steps are optional; torch-style fp32 step tensors are accepted.
    let mut opt = mk();
    let mut s = deep_copy(&good);
    s.retain(|(n, _)| !n.ends_with(".step"));
    s.push(("state.1.step".into(), Tensor::from(4.0f32)));
    opt.load_state(&s, 9).unwrap();
    let st = opt.state_tensors();
    let step = |n: &str| st.iter().find(|(m, _)| m == n).unwrap().1.int64_value(&[]);
    assert_eq!((step("state.0.step"), step("state.1.step")), (9, 4));
}

#[test]
fn invalid_arguments_are_rejected() {
    let m = Meta {
        shape: vec![3],
        kind: Kind::Float,
    };
    let p = || vec![leaf(&[1.0, 2.0, 3.0], &m)];
    let cfg = |r: Result<AdamW>| assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
    cfg(new_adamw(p(), -1e-3, WD, BETAS, EPS));
    cfg(new_adamw(p(), f64::NAN, WD, BETAS, EPS));
    cfg(new_adamw(p(), f64::INFINITY, WD, BETAS, EPS));
    cfg(new_adamw(p(), LR, -0.1, BETAS, EPS));
    cfg(new_adamw(p(), LR, f64::NAN, BETAS, EPS));
    cfg(new_adamw(p(), LR, WD, (1.0, 0.95), EPS));
    cfg(new_adamw(p(), LR, WD, (0.9, -0.1), EPS));
    cfg(new_adamw(p(), LR, WD, (0.9, f64::NAN), EPS));
    cfg(new_adamw(p(), LR, WD, BETAS, 0.0));
    cfg(new_adamw(p(), LR, WD, BETAS, f64::INFINITY));
    cfg(new_adamw(vec![], LR, WD, BETAS, EPS));
    // Frozen, non-leaf, duplicated, undefined parameters.
    cfg(new_adamw(
        vec![tensor(&[1.0, 2.0, 3.0], &m)],
        LR,
        WD,
        BETAS,
        EPS,
    ));
    let base = leaf(&[1.0, 2.0, 3.0], &m);
    cfg(new_adamw(vec![&base * 2.0], LR, WD, BETAS, EPS));
    cfg(new_adamw(
        vec![base.shallow_clone(), base.shallow_clone()],
        LR,
        WD,
        BETAS,
        EPS,
    ));
    cfg(new_adamw(vec![Tensor::new()], LR, WD, BETAS, EPS));
    let ints = Tensor::zeros([3], (Kind::Int64, CPU));
    assert!(matches!(
        new_adamw(vec![ints], LR, WD, BETAS, EPS),
        Err(Error::Dtype(_))
    ));
    let err = new_adamw(p(), LR, WD, (0.9, 1.5), EPS)
        .unwrap_err()
        .to_string();
    assert!(err.contains("betas[1]") && err.contains("1.5"), "{err}");
    // Edge values that are valid: lr 0, no weight decay, beta 0.
    assert!(new_adamw(p(), 0.0, 0.0, (0.0, 0.0), EPS).is_ok());
    let mut opt = new_adamw(p(), LR, WD, BETAS, EPS).unwrap();
    assert!(matches!(opt.set_lr(-1.0), Err(Error::Config(_))));
    opt.set_lr(0.5).unwrap();
    assert_eq!(opt.lr(), 0.5);
}

#[test]
fn zero_grad_clears_and_ungraded_params_are_skipped() {
    let m = Meta {
        shape: vec![3],
        kind: Kind::Float,
    };
    let (a, b) = (leaf(&[1.0, 2.0, 3.0], &m), leaf(&[4.0, 5.0, 6.0], &m));
    let mut opt = new_adamw(
        vec![a.shallow_clone(), b.shallow_clone()],
        LR,
        WD,
        BETAS,
        EPS,
    )
    .unwrap();
    set_grads(&mut opt, &[Some(tensor(&[1.0, -1.0, 0.5], &m)), None]);
    opt.step().unwrap();
    // b had no gradient: untouched (no weight decay either), its step count stays 0.
    assert_eq!(values(&b), [4.0, 5.0, 6.0]);
    assert_ne!(values(&a), [1.0, 2.0, 3.0]);
    opt.zero_grad().unwrap();
    assert!(!a.grad().defined() && !b.grad().defined());
    let st = opt.state_tensors();
    let step = |n: &str| st.iter().find(|(m, _)| m == n).unwrap().1.int64_value(&[]);
    assert_eq!((step("state.0.step"), step("state.1.step")), (1, 0));
    // Now only b gets a gradient: a (cleared, not zeroed) is skipped, b takes its first step.
    let a_before = values(&a);
    set_grads(&mut opt, &[None, Some(tensor(&[0.5, 0.5, -0.5], &m))]);
    opt.step().unwrap();
    assert_eq!(values(&a), a_before);
    assert_ne!(values(&b), [4.0, 5.0, 6.0]);
    let st = opt.state_tensors();
    let step = |n: &str| st.iter().find(|(m, _)| m == n).unwrap().1.int64_value(&[]);
    assert_eq!((step("state.0.step"), step("state.1.step")), (1, 1));
}

#[test]
fn defaults_are_torchs() {
    let script = r#"
import json, torch
d = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
print(json.dumps({k: d[k] for k in ["lr", "betas", "eps", "weight_decay"]}))
"#;
    let torch = run_py(script, &Value::Null);
    let d = AdamWConfig::default();
    assert_eq!(torch["lr"].as_f64(), Some(d.lr));
    assert_eq!(json_vec(&torch["betas"]), [d.betas.0, d.betas.1]);
    assert_eq!(torch["eps"].as_f64(), Some(d.eps));
    assert_eq!(torch["weight_decay"].as_f64(), Some(d.weight_decay));
    assert!(AdamW::new(
        vec![leaf(
            &[1.0],
            &Meta {
                shape: vec![1],
                kind: Kind::Float
            }
        )],
        d
    )
    .is_ok());
}
