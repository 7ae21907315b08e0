// Draws a Grafana dashboard (contrib/grafana/tlsgate.json) without Grafana: every panel's
// PromQL targets run against a Prometheus server's query API over a time window, and page.js
// draws the panels in headless Chromium, laid out by their gridPos, into a PNG.
//
//   node render.js --check --dashboard tlsgate.json [--rules-out FILE]
//   node render.js --dashboard tlsgate.json --prometheus URL --start UNIX --end UNIX \
//       --scrape-interval S --chromium PATH --out FILE [--caption TEXT]
//
// --check loads page.js and fails unless it has a drawer for every panel type the dashboard
// uses and every target substitutes into a plain PromQL expression; --rules-out writes those
// expressions as recording rules, so `promtool check rules` can parse them.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const vm = require('vm');

// What Grafana does with a target: the query kinds this renderer knows.
const TARGET_FORMATS = new Set([undefined, 'time_series', 'heatmap', 'table']);

function parseArgs(argv) {
    const args = { caption: '' };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === '--check') args.check = true;
        else if (a.startsWith('--')) args[a.slice(2).replace(/-./g, (m) => m[1].toUpperCase())] = argv[++i];
        else throw new Error(`unexpected argument ${a}`);
    }
    return args;
}

function loadPage() {
    const src = fs.readFileSync(path.join(__dirname, 'page.js'), 'utf8');
    const sandbox = { window: {} };
    vm.runInNewContext(src, sandbox, { filename: 'page.js' });
    return { src, drawers: sandbox.window.tlsgateDrawers };
}

// Grafana's interval variables for one panel: $__interval is the range over the panel's width
// in pixels, never below the scrape interval; $__rate_interval is
// max($__interval + scrape interval, 4 * scrape interval), what Grafana computes.
function intervals(rangeSeconds, widthPx, scrape) {
    const interval = Math.max(scrape, Math.ceil(rangeSeconds / Math.max(widthPx, 1)));
    const rate = Math.max(interval + scrape, 4 * scrape);
    return { interval, rate, range: rangeSeconds };
}

// Template variables: the dashboard's own, each at its "All" value (allValue or .*), plus the
// interval variables. Returns the expression or throws naming what is left unreplaced.
function substitute(expr, dashboard, iv) {
    let out = expr
        .replace(/\$\{?__rate_interval\}?/g, `${iv.rate}s`)
        .replace(/\$\{?__interval_ms\}?/g, `${iv.interval * 1000}`)
        .replace(/\$\{?__interval\}?/g, `${iv.interval}s`)
        .replace(/\$\{?__range\}?/g, `${iv.range}s`);
    for (const v of (dashboard.templating && dashboard.templating.list) || []) {
        if (v.type === 'datasource') continue;
        const all = v.includeAll ? v.allValue || '.*' : (v.current && v.current.value) || '.*';
        out = out.replace(new RegExp(`\\$\\{${v.name}(:[a-z]+)?\\}|\\$${v.name}\\b`, 'g'), all);
    }
    if (/\$/.test(out)) throw new Error(`unknown variable left in: ${out}`);
    return out;
}

function panelsOf(dashboard) {
    const out = [];
    for (const p of dashboard.panels || []) {
        out.push(p);
        for (const inner of p.panels || []) out.push(inner); // a collapsed row's panels
    }
    return out;
}

function check(dashboard, drawers, rulesOut) {
    const problems = [];
    const types = new Map();
    const rules = [];
    for (const p of panelsOf(dashboard)) {
        types.set(p.type, (types.get(p.type) || 0) + 1);
        if (!drawers[p.type]) problems.push(`panel "${p.title}": type ${p.type} has no drawer in page.js`);
        if (!p.gridPos || !(p.gridPos.w > 0 && p.gridPos.h > 0)) problems.push(`panel "${p.title}": no gridPos`);
        if (p.type === 'row') continue;
        if (!(p.targets || []).length) problems.push(`panel "${p.title}": no targets`);
        for (const t of p.targets || []) {
            if (!TARGET_FORMATS.has(t.format)) problems.push(`panel "${p.title}" ${t.refId}: format ${t.format}`);
            if (p.type === 'heatmap' && t.format !== 'heatmap') problems.push(`panel "${p.title}": heatmap target without format heatmap`);
            try {
                const expr = substitute(t.expr || '', dashboard, intervals(3600, 800, 15));
                if (!expr.trim()) throw new Error('empty expression');
                rules.push(expr);
            } catch (e) {
                problems.push(`panel "${p.title}" ${t.refId}: ${e.message}`);
            }
        }
    }
    if (rulesOut) {
        const body = rules.map((e, i) => `      - record: tlsgate:render_check_${i}\n        expr: ${JSON.stringify(e)}\n`).join('');
        fs.writeFileSync(rulesOut, `groups:\n  - name: render-check\n    rules:\n${body}`);
    }
    const summary = [...types].map(([t, n]) => `${n} ${t}`).join(', ');
    if (problems.length) {
        for (const p of problems) console.error(`error: ${p}`);
        process.exit(1);
    }
    console.log(`dashboard: ${summary}; ${rules.length} targets; page.js draws every type`);
}

