//! The `loratch` command line: training, merging, export to llama.cpp, text generation (with
//! optional adapters) and runtime info, running on libtorch alone (no Python).
use clap::{Parser, Subcommand};
use loratch::advice::Caller;
use loratch::hf::generate::{generate, GenerateOptions};
use loratch::hf::{LoadConfig, LoadOptions, LoadedModel};
use loratch::tokenizer::{chat::Message, Tokenizer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod mkl_dispatch;

#[derive(Parser)]
#[command(
    name = "loratch",
    version,
    about = "LoRA fine-tuning on libtorch, no Python needed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune LoRA adapters as a TOML or YAML config says (see README "Training").
    Train {
        /// The configuration: TOML, or YAML when it ends in .yaml/.yml.
        #[arg(long)]
        config: PathBuf,
        /// Override a config value: `key=value` or `section.key=value` (TOML syntax; other
        /// tools' key names accepted as in the file), repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Overrides as bare arguments, as `--set` takes them (`loratch train --config c.yaml
        /// learning_rate=1e-4 lora.rank=8`).
        #[arg(value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Resume from a checkpoint directory, or from the newest checkpoint of an output dir.
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// Show the training data as the trainer will see it: the first examples with the trained
    /// text marked, counts (examples, tokens, targets, truncations, packed rows, padding) and
    /// warnings (EOS never trained, no assistant part, no target after truncation, doubled BOS).
    Data {
        /// The training configuration (as for `train`).
        #[arg(long)]
        config: PathBuf,
        /// Override a config value: `section.key=value` (TOML syntax), repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// How many examples to show.
        #[arg(long, default_value_t = 3)]
        show: usize,
    },
    /// Show the libtorch version, the available devices, the thread count and the CPU GEMM setup.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also measure the fp32 matmul throughput on the CPU (1024^3, best of 10), in GFLOP/s.
        #[arg(long)]
        matmul_peak: bool,
    },
    /// Fold adapters into a model and write it as a Hugging Face directory, or as a GGUF that
    /// llama.cpp runs alone when --out ends in .gguf (a quantized base is decoded, then the
    /// adapters' delta added in float32).
    Merge {
        /// The base model: a Hugging Face directory, a .gguf file, or a Hub id
        /// (owner/name[@revision]) in the local Hugging Face cache.
        #[arg(long)]
        model: PathBuf,
        /// Adapters: a PEFT directory, a .safetensors or a .pt file.
        #[arg(long)]
        adapter: PathBuf,
        /// Output: a directory (must not exist or be empty), or a .gguf file.
        #[arg(long)]
        out: PathBuf,
        /// "float32", "bfloat16" or "float16" (the model's dtype while merging).
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// For a .gguf output: the matrices' type, "f32", "f16", "bf16", "q8_0" or "q4_0".
        #[arg(long = "type", value_name = "TYPE")]
        gguf_type: Option<String>,
        /// Before writing, check the merged weights' logits against base + adapter on a few
        /// prompts: fail (writing nothing) on a mismatch beyond float rounding, or when the
        /// merge changes nothing (README "Merging").
        #[arg(long)]
        verify: bool,
        /// A prompt for --verify (repeatable; default: three built-in prompts).
        #[arg(long = "verify-prompt", value_name = "TEXT", requires = "verify")]
        verify_prompt: Vec<String>,
    },
    /// Write adapters as a llama.cpp LoRA adapter GGUF, to run with the base model's GGUF
    /// (`llama-cli -m base.gguf --lora adapter.gguf`).
    Export {
        /// The base model the adapters were trained on: a Hugging Face directory, a .gguf file,
        /// or a Hub id (owner/name[@revision]) in the local Hugging Face cache.
        #[arg(long)]
        model: PathBuf,
        /// Adapters: a PEFT directory, a .safetensors or a .pt file.
        #[arg(long)]
        adapter: PathBuf,
        /// The adapter GGUF to write (ending in .gguf).
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate text from a model, optionally with LoRA adapters.
    Generate {
        /// A Hugging Face directory (config.json, model.safetensors, tokenizer.json), a .gguf file,
        /// or a Hub id (owner/name[@revision]) in the local Hugging Face cache.
        #[arg(long)]
        model: PathBuf,
        /// Adapters: a PEFT directory, a .safetensors or a .pt file.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The prompt (a user message, rendered with the model's chat template unless --raw).
        #[arg(long)]
        prompt: String,
        /// Feed the prompt as plain text instead of a chat message.
        #[arg(long)]
        raw: bool,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sample with this temperature instead of greedy decoding.
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long)]
        seed: Option<u64>,
        /// "cpu", "cuda", "cuda:N" or "mps".
        #[arg(long, default_value = "cpu")]
        device: String,
        /// "float32", "bfloat16" or "float16".
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Hold the frozen base as "none" (float), "q8_0", "q4_0" or "nf4" (default: as stored).
        #[arg(long)]
        quantize: Option<String>,
    },
}

