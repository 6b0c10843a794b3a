// Small SVG line charts for training curves (no dependencies; text set with textContent only).

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 320;
const HEIGHT = 160;
const PAD = { left: 44, right: 10, top: 10, bottom: 24 };

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (parent) parent.appendChild(node);
  return node;
}

/** Format a number for an axis or a summary. */
export function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (!Number.isFinite(value)) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
  return Number(value.toFixed(digits)).toString();
}

function extent(series, fixed) {
  let lo = Infinity;
  let hi = -Infinity;
  let minX = Infinity;
  let maxX = -Infinity;
  for (const s of series) {
    for (const p of s.points) {
      lo = Math.min(lo, p.y);
      hi = Math.max(hi, p.y);
      minX = Math.min(minX, p.x);
      maxX = Math.max(maxX, p.x);
    }
  }
  if (fixed) [lo, hi] = [Math.min(lo, fixed[0]), Math.max(hi, fixed[1])];
  if (!Number.isFinite(lo)) [lo, hi] = fixed || [0, 1];
  if (lo === hi) [lo, hi] = [lo - 0.5, hi + 0.5];
  if (!Number.isFinite(minX)) [minX, maxX] = [0, 1];
  if (minX === maxX) [minX, maxX] = [minX - 1, maxX + 1];
  return { lo, hi, minX, maxX };
}

/**
 * Draw a line chart into a <figure>.
 * series: [{label, className, points: [{x, y}]}]; options: {title, yRange: [lo, hi], zeroLine}.
 */
export function drawChart(figure, series, { title, yRange = null, zeroLine = false } = {}) {
  figure.replaceChildren();
  const { lo, hi, minX, maxX } = extent(series, yRange);
  const x = (v) => PAD.left + ((v - minX) / (maxX - minX)) * (WIDTH - PAD.left - PAD.right);
  const y = (v) => PAD.top + (1 - (v - lo) / (hi - lo)) * (HEIGHT - PAD.top - PAD.bottom);
  const latest = series
    .filter((s) => s.points.length)
    .map((s) => `${s.label} ${fmt(s.points[s.points.length - 1].y)}`)
    .join(", ");
  const summary = latest ? `latest ${latest}` : "no data yet";
  const svg = el("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": `${title}: ${summary}`,
    preserveAspectRatio: "none",
  });
  const hasData = series.some((s) => s.points.length);
  drawAxes(svg, { lo, hi, minX, maxX, y, zeroLine, hasData });
  for (const s of series) {
    if (!s.points.length) continue;
    const points = s.points.map((p) => `${x(p.x).toFixed(1)},${y(p.y).toFixed(1)}`).join(" ");
    el("polyline", { points, class: `line ${s.className || ""}` }, svg);
    const last = s.points[s.points.length - 1];
    el("circle", { cx: x(last.x), cy: y(last.y), r: 2.5, class: `dot ${s.className || ""}` }, svg);
  }
  const caption = document.createElement("figcaption");
  const name = document.createElement("strong");
  name.textContent = title;
  const detail = document.createElement("span");
  detail.className = "chart-latest";
  detail.textContent = ` ${summary}`;
  caption.append(name, detail);
  figure.append(caption, svg);
}

function drawAxes(svg, { lo, hi, minX, maxX, y, zeroLine, hasData }) {
  el("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: HEIGHT - PAD.bottom, class: "axis" }, svg);
  el(
    "line",
    { x1: PAD.left, y1: HEIGHT - PAD.bottom, x2: WIDTH - PAD.right, y2: HEIGHT - PAD.bottom, class: "axis" },
    svg,
  );
  for (const v of [lo, (lo + hi) / 2, hi]) {
    el("line", { x1: PAD.left, y1: y(v), x2: WIDTH - PAD.right, y2: y(v), class: "grid" }, svg);
    const label = el("text", { x: PAD.left - 4, y: y(v) + 3, class: "tick", "text-anchor": "end" }, svg);
    label.textContent = fmt(v, 2);
  }
  if (zeroLine && lo < 0 && hi > 0) {
    el("line", { x1: PAD.left, y1: y(0), x2: WIDTH - PAD.right, y2: y(0), class: "zero" }, svg);
  }
  if (!hasData) return;
  const last = el("text", { x: WIDTH - PAD.right, y: HEIGHT - 6, class: "tick", "text-anchor": "end" }, svg);
  last.textContent = `step ${maxX}`;
  const first = el("text", { x: PAD.left, y: HEIGHT - 6, class: "tick" }, svg);
  first.textContent = `step ${minX}`;
}
