//! The browser side: `cargo xtask web` (build the page, optionally serve it)
//! and what `cargo xtask test` needs for its browser steps (the tools, the
//! fixture the wasm tests embed, the page end to end).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::util;

pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// The browsers the tests run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Browser {
    Chromium,
    Firefox,
}

impl Browser {
    pub fn name(self) -> &'static str {
        match self {
            Browser::Chromium => "chromium",
            Browser::Firefox => "firefox",
        }
    }

    /// The WebDriver binary and the variable `wasm-bindgen-test-runner` reads it from.
    fn driver(self) -> (&'static str, &'static str) {
        match self {
            Browser::Chromium => ("chromedriver", "CHROMEDRIVER"),
            Browser::Firefox => ("geckodriver", "GECKODRIVER"),
        }
    }

    /// Debian packages of the browser (and, for Chromium, its driver).
    fn packages(self) -> &'static [&'static str] {
        match self {
            Browser::Chromium => &["chromium", "chromium-driver"],
            // Firefox's WebGPU runs on Vulkan: llvmpipe without a GPU
            Browser::Firefox => &["firefox-esr", "mesa-vulkan-drivers"],
        }
    }
}

/// `program` on PATH or in cargo's bin directory.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    } else if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(program)).find(|p| p.is_file())
}

