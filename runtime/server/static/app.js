// The voice page: microphone -> /v1/realtime (16 kHz PCM16 frames), events -> transcript,
// reply text, timings; reply audio (response.audio.delta, base64 PCM16) -> speakers.
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
let turn = null; // the DOM elements of the current turn
const turnsById = {};

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

function newTurn(itemId) {
  const el = document.createElement("div");
  el.className = "turn";
  el.innerHTML = '<div class="user partial"></div><div class="assistant"></div><div class="timings"></div>';
  $("turns").appendChild(el);
  turn = { el, user: el.querySelector(".user"), assistant: el.querySelector(".assistant"),
           timings: el.querySelector(".timings") };
  if (itemId) turnsById[itemId] = turn;
  return turn;
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
      t.user.textContent = ev.transcript;
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
      turn.assistant.textContent = "";
      turn.responseId = ev.response.id;
      break;
    case "response.text.delta":
      if (turn && turn.responseId === ev.response_id) turn.assistant.textContent += ev.delta;
      break;
    case "response.audio.delta":
      playPcm16(ev.delta);
      break;
    case "response.done": {
      const t = Object.values(turnsById).find((x) => x.responseId === ev.response.id) || turn;
      if (t) {
        t.assistant.classList.add(ev.response.status);
        t.assistant.dataset.status = ev.response.status;
      }
      break;
    }
    case "turn.timings": {
      const t = Object.values(turnsById).find((x) => x.responseId === ev.response_id) || turn;
      if (t) {
        t.timings.textContent =
          `end of speech -> endpoint ${fmt(ev.endpoint_delay_ms)} · endpoint -> transcript ` +
          `${fmt(ev.final_transcript_ms)}, first token ${fmt(ev.first_token_ms)}, first audio ` +
          `${fmt(ev.response_latency_ms)} · end of speech -> first audio ${fmt(ev.turn_latency_ms)}` +
          (ev.drafted ? " (drafted)" : "");
        t.timings.dataset.responseLatencyMs = ev.response_latency_ms;
      }
      break;
    }
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
  $("textReply").textContent = "";
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch("/v1/chat/completions", {
    method: "POST", headers,
    body: JSON.stringify({ messages: [{ role: "user", content: text }], stream: true }),
  });
  if (!r.ok) { $("textReply").textContent = `error ${r.status}: ${await r.text()}`; return; }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut).replace(/^data: /, "");
      buf = buf.slice(cut + 2);
      if (line === "[DONE]") return;
      const chunk = JSON.parse(line);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (delta) $("textReply").textContent += delta;
    }
  }
}

$("start").onclick = start;
$("stop").onclick = stop;
$("textForm").onsubmit = sendText;
if (params.get("autostart") === "1") start();
