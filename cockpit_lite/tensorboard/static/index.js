// The Cockpit tab of TensorBoard: an ES module that TensorBoard loads in an iframe and calls
// render() on. It reads the plugin's JSON routes (relative to <base href="plugin/cockpit_lite/">)
// and draws every panel with plain SVG and Canvas: no libraries, no CDN, no build step.
// Security: data (run names, keys, reasons) only ever reaches the page through textContent and
// attribute setters, never parsed as HTML.

const REFRESH_MS = 5000;
const SVG_NS = 'http://www.w3.org/2000/svg';
const COLORS = ['#1a73e8', '#e8710a', '#188038', '#d93025', '#9334e6', '#12b5cb', '#5f6368'];

const STYLE = `
  :root { font-family: Roboto, 'Helvetica Neue', Arial, sans-serif; color: #202124; }
  body { margin: 0; background: #f5f6f7; }
  header { display: flex; align-items: center; gap: 16px; padding: 10px 16px; background: #fff;
           border-bottom: 1px solid #dadce0; position: sticky; top: 0; z-index: 1; }
  header h1 { font-size: 17px; font-weight: 500; margin: 0; }
  header select { font-size: 13px; padding: 3px 6px; max-width: 420px; }
  header .status { color: #5f6368; font-size: 12px; margin-left: auto; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 12px; padding: 12px 16px; align-items: start; }
  .chart-title { font-size: 11px; color: #3c4043; margin: 6px 0 0; }
  .panel { background: #fff; border: 1px solid #dadce0; border-radius: 6px; padding: 10px 12px 8px; min-height: 120px; }
  .panel h2 { font-size: 14px; font-weight: 500; margin: 0 0 2px; }
  .panel .sub { font-size: 11px; color: #5f6368; margin: 0 0 6px; min-height: 13px; }
  .panel .empty { color: #80868b; font-size: 13px; font-style: italic; padding: 36px 0; text-align: center; }
  .panel .note { font-size: 12px; color: #3c4043; margin: 6px 0 0; }
  .legend { display: flex; flex-wrap: wrap; gap: 10px; font-size: 11px; color: #3c4043; margin-top: 2px; }
  .legend span::before { content: ''; display: inline-block; width: 10px; height: 3px; margin: 0 4px 3px 0;
                         background: var(--c); vertical-align: middle; }
  .badge { display: inline-block; border-radius: 9px; padding: 1px 8px; font-size: 11px; margin: 2px 4px 2px 0; }
  .badge.measured { background: #e6f4ea; color: #137333; }
  .badge.estimated { background: #fef7e0; color: #b06000; }
  .badge.unavailable { background: #fce8e6; color: #c5221f; }
  table { border-collapse: collapse; width: 100%; font-size: 12px; }
  td, th { text-align: left; padding: 2px 6px; border-bottom: 1px solid #f1f3f4; vertical-align: top; }
  th { color: #5f6368; font-weight: 500; }
  .wide { grid-column: 1 / -1; }
  svg text { font-size: 10px; fill: #5f6368; }
  .message { padding: 40px; color: #5f6368; font-size: 14px; }
`;

// ---------------------------------------------------------------------------------------------
// small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'text') node.textContent = v;
    else if (k === 'class') node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.appendChild(c);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function num(v) {
  if (typeof v === 'number') return v;
  if (v === 'Infinity') return Infinity;
  if (v === '-Infinity') return -Infinity;
  return NaN;
}