fn is_root() -> bool {
    util::output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// The wasm-bindgen version Cargo.lock pins (its CLI must match it exactly).
pub fn locked_wasm_bindgen() -> anyhow::Result<String> {
    let lock = util::workspace_root().join("Cargo.lock");
    let text = std::fs::read_to_string(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l == "name = \"wasm-bindgen\"" {
            if let Some(v) = lines.next().and_then(|v| v.strip_prefix("version = \"")) {
                return Ok(v.trim_end_matches('"').to_string());
            }
        }
    }
    bail!("{} has no wasm-bindgen package", lock.display())
}

/// The `wasm-bindgen` CLI at the locked version, installed with cargo when
/// missing or different (`--locked` first; without it when the registry lacks
/// a locked dependency).
pub fn ensure_wasm_bindgen() -> anyhow::Result<PathBuf> {
    let version = locked_wasm_bindgen()?;
    let installed = || {
        let path = find_program("wasm-bindgen")?;
        let out = util::output(Command::new(&path).arg("--version")).ok()?;
        (out.split_whitespace().nth(1) == Some(version.as_str())).then_some(path)
    };
    if let Some(path) = installed() {
        return Ok(path);
    }
    eprintln!("wasm-bindgen {version} not found, installing wasm-bindgen-cli with cargo");
    let spec = format!("={version}");
    let locked = util::run(Command::new("cargo").args(["install", "wasm-bindgen-cli", "--version", &spec, "--locked"]));
    if locked.is_err() {
        util::run(Command::new("cargo").args(["install", "wasm-bindgen-cli", "--version", &spec]))
            .with_context(|| format!("installing wasm-bindgen-cli {version}"))?;
    }
    installed().with_context(|| format!("wasm-bindgen {version} still not found after installing it"))
}

/// The browser and its WebDriver, installed (apt, and cargo for geckodriver)
/// when missing. Returns the driver's path, or why it cannot be had.
pub fn ensure_browser(browser: Browser) -> anyhow::Result<PathBuf> {
    let (driver, _) = browser.driver();
    let browser_bin = match browser {
        Browser::Chromium => "chromium",
        Browser::Firefox => "firefox-esr",
    };
    if find_program(browser_bin).is_none() || (browser == Browser::Chromium && find_program(driver).is_none()) {
        let install = format!("apt-get install -y {}", browser.packages().join(" "));
        if !is_root() {
            bail!("{browser_bin} is not installed and installing it needs root: `apt-get update && {install}`");
        }
        eprintln!("{}: installing {}", browser.name(), browser.packages().join(" "));
        util::run(Command::new("apt-get").arg("update")).context("apt-get update")?;
        util::run(
            Command::new("apt-get")
                .args(["install", "-y"])
                .args(browser.packages())
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("`{install}`"))?;
    }
    if browser == Browser::Firefox && find_program(driver).is_none() {
        util::run(Command::new("cargo").args(["install", "geckodriver", "--locked"]))
            .context("installing geckodriver")?;
    }
    find_program(driver).with_context(|| format!("{driver} not found after installing it"))
}

/// The directory the browser tests embed: the tiny fixture converted at INT4,
/// and `expected.json`, the native CPU backend's greedy tokens for it.
pub fn prepare_fixture() -> anyhow::Result<PathBuf> {
    use llama5_runtime::generate::{GenerateOptions, Generator};
    let root = util::workspace_root().join("target/web-fixture");
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let hf = root.join("hf");
    std::fs::create_dir_all(&hf).with_context(|| format!("creating {}", hf.display()))?;
    llama5_fixtures::tiny::write_hf_dir(&hf)?;
    let dir = root.join("int4");
    let opts = llama5_convert::ConvertOptions::with_precision(llama5_codegen::manifest::Precision::Int4);
    llama5_convert::convert(&hf, &dir, &opts).context("converting the tiny fixture")?;

    let (ctx, max_tokens) = (64, 24);
    let model = llama5_runtime::Model::open(&dir, true)?;
    let tokenizer = llama5_runtime::tokenizer::Tokenizer::for_model(&model)?;
    let prompt = llama5_fixtures::tiny::golden_input_ids();
    let mut cpu = llama5_runtime::CpuBackend::new(&model, ctx)?;
    let gen_opts = GenerateOptions {
        max_tokens,
        sampling: llama5_runtime::sampling::SamplingParams::greedy(),
        sliding_window: false,
    };
    let g = Generator::new(&mut cpu, &tokenizer).generate(&prompt, &gen_opts, &mut |_| Ok(()))?;
    let expected = serde_json::json!({ "ctx": ctx, "max_tokens": max_tokens, "prompt": prompt, "tokens": g.tokens });
    let path = dir.join("expected.json");
    std::fs::write(&path, serde_json::to_string_pretty(&expected)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(dir)
}

/// `cargo test` of the browser tests in `browser`, ready to run.
pub fn browser_test_command(browser: Browser, driver: &Path, runner: &Path, fixture: &Path) -> Command {
    let mut cmd = util::cargo();
    cmd.args(["test", "-p", "llama5-web", "--target", WASM_TARGET, "--test", "browser", "--", "--nocapture"])
        // the runner reads webdriver.json (browser flags and prefs) from here
        .current_dir(util::workspace_root().join("web"))
        .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER", runner)
        .env(browser.driver().1, driver)
        .env("LLAMA5_WEB_FIXTURE", fixture)
        .env("WASM_BINDGEN_TEST_TIMEOUT", "600");
    cmd
}

// ----------------------------------------------------------------------------
// The page

/// `cargo xtask web` usage.
pub const USAGE: &str = "\
usage: cargo xtask web [--model <converted_dir>] [--serve [--port N]]
  builds the page into target/web (index.html, app.js, pkg/ from wasm-bindgen);
  --model links a converted model directory as target/web/model/, the URL the page loads by default;
  --serve serves target/web on http://127.0.0.1:<port>/ (default 8080) until interrupted";

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let (mut model, mut serve, mut port) = (None::<PathBuf>, false, 8080u16);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => model = Some(it.next().context("--model needs a converted model directory")?.into()),
            "--serve" => serve = true,
            "--port" => {
                let p = it.next().context("--port needs a number")?;
                port = p.parse().with_context(|| format!("--port {p}: not a port number"))?;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unexpected web argument `{other}`\n{USAGE}"),
        }
    }
    let out = util::workspace_root().join("target/web");
    let report = build_page(&out, model.as_deref())?;
    println!("{report}");
    if serve {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
        println!("serving {} on http://127.0.0.1:{port}/ (Ctrl-C stops)", out.display());
        serve_forever(listener, out);
    }
    Ok(())
}

