//! `llama5`: generate, chat, measure perplexity and inspect adapters with a
//! llama5-converted model.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use llama5_codegen::manifest::Precision;
use llama5_runtime::bench::{self, BenchBackend, BenchOptions, ModelSource};
use llama5_runtime::chat::ChatTemplate;
use llama5_runtime::generate::{Chat, GenerateOptions, Generation, Generator};
use llama5_runtime::gpu::{self, GpuBackend, GpuOptions};
use llama5_runtime::perplexity::perplexity;
use llama5_runtime::sampling::SamplingParams;
use llama5_runtime::synthetic::SyntheticShape;
use llama5_runtime::tiers::{self, Tier};
use llama5_runtime::tokenizer::Tokenizer;
use llama5_runtime::{Backend, CpuBackend, Model, RuntimeError};

#[derive(Parser)]
#[command(name = "llama5", version, about = "Run llama5-converted models on a WebGPU adapter or the CPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streamed to stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// Render the prompt as a user message through the model's chat template.
        #[arg(long)]
        chat: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Chat interactively: one user message per line on stdin; `/reset` forgets, `/exit` quits.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Perplexity over a text file, llama.cpp style (windows of --ctx, second half scored).
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        /// The text file to score.
        #[arg(long)]
        text: PathBuf,
        /// Score only the first N tokens of the text.
        #[arg(long)]
        tokens: Option<usize>,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List adapters; with a model, summarise its tiers.
    Info { model: Option<PathBuf> },
    /// Measure decode and prefill speed, copy bandwidth, bytes per token and device memory.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// A converted model directory, or a directory of precision tiers.
    #[arg(required_unless_present = "synthetic", conflicts_with = "synthetic")]
    model: Option<PathBuf>,
    /// Random weights of a real shape instead of a model: smollm2-135m, llama-1b or llama-7b.
    #[arg(long, value_name = "SHAPE")]
    synthetic: Option<String>,
    /// f16, bf16, int8 or int4; for a tier directory `auto` takes the highest tier (synthetic default: int4).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = BenchBackendChoice::Gpu)]
    backend: BenchBackendChoice,
    /// Case-insensitive substring of the GPU adapter's name.
    #[arg(long)]
    adapter: Option<String>,
    /// Repetitions of prompt, decode and prefill.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Decode steps timed after the prompt.
    #[arg(long, default_value_t = 100)]
    gen_tokens: usize,
    /// Length of the prompt whose prefill is timed.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Size of each copy-test buffer in MiB (default: 1024 on GPUs, 64 on software adapters, 256 on the CPU).
    #[arg(long)]
    copy_mib: Option<u64>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Also time every kernel of a decode step and of the prefill on the GPU (timestamp queries).
    #[arg(long)]
    profile: bool,
    /// Decode by sampling at this temperature instead of greedily (0).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BenchBackendChoice {
    Gpu,
    Cpu,
}

/// How the GPU backend stores the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KvCacheChoice {
    /// f32: the same numbers as the CPU backend, token for token.
    F32,
    /// f16 where the adapter has `shader-f16`: half the KV memory and reads, at the
    /// cost of rounding that can flip a near-tie between two tokens.
    F16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Gpu,
    Cpu,
}

#[derive(Args)]
struct ModelArgs {
    /// A converted model directory, or a directory of precision tiers (f16/, int8/, int4/).
    model: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Case-insensitive substring of the GPU adapter's name.
    #[arg(long)]
    adapter: Option<String>,
    /// `auto` (highest precision that fits), f16, bf16, int8 or int4.
    #[arg(long, default_value = "auto")]
    precision: String,
    /// KV-cache positions (capped at the model's max_position_embeddings); perplexity's window.
    #[arg(long)]
    ctx: Option<usize>,
    /// Skip checking shard sha256 sums.
    #[arg(long)]
    no_verify: bool,
    /// Directory for the GPU pipeline cache (Vulkan) [default: $LLAMA5_CACHE/pipelines,
    /// $XDG_CACHE_HOME/llama5/pipelines or ~/.cache/llama5/pipelines]
    #[arg(long)]
    pipeline_cache: Option<PathBuf>,
    /// Do not read or write the GPU pipeline cache.
    #[arg(long, conflicts_with = "pipeline_cache")]
    no_pipeline_cache: bool,
    /// KV-cache precision on the GPU.
    #[arg(long, value_enum, default_value = "f32")]
    kv_cache: KvCacheChoice,
}

