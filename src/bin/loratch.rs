//! The `loratch` command line: runtime info today; training, merging and generation as they land.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
    /// Show the libtorch version, the available devices and the thread count.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Info { json } => {
            let info = loratch::runtime::info();
            if json {
                match serde_json::to_string_pretty(&info) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
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
            }
        }
    }
    ExitCode::SUCCESS
}
