// Offline checks of deploy/grafana/sparsekv-dashboard.json and of the PromQL in
// deploy/prometheus/sparsekv.rules.yml (live_prometheus_test.py runs the same queries against
// a real Prometheus):
//   - structure: variables datasource/namespace/instance, every query on ${datasource} and
//     filtered by namespace and instance, unique panel ids, panels on the 24-column grid
//     without overlaps;
//   - Grafana's own types (@grafana/schema): the dashboard, and each panel against its
//     plugin's options and field config, type-checked by TypeScript (unknown keys and wrong
//     values fail); a deliberately broken copy must fail the same check;
//   - every PromQL expression (panels, variables, alert rules) parses with Prometheus's lezer
//     grammar after expanding $variables; a broken expression must not.
// Usage: node dashboard_check.mjs NPM_DIR DASHBOARD_JSON RULES_YML
// Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
import { createRequire } from "node:module";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

const [npmDir, dashPath, rulesPath] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(npmDir), "package.json"));
const { parser } = require("@prometheus-io/lezer-promql");
const yaml = require("js-yaml");

let passed = 0, failed = 0;
const check = (cond, msg, detail = "") => {
  if (cond) { passed++; console.log(`PASS: ${msg}`); }
  else { failed++; console.log(`FAIL: ${msg}${detail ? ": " + detail : ""}`); }
  return cond;
};

const dash = JSON.parse(fs.readFileSync(dashPath, "utf8"));
const panels = dash.panels ?? [];
const vars = Object.fromEntries((dash.templating?.list ?? []).map((v) => [v.name, v]));

// ---- structure
check(vars.datasource?.type === "datasource" && vars.datasource.query === "prometheus",
  "variable datasource picks a Prometheus data source");
for (const name of ["namespace", "instance"]) {
  const v = vars[name];
  check(v?.type === "query" && v.includeAll && v.allValue === ".*" && v.multi
    && v.datasource?.uid === "${datasource}",
    `variable ${name}: query on \${datasource}, multi-value, All = .*`);
}
const ids = panels.map((p) => p.id);
check(new Set(ids).size === ids.length && ids.every(Number.isInteger), "panel ids unique integers");
const cells = new Map();
let overlap = [];
for (const p of panels) {
  const g = p.gridPos;
  if (!g || g.x < 0 || g.x + g.w > 24) { overlap.push(`${p.title}: outside the 24-column grid`); continue; }
  for (let x = g.x; x < g.x + g.w; x++) for (let y = g.y; y < g.y + g.h; y++) {
    const k = `${x},${y}`;
    if (cells.has(k)) overlap.push(`${p.title} overlaps ${cells.get(k)}`);
    cells.set(k, p.title);
  }
}
check(overlap.length === 0, "panels lie on the grid without overlapping", [...new Set(overlap)].join("; "));

const queryPanels = panels.filter((p) => p.type !== "row" && p.type !== "text");
const targets = queryPanels.flatMap((p) => (p.targets ?? []).map((t) => ({ p, t })));
check(queryPanels.every((p) => p.datasource?.uid === "${datasource}" && p.targets?.length),
  `every query panel (${queryPanels.length}) has targets on \${datasource}`);
check(targets.every(({ t }) => t.datasource?.uid === "${datasource}" && typeof t.expr === "string"),
  `every target (${targets.length}) has an expr on \${datasource}`);
// every vector selector (lezer's VectorSelector nodes) carries both filters
const selectors = (expr) => {
  const out = [];
  parser.parse(expr).iterate({ enter: (n) => { if (n.type.name === "VectorSelector") out.push(expr.slice(n.from, n.to)); } });
  return out;
};
const unfiltered = targets.flatMap(({ p, t }) => selectors(t.expr)
  .filter((sel) => !sel.includes('namespace=~"$namespace"') || !sel.includes('instance=~"$instance"'))
  .map((sel) => `${p.title}: ${sel}`));
check(unfiltered.length === 0, 'every selector filters namespace=~"$namespace" and instance=~"$instance"',
  unfiltered.join("; "));
check(queryPanels.every((p) => p.title && p.description), "every query panel has a title and a description");