function fmt(x) {
  if (!Number.isFinite(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return x.toExponential(2);
  return Number(x.toPrecision(4)).toString();
}

// tick labels with as many significant digits as keep them distinct (no "1 1 1 1" on a near-constant axis)
function tickLabels(ticks) {
  for (let digits = 4; digits <= 12; digits++) {
    const labels = ticks.map((t) => fmtDigits(t, digits));
    if (new Set(labels).size === labels.length) return labels;
  }
  return ticks.map((t) => String(t));
}

function fmtDigits(x, digits) {
  if (!Number.isFinite(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return x.toExponential(Math.max(2, digits - 2));
  return Number(x.toPrecision(digits)).toString();
}

function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
  return ticks;
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: 'same-origin' });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// ---------------------------------------------------------------------------------------------
// charts

const W = 380, M = { l: 48, r: 10, t: 8, b: 24 };

function logTicks(lo, hi) {
  const decades = niceTicks(Math.log10(lo), Math.log10(hi), 4).filter((t) => Number.isInteger(t)).map((t) => Math.pow(10, t));
  if (decades.length >= 2) return decades;
  return niceTicks(lo, hi, 4).filter((t) => t > 0);  // less than two decades: plain values
}

function frame(xlo, xhi, ylo, yhi, { logY = false, xLabel = 'step', H = 180, yTicks = null, yLabel = '' } = {}) {
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, width: '100%', role: 'img' });
  const ty = (y) => (logY ? Math.log10(y) : y);
  const [a, b] = [ty(ylo), ty(yhi)];
  const sx = (x) => M.l + ((x - xlo) / (xhi - xlo || 1)) * (W - M.l - M.r);
  const sy = (y) => H - M.b - ((ty(y) - a) / (b - a || 1)) * (H - M.t - M.b);
  root.appendChild(svg('rect', { x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b, fill: '#fff', stroke: '#e0e0e0' }));
  const xt = niceTicks(xlo, xhi, 5);
  for (const t of xLabel === 'step' ? xt.filter(Number.isInteger) : xt) {  // steps are whole numbers
    root.appendChild(svg('line', { x1: sx(t), x2: sx(t), y1: M.t, y2: H - M.b, stroke: '#f1f3f4' }));
    const label = svg('text', { x: sx(t), y: H - M.b + 13, 'text-anchor': 'middle' });
    label.textContent = fmt(t);
    root.appendChild(label);
  }
  // yTicks: [[position, label]] chosen by the chart (log10 counts labelled with the counts themselves)
  const yt = yTicks || (logY ? logTicks(ylo, yhi) : niceTicks(ylo, yhi, 4)).map((t) => [t, null]);
  const yLabels = yTicks ? yt.map(([, l]) => l) : tickLabels(yt.map(([t]) => t));
  yt.forEach(([t], i) => {
    root.appendChild(svg('line', { x1: M.l, x2: W - M.r, y1: sy(t), y2: sy(t), stroke: '#f1f3f4' }));
    const label = svg('text', { x: M.l - 4, y: sy(t) + 3, 'text-anchor': 'end', class: 'ytick' });
    label.textContent = yLabels[i];
    root.appendChild(label);
  });
  if (yLabel) {
    const yl = svg('text', { x: 2, y: H - 1, 'text-anchor': 'start', class: 'ylabel' });  // below the ticks, off the data
    yl.textContent = yLabel;
    root.appendChild(yl);
  }
  const xl = svg('text', { x: W - M.r, y: H - 2, 'text-anchor': 'end' });
  xl.textContent = xLabel;
  root.appendChild(xl);
  return { root, sx, sy, H };
}

// series: [{name, steps, values (numbers, NaN = gap), color, band: [lo[], hi[]]}]
function lineChart(series, { logY = false, refY = null, xLabel = 'step', H = 180 } = {}) {
  const xs = [], ys = [];
  for (const s of series) {
    s.steps.forEach((x, i) => {
      const y = s.values[i];
      if (Number.isFinite(y) && (!logY || y > 0)) { xs.push(x); ys.push(y); }
    });
  }
  if (!ys.length) return null;
  let [ylo, yhi] = [Math.min(...ys), Math.max(...ys)];
  if (refY !== null && (!logY || refY > 0)) { ylo = Math.min(ylo, refY); yhi = Math.max(yhi, refY); }
  // a constant (to 1e-3) series: an axis from 0, not a zoom into its rounding noise
  if (!logY && yhi - ylo <= 1e-3 * Math.max(Math.abs(ylo), Math.abs(yhi))) {
    const c = (ylo + yhi) / 2;
    if (c > 0) { ylo = 0; yhi = 1.3 * c; } else if (c < 0) { ylo = 1.3 * c; yhi = 0; } else { ylo = -1; yhi = 1; }
  }
  if (ylo === yhi) { const d = logY ? ylo * 0.5 : Math.abs(ylo) * 0.1 || 1; ylo -= d; yhi += d; }
  if (!logY) { const pad = (yhi - ylo) * 0.05; ylo -= pad; yhi += pad; }
  let [xlo, xhi] = [Math.min(...xs), Math.max(...xs)];
  if (xlo === xhi) { xlo -= 1; xhi += 1; }
  const { root, sx, sy } = frame(xlo, xhi, ylo, yhi, { logY, xLabel, H });
  if (refY !== null) {
    root.appendChild(svg('line', { x1: M.l, x2: W - M.r, y1: sy(refY), y2: sy(refY), stroke: '#9aa0a6', 'stroke-dasharray': '4 3' }));
  }
  for (const s of series) {
    let d = '', pen = false, points = 0;
    s.steps.forEach((x, i) => {
      const y = s.values[i];
      if (!Number.isFinite(y) || (logY && y <= 0)) { pen = false; return; }
      d += `${pen ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`;
      pen = true; points += 1;
    });
    if (s.band) {
      const [lo, hi] = s.band;
      let area = '';
      s.steps.forEach((x, i) => { if (Number.isFinite(hi[i])) area += `${area ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(Math.max(hi[i], logY ? 1e-300 : -Infinity)).toFixed(1)}`; });
      for (let i = s.steps.length - 1; i >= 0; i--) if (Number.isFinite(lo[i])) area += `L${sx(s.steps[i]).toFixed(1)},${sy(logY ? Math.max(lo[i], ylo) : lo[i]).toFixed(1)}`;
      if (area) root.appendChild(svg('path', { d: area + 'Z', fill: s.color, 'fill-opacity': 0.15, stroke: 'none' }));
    }
    const path = svg('path', { d: s.dots ? '' : d, fill: 'none', stroke: s.color, 'stroke-width': 1.6, 'stroke-dasharray': s.dash || '', 'data-series': s.name, 'data-points': points });
    root.appendChild(path);
    if (s.dots || points === 1 || s.steps.length <= 30) {
      s.steps.forEach((x, i) => {
        const y = s.values[i];
        if (Number.isFinite(y) && (!logY || y > 0)) root.appendChild(svg('circle', { cx: sx(x), cy: sy(y), r: s.dots ? 3.5 : 2, fill: s.color }));
      });
    }
  }
  return root;
}

