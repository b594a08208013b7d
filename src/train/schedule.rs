//! Learning-rate schedules: pure functions of the step number, validated on construction.
//!
//! Conventions shared by every kind (`s` is the step passed to [`Schedule::lr`], counted from 0):
//! - the schedule is evaluated at `s' = min(s, total_steps)`, so the value holds constant from
//!   `total_steps` on (decaying kinds reach their final value exactly at `s == total_steps`);
//! - the value always lies in `[min_lr, initial_lr]`, and `lr(0) > 0`;
//! - warmup (the `linear_warmup_*` kinds only) covers steps `0..=warmup_steps`: it starts at a
//!   nonzero LR at step 0 and reaches `initial_lr` exactly at `s == warmup_steps`, where the decay
//!   phase starts from `initial_lr` too (both formulas agree there).
use crate::error::{Error, Result};
use serde::Deserialize;

/// The shape of a learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// Linear warmup, then cosine decay from `initial_lr` to `min_lr` ("linear_warmup_cosine").
    LinearWarmupCosine,
    /// Cosine decay from `initial_lr` to `min_lr`, no warmup ("cosine").
    Cosine,
    /// Linear decay from `initial_lr` to `min_lr`, no warmup ("linear").
    Linear,
    /// Linear warmup, then linear decay from `initial_lr` to `min_lr` ("linear_warmup_linear").
    LinearWarmupLinear,
    /// `initial_lr * gamma^step`, floored at `min_lr` ("exponential").
    Exponential,
    /// `initial_lr * gamma^(step / step_size)` (integer division), floored at `min_lr` ("step").
    Step,
    /// `initial_lr` at every step ("constant").
    Constant,
}

impl ScheduleKind {
    /// Every kind with its name, in declaration order.
    pub const ALL: [(ScheduleKind, &'static str); 7] = [
        (ScheduleKind::LinearWarmupCosine, "linear_warmup_cosine"),
        (ScheduleKind::Cosine, "cosine"),
        (ScheduleKind::Linear, "linear"),
        (ScheduleKind::LinearWarmupLinear, "linear_warmup_linear"),
        (ScheduleKind::Exponential, "exponential"),
        (ScheduleKind::Step, "step"),
        (ScheduleKind::Constant, "constant"),
    ];

    /// The kind named `name` (exact, lower-case names as in [`ScheduleKind::ALL`]); an unknown
    /// name is an [`Error::Config`] listing the valid ones.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(k, _)| *k)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                Error::Config(format!(
                    "unknown schedule {name:?}; expected one of: {}",
                    names.join(", ")
                ))
            })
    }

    /// The kind's name, as accepted by [`ScheduleKind::from_name`].
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("", |(_, n)| *n)
    }

    /// Whether the kind has a warmup phase (uses `warmup_steps`).
    pub fn has_warmup(self) -> bool {
        matches!(
            self,
            ScheduleKind::LinearWarmupCosine | ScheduleKind::LinearWarmupLinear
        )
    }
}

/// The parameters of a learning-rate schedule, validated by [`Schedule::new`]. Callers set what
/// they configure and take the rest from [`Default`]
/// (`ScheduleConfig { kind, initial_lr, ..Default::default() }`). The Python scheduler's config
/// dict deserializes into it (every key optional, an unknown one an error; the kind is the
/// scheduler's name, not a key).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// The shape of the schedule.
    #[serde(skip)]
    pub kind: ScheduleKind,
    /// The peak learning rate (finite, > 0).
    pub initial_lr: f64,
    /// The floor of the learning rate, in `[0, initial_lr]`.
    pub min_lr: f64,
    /// The step from which the learning rate stays constant (>= 1).
    pub total_steps: u64,
    /// The length of the warmup: `< total_steps` for the `linear_warmup_*` kinds (0 means no
    /// warmup); every other kind requires 0 (a warmup would otherwise be silently dropped).
    pub warmup_steps: u64,
    /// The decay factor, in (0, 1] for `exponential` and `step`; ignored by the other kinds.
    pub gamma: f64,
    /// The steps between two decays, >= 1 for `step`; ignored by the other kinds.
    pub step_size: u64,
}

impl Default for ScheduleConfig {
    /// `linear_warmup_cosine` from AdamW's default LR
    /// ([`AdamWConfig::default`](crate::train::optim::AdamWConfig)) down to 0 over 1000 steps
    /// without warmup; `gamma` 0.1 and `step_size` 100 for the kinds that use them.
    fn default() -> Self {
        Self {
            kind: ScheduleKind::LinearWarmupCosine,
            initial_lr: crate::train::optim::AdamWConfig::default().lr,
            min_lr: 0.0,
            total_steps: 1000,
            warmup_steps: 0,
            gamma: 0.1,
            step_size: 100,
        }
    }
}

