// vramplan's local page: a form over the JSON API. The page keeps its state in the URL's query string,
// so a result is a link. Charts are Vega-Lite specs made by the server (vramplan.charts), the same
// the CLI renders with --plot; numbers are the API's, which are the CLI's --json.


const GiB = 2 ** 30;
const $ = (selector) => document.querySelector(selector);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
};
const gib = (bytes) => (bytes / GiB).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const count = (n) => n.toLocaleString("en-US");

// Labels and help for the workload options (the options themselves come from GET /api/schema).
// A choice's help may name each value; the hint under the control follows the selected value.
const LABELS = {
  method: ["method", {
    full: "every weight trains: weights, gradients and optimizer state for all of them",
    lora: "small adapters train on a frozen model: little optimizer state",
    qlora: "adapters on a 4-bit (nf4) frozen model: the least memory for training",
    freeze: "only the last layers train (see trainable layers)",
    dora: "LoRA plus a trained magnitude per output feature (peft use_dora): weight-sized temporaries per layer",
  }],
  precision: ["precision", {
    bf16: "16-bit bfloat16 weights (and, in training, gradients and optimizer states)",
    fp16: "16-bit float16 weights (and, in training, gradients and optimizer states)",
    fp32: "everything in 32 bits: twice the memory of bf16",
    "amp-bf16": "mixed precision: fp32 master weights, bfloat16 compute (torch.autocast)",
    "amp-fp16": "mixed precision: fp32 master weights, float16 compute (torch.autocast)",
  }],
  batch_size: ["batch size", "sequences per step (per request, for inference)"],
  seq_len: ["sequence length", "tokens per sequence (the prompt, for inference)"],
  new_tokens: ["new tokens", "tokens generated after the prompt"],
  optimizer: ["optimizer", {
    adamw: "two fp32 states per trainable weight (PyTorch AdamW, foreach)",
    "adamw-fused": "AdamW with the fused CUDA kernel: fewer step temporaries",
    "adamw-8bit": "bitsandbytes 8-bit AdamW: states in 8 bits",
    sgd: "plain SGD: no state without momentum",
    adafactor: "factored second moments: a fraction of AdamW's state",
    lion: "one state per trainable weight",
    "paged-adamw": "bitsandbytes paged AdamW: fp32 states in unified memory, paged to the host under pressure",
    "paged-adamw-8bit": "bitsandbytes paged 8-bit AdamW: 8-bit states in unified memory",
    galore: "GaLore: Adam states on a low-rank projection of each weight's gradient",
    muon: "Muon: one momentum per matrix, orthogonalized updates; AdamW for the rest",
    apollo: "APOLLO: low-rank random-projection states, channel-wise scaled updates",
  }],
  gradient_checkpointing: ["gradient checkpointing", "recompute activations in backward: much less memory, about a third slower"],
  attention: ["attention kernel", {
    sdpa: "PyTorch scaled_dot_product_attention: flash / memory-efficient kernels where eligible",
    flash: "the flash-attn package: never stores the seq × seq scores",
    eager: "explicit softmax(QKᵀ)V: stores the seq × seq scores (memory grows with seq²)",
  }],
  weights_quant: ["quantized weights", {
    none: "weights as the precision says",
    int8: "bitsandbytes LLM.int8: one byte per weight",
    nf4: "bitsandbytes 4-bit NormalFloat: half a byte per weight",
    fp8: "8-bit float weights with per-tensor scales",
  }],
  logits: ["logits", { last: "only the last position, as generate() does", all: "every prompt token (model(input_ids))" }],
  gradient_accumulation: ["gradient accumulation", "micro-batches per optimizer step"],
  lora_rank: ["LoRA rank", "size of each adapter"],
  lora_alpha: ["LoRA alpha", "scaling; does not change memory"],
  lora_dropout: ["LoRA dropout", "above 0, each adapted layer keeps a dropout mask and a dropped copy"],
  lora_targets: ["LoRA targets", "default (peft's choice for the family), all-linear, or module names such as q_proj,v_proj"],
  trainable_layers: ["trainable layers", "how many of the last layers train (empty: a quarter)"],
  trainer: ["training loop", {
    plain: "a hand-written loop that keeps the model output (logits) until after optimizer.step()",
    hf: "transformers Trainer: the logits die before backward",
    "trl-sft": "TRL SFTTrainer: Trainer plus entropy / token-accuracy metrics; chunked loss by default",
  }],
  loss: ["loss", {
    auto: "the trainer's default (TRL: chunked; otherwise standard)",
    standard: "logits for every token, cast to fp32 for cross-entropy",
    chunked: "TRL chunked_nll: the head and the loss per chunk of tokens, recomputed in backward",
    "liger-fused": "Liger fused linear cross-entropy: gradients in the forward, logits never whole",
    cce: "Cut Cross-Entropy: blockwise, logits never materialized",
  }],
  loss_chunk: ["loss chunk", "tokens per chunk for the chunked loss (0: TRL's 256)"],
  packing: ["padding-free packing", "memory follows the real tokens (FlashAttention varlen), not batch × max length"],
  avg_seq_len: ["mean sequence length", "with packing: the real tokens of an average sequence (empty: the sequence length)"],
  checkpointing: ["checkpointing", "none, full, or every:N (layers 0, N, 2N, … recompute in backward)"],
  activation_offload: ["activation offloading", "saved activations in pinned host memory, back for backward (PCIe traffic)"],
  double_quant: ["double quantization", "nf4: 8-bit absmax constants (bitsandbytes bnb_4bit_use_double_quant)"],
  rslora: ["rsLoRA", "scaling alpha/√r; does not change memory"],
  lora_modules_to_save: ["modules to save", "embed_tokens,lm_head: trained full copies next to the adapters"],
  optimizer_rank: ["projection rank", "GaLore / APOLLO: rank of the projected gradient"],
  galore_update_gap: ["GaLore update gap", "steps between SVDs of the projection"],
  load: ["weights loaded by", {
    config: "from_config on the GPU, one tensor at a time (the calibration harness)",
    "device-map": "from_pretrained(..., device_map=...): one warm-up block of the checkpoint's size, then each tensor",
    "to-device": "from_pretrained on the CPU, then model.to('cuda') (the HF Trainer's move)",
  }],
  hub_kernels: ["hub kernels", "transformers ≥ 5.25 from_pretrained's default on CUDA: RMSNorm runs Liger's kernel (saves its input and one fp32 value per row, not PyTorch's fp32 copies)"],
};
const GROUPS = {
  basic: ["method", "precision", "batch_size", "seq_len", "new_tokens"],
  advanced: ["optimizer", "gradient_checkpointing", "attention", "weights_quant", "logits", "gradient_accumulation",
    "hub_kernels", "load"],
  adapters: ["lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "trainable_layers", "rslora",
    "lora_modules_to_save"],
  savers: ["trainer", "loss", "loss_chunk", "packing", "avg_seq_len", "checkpointing", "activation_offload",
    "double_quant", "optimizer_rank", "galore_update_gap"],
};
// The estimate command's options beyond the workload, by what they are about (the rest: "Other").
const EXTRA_GROUPS = {
  parallel: ["gpus", "nodes", "zero", "fsdp", "tp", "pp", "ep", "micro_batches", "virtual_stages", "offload",
    "sequence_parallel", "intra_node_link", "inter_node_link"],
  image: ["resolution", "pipeline"],
};
// The serving job (issue 13): fit --engine's options, shown with an inference job; the answer is fit's serving object.
const SERVE_KEYS = ["engine", "tp", "gpu_memory_utilization", "max_model_len", "max_num_seqs", "kv_cache_dtype"];
const SERVE_CHOICES = { engine: ["vllm", "sglang"], kv_cache_dtype: ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] };
const SERVE_SHOWN = ["fits", "weights_bytes", "profile_peak_bytes", "non_torch_bytes", "cuda_graph_bytes", "kv_cache_bytes",
  "kv_bytes_per_token", "block_size", "gpu_blocks", "kv_tokens", "max_concurrency", "max_model_len", "max_model_len_fit",
  "max_num_seqs", "engine_version"];
