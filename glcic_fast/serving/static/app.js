// The object-removal page: paint a mask over a photo, POST both to v1/complete, compare
// and download the answer. Plain JavaScript, no build step and no external resources, so
// that the page works offline from the package alone.
"use strict";

const $ = (id) => document.getElementById(id);
const photoCanvas = $("photo"), maskCanvas = $("mask"), stage = $("stage"), cursor = $("cursor");
const mask = maskCanvas.getContext("2d");
const sizeInput = $("size"), removeButton = $("remove");

// The mask is kept as the list of what was drawn (not as pixels) so that undo is a
// redraw without one operation, and costs no copy of a full-resolution canvas.
let ops = [];
let current = null;       // the stroke or rectangle being drawn
let photoFile = null;     // sent as it is: the service decodes the original, not a re-encoding
let photoURL = null, resultURL = null;
let busy = false;
const keyboardBrush = { x: 0, y: 0, anchor: null };  // in the photo's pixels

const tool = () => document.querySelector('input[name="tool"]:checked').value;
const painted = () => ops.length > 0 && ops[ops.length - 1].tool !== "clear";

// Screen pixels -> photo pixels: the canvases hold the photo's full resolution and are
// shown scaled to fit, so the brush keeps its on-screen size whatever the zoom.
function scale() {
  return maskCanvas.width / maskCanvas.getBoundingClientRect().width;
}

function toPhoto(event) {
  const r = maskCanvas.getBoundingClientRect(), s = scale();
  return [(event.clientX - r.left) * s, (event.clientY - r.top) * s];
}

function draw(op) {
  mask.save();
  mask.globalCompositeOperation = op.tool === "eraser" ? "destination-out" : "source-over";
  mask.fillStyle = mask.strokeStyle = "rgb(255, 40, 80)";
  if (op.tool === "clear") {
    mask.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  } else if (op.tool === "rect") {
    const [x0, y0] = op.points[0], [x1, y1] = op.points[op.points.length - 1];
    mask.fillRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
  } else {
    mask.lineWidth = op.size;
    mask.lineCap = mask.lineJoin = "round";
    mask.beginPath();
    mask.arc(op.points[0][0], op.points[0][1], op.size / 2, 0, 2 * Math.PI);
    mask.fill();  // a click without a move still paints a dot
    mask.beginPath();
    mask.moveTo(...op.points[0]);
    for (const p of op.points) mask.lineTo(...p);
    mask.stroke();
  }
  mask.restore();
}

function redraw() {
  mask.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  for (const op of ops) draw(op);
  if (current) draw(current);
  updateButtons();
}

function updateButtons() {
  $("undo").disabled = busy || ops.length === 0;
  $("clear").disabled = busy || !painted();
  removeButton.disabled = busy || !photoFile || !painted();
}

function commit(op) {
  ops.push(op);
  current = null;
  redraw();
}

function undo() {
  if (busy || ops.length === 0) return;
  ops.pop();
  redraw();
  say("Undone.");
}