impl ScheduleConfig {
    /// Checks every value for this kind (see the fields); the first invalid one is an
    /// [`Error::Config`] naming it.
    pub fn validate(&self) -> Result<()> {
        let ScheduleConfig {
            kind,
            initial_lr,
            min_lr,
            total_steps,
            warmup_steps,
            gamma,
            step_size,
        } = *self;
        let name = kind.name();
        if !(initial_lr.is_finite() && initial_lr > 0.0) {
            return Err(Error::Config(format!(
                "initial_lr must be a finite number > 0, got {initial_lr}"
            )));
        }
        if !(min_lr >= 0.0 && min_lr <= initial_lr) {
            return Err(Error::Config(format!(
                "min_lr must be in [0, initial_lr={initial_lr}], got {min_lr}"
            )));
        }
        if total_steps == 0 {
            return Err(Error::Config("total_steps must be >= 1, got 0".into()));
        }
        if kind.has_warmup() {
            if warmup_steps >= total_steps {
                return Err(Error::Config(format!(
                    "warmup_steps must be < total_steps={total_steps} for schedule {name}, \
                     got {warmup_steps}"
                )));
            }
        } else if warmup_steps != 0 {
            return Err(Error::Config(format!(
                "schedule {name} has no warmup, but warmup_steps={warmup_steps}; use \
                 linear_warmup_cosine or linear_warmup_linear, or warmup_steps=0"
            )));
        }
        if matches!(kind, ScheduleKind::Exponential | ScheduleKind::Step)
            && !(gamma > 0.0 && gamma <= 1.0)
        {
            return Err(Error::Config(format!(
                "gamma must be in (0, 1] for schedule {name}, got {gamma}"
            )));
        }
        if kind == ScheduleKind::Step && step_size == 0 {
            return Err(Error::Config(
                "step_size must be >= 1 for schedule step, got 0".into(),
            ));
        }
        Ok(())
    }
}

/// A validated learning-rate schedule; [`Schedule::lr`] maps a step to its learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    config: ScheduleConfig,
}