function barChart(edges, counts, { logY = true, color = COLORS[0], markers = [] } = {}) {
  const ys = counts.map((c) => (logY ? Math.log10(1 + c) : c));
  const top = Math.max(...ys, 1e-12);
  // log heights: ticks at 1, 10, 100, ... counts, labelled with those counts (not with their logarithms)
  const yTicks = logY ? Array.from({ length: Math.floor(Math.log10(Math.max(...counts, 1))) + 1 }, (_, k) => [Math.log10(1 + 10 ** k), fmt(10 ** k)]) : null;
  const { root, sx, H } = frame(edges[0], edges[edges.length - 1], 0, top, { xLabel: '', yTicks, yLabel: logY ? 'y: count (log scale)' : 'y: count', H: 190 });
  const y0 = H - M.b, h = H - M.t - M.b;
  counts.forEach((c, i) => {
    const x0 = sx(edges[i]), x1 = sx(edges[i + 1]);
    const bh = (ys[i] / top) * h;
    if (c > 0) root.appendChild(svg('rect', { x: x0, y: y0 - bh, width: Math.max(x1 - x0 - 0.5, 0.5), height: bh, fill: color, 'data-count': c }));
  });
  for (const m of markers) {
    if (m.x >= edges[0] && m.x <= edges[edges.length - 1]) {
      root.appendChild(svg('line', { x1: sx(m.x), x2: sx(m.x), y1: M.t, y2: y0, stroke: m.color, 'stroke-width': 1.5, 'stroke-dasharray': m.dash || '' }));
    }
  }
  return root;
}

function heatmap(xEdges, yEdges, counts) {
  const wrap = el('div');
  const canvas = el('canvas', { width: 380, height: 180 });
  canvas.style.width = '100%';
  const ctx = canvas.getContext('2d');
  const ny = counts.length, nx = ny ? counts[0].length : 0;
  let top = 0;
  for (const row of counts) for (const c of row) top = Math.max(top, c);
  const left = 44, bottom = 22, pw = canvas.width - left - 8, ph = canvas.height - bottom - 6;
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  // counts[i][j]: i indexes x bins, j indexes y bins (as numpy.histogram2d returns them)
  for (let i = 0; i < ny; i++) {
    for (let j = 0; j < nx; j++) {
      const c = counts[i][j];
      if (!c) continue;
      const v = Math.log1p(c) / Math.log1p(top || 1);
      ctx.fillStyle = `rgba(26, 115, 232, ${0.08 + 0.92 * v})`;
      ctx.fillRect(left + (i / ny) * pw, 6 + ph - ((j + 1) / nx) * ph, pw / ny + 0.5, ph / nx + 0.5);
    }
  }
  ctx.strokeStyle = '#e0e0e0';
  ctx.strokeRect(left, 6, pw, ph);
  ctx.fillStyle = '#5f6368';
  ctx.font = '10px sans-serif';
  ctx.textAlign = 'center';
  ctx.textAlign = 'left';
  ctx.fillText(fmt(xEdges[0]), left, canvas.height - 8);
  ctx.textAlign = 'right';
  ctx.fillText(fmt(xEdges[xEdges.length - 1]), left + pw, canvas.height - 8);
  ctx.textAlign = 'right';
  ctx.fillText(fmt(yEdges[yEdges.length - 1]), left - 3, 14);
  ctx.fillText(fmt(yEdges[0]), left - 3, 6 + ph);
  wrap.appendChild(canvas);
  return wrap;
}

// ---------------------------------------------------------------------------------------------
// panels

function series(run, key, color, name = key) {
  const s = run.scalars[key];
  if (!s) return null;
  return { name, steps: s.steps, values: s.values.map(num), color };
}