// ---- Grafana schema types
const PLUGIN = {
  timeseries: "timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen",
  stat: "stat/panelcfg/x/StatPanelCfg_types.gen",
  table: "table/panelcfg/x/TablePanelCfg_types.gen",
  text: "text/panelcfg/x/TextPanelCfg_types.gen",
};
function tsSource(d) {
  const lines = [
    `import type { Dashboard, Panel, RowPanel, DataQuery } from "@grafana/schema";`,
    ...Object.entries(PLUGIN).map(([k, v]) =>
      `import type * as P_${k} from "@grafana/schema/dist/esm/raw/composable/${v}";`),
    // JSON has no enums: accept an enum's values as their literals.
    "type Json<T> = T extends string ? `${T}` : T extends number | boolean | null | undefined ? T",
    "  : T extends Array<infer U> ? Array<Json<U>> : { [K in keyof T]: Json<T[K]> };",
    // The fields Grafana's Prometheus data source reads from a target (it ships no type).
    `interface PromQuery extends DataQuery { expr: string; legendFormat?: string; range?: boolean;`,
    `  instant?: boolean; format?: "time_series" | "table" | "heatmap"; editorMode?: "code" | "builder";`,
    `  interval?: string; exemplar?: boolean }`,
    // Panel<Options> leaves options as Record<string, unknown>: type them by the plugin here.
    `type TypedPanel<O, F> = Omit<Panel<O, F>, "options"> & { options?: O };`,
    `export const dashboard = (${JSON.stringify(d)}) satisfies Json<Dashboard>;`,
  ];
  for (const p of d.panels ?? []) {
    const n = `panel_${p.id}`;
    if (p.type === "row") { lines.push(`export const ${n} = (${JSON.stringify(p)}) satisfies Json<RowPanel>;`); continue; }
    const plugin = PLUGIN[p.type];
    const fc = p.type === "timeseries" || p.type === "table" ? `P_${p.type}.FieldConfig` : "Record<string, unknown>";
    // Grafana fills omitted options from the plugin's defaults, so options are Partial; every
    // key given must exist and hold the right type.
    lines.push(plugin
      ? `export const ${n} = (${JSON.stringify(p)}) satisfies Json<TypedPanel<Partial<P_${p.type}.Options>, ${fc}>>;`
      : `export const ${n}: "unknown panel type ${p.type}" = 0;`);
    for (const t of p.targets ?? []) {
      lines.push(`export const ${n}_${t.refId} = (${JSON.stringify(t)}) satisfies Json<PromQuery>;`);
    }
  }
  return lines.join("\n") + "\n";
}
const gen = path.join(path.resolve(npmDir), "gen-dashboard");
fs.rmSync(gen, { recursive: true, force: true });
fs.mkdirSync(gen);
fs.writeFileSync(path.join(gen, "dashboard.ts"), tsSource(dash));
// The canary: one unknown top-level key, one misspelt legend option, one wrong enum value.
const broken = structuredClone(dash);
broken.refreshh = "30s";
const ts0 = broken.panels.find((p) => p.type === "timeseries");
ts0.options.legend.dispalyMode = "list";
ts0.options.tooltip.mode = "everything";
fs.writeFileSync(path.join(gen, "canary.ts"), tsSource(broken));
fs.writeFileSync(path.join(gen, "tsconfig.json"), JSON.stringify({
  compilerOptions: { strict: true, noEmit: true, target: "es2022", module: "esnext",
    moduleResolution: "bundler", skipLibCheck: true, types: [] },
  files: ["dashboard.ts", "canary.ts"],
}));
let out = "";
try {
  execFileSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", gen], { encoding: "utf8", cwd: gen });
} catch (e) { out = (e.stdout ?? "") + (e.stderr ?? ""); }
const errs = out.split("\n").filter((l) => /error TS\d+/.test(l));
const realErrs = errs.filter((l) => /(^|\/)dashboard\.ts\(/.test(l));
check(realErrs.length === 0,
  `dashboard and its ${panels.length} panels and ${targets.length} targets type-check against @grafana/schema`,
  realErrs.slice(0, 8).join("\n"));
const canaryErrs = errs.filter((l) => /(^|\/)canary\.ts\(/.test(l));
check(canaryErrs.length >= 3 && /refreshh/.test(out) && /dispalyMode/.test(out),
  `the type check rejects a broken copy (${canaryErrs.length} errors: unknown key, misspelt option, bad enum)`,
  out.slice(0, 1500));

// ---- PromQL
const EXPAND = { "$__rate_interval": "1m", "$namespace": ".*", "$instance": ".*" };
const expand = (e) => e.replace(/\$__rate_interval|\$namespace|\$instance/g, (m) => EXPAND[m]);
function parseErrors(expr) {
  const errs = [];
  parser.parse(expr).iterate({ enter: (n) => { if (n.type.isError) errs.push(n.from); } });
  return errs;
}
const exprs = targets.map(({ p, t }) => [`panel "${p.title}" ${t.refId}`, t.expr]);
for (const name of ["namespace", "instance"]) {
  const q = vars[name].query?.query ?? "";
  const m = q.match(/^label_values\((.*),\s*(\w+)\)$/);
  if (check(m && m[2] === name, `variable ${name} is label_values(<selector>, ${name})`, q)) {
    exprs.push([`variable ${name}`, m[1]]);
  }
}
const rules = yaml.load(fs.readFileSync(rulesPath, "utf8"));
const alertRules = rules.groups.flatMap((g) => g.rules);
for (const r of alertRules) exprs.push([`alert ${r.alert ?? r.record}`, r.expr]);
let parseFails = [];
for (const [where, e] of exprs) {
  const x = expand(e);
  if (x.includes("$")) { parseFails.push(`${where}: unexpanded variable in ${x}`); continue; }
  const errs = parseErrors(x);
  if (errs.length) parseFails.push(`${where}: error at ${errs[0]}: ${x}`);
}
check(parseFails.length === 0,
  `all ${exprs.length} PromQL expressions parse (${targets.length} panel targets, 2 variables, ${alertRules.length} rules)`,
  parseFails.join("\n"));
check(parseErrors("sum(rate(sparsekv_decode_items_total[1m])").length > 0
  && parseErrors('up{job="sparsekv" == 0').length > 0, "the PromQL parser rejects broken expressions");

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