function say(text) {
  $("status").textContent = text;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

// -- opening a photo ---------------------------------------------------------------

// The service completes a file's pixels as stored, as glcic-fast complete does: a JPEG's
// EXIF orientation (a phone photo's "turn me") is applied to neither the image nor its
// mask. So the photo is drawn as stored too, and the mask painted on it lands on the
// pixels the user saw under the brush; drawn turned, a stroke would land elsewhere in the
// file. Browsers apply the orientation when they decode (Chromium also for
// createImageBitmap's imageOrientation "none"), so the page reads the tag and turns the
// decoded photo back.

// The EXIF orientation of a JPEG, 1 to 8 (1: none, or not a JPEG).
async function exifOrientation(file) {
  const view = new DataView(await file.slice(0, 256 * 1024).arrayBuffer());
  if (view.byteLength < 4 || view.getUint16(0) !== 0xFFD8) return 1;
  for (let at = 2; at + 4 <= view.byteLength; at += 2 + view.getUint16(at + 2)) {
    const marker = view.getUint16(at);
    if ((marker & 0xFF00) !== 0xFF00 || marker === 0xFFDA) return 1;  // the image data: no EXIF before it
    if (marker === 0xFFE1 && at + 10 <= view.byteLength && view.getUint32(at + 4) === 0x45786966) {  // "Exif"
      return tiffOrientation(view, at + 10, Math.min(view.byteLength, at + 2 + view.getUint16(at + 2)));
    }
  }
  return 1;
}

function tiffOrientation(view, tiff, end) {
  if (tiff + 8 > end) return 1;
  const little = view.getUint16(tiff) === 0x4949;  // "II"; "MM" is big-endian
  const ifd = tiff + view.getUint32(tiff + 4, little);
  if (ifd + 2 > end) return 1;
  for (let i = 0, count = view.getUint16(ifd, little); i < count; i++) {
    const entry = ifd + 2 + 12 * i;
    if (entry + 12 > end) return 1;
    if (view.getUint16(entry, little) === 0x0112) {
      const value = view.getUint16(entry + 8, little);
      return value >= 1 && value <= 8 ? value : 1;
    }
  }
  return 1;
}

// Per EXIF orientation, the canvas transform [a, b, c, d, e, f] that takes the photo as
// shown back to its pixels as stored (w x h): the inverse of the tag's flip or turn.
const SHOWN_TO_STORED = {
  1: () => [1, 0, 0, 1, 0, 0],
  2: (w) => [-1, 0, 0, 1, w, 0],          // mirrored
  3: (w, h) => [-1, 0, 0, -1, w, h],      // turned 180 degrees
  4: (w, h) => [1, 0, 0, -1, 0, h],       // flipped
  5: () => [0, 1, 1, 0, 0, 0],            // transposed
  6: (w, h) => [0, -1, 1, 0, 0, h],       // turned 90 degrees clockwise
  7: (w, h) => [0, -1, -1, 0, w, h],      // transversed
  8: (w) => [0, 1, -1, 0, w, 0],          // turned 90 degrees counter-clockwise
};

async function openPhoto(file) {
  if (!file || busy) return;
  showError("");
  let shown, orientation;
  try {
    [shown, orientation] = await Promise.all([createImageBitmap(file), exifOrientation(file)]);
  } catch {
    showError(`This browser cannot show ${file.name}, so it cannot be painted on here ` +
              "(the service reads more formats than browsers do: use glcic-fast complete for those).");
    return;
  }
  const turned = orientation > 1;
  const sideways = orientation >= 5;
  photoFile = file;
  for (const canvas of [photoCanvas, maskCanvas]) {
    canvas.width = sideways ? shown.height : shown.width;
    canvas.height = sideways ? shown.width : shown.height;
  }
  const g = photoCanvas.getContext("2d");
  g.imageSmoothingEnabled = false;  // whole-pixel moves only: the file's pixels, unresampled
  g.setTransform(...SHOWN_TO_STORED[orientation](photoCanvas.width, photoCanvas.height));
  g.drawImage(shown, 0, 0);
  g.setTransform(1, 0, 0, 1, 0, 0);
  shown.close();
  ops = [];
  current = null;
  keyboardBrush.x = photoCanvas.width / 2;
  keyboardBrush.y = photoCanvas.height / 2;
  stage.classList.remove("empty");
  $("result-section").hidden = true;
  // "Before" in the comparison must match the result, which is as stored: the file itself,
  // or, where the browser would show it turned, the photo as drawn here.
  const url = turned ? URL.createObjectURL(await new Promise((done) => photoCanvas.toBlob(done, "image/png")))
                     : URL.createObjectURL(file);
  if (photoURL) URL.revokeObjectURL(photoURL);
  photoURL = url;
  $("before").src = url;
  redraw();
  const note = turned ? " Its EXIF orientation says to show it turned: it is shown, and completed, as its " +
                        "pixels are stored, as the service reads it." : "";
  say(`${file.name}: ${photoCanvas.width} × ${photoCanvas.height}. Paint over what should be removed.${note}`);
}

$("file").addEventListener("change", (e) => openPhoto(e.target.files[0]));
// The whole page takes a drop: a missed drop target would make the browser navigate to the file.
document.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragging"); });
document.addEventListener("dragleave", () => stage.classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  stage.classList.remove("dragging");
  openPhoto(e.dataTransfer.files[0]);
});

// -- painting with a pointer ---------------------------------------------------------

maskCanvas.addEventListener("pointerdown", (e) => {
  if (!photoFile || busy || e.button !== 0) return;
  maskCanvas.setPointerCapture(e.pointerId);  // the stroke goes on when the pointer leaves the photo
  current = { tool: tool(), size: Number(sizeInput.value) * scale(), points: [toPhoto(e)] };
  redraw();
});
maskCanvas.addEventListener("pointermove", (e) => {
  if (!current) return;
  const p = toPhoto(e);
  if (current.tool === "rect") current.points[1] = p;
  else current.points.push(p);
  redraw();
});
maskCanvas.addEventListener("pointerup", () => current && commit(current));
maskCanvas.addEventListener("pointercancel", () => { current = null; redraw(); });

// -- painting with the keyboard: arrows move a brush cursor, Space paints ---------------

function placeCursor() {
  const s = scale(), d = Number(sizeInput.value);
  Object.assign(cursor.style, { width: `${d}px`, height: `${d}px`,
    left: `${keyboardBrush.x / s - d / 2}px`, top: `${keyboardBrush.y / s - d / 2}px` });
}

