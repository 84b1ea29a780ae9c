// The voice page: microphone -> /v1/realtime (16 kHz PCM16 frames), events -> a conversation
// (live and final transcript, the reply as it streams, its actions as chips, a latency bar per
// turn and the page's p50/p95); reply audio (response.audio.delta, base64 PCM16) -> speakers.
"use strict";
const params = new URLSearchParams(location.search);
// The token comes in the address's fragment (/#token=...), which the browser never sends to
// the server (a query string lands in access logs); the page sends it as a header (HTTP) or
// the WebSocket subprotocol moe2edge.bearer.<token>, never in a URL.
const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get("token") || params.get("token") || "";
if (params.has("token")) {  // an old-style link: keep the token out of the history from now on
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
}
// Chromium's noise suppression and auto gain control cost pocketsphinx most of its accuracy
// (4/4 commands right without them, 1/4 with them, in tests/test_browser.py's setup), so they
// are off unless ?processing=1; echo cancellation stays on so the device does not hear itself.
const processing = params.get("processing") === "1";
const $ = (id) => document.getElementById(id);
let ws = null, ctx = null, mic = null, node = null, sink = null;
let playHead = 0, playing = [];
let turn = null; // the current turn: its DOM elements and state
const turnsById = {};
const latencies = []; // voice-to-voice (end of speech -> first sound) of this page's turns, ms
const STAGES = [ // [name, short label, what it measures]
  ["endpoint", "endpoint", "end of speech → endpoint"],
  ["first_token", "first token", "endpoint → first token"],
  ["first_sound", "first sound", "first token → first sound"],
];

function setStatus(text, cls) {
  $("status").textContent = text;
  $("status").className = cls || "";
}

function showError(message) {
  const div = document.createElement("div");
  div.className = "error";
  div.textContent = message;
  $("errors").appendChild(div);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function newTurn(itemId) {
  const box = el("div", "turn");
  const you = el("div", "row you"), dev = el("div", "row dev");
  const user = el("div", "bubble user partial");
  const device = el("div", "bubble device");
  const actions = el("div", "actions"), assistant = el("div", "assistant");
  you.appendChild(user);
  device.append(actions, assistant);
  dev.appendChild(device);
  const latency = el("div", "latency");
  box.append(you, dev, latency);
  $("turns").appendChild(box);
  box.scrollIntoView({ block: "end" });
  turn = { el: box, user, device, actions, assistant, latency, text: "", calls: [] };
  if (itemId) turnsById[itemId] = turn;
  return turn;
}

function turnOf(ev) {
  if (ev.item_id && turnsById[ev.item_id]) return turnsById[ev.item_id];
  const id = ev.response_id || (ev.response && ev.response.id);
  return Object.values(turnsById).find((t) => t.responseId === id) || turn;
}

// The demo model's replies start with bracketed actions: "[lights.dim room=dining_room
// value=30] Dimming the dining room." (runtime/server/tools.py, the bracket format).
const CALL = /^\s*\[([A-Za-z_][\w.-]*)((?:\s+[\w.-]+=[^\s\][]*)*)\s*\]/;

function parseActions(text) {
  const calls = [];
  let rest = text, m;
  while ((m = CALL.exec(rest))) {
    const args = m[2].trim() ? m[2].trim().split(/\s+/).map((kv) => kv.split("=", 2)) : [];
    calls.push({ name: m[1], args });
    rest = rest.slice(m[0].length);
  }
  return { calls, rest: rest.replace(/^\s+/, "") };
}

function renderActions(t) {
  // the server's function-call events (a session with tools) win over the client's parse
  const calls = t.serverCalls && t.serverCalls.length ? t.serverCalls : t.calls;
  t.actions.replaceChildren(...calls.map((c) => {
    const chip = el("span", "action" + (c.validated ? " validated" : ""));
    chip.dataset.name = c.name;
    chip.title = c.validated ? "action validated by the server" : "action in the reply";
    chip.appendChild(el("span", "name", c.name));
    for (const [k, v] of c.args) chip.appendChild(el("span", "arg", `${k}=${v}`));
    return chip;
  }));
}

function setReplyText(t, text) {
  t.text = text;
  t.assistant.dataset.raw = text;
  const { calls, rest } = parseActions(text);
  t.calls = calls;
  t.assistant.textContent = rest;
  renderActions(t);
}

function stopPlayback() {
  for (const src of playing) { try { src.stop(); } catch (e) { /* already ended */ } }
  playing = [];
  playHead = 0;
}

function playPcm16(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  if (!pcm.length) return;
  const buffer = ctx.createBuffer(1, pcm.length, 16000);
  const out = buffer.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  const src = ctx.createBufferSource();
  src.buffer = buffer;
  src.connect(ctx.destination);
  const at = Math.max(ctx.currentTime + 0.03, playHead);
  src.start(at);
  playHead = at + buffer.duration;
  playing.push(src);
  src.onended = () => { playing = playing.filter((s) => s !== src); };
}

function fmt(ms) { return ms === null || ms === undefined ? "-" : `${Math.round(ms)} ms`; }

function percentile(values, p) { // nearest rank
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.max(0, Math.ceil((p / 100) * sorted.length) - 1)];
}