function nanNote(run, keys) {
  const lines = [];
  for (const o of run.overflow || []) {
    for (const key of keys) if (o.values && key in o.values) lines.push(`${key} at step ${o.step} is ${o.values[key]}: finite, beyond float32 (drawn as inf, left off the axis)`);
  }
  for (const key of keys) {
    const s = run.scalars[key];
    if (!s) continue;
    const over = new Set((run.overflow || []).filter((o) => o.values && key in o.values).map((o) => o.step));
    const nans = s.values.map(num).filter((v, i) => !Number.isFinite(v) && !over.has(s.steps[i])).length;
    if (nans) {
      const why = (run.reasons[key.split('/')[0]] || []).slice(-1)[0];
      const reason = why ? why.reasons[key] : null;
      lines.push(`${key}: ${nans} of ${s.values.length} steps not finite${reason ? ` (step ${why.step}: ${reason})` : ''}`);
    }
  }
  return lines.length ? el('p', { class: 'note', text: lines.join(' · ') }) : null;
}

function legend(list) {
  const box = el('div', { class: 'legend' });
  for (const s of list) {
    const item = el('span', { text: s.name });
    item.style.setProperty('--c', s.color);
    box.appendChild(item);
  }
  return box;
}

function panel(id, title, sub, body, { wide = false, emptyText } = {}) {
  const node = el('section', { class: `panel${wide ? ' wide' : ''}`, 'data-panel': id });
  node.appendChild(el('h2', { text: title }));
  node.appendChild(el('p', { class: 'sub', text: sub || '' }));
  if (body && body.length) {
    node.dataset.state = 'data';
    for (const part of body) if (part) node.appendChild(part);
  } else {
    node.dataset.state = 'empty';
    node.appendChild(el('p', { class: 'empty', text: emptyText || 'No data for this run.' }));
  }
  return node;
}

function linesPanel(run, id, title, sub, keys, opts = {}) {
  const list = keys.map((k, i) => series(run, k, COLORS[i % COLORS.length])).filter(Boolean);
  if (run.overlay) {  // a second run on the same axes: its series dashed, named with the run
    for (const s of list) s.name = `${run.run}: ${s.name}`;
    keys.forEach((k, i) => {
      const o = series(run.overlay, k, COLORS[i % COLORS.length], `${run.overlay.run}: ${k}`);
      if (o) { o.dash = '5 3'; list.push(o); }
    });
  }
  const chart = list.length ? lineChart(list, opts) : null;
  const drawn = list.filter((x) => x.values.some(Number.isFinite));
  const body = chart ? [chart, drawn.length > 1 ? legend(drawn) : null, nanNote(run, keys),
    run.overlayError ? el('p', { class: 'note', text: `overlay not loaded: ${run.overlayError}` }) : null] : null;
  const empty = list.length
    ? `No finite values yet. ${nanNote(run, keys)?.textContent || ''}`
    : `No data: this run did not log ${keys.filter((k) => !k.includes('/')).join(', ')}.`;
  return panel(id, title, sub, body, { ...opts, emptyText: empty });
}

function lossPanel(run) {
  const loss = series(run, 'loss', COLORS[0]);
  const positive = loss && loss.values.some((v) => v > 0) && loss.values.every((v) => !Number.isFinite(v) || v > 0);
  const last = loss ? loss.values.filter(Number.isFinite).slice(-1)[0] : undefined;
  return linesPanel(run, 'loss', 'Mini-batch loss', last !== undefined ? `last ${fmt(last)}${positive ? ' · log scale' : ''}` : '',
    ['loss'], { logY: positive });
}

