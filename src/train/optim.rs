//! AdamW over live parameter tensors, with fp32 state and fp32 master weights for bf16/fp16
//! parameters, gradient-norm clipping, and exact save/restore of its state.
use std::collections::{BTreeMap, HashMap};

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// The optimizer state of one parameter.
#[derive(Debug)]
struct ParamState {
    /// First moment (fp32; fp64 for an fp64 parameter).
    exp_avg: Tensor,
    /// Second moment (same dtype as `exp_avg`).
    exp_avg_sq: Tensor,
    /// fp32 master weights of a bf16/fp16 parameter; `None` for fp32/fp64 parameters.
    master: Option<Tensor>,
    /// Steps this parameter has taken (it skips the steps where its gradient is undefined).
    step: u64,
}

/// `torch.optim.AdamW` (decoupled weight decay; the default single-tensor algorithm with
/// `amsgrad=False`, `maximize=False`) over parameter tensors shared with the model.
///
/// The optimizer holds handles to the same tensors as the model (shallow clones), so
/// [`AdamW::step`] updates the model's weights in place. State and update math are fp32 for
/// fp32, bf16 and fp16 parameters (fp64 for fp64 parameters): a bf16/fp16 parameter gets an fp32
/// master copy, taken at construction, which is updated and then rounded into the parameter.
/// A bf16/fp16 parameter must therefore not be written outside the optimizer after construction
/// (the write would be overwritten by the master at the next step), except through
/// [`AdamW::load_state`].
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Tensor>,
    states: Vec<ParamState>,
    lr: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
    step_count: u64,
}

fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "lr must be a finite number >= 0, got {lr}"
        )))
    }
}

/// The dtype of the optimizer state of a parameter of dtype `kind`.
fn state_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// The field names of `state.{i}.{field}`, in the order [`AdamW::state_tensors`] lists them.
const FIELDS: [&str; 4] = ["exp_avg", "exp_avg_sq", "master", "step"];

/// Splits `state.{i}.{field}` into `(i, field)`.
fn parse_state_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("state.")?;
    let (i, field) = rest.split_once('.')?;
    if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) || (i.len() > 1 && i.starts_with('0'))
    {
        return None;
    }
    let field = FIELDS.iter().find(|f| **f == field)?;
    Some((i.parse().ok()?, field))
}