const PLAN_JOB_KEYS = ["method", "precision", "optimizer", "weights_quant", "batch_size", "gradient_checkpointing",
  "attention", "lora_rank", "lora_targets", "seq_len", "new_tokens", "resolution", "pipeline", "trainer", "loss",
  "activation_offload"];
// When an option means something (hidden options are not sent: the CLI default applies).
const SHOWN = {
  method: (v) => v.task === "train",
  optimizer: (v) => v.task === "train",
  gradient_checkpointing: (v) => v.task === "train",
  gradient_accumulation: (v) => v.task === "train",
  new_tokens: (v) => v.task === "infer",
  logits: (v) => v.task === "infer",
  weights_quant: (v) => v.task === "infer" || v.method === "lora",
  lora_rank: (v) => v.task === "train" && ["lora", "qlora", "dora"].includes(v.method),
  lora_alpha: (v) => v.task === "train" && ["lora", "qlora", "dora"].includes(v.method),
  lora_dropout: (v) => v.task === "train" && ["lora", "qlora", "dora"].includes(v.method),
  lora_targets: (v) => v.task === "train" && ["lora", "qlora", "dora"].includes(v.method),
  trainable_layers: (v) => v.task === "train" && v.method === "freeze",
  rslora: (v) => v.task === "train" && ["lora", "qlora", "dora"].includes(v.method),
  lora_modules_to_save: (v) => v.task === "train" && ["lora", "qlora", "dora"].includes(v.method),
  trainer: (v) => v.task === "train",
  loss: (v) => v.task === "train",
  loss_chunk: (v) => v.task === "train" && v.loss === "chunked",
  packing: (v) => v.task === "train",
  avg_seq_len: (v) => v.task === "train" && v.packing === true,
  checkpointing: (v) => v.task === "train",
  activation_offload: (v) => v.task === "train",
  double_quant: (v) => v.method === "qlora" || v.weights_quant === "nf4",
  optimizer_rank: (v) => v.task === "train" && (v.optimizer === "galore" || v.optimizer === "apollo"),
  galore_update_gap: (v) => v.task === "train" && v.optimizer === "galore",
};
const CONFIG_URL_LIMIT = 16384;

const page = {
  schema: null,
  options: {},       // name -> option from the schema (workload and the estimate command's other options)
  extras: [],        // names of the estimate command's options beyond the workload
  gpus: [],          // GPUs to compare (capacity lines)
  gpuClass: "",
  config: null,      // an uploaded config.json object
  defaultModel: "llama-3.1-8b",
  controller: null,  // aborts the previous round of requests
  views: {},         // Vega views by chart id (for scripts and tests)
  timer: 0,
};
window.vramplan = page;

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path, body, signal) {
  const init = body === undefined ? { signal } : {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body), signal,
  };
  const response = await fetch(path, init);
  let data;
  try { data = await response.json(); } catch { data = { error: response.statusText }; }
  if (!response.ok) throw new ApiError(data.error || response.statusText, response.status);
  return data;
}

