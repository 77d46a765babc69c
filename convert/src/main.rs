//! `llama5-convert`: convert, inspect and export Llama checkpoints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use llama5_convert::{inspect, parse_size, ConvertOptions, PrecisionSpec};

#[derive(Parser)]
#[command(
    name = "llama5-convert",
    version,
    about = "Convert Llama checkpoints (Hugging Face safetensors or GGUF) into llama5 model directories",
    after_help = "`convert` is the default: `llama5-convert <input> -o <dir>` is `llama5-convert convert <input> -o <dir>`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a checkpoint into a model directory (manifest.json, shard_*.bin, tokenizer.json).
    Convert(ConvertArgs),
    /// Describe a converted model directory or an input checkpoint.
    Inspect {
        /// A model directory, a Hugging Face directory, a .safetensors file or a .gguf file.
        path: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a GGUF model out as a Hugging Face checkpoint (F32 safetensors, config, tokenizer).
    ExportHf {
        /// The .gguf file.
        gguf: PathBuf,
        /// Output directory.
        #[arg(short, long)]
        output: PathBuf,
        /// Replace an existing checkpoint directory.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct ConvertArgs {
    /// A Hugging Face directory, a .safetensors file (config.json beside it) or a .gguf file.
    input: PathBuf,
    /// Output model directory.
    #[arg(short, long)]
    output: PathBuf,
    /// f16, bf16, int8, int4, or per layer: `layers.0-3=f16,*=int4` (`*` also covers embedding and LM head).
    #[arg(long, default_value = "f16", value_parser = |s: &str| s.parse::<PrecisionSpec>())]
    precision: PrecisionSpec,
    /// INT4 group size along the input dimension (a multiple of 8).
    #[arg(long, default_value_t = llama5_codegen::manifest::DEFAULT_GROUP_SIZE)]
    group_size: u32,
    /// INT4: symmetric quantization (min = -8 * scale) instead of asymmetric.
    #[arg(long)]
    symmetric: bool,
    /// INT8: one scale per tensor instead of one per output channel.
    #[arg(long)]
    int8_per_tensor: bool,
    /// Largest shard: bytes, or with a unit (256MiB, 64MB, 1GiB).
    #[arg(long, default_value = "256MiB", value_parser = |s: &str| parse_size(s))]
    shard_size: u64,
    /// Replace an existing model directory.
    #[arg(long)]
    force: bool,
}

const SUBCOMMANDS: [&str; 7] = ["convert", "inspect", "export-hf", "help", "-h", "--help", "-V"];

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(first) = args.get(1).and_then(|a| a.to_str()) {
        if !SUBCOMMANDS.contains(&first) && first != "--version" {
            args.insert(1, "convert".into());
        }
    }
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Convert(a) => {
            let options = ConvertOptions {
                precision: a.precision,
                group_size: a.group_size,
                symmetric: a.symmetric,
                int8_per_tensor: a.int8_per_tensor,
                shard_size: a.shard_size,
                force: a.force,
                progress: true,
            };
            let m = llama5_convert::convert(&a.input, &a.output, &options)
                .with_context(|| format!("converting {} into {}", a.input.display(), a.output.display()))?;
            eprintln!(
                "wrote {}: {} tensors, {} shards, {:.1} MiB",
                a.output.display(),
                m.tensors.len(),
                m.shards.len(),
                m.total_bytes() as f64 / (1 << 20) as f64
            );
        }
        Command::Inspect { path, json } => {
            let info = inspect::inspect(&path).with_context(|| format!("inspecting {}", path.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{info}");
            }
        }
        Command::ExportHf { gguf, output, force } => {
            llama5_convert::export_hf(&gguf, &output, force)
                .with_context(|| format!("exporting {} into {}", gguf.display(), output.display()))?;
            eprintln!("wrote {}", output.display());
        }
    }
    Ok(())
}