async function promQuery(base, endpoint, params) {
    const url = `${base}/api/v1/${endpoint}?${new URLSearchParams(params)}`;
    const res = await fetch(url);
    const body = await res.json();
    if (body.status !== 'success') throw new Error(`${endpoint} ${params.query}: ${body.error}`);
    return body.data.result;
}

const num = (v) => (v === 'NaN' || v === '+Inf' || v === '-Inf' ? null : Number(v));

// Runs each target of each panel. Returns per panel: { targets: [{ refId, legendFormat, format,
// expr, series: [{ metric, values: [[t, v|null]] }] }] }.
async function fetchPanels(dashboard, args, layout) {
    const start = Number(args.start);
    const end = Number(args.end);
    const scrape = Number(args.scrapeInterval || 15);
    const out = {};
    for (const p of panelsOf(dashboard)) {
        if (p.type === 'row') continue;
        const iv = intervals(end - start, Math.round(layout.colWidth * p.gridPos.w), scrape);
        const targets = [];
        for (const t of p.targets || []) {
            const expr = substitute(t.expr, dashboard, iv);
            let series;
            if (t.instant) {
                const r = await promQuery(args.prometheus, 'query', { query: expr, time: end });
                series = r.map((s) => ({ metric: s.metric, values: [[Number(s.value[0]), num(s.value[1])]] }));
            } else {
                const r = await promQuery(args.prometheus, 'query_range', { query: expr, start, end, step: iv.interval });
                series = r.map((s) => ({ metric: s.metric, values: s.values.map(([ts, v]) => [Number(ts), num(v)]) }));
            }
            targets.push({ refId: t.refId, legendFormat: t.legendFormat, format: t.format, instant: !!t.instant, expr, step: iv.interval, series });
            const points = series.reduce((n, s) => n + s.values.filter((v) => v[1] !== null).length, 0);
            console.log(`  ${p.title} [${t.refId}]: ${series.length} series, ${points} points`);
        }
        out[p.id] = { targets };
    }
    return out;
}

async function render(dashboard, page, args) {
    const width = 1600;
    const margin = 8;
    const layout = { width, margin, colWidth: (width - margin) / 24, cellHeight: 30 };
    console.log(`querying ${args.prometheus} from ${args.start} to ${args.end}`);
    const data = await fetchPanels(dashboard, args, layout);
    const uplotDir = path.dirname(require.resolve('uplot/package.json'));
    const html = `<!doctype html><html><head><meta charset="utf-8">
<style>${fs.readFileSync(path.join(uplotDir, 'dist/uPlot.min.css'), 'utf8')}</style>
<script>${fs.readFileSync(path.join(uplotDir, 'dist/uPlot.iife.min.js'), 'utf8')}</script>
<script>window.DASHBOARD = ${JSON.stringify(dashboard)};
window.DATA = ${JSON.stringify(data)};
window.LAYOUT = ${JSON.stringify(layout)};
window.RANGE = ${JSON.stringify({ start: Number(args.start), end: Number(args.end) })};
window.CAPTION = ${JSON.stringify(args.caption || '')};</script>
<script>${page.src}</script>
</head><body></body></html>`;

    const { chromium } = require('playwright-core');
    const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'tlsgate-render-chromium-'));
    const context = await chromium.launchPersistentContext(profile, {
        executablePath: args.chromium || '/usr/bin/chromium',
        headless: true,
        args: [
            '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
            '--disable-background-networking', '--disable-component-update', '--disable-sync',
        ],
        viewport: { width, height: 900 },
        deviceScaleFactor: 1,
    });
    try {
        const tab = context.pages()[0] || (await context.newPage());
        tab.on('pageerror', (e) => console.error(`page error: ${e.message}`));
        await tab.setContent(html, { waitUntil: 'load' });
        await tab.evaluate(() => window.renderDashboard());
        const height = await tab.evaluate(() => document.body.scrollHeight);
        await tab.setViewportSize({ width, height });
        await tab.screenshot({ path: args.out, fullPage: true });
    } finally {
        await context.close();
        fs.rmSync(profile, { recursive: true, force: true });
    }
    const size = fs.statSync(args.out).size;
    console.log(`wrote ${args.out} (${(size / 1024).toFixed(0)} KiB)`);
    if (size > 1024 * 1024) throw new Error(`${args.out} is over 1 MiB`);
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    const dashboard = JSON.parse(fs.readFileSync(args.dashboard, 'utf8'));
    const page = loadPage();
    if (args.check) return check(dashboard, page.drawers, args.rulesOut);
    for (const need of ['prometheus', 'start', 'end', 'out']) {
        if (!args[need]) throw new Error(`--${need} is required`);
    }
    await render(dashboard, page, args);
}

main().catch((e) => {
    console.error(`error: ${e.message}`);
    process.exit(1);
});
