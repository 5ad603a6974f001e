// PhotoOps: draws the eta(t) curve on the Eta Schedule node while the user edits it.
// The curve is computed here from the widget values with the same formulas as
// kernels/eta.py (presets, custom points, power); the node's output is computed in Python.
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

app.registerExtension({
    name: "photoops.etaSchedule",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== "PhotoOps_EtaSchedule") return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const r = onNodeCreated ? onNodeCreated.apply(this, arguments) : undefined;
            this.size[1] = Math.max(this.size[1], this.computeSize()[1] + PLOT_H + 20);
            for (const w of this.widgets || []) {
                const cb = w.callback;
                w.callback = (...args) => {
                    const out = cb ? cb.apply(w, args) : undefined;
                    this.setDirtyCanvas(true, true);
                    return out;
                };
            }
            return r;
        };
        const onDrawForeground = nodeType.prototype.onDrawForeground;
        nodeType.prototype.onDrawForeground = function (ctx) {
            if (onDrawForeground) onDrawForeground.apply(this, arguments);
            if (this.flags && this.flags.collapsed) return;
            const preset = widget(this, "preset")?.value;
            const eta = Number(widget(this, "eta")?.value ?? 0);
            const points = widget(this, "points")?.value ?? "";
            const power = Number(widget(this, "power")?.value ?? 1);
            const pad = 10;
            const w = this.size[0] - 2 * pad;
            const h = PLOT_H;
            const y0 = this.size[1] - h - pad;
            ctx.save();
            ctx.fillStyle = "rgba(0,0,0,0.25)";
            ctx.fillRect(pad, y0, w, h);
            ctx.strokeStyle = "rgba(255,255,255,0.25)";
            ctx.strokeRect(pad, y0, w, h);
            ctx.beginPath();
            let ok = false;
            for (let i = 0; i <= 100; i++) {
                const u = i / 100;                      // left = clean end (t = 0), right = noisiest (t = 999)
                const e = etaAt(preset, eta, points, power, u);
                if (!Number.isFinite(e)) continue;
                const x = pad + u * w;
                const y = y0 + h - Math.min(Math.max(e, 0), 1) * h;
                if (!ok) { ctx.moveTo(x, y); ok = true; } else { ctx.lineTo(x, y); }
            }
            ctx.strokeStyle = "#f5c542";
            ctx.lineWidth = 2;
            ctx.stroke();
            ctx.fillStyle = "rgba(255,255,255,0.7)";
            ctx.font = "10px sans-serif";
            ctx.fillText("eta 1", pad + 3, y0 + 11);
            ctx.fillText("t = 0", pad + 3, y0 + h - 3);
            ctx.fillText("t = 999", pad + w - 38, y0 + h - 3);
            if (!ok) ctx.fillText("invalid points", pad + w / 2 - 30, y0 + h / 2);
            ctx.restore();
        };
    },
});
