// The upload page: pick or drop a picture -> POST /predict (multipart) -> the top 5 as bars. No build step.
const $ = (id) => document.getElementById(id);
const drop = $("drop"), input = $("file"), preview = $("preview"), status = $("status"), results = $("results");

fetch("/info").then((r) => r.json()).then((info) => {
  $("model").textContent = `${info.model}: ${info.classes.length} categories (${info.classes.slice(0, 6).join(", ")}${info.classes.length > 6 ? ", ..." : ""})`;
}).catch(() => { $("model").textContent = "the model's details could not be loaded"; });

input.addEventListener("change", () => { if (input.files.length) classify(input.files[0]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});

async function classify(file) {
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("hint").textContent = file.name;
  results.replaceChildren();
  show("Classifying\u2026", false);
  const form = new FormData();
  form.append("file", file);
  try {
    const response = await fetch("/predict?k=5", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) { show(body.detail || `error ${response.status}`, true); return; }
    show("", false);
    render(body.top);
  } catch (error) {
    show(`the server could not be reached: ${error}`, true);
  }
}

function show(text, isError) {
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function render(top) {
  results.replaceChildren(...top.map((entry) => {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(entry.prob * 100).toFixed(1)}%`;
    bar.append(fill);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(entry.prob * 100).toFixed(1)}%`;
    li.append(label, bar, prob);
    return li;
  }));
}