// ------------------------------------------------------------------------------------------ the form

function control(option, prefix = "opt-") {
  const [label, help] = LABELS[option.name] || [option.name.replaceAll("_", " "), option.help || ""];
  const id = `${prefix}${option.name}`;
  let input;
  if (option.kind === "choice") {
    input = el("select", { id, name: option.name });
    for (const c of option.choices) input.append(el("option", { value: c, textContent: c }));
  } else if (option.kind === "bool") {
    input = el("input", { id, name: option.name, type: "checkbox" });
  } else if (option.kind === "int" || option.kind === "optional_int") {
    input = el("input", { id, name: option.name, type: "number", min: "0", step: "1", inputMode: "numeric" });
  } else if (option.kind === "float") {
    input = el("input", { id, name: option.name, type: "number", min: "0", step: "0.01", inputMode: "decimal" });
  } else {
    input = el("input", { id, name: option.name, type: "text", maxLength: 200 });
  }
  setValue(input, option.default);
  const wrap = el("div", { class: option.kind === "bool" ? "field check" : "field" });
  if (prefix === "opt-") wrap.dataset.option = option.name;
  const lab = el("label", { htmlFor: id, textContent: label });
  if (option.kind === "bool") wrap.append(input, lab); else wrap.append(lab, input);
  if (help) {
    const hint = el("span", { class: "hint" });
    const say = () => { hint.textContent = typeof help === "string" ? help : help[input.value] || ""; };
    say();
    input.addEventListener("change", say);
    input.addEventListener("input", say);
    wrap.append(hint);
    wrap.sayHelp = say;
  }
  return wrap;
}

function setValue(input, value) {
  if (input.type === "checkbox") input.checked = Boolean(value);
  else input.value = value === null || value === undefined ? "" : String(value);
}

function readValue(option, prefix = "opt-") {
  const input = document.getElementById(`${prefix}${option.name}`);
  if (!input) return option.default;
  if (option.kind === "bool") return input.checked;
  const text = input.value.trim();
  if (option.kind === "int" || option.kind === "optional_int" || (option.kind === "float")) {
    if (text === "") return option.kind === "optional_int" ? null : option.default;
    const n = Number(text);
    return Number.isFinite(n) ? n : text;  // the API says what is wrong with a non-number
  }
  if (option.kind === "list") return text === "" ? [] : text.split(",").map((s) => s.trim()).filter(Boolean);
  return text === "" ? option.default : text;
}

function task() { return document.querySelector('input[name="task"]:checked').value; }
function source() { return document.querySelector('input[name="source"]:checked').value; }

function values() {
  const v = { task: task() };
  for (const name of Object.keys(page.options)) if (name !== "task") v[name] = readValue(page.options[name]);
  return v;
}

function same(a, b) { return JSON.stringify(a) === JSON.stringify(b); }

// The request body: the model, and every shown option that differs from its default (as the CLI's flags).
function requestBody() {
  const v = values();
  const body = {};
  if (source() === "config") {
    body.config = page.config;
    const name = $("#config-name").value.trim();
    if (name) body.config_name = name;
  } else {
    body.model = $("#model").value || page.defaultModel;
  }
  for (const [name, value] of Object.entries(v)) {
    const option = page.options[name];
    const shown = SHOWN[name] ? SHOWN[name](v) : true;
    if (option && shown && !same(value, option.default)) body[name] = value;
  }
  return body;
}

function refreshVisibility() {
  const v = values();
  for (const wrap of document.querySelectorAll("[data-option]")) {
    const rule = SHOWN[wrap.dataset.option];
    wrap.hidden = rule ? !rule(v) : false;
  }
  $("#catalog-box").hidden = source() !== "catalog";
  $("#config-box").hidden = source() !== "config";
}

function cliCommand(body) {
  const parts = ["vramplan", "estimate", body.model || (body.config_name ? `path/to/${body.config_name}` : "path/to/config.json")];
  for (const [k, v] of Object.entries(body)) {
    if (k === "model" || k === "config" || k === "config_name") continue;
    const flag = `--${k.replaceAll("_", "-")}`;
    if (v === true) parts.push(flag);
    else if (Array.isArray(v)) for (const item of v) parts.push(flag, String(item));
    else parts.push(flag, String(v));
  }
  return parts.join(" ");
}

// ------------------------------------------------------------------------------------------ the URL

function b64urlEncode(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

function b64urlDecode(text) {
  const bin = atob(text.replaceAll("-", "+").replaceAll("_", "/"));
  return new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)));
}

function syncUrl(body) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(body)) {
    if (k === "config") continue;
    if (Array.isArray(v)) q.set(k, v.join(","));
    else q.set(k, String(v));
  }
  if (body.config) {
    const packed = b64urlEncode(JSON.stringify(body.config));
    if (packed.length <= CONFIG_URL_LIMIT) q.set("config", packed);
  }
  if (!same(page.gpus, page.schema.default_gpus)) q.set("gpu", page.gpus.join(","));
  if (page.gpuClass) q.set("gpu_class", page.gpuClass);
  const parallel = $("#parallel-gpus").value;
  if (parallel && parallel !== "8") q.set("parallel_gpus", parallel);
  const url = `${location.pathname}${q.toString() ? `?${q}` : ""}`;
  if (url !== `${location.pathname}${location.search}`) history.replaceState(null, "", url);
}

