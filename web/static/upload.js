// Drag-and-drop and a preview for the upload form. Without JavaScript the plain file input works.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector("[data-upload]");
  if (!form) return;
  const input = form.querySelector("input[type=file]");
  const zone = form.querySelector("[data-drop]");
  const preview = form.querySelector("[data-preview]");
  const hint = form.querySelector("[data-hint]");
  const submit = form.querySelector("[data-submit]");
  const maxBytes = Number(input.dataset.maxBytes) || Infinity;
  const defaultHint = hint.textContent;
  let previewUrl = null;

  function show(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    preview.hidden = true;
    zone.classList.remove("has-file", "too-big");
    hint.textContent = defaultHint;
    if (!file) return;
    const size = file.size < 1048576 ? `${Math.ceil(file.size / 1024)} KB` : `${(file.size / 1048576).toFixed(1)} MB`;
    if (file.size > maxBytes) {
      // Caught here to save the upload; the server refuses it too (413).
      zone.classList.add("too-big");
      hint.textContent = `${file.name} is ${size}: too large. ${defaultHint}`;
      return;
    }
    zone.classList.add("has-file");
    hint.textContent = `${file.name} · ${size}`;
    if (file.type.startsWith("image/")) {
      previewUrl = URL.createObjectURL(file);
      preview.src = previewUrl;
      preview.hidden = false;
    }
  }

  // A file named .jpg that is not one: no broken-image icon, the server explains (400).
  preview.addEventListener("error", () => { preview.hidden = true; });

  input.addEventListener("change", () => show(input.files[0]));

  ["dragenter", "dragover"].forEach((type) =>
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    }));
  ["dragleave", "dragend", "drop"].forEach((type) =>
    zone.addEventListener(type, () => zone.classList.remove("dragging")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer && event.dataTransfer.files;
    if (!files || !files.length) return;
    input.files = files;
    show(input.files[0]);
  });
  // A file dropped next to the zone would make the browser leave the page to open it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  form.addEventListener("submit", (event) => {
    const file = input.files[0];
    if (file && file.size > maxBytes) {
      event.preventDefault();
      return;
    }
    submit.disabled = true;
    submit.textContent = "Classifying…";
  });
  // Coming back with the browser's Back button must not leave the button disabled.
  window.addEventListener("pageshow", () => {
    submit.disabled = false;
    submit.textContent = "Classify";
  });
});