impl Schedule {
    /// A validated schedule ([`ScheduleConfig::validate`] says what is valid); an invalid value
    /// is an [`Error::Config`] naming it.
    pub fn new(config: ScheduleConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The schedule's parameters.
    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// The schedule's kind.
    pub fn kind(&self) -> ScheduleKind {
        self.config.kind
    }

    /// The peak learning rate (reached at `warmup_steps`; at step 0 without warmup).
    pub fn initial_lr(&self) -> f64 {
        self.config.initial_lr
    }

    /// The floor of the learning rate.
    pub fn min_lr(&self) -> f64 {
        self.config.min_lr
    }

    /// The step from which the learning rate stays constant.
    pub fn total_steps(&self) -> u64 {
        self.config.total_steps
    }

    /// The length of the warmup (0 for kinds without one).
    pub fn warmup_steps(&self) -> u64 {
        self.config.warmup_steps
    }

    /// The decay factor of `exponential` and `step`.
    pub fn gamma(&self) -> f64 {
        self.config.gamma
    }

    /// The number of steps between two decays of `step`.
    pub fn step_size(&self) -> u64 {
        self.config.step_size
    }

    /// The learning rate at `step` (counted from 0). With `s = min(step, total_steps)`,
    /// `I = initial_lr`, `M = min_lr`, `W = warmup_steps` (0 for kinds without warmup),
    /// `T = total_steps` and `p = (s - W) / (T - W)` (in [0, 1]; `T > W` always holds):
    /// - warmup, `s <= W` (`linear_warmup_*` kinds): `max(M, I * (s + 1) / (W + 1))`, so
    ///   `lr(0) = I / (W + 1) > 0` (or `M` if larger) and `lr(W) = I`;
    /// - `cosine`, `linear_warmup_cosine` after warmup: `M + (I - M) * 0.5 * (1 + cos(pi * p))`;
    /// - `linear`, `linear_warmup_linear` after warmup: `I + (M - I) * p`;
    /// - `exponential`: `max(M, I * gamma^s)`;
    /// - `step`: `max(M, I * gamma^floor(s / step_size))`;
    /// - `constant`: `I`.
    ///
    /// Every result is finally clamped to `[M, I]` (guards one-ulp rounding at the ends).
    pub fn lr(&self, step: u64) -> f64 {
        let c = &self.config;
        let (init, min) = (c.initial_lr, c.min_lr);
        let s = step.min(c.total_steps);
        let w = if c.kind.has_warmup() {
            c.warmup_steps
        } else {
            0
        };
        // `T > W` is validated; `max(1)` keeps a zero divisor impossible regardless.
        let progress = || s.saturating_sub(w) as f64 / (c.total_steps - w).max(1) as f64;
        let v = match c.kind {
            k if k.has_warmup() && s <= w => init * ((s + 1) as f64 / (w + 1) as f64),
            ScheduleKind::LinearWarmupCosine | ScheduleKind::Cosine => {
                min + (init - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress()).cos())
            }
            ScheduleKind::LinearWarmupLinear | ScheduleKind::Linear => {
                init + (min - init) * progress()
            }
            ScheduleKind::Exponential => init * c.gamma.powf(s as f64),
            ScheduleKind::Step => init * c.gamma.powf((s / c.step_size.max(1)) as f64),
            ScheduleKind::Constant => init,
        };
        // Not `f64::clamp`: it panics on a NaN bound; `max`/`min` cannot.
        v.max(min).min(init)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOT_STEP: f64 = 0.5;

    /// [`Schedule::new`] with the parameters as separate arguments.
    fn new(
        kind: ScheduleKind,
        initial_lr: f64,
        min_lr: f64,
        total_steps: u64,
        warmup_steps: u64,
        gamma: f64,
        step_size: u64,
    ) -> Result<Schedule> {
        Schedule::new(ScheduleConfig {
            kind,
            initial_lr,
            min_lr,
            total_steps,
            warmup_steps,
            gamma,
            step_size,
        })
    }

    fn sched(kind: &str, init: f64, min: f64, total: u64, warm: u64) -> Result<Schedule> {
        new(
            ScheduleKind::from_name(kind)?,
            init,
            min,
            total,
            warm,
            NOT_STEP,
            1,
        )
    }

    #[test]
    fn names_round_trip_and_unknown_lists_all() {
        for (k, n) in ScheduleKind::ALL {
            assert_eq!(ScheduleKind::from_name(n).unwrap(), k);
            assert_eq!(k.name(), n);
        }
        let err = ScheduleKind::from_name("Cosine").unwrap_err().to_string();
        for (_, n) in ScheduleKind::ALL {
            assert!(err.contains(n), "{err}");
        }
        assert!(matches!(
            ScheduleKind::from_name("warmup"),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn known_values() {
        let s = sched("linear_warmup_cosine", 1.0, 0.0, 10, 4).unwrap();
        assert!((s.lr(0) - 0.2).abs() < 1e-15);
        assert!((s.lr(3) - 0.8).abs() < 1e-15);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(7) - 0.5).abs() < 1e-15); // p = 0.5
        assert_eq!(s.lr(10), 0.0);
        assert_eq!(s.lr(1000), 0.0);

        let s = sched("linear_warmup_cosine", 1.0, 0.5, 10, 4).unwrap();
        assert_eq!(s.lr(0), 0.5); // warmup never below min_lr

        let s = sched("linear", 2.0, 1.0, 4, 0).unwrap();
        let got: Vec<f64> = (0..6).map(|i| s.lr(i)).collect();
        assert_eq!(got, [2.0, 1.75, 1.5, 1.25, 1.0, 1.0]);

        let s = sched("linear_warmup_linear", 1.0, 0.0, 3, 1).unwrap();
        let got: Vec<f64> = (0..5).map(|i| s.lr(i)).collect();
        assert_eq!(got, [0.5, 1.0, 0.5, 0.0, 0.0]);

        let s = sched("cosine", 1.0, 0.0, 2, 0).unwrap();
        assert_eq!(s.lr(0), 1.0);
        assert!((s.lr(1) - 0.5).abs() < 1e-15);
        assert_eq!(s.lr(2), 0.0);

        let s = new(ScheduleKind::Exponential, 1.0, 0.2, 10, 0, 0.5, 1).unwrap();
        let got: Vec<f64> = (0..5).map(|i| s.lr(i)).collect();
        assert_eq!(got, [1.0, 0.5, 0.25, 0.2, 0.2]);

        let s = new(ScheduleKind::Step, 1.0, 0.0, 5, 0, 0.5, 2).unwrap();
        let got: Vec<f64> = (0..8).map(|i| s.lr(i)).collect();
        assert_eq!(got, [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]);

        let s = sched("constant", 3e-4, 0.0, 1, 0).unwrap();
        assert_eq!(s.lr(0), 3e-4);
        assert_eq!(s.lr(99), 3e-4);
    }

    #[test]
    fn default_config_is_valid() {
        let s = Schedule::new(ScheduleConfig::default()).unwrap();
        assert_eq!(s.lr(0), s.initial_lr());
        assert_eq!(*s.config(), ScheduleConfig::default());
    }

    #[test]
    fn warmup_of_total_minus_one_does_not_divide_by_zero() {
        let s = sched("linear_warmup_cosine", 1.0, 0.1, 5, 4).unwrap();
        assert_eq!(s.lr(4), 1.0);
        assert_eq!(s.lr(5), 0.1);
        let s = sched("linear_warmup_linear", 1.0, 0.0, 1, 0).unwrap();
        assert_eq!(s.lr(0), 1.0);
        assert_eq!(s.lr(1), 0.0);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = |r: Result<Schedule>| assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
        bad(sched("cosine", 0.0, 0.0, 10, 0));
        bad(sched("cosine", -1.0, 0.0, 10, 0));
        bad(sched("cosine", f64::NAN, 0.0, 10, 0));
        bad(sched("cosine", f64::INFINITY, 0.0, 10, 0));
        bad(sched("cosine", 1.0, -0.1, 10, 0));
        bad(sched("cosine", 1.0, 1.5, 10, 0));
        bad(sched("cosine", 1.0, f64::NAN, 10, 0));
        bad(sched("cosine", 1.0, 0.0, 0, 0));
        bad(sched("cosine", 1.0, 0.0, 10, 2)); // warmup on a kind without one
        bad(sched("linear_warmup_cosine", 1.0, 0.0, 10, 10)); // warmup == total
        bad(sched("linear_warmup_linear", 1.0, 0.0, 10, 11));
        let e = |g: f64, ss: u64| new(ScheduleKind::Step, 1.0, 0.0, 10, 0, g, ss);
        bad(e(0.0, 1));
        bad(e(1.5, 1));
        bad(e(f64::NAN, 1));
        bad(e(-0.5, 1));
        bad(e(0.5, 0));
        bad(new(ScheduleKind::Exponential, 1.0, 0.0, 10, 0, 0.0, 1));
        // gamma/step_size are ignored where unused; gamma == 1 and min_lr == initial_lr are valid.
        assert!(new(ScheduleKind::Cosine, 1.0, 1.0, 10, 0, -3.0, 0).is_ok());
        assert!(new(ScheduleKind::Exponential, 1.0, 0.0, 10, 0, 1.0, 0).is_ok());
    }

    fn any_kind() -> impl Strategy<Value = ScheduleKind> {
        prop::sample::select(
            ScheduleKind::ALL
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>(),
        )
    }

    /// A random valid schedule.
    fn valid() -> impl Strategy<Value = Schedule> {
        (
            any_kind(),
            1e-8f64..10.0,
            0.0f64..=1.0,
            1u64..300,
            0.0f64..1.0,
            prop_oneof![Just(1.0f64), 1e-3f64..=1.0],
            1u64..50,
        )
            .prop_map(|(kind, init, min_frac, total, warm_frac, gamma, ss)| {
                let warm = if kind.has_warmup() {
                    (warm_frac * total as f64) as u64 // < total
                } else {
                    0
                };
                new(kind, init, init * min_frac, total, warm, gamma, ss).unwrap()
            })
    }

    proptest! {
        #[test]
        fn lr_stays_in_range_and_holds_after_total(s in valid()) {
            let (lo, hi) = (s.min_lr(), s.initial_lr());
            prop_assert!(s.lr(0) > 0.0);
            let total = s.total_steps();
            let last = s.lr(total);
            for step in 0..total + 50 {
                let v = s.lr(step);
                prop_assert!(v.is_finite() && lo <= v && v <= hi, "{s:?} lr({step}) = {v}");
                if step >= total {
                    prop_assert_eq!(v, last);
                }
            }
            prop_assert_eq!(s.lr(u64::MAX), last);
        }

        #[test]
        fn warmup_rises_then_decay_falls(s in valid()) {
            let w = s.warmup_steps();
            let tol = 1e-12 * s.initial_lr();
            for step in 0..s.total_steps() + 5 {
                let (a, b) = (s.lr(step), s.lr(step + 1));
                if step < w {
                    prop_assert!(b >= a, "{s:?}: warmup falls at {step}: {a} -> {b}");
                } else {
                    prop_assert!(b <= a + tol, "{s:?}: decay rises at {step}: {a} -> {b}");
                }
            }
            if s.kind().has_warmup() {
                prop_assert_eq!(s.lr(w), s.initial_lr());
            }
        }

        #[test]
        fn invalid_configs_error(
            kind in any_kind(),
            init in prop_oneof![Just(0.0f64), -10.0f64..0.0, Just(f64::NAN), Just(f64::INFINITY)],
            total in 0u64..100,
        ) {
            prop_assert!(new(kind, init, 0.0, total.max(1), 0, 0.5, 1).is_err());
            prop_assert!(new(kind, 1.0, 0.0, 0, 0, 0.5, 1).is_err());
            prop_assert!(new(kind, 1.0, 1.0 + init.abs().max(1e-9), total.max(1), 0, 0.5, 1).is_err());
            let t = total.max(1);
            // A warmup >= total (warmup kinds) or any warmup (the others) is rejected.
            prop_assert!(new(kind, 1.0, 0.0, t, t + total % 3, 0.5, 1).is_err());
        }
    }
}