function stagesOf(ev) {
  // turn.timings (runtime/voice/reply.py): endpoint_delay_ms = endpoint - end of speech;
  // first_token_ms and response_latency_ms count from the endpoint (first_token_ms < 0:
  // drafted during the silence, so that stage took no time after the endpoint)
  if (ev.response_latency_ms === null || ev.response_latency_ms === undefined) return null;
  const token = Math.max(0, ev.first_token_ms || 0);
  return {
    endpoint: Math.max(0, ev.endpoint_delay_ms || 0),
    first_token: Math.min(token, ev.response_latency_ms),
    first_sound: Math.max(0, ev.response_latency_ms - token),
  };
}

function renderLatency(t) {
  const total = t.timings.turn_latency_ms;
  const scale = Math.max(500, ...Object.values(turnsById).map((x) => (x.timings && x.timings.turn_latency_ms) || 0));
  const track = el("div", "track"), legend = el("div", "stages");
  for (const [stage, short, label] of STAGES) {
    const ms = t.stages[stage];
    const seg = el("div", "seg");
    seg.dataset.stage = stage;
    seg.dataset.ms = ms;
    seg.style.width = `${(100 * ms) / scale}%`;
    seg.title = `${label}: ${fmt(ms)}`;
    track.appendChild(seg);
    const item = el("span", "stage");
    item.dataset.stage = stage;
    const dot = el("i");
    dot.style.background = `var(--s-${stage})`;
    item.title = label;
    item.append(dot, `${short} ${fmt(ms)}`);
    legend.appendChild(item);
  }
  const sum = el("span", "total", `voice-to-voice ${fmt(total)}` + (t.timings.drafted ? " (drafted)" : ""));
  sum.title = `endpoint → final transcript ${fmt(t.timings.final_transcript_ms)}`;
  legend.appendChild(sum);
  t.latency.dataset.turnLatencyMs = total;
  t.latency.replaceChildren(track, legend);
}

