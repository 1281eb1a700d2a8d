// A line chart drawn as inline SVG: one polyline and one dot per point for each series, axes with ticks,
// a legend. Enough for per-round metrics; no library, nothing fetched.
const NS = "http://www.w3.org/2000/svg";
export const PALETTE = ["#2458c6", "#d1495b", "#00916e", "#edae49", "#7b4fa0", "#3d8fb8", "#8c564b", "#e377c2"];

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function ticks(lo, hi, count) {
  if (hi === lo) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toFixed(10)));
  return out;
}

function fmt(v) {
  return Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(Math.abs(v) < 1 ? 2 : 1);
}

/**
 * series: [{name, points: [[x, y], ...], color?}]; returns an <svg> element.
 * Points with a null y are skipped. The y range fits the data (padded), the x range the rounds.
 */
export function lineChart({ title, series, xLabel = "round", yLabel = "", width = 560, height = 280 }) {
  const m = { top: 28, right: 14, bottom: 62, left: 52 };
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title, class: "linechart" });
  svg.append(el("text", { x: m.left, y: 17, class: "title" }, title));
  const clean = series
    .map((s, i) => ({ ...s, color: s.color || PALETTE[i % PALETTE.length],
                      points: s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)) }))
    .filter((s) => s.points.length > 0);
  const all = clean.flatMap((s) => s.points);
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  if (all.length === 0) {
    svg.append(el("text", { x: m.left + plotW / 2, y: m.top + plotH / 2, "text-anchor": "middle" }, "no data yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  const pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.1 || 0.1;
  [y0, y1] = [y0 - pad, y1 + pad];
  const sx = (x) => m.left + ((x - x0) / (x1 - x0)) * plotW;
  const sy = (y) => m.top + plotH - ((y - y0) / (y1 - y0)) * plotH;

  for (const t of ticks(y0, y1, 5)) {
    svg.append(el("line", { x1: m.left, x2: m.left + plotW, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.append(el("text", { x: m.left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  for (const t of ticks(x0, x1, 8).filter(Number.isInteger)) {
    svg.append(el("text", { x: sx(t), y: m.top + plotH + 15, "text-anchor": "middle" }, fmt(t)));
  }
  svg.append(el("line", { x1: m.left, x2: m.left, y1: m.top, y2: m.top + plotH, class: "axis" }));
  svg.append(el("line", { x1: m.left, x2: m.left + plotW, y1: m.top + plotH, y2: m.top + plotH, class: "axis" }));
  svg.append(el("text", { x: m.left + plotW / 2, y: m.top + plotH + 30, "text-anchor": "middle" }, xLabel));
  if (yLabel) {
    svg.append(el("text", { x: 12, y: m.top + plotH / 2, "text-anchor": "middle",
                            transform: `rotate(-90 12 ${m.top + plotH / 2})` }, yLabel));
  }

  clean.forEach((s) => {
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    const g = el("g", { class: "series", "data-series": s.name });
    g.append(el("polyline", { class: "line", stroke: s.color,
                              points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") }));
    for (const [x, y] of pts) {
      const dot = el("circle", { class: "pt", cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.6, fill: s.color });
      dot.append(el("title", {}, `${s.name} · ${xLabel} ${x}: ${y.toFixed(4)}`));
      g.append(dot);
    }
    svg.append(g);
  });

  let lx = m.left;
  const ly = height - 12;
  for (const s of clean) {
    svg.append(el("rect", { x: lx, y: ly - 8, width: 10, height: 10, fill: s.color }));
    svg.append(el("text", { x: lx + 14, y: ly + 1 }, s.name));
    lx += 24 + 7 * s.name.length;
  }
  return svg;
}
