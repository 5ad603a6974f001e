// PhotoOps: draws the eta(t) curve on the Eta Schedule node while the user edits it.
// The curve is computed here from the widget values with the same formulas as
// kernels/eta.py (presets, custom points, power); the node's output is computed in Python.
// Two renderers: the LiteGraph canvas (frontend 1.27.10, and 1.58.1 by default) calls the node's
// onDrawForeground, which draws the plot below the widgets; with the newer frontends' Vue nodes
// ("Nodes 2.0", LiteGraph.vueNodesMode) nodes are DOM and onDrawForeground never runs, so a node
// created in that mode gets a DOM widget holding a <canvas> with the same plot instead.
import { app } from "../../scripts/app.js";

const PRESETS = {
    linear_default: [0.0, 0.0, 1.0, 0.4],
    paper_A: [0.6, 0.0, 1.0, 0.7],
    paper_B: [0.3, 0.0, 1.0, 0.2],
};
const PLOT_H = 110;

function widget(node, name) {
    return (node.widgets || []).find((w) => w.name === name);
}

function parsePoints(text) {
    const pts = [];
    for (const part of String(text || "").split(/[,;\n]+/)) {
        const bits = part.replace("=", ":").split(":");
        if (bits.length !== 2) continue;
        const u = parseFloat(bits[0]);
        const e = parseFloat(bits[1]);
        if (Number.isFinite(u) && Number.isFinite(e)) pts.push([u, e]);
    }
    return pts.sort((a, b) => a[0] - b[0]);
}

// eta at normalised time u in [0, 1] (u = t / 999)
export function etaAt(preset, eta, points, power, u) {
    if (preset === "constant") return eta;
    if (preset === "custom") {
        const p = parsePoints(points);
        if (!p.length) return NaN;
        if (u <= p[0][0]) return p[0][1];
        if (u >= p[p.length - 1][0]) return p[p.length - 1][1];
        for (let i = 1; i < p.length; i++) {
            if (u <= p[i][0]) {
                const w = (u - p[i - 1][0]) / (p[i][0] - p[i - 1][0]);
                return p[i - 1][1] + w * (p[i][1] - p[i - 1][1]);
            }
        }
        return NaN;
    }
    const f = PRESETS[preset];
    if (!f) return NaN;
    const [u1, y1, u2, y2] = f;
    const c = Math.min(Math.max(u, u1), u2);
    const w = Math.pow((c - u1) / (u2 - u1), power || 1);
    return Math.max(0, y1 + (y2 - y1) * w);
}

// Draw the plot into the rectangle (x, y, w, h) of a 2D context.
function drawPlot(ctx, node, x, y, w, h) {
    const preset = widget(node, "preset")?.value;
    const eta = Number(widget(node, "eta")?.value ?? 0);
    const points = widget(node, "points")?.value ?? "";
    const power = Number(widget(node, "power")?.value ?? 1);
    ctx.save();
    ctx.fillStyle = "rgba(0,0,0,0.25)";
    ctx.fillRect(x, y, w, h);
    ctx.strokeStyle = "rgba(255,255,255,0.25)";
    ctx.strokeRect(x, y, w, h);
    ctx.beginPath();
    let ok = false;
    for (let i = 0; i <= 100; i++) {
        const u = i / 100;                      // left = clean end (t = 0), right = noisiest (t = 999)
        const e = etaAt(preset, eta, points, power, u);
        if (!Number.isFinite(e)) continue;
        const px = x + u * w;
        const py = y + h - Math.min(Math.max(e, 0), 1) * h;
        if (!ok) { ctx.moveTo(px, py); ok = true; } else { ctx.lineTo(px, py); }
    }
    ctx.strokeStyle = "#f5c542";
    ctx.lineWidth = 2;
    ctx.stroke();
    ctx.fillStyle = "rgba(255,255,255,0.7)";
    ctx.font = "10px sans-serif";
    ctx.fillText("eta 1", x + 3, y + 11);
    ctx.fillText("t = 0", x + 3, y + h - 3);
    ctx.fillText("t = 999", x + w - 38, y + h - 3);
    if (!ok) ctx.fillText("invalid points", x + w / 2 - 30, y + h / 2);
    ctx.restore();
}

function vueNodesMode() {
    return !!(globalThis.LiteGraph && globalThis.LiteGraph.vueNodesMode);
}

// Vue nodes: a DOM widget with its own <canvas>, redrawn when a value or its size changes.
function addCurveWidget(node) {
    if (typeof node.addDOMWidget !== "function") return null;
    const el = document.createElement("canvas");
    el.className = "photoops-eta-curve";
    el.style.width = "100%";
    el.style.height = PLOT_H + "px";
    el.style.display = "block";
    const redraw = () => {
        const dpr = globalThis.devicePixelRatio || 1;
        const w = Math.max(1, el.clientWidth || 200), h = PLOT_H;
        if (el.width !== Math.round(w * dpr) || el.height !== Math.round(h * dpr)) {
            el.width = Math.round(w * dpr);
            el.height = Math.round(h * dpr);
        }
        const ctx = el.getContext("2d");
        ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
        ctx.clearRect(0, 0, w, h);
        drawPlot(ctx, node, 1, 1, w - 2, h - 2);
    };
    const w = node.addDOMWidget("eta_curve", "photoops_eta_curve", el, {
        serialize: false, hideOnZoom: false,
        getMinHeight: () => PLOT_H + 10, getMaxHeight: () => PLOT_H + 10,
    });
    if (w) w.serialize = false;                 // not in the saved workflow's widgets_values
    if (typeof ResizeObserver === "function") new ResizeObserver(redraw).observe(el);
    node.__photoopsRedrawCurve = redraw;
    requestAnimationFrame(redraw);
    return w;
}

function changed(node) {
    node.setDirtyCanvas?.(true, true);
    node.__photoopsRedrawCurve?.();
}

app.registerExtension({
    name: "photoops.etaSchedule",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== "PhotoOps_EtaSchedule") return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const r = onNodeCreated ? onNodeCreated.apply(this, arguments) : undefined;
            for (const w of this.widgets || []) {
                const cb = w.callback;
                w.callback = (...args) => {
                    const out = cb ? cb.apply(w, args) : undefined;
                    changed(this);
                    return out;
                };
            }
            if (vueNodesMode() && addCurveWidget(this)) return r;
            this.size[1] = Math.max(this.size[1], this.computeSize()[1] + PLOT_H + 20);
            return r;
        };
        const onWidgetChanged = nodeType.prototype.onWidgetChanged;
        nodeType.prototype.onWidgetChanged = function () {
            const out = onWidgetChanged ? onWidgetChanged.apply(this, arguments) : undefined;
            this.__photoopsRedrawCurve?.();
            return out;
        };
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function () {
            const out = onConfigure ? onConfigure.apply(this, arguments) : undefined;
            const redraw = this.__photoopsRedrawCurve;
            if (redraw) requestAnimationFrame(redraw);   // widget values are set after creation
            return out;
        };
        const onDrawForeground = nodeType.prototype.onDrawForeground;
        nodeType.prototype.onDrawForeground = function (ctx) {
            if (onDrawForeground) onDrawForeground.apply(this, arguments);
            if (this.flags && this.flags.collapsed) return;
            if (this.__photoopsRedrawCurve) return;     // the DOM widget shows the curve
            const pad = 10;
            drawPlot(ctx, this, pad, this.size[1] - PLOT_H - pad, this.size[0] - 2 * pad, PLOT_H);
        };
    },
});
