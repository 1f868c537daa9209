// triton-vlm playground: pick a model, give an image, ask, watch the answer stream in; boxes over the image.
// Plain JS, no build step. It talks only to the OpenAI front that served it (/v1/models, /v1/chat/completions);
// the API key, where the server wants one, is asked for on a 401 and kept in sessionStorage (this tab only).
"use strict";

(() => {
  const KEY_STORAGE = "triton-vlm-api-key";
  // Tableau 10, the same colours as triton_vlm.client.entities.draw_entities.
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                   "#9c755f", "#bab0ac"];
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  const state = {
    config: { max_image_bytes: 20 * 1024 * 1024, max_body_bytes: 32 * 1024 * 1024, api_key_required: false },
    models: new Map(),      // id -> capabilities (["stream", "task", "entities"])
    image: null,            // { name, type, size, dataUrl, width, height }
    groups: [],             // what the overlay shows: [{ label, boxes: [{x_min, y_min, x_max, y_max}] in px }]
    controller: null,       // AbortController of the request in flight
    turns: [],              // the conversation: see request()
  };

  // -- errors in plain words ------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code || "";
    }
  }

  const mb = (bytes) => `${(bytes / (1024 * 1024)).toFixed(bytes < 1024 * 1024 ? 2 : 1)} MB`;

  function explain(error) {
    if (!(error instanceof ApiError)) return `Something went wrong in the page: ${error.message || error}`;
    const detail = error.message;
    switch (error.status) {
      case 0: return `Can't reach the server at ${location.origin}. Is it still running?`;
      case 401: return "This server needs an API key. Use the “API key” button at the top to enter it.";
      case 404: return error.code === "model_not_found"
        ? `That model is not served (any more): ${detail} The list of models has been refreshed.`
        : `Not found: ${detail}`;
      case 413: return error.code === "image_too_large"
        ? `The image is too large for this server (it takes images up to ${mb(state.config.max_image_bytes)}).`
        : `The request is too large for this server (up to ${mb(state.config.max_body_bytes)}).`;
      case 429: return "The server is busy (too many requests at once). Try again in a moment.";
      case 500: return `The model failed while answering: ${detail}`;
      case 503: return `The model is not available right now: ${detail}`;
      case 504: return `The model took too long to answer: ${detail}`;
      default:
        if (/image/i.test(detail)) return `The server could not use this image: ${detail}`;
        return `The server refused the request: ${detail}`;
    }
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  // -- the API, with the key --------------------------------------------------------------------------------
  const apiKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    let response;
    try {
      response = await fetch(path, { ...options, headers, cache: "no-store" });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "unreachable", String(error));
    }
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON: a proxy's page */ }
      const err = (body && body.error) || {};
      throw new ApiError(response.status, err.code, err.message || `HTTP ${response.status}`);
    }
    return response;
  }

  // Runs `call`; on a 401 asks for the key and tries again, until it works or the user cancels.
  async function withKey(call) {
    for (;;) {
      try {
        return await call();
      } catch (error) {
        if (!(error instanceof ApiError) || error.status !== 401) throw error;
        const message = apiKey() ? "That key was refused. Check it and try again." : "This server needs an API key.";
        if (!(await askForKey(message))) throw error;
      }
    }
  }

  function askForKey(message) {
    const dialog = $("key-dialog");
    $("key-message").textContent = message;
    $("key-input").value = "";
    return new Promise((resolve) => {
      const done = (saved) => {
        $("key-save").onclick = $("key-cancel").onclick = $("key-input").onkeydown = dialog.oncancel = null;
        dialog.close();
        resolve(saved);
      };
      $("key-save").onclick = () => {
        const key = $("key-input").value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY_STORAGE, key);
        done(true);
      };
      $("key-cancel").onclick = () => done(false);
      dialog.oncancel = (event) => { event.preventDefault(); done(false); };
      $("key-input").onkeydown = (event) => {
        if (event.key === "Enter") { event.preventDefault(); $("key-save").onclick(); }
      };
      dialog.showModal();
      $("key-input").focus();
    });
  }

  // -- server config and models ------------------------------------------------------------------------------
  async function loadConfig() {
    try {
      const response = await fetch("playground/config.json", { cache: "no-store" });
      if (response.ok) state.config = await response.json();
    } catch (_) { /* the models call reports an unreachable server */ }
    $("limit-hint").textContent = `PNG, JPEG, WebP, GIF · up to ${mb(state.config.max_image_bytes)}`;
  }

  async function loadModels() {
    const response = await withKey(() => api("v1/models"));
    const list = (await response.json()).data || [];
    const select = $("model");
    const previous = select.value;
    state.models = new Map(list.map((m) => [m.id, m.capabilities || []]));
    select.replaceChildren(...list.map((m) => new Option(m.id, m.id)));
    if (state.models.has(previous)) select.value = previous;
    modelChanged();
    const key = state.config.api_key_required ? "API key set" : "no API key needed";
    $("server-status").textContent = `${list.length} model${list.length === 1 ? "" : "s"} · ${key}`;
    if (!list.length) showError("The server serves no model that is ready yet. Reload the page in a moment.");
  }

  function modelChanged() {
    const capabilities = state.models.get($("model").value) || [];
    const tasks = capabilities.includes("task");
    $("task").disabled = !tasks;
    if (!tasks) $("task").value = "";
    $("task-hint").textContent = tasks ? "This model has several skills: detect and point draw on the image."
      : capabilities.includes("entities") ? "Grounding: start the prompt with <grounding> to get boxes, e.g. "
        + "“<grounding>An image of”." : "";
    $("prompt").placeholder = capabilities.includes("entities") ? "<grounding>An image of" : "What is in this image?";
    renderCode();
  }

  // -- the image ---------------------------------------------------------------------------------------------
  function takeFile(file) {
    if (!file) return;
    showError("");
    if (file.type && !file.type.startsWith("image/")) {
      showError(`“${file.name}” is not an image (${file.type}). Choose a PNG, JPEG, WebP or GIF file.`);
      return;
    }
    if (file.size > state.config.max_image_bytes) {
      showError(`“${file.name}” is ${mb(file.size)}; this server takes images up to `
        + `${mb(state.config.max_image_bytes)}. Choose a smaller one.`);
      return;
    }
    if (Math.ceil(file.size / 3) * 4 + 4096 > state.config.max_body_bytes) {  // base64 grows it by a third
      showError(`“${file.name}” is too large to send: requests are limited to ${mb(state.config.max_body_bytes)}.`);
      return;
    }
    const reader = new FileReader();
    reader.onerror = () => showError(`Could not read “${file.name}”.`);
    reader.onload = () => {
      const probe = new Image();
      probe.onload = () => {
        state.image = { name: file.name || "pasted-image.png", type: file.type || "application/octet-stream",
                        size: file.size, dataUrl: reader.result, width: probe.naturalWidth,
                        height: probe.naturalHeight };
        $("preview").src = reader.result;
        $("stage").hidden = false;
        $("drop").classList.add("has-image");
        $("image-info").textContent = `${state.image.name} · ${probe.naturalWidth}×${probe.naturalHeight} px · `
          + mb(file.size);
        drawOverlay([]);
        renderCode();
      };
      probe.onerror = () => showError(`“${file.name}” is not an image this browser can read (broken or an `
        + "unsupported format).");
      probe.src = reader.result;
    };
    reader.readAsDataURL(file);
  }

  // -- boxes over the image ------------------------------------------------------------------------------------
  // kosmos2: message.entities (pixel boxes of each phrase). moondream2 detect/point: the answer is JSON in pixels.
  function groupsOf(text, entities, prompt) {
    if (Array.isArray(entities)) {
      return entities.filter((e) => e.boxes_px && e.boxes_px.length)
        .map((e) => ({ label: e.phrase, span: e.span, boxes: e.boxes_px }));
    }
    let answer;
    try { answer = JSON.parse(text); } catch (_) { return []; }
    if (!answer || typeof answer !== "object") return [];
    const boxes = (answer.objects || []).concat((answer.points || []).map(
      (p) => ({ x_min: p.x, y_min: p.y, x_max: p.x, y_max: p.y })));
    return boxes.length ? [{ label: prompt, span: null, boxes }] : [];
  }

  function drawOverlay(groups) {
    state.groups = groups;
    const svg = $("overlay");
    svg.replaceChildren();
    const legend = $("legend");
    legend.replaceChildren();
    $("found").hidden = !groups.length;
    if (!state.image || !groups.length) return;
    const { width, height } = state.image;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "none");
    // Sizes in image pixels that look the same on screen whatever the scale.
    const scale = width / Math.max(1, $("preview").clientWidth || width);
    const font = 13 * scale;
    groups.forEach((group, index) => {
      const colour = PALETTE[index % PALETTE.length];
      const g = node("g", { class: "entity", "data-label": group.label });
      group.boxes.forEach((box, n) => {
        const x0 = clip(Math.min(box.x_min, box.x_max), width), x1 = clip(Math.max(box.x_min, box.x_max), width);
        const y0 = clip(Math.min(box.y_min, box.y_max), height), y1 = clip(Math.max(box.y_min, box.y_max), height);
        const point = x0 === x1 && y0 === y1;
        g.appendChild(point
          ? node("circle", { class: "point", cx: x0, cy: y0, r: 5 * scale, fill: colour, stroke: "#fff",
                             "stroke-width": 1.5 * scale })
          : node("rect", { class: "box", x: x0, y: y0, width: x1 - x0, height: y1 - y0, fill: "none",
                           stroke: colour, "stroke-width": 2.5, "vector-effect": "non-scaling-stroke" }));
        if (n === 0 && group.label) g.appendChild(label(group.label, x0, y0, colour, font, width));
      });
      svg.appendChild(g);
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.setProperty("--c", colour);
      const count = group.boxes.length;
      item.append(swatch, `${group.label || "(no phrase)"} — ${count} ${count === 1 ? "box" : "boxes"}`);
      legend.appendChild(item);
    });
    svg.setAttribute("aria-label", groups.map((g) => `${g.label}: ${g.boxes.length}`).join(", "));
  }

  function label(text, x, y, colour, font, width) {
    const g = node("g", { class: "tag" });
    const w = Math.min(width, (text.length * 0.6 + 0.8) * font), h = font * 1.5;
    const left = Math.max(0, Math.min(x, width - w)), top = y - h >= 0 ? y - h : y;
    g.appendChild(node("rect", { x: left, y: top, width: w, height: h, fill: colour, rx: font * 0.2 }));
    const t = node("text", { class: "label", x: left + font * 0.4, y: top + h * 0.72, fill: "#fff",
                             "font-size": font });
    t.textContent = text;
    g.appendChild(t);
    return g;
  }

  const clip = (value, side) => Math.min(Math.max(Number(value) || 0, 0), side);

  function node(name, attributes) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    return element;
  }

  // The answer with kosmos2's phrases marked in their box colours.
  function showAnswer(out, text, groups) {
    const marked = groups.map((g, i) => ({ span: g.span, colour: PALETTE[i % PALETTE.length] }))
      .filter((m) => Array.isArray(m.span) && m.span[1] > m.span[0]).sort((a, b) => a.span[0] - b.span[0]);
    if (!marked.length) { out.textContent = text; return; }
    const parts = [];
    let at = 0;
    for (const { span, colour } of marked) {
      if (span[0] < at) continue;
      parts.push(text.slice(at, span[0]));
      const mark = document.createElement("mark");
      mark.style.setProperty("--c", colour);
      mark.textContent = text.slice(span[0], span[1]);
      parts.push(mark);
      at = span[1];
    }
    parts.push(text.slice(at));
    out.replaceChildren(...parts);
  }

  // -- the conversation ----------------------------------------------------------------------------------------
  // One line per request option the UI offers: its field, its key in the request, how its text is read, and
  // where it goes in the Python snippets (`extension`: not an `openai` argument, so in extra_body; `client`:
  // TritonVLMClient takes it too). A new option of the API is one more line here and one field in the page.
  const OPTIONS = [
    { id: "max-tokens", key: "max_tokens", read: "int", client: true },
    { id: "temperature", key: "temperature", read: "float", client: true },
    { id: "top-p", key: "top_p", read: "float", client: true },
    { id: "seed", key: "seed", read: "int", client: true },
    { id: "task", key: "task", read: "text", extension: true },
  ];
  const READ = {
    int: (text) => (/^\s*-?\d+\s*$/.test(text) ? Number(text) : undefined),
    float: (text) => (text.trim() !== "" && Number.isFinite(Number(text)) ? Number(text) : undefined),
    text: (text) => text.trim() || undefined,
    json: (text) => (text.trim() ? JSON.parse(text) : undefined),  // e.g. response_format
  };

  function options() {
    const set = {};
    for (const option of OPTIONS) {
      const field = $(option.id);
      if (!field || field.disabled) continue;
      const value = READ[option.read](field.value);
      if (value !== undefined) set[option.key] = value;
    }
    return set;
  }

  // state.turns: [{ question, image (state.image's shape, or null: a text-only turn), answer, ok, element }].
  // Only answered turns (ok) are history; a failed one stays on screen with its error but is not sent again.
  function userMessage(turn, imageUrl) {
    if (!turn.image) return { role: "user", content: turn.question };
    return { role: "user", content: [{ type: "text", text: turn.question },
                                     { type: "image_url", image_url: { url: imageUrl(turn.image) } }] };
  }

  function history(imageUrl) {
    return state.turns.filter((t) => t.ok).flatMap((t) => [userMessage(t, imageUrl),
                                                           { role: "assistant", content: t.answer }]);
  }

  // The image the next question carries: the current one, unless an answered turn already holds it (a follow-up
  // about the same image refers back to it) or the user asks a text-only turn.
  function imageForNext() {
    if (!$("with-image").checked || !state.image) return null;
    return state.turns.some((t) => t.ok && t.image && t.image.dataUrl === state.image.dataUrl) ? null : state.image;
  }

  // The request body for `question` (or, with none, the last question sent again), images through `imageUrl`.
  function request(question, imageUrl) {
    const messages = history(imageUrl);
    if (question !== null || !messages.length) {
      const image = $("with-image").checked && !state.image && !messages.length ? PLACEHOLDER_IMAGE : imageForNext();
      messages.push(userMessage({ question: question || $("prompt").placeholder, image }, imageUrl));
    } else {
      messages.pop();  // ends with the last question
    }
    return { model: $("model").value, messages, ...options() };
  }
  const PLACEHOLDER_IMAGE = { name: "image.png", type: "image/png", dataUrl: "data:image/png;base64,..." };

  function turnElement(turn) {
    const item = (role) => {
      const li = document.createElement("li");
      li.className = `turn ${role}`;
      const who = document.createElement("p");
      who.className = "who";
      who.textContent = role === "user" ? (turn.image ? "You, with the image" : "You") : $("model").value;
      li.appendChild(who);
      return li;
    };
    const asked = item("user");
    if (turn.image) {
      const thumb = document.createElement("img");
      thumb.className = "thumb";
      thumb.src = turn.image.dataUrl;
      thumb.alt = turn.image.name;
      asked.appendChild(thumb);
    }
    const text = document.createElement("p");
    text.className = "question";
    text.textContent = turn.question;
    asked.appendChild(text);
    const answered = item("assistant");
    const out = document.createElement("output");
    out.className = "answer";
    const error = document.createElement("p");
    error.className = "turn-error error";
    error.setAttribute("role", "alert");
    error.hidden = true;
    answered.append(out, error);
    $("conversation").append(asked, answered);
    return { out, error, answered };
  }

  function clearConversation() {
    if (state.controller) state.controller.abort();
    state.turns = [];
    $("conversation").replaceChildren();
    drawOverlay([]);
    for (const id of ["ttft", "total", "tokens", "tps"]) $(id).textContent = "–";
    showError("");
    renderCode();
  }

  async function send() {
    if (state.controller) return;
    showError("");
    if (!$("model").value) { showError("No model to ask: the server lists none (or could not be reached)."); return; }
    if ($("with-image").checked && !state.image) {
      showError("Add an image first: drop, paste or choose one (or untick “About the image” for a text-only turn).");
      $("file").focus();
      return;
    }
    const question = $("prompt").value.trim() || $("prompt").placeholder;
    const body = { ...request(question, (image) => image.dataUrl), stream: true,
                   stream_options: { include_usage: true } };
    const turn = { question, image: imageForNext(), answer: "", ok: false };
    state.turns.push(turn);
    const { out, error: errorBox, answered } = turnElement(turn);
    $("prompt").value = "";
    out.classList.add("streaming");
    drawOverlay([]);
    for (const id of ["ttft", "total", "tokens", "tps"]) $(id).textContent = "–";
    busy(true);
    state.controller = new AbortController();
    const started = performance.now();
    let first = null, text = "", entities, usage = null;
    try {
      const response = await withKey(() => api("v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
        signal: state.controller.signal,
      }));
      for await (const chunk of events(response)) {
        if (chunk.error) throw new ApiError(500, chunk.error.code, chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = (chunk.choices || [])[0];
        if (!choice) continue;
        const delta = choice.delta || {};
        if ((delta.content || choice.finish_reason) && first === null) {
          first = performance.now() - started;
          $("ttft").textContent = ms(first);
        }
        if (delta.content) {
          text += delta.content;
          out.textContent = text;
        }
        if (delta.entities) entities = delta.entities;
      }
      const total = performance.now() - started;
      $("total").textContent = ms(total);
      if (usage) {
        $("tokens").textContent = String(usage.completion_tokens);
        // detect/point answers count no tokens: no rate to show then.
        $("tps").textContent = usage.completion_tokens ? (usage.completion_tokens / (total / 1000)).toFixed(1) : "–";
      }
      Object.assign(turn, { answer: text, ok: true });
      if (!text) out.textContent = "(the model answered nothing)";
      const groups = groupsOf(text, entities, question);
      if (text) showAnswer(out, text, groups);
      drawOverlay(groups);
    } catch (error) {
      if (error.name === "AbortError") {  // what came so far is the answer (as in chat apps); nothing: no turn
        Object.assign(turn, { answer: text, ok: Boolean(text) });
        $("total").textContent = `${ms(performance.now() - started)} (stopped)`;
      } else {
        answered.classList.add("failed");
        errorBox.textContent = explain(error);
        errorBox.hidden = false;
        if (!$("prompt").value) $("prompt").value = question;  // to retry or edit
        if (error instanceof ApiError && error.code === "model_not_found") loadModels().catch(() => {});
      }
    } finally {
      out.classList.remove("streaming");
      state.controller = null;
      busy(false);
      renderCode();
    }
  }

  // Server-sent events of a chat completion stream, as parsed chunks (until `data: [DONE]`).
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  }

  const ms = (value) => (value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(2)} s`);

  function busy(on) {
    $("send").disabled = on;
    $("send").textContent = on ? "Answering…" : "Send";
    $("stop").hidden = !on;
  }

  // -- copy as code --------------------------------------------------------------------------------------------
  // A JSON value as a Python literal (the request holds strings, numbers, booleans, lists and objects; a JSON
  // string literal is a valid Python one).
  function py(value) {
    if (value === null || value === undefined) return "None";
    if (typeof value === "boolean") return value ? "True" : "False";
    if (Array.isArray(value)) return `[${value.map(py).join(", ")}]`;
    if (typeof value === "object") return `{${Object.entries(value).map(([k, v]) => `${py(k)}: ${py(v)}`).join(", ")}}`;
    return JSON.stringify(value);
  }

  function renderCode() {
    // The images stand as markers in the body; each snippet reads the files in its own way.
    const files = [];
    const imageUrl = (image) => {
      let index = files.indexOf(image);
      if (index < 0) index = files.push(image) - 1;
      return `__IMAGE_${index}__`;
    };
    const question = $("prompt").value.trim() || (state.turns.some((t) => t.ok) ? null : "");
    const body = request(question, imageUrl);
    const fileOf = (image) => (image === PLACEHOLDER_IMAGE ? "image.png" : image.name);
    const typeOf = (image) => (image.type.startsWith("image/") ? image.type : "image/png");
    const base = `${location.origin}/v1`;
    const { model, messages, ...chosen } = body;

    // curl: the JSON in single quotes, each image spliced in by the shell, as in the README.
    let curlBody = JSON.stringify(body).replace(/'/g, "'\\''");
    files.forEach((image, i) => {
      curlBody = curlBody.replace(`"__IMAGE_${i}__"`,
        `"data:${typeOf(image)};base64,'"$(base64 -w0 ${shellQuote(fileOf(image))})"'"`);
    });
    $("code-curl").textContent = [
      `curl -s ${base}/chat/completions \\`,
      '  -H "Authorization: Bearer $TRITON_VLM_API_KEY" \\',
      '  -H "Content-Type: application/json" \\',
      `  -d '${curlBody}'`,
    ].join("\n");

    // Python (openai): one message a line, the images read from their files.
    const withImages = (text) => files.reduce((out, image, i) => out.replace(`"__IMAGE_${i}__"`,
      `f"data:${typeOf(image)};base64,{image${i}}"`), text);
    const readImages = files.map((image, i) => `image${i} = base64.b64encode(open(${py(fileOf(image))}, "rb")`
      + ".read()).decode()");
    const standard = OPTIONS.filter((o) => !o.extension && o.key in chosen).map((o) => `, ${o.key}=${py(chosen[o.key])}`);
    const extension = Object.fromEntries(OPTIONS.filter((o) => o.extension && o.key in chosen)
      .map((o) => [o.key, chosen[o.key]]));
    const extra = Object.keys(extension).length ? `, extra_body=${py(extension)}` : "";
    $("code-openai").textContent = [
      ...(files.length ? ["import base64"] : []),
      "import os",
      "",
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${py(base)}, api_key=os.environ.get("TRITON_VLM_API_KEY", "none"))`,
      ...readImages,
      "messages = [",
      ...messages.map((m) => `    ${withImages(py(m))},`),
      "]",
      `answer = client.chat.completions.create(model=${py(model)}, messages=messages${standard.join("")}${extra})`,
      "print(answer.choices[0].message.content)",
      ...(state.models.get(model) || []).includes("entities")
        ? ["print(answer.choices[0].message.entities)  # triton-vlm extension: phrases with boxes"] : [],
    ].join("\n");

    // TritonVLMClient: one question with its image is infer (tasks too); a conversation is chat, images apart.
    const clientOptions = OPTIONS.filter((o) => o.client && o.key in chosen).map((o) => `, ${o.key}=${py(chosen[o.key])}`)
      .join("");
    const [only] = messages;
    const single = messages.length === 1 && files.length === 1 && Array.isArray(only.content);
    const call = single
      ? `client.infer_result(${py(model)}, ${py(fileOf(files[0]))}, ${py(only.content[0].text)}${clientOptions}`
        + `${chosen.task ? `, task=${py(chosen.task)}` : ""})`
      : `client.chat_result(${py(model)}, messages, [${files.map((f) => py(fileOf(f))).join(", ")}]${clientOptions})`;
    const contract = (m) => (Array.isArray(m.content)
      ? { ...m, content: m.content.map((p) => (p.type === "image_url" ? { type: "image" } : p)) } : m);
    $("code-client").textContent = [
      "from triton_client import TritonVLMClient",
      "",
      ...(single ? [] : ["# the conversation, each image a {\"type\": \"image\"} part where it stands (in order)",
                         "messages = [", ...messages.map((m) => `    ${py(contract(m))},`), "]"]),
      "# Triton's own HTTP port (8000 by default), not the OpenAI front's",
      `with TritonVLMClient(url="${location.hostname}:8000") as client:`,
      `    result = ${call}`,
      "    print(result.text, result.entities)",
    ].join("\n");
  }

  const shellQuote = (value) => (/^[\w./-]+$/.test(value) ? value : `'${value.replace(/'/g, "'\\''")}'`);

  async function copy(id, button) {
    const text = $(id).textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {  // no clipboard API (plain http off loopback): select the text for Ctrl+C
      const range = document.createRange();
      range.selectNodeContents($(id));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      $("copied").textContent = "Selected: press Ctrl+C to copy.";
      return;
    }
    $("copied").textContent = `${button.textContent.replace("Copy ", "")} copied to the clipboard.`;
  }

  // -- wiring ------------------------------------------------------------------------------------------------
  function wire() {
    $("ask").addEventListener("submit", (event) => { event.preventDefault(); send(); });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(); }
      if (event.key === "Escape" && state.controller) state.controller.abort();
    });
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("model").addEventListener("change", modelChanged);
    $("clear").addEventListener("click", clearConversation);
    for (const id of ["task", "prompt", "with-image", ...OPTIONS.map((o) => o.id)]) {
      $(id).addEventListener("input", renderCode);
    }
    $("file").addEventListener("change", () => { takeFile($("file").files[0]); $("file").value = ""; });
    const drop = $("drop");
    drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("dragging"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("dragging");
      takeFile(event.dataTransfer.files[0]);
    });
    document.addEventListener("paste", (event) => {
      const item = [...(event.clipboardData ? event.clipboardData.items : [])].find((i) => i.kind === "file");
      if (item) { event.preventDefault(); takeFile(item.getAsFile()); }
    });
    $("key-button").addEventListener("click", async () => {
      if (await askForKey("Enter the API key this server was started with.")) {
        showError("");
        loadModels().catch((error) => showError(explain(error)));
      }
    });
    for (const button of document.querySelectorAll("[data-copy]")) {
      button.addEventListener("click", () => copy(button.dataset.copy, button));
    }
    // Labels keep their on-screen size when the preview is resized (phone rotation, window).
    if (window.ResizeObserver) new ResizeObserver(() => state.groups.length && drawOverlay(state.groups))
      .observe($("preview"));
  }

  async function start() {
    wire();
    await loadConfig();
    renderCode();
    try {
      await loadModels();
    } catch (error) {
      $("server-status").textContent = "not connected";
      showError(explain(error));
    }
  }

  start();
})();