impl AdamW {
    /// An AdamW over `params` (handles to the model's tensors: leaves with `requires_grad`, of a
    /// floating dtype, each given once). `lr` finite and >= 0; `weight_decay` finite and >= 0
    /// (applied as `p *= 1 - lr * weight_decay`); each beta in [0, 1); `eps` finite and > 0.
    /// Invalid values and parameters are an [`Error::Config`] naming them (an integer/bool
    /// parameter is an [`Error::Dtype`]).
    pub fn new(
        params: Vec<Tensor>,
        lr: f64,
        weight_decay: f64,
        betas: (f64, f64),
        eps: f64,
    ) -> Result<Self> {
        check_lr(lr)?;
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::Config(format!(
                "weight_decay must be a finite number >= 0, got {weight_decay}"
            )));
        }
        for (name, b) in [("betas[0]", betas.0), ("betas[1]", betas.1)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::Config(format!("{name} must be in [0, 1), got {b}")));
            }
        }
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::Config(format!(
                "eps must be a finite number > 0, got {eps}"
            )));
        }
        if params.is_empty() {
            return Err(Error::Config("AdamW needs at least one parameter".into()));
        }
        let mut seen: HashMap<usize, usize> = HashMap::new();
        for (i, p) in params.iter().enumerate() {
            if !p.defined() {
                return Err(Error::Config(format!(
                    "parameter {i} is an undefined tensor"
                )));
            }
            let kind = p.f_kind()?;
            if !matches!(
                kind,
                Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
            ) {
                return Err(Error::Dtype(format!(
                    "parameter {i} has dtype {kind:?}; AdamW needs float32, float64, bfloat16 or \
                     float16 parameters"
                )));
            }
            if p.is_sparse() {
                return Err(Error::Config(format!(
                    "parameter {i} is sparse; AdamW needs dense parameters"
                )));
            }
            if !p.requires_grad() {
                return Err(Error::Config(format!(
                    "parameter {i} (shape {:?}) does not require grad",
                    p.size()
                )));
            }
            if !p.f_is_leaf()? {
                return Err(Error::Config(format!(
                    "parameter {i} (shape {:?}) is not a leaf tensor (it is the result of an \
                     operation on tensors that require grad)",
                    p.size()
                )));
            }
            let ptr = p.data_ptr() as usize;
            if ptr != 0 {
                if let Some(j) = seen.insert(ptr, i) {
                    return Err(Error::Config(format!(
                        "parameter {i} is the same tensor as parameter {j} (data_ptr {ptr:#x})"
                    )));
                }
            }
        }
        let states = tch::no_grad(|| -> Result<Vec<ParamState>> {
            params
                .iter()
                .map(|p| {
                    let kind = p.f_kind()?;
                    let sk = state_kind(kind);
                    let master = if kind == sk {
                        None
                    } else {
                        Some(p.f_detach()?.f_to_dtype(sk, false, true)?)
                    };
                    let like = master.as_ref().unwrap_or(p);
                    Ok(ParamState {
                        exp_avg: like.f_zeros_like()?,
                        exp_avg_sq: like.f_zeros_like()?,
                        master,
                        step: 0,
                    })
                })
                .collect()
        })?;
        Ok(Self {
            params,
            states,
            lr,
            weight_decay,
            betas,
            eps,
            step_count: 0,
        })
    }

    /// One AdamW step over every parameter whose `.grad` is defined (the others are skipped and
    /// their per-parameter step count does not advance, as in torch). For each such parameter,
    /// in fp32 (`t` its step count after the increment):
    /// `p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g;`
    /// `p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)`;
    /// a bf16/fp16 parameter's update goes to its master, which is then rounded into it.
    /// Runs under no_grad, in place.
    pub fn step(&mut self) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let (lr, wd, eps) = (self.lr, self.weight_decay, self.eps);
        let (b1, b2) = self.betas;
        // Check every gradient before updating anything.
        let mut grads = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let grad = p.f_grad()?;
            if grad.defined() && grad.is_sparse() {
                return Err(Error::State(format!(
                    "parameter {i} has a sparse gradient; AdamW does not support sparse gradients"
                )));
            }
            grads.push(grad);
        }
        if self.fusable(&grads)? {
            self.fused_step(&grads)?;
            self.step_count += 1;
            return Ok(());
        }
        for ((p, st), grad) in self.params.iter_mut().zip(&mut self.states).zip(grads) {
            if !grad.defined() {
                continue;
            }
            let sk = st.exp_avg.f_kind()?;
            let grad = if grad.f_kind()? == sk {
                grad
            } else {
                grad.f_to_kind(sk)?
            };
            st.step += 1;
            let target: &mut Tensor = match st.master.as_mut() {
                Some(m) => m,
                None => p,
            };
            if wd != 0.0 {
                let _ = target.f_mul_scalar_(1.0 - lr * wd)?;
            }
            let _ = st.exp_avg.f_lerp_(&grad, 1.0 - b1)?;
            // exp_avg_sq.mul_(b2).addcmul_(g, g, value=1-b2), in the kernel's operation order.
            let _ = st.exp_avg_sq.f_mul_scalar_(b2)?;
            let _ = st
                .exp_avg_sq
                .f_add_(&grad.f_mul_scalar(1.0 - b2)?.f_mul(&grad)?)?;
            let t = st.step as f64;
            let bias_correction1 = 1.0 - b1.powf(t);
            let bias_correction2 = 1.0 - b2.powf(t);
            let step_size = lr / bias_correction1;
            let mut denom = st
                .exp_avg_sq
                .f_sqrt()?
                .f_div_scalar(bias_correction2.powf(0.5))?;
            let _ = denom.f_add_scalar_(eps)?;
            // p.addcdiv_(m, denom, value=-step_size), in the kernel's operation order.
            let _ = target.f_add_(&st.exp_avg.f_mul_scalar(-step_size)?.f_div(&denom)?)?;
            if let Some(m) = &st.master {
                p.f_copy_(m)?;
            }
        }
        self.step_count += 1;
        Ok(())
    }

    /// Whether one fused kernel call can do this step: at least one parameter has a gradient, and
    /// every parameter that has one is fp32, contiguous, without master weights, with a dense fp32
    /// gradient, all on one device (parameters without a gradient are left out of the call).
    /// Other cases, such as bf16 parameters with fp32 masters, take the per-tensor loop.
    fn fusable(&self, grads: &[Tensor]) -> Result<bool> {
        let Some(device) = self.params.first().map(|p| p.device()) else {
            return Ok(false);
        };
        let mut any = false;
        for ((p, st), g) in self.params.iter().zip(&self.states).zip(grads) {
            // Parameters without a gradient are skipped by the step either way.
            if !g.defined() {
                continue;
            }
            any = true;
            let ok = st.master.is_none()
                && p.f_kind()? == Kind::Float
                && g.f_kind()? == Kind::Float
                && p.device() == device
                && g.device() == device
                && p.is_contiguous()
                && g.is_contiguous()
                && st.exp_avg.is_contiguous()
                && st.exp_avg_sq.is_contiguous();
            if !ok {
                return Ok(false);
            }
        }
        Ok(any)
    }

    /// The step as `torch.optim.AdamW(fused=True)`: libtorch's multi-tensor kernel over every
    /// parameter at once (the same update as the per-tensor loop, to within float rounding:
    /// about 1e-6 after 20 steps; one call instead of a dozen ops per parameter).
    fn fused_step(&mut self, grads: &[Tensor]) -> Result<()> {
        // The parameters with a gradient, and their step counts including this step; the states
        // count it only once the kernel succeeded.
        let live: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].defined()).collect();
        let mut steps = Vec::with_capacity(live.len());
        for &i in &live {
            steps.push(Tensor::f_full(
                [],
                (self.states[i].step + 1) as f64,
                (Kind::Float, self.params[i].device()),
            )?);
        }
        let params: Vec<&Tensor> = live.iter().map(|&i| &self.params[i]).collect();
        let grads: Vec<&Tensor> = live.iter().map(|&i| &grads[i]).collect();
        let exp_avgs: Vec<&Tensor> = live.iter().map(|&i| &self.states[i].exp_avg).collect();
        let exp_avg_sqs: Vec<&Tensor> = live.iter().map(|&i| &self.states[i].exp_avg_sq).collect();
        crate::bridge::fused_adamw(
            &crate::bridge::FusedAdamW {
                params: &params,
                grads: &grads,
                exp_avgs: &exp_avgs,
                exp_avg_sqs: &exp_avg_sqs,
                steps: &steps.iter().collect::<Vec<_>>(),
            },
            self.lr,
            self.betas,
            self.weight_decay,
            self.eps,
        )?;
        for &i in &live {
            self.states[i].step += 1;
        }
        Ok(())
    }

    /// Clears every parameter's gradient (`.grad` becomes undefined), as `torch.optim`'s default
    /// `zero_grad(set_to_none=True)`: a parameter that then receives no gradient is skipped by the
    /// next [`AdamW::step`], and the next backward stores its gradient instead of adding it to
    /// zeros.
    pub fn zero_grad(&mut self) -> Result<()> {
        Ok(crate::bridge::clear_grads(
            &self.params.iter().collect::<Vec<_>>(),
        )?)
    }

    /// The defined gradients and their total 2-norm (the 2-norm of the per-gradient fp32 2-norms,
    /// a 0-dim fp32 tensor on the first gradient's device); None when no gradient is defined.
    fn total_grad_norm(&self) -> Result<Option<(Vec<Tensor>, Tensor)>> {
        let _no_grad = tch::no_grad_guard();
        let mut grads = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let g = p.f_grad()?;
            if g.defined() {
                grads.push(g);
            }
        }
        if grads.is_empty() {
            return Ok(None);
        }
        let total = crate::bridge::grad_norm(&grads.iter().collect::<Vec<_>>())?;
        Ok(Some((grads, total)))
    }

    /// The total 2-norm of the gradients as [`AdamW::clip_grad_norm`] computes it, without
    /// clipping (0 if no gradient is defined; NaN/Inf when a gradient holds them).
    pub fn grad_norm(&self) -> Result<f64> {
        match self.total_grad_norm()? {
            Some((_, total)) => Ok(total.f_double_value(&[])?),
            None => Ok(0.0),
        }
    }

    /// Clips the gradients as `torch.nn.utils.clip_grad_norm_(params, max_norm)` (2-norm): the
    /// total norm is the 2-norm of the per-gradient 2-norms, computed in fp32 (torch computes it
    /// in the gradients' dtype, so bf16/fp16 gradients get a more precise norm here); with
    /// `coef = min(max_norm / (total + 1e-6), 1)`, every defined gradient is multiplied in place
    /// by `coef` (rounded to the gradient's dtype, as torch) when `coef < 1`. Returns the total
    /// norm before clipping (0 if no gradient is defined).
    ///
    /// A non-finite total (NaN/Inf in a gradient) is returned as is and the gradients are left
    /// untouched (torch would scale them by 0 or NaN); callers should skip the step.
    /// `max_norm` must be finite and > 0.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(Error::Config(format!(
                "max_norm must be a finite number > 0, got {max_norm}"
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let Some((mut grads, total)) = self.total_grad_norm()? else {
            return Ok(0.0);
        };
        let total_value = total.f_double_value(&[])?;
        if !total_value.is_finite() {
            return Ok(total_value);
        }
        // torch: `max_norm / (total + 1e-6)` is `reciprocal(total + 1e-6) * max_norm`.
        let coef = total
            .f_add_scalar(1e-6)?
            .f_reciprocal()?
            .f_mul_scalar(max_norm)?
            .f_clamp_max(1.0)?;
        if coef.f_double_value(&[])? < 1.0 {
            for g in &mut grads {
                let c = coef.f_to_device_(g.device(), g.f_kind()?, false, false)?;
                let _ = g.f_mul_(&c)?;
            }
        }
        Ok(total_value)
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate of the next steps (finite, >= 0; else [`Error::Config`]).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.lr = lr;
        Ok(())
    }

    /// The decoupled weight decay.
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    /// `(beta1, beta2)`.
    pub fn betas(&self) -> (f64, f64) {
        self.betas
    }

    /// The denominator's epsilon.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// How many times [`AdamW::step`] has run (or the `step` given to [`AdamW::load_state`]).
    pub fn step_count(&self) -> u64 {
        self.step_count
    }

    /// The parameter handles, in the order given to [`AdamW::new`].
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The optimizer state as named tensors, for checkpointing; with [`AdamW::step_count`] it is
    /// everything [`AdamW::load_state`] needs for an exact resume. For each parameter `i`:
    /// `state.{i}.exp_avg`, `state.{i}.exp_avg_sq` (fp32, or fp64 for an fp64 parameter),
    /// `state.{i}.master` (fp32, bf16/fp16 parameters only) and `state.{i}.step` (0-dim int64,
    /// the parameter's own step count). The tensors alias the live state (no copy): save them
    /// before the next [`AdamW::step`], or copy them.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(4 * self.states.len());
        for (i, st) in self.states.iter().enumerate() {
            out.push((format!("state.{i}.exp_avg"), st.exp_avg.shallow_clone()));
            out.push((
                format!("state.{i}.exp_avg_sq"),
                st.exp_avg_sq.shallow_clone(),
            ));
            if let Some(m) = &st.master {
                out.push((format!("state.{i}.master"), m.shallow_clone()));
            }
            // Saturates only past i64::MAX steps.
            let step = i64::try_from(st.step).unwrap_or(i64::MAX);
            out.push((format!("state.{i}.step"), Tensor::from(step)));
        }
        out
    }

    /// Restores a state saved by [`AdamW::state_tensors`] into an optimizer built over the same
    /// parameters (same order, shapes and dtypes), and sets [`AdamW::step_count`] to `step`.
    /// `exp_avg` and `exp_avg_sq` are required for every parameter, `master` for exactly the
    /// bf16/fp16 ones (it is also rounded into the parameter); `state.{i}.step` is optional
    /// (missing: the parameter's step count becomes `step`). Values are copied (converted to the
    /// state's dtype and device). Everything is checked before anything is written: unknown,
    /// duplicate or missing names are an [`Error::State`], a shape that differs from the
    /// parameter's an [`Error::Shape`], a non-floating tensor an [`Error::Dtype`], a step tensor
    /// that is not one non-negative integer an [`Error::State`].
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], step: u64) -> Result<()> {
        let n = self.params.len();
        let mut by_index: BTreeMap<(usize, &str), &Tensor> = BTreeMap::new();
        for (name, t) in tensors {
            let (i, field) = parse_state_name(name)
                .filter(|(i, _)| *i < n)
                .ok_or_else(|| {
                    Error::State(format!(
                        "unexpected optimizer state tensor {name:?} (expected state.{{i}}.{{{}}} \
                         with i < {n})",
                        FIELDS.join(",")
                    ))
                })?;
            if field == "master" && self.states[i].master.is_none() {
                return Err(Error::State(format!(
                    "unexpected optimizer state tensor {name:?}: parameter {i} is {:?} and has \
                     no master copy",
                    self.params[i].f_kind()?
                )));
            }
            if by_index.insert((i, field), t).is_some() {
                return Err(Error::State(format!(
                    "optimizer state tensor {name:?} is given twice"
                )));
            }
        }
        let mut steps = vec![step; n];
        for (i, st) in self.states.iter().enumerate() {
            let shape = self.params[i].size();
            for field in FIELDS {
                let name = format!("state.{i}.{field}");
                let needed = field != "step" && (field != "master" || st.master.is_some());
                let Some(t) = by_index.get(&(i, field)) else {
                    if needed {
                        return Err(Error::State(format!(
                            "optimizer state tensor {name} is missing"
                        )));
                    }
                    continue;
                };
                if !t.defined() {
                    return Err(Error::State(format!(
                        "optimizer state tensor {name} is undefined"
                    )));
                }
                if field == "step" {
                    let ok = t.numel() == 1 && t.f_kind()? != Kind::Bool;
                    let v = if ok { t.f_double_value(&[])? } else { -1.0 };
                    // fp32 (torch's own step tensors) holds integers exactly up to 2^24.
                    if !(v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(63)) {
                        return Err(Error::State(format!(
                            "optimizer state tensor {name} must hold one non-negative integer \
                             (shape {:?}, dtype {:?})",
                            t.size(),
                            t.f_kind()?
                        )));
                    }
                    steps[i] = v as u64;
                    continue;
                }
                if t.size() != shape {
                    return Err(Error::Shape(format!(
                        "optimizer state tensor {name} has shape {:?}, parameter {i} has {shape:?}",
                        t.size()
                    )));
                }
                let kind = t.f_kind()?;
                if !matches!(
                    kind,
                    Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
                ) {
                    return Err(Error::Dtype(format!(
                        "optimizer state tensor {name} has dtype {kind:?}; expected a floating \
                         dtype"
                    )));
                }
            }
        }
        let _no_grad = tch::no_grad_guard();
        for (i, (p, st)) in self.params.iter_mut().zip(&mut self.states).enumerate() {
            if let Some(t) = by_index.get(&(i, "exp_avg")) {
                st.exp_avg.f_copy_(t)?;
            }
            if let Some(t) = by_index.get(&(i, "exp_avg_sq")) {
                st.exp_avg_sq.f_copy_(t)?;
            }
            if let (Some(m), Some(t)) = (st.master.as_mut(), by_index.get(&(i, "master"))) {
                m.f_copy_(t)?;
                p.f_copy_(m)?;
            }
            st.step = steps[i];
        }
        self.step_count = step;
        Ok(())
    }

    /// Bytes of optimizer state: both moments and the fp32 masters.
    pub fn state_bytes(&self) -> i64 {
        self.state_bytes_where(|_| true)
    }

    /// Bytes of the state of the parameters for which `keep` is true.
    pub fn state_bytes_where(&self, keep: impl Fn(&Tensor) -> bool) -> i64 {
        let bytes =
            |t: &Tensor| t.numel() as i64 * t.f_kind().map_or(0, |k| k.elt_size_in_bytes() as i64);
        self.params
            .iter()
            .zip(&self.states)
            .filter(|(p, _)| keep(p))
            .map(|(_, st)| {
                bytes(&st.exp_avg) + bytes(&st.exp_avg_sq) + st.master.as_ref().map_or(0, bytes)
            })
            .sum()
    }
}