function loadUrl() {
  const q = new URLSearchParams(location.search);
  if (q.has("config")) {
    try {
      page.config = JSON.parse(b64urlDecode(q.get("config")));
      document.querySelector('input[name="source"][value="config"]').checked = true;
      $("#config-text").value = JSON.stringify(page.config, null, 2);
      $("#config-name").value = q.get("config_name") || "";
    } catch {
      showError("the link's config could not be read");
    }
  }
  if (q.has("model")) ensureModelOption(q.get("model"));
  if (q.has("task")) {
    const radio = document.querySelector(`input[name="task"][value="${CSS.escape(q.get("task"))}"]`);
    if (radio) radio.checked = true;
  }
  for (const option of Object.values(page.options)) {
    if (!q.has(option.name) || option.name === "task") continue;
    const input = document.getElementById(`opt-${option.name}`);
    const raw = q.get(option.name);
    if (option.kind === "bool") setValue(input, raw === "true");
    else setValue(input, raw);
  }
  if (q.has("gpu")) page.gpus = q.get("gpu").split(",").filter(Boolean);
  if (q.has("gpu_class")) {
    page.gpuClass = q.get("gpu_class");
    const radio = document.querySelector(`input[name="gpu_class"][value="${CSS.escape(page.gpuClass)}"]`);
    if (radio) radio.checked = true;
  }
  if (q.has("parallel_gpus")) $("#parallel-gpus").value = q.get("parallel_gpus");
}

function ensureModelOption(name) {
  const select = $("#model");
  const match = [...select.options].find((o) => o.value === name || o.dataset.aliases?.split(" ").includes(name));
  if (match) select.value = match.value;
  else {
    select.append(el("option", { value: name, textContent: name }));
    select.value = name;
  }
}

// ------------------------------------------------------------------------------------------ rendering

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

// After an error nothing of the previous answer stays on screen as if it were this request's.
function clearResults() {
  for (const id of ["#total", "#peak", "#phase", "#params"]) {
    const node = $(id);
    node.textContent = "—";
    for (const key of Object.keys(node.dataset)) delete node.dataset[key];
  }
  $("#total-label").textContent = "on the GPU (nvidia-smi)";
  $("#trainable").textContent = "";
  $("#verdict").replaceChildren();
  $("#per-gpu").hidden = true;
  for (const table of ["#breakdown-table", "#fit-table", "#fit-result", "#plan-table"]) $(`${table} tbody`).replaceChildren();
  $("#plan-table thead").replaceChildren();
  for (const id of ["#plan-summary", "#plan-job", "#fit-table-note", "#sweep-note"]) $(id).textContent = "";
  $("#sweep-note").hidden = true;
  $("#assumptions").replaceChildren();
  $("#warnings").replaceChildren();
  for (const id of ["chart-breakdown", "chart-seq", "chart-batch", "chart-parallel"]) {
    document.getElementById(id).replaceChildren();
    if (page.views[id]) { page.views[id].finalize(); delete page.views[id]; }
  }
  $("#parallel").hidden = true;
}

async function embed(id, spec) {
  const target = document.getElementById(id);
  if (!spec) { target.replaceChildren(); delete page.views[id]; return; }
  if (typeof window.vegaEmbed !== "function") {
    target.replaceChildren(el("p", { class: "hint", textContent: window.vramplanChartNote || "Charts need vl-convert-python: pip install 'vramplan[web]'" }));
    return;
  }
  // The CLI's spec, only widened to the page's column: same data, same marks.
  const sized = { ...spec, width: "container" };
  if (spec.height && typeof spec.height === "object") {  // a step per bar: fixed, for a container width
    sized.height = spec.height.step * new Set(spec.data.values.map((d) => d.row)).size;
  }
  const result = await window.vegaEmbed(target, sized, { renderer: "svg", actions: false });
  if (page.views[id]) page.views[id].finalize();
  page.views[id] = result.view;
}

function renderSummary(est, fits) {
  // Several GPUs: the headline is the most loaded GPU's memory; the one-GPU figure is the small print.
  const perGpu = est.per_gpu;
  const head = perGpu || est;
  const total = $("#total");
  total.textContent = `${gib(head.total_bytes)} GiB`;
  total.dataset.bytes = String(head.total_bytes);
  total.dataset.scope = perGpu ? "per-gpu" : "one-gpu";
  $("#total-label").textContent = perGpu ? `per GPU, most loaded of ${perGpu.gpus} (nvidia-smi)` : "on the GPU (nvidia-smi)";
  const peak = $("#peak");
  peak.textContent = `${gib(head.peak_allocated_bytes)} GiB`;
  peak.dataset.bytes = String(head.peak_allocated_bytes);
  $("#phase").textContent = est.peak_phase.replaceAll("_", " ");
  $("#phase").dataset.phase = est.peak_phase;
  $("#params").textContent = count(est.parameters);
  $("#params").dataset.count = String(est.parameters);
  $("#trainable").textContent = `${count(est.trainable_parameters)} trainable`;
  $("#per-gpu").hidden = !perGpu;
  if (perGpu) {
    $("#per-gpu-text").textContent = `most loaded GPU of ${perGpu.gpus}` + (perGpu.engine ? ` (${perGpu.engine})` : "") +
      `: ${gib(perGpu.total_bytes)} GiB on the GPU, ${gib(perGpu.peak_allocated_bytes)} GiB peak allocated` +
      (perGpu.host_bytes ? `; host memory ${gib(perGpu.host_bytes)} GiB` : "") +
      `. The whole job on one GPU would need ${gib(est.total_bytes)} GiB (the breakdown below).`;
  }
  const assumptions = $("#assumptions");
  assumptions.replaceChildren(...est.assumptions.map((a) => el("li", { textContent: a })));
  $("#warnings").replaceChildren(...est.warnings.map((w) => el("li", { textContent: w })));
  const chosen = fits.filter((row) => page.gpus.includes(row.name));
  const verdict = $("#verdict");
  verdict.replaceChildren();
  for (const row of chosen) {
    verdict.append(el("span", { class: row.fits ? "chip ok" : "chip no",
      textContent: `${row.display_name}: ${row.fits ? `fits, ${gib(row.headroom_bytes)} GiB to spare` : `needs ${gib(-row.headroom_bytes)} GiB more`}` }));
  }
}