function alphaPanel(run) {
  const s = series(run, 'alpha', COLORS[0]);
  const body = [];
  let sub = 'α: -1 no progress, 0 step lands on the minimum, 1 overshoots to the same height';
  if (s) {
    const finite = s.values.filter(Number.isFinite);
    if (finite.length) {
      const bins = 30, lo = -1.5, hi = 1.5;
      const edges = Array.from({ length: bins + 1 }, (_, i) => lo + ((hi - lo) * i) / bins);
      const counts = new Array(bins).fill(0);
      for (const a of finite) counts[Math.min(bins - 1, Math.max(0, Math.floor(((a - lo) / (hi - lo)) * bins)))] += 1;
      // robust statistics: one α of 93 moves a mean, not the median and quartiles
      const sorted = [...finite].sort((a, b) => a - b);
      const q = (p) => { const i = (sorted.length - 1) * p, lo = Math.floor(i), hi = Math.ceil(i); return sorted[lo] + (sorted[hi] - sorted[lo]) * (i - lo); };
      const [q1, med, q3] = [q(0.25), q(0.5), q(0.75)];
      const above = finite.filter((a) => a > hi).length, below = finite.filter((a) => a < lo).length;
      body.push(barChart(edges, counts, { logY: false, markers: [{ x: 0, color: '#188038', dash: '4 3' }, { x: med, color: '#d93025' }] }));
      // each α is a fit to noisy observations: its typical standard error (alpha/stderr, delta method)
      const se = series(run, 'alpha/stderr', COLORS[0]);
      const ses = se ? se.values.filter(Number.isFinite).sort((a, b) => a - b) : [];
      const seText = ses.length ? `; one step's α ± ${fmt(ses[Math.floor((ses.length - 1) / 2)])} (1 s.e., median over ${ses.length} steps)` : '';
      body.push(legend([{ name: `median α = ${fmt(med)}, quartiles ${fmt(q1)}..${fmt(q3)} over ${finite.length} steps${seText}`, color: '#d93025' }, { name: 'α = 0', color: '#188038' }]));
      if (above || below) body.push(el('p', { class: 'note', 'data-offaxis': String(above + below), text: `${below} below -1.5 and ${above} above +1.5, counted in the edge bins (min ${fmt(sorted[0])}, max ${fmt(sorted[sorted.length - 1])})` }));
    }
    const note = nanNote(run, ['alpha']);
    if (note) body.push(note);
  }
  const fit = run.data.alpha;
  if (fit && fit.value && Array.isArray(fit.value.w)) {
    const [w0, w1, w2] = fit.value.w.map(num);
    const t = num(fit.value.t);
    if ([w0, w1, w2, t].every(Number.isFinite) && t > 0) {
      const xs = Array.from({ length: 41 }, (_, i) => -0.25 * t + (1.5 * t * i) / 40);
      const fitLine = { name: `fit at step ${fit.step}`, steps: xs, values: xs.map((x) => w0 + w1 * x + w2 * x * x), color: COLORS[1] };
      // the observations are batch means: their standard errors sqrt(var / n) (var_f0, var_f1, n0, n1 are logged)
      const seOf = (v, n) => (Number.isFinite(num(v)) && Number(n) > 0 ? Math.sqrt(num(v) / Number(n)) : NaN);
      const [se0, se1] = [seOf(fit.value.var_f0, fit.value.n0), seOf(fit.value.var_f1, fit.value.n1)];
      const obsName = [se0, se1].every(Number.isFinite)
        ? `observed f(0) = ${fmt(num(fit.value.f0))} ± ${fmt(se0)}, f(t) = ${fmt(num(fit.value.f1))} ± ${fmt(se1)} (1 s.e. of the batch means)`
        : 'observed f(0), f(t)';
      const obs = { name: obsName, steps: [0, t], values: [num(fit.value.f0), num(fit.value.f1)], color: COLORS[2], dots: true };
      const chart = lineChart([fitLine, obs], { xLabel: 'τ along the update d', H: 150 });
      if (chart) { body.push(chart); body.push(legend([fitLine, obs])); }
    }
  }
  return panel('alpha', 'Step size (α)', sub, body.length ? body : null,
    { emptyText: s ? 'No finite α yet (α of a step is known one step later).' : 'No data: this run did not log alpha.' });
}

function histPanel(run) {
  const body = [];
  const h1 = run.data.grad_hist_1d;
  let sub = '';
  const drawable = (d) => d && d.value && Array.isArray(d.value.edges) && Array.isArray(d.value.counts);
  // the latest step may have logged why it has no histogram ({edges: null, counts: null, reason}): say so,
  // and draw the last valid one (the plugin sends it as last_valid), labelled with its step
  const shown = drawable(h1) ? h1 : (h1 && drawable(h1.last_valid) ? h1.last_valid : null);
  if (shown) {
    body.push(barChart(shown.value.edges.map(num), shown.value.counts.map(Number), { logY: true }));
    sub = `1D: per-sample gradient elements (${shown.value.scale || 'g'}), step ${shown.step}${shown === h1 ? '' : ' (last valid)'}, log counts`;
  }
  if (h1 && h1.value && !drawable(h1)) {
    const why = typeof h1.value.reason === 'string' ? h1.value.reason : 'no reason logged';
    body.push(el('p', { class: 'note', 'data-reason': 'grad_hist_1d', text: `grad_hist_1d at step ${h1.step}: no histogram (${why})` }));
  }
  const h2 = run.data.grad_hist_2d;
  if (h2 && h2.value && Array.isArray(h2.value.counts) && h2.value.counts.length) {
    body.push(el('p', { class: 'note', text: `2D: ${h2.value.x || 'x'} (horizontal) against ${h2.value.y || 'y'} (vertical), step ${h2.step}` }));
    body.push(heatmap(h2.value.x_edges.map(num), h2.value.y_edges.map(num), h2.value.counts));
  }
  return panel('histograms', 'Gradient histograms', sub, body.length ? body : null,
    { emptyText: 'No data: this run did not log grad_hist_1d or grad_hist_2d.' });
}

