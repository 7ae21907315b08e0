// Runs in the browser (render.js inlines it with uPlot and the query results): draws each panel
// of window.DASHBOARD at its gridPos in Grafana's dark theme. window.tlsgateDrawers names the
// panel types it draws; `render.js --check` fails when the dashboard uses another.
/* global uPlot */
(function () {
    'use strict';

    const THEME = {
        page: '#111217',
        panel: '#181b1f',
        border: 'rgba(204, 204, 220, 0.12)',
        text: '#ccccdc',
        weak: 'rgba(204, 204, 220, 0.65)',
        grid: 'rgba(204, 204, 220, 0.09)',
        font: 'Inter, "Helvetica Neue", Arial, sans-serif',
    };
    // Grafana's "classic palette", in its order.
    const PALETTE = ['#73BF69', '#F2CC0C', '#8AB8FF', '#FF780A', '#F2495C', '#5794F2', '#B877D9', '#705DA0',
        '#37872D', '#FADE2A', '#447EBC', '#C15C17', '#890F02', '#0A437C', '#6D1F62', '#584477'];
    const NAMED = { green: '#73BF69', red: '#F2495C', orange: '#FF9830', yellow: '#FADE2A', blue: '#5794F2' };
    // d3's Oranges, dark to light (Grafana draws low counts dark on the dark theme).
    const ORANGES = ['#7f2704', '#a63603', '#d94801', '#f16913', '#fd8d3c', '#fdae6b', '#fdd0a2', '#fee6ce'];

    // --- value formatting, after Grafana's units -------------------------------------------------
    function trim(v, digits) {
        if (!isFinite(v)) return String(v);
        const d = digits !== undefined ? digits : Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2;
        const s = v.toFixed(d);
        return digits !== undefined || !s.includes('.') ? s : s.replace(/\.?0+$/, '');
    }
    function scaled(v, steps, digits) { // steps: [[factor, suffix], ...] largest first
        for (const [f, s] of steps) if (Math.abs(v) >= f) return trim(v / f, digits) + s;
        const last = steps[steps.length - 1];
        return v === 0 ? '0' + last[1] : trim(v / last[0], digits) + last[1];
    }
    const SI = (unit) => [[1e9, ` G${unit}`], [1e6, ` M${unit}`], [1e3, ` k${unit}`], [1, ` ${unit}`]];
    const SHORT = [[1e9, ' B'], [1e6, ' Mil'], [1e3, ' K'], [1, '']];
    function fmt(v, unit, decimals) {
        if (v === null || v === undefined || Number.isNaN(v)) return '-';
        switch (unit) {
        case 'ops': return scaled(v, [[1e9, 'B ops/s'], [1e6, 'M ops/s'], [1e3, 'K ops/s'], [1, ' ops/s']], decimals);
        case 'Bps': return scaled(v, SI('B/s'), decimals);
        case 'bytes': return scaled(v, [[2 ** 30, ' GiB'], [2 ** 20, ' MiB'], [2 ** 10, ' KiB'], [1, ' B']], decimals);
        case 's':
            if (v === 0) return '0 s';
            return scaled(v, [[3600, ' hour'], [60, ' min'], [1, ' s'], [1e-3, ' ms'], [1e-6, ' µs'], [1e-9, ' ns']], decimals);
        case 'd': // Grafana's toDays: days under a week, then weeks, then years
            if (Math.abs(v) < 7) return trim(v, decimals) + ' day';
            if (Math.abs(v) < 365) return trim(v / 7, decimals) + ' week';
            return trim(v / 365, decimals) + ' year';
        default: return scaled(v, SHORT, decimals);
        }
    }
    function thresholdColor(v, thresholds) {
        let color = NAMED.green;
        const steps = (thresholds && thresholds.steps) || [];
        for (const s of steps) if (s.value === null || v >= s.value) color = NAMED[s.color] || s.color;
        return color;
    }

    // Grafana's series name: legendFormat with {{label}} replaced, or the series' labels.
    function seriesName(target, metric) {
        if (target.legendFormat) {
            return target.legendFormat.replace(/\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}/g, (m, l) => metric[l] || '').trim();
        }
        const labels = Object.entries(metric).filter(([k]) => k !== '__name__').map(([k, v]) => `${k}="${v}"`);
        if (!metric.__name__ && !labels.length) return target.expr;
        return `${metric.__name__ || ''}{${labels.join(', ')}}`;
    }

    function el(tag, style, text) {
        const e = document.createElement(tag);
        Object.assign(e.style, style || {});
        if (text !== undefined) e.textContent = text;
        return e;
    }
    function noData(body) {
        body.appendChild(el('div', {
            display: 'flex', alignItems: 'center', justifyContent: 'center', height: '100%',
            color: THEME.weak, fontSize: '14px',
        }, 'No data'));
    }
    function timeAxis(range) {
        return {
            stroke: THEME.weak, font: `11px ${THEME.font}`,
            grid: { stroke: THEME.grid, width: 1 }, ticks: { stroke: THEME.grid, width: 1 },
            values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toISOString().slice(11, 19)),
            space: 70,
        };
    }
    function points(target, range) { // one x per step from start to end, as query_range returns
        const xs = [];
        for (let t = Math.ceil(range.start / target.step) * target.step; t <= range.end; t += target.step) xs.push(t);
        return xs;
    }

    // --- panels --------------------------------------------------------------------------------
    function drawTimeseries(panel, data, body, range) {
        const unit = panel.fieldConfig && panel.fieldConfig.defaults && panel.fieldConfig.defaults.unit;
        const targets = data.targets;
        const xs = targets.length ? points(targets[0], range) : [];
        const cols = [xs];
        const series = [{}];
        let any = false;
        for (const t of targets) {
            for (const s of t.series) {
                const byTime = new Map(s.values);
                const ys = xs.map((x) => (byTime.has(x) ? byTime.get(x) : null));
                if (ys.some((y) => y !== null)) any = true;
                const color = PALETTE[(series.length - 1) % PALETTE.length];
                cols.push(ys);
                series.push({
                    label: seriesName(t, s.metric), stroke: color, width: 1.5, fill: color + '1f',
                    points: { show: false }, spanGaps: false,
                });
            }
        }
        if (!any) return noData(body);
        const legend = el('div', {
            display: 'flex', flexWrap: 'wrap', gap: '2px 14px', fontSize: '12px', color: THEME.text,
            padding: '4px 4px 0 4px', lineHeight: '16px',
        });
        for (const s of series.slice(1)) {
            const item = el('div', { display: 'flex', alignItems: 'center', gap: '6px', whiteSpace: 'nowrap' });
            item.appendChild(el('span', { display: 'inline-block', width: '14px', height: '4px', borderRadius: '2px', background: s.stroke }));
            item.appendChild(el('span', {}, s.label || ' '));
            legend.appendChild(item);
        }
        const plot = el('div', {});
        body.appendChild(plot);
        body.appendChild(legend);
        const height = body.clientHeight - legend.offsetHeight - 2;
        const opts = {
            width: body.clientWidth, height, series, legend: { show: false }, cursor: { show: false },
            scales: {
                x: { time: true, min: range.start, max: range.end },
                y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] },
            },
            axes: [timeAxis(range), {
                stroke: THEME.weak, font: `11px ${THEME.font}`, size: 70,
                grid: { stroke: THEME.grid, width: 1 }, ticks: { show: false },
                values: (u, ticks) => ticks.map((v) => fmt(v, unit)),
            }],
        };
        new uPlot(opts, cols, plot);
    }

    function drawHeatmap(panel, data, body, range) {
        const t = data.targets[0];
        const le = (s) => (s.metric.le === '+Inf' ? Infinity : Number(s.metric.le));
        const buckets = (t && t.series.slice().sort((a, b) => le(a) - le(b))) || [];
        if (!buckets.length) return noData(body);
        const xs = points(t, range);
        const cum = buckets.map((s) => { const m = new Map(s.values); return xs.map((x) => m.get(x) || 0); });
        const counts = cum.map((row, b) => row.map((v, i) => Math.max(0, v - (b ? cum[b - 1][i] : 0))));
        let max = 0;
        for (const row of counts) for (const v of row) max = Math.max(max, v);
        if (max === 0) return noData(body);
        const unit = (panel.options && panel.options.yAxis && panel.options.yAxis.unit) || undefined;
        const gap = (panel.options && panel.options.cellGap) || 1;

        const W = body.clientWidth;
        const H = body.clientHeight - 26; // color scale below
        const left = 70;
        const bottom = 22;
        const canvas = el('canvas', {});
        canvas.width = W;
        canvas.height = H;
        body.appendChild(canvas);
        const ctx = canvas.getContext('2d');
        const pw = W - left - 8;
        const ph = H - bottom - 6;
        const rowH = ph / buckets.length;
        const colW = pw / xs.length;
        const color = (v) => ORANGES[Math.min(ORANGES.length - 1, Math.floor(Math.sqrt(v / max) * ORANGES.length))];
        for (let b = 0; b < buckets.length; b++) {
            for (let i = 0; i < xs.length; i++) {
                const v = counts[b][i];
                if (v <= 1e-9) continue; // Grafana hides empty cells
                ctx.fillStyle = color(v);
                ctx.fillRect(left + i * colW, 6 + ph - (b + 1) * rowH, Math.max(1, colW - gap), Math.max(1, rowH - gap));
            }
        }
        ctx.fillStyle = THEME.weak;
        ctx.font = `11px ${THEME.font}`;
        ctx.textAlign = 'right';
        ctx.textBaseline = 'middle';
        const every = Math.ceil(14 / rowH);
        buckets.forEach((s, b) => {
            if (b % every) return;
            const label = s.metric.le === '+Inf' ? '+Inf' : fmt(le(s), unit);
            ctx.fillText(label, left - 6, 6 + ph - (b + 0.5) * rowH);
        });
        ctx.textAlign = 'center';
        ctx.textBaseline = 'top';
        const span = range.end - range.start;
        const stepT = span > 600 ? 300 : span > 240 ? 60 : 30;
        for (let x = Math.ceil(range.start / stepT) * stepT; x <= range.end; x += stepT) {
            const px = left + ((x - xs[0]) / (xs[xs.length - 1] - xs[0] || 1)) * pw;
            if (px + 26 > W) continue; // the label would be cut at the edge
            ctx.fillText(new Date(x * 1000).toISOString().slice(11, 19), px, 6 + ph + 6);
        }
        const scale = el('div', { display: 'flex', alignItems: 'center', gap: '8px', fontSize: '11px', color: THEME.weak, padding: '4px 0 0 70px' });
        scale.appendChild(el('span', {}, '1'));
        scale.appendChild(el('span', { width: '160px', height: '10px', background: `linear-gradient(to right, ${ORANGES.join(', ')})` }));
        scale.appendChild(el('span', {}, `${trim(max)} key ops per cell (${t.step} s, bucket by latency)`));
        body.appendChild(scale);
    }

    function drawTable(panel, data, body) {
        const defaults = (panel.fieldConfig && panel.fieldConfig.defaults) || {};
        const excluded = new Set(['Time']);
        for (const tr of panel.transformations || []) {
            if (tr.id === 'organize') for (const [k, v] of Object.entries(tr.options.excludeByName || {})) if (v) excluded.add(k);
        }
        const rows = [];
        for (const t of data.targets) for (const s of t.series) rows.push({ metric: s.metric, value: s.values[s.values.length - 1][1] });
        if (!rows.length) return noData(body);
        const labels = [...new Set(rows.flatMap((r) => Object.keys(r.metric)))].filter((k) => !excluded.has(k)).sort();
        const table = el('table', { width: '100%', borderCollapse: 'collapse', fontSize: '13px', color: THEME.text });
        const head = el('tr', {});
        for (const h of [...labels, 'Value']) {
            head.appendChild(el('th', { textAlign: 'left', padding: '6px 8px', borderBottom: `1px solid ${THEME.border}`, fontWeight: '500' }, h));
        }
        table.appendChild(head);
        for (const r of rows) {
            const tr = el('tr', {});
            for (const l of labels) tr.appendChild(el('td', { padding: '6px 8px', borderBottom: `1px solid ${THEME.border}` }, r.metric[l] || ''));
            tr.appendChild(el('td', { padding: '6px 8px', borderBottom: `1px solid ${THEME.border}` }, fmt(r.value, defaults.unit, defaults.decimals)));
            table.appendChild(tr);
        }
        body.appendChild(table);
    }

    function drawStat(panel, data, body) {
        const defaults = (panel.fieldConfig && panel.fieldConfig.defaults) || {};
        const s = data.targets.length && data.targets[0].series[0];
        const vals = s ? s.values.filter((v) => v[1] !== null) : [];
        if (!vals.length) return noData(body);
        const v = vals[vals.length - 1][1]; // Grafana's default reducer: last not null
        const color = thresholdColor(v, defaults.thresholds);
        const canvas = el('canvas', { position: 'absolute', left: '0', bottom: '0' });
        canvas.width = body.clientWidth;
        canvas.height = Math.round(body.clientHeight * 0.45);
        body.style.position = 'relative';
        body.appendChild(canvas);
        const ctx = canvas.getContext('2d');
        const ys = vals.map((p) => p[1]);
        const lo = Math.min(0, ...ys);
        const hi = Math.max(...ys) > lo ? Math.max(...ys) : lo + 1;
        const x0 = vals[0][0];
        const x1 = vals[vals.length - 1][0] > x0 ? vals[vals.length - 1][0] : x0 + 1;
        ctx.beginPath();
        vals.forEach(([t, y], i) => {
            const px = ((t - x0) / (x1 - x0)) * canvas.width;
            const py = canvas.height - ((y - lo) / (hi - lo)) * (canvas.height - 4) - 2;
            if (i) ctx.lineTo(px, py); else ctx.moveTo(px, py);
        });
        ctx.strokeStyle = color;
        ctx.lineWidth = 1.5;
        ctx.stroke();
        ctx.lineTo(canvas.width, canvas.height);
        ctx.lineTo(0, canvas.height);
        ctx.closePath();
        ctx.fillStyle = color + '33';
        ctx.fill();
        body.appendChild(el('div', {
            position: 'absolute', top: '12%', width: '100%', textAlign: 'center', color,
            fontSize: `${Math.round(Math.min(body.clientHeight * 0.35, body.clientWidth / 5))}px`, fontWeight: '500',
        }, fmt(v, defaults.unit, defaults.decimals)));
    }

    const drawers = {
        row: null, // drawn as a section header by renderDashboard
        timeseries: drawTimeseries,
        heatmap: drawHeatmap,
        table: drawTable,
        stat: drawStat,
    };
    window.tlsgateDrawers = Object.fromEntries(Object.keys(drawers).map((k) => [k, true]));

    window.renderDashboard = function () {
        const d = window.DASHBOARD;
        const L = window.LAYOUT;
        const range = window.RANGE;
        Object.assign(document.body.style, { margin: '0', background: THEME.page, fontFamily: THEME.font, color: THEME.text });
        const header = el('div', { display: 'flex', alignItems: 'baseline', gap: '16px', padding: '12px 12px 4px 12px' });
        header.appendChild(el('div', { fontSize: '20px', fontWeight: '500' }, d.title));
        const from = new Date(range.start * 1000).toISOString().replace('T', ' ').slice(0, 19);
        const to = new Date(range.end * 1000).toISOString().slice(11, 19);
        header.appendChild(el('div', { fontSize: '13px', color: THEME.weak }, `${from} to ${to} UTC`));
        header.appendChild(el('div', { fontSize: '13px', color: THEME.weak, marginLeft: 'auto' }, window.CAPTION));
        document.body.appendChild(header);
        const top = 48;
        const cell = L.cellHeight + L.margin;
        const grid = el('div', { position: 'relative' });
        document.body.appendChild(grid);
        let bottom = 0;
        for (const p of d.panels) {
            const g = p.gridPos;
            const box = {
                left: `${L.margin + g.x * L.colWidth}px`, top: `${g.y * cell}px`,
                width: `${g.w * L.colWidth - L.margin}px`, height: `${g.h * L.cellHeight + (g.h - 1) * L.margin}px`,
            };
            bottom = Math.max(bottom, (g.y + g.h) * cell);
            if (p.type === 'row') {
                grid.appendChild(el('div', Object.assign({ position: 'absolute', fontSize: '16px', fontWeight: '500', display: 'flex', alignItems: 'center' }, box), `⌄  ${p.title}`));
                continue;
            }
            const frame = el('div', Object.assign({
                position: 'absolute', background: THEME.panel, border: `1px solid ${THEME.border}`,
                borderRadius: '3px', boxSizing: 'border-box', display: 'flex', flexDirection: 'column', overflow: 'hidden',
            }, box));
            frame.appendChild(el('div', { fontSize: '14px', fontWeight: '500', padding: '8px 8px 4px 8px', whiteSpace: 'nowrap' }, p.title));
            const body = el('div', { flex: '1', margin: '0 8px 8px 8px', minHeight: '0', overflow: 'hidden' });
            frame.appendChild(body);
            grid.appendChild(frame);
            const draw = drawers[p.type];
            const data = window.DATA[p.id] || { targets: [] };
            if (draw) draw(p, data, body, range);
            else body.appendChild(el('div', {}, `panel type ${p.type} is not drawn`));
        }
        grid.style.height = `${bottom}px`;
        document.body.style.height = `${top + bottom}px`;
    };
})();