function renderBreakdownTable(est) {
  const kinds = new Map(page.schema.kinds.map((k) => [k.name, k]));
  const rows = Object.entries(est.breakdown).filter(([, v]) => v > 0).map(([kind, v]) =>
    el("tr", { "data-kind": kind, "data-bytes": String(v) },
      el("td", {}, el("span", { class: "swatch", style: `background:${kinds.get(kind)?.color ?? "#999"}` }),
        kinds.get(kind)?.label ?? kind.replaceAll("_", " ")),
      el("td", { textContent: gib(v) }),
      el("td", { textContent: `${Math.round((100 * v) / est.total_bytes)}%` })));
  rows.push(el("tr", { class: "total" }, el("td", { textContent: "total" }), el("td", { textContent: gib(est.total_bytes) }), el("td")));
  $("#breakdown-table tbody").replaceChildren(...rows);
}

function renderFitTable(rows) {
  const tbody = $("#fit-table tbody");
  tbody.replaceChildren(...rows.filter((r) => !page.gpuClass || r.class === page.gpuClass).map((r) => {
    const tr = el("tr", { class: `${r.fits ? "ok" : "no"}${page.gpus.includes(r.name) ? " chosen" : ""}`,
      "data-gpu": r.name, "data-fits": String(r.fits), "data-headroom": String(r.headroom_bytes), title: "click to compare on the charts" },
    el("td", { textContent: r.display_name }), el("td", { class: "wide-only", textContent: r.class }),
    el("td", { textContent: gib(r.usable_memory_bytes) }), el("td", { textContent: r.fits ? "✓ fits" : "✗ does not fit" }),
    el("td", { textContent: gib(r.headroom_bytes) }));
    tr.addEventListener("click", () => toggleGpu(r.name));
    return tr;
  }));
}

function renderChips() {
  const box = $("#gpu-chips");
  box.replaceChildren(...page.gpus.map((name) => {
    const chip = el("button", { type: "button", class: "chip", textContent: `${name} ✕`, title: "remove" });
    chip.addEventListener("click", () => toggleGpu(name));
    return chip;
  }));
  if (!page.gpus.length) box.append(el("span", { class: "hint", textContent: "none: click rows of the fit table" }));
}

function toggleGpu(name) {
  page.gpus = page.gpus.includes(name) ? page.gpus.filter((g) => g !== name) : [...page.gpus, name].slice(-8);
  renderChips();
  schedule();
}

function renderKeyValues(table, data) {
  const rows = [];
  for (const [k, v] of Object.entries(data)) {
    if (v !== null && typeof v === "object") continue;
    const shown = v === null ? "—" : typeof v === "number" && k.endsWith("_bytes") ? `${gib(v)} GiB`
      : typeof v === "number" ? count(v) : typeof v === "boolean" ? (v ? "yes" : "no") : String(v);
    const label = k.replace(/_bytes$/, "").replaceAll("_", " ");
    rows.push(el("tr", { "data-key": k }, el("th", { textContent: label }), el("td", { textContent: shown })));
  }
  table.querySelector("tbody").replaceChildren(...rows);
}

// Hours as the CLI writes them: minutes under an hour, days past two.
function duration(h) {
  if (typeof h !== "number") return "—";
  const fmt = (x) => x.toLocaleString("en-US", { maximumFractionDigits: 1, minimumFractionDigits: 1 });
  if (h < 1 / 60) return `${fmt(h * 3600)} s`;
  if (h < 1) return `${fmt(h * 60)} min`;
  return h < 48 ? `${fmt(h)} h` : `${fmt(h / 24)} d`;
}

function jobSize(data) {
  if (data.resolution) {
    return `job: images of ${count(data.resolution)} px` + (data.global_batch ? `, ${count(data.global_batch)} per optimizer step` : "") +
      "; time and cost are not modelled for image models";
  }
  if (data.task === "infer") return `job: ${count(data.tokens || 0)} generated tokens for prompts of ${count(data.seq_len || 0)} tokens (set tokens to change)`;
  return `job: ${count(data.tokens || 0)} training tokens` +
    (data.global_batch ? `, ${count(data.global_batch)} sequences of ${count(data.seq_len)} tokens per optimizer step` : "") +
    " — the hours and cost below are for this job (set tokens to change)";
}