/// Optimizers alive in this process (weakly held), so a model's memory report can count the
/// state of the optimizers that train its tensors.
static LIVE: std::sync::LazyLock<std::sync::Mutex<Vec<std::sync::Weak<std::sync::Mutex<AdamW>>>>> =
    std::sync::LazyLock::new(Default::default);

/// Makes `opt` visible to [`state_bytes_for`] while it lives.
pub fn track(opt: &std::sync::Arc<std::sync::Mutex<AdamW>>) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.push(std::sync::Arc::downgrade(opt));
}

/// Bytes of optimizer state, over every live tracked optimizer, of the parameters whose data
/// pointer is in `data_ptrs`.
pub fn state_bytes_for(data_ptrs: &std::collections::HashSet<usize>) -> i64 {
    let live: Vec<_> = LIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|w| w.upgrade())
        .collect();
    live.iter()
        .map(|o| {
            o.lock()
                .unwrap_or_else(|e| e.into_inner())
                .state_bytes_where(|p| data_ptrs.contains(&(p.data_ptr() as usize)))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::io::Write;
    use std::process::{Command, Stdio};
    use tch::Device;

    const CPU: Device = Device::Cpu;
    const LR: f64 = 1e-2;
    const WD: f64 = 0.1;
    const BETAS: (f64, f64) = (0.9, 0.95);
    const EPS: f64 = 1e-8;

    /// Runs `script` with the test Python (`LORATCH_TEST_PYTHON`, else `python3`), `input` on
    /// stdin; torch must import. Returns stdout parsed as JSON.
    fn run_py(script: &str, input: &Value) -> Value {
        let py = std::env::var("LORATCH_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = Command::new(&py)
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{py} failed (is torch importable?): {err}"
        );
        serde_json::from_slice(&out.stdout).unwrap()
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
        let mut opt = AdamW::new(params, LR, WD, BETAS, EPS).unwrap();
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
            let mut opt = AdamW::new(params, LR, WD, BETAS, EPS).unwrap();
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
        let mut opt = AdamW::new(vec![p], LR, WD, BETAS, EPS).unwrap();
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
            AdamW::new(params, LR, WD, BETAS, EPS).unwrap()
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
            AdamW::new(params, LR, WD, BETAS, EPS).unwrap()
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
        cfg(AdamW::new(p(), -1e-3, WD, BETAS, EPS));
        cfg(AdamW::new(p(), f64::NAN, WD, BETAS, EPS));
        cfg(AdamW::new(p(), f64::INFINITY, WD, BETAS, EPS));
        cfg(AdamW::new(p(), LR, -0.1, BETAS, EPS));
        cfg(AdamW::new(p(), LR, f64::NAN, BETAS, EPS));
        cfg(AdamW::new(p(), LR, WD, (1.0, 0.95), EPS));
        cfg(AdamW::new(p(), LR, WD, (0.9, -0.1), EPS));
        cfg(AdamW::new(p(), LR, WD, (0.9, f64::NAN), EPS));
        cfg(AdamW::new(p(), LR, WD, BETAS, 0.0));
        cfg(AdamW::new(p(), LR, WD, BETAS, f64::INFINITY));
        cfg(AdamW::new(vec![], LR, WD, BETAS, EPS));
        // Frozen, non-leaf, duplicated, undefined parameters.
        cfg(AdamW::new(
            vec![tensor(&[1.0, 2.0, 3.0], &m)],
            LR,
            WD,
            BETAS,
            EPS,
        ));
        let base = leaf(&[1.0, 2.0, 3.0], &m);
        cfg(AdamW::new(vec![&base * 2.0], LR, WD, BETAS, EPS));
        cfg(AdamW::new(
            vec![base.shallow_clone(), base.shallow_clone()],
            LR,
            WD,
            BETAS,
            EPS,
        ));
        cfg(AdamW::new(vec![Tensor::new()], LR, WD, BETAS, EPS));
        let ints = Tensor::zeros([3], (Kind::Int64, CPU));
        assert!(matches!(
            AdamW::new(vec![ints], LR, WD, BETAS, EPS),
            Err(Error::Dtype(_))
        ));
        let err = AdamW::new(p(), LR, WD, (0.9, 1.5), EPS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("betas[1]") && err.contains("1.5"), "{err}");
        // Edge values that are valid: lr 0, no weight decay, beta 0.
        assert!(AdamW::new(p(), 0.0, 0.0, (0.0, 0.0), EPS).is_ok());
        let mut opt = AdamW::new(p(), LR, WD, BETAS, EPS).unwrap();
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
        let mut opt = AdamW::new(
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
}