function onTimings(ev) {
  const t = turnOf(ev);
  if (!t) return;
  t.timings = ev;
  t.stages = stagesOf(ev);
  if (t.stages && ev.turn_latency_ms !== null && ev.turn_latency_ms !== undefined) {
    latencies.push(ev.turn_latency_ms);
    for (const x of Object.values(turnsById)) if (x.stages) renderLatency(x); // one scale
  }
  const n = latencies.length;
  if (n) {
    $("p50").textContent = fmt(percentile(latencies, 50));
    $("p95").textContent = fmt(percentile(latencies, 95));
    $("nTurns").textContent = `over ${n} turn${n === 1 ? "" : "s"} on this page`;
  }
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
      setStatus("listening", "live");
      break;
    case "input_audio_buffer.speech_started":
      stopPlayback(); // barge-in: stop what is still queued locally too
      newTurn(ev.item_id).user.textContent = "…";
      break;
    case "conversation.item.input_audio_transcription.delta": {
      const t = turnsById[ev.item_id] || turn || newTurn(ev.item_id);
      t.user.textContent = ev.transcript || "…";
      break;
    }
    case "conversation.item.input_audio_transcription.completed": {
      const t = turnsById[ev.item_id] || turn || newTurn(ev.item_id);
      t.user.classList.remove("partial");
      t.user.classList.add("final");
      t.user.textContent = ev.transcript || "(not understood)";
      break;
    }
    case "response.created":
      if (!turn) newTurn(null);
      turn.responseId = ev.response.id;
      turn.assistant.classList.add("streaming");
      setReplyText(turn, "");
      break;
    case "response.text.delta": {
      const t = turnOf(ev);
      if (t && t.responseId === ev.response_id) setReplyText(t, t.text + ev.delta);
      break;
    }
    case "response.output_item.done": // a validated action (a session with tools)
      if (ev.item && ev.item.type === "function_call") {
        const t = turnOf(ev);
        if (!t) break;
        let args = [];
        try { args = Object.entries(JSON.parse(ev.item.arguments || "{}")); } catch (e) { /* shown bare */ }
        t.serverCalls = (t.serverCalls || []).concat([{ name: ev.item.name, args, validated: true }]);
        renderActions(t);
      }
      break;
    case "response.audio.delta":
      playPcm16(ev.delta);
      break;
    case "response.done": {
      const t = turnOf(ev);
      if (t) {
        t.assistant.classList.remove("streaming");
        t.assistant.classList.add(ev.response.status);
        t.assistant.dataset.status = ev.response.status;
      }
      break;
    }
    case "turn.timings":
      onTimings(ev);
      break;
    case "error":
      showError(`${ev.error.code || ev.error.type}: ${ev.error.message}`);
      break;
  }
}

async function start() {
  $("start").disabled = true;
  try {
    ctx = new AudioContext({ sampleRate: 16000 });
    await ctx.resume();
    await ctx.audioWorklet.addModule("/static/mic-worklet.js");
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: processing,
               autoGainControl: processing },
    });
    const source = ctx.createMediaStreamSource(mic);
    node = new AudioWorkletNode(ctx, "pcm16-frames");
    sink = ctx.createGain();
    sink.gain.value = 0;
    source.connect(node).connect(sink).connect(ctx.destination);
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const protocols = token ? ["moe2edge", `moe2edge.bearer.${token}`] : [];
    ws = new WebSocket(`${scheme}${location.host}/v1/realtime`, protocols);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (e) => { if (typeof e.data === "string") onEvent(JSON.parse(e.data)); };
    ws.onclose = (e) => { setStatus(`closed (${e.code}${e.reason ? ": " + e.reason : ""})`, e.code === 1000 ? "" : "error"); stop(); };
    ws.onerror = () => setStatus("connection error", "error");
    node.port.onmessage = (e) => {
      $("meter").firstElementChild.style.width = `${Math.min(100, 300 * e.data.peak)}%`;
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(e.data.pcm);
    };
    setStatus("connecting…");
    $("stop").disabled = false;
  } catch (err) {
    setStatus(`could not start: ${err.message || err}`, "error");
    $("start").disabled = false;
  }
}

function stop() {
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
  ws = null;
  if (mic) mic.getTracks().forEach((t) => t.stop());
  mic = null;
  stopPlayback();
  $("start").disabled = false;
  $("stop").disabled = true;
}

async function sendText(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  $("text").value = "";
  const t = newTurn(null);
  t.user.classList.remove("partial");
  t.user.textContent = text;
  t.assistant.classList.add("streaming");
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers,
      body: JSON.stringify({ messages: [{ role: "user", content: text }], stream: true }),
    });
    if (!r.ok) { showError(`error ${r.status}: ${await r.text()}`); return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).replace(/^data: /, "");
        buf = buf.slice(cut + 2);
        if (line === "[DONE]") return;
        const chunk = JSON.parse(line);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (delta) setReplyText(t, t.text + delta);
      }
    }
  } finally {
    t.assistant.classList.remove("streaming");
  }
}

$("start").onclick = start;
$("stop").onclick = stop;
$("textForm").onsubmit = sendText;
if (params.get("autostart") === "1") start();