function renderPlans(data) {
  const plans = Array.isArray(data.plans) ? data.plans.slice(0, 10) : [];
  $("#plan-job").textContent = jobSize(data);
  const columns = [["plan", (p) => p.summary || `${p.gpu_count ?? 1} × ${p.gpu}: ${p.method}, ${p.precision}`],
    ["per GPU", (p) => (p.total_bytes ?? p.peak_allocated_bytes) === undefined ? "—" : `${gib(p.total_bytes ?? p.peak_allocated_bytes)} GiB`],
    ["time", (p) => duration(p.time_hours)],
    ["cost (on demand)", (p) => (typeof p.cost_usd === "number" ? `$${p.cost_usd.toLocaleString("en-US", { maximumFractionDigits: 2 })}` : "—")]];
  $("#plan-table thead").replaceChildren(el("tr", {}, ...columns.map(([name]) => el("th", { textContent: name }))));
  $("#plan-table tbody").replaceChildren(...plans.map((p) => el("tr", {}, ...columns.map(([, cell]) => el("td", { textContent: cell(p) })))));
  const rec = data.recommendation || {};
  const say = (label, key) => {
    const r = rec[key];
    if (r) {
      const when = typeof r.time_hours === "number" ? `, ${duration(r.time_hours)}` : "";
      const cost = typeof r.cost_usd === "number" ? `, $${r.cost_usd.toLocaleString("en-US", { maximumFractionDigits: 2 })}` : "";
      return `${label}: ${r.summary || `${r.gpu_count ?? 1} × ${r.gpu}`}${when}${cost}`;
    }
    return rec[`${key}_reason`] || r === null ? `${label}: ${rec[`${key}_reason`] || "not feasible"}` : "";
  };
  $("#plan-summary").textContent = [say("cheapest consumer setup", "consumer"), say("recommended data-centre setup", "datacenter"),
    ...(Array.isArray(data.savers) ? data.savers.map((n) => `memory savers: ${n}`) : []),
    data.candidates_evaluated ? `${count(data.candidates_evaluated)} configurations evaluated` : ""].filter(Boolean).join(" · ");
}

// ------------------------------------------------------------------------------------------ updating

function sweepRange(value, lo, floor, cap) {
  let hi = 1;
  while (hi < value) hi *= 2;
  return `${lo}:${Math.min(cap, Math.max(floor, hi * 4))}`;
}

function schedule() {
  clearTimeout(page.timer);
  page.timer = setTimeout(update, 120);
}

async function update() {
  refreshVisibility();
  if (source() === "config" && !page.config) {
    showError("upload or paste a config.json first");
    return;
  }
  if (page.controller) page.controller.abort();
  const controller = new AbortController();
  page.controller = controller;
  const signal = controller.signal;
  const results = $("#results");
  results.dataset.state = "loading";
  const body = requestBody();
  syncUrl(body);
  $("#cli").textContent = cliCommand(body);
  const v = values();
  try {
    const [est, fits] = await Promise.all([
      api("/api/estimate", body, signal),
      api("/api/headroom", body, signal),
    ]);
    showError("");
    // several GPUs: each GPU type is judged by the most loaded GPU of the layout, not by the one-GPU total
    const perGpu = est.per_gpu;
    const rows = perGpu ? fits.gpus.map((r) => ({ ...r, fits: r.usable_memory_bytes >= perGpu.total_bytes,
      headroom_bytes: r.usable_memory_bytes - perGpu.total_bytes })) : fits.gpus;
    $("#fit-table-note").textContent = perGpu ? `per GPU: ${perGpu.gpus} of each type, the layout above (${gib(perGpu.total_bytes)} GiB on the most loaded)` : "";
    renderSummary(est, rows);
    renderBreakdownTable(est);
    renderFitTable(rows);
    const direct = Object.keys(body).every((k) => k in page.options && !page.extras.includes(k) || ["model", "config", "config_name"].includes(k));
    const sweeps = direct ? [
      api("/api/chart/sweep", { ...body, over: "seq-len", range: sweepRange(v.seq_len, 256, 4096, 131072), gpu: page.gpus }, signal),
      api("/api/chart/sweep", { ...body, over: "batch-size", range: sweepRange(v.batch_size, 1, 16, 1024), gpu: page.gpus }, signal),
    ] : [Promise.resolve({ spec: null }), Promise.resolve({ spec: null })];
    const parallelWanted = page.schema.features.parallel && direct;
    const [breakdown, seq, batch, parallel] = await Promise.all([
      api("/api/chart/breakdown", body, signal),
      ...sweeps.map((p) => p.catch((e) => (e.name === "AbortError" ? Promise.reject(e) : { spec: null, reason: e.message }))),
      parallelWanted ? api("/api/chart/parallel", { ...body, gpus: Number($("#parallel-gpus").value) || 8, gpu: page.gpus }, signal)
        .catch((e) => (e.name === "AbortError" ? Promise.reject(e) : { spec: null, reason: e.message })) : Promise.resolve(null),
    ]);
    if (signal.aborted) return;
    await embed("chart-breakdown", breakdown.spec);
    await embed("chart-seq", seq.spec);
    await embed("chart-batch", batch.spec);
    const reasons = [seq.reason, batch.reason].filter(Boolean);
    const note = $("#sweep-note");
    note.hidden = Boolean(seq.spec || batch.spec) && !reasons.length;
    note.textContent = seq.spec || batch.spec ? reasons.join("; ")
      : (reasons.join("; ") || (direct ? "no sweep for this model" :
        "memory against sequence length and batch size is drawn for language models with workload options only; " +
        "use the fit section (largest batch and resolution) for image models and several GPUs"));
    $("#parallel").hidden = !parallel || (!parallel.spec && !parallel.reason);
    if (parallel) {
      await embed("chart-parallel", parallel.spec);
      $("#parallel-note").textContent = parallel.spec ? "" : parallel.reason;
    }
    if (signal.aborted) return;
    results.dataset.request = JSON.stringify(body);
    results.dataset.state = "ready";
    await Promise.all([updateFit(body, signal), updateServe(body, signal), updatePlan(body, signal)]);
  } catch (err) {
    if (err.name === "AbortError") return;
    clearResults();
    showError(err.message);
    results.dataset.request = JSON.stringify(body);
    results.dataset.state = "error";
  }
}