fn info(json: bool, matmul_peak: bool) -> loratch::Result<()> {
    let info = loratch::runtime::info();
    let peak = if matmul_peak {
        Some(loratch::runtime::matmul_gflops(1024, 10)?)
    } else {
        None
    };
    if json {
        let mut value =
            serde_json::to_value(&info).map_err(|e| loratch::Error::Config(e.to_string()))?;
        value["mkl_dispatch_forced"] = mkl_dispatch::forced().into();
        value["matmul_gflops"] = peak.into();
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| loratch::Error::Config(e.to_string()))?;
        println!("{text}");
    } else {
        println!("loratch {}", info.loratch_version);
        println!("libtorch {}", info.torch_version);
        println!("devices: {}", info.devices.join(", "));
        println!(
            "cuda devices: {} (cudnn: {})",
            info.cuda_devices, info.cudnn
        );
        println!("mps: {}", info.mps);
        println!("cpu threads: {}", info.threads);
        println!(
            "cpu gemm: {} ({}=mkl keeps oneMKL's vendor check)",
            mkl_dispatch::describe(),
            mkl_dispatch::ENV
        );
        if let Some(p) = peak {
            println!("fp32 matmul: {p:.1} GFLOP/s (1024^3, best of 10)");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_generate(
    model_dir: PathBuf,
    adapter: Option<PathBuf>,
    prompt: String,
    raw: bool,
    max_new_tokens: usize,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    seed: Option<u64>,
    device: String,
    dtype: String,
    quantize: Option<String>,
) -> loratch::Result<()> {
    let opts = LoadOptions::parse(&LoadConfig {
        device,
        dtype,
        quantize,
    })?;
    let mut model = LoadedModel::load(&model_dir, &opts)?;
    if let Some(path) = adapter {
        loratch::hf::peft::load_for(&mut model, &path, Caller::Cli)?;
    }
    let tokenizer = Tokenizer::for_model(&model_dir)?;
    let ids = if raw || tokenizer.chat_template().is_none() {
        tokenizer.encode(&prompt, true)?
    } else {
        let text = tokenizer.apply_chat_template(&[Message::user(prompt)], true)?;
        tokenizer.encode(&text, false)?
    };
    let mut eos: Vec<i64> = model.lm.config.eos_token_ids.clone();
    eos.extend(tokenizer.eos_token_id().map(i64::from));
    let gen = GenerateOptions {
        max_new_tokens,
        eos_token_ids: eos,
        greedy: temperature.is_none(),
        temperature: temperature.unwrap_or(1.0),
        top_k,
        top_p,
        seed,
    };
    let prompt_ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let out = generate(&model, &prompt_ids, &gen)?;
    let out: Vec<u32> = out.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
    println!("{}", tokenizer.decode(&out, true)?.trim());
    Ok(())
}

fn is_gguf_path(p: &std::path::Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The token ids of `--verify`'s prompts: with the model's tokenizer, or (a model without
/// one) fixed ids spread over the vocabulary.
fn verify_prompts(model: &LoadedModel, prompts: &[String]) -> loratch::Result<Vec<Vec<i64>>> {
    let builtin = loratch::hf::verify::PROMPTS.map(String::from);
    let prompts = if prompts.is_empty() {
        &builtin[..]
    } else {
        prompts
    };
    let Ok(tokenizer) = Tokenizer::for_model(&model.path) else {
        let vocab = model.lm.config.vocab_size;
        let ids = |k: i64| (1..=16).map(|i| (i * 7919 * k) % vocab).collect();
        return Ok((1..=prompts.len() as i64).map(ids).collect());
    };
    prompts
        .iter()
        .map(|p| {
            Ok(tokenizer
                .encode(p, true)?
                .into_iter()
                .map(i64::from)
                .collect())
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn merge(
    model_dir: PathBuf,
    adapter: PathBuf,
    out: PathBuf,
    dtype: String,
    gguf_type: Option<String>,
    verify: bool,
    verify_prompt: Vec<String>,
) -> loratch::Result<()> {
    // Every argument is checked before the (slow) load.
    let gguf = match (is_gguf_path(&out), gguf_type) {
        (true, t) => {
            let name = t.as_deref().unwrap_or("f16");
            let types = loratch::model::llamacpp::MERGED_TYPES;
            let ty = loratch::quant::QType::from_name(name).filter(|t| types.contains(t));
            Some(ty.ok_or_else(|| {
                loratch::Error::Config(format!(
                    "--type {name:?}: expected one of {}",
                    types.map(|t| t.name()).join(", ")
                ))
            })?)
        }
        (false, Some(_)) => {
            return Err(loratch::Error::Config(
                "--type applies to a .gguf output only".into(),
            ))
        }
        (false, None) => None,
    };
    let opts = LoadOptions::parse(&LoadConfig {
        dtype,
        ..LoadConfig::default()
    })?;
    let mut model = LoadedModel::load(&model_dir, &opts)?;
    loratch::hf::peft::load_for(&mut model, &adapter, Caller::Cli)?;
    if verify {
        let prompts = verify_prompts(&model, &verify_prompt)?;
        let check = loratch::hf::verify::verify_merge(&mut model, &prompts)?;
        eprintln!(
            "verify: merged vs base + adapter: max |logit difference| {:.2e} (bound {:.2e}); \
             the merge changes the logits by up to {:.2e}",
            check.mismatch, check.bound, check.change
        );
    }
    match gguf {
        Some(ty) => loratch::model::llamacpp::save_merged(&model.lm, &model.path, &out, ty)?,
        None => loratch::hf::export::save_merged(&model, &out)?,
    }
    if let Some(q) = model.lm.quantization() {
        let stored = match gguf {
            Some(ty) => format!("stored as {ty}"),
            None => format!("float ({})", loratch::device::dtype_name(model.lm.kind())),
        };
        eprintln!(
            "note: the base was quantized ({q}); the merged model is {stored}: the decoded base \
             plus the adapters' delta"
        );
    }
    println!("{}", out.display());
    Ok(())
}

fn export(model_dir: PathBuf, adapter: PathBuf, out: PathBuf) -> loratch::Result<()> {
    if !is_gguf_path(&out) {
        return Err(loratch::Error::Config(format!(
            "--out {}: a llama.cpp adapter is a .gguf file",
            out.display()
        )));
    }
    let mut model = LoadedModel::load(&model_dir, &LoadOptions::parse(&LoadConfig::default())?)?;
    loratch::hf::peft::load_for(&mut model, &adapter, Caller::Cli)?;
    loratch::model::llamacpp::save_adapter(&model.lm, &model.path, &out)?;
    println!("{}", out.display());
    Ok(())
}

fn data(config: PathBuf, set: Vec<String>, show: usize) -> loratch::Result<()> {
    use std::io::IsTerminal;
    let parsed = loratch::train::TrainConfig::read(&config, &set)?;
    for note in &parsed.notes {
        eprintln!("note: {note}");
    }
    let cfg = parsed.config;
    let report = loratch::data::inspect::inspect(&cfg, show)?;
    print!("{}", report.text(std::io::stdout().is_terminal()));
    Ok(())
}

/// Stops the trainer at the next step on the first Ctrl-C (it saves a checkpoint); a second
/// Ctrl-C exits at once.
struct CtrlC(Arc<AtomicBool>);

impl loratch::train::Hooks for CtrlC {
    fn should_stop(&mut self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
const INTERRUPTED: u8 = 130;

fn run_train(config: PathBuf, set: Vec<String>, resume: Option<PathBuf>) -> loratch::Result<bool> {
    let parsed = loratch::train::TrainConfig::read(&config, &set)?;
    for note in &parsed.notes {
        eprintln!("note: {note}");
    }
    let cfg = parsed.config;
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            std::process::exit(i32::from(INTERRUPTED));
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })
    .map_err(|e| loratch::Error::State(format!("cannot install the Ctrl-C handler: {e}")))?;
    let out = loratch::train::train(&cfg, resume.as_deref(), &mut CtrlC(flag))?;
    let show = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    if let (Some(a), Some(b)) = (out.initial_eval_loss, out.final_eval_loss) {
        println!("held-out loss: {a:.4} -> {b:.4}");
    }
    if let Some(a) = show(&out.adapter_dir) {
        println!("adapter: {a}");
    }
    if let Some(c) = show(&out.last_checkpoint) {
        println!("checkpoint: {c}");
    }
    if let Some(c) = show(&out.best_checkpoint) {
        println!("best checkpoint: {c}");
    }
    println!("metrics: {}", out.metrics_file.display());
    if let Some(p) = show(&out.plot_file) {
        println!("plot: {p}");
    }
    if let Some(t) = show(&out.tensorboard_dir) {
        println!("tensorboard: tensorboard --logdir {t}");
    }
    Ok(!out.interrupted)
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of stdout goes away (`loratch info | head`)
    // instead of panicking on the next println.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    loratch::runtime::keep_freed_memory();
    let result = match Cli::parse().command {
        Command::Train {
            config,
            mut set,
            overrides,
            resume,
        } => match run_train(
            config,
            {
                set.extend(overrides);
                set
            },
            resume,
        ) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(INTERRUPTED),
            Err(e) => Err(e),
        },
        Command::Data { config, set, show } => data(config, set, show),
        Command::Info { json, matmul_peak } => info(json, matmul_peak),
        Command::Merge {
            model,
            adapter,
            out,
            dtype,
            gguf_type,
            verify,
            verify_prompt,
        } => merge(model, adapter, out, dtype, gguf_type, verify, verify_prompt),
        Command::Export {
            model,
            adapter,
            out,
        } => export(model, adapter, out),
        Command::Generate {
            model,
            adapter,
            prompt,
            raw,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
            dtype,
            quantize,
        } => run_generate(
            model,
            adapter,
            prompt,
            raw,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
            dtype,
            quantize,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