/// Where compiled pipelines are kept between runs, unless the user says otherwise.
fn default_pipeline_cache() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let root = var("LLAMA5_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("llama5")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("llama5")))?;
    Some(root.join("pipelines"))
}

#[derive(Args)]
struct SamplingArgs {
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed of the sampler (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Slide the context window instead of stopping when it is full.
    #[arg(long)]
    sliding_window: bool,
}

impl SamplingArgs {
    fn options(&self) -> GenerateOptions {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        GenerateOptions {
            max_tokens: self.max_tokens,
            sampling: SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed },
            sliding_window: self.sliding_window,
        }
    }
}

const DEFAULT_CTX: usize = 2048;
const DEFAULT_PERPLEXITY_CTX: usize = 512;

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("llama5: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate { model, prompt, chat, sampling } => generate(&model, &prompt, chat, &sampling),
        Command::Chat { model, sampling } => chat(&model, &sampling),
        Command::Perplexity { model, text, tokens, json } => perplexity_cmd(&model, &text, tokens, json),
        Command::Info { model } => info(model.as_deref()),
        Command::Bench(args) => bench_cmd(&args),
    }
}

// ----------------------------------------------------------------------------
// Loading: tiers, model, backend

/// A loaded model; the backend borrows it.
struct Loaded {
    model: Model,
    tier: Tier,
    /// A GPU backend already built for this model, if the GPU was chosen.
    gpu: Option<GpuBackend>,
    load: Duration,
}

/// Picks the tier and backend: for the GPU, each candidate tier in turn until
/// one fits; for `auto`, the CPU with the best tier when no GPU is usable.
fn load(args: &ModelArgs, ctx: usize) -> Result<Loaded> {
    let requested = match args.precision.as_str() {
        "auto" => None,
        p => Some(p.parse::<Precision>().map_err(anyhow::Error::msg)?),
    };
    let candidates = tiers::select(&tiers::discover(&args.model)?, requested)?;
    let open = |tier: &Tier| -> Result<(Model, Duration)> {
        let t0 = Instant::now();
        let model = Model::open(&tier.dir, !args.no_verify)?;
        Ok((model, t0.elapsed()))
    };
    if args.backend == BackendChoice::Cpu {
        let (model, load) = open(&candidates[0])?;
        return Ok(Loaded { model, tier: candidates[0].clone(), gpu: None, load });
    }
    let pipeline_cache_dir =
        if args.no_pipeline_cache { None } else { args.pipeline_cache.clone().or_else(default_pipeline_cache) };
    let opts = GpuOptions { adapter: args.adapter.clone(), ctx, pipeline_cache_dir };
    let mut last_error = None;
    // the first tier, kept for the CPU should no tier fit the GPU
    let mut first = None;
    for (i, tier) in candidates.iter().enumerate() {
        let (model, open_time) = open(tier)?;
        let ctx = ctx.min(model.manifest.model.max_position_embeddings);
        let t0 = Instant::now();
        // f16 is used for nothing but the KV cache, so withholding it selects an f32 cache.
        let features = match args.kv_cache {
            KvCacheChoice::F16 => wgpu::Features::all(),
            KvCacheChoice::F32 => wgpu::Features::all() - wgpu::Features::SHADER_F16,
        };
        match GpuBackend::with_features(&model, &GpuOptions { ctx, ..opts.clone() }, features) {
            Ok(gpu) => return Ok(Loaded { model, tier: tier.clone(), gpu: Some(gpu), load: open_time + t0.elapsed() }),
            Err(e) if tiers::does_not_fit(&e) => {
                match candidates.get(i + 1) {
                    Some(next) => {
                        eprintln!("llama5: the {} tier does not fit the GPU ({e}); trying {}", tier.name(), next.name())
                    }
                    None => eprintln!("llama5: the {} tier does not fit the GPU ({e})", tier.name()),
                }
                last_error = Some(e);
                if i == 0 {
                    first = Some((model, open_time));
                }
            }
            Err(e) if args.backend == BackendChoice::Auto => {
                eprintln!("llama5: no usable GPU ({e}); using the CPU backend");
                return Ok(Loaded { model, tier: tier.clone(), gpu: None, load: open_time });
            }
            Err(e) => return Err(e).context("starting the GPU backend"),
        }
    }
    let e = last_error.map_or_else(|| "no candidate tier".to_string(), |e| e.to_string());
    if args.backend == BackendChoice::Auto {
        eprintln!("llama5: no tier fits the GPU ({e}); using the CPU backend");
        let (model, load) = match first {
            Some(opened) => opened,
            None => open(&candidates[0])?,
        };
        return Ok(Loaded { model, tier: candidates[0].clone(), gpu: None, load });
    }
    bail!("no tier of {} fits the GPU: {e}", args.model.display())
}