function curvaturePanel(run) {
  const keys = ['hess_max_ev', 'hess_trace', 'ggn_trace', 'tic_diag', 'tic_trace'];
  const list = keys.map((k, i) => series(run, k, COLORS[i])).filter(Boolean);
  // estimates carry their error: a standard error (<key>/stderr, band ±2 s.e.) or, for the top eigenvalue,
  // the Lanczos residual bound (hess_max_ev/error_bound, band ±1 bound); exact values record 0: no band
  const errorOf = (name) => name === 'hess_max_ev' ? ['error_bound', 1, '±1 residual bound'] : ['stderr', 2, '±2 standard errors'];
  for (const s of list) {
    const [suffix, k, text] = errorOf(s.name);
    const se = run.scalars[`${s.name}/${suffix}`];
    if (se) {
      const byStep = new Map(se.steps.map((x, i) => [x, num(se.values[i])]));
      if (![...byStep.values()].some((v) => v > 0)) continue;  // exact values: no band to draw
      s.band = [s.steps.map((x, i) => s.values[i] - k * (byStep.get(x) ?? NaN)), s.steps.map((x, i) => s.values[i] + k * (byStep.get(x) ?? NaN))];
      s.bandText = text;
    }
  }
  const body = [];
  for (const s of list) {  // one chart each: eigenvalue, traces and TIC live on different scales
    const chart = lineChart([s], { H: 120 });
    if (chart) body.push(el('p', { class: 'chart-title', text: s.band ? `${s.name} (band: ${s.bandText})` : s.name }), chart);
  }
  const ev = run.data.hess_max_ev;
  if (ev && ev.value) {
    const v = ev.value;
    body.push(el('p', { class: 'note', text: `Top eigenvalue at step ${ev.step}: ${v.converged ? 'converged' : 'NOT converged'} after ${v.hvps} Hessian-vector products (${v.method || 'lanczos'}, residual ${fmt(num(v.residual))}${v.error_bound !== undefined ? `, an eigenvalue within ±${fmt(num(v.error_bound))}` : ''}${v.subbatch ? `, sub-batch ${v.subbatch}` : ''}).` }));
  }
  for (const k of ['hess_trace', 'ggn_trace']) {
    const d = run.data[k];
    if (d && d.value) body.push(el('p', { class: 'note', text: `${k}: ${d.value.method}${d.value.probes ? `, ${d.value.probes} probes` : ''}${d.value.exact_unavailable ? ` (not exact: ${d.value.exact_unavailable})` : ''}` }));
  }
  for (const k of ['tic_diag', 'tic_trace']) {
    const d = run.data[k];
    if (d && d.value && d.value.curvature) body.push(el('p', { class: 'note', text: `${k}: ${String(d.value.curvature).startsWith('estimate') ? 'estimate' : 'exact'} (${d.value.curvature}${d.value.probes ? `, ${d.value.probes} probes` : ''})` }));
  }
  const note = nanNote(run, keys);
  if (note) body.push(note);
  return panel('curvature', 'Curvature', 'largest Hessian eigenvalue, Hessian/GGN trace, TIC', body.length ? body : null,
    { emptyText: 'No data: this run did not log hess_max_ev, hess_trace, ggn_trace or tic.' });
}

// the error bound of an energy entry (a device, its GPU window, or the total): '± 0.1 J', or, for an estimate
// whose error_j is NaN, 'estimated, no bound'; nothing when none is logged or the value is unavailable
function energyError(info, status) {
  let text = '';
  if ('error_j' in info && status !== 'unavailable') {
    const e = num(info.error_j);
    text += Number.isFinite(e) ? ` ± ${fmt(e)} J` : (status === 'estimated' ? ' · estimated, no bound' : ' · no bound');
  }
  const w = info.window;
  if (w && typeof w === 'object' && Array.isArray(w.window)) {
    const wj = num(w.window_j), we = num(w.window_error_j);
    text += ` · window ${w.window[0]}–${w.window[1]}: ${fmt(wj)}${Number.isFinite(we) ? ` ± ${fmt(we)}` : ' (no bound)'} J`;
  }
  return text;
}

function energyPanel(run) {
  const s = series(run, 'energy', COLORS[0], 'energy (J per step)');
  const body = [];
  const chart = s ? lineChart([s]) : null;
  if (chart) body.push(chart);
  const prov = run.data.energy;
  if (prov && prov.value && typeof prov.value === 'object') {
    const box = el('div', { class: 'note' });
    box.appendChild(el('span', { text: `Provenance (step ${prov.step}): ` }));
    for (const [device, info] of Object.entries(prov.value)) {
      if (!info || typeof info !== 'object') continue;
      // a device says `status`; the total (the sum of the devices) says `label`
      const said = device === 'total' ? (info.label ?? info.status) : info.status;
      if (said === undefined && device !== 'total' && !('error_j' in info)) continue;  // not a device (a model, ...)
      const status = ['measured', 'estimated', 'unavailable'].includes(said) ? said : 'unavailable';
      const text = `${device}: ${said || 'unknown'}${energyError(info, status)}${info.source ? ` · ${info.source}` : ''}${info.reason ? ` · ${info.reason}` : ''}`;
      box.appendChild(el('span', { class: `badge ${status}`, 'data-status': status, 'data-device': device, text }));
    }
    const ci = num(prov.value.carbon_intensity_g_per_kwh);
    if (Number.isFinite(ci)) {
      const src = typeof prov.value.carbon_source === 'string' ? ` (${prov.value.carbon_source})` : '';
      box.appendChild(el('span', { text: ` carbon intensity ${fmt(ci)} g/kWh${src}` }));
    }
    body.push(box);
  }
  const total = run.scalars['energy/co2_g'];
  if (total) {
    const v = total.values.map(num).filter(Number.isFinite);
    if (v.length) body.push(el('p', { class: 'note', text: `CO₂ over logged steps: ${fmt(v.reduce((a, b) => a + b, 0))} g` }));
  }
  const note = nanNote(run, ['energy']);
  if (note) body.push(note);
  return panel('energy', 'Energy', 'per optimizer step, with where each number comes from', body.length ? body : null,
    { emptyText: 'No data: this run did not log energy.' });
}