function commandBody(command, body) {
  const known = new Set([...page.schema.workload.map((o) => o.name), ...(page.schema.commands[command] || []).map((o) => o.name)]);
  return Object.fromEntries(Object.entries(body).filter(([k]) => ["model", "config", "config_name"].includes(k) || known.has(k)));
}

async function updateFit(body, signal) {
  if (!page.schema.features.fit) return;
  const section = $("#fit-section");
  section.hidden = false;
  const request = { ...commandBody("fit", body), gpu: $("#fit-gpu").value };
  const fitTakes = new Set((page.schema.commands.fit || []).map((o) => o.name));
  const several = EXTRA_GROUPS.parallel.filter((k) => k in body);
  $("#fit-title").textContent = several.length && fitTakes.has("gpus") ? `Fit on ${body.gpus || "several"} GPUs` : "Fit on one GPU";
  if (several.length && !fitTakes.has("gpus")) {
    renderKeyValues($("#fit-result"), { note: "fit answers for one GPU; the per-GPU answer of this layout is at the top" });
    return;
  }
  try {
    renderKeyValues($("#fit-result"), await api("/api/fit", request, signal));
  } catch (err) {
    if (err.name !== "AbortError") renderKeyValues($("#fit-result"), { error: err.message });
  }
}

async function updateServe(body, signal) {
  const section = $("#serve-section");
  section.hidden = !page.schema.features.fit || task() !== "infer";
  if (section.hidden) return;
  // the server's own settings replace the page's layout and time flags (fit's --tp sizes the server)
  const request = Object.fromEntries(Object.entries(commandBody("fit", body)).filter(([k]) => !EXTRA_GROUPS.parallel.includes(k)));
  request.gpu = $("#serve-gpu").value;
  for (const option of (page.schema.commands.fit || []).filter((o) => SERVE_KEYS.includes(o.name))) {
    const value = readValue(option, "serve-");
    if (value !== null && value !== "" && value !== undefined) request[option.name] = value;
  }
  try {
    const data = await api("/api/fit", request, signal);
    const serving = data.serving || {};
    const shown = Object.fromEntries(SERVE_SHOWN.filter((k) => k in serving).map((k) => [k, serving[k]]));
    if (typeof data.tokens_per_s === "number") shown.decode_tokens_per_s = Math.round(data.tokens_per_s * 10) / 10;
    if (typeof data.step_time_s === "number") shown.prefill_seconds = Math.round(data.step_time_s * 1000) / 1000;
    renderKeyValues($("#serve-result"), shown);
    $("#serve-command").textContent = data.launch_command || "—";
  } catch (err) {
    if (err.name === "AbortError") return;
    renderKeyValues($("#serve-result"), { error: err.message });
    $("#serve-command").textContent = "—";
  }
}

async function updatePlan(body, signal) {
  if (!page.schema.features.plan) return;
  $("#plan-section").hidden = false;
  const request = { ...(body.config ? { config: body.config, config_name: body.config_name } : { model: body.model }) };
  // the job in the form pins the search (a LoRA job gets LoRA plans); what the form leaves at its default is searched
  const planTakes = new Set((page.schema.commands.plan || []).map((o) => o.name).concat(page.schema.workload.map((o) => o.name)));
  for (const key of PLAN_JOB_KEYS) if (key in body && planTakes.has(key)) request[key] = body[key];
  for (const option of page.schema.commands.plan || []) {
    if (!document.getElementById(`plan-${option.name}`)) continue;
    const value = readValue(option, "plan-");
    if ((option.required || !same(value, option.default)) && value !== "" && value !== null) request[option.name] = value;
  }
  if (task() === "infer") { request.task = "infer"; delete request.method; }  // plan's task follows the page's
  try {
    renderPlans(await api("/api/plan", request, signal));
  } catch (err) {
    if (err.name === "AbortError") return;
    $("#plan-table thead").replaceChildren();
    $("#plan-table tbody").replaceChildren();
    $("#plan-job").textContent = "";
    $("#plan-summary").textContent = err.message;
  }
}

// ------------------------------------------------------------------------------------------ setup