impl Loaded {
    /// The backend to run: the GPU one built in [`load`], or a CPU one over the model.
    fn backend(&mut self, ctx: usize) -> Result<Box<dyn Backend + '_>> {
        match self.gpu.take() {
            Some(gpu) => Ok(Box::new(gpu)),
            None => {
                let t0 = Instant::now();
                let cpu = CpuBackend::new(&self.model, ctx)?;
                self.load += t0.elapsed();
                Ok(Box::new(cpu))
            }
        }
    }

    fn load_report(&self) -> String {
        let gpu = self.gpu.as_ref().map(GpuBackend::load_report).filter(|r| !r.is_empty());
        let tier = format!("{} tier from {}", self.tier.name(), self.tier.dir.display());
        match gpu {
            Some(r) => format!("{:.2} s ({tier}; {r})", self.load.as_secs_f64()),
            None => format!("{:.2} s ({tier})", self.load.as_secs_f64()),
        }
    }
}

fn context_size(args: &ModelArgs, default: usize) -> Result<usize> {
    let ctx = args.ctx.unwrap_or(default);
    if ctx == 0 {
        bail!("--ctx must be at least 1");
    }
    Ok(ctx)
}

/// The model's limit applies once its manifest is read.
fn capped(ctx: usize, model: &Model) -> usize {
    ctx.min(model.manifest.model.max_position_embeddings)
}

fn summary(g: &Generation, backend: &dyn Backend, load: &str) -> String {
    let t = &g.timings;
    let info = backend.info();
    format!(
        "prefill: {} tok, {:.1} tok/s | decode: {} tok, {:.1} ms/token | backend: {} ({}) | load: {load}",
        t.prefill_tokens,
        t.prefill_tokens_per_sec(),
        t.decode_tokens,
        t.decode_ms_per_token(),
        info.kind,
        info.device
    )
}

fn stdout_sink() -> impl FnMut(&str) -> Result<(), RuntimeError> {
    |piece: &str| {
        let mut out = std::io::stdout().lock();
        out.write_all(piece.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| RuntimeError::Io { path: PathBuf::from("<stdout>"), source: e })
    }
}

fn chat_template(tokenizer: &Tokenizer, model: &Model) -> Result<ChatTemplate> {
    ChatTemplate::for_tokenizer(tokenizer)?
        .with_context(|| format!("{} has no chat template", model.dir.join("manifest.json").display()))
}

// ----------------------------------------------------------------------------
// Commands

fn generate(args: &ModelArgs, prompt: &str, chat: bool, sampling: &SamplingArgs) -> Result<()> {
    let ctx = context_size(args, DEFAULT_CTX)?;
    let mut loaded = load(args, ctx)?;
    let ctx = capped(ctx, &loaded.model);
    let tokenizer = Tokenizer::for_model(&loaded.model)?;
    let prompt_tokens = if chat {
        let template = chat_template(&tokenizer, &loaded.model)?;
        Chat::new(template).prompt(&tokenizer, prompt)?
    } else {
        tokenizer.encode(prompt, true)?
    };
    let load_report = loaded.load_report();
    let mut backend = loaded.backend(ctx)?;
    let opts = sampling.options();
    let mut generator = Generator::new(backend.as_mut(), &tokenizer);
    let generation = generator.generate(&prompt_tokens, &opts, &mut stdout_sink())?;
    println!();
    eprintln!("{}", summary(&generation, generator.backend(), &load_report));
    Ok(())
}

fn chat(args: &ModelArgs, sampling: &SamplingArgs) -> Result<()> {
    let ctx = context_size(args, DEFAULT_CTX)?;
    let mut loaded = load(args, ctx)?;
    let ctx = capped(ctx, &loaded.model);
    let tokenizer = Tokenizer::for_model(&loaded.model)?;
    let mut conversation = Chat::new(chat_template(&tokenizer, &loaded.model)?);
    let load_report = loaded.load_report();
    let mut backend = loaded.backend(ctx)?;
    let opts = sampling.options();
    let mut generator = Generator::new(backend.as_mut(), &tokenizer);
    eprintln!("llama5: chatting ({}); /reset forgets, /exit quits", load_report);
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
            break;
        }
        match line.trim() {
            "" => continue,
            "/exit" => break,
            "/reset" => {
                conversation.reset();
                generator.reset();
                eprintln!("llama5: history cleared");
                continue;
            }
            user => {
                let generation = conversation.turn(&mut generator, user, &opts, &mut stdout_sink())?;
                println!();
                eprintln!("{}", summary(&generation, generator.backend(), &load_report));
            }
        }
    }
    Ok(())
}