maskCanvas.addEventListener("focus", () => { if (photoFile) { cursor.hidden = false; placeCursor(); } });
maskCanvas.addEventListener("blur", () => { cursor.hidden = true; });
maskCanvas.addEventListener("keydown", (e) => {
  if (!photoFile || busy) return;
  const step = (e.shiftKey ? 32 : 8) * scale();
  const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
  if (moves[e.key]) {
    keyboardBrush.x = Math.min(Math.max(keyboardBrush.x + moves[e.key][0], 0), maskCanvas.width);
    keyboardBrush.y = Math.min(Math.max(keyboardBrush.y + moves[e.key][1], 0), maskCanvas.height);
    placeCursor();
  } else if (e.key === " ") {
    const p = [keyboardBrush.x, keyboardBrush.y];
    if (tool() !== "rect") {
      commit({ tool: tool(), size: Number(sizeInput.value) * scale(), points: [p] });
    } else if (!keyboardBrush.anchor) {  // a rectangle takes two presses: one corner, then the other
      keyboardBrush.anchor = p;
      say("First corner set: move to the opposite corner and press Space.");
    } else {
      commit({ tool: "rect", points: [keyboardBrush.anchor, p] });
      keyboardBrush.anchor = null;
    }
  } else {
    return;
  }
  e.preventDefault();  // arrows and Space would scroll the page
});

// -- controls and shortcuts ------------------------------------------------------------

sizeInput.addEventListener("input", () => { $("size-value").textContent = sizeInput.value; placeCursor(); });
$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", () => { commit({ tool: "clear" }); say("Mask cleared (Undo brings it back)."); });
removeButton.addEventListener("click", removeObject);
$("split").addEventListener("input", (e) => {
  document.querySelector(".compare").style.setProperty("--split", `${e.target.value}%`);
});

document.addEventListener("keydown", (e) => {
  const ctrl = e.ctrlKey || e.metaKey;
  if (ctrl && e.key.toLowerCase() === "z") {
    e.preventDefault();
    undo();
  } else if (ctrl && e.key === "Enter") {
    e.preventDefault();
    if (!removeButton.disabled) removeObject();
  } else if (!ctrl && !e.altKey) {
    const tools = { b: "brush", e: "eraser", r: "rect" };
    if (tools[e.key]) {
      document.querySelector(`input[name="tool"][value="${tools[e.key]}"]`).checked = true;
      say(`Tool: ${tools[e.key] === "rect" ? "rectangle" : tools[e.key]}.`);
    } else if (e.key === "[" || e.key === "]") {
      sizeInput.value = Number(sizeInput.value) + (e.key === "]" ? 4 : -4);
      sizeInput.dispatchEvent(new Event("input"));
    }
  }
});

// -- removing --------------------------------------------------------------------------

// The service's mask: white = fill, black = keep, at the photo's full resolution.
function maskPNG() {
  const out = document.createElement("canvas");
  out.width = maskCanvas.width;
  out.height = maskCanvas.height;
  const c = out.getContext("2d");
  c.drawImage(maskCanvas, 0, 0);
  c.globalCompositeOperation = "source-in";       // every painted pixel turns white...
  c.fillStyle = "#fff";
  c.fillRect(0, 0, out.width, out.height);
  c.globalCompositeOperation = "destination-over";  // ...over black
  c.fillStyle = "#000";
  c.fillRect(0, 0, out.width, out.height);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// What each refusal means for the person at the page; the service's own words follow.
function explain(status, retryAfter) {
  if (status === 400) return "The service could not use this photo or mask.";
  if (status === 413) return "Too large for this service: try a smaller photo.";
  if (status === 503) return `The service is busy or not ready yet: try again in ${retryAfter || "a few"} s.`;
  if (status >= 500) return "The service failed on this photo (its log has the details).";
  return `The service refused the request (HTTP ${status}).`;
}

function setBusy(on) {
  busy = on;
  stage.classList.toggle("busy", on);
  stage.setAttribute("aria-busy", String(on));
  updateButtons();
}

async function removeObject() {
  if (busy || !photoFile || !painted()) return;
  showError("");
  setBusy(true);
  say("Removing… the service is filling the painted area.");
  try {
    const form = new FormData();
    form.append("image", photoFile, photoFile.name);
    form.append("mask", await maskPNG(), "mask.png");
    form.append("postprocess", $("postprocess").checked ? "true" : "false");
    let response;
    try {
      response = await fetch("v1/complete", { method: "POST", body: form });
    } catch {
      throw new Error("Could not reach the service: is glcic-fast serve still running?");
    }
    if (!response.ok) {
      const text = await response.text();
      let said = text;
      try { said = JSON.parse(text).error || text; } catch { /* not JSON: shown as it came */ }
      throw new Error(`${explain(response.status, response.headers.get("Retry-After"))} ` +
                      `The service said: ${said}`);
    }
    const blob = await response.blob();
    if (resultURL) URL.revokeObjectURL(resultURL);
    resultURL = URL.createObjectURL(blob);
    const result = $("result");
    result.src = resultURL;
    await result.decode();
    $("download").href = resultURL;
    $("download").download = photoFile.name.replace(/\.[^.]*$/, "") + "-removed.png";
    $("result-section").hidden = false;
    say(`Done: ${result.naturalWidth} × ${result.naturalHeight}. Drag the slider to compare; download keeps full resolution.`);
  } catch (error) {
    showError(error.message);
    say("Nothing was removed.");
  } finally {
    setBusy(false);
  }
}