function problemsPanel(run) {
  const rows = [];
  const counts = run.reason_counts || {};
  const partial = new Set(run.reason_counts_partial || []);
  for (const [quantity, entries] of Object.entries(run.reasons)) {
    const last = entries[entries.length - 1];
    for (const [key, reason] of Object.entries(last.reasons)) {
      const n = counts[key] ?? entries.filter((e) => key in e.reasons).length;  // every step with a reason
      rows.push([String(last.step), key, `${reason} (${partial.has(quantity) ? 'at least ' : ''}${n} step${n > 1 ? 's' : ''} not computed)`]);
    }
  }
  for (const o of (run.overflow || []).slice(-10)) {
    for (const [key, text] of Object.entries(o.values)) rows.push([String(o.step), key, `${text}: finite, beyond float32 (TensorBoard's scalar type), so its scalar reads inf`]);
  }
  for (const f of run.flags.slice(-10)) rows.push([String(f.step), 'flags', f.flags.join(', ')]);
  for (const e of run.events.slice(-10)) rows.push([e.step === undefined ? '' : String(e.step), e.type === 'skipped' ? 'skipped step' : (e.level || e.type || 'event'), e.reason || e.message || JSON.stringify(e.payload ?? '')]);
  if (!rows.length) return panel('problems', 'Not computed, flags and events', '', null, { wide: true, emptyText: 'Every value was computed; no flags, no skipped steps.' });
  const table = el('table');
  table.appendChild(el('tr', {}, el('th', { text: 'step' }), el('th', { text: 'key' }), el('th', { text: 'why' })));
  for (const r of rows.slice(0, 60)) table.appendChild(el('tr', {}, ...r.map((c) => el('td', { text: c }))));
  return panel('problems', 'Not computed, flags and events', 'the latest reason of every value reported as NaN', [table], { wide: true });
}

function advisorPanel(run) {
  const found = run.events.filter((e) => e.level === 'diagnosis');
  const on = run.events.some((e) => e.advisor === 'on');
  if (!found.length) {
    return panel('advisor', 'Advisor', 'diagnoses made while training', null,
      { wide: true, emptyText: on
        ? 'The advisor ran while training (advisor=True) and has made no diagnosis so far. `cockpit-lite diagnose LOGDIR` prints what it checked and what it could not.'
        : 'No diagnosis was logged: the advisor runs live with watch(..., advisor=True); `cockpit-lite diagnose LOGDIR` reads any run.' });
  }
  const list = el('ul');
  for (const e of found) list.appendChild(el('li', { text: `step ${e.step}: ${e.message}` }));
  return panel('advisor', 'Advisor', 'diagnoses made while training (each once, when first seen)', [list], { wide: true });
}

// Panels with a renderer of their own, by panel id (the instruments' `tab`, served by /panels);
// any other panel of the registry is drawn by its kind (genericPanel). The list of panels is
// Python's (cockpit_lite.instruments.tab_panels): this table only says how some of them look.
const RENDERERS = {
  advisor: advisorPanel,
  loss: lossPanel,
  alpha: alphaPanel,
  'gradient-tests': (run) => linesPanel(run, 'gradient-tests', 'Gradient tests', 'norm, inner-product and orthogonality tests (< 1: batch large enough)',
    ['norm_test', 'inner_test', 'ortho_test'], { refY: 1 }),
  'grad-norm': (run) => linesPanel(run, 'grad-norm', 'Gradient norm', '‖g‖ of the mini-batch gradient', ['grad_norm'], {}),
  distances: (run) => linesPanel(run, 'distances', 'Distances', 'update size ‖d‖, distance from the start, parameter norm', ['update_size', 'distance', 'param_norm']),
  histograms: histPanel,
  curvature: curvaturePanel,
  gsnr: (run) => linesPanel(run, 'gsnr', 'Gradient signal-to-noise', 'mean GSNR; early-stopping criterion', ['mean_gsnr', 'early_stopping', 'cabs']),
  energy: energyPanel,
  cost: (run) => linesPanel(run, 'cost', 'Cost', 'wall seconds per step and the cockpit\'s own share', ['time', 'time/cockpit', 'time/device']),
  lr: (run) => linesPanel(run, 'lr', 'Learning rate', 'parameter group 0', ['lr']),
};

