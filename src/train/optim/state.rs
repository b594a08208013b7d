//! Saving and restoring the optimizer's state as named tensors (`state.{i}.{field}`), for exact
//! resumes from a checkpoint, and the bytes that state occupies.
use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::AdamW;
use crate::error::{Error, Result};

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
        let by_index = self.index_state(tensors)?;
        let steps = self.check_state(&by_index, step)?;
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

    /// The state tensors by (parameter index, field), refusing unknown and duplicate names and
    /// masters of parameters that have none.
    fn index_state<'t>(
        &self,
        tensors: &'t [(String, Tensor)],
    ) -> Result<BTreeMap<(usize, &'t str), &'t Tensor>> {
        let n = self.params.len();
        let mut by_index: BTreeMap<(usize, &'t str), &'t Tensor> = BTreeMap::new();
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
        Ok(by_index)
    }

    /// Checks every parameter's state tensors (present where needed, shapes, dtypes, step
    /// values) and returns each parameter's step count (`step` where none is given).
    fn check_state(
        &self,
        by_index: &BTreeMap<(usize, &str), &Tensor>,
        step: u64,
    ) -> Result<Vec<u64>> {
        let n = self.params.len();
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
        Ok(steps)
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