/// Builds the wasm library, runs wasm-bindgen and copies the static files into
/// `out`; links `model` as `out/model`. Returns a line with the wasm's size.
pub fn build_page(out: &Path, model: Option<&Path>) -> anyhow::Result<String> {
    let bindgen = ensure_wasm_bindgen()?;
    // the dev profile optimises every dependency and shares them with the browser tests' build
    util::run(util::cargo().args(["build", "-p", "llama5-web", "--lib", "--target", WASM_TARGET]))?;
    let wasm = util::workspace_root().join("target").join(WASM_TARGET).join("debug/llama5_web.wasm");
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    let pkg = out.join("pkg");
    util::run(Command::new(&bindgen).args(["--target", "web", "--no-typescript", "--out-dir"]).arg(&pkg).arg(&wasm))?;
    let assets = util::workspace_root().join("web/static");
    for entry in std::fs::read_dir(&assets).with_context(|| format!("reading {}", assets.display()))? {
        let path = entry?.path();
        let to = out.join(path.file_name().context("a file name")?);
        std::fs::copy(&path, &to).with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
    }
    if let Some(model) = model {
        let model = model.canonicalize().with_context(|| format!("model directory {}", model.display()))?;
        if !model.join("manifest.json").is_file() {
            bail!("{} has no manifest.json: pass a converted model directory", model.display());
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(&model, out.join("model")).context("linking the model directory")?;
        #[cfg(not(unix))]
        bail!("--model links the model directory, which needs a unix system");
    }
    let bg = pkg.join("llama5_web_bg.wasm");
    let raw = std::fs::metadata(&bg).with_context(|| format!("{}", bg.display()))?.len();
    let gz = util::output(Command::new("sh").arg("-c").arg(format!("gzip -9 -c '{}' | wc -c", bg.display())))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(format!(
        "built {}: llama5_web_bg.wasm {:.2} MiB raw, {}",
        out.display(),
        mib(raw),
        gz.map_or("gzip size unknown (no gzip)".to_string(), |g| format!("{:.2} MiB gzip -9", mib(g)))
    ))
}

/// A static file server for 127.0.0.1: GET and HEAD, no directory listings,
/// nothing outside `root` (symlinks inside it, like `model/`, are followed).
pub fn serve_forever(listener: std::net::TcpListener, root: PathBuf) {
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        std::thread::spawn(move || {
            let _ = serve_one(stream, &root);
        });
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("wgsl") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn serve_one(mut stream: std::net::TcpStream, root: &Path) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // the headers are not needed; read them off the connection
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let rel: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let file = if rel.iter().any(|s| *s == ".." || s.contains('\\')) {
        None
    } else {
        let mut p = root.to_path_buf();
        p.extend(&rel);
        if p.is_dir() {
            p.push("index.html");
        }
        p.is_file().then_some(p)
    };
    let respond = |stream: &mut std::net::TcpStream, status: &str, kind: &str, len: u64| {
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        )
    };
    match (method, file) {
        ("GET" | "HEAD", Some(p)) => {
            let mut f = std::fs::File::open(&p)?;
            respond(&mut stream, "200 OK", content_type(&p), f.metadata()?.len())?;
            if method == "GET" {
                std::io::copy(&mut f, &mut stream)?;
            }
        }
        ("GET" | "HEAD", None) => {
            let body = b"not found\n";
            respond(&mut stream, "404 Not Found", "text/plain", body.len() as u64)?;
            stream.write_all(body)?;
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", 0)?,
    }
    stream.flush()
}

// ----------------------------------------------------------------------------
// The page end to end, driven through WebDriver

/// What the end-to-end test types.
pub const E2E_PROMPT: &str = "What is the capital of France?";
/// Generated tokens compared with the native CPU backend's.
pub const E2E_TOKENS: usize = 8;

/// One HTTP/1.1 request to a local server; returns the status and body.
fn http(port: u16, method: &str, path: &str, body: Option<&serde_json::Value>) -> anyhow::Result<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connecting to :{port}"))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // read by Content-Length: chromedriver keeps the connection open
    s.set_read_timeout(Some(std::time::Duration::from_secs(600)))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let (head, split) = loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("the server on :{port} closed the connection before its headers");
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&raw[..i]).to_ascii_lowercase(), i + 4);
        }
    };
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("an HTTP status")?;
    let length =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &raw[split..];
        let complete = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let mut body = raw[split..].to_vec();
    if let Some(n) = length {
        body.truncate(n);
    } else if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").context("a chunk size line")?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).context("a chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let data = b.get(eol + 2..eol + 2 + size).context("a truncated chunk")?;
        out.extend_from_slice(data);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
}

/// A WebDriver session (chromedriver or geckodriver).
struct Driver {
    port: u16,
    session: String,
}

impl Driver {
    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> anyhow::Result<serde_json::Value> {
        let full = format!("/session/{}{path}", self.session);
        let (status, bytes) = http(self.port, method, &full, body.as_ref())?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: not JSON"))?;
        if status != 200 {
            bail!("webdriver {method} {path}: HTTP {status}: {}", v["value"]["message"]);
        }
        Ok(v["value"].clone())
    }