fn perplexity_cmd(args: &ModelArgs, text_path: &Path, limit: Option<usize>, json: bool) -> Result<()> {
    let ctx = context_size(args, DEFAULT_PERPLEXITY_CTX)?;
    let text = std::fs::read_to_string(text_path).with_context(|| format!("reading {}", text_path.display()))?;
    let mut loaded = load(args, ctx)?;
    let tokenizer = Tokenizer::for_model(&loaded.model)?;
    let mut tokens = tokenizer.encode(&text, true)?;
    if let Some(n) = limit {
        tokens.truncate(n);
    }
    let bos = tokenizer.info().add_bos.then_some(tokenizer.bos_token_id()).flatten();
    let mut backend = loaded.backend(ctx)?;
    let t0 = Instant::now();
    let report = perplexity(backend.as_mut(), &tokens, ctx, bos, &mut |w| {
        eprintln!("llama5: window {} (tokens {}..{}): ppl {:.4}", w.index, w.start, w.start + ctx, w.ppl);
    })?;
    let secs = t0.elapsed().as_secs_f64();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "perplexity: {:.4} over {} scored tokens ({} windows of {ctx}, {} tokens of {})",
            report.ppl,
            report.scored,
            report.windows.len(),
            report.tokens,
            text_path.display()
        );
    }
    let info = backend.info();
    eprintln!(
        "llama5: {:.1} s, {:.1} tok/s | backend: {} ({})",
        secs,
        report.tokens as f64 / secs,
        info.kind,
        info.device
    );
    Ok(())
}

fn info(model: Option<&Path>) -> Result<()> {
    print!("{}", gpu::adapters_report());
    let Some(path) = model else { return Ok(()) };
    for tier in tiers::discover(path)? {
        let manifest_path = tier.dir.join("manifest.json");
        let text =
            std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
        let m = llama5_codegen::manifest::Manifest::from_json(&text)
            .with_context(|| manifest_path.display().to_string())?;
        let c = &m.model;
        println!("model {} ({})", tier.dir.display(), c.name.as_deref().unwrap_or("unnamed"));
        println!("  precision:   {}", tier.name());
        println!(
            "  shape:       {} layers, hidden {}, ffn {}, {} heads / {} kv heads of {}, vocab {}",
            c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
        );
        println!(
            "  positions:   {} (rope theta {}), tied embeddings: {}",
            c.max_position_embeddings, c.rope_theta, c.tie_word_embeddings
        );
        println!("  shards:      {} files, {:.1} MiB", m.shards.len(), m.total_bytes() as f64 / (1024.0 * 1024.0));
        let t = &m.tokenizer;
        println!(
            "  tokenizer:   {} (bos {}, eos {}, chat template: {})",
            t.file,
            t.bos_token_id.map_or("none".to_string(), |id| id.to_string()),
            t.eos_token_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "),
            if t.chat_template.is_some() { "yes" } else { "no" }
        );
        println!("  converter:   {} {} from {}", m.converter.name, m.converter.version, m.converter.source);
    }
    Ok(())
}

fn bench_cmd(args: &BenchArgs) -> Result<()> {
    let precision = match args.precision.as_str() {
        "auto" => None,
        p => Some(p.parse::<Precision>().map_err(anyhow::Error::msg)?),
    };
    let source = match (&args.model, &args.synthetic) {
        (_, Some(shape)) => ModelSource::Synthetic {
            shape: shape.parse::<SyntheticShape>().map_err(anyhow::Error::msg)?,
            precision: precision.unwrap_or(Precision::Int4),
            seed: args.seed,
        },
        (Some(path), None) => ModelSource::Dir { path: path.clone(), precision },
        (None, None) => bail!("give a model directory or --synthetic SHAPE"),
    };
    let opts = BenchOptions {
        backend: match args.backend {
            BenchBackendChoice::Gpu => BenchBackend::Gpu { adapter: args.adapter.clone() },
            BenchBackendChoice::Cpu => BenchBackend::Cpu,
        },
        runs: args.runs,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        prefill_tokens: args.prefill_tokens,
        copy_bytes: args.copy_mib.map(|m| m << 20),
        profile: args.profile,
        temperature: args.temperature,
    };
    let report = bench::run(&source, &opts).context("benchmark")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}
