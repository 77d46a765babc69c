//! `llama5-convert`: convert, inspect and export Llama checkpoints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use llama5_codegen::manifest::Precision;
use llama5_convert::calibrate::{calibrate, CalibrateOptions};
use llama5_convert::route::{convert_routed, LossLimit, Objective};
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
    /// Measure how much quantizing each layer (and the embedding with the LM head) alone costs,
    /// on the CPU backend, for `--calibration`.
    Calibrate(CalibrateArgs),
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
    /// f16, bf16, int8, int4; per layer: `layers.0-3=f16,*=int4` (`*` also covers embedding and LM
    /// head); or tiers: `int4,int8,f16` writes `<output>/int4`, `<output>/int8`, `<output>/f16`.
    #[arg(long, default_value = "f16", value_parser = |s: &str| s.parse::<PrecisionArg>())]
    precision: PrecisionArg,
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
    /// Choose each layer's precision from this calibration file (from `llama5-convert calibrate`);
    /// needs --budget or --max-loss and replaces --precision.
    #[arg(long, requires = "objective")]
    calibration: Option<PathBuf>,
    /// With --calibration: the most accurate plan of at most this size (bytes, or 100MiB, 90MB).
    #[arg(long, group = "objective", requires = "calibration", value_parser = |s: &str| parse_size(s))]
    budget: Option<u64>,
    /// With --calibration: the smallest plan whose predicted loss stays within this many nats per
    /// token (0.02), or this perplexity increase (2%).
    #[arg(long, group = "objective", requires = "calibration", value_parser = |s: &str| s.parse::<LossLimit>())]
    max_loss: Option<LossLimit>,
}

#[derive(Args)]
struct CalibrateArgs {
    /// A Hugging Face directory, a .safetensors file (config.json beside it) or a .gguf file.
    input: PathBuf,
    /// The calibration text (a UTF-8 file).
    #[arg(long)]
    text: PathBuf,
    /// Output calibration file.
    #[arg(short, long, default_value = "calibration.json")]
    output: PathBuf,
    /// Use at most this many tokens of the text (one window from position 0).
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// The precisions to measure, comma-separated (each against f16).
    #[arg(long, default_value = "int8,int4", value_delimiter = ',')]
    precisions: Vec<Precision>,
    /// INT4 group size along the input dimension (a multiple of 8).
    #[arg(long, default_value_t = llama5_codegen::manifest::DEFAULT_GROUP_SIZE)]
    group_size: u32,
    /// INT4: symmetric quantization (min = -8 * scale) instead of asymmetric.
    #[arg(long)]
    symmetric: bool,
    /// INT8: one scale per tensor instead of one per output channel.
    #[arg(long)]
    int8_per_tensor: bool,
}

/// `--precision`: one model's spec, or a list of uniform tiers.
#[derive(Clone)]
enum PrecisionArg {
    Spec(PrecisionSpec),
    Tiers(Vec<Precision>),
}

impl std::str::FromStr for PrecisionArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains(',') && !s.contains('=') {
            return s.split(',').map(|p| p.trim().parse()).collect::<Result<_, _>>().map(PrecisionArg::Tiers);
        }
        s.parse().map(PrecisionArg::Spec)
    }
}

const SUBCOMMANDS: [&str; 8] = ["convert", "inspect", "calibrate", "export-hf", "help", "-h", "--help", "-V"];

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
            let (precision, tiers) = match a.precision {
                PrecisionArg::Spec(s) => (s, None),
                PrecisionArg::Tiers(t) => (PrecisionSpec::default(), Some(t)),
            };
            let options = ConvertOptions {
                precision,
                group_size: a.group_size,
                symmetric: a.symmetric,
                int8_per_tensor: a.int8_per_tensor,
                shard_size: a.shard_size,
                force: a.force,
                progress: true,
                routing: None,
            };
            let context = || format!("converting {} into {}", a.input.display(), a.output.display());
            if let Some(tiers) = tiers {
                if a.calibration.is_some() {
                    anyhow::bail!("--calibration routes one model; it does not combine with a list of tiers");
                }
                let ms = llama5_convert::convert_tiers(&a.input, &a.output, &tiers, &options).with_context(context)?;
                for (p, m) in tiers.iter().zip(&ms) {
                    eprintln!(
                        "wrote {}: {} shards, {:.1} MiB",
                        a.output.join(p.as_str()).display(),
                        m.shards.len(),
                        m.total_bytes() as f64 / (1 << 20) as f64
                    );
                }
                return Ok(());
            }
            let m = match (&a.calibration, a.budget, a.max_loss) {
                (Some(cal), budget, max_loss) => {
                    let objective = match (budget, max_loss) {
                        (Some(b), _) => Objective::Budget(b),
                        (None, Some(l)) => Objective::MaxLoss(l),
                        (None, None) => anyhow::bail!("--calibration needs --budget or --max-loss"),
                    };
                    let (m, route) =
                        convert_routed(&a.input, &a.output, &options, cal, objective).with_context(context)?;
                    eprintln!(
                        "routed for {objective}: {} (predicted mean KL {:.4} nats, at most {} bytes)",
                        route.spec(),
                        route.predicted_kl,
                        route.planned_bytes
                    );
                    m
                }
                (None, _, _) => llama5_convert::convert(&a.input, &a.output, &options).with_context(context)?,
            };
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
        Command::Calibrate(a) => {
            let options = CalibrateOptions {
                tokens: a.tokens,
                precisions: a.precisions,
                group_size: a.group_size,
                symmetric: a.symmetric,
                int8_per_tensor: a.int8_per_tensor,
            };
            let start = std::time::Instant::now();
            let cal = calibrate(&a.input, &a.text, &options)
                .with_context(|| format!("calibrating {} on {}", a.input.display(), a.text.display()))?;
            std::fs::write(&a.output, cal.to_json()).with_context(|| format!("writing {}", a.output.display()))?;
            eprintln!(
                "wrote {}: {} units x {} precisions over {} tokens in {:.1} s",
                a.output.display(),
                cal.units.len(),
                cal.options.precisions.len(),
                cal.tokens,
                start.elapsed().as_secs_f64()
            );
        }
        Command::ExportHf { gguf, output, force } => {
            llama5_convert::export_hf(&gguf, &output, force)
                .with_context(|| format!("exporting {} into {}", gguf.display(), output.display()))?;
            eprintln!("wrote {}", output.display());
        }
    }
    Ok(())
}