// a registry panel without a renderer of its own: a histogram of its latest structure, or its scalar keys as lines
function genericPanel(run, p) {
  const dataKeys = p.data_keys || [];
  if (p.kind === 'histogram') {
    const h = dataKeys.map((k) => run.data[k]).find((d) => d && d.value && Array.isArray(d.value.edges) && Array.isArray(d.value.counts));
    if (h) return panel(p.id, p.title, `${p.description || ''} (step ${h.step}, log counts)`, [barChart(h.value.edges.map(num), h.value.counts.map(Number), { logY: true })]);
  }
  const keys = (p.keys || []).filter((k) => !dataKeys.includes(k));
  return linesPanel(run, p.id, p.title, p.description || '', keys.length ? keys : dataKeys);
}

function renderRun(grid, run, panels) {
  grid.dataset.run = run.run;
  grid.replaceChildren(...panels.map((p) => (RENDERERS[p.id] ? RENDERERS[p.id](run) : genericPanel(run, p))), problemsPanel(run));
}

// ---------------------------------------------------------------------------------------------
// page

export async function render() {
  document.head.appendChild(el('style', { text: STYLE }));
  const select = el('select', { 'aria-label': 'run' });
  const overlay = el('select', { 'aria-label': 'overlay run' });
  const status = el('span', { class: 'status', text: 'loading…' });
  const grid = el('div', { class: 'grid' });
  document.body.appendChild(el('header', {}, el('h1', { text: 'Cockpit' }), select, overlay, status));
  document.body.appendChild(grid);

  let runs = [];
  let shown = '';
  let panels = null;  // the registry's panels (/panels), read once
  const refresh = async (force = false) => {
    try {
      if (!panels) panels = (await getJSON('panels')).panels;
      runs = (await getJSON('runs')).runs;
      const current = select.value;
      if (runs.map((r) => r.run).join('\u0000') !== Array.from(select.options).map((o) => o.value).join('\u0000')) {
        select.replaceChildren(...runs.map((r) => { const o = el('option', { text: r.run }); o.value = r.run; return o; }));
        if (runs.some((r) => r.run === current)) select.value = current;
      }
      if (!runs.length) {
        grid.replaceChildren(el('p', { class: 'message', text: 'No cockpit data yet. Train with cockpit_lite.watch(..., tensorboard=True) and this tab fills in.' }));
        status.textContent = `no runs · checked ${new Date().toLocaleTimeString()}`;
        shown = '';
        return;
      }
      const others = runs.filter((r) => r.run !== select.value).map((r) => r.run);
      if (others.join('\u0000') !== Array.from(overlay.options).slice(1).map((o) => o.value).join('\u0000')) {
        const chosen = overlay.value;
        const none = el('option', { text: 'overlay: none' }); none.value = '';
        overlay.replaceChildren(none, ...others.map((r) => { const o = el('option', { text: `overlay: ${r}` }); o.value = r; return o; }));
        overlay.value = others.includes(chosen) ? chosen : '';
      }
      const meta = runs.find((r) => r.run === select.value) || runs[0];
      const extra = runs.find((r) => r.run === overlay.value);
      const key = `${meta.run}\u0000${meta.max_step}\u0000${meta.max_wall_time}\u0000${extra ? `${extra.run}\u0000${extra.max_step}` : ''}`;
      if (force || key !== shown) {
        shown = '';
        grid.dataset.run = '';
        let run;
        try {
          run = await getJSON(`run?run=${encodeURIComponent(meta.run)}`);
        } catch (err) {  // never leave the previous run's panels under this run's name
          grid.replaceChildren(el('p', { class: 'message', 'data-error': 'true', text: `Could not load run ${meta.run}: ${err.message}` }));
          throw err;
        }
        if (extra) {
          try { run.overlay = await getJSON(`run?run=${encodeURIComponent(extra.run)}`); } catch (err) { run.overlayError = `${extra.run}: ${err.message}`; }
        }
        try {
          renderRun(grid, run, panels);
        } catch (err) {
          grid.replaceChildren(el('p', { class: 'message', 'data-error': 'true', text: `Could not draw run ${meta.run}: ${err.message}` }));
          throw err;
        }
        shown = key;
      }
      status.textContent = `${runs.length} run${runs.length > 1 ? 's' : ''} · last step ${meta.max_step ?? '–'} · updated ${new Date().toLocaleTimeString()}`;
      document.body.dataset.ready = 'true';
    } catch (err) {
      status.textContent = `could not load: ${err.message}`;
    }
  };
  select.addEventListener('change', () => refresh(true));
  overlay.addEventListener('change', () => refresh(true));
  await refresh(true);
  setInterval(() => { if (!document.hidden) refresh(false); }, REFRESH_MS);
}