    fn script(&self, js: &str) -> anyhow::Result<serde_json::Value> {
        self.call("POST", "/execute/sync", Some(serde_json::json!({ "script": js, "args": [] })))
    }

    fn element(&self, css: &str) -> anyhow::Result<String> {
        let v = self.call("POST", "/element", Some(serde_json::json!({ "using": "css selector", "value": css })))?;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
            .map(str::to_string)
            .with_context(|| format!("no element {css}"))
    }

    /// Polls `document.body.dataset.state` until it is one of `states` (or `error`).
    fn wait_state(&self, states: &[&str], timeout: std::time::Duration) -> anyhow::Result<String> {
        let start = std::time::Instant::now();
        loop {
            let state = self.script("return document.body.dataset.state")?.as_str().unwrap_or("").to_string();
            if states.contains(&state.as_str()) {
                return Ok(state);
            }
            if state == "error" || state == "no-webgpu" {
                let msg = self.script("return document.getElementById('error').textContent")?;
                bail!("the page is in state `{state}`: {}", msg.as_str().unwrap_or(""));
            }
            if start.elapsed() > timeout {
                bail!("the page stayed in state `{state}` for {:?}", timeout);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}

fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c).context("not base64")? << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    Ok(out)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// The native CPU backend's first greedy tokens for the chat prompt the page sends.
fn native_tokens(model_dir: &Path, prompt: &str, n: usize) -> anyhow::Result<Vec<u32>> {
    use llama5_runtime::chat::ChatTemplate;
    use llama5_runtime::generate::{Chat, GenerateOptions, Generator};
    let model = llama5_runtime::Model::open(model_dir, false)?;
    let tokenizer = llama5_runtime::tokenizer::Tokenizer::for_model(&model)?;
    let template = ChatTemplate::for_tokenizer(&tokenizer)?.context("the model has no chat template")?;
    let ids = Chat::new(template).prompt(&tokenizer, prompt)?;
    let mut cpu = llama5_runtime::CpuBackend::new(&model, 1024)?;
    let opts = GenerateOptions {
        max_tokens: n,
        sampling: llama5_runtime::sampling::SamplingParams::greedy(),
        sliding_window: false,
    };
    Ok(Generator::new(&mut cpu, &tokenizer).generate(&ids, &opts, &mut |_| Ok(()))?.tokens)
}

/// Serves the page with the real model at INT4 on 127.0.0.1, loads it in
/// `browser` (headless, through its WebDriver), types [`E2E_PROMPT`] and
/// checks the first [`E2E_TOKENS`] tokens against the native CPU backend;
/// saves a screenshot to `target/web-e2e/<browser>.png`, then reloads the
/// page and checks the shard comes from Cache Storage. Returns a one-line report.
pub fn e2e(gguf: &Path, browser: Browser, driver: &Path) -> anyhow::Result<String> {
    let work = util::workspace_root().join("target/web-e2e").join(browser.name());
    let model_dir = work.join("int4");
    if model_dir.exists() {
        std::fs::remove_dir_all(&model_dir).with_context(|| format!("removing {}", model_dir.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let opts = llama5_convert::ConvertOptions::with_precision(llama5_codegen::manifest::Precision::Int4);
    llama5_convert::convert(gguf, &model_dir, &opts).with_context(|| format!("converting {}", gguf.display()))?;
    let want = native_tokens(&model_dir, E2E_PROMPT, E2E_TOKENS)?;

    let site = work.join("site");
    let built = build_page(&site, Some(&model_dir))?;
    eprintln!("{built}");
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1")?;
    let site_port = listener.local_addr()?.port();
    std::thread::spawn(move || serve_forever(listener, site));

    let driver_port = free_port()?;
    let mut child = Command::new(driver)
        .arg(format!("--port={driver_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", driver.display()))?;
    let result = drive(browser, driver_port, site_port, &want, &work);
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The same flags and prefs as `web/webdriver.json`, plus a window size for the screenshot.
fn capabilities(browser: Browser) -> serde_json::Value {
    match browser {
        Browser::Chromium => serde_json::json!({ "capabilities": { "alwaysMatch": { "goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--disable-dev-shm-usage",
                     "--window-size=900,1000"]
        }}}}),
        Browser::Firefox => serde_json::json!({ "capabilities": { "alwaysMatch": { "moz:firefoxOptions": {
            "args": ["-headless", "--width=900", "--height=1000"],
            "prefs": { "dom.webgpu.enabled": true, "gfx.webgpu.ignore-blocklist": true }
        }}}}),
    }
}

fn drive(browser: Browser, driver_port: u16, site_port: u16, want: &[u32], work: &Path) -> anyhow::Result<String> {
    let start = std::time::Instant::now();
    while http(driver_port, "GET", "/status", None).is_err() {
        if start.elapsed().as_secs() > 30 {
            bail!("the WebDriver did not answer on port {driver_port}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (status, body) = http(driver_port, "POST", "/session", Some(&capabilities(browser)))?;
    let v: serde_json::Value = serde_json::from_slice(&body).context("the WebDriver's new session")?;
    let session = v["value"]["sessionId"].as_str().with_context(|| format!("no session (HTTP {status}): {v}"))?;
    let d = Driver { port: driver_port, session: session.to_string() };
    let outcome = (|| -> anyhow::Result<String> {
        let url = format!("http://127.0.0.1:{site_port}/?model=model/");
        d.call("POST", "/url", Some(serde_json::json!({ "url": url })))?;
        d.wait_state(&["ready"], std::time::Duration::from_secs(300))?;
        let adapter = d.script("return document.getElementById('adapter').innerText")?;
        let max = d.element("#max-tokens")?;
        d.call("POST", &format!("/element/{max}/clear"), Some(serde_json::json!({})))?;
        d.call("POST", &format!("/element/{max}/value"), Some(serde_json::json!({ "text": "16" })))?;
        let prompt = d.element("#prompt")?;
        d.call("POST", &format!("/element/{prompt}/value"), Some(serde_json::json!({ "text": E2E_PROMPT })))?;
        let send = d.element("#send")?;
        d.call("POST", &format!("/element/{send}/click"), Some(serde_json::json!({})))?;
        d.wait_state(&["done"], std::time::Duration::from_secs(600))?;
        let tokens = d.script("return document.querySelector('#messages .assistant:last-child').dataset.tokens")?;
        let got: Vec<u32> = tokens.as_str().unwrap_or("").split_whitespace().filter_map(|t| t.parse().ok()).collect();
        let stats = d.script("return document.getElementById('stats').textContent")?;
        let shot = d.call("GET", "/screenshot", None)?;
        let png = base64_decode(shot.as_str().context("a base64 screenshot")?)?;
        let path = work.join(format!("{}.png", browser.name()));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        let adapter = adapter.as_str().unwrap_or("").lines().take(2).collect::<Vec<_>>().join(" ");
        if got.len() < want.len() || got[..want.len()] != *want {
            bail!("the page generated {got:?}; the native CPU backend's first tokens are {want:?}");
        }
        // a second visit reads the shards from Cache Storage
        d.call("POST", "/url", Some(serde_json::json!({ "url": url })))?;
        d.wait_state(&["ready"], std::time::Duration::from_secs(300))?;
        let progress = d.script("return document.getElementById('progress-text').textContent")?;
        let progress = progress.as_str().unwrap_or("");
        if !progress.contains("from Cache Storage") || !progress.contains("nothing downloaded") {
            bail!("the second visit downloaded again: {progress}");
        }
        Ok(format!(
            "first {} tokens equal the native CPU backend's; {}; second visit from Cache Storage; adapter: {adapter}; screenshot {}",
            want.len(),
            stats.as_str().unwrap_or(""),
            path.display()
        ))
    })();
    let _ = http(driver_port, "DELETE", &format!("/session/{}", d.session), None);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_padded_and_unpadded() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert!(base64_decode("a$==").is_err());
    }

    #[test]
    fn dechunk_joins_chunks() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(), b"abcde");
    }

    #[test]
    fn the_server_serves_files_and_refuses_to_leave_its_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.html"), "<p>hi</p>").unwrap();
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || serve_forever(listener, root));
        assert_eq!(http(port, "GET", "/", None).unwrap(), (200, b"<p>hi</p>".to_vec()));
        assert_eq!(http(port, "GET", "/index.html?x=1", None).unwrap().0, 200);
        assert_eq!(http(port, "GET", "/../Cargo.toml", None).unwrap().0, 404);
        assert_eq!(http(port, "GET", "/missing.js", None).unwrap().0, 404);
    }

    #[test]
    fn the_locked_wasm_bindgen_is_found() {
        let v = locked_wasm_bindgen().unwrap();
        assert!(v.starts_with("0.2."), "{v}");
    }
}
