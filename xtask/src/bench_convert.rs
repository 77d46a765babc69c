//! `cargo xtask bench convert`: converting a synthetic Llama-3.2-1B-shaped F16
//! safetensors checkpoint to INT4 and to F16, timed against `cp` of the same
//! bytes, with the converter's peak resident memory.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::util;

/// Llama-3.2-1B: hidden 2048, 16 layers, 32/8 heads of 64, FFN 8192, vocab 128256, tied.
const HIDDEN: usize = 2048;
const FFN: usize = 8192;
const LAYERS: usize = 16;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 128256;

pub fn run() -> anyhow::Result<()> {
    let root = util::workspace_root().join("target/bench/convert");
    let src = root.join("llama-1b-f16");
    write_checkpoint(&src)?;
    util::run(util::cargo().args(["build", "--release", "-p", "llama5-convert"]))?;
    let exe = util::workspace_root().join("target/release/llama5-convert");

    let weights = src.join("model.safetensors");
    let bytes = std::fs::metadata(&weights).with_context(|| format!("reading {}", weights.display()))?.len();
    let copy = root.join("copy.safetensors");
    // once to bring the file into the page cache, as the conversions will find it
    timed(Command::new("cp").arg(&weights).arg(&copy))?;
    let (cp_secs, _) = timed(Command::new("cp").arg(&weights).arg(&copy))?;
    std::fs::remove_file(&copy).ok();

    let mut rows = vec![format!("| cp | {cp_secs:.2} | 1.00 | |")];
    for precision in ["int4", "f16"] {
        let out = root.join(format!("out-{precision}"));
        let mut cmd = Command::new(&exe);
        cmd.arg(&src).arg("-o").arg(&out).args(["--precision", precision, "--force"]);
        let (secs, rss) = timed(&mut cmd)?;
        let rss = rss.map_or("unknown (no /usr/bin/time)".to_string(), |kb| format!("{:.0} MiB", kb as f64 / 1024.0));
        rows.push(format!("| llama5-convert --precision {precision} | {secs:.2} | {:.2} | {rss} |", secs / cp_secs));
        std::fs::remove_dir_all(&out).ok();
    }
    let table = format!(
        "converting a synthetic llama-1b F16 checkpoint ({:.2} GiB)\n\n| step | seconds | ratio to cp | peak RSS |\n|---|---|---|---|\n{}\n",
        bytes as f64 / (1u64 << 30) as f64,
        rows.join("\n")
    );
    print!("{table}");
    let md = root.join("convert.md");
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    println!("written to {}", md.display());
    Ok(())
}

/// Runs `cmd`, returning wall seconds and, where GNU time is installed, the peak RSS in KiB.
fn timed(cmd: &mut Command) -> anyhow::Result<(f64, Option<u64>)> {
    let gnu_time = Path::new("/usr/bin/time");
    let (mut run, rss_file) = if gnu_time.exists() {
        let file = std::env::temp_dir().join(format!("llama5-bench-rss-{}", std::process::id()));
        let mut wrapped = Command::new(gnu_time);
        wrapped.arg("-f").arg("%M").arg("-o").arg(&file).arg(cmd.get_program()).args(cmd.get_args());
        (wrapped, Some(file))
    } else {
        (std::mem::replace(cmd, Command::new("true")), None)
    };
    let start = Instant::now();
    let status = run.status().with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{:?} failed ({status})", cmd.get_program());
    }
    let rss = rss_file.and_then(|f| {
        let text = std::fs::read_to_string(&f).ok();
        std::fs::remove_file(&f).ok();
        text?.trim().lines().last()?.parse().ok()
    });
    Ok((secs, rss))
}

/// The tensors of the checkpoint, in file order, with their shapes.
fn tensors() -> Vec<(String, Vec<usize>)> {
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        t.push((p("input_layernorm.weight"), vec![HIDDEN]));
        t.push((p("self_attn.q_proj.weight"), vec![q, HIDDEN]));
        t.push((p("self_attn.k_proj.weight"), vec![kv, HIDDEN]));
        t.push((p("self_attn.v_proj.weight"), vec![kv, HIDDEN]));
        t.push((p("self_attn.o_proj.weight"), vec![HIDDEN, q]));
        t.push((p("post_attention_layernorm.weight"), vec![HIDDEN]));
        t.push((p("mlp.gate_proj.weight"), vec![FFN, HIDDEN]));
        t.push((p("mlp.up_proj.weight"), vec![FFN, HIDDEN]));
        t.push((p("mlp.down_proj.weight"), vec![HIDDEN, FFN]));
    }
    t.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    t
}

/// Writes `config.json`, `model.safetensors` (F16, streamed: the generator
/// never holds the model) and the fixture's byte-level tokenizer, once.
fn write_checkpoint(dir: &Path) -> anyhow::Result<()> {
    let tensors = tensors();
    let data_bytes: usize = tensors.iter().map(|(_, s)| s.iter().product::<usize>() * 2).sum();
    let weights = dir.join("model.safetensors");
    if std::fs::metadata(&weights).is_ok_and(|m| m.len() as usize > data_bytes) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "bench convert: writing a {:.2} GiB checkpoint to {}",
        data_bytes as f64 / (1u64 << 30) as f64,
        dir.display()
    );
    let config = format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": {HIDDEN}, "intermediate_size": {FFN}, "num_hidden_layers": {LAYERS}, "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS}, "head_dim": {HEAD_DIM}, "vocab_size": {VOCAB}, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "tie_word_embeddings": true, "bos_token_id": 256, "eos_token_id": 258, "torch_dtype": "float16"}}"#
    );
    std::fs::write(dir.join("config.json"), config).context("writing config.json")?;
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    llama5_fixtures::tiny::write_hf_dir(tmp.path()).context("writing the fixture tokenizer")?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tmp.path().join(f), dir.join(f)).with_context(|| format!("copying {f}"))?;
    }

    let mut header = String::from("{");
    let mut offset = 0usize;
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let n = shape.iter().product::<usize>() * 2;
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        if i > 0 {
            header.push(',');
        }
        header += &format!(
            r#""{name}":{{"dtype":"F16","shape":[{}],"data_offsets":[{offset},{}]}}"#,
            dims.join(","),
            offset + n
        );
        offset += n;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let partial = PathBuf::from(format!("{}.partial", weights.display()));
    let file = std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for (name, shape) in &tensors {
        let mut left = shape.iter().product::<usize>() * 2;
        let norm = shape.len() == 1;
        while left > 0 {
            let n = left.min(chunk.len());
            for pair in chunk[..n].chunks_exact_mut(2) {
                // xorshift64: values in ±[2^-8, 2^-7) for matrices, 1.0 for norms
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let bits: u16 = if norm { 0x3c00 } else { 0x1c00 | (state as u16 & 0x83ff) };
                pair.copy_from_slice(&bits.to_le_bytes());
            }
            w.write_all(&chunk[..n]).with_context(|| format!("writing {name}"))?;
            left -= n;
        }
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&partial, &weights).with_context(|| format!("renaming into {}", weights.display()))?;
    Ok(())
}
