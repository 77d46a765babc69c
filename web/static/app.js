// The page: probe the adapter, load a model directory by URL, chat.
// State for scripts and tests: body[data-state] is starting, no-webgpu,
// loading, ready, generating, done or error; the last answer's token ids are
// in #messages .assistant:last-child[data-tokens].
import init, { probe, Session } from "./pkg/llama5_web.js";

const $ = (id) => document.getElementById(id);
const setState = (s) => { document.body.dataset.state = s; };
const mib = (b) => (b / (1 << 20)).toFixed(1);
const NO_TEXT = 4294967295; // text with no token of its own (the decoder's tail)

function fail(e) {
  setState("error");
  $("error").textContent = String(e && e.message ? e.message : e);
}

function showAdapter(a) {
  const rows = [
    ["name", a.name],
    ["backend", a.backend],
    ["shader-f16", a.shader_f16 ? "yes" : "no (f32 kernels, f16 data unpacked)"],
    ["subgroups", a.subgroups ? "yes" : "no (workgroup reductions)"],
    ["kernels", a.kernels],
    ["max storage binding", `${mib(a.max_storage_binding)} MiB`],
  ];
  const dl = $("adapter");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
  $("adapter-box").hidden = false;
}

let session = null;

async function load(url) {
  setState("loading");
  $("chat-box").hidden = true;
  $("error").textContent = "";
  const t0 = performance.now();
  let downloaded = 0;
  session = await Session.load(url, (file, done, total, fromCache) => {
    $("progress").value = total ? done / total : 1;
    $("progress-text").textContent = `${file}: ${mib(done)} / ${mib(total)} MiB ${fromCache ? "(from Cache Storage)" : "(downloading)"}`;
    if (!fromCache) downloaded = done;
  });
  const secs = ((performance.now() - t0) / 1000).toFixed(1);
  $("progress-text").textContent += ` — ready in ${secs} s${downloaded ? "" : ", nothing downloaded"}`;
  $("backend").textContent = session.backend();
  $("chat-box").hidden = false;
  setState("ready");
}

async function send(text) {
  const maxTokens = Number($("max-tokens").value) || 64;
  setState("generating");
  const user = document.createElement("div");
  user.className = "msg user";
  user.textContent = text;
  const answer = document.createElement("div");
  answer.className = "msg assistant";
  $("messages").append(user, answer);
  const ids = [];
  let first = 0;
  const t0 = performance.now();
  const raw = await session.chat(text, maxTokens, (id, piece) => {
    const now = performance.now();
    if (id !== NO_TEXT) {
      ids.push(id);
      if (ids.length === 1) first = now;
      answer.dataset.tokens = ids.join(" ");
    }
    if (piece) answer.textContent += piece;
    const rate = ids.length > 1 ? ((ids.length - 1) * 1000) / (now - first) : 0;
    $("stats").textContent = `${ids.length} tokens, ${rate.toFixed(1)} tokens/s`;
  });
  const r = JSON.parse(raw);
  const decode = r.decode_ms > 0 ? (r.decode_tokens * 1000) / r.decode_ms : 0;
  const prefill = r.prefill_ms > 0 ? (r.prefill_tokens * 1000) / r.prefill_ms : 0;
  $("stats").textContent =
    `${r.tokens.length} tokens in ${((performance.now() - t0) / 1000).toFixed(1)} s: ` +
    `decode ${decode.toFixed(1)} tokens/s, prefill ${r.prefill_tokens} tokens at ${prefill.toFixed(1)} tokens/s (stop: ${r.stop})`;
  document.body.dataset.decodeTokensPerSec = decode.toFixed(2);
  setState("done");
}

async function main() {
  if (!navigator.gpu) {
    $("no-webgpu").hidden = false;
    setState("no-webgpu");
    return;
  }
  await init();
  try {
    showAdapter(JSON.parse(await probe()));
  } catch (e) {
    $("no-webgpu").hidden = false;
    setState("no-webgpu");
    $("error").textContent = String(e && e.message ? e.message : e);
    return;
  }
  $("model-box").hidden = false;
  const param = new URLSearchParams(location.search).get("model");
  if (param) $("model-url").value = param;
  $("load-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    load($("model-url").value).catch(fail);
  });
  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || document.body.dataset.state === "generating") return;
    $("prompt").value = "";
    send(text).catch(fail);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  await load($("model-url").value);
}

main().catch(fail);