// ``name``: the uploaded file's name; null for pasted text (the name field then says "config.json").
async function readConfig(text, name) {
  $("#config-name").value = name ? name.replace(/[^A-Za-z0-9._+ -]/g, "_").slice(0, 100) : "";
  const where = name ? name : "the pasted text";
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    page.config = null;
    clearResults();
    $("#results").dataset.state = "error";
    $("#cli").textContent = "";
    $("#config-status").textContent = "";
    showError(`${where} is not a config.json: a Hugging Face config.json is one JSON object ({"model_type": …})`);
    return;
  }
  page.config = parsed;
  $("#config-status").textContent = `read ${count(text.length)} characters from ${where}`;
  schedule();
}

async function main() {
  // every model the catalogs hold: language models and image models (each with its kind)
  const [schema, models, gpus] = await Promise.all([api("/api/schema"), api("/api/models"), api("/api/gpus")]);
  page.schema = schema;
  page.gpus = [...schema.default_gpus];
  $("#version").textContent = schema.version;

  const select = $("#model");
  const families = new Map();
  for (const m of models) {
    const family = m.family || "other";
    if (!families.has(family)) families.set(family, el("optgroup", { label: family }));
    const params = m.parameters ? ` · ${(m.parameters / 1e9).toLocaleString("en-US", { maximumFractionDigits: 1 })} B` : "";
    families.get(family).append(el("option", { value: m.name, textContent: `${m.name}${params}`, "data-aliases": [m.hf_id, ...(m.aliases || [])].join(" ") }));
  }
  select.append(...families.values());
  select.value = models.some((m) => m.name === page.defaultModel) ? page.defaultModel : models[0]?.name;

  for (const option of schema.workload) page.options[option.name] = option;
  for (const [group, names] of Object.entries(GROUPS)) {
    const box = $(`#group-${group}`);
    for (const name of names) if (page.options[name]) box.append(control(page.options[name]));
  }
  for (const option of schema.commands.estimate || []) {
    if (["json", "plot"].includes(option.name)) continue;  // CLI output switches, not options of the answer
    page.options[option.name] = option;
    page.extras.push(option.name);
    const group = Object.keys(EXTRA_GROUPS).find((g) => EXTRA_GROUPS[g].includes(option.name)) || "extra";
    $(`#group-${group}`).append(control(option));
  }
  for (const heading of document.querySelectorAll("details h3[data-group]")) {
    heading.hidden = !$(`#group-${heading.dataset.group}`).children.length;
  }
  $("#multi").hidden = !$("#group-parallel").children.length;
  for (const option of schema.commands.plan || []) {
    if (page.options[option.name]) continue;  // the page's own controls (an image's resolution, pipeline) apply
    const initial = option.kind === "choice" && option.default === null ? option.choices[0] : option.default;
    $("#plan-options").append(control({ ...option, default: initial }, "plan-"));
  }
  for (const g of gpus) $("#fit-gpu").append(el("option", { value: g.name, textContent: g.display_name || g.name }));
  $("#fit-gpu").value = "rtx-4090";
  for (const g of gpus) $("#serve-gpu").append(el("option", { value: g.name, textContent: g.display_name || g.name }));
  $("#serve-gpu").value = gpus.some((g) => g.name === "h100-sxm") ? "h100-sxm" : gpus[0]?.name;
  for (const option of (schema.commands.fit || []).filter((o) => SERVE_KEYS.includes(o.name))) {
    const choices = SERVE_CHOICES[option.name] ? option.choices.filter((c) => SERVE_CHOICES[option.name].includes(c)) : option.choices;
    const initial = option.name === "engine" ? "vllm" : option.default;
    $("#serve-options").append(control({ ...option, choices, default: initial }, "serve-"));
  }

  loadUrl();
  if (EXTRA_GROUPS.parallel.some((k) => new URLSearchParams(location.search).has(k))) $("#multi").open = true;
  if (["resolution", "pipeline", ...GROUPS.advanced, ...GROUPS.adapters].some((k) => new URLSearchParams(location.search).has(k))) $("#more").open = true;
  for (const wrap of document.querySelectorAll(".field")) if (wrap.sayHelp) wrap.sayHelp();
  renderChips();
  refreshVisibility();

  $("#form").addEventListener("input", (e) => {
    if (e.target.id === "config-text") readConfig(e.target.value, null);
    else if (e.target.id !== "config-file") schedule();
  });
  $("#form").addEventListener("change", (e) => { if (e.target.type === "radio" || e.target.tagName === "SELECT") schedule(); });
  $("#form").addEventListener("submit", (e) => e.preventDefault());
  $("#config-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    if (file.size > 1 << 20) {
      page.config = null;
      clearResults();
      showError(`${file.name} is over 1 MiB; a config.json is a few KiB`);
      return;
    }
    const text = await file.text();
    $("#config-text").value = text;
    readConfig(text, file.name);
  });
  for (const radio of document.querySelectorAll('input[name="gpu_class"]')) {
    radio.addEventListener("change", () => { page.gpuClass = radio.value; schedule(); });
  }
  $("#parallel-gpus").addEventListener("input", schedule);
  $("#fit-gpu").addEventListener("change", schedule);
  $("#serve-options").addEventListener("change", schedule);
  $("#plan-options").addEventListener("change", schedule);
  $("#reset").addEventListener("click", () => { history.replaceState(null, "", location.pathname); location.reload(); });
  $("#copy-link").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(location.href); $("#copy-link").textContent = "link copied"; } catch { /* no clipboard: the address bar has it */ }
  });
  await update();
}

document.addEventListener("DOMContentLoaded", () => {
  main().catch((err) => { showError(`the page could not start: ${err.message}`); $("#results").dataset.state = "error"; });
});
