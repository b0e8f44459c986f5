// Offline checks of the rendered Kubernetes overlays (`kubectl kustomize` output):
//   - every object validates against the Kubernetes 1.27 / prometheus-operator JSON schemas
//     (kubernetes-models) and type-checks against their TypeScript interfaces, which catches
//     the unknown and misspelt fields the schemas let through; broken copies must fail both;
//   - what schemas cannot see: selectors match the pod template's labels, Services' target
//     ports and the gRPC probes' ports exist on the container, names and namespaces line up,
//     mounted ConfigMaps exist and Secrets not shipped are optional, the ServiceMonitor selects
//     exactly one Service, the PrometheusRule equals deploy/prometheus/sparsekv.rules.yml, the
//     ingress hashes on the header the gRPC service config hashes on, the termination grace
//     covers the preStop drain, the shutdown grace and the snapshot write allowance, the
//     server flags fit the pod's resources, --snapshot_dir is a writable per-pod volume large
//     enough for the budget, the startup probe waits long enough for its restore, the pod runs
//     as the image's USER, the GPU overlay asks for a GPU;
//   - writes each overlay's server flags file to OUT_DIR/<overlay>.flags, for the caller to
//     start the real server with it.
// Usage: node k8s_check.mjs NPM_DIR REPO_ROOT OUT_DIR OVERLAY=RENDERED.yaml...
// Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
import { createRequire } from "node:module";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { isDeepStrictEqual } from "node:util";

const [npmDir, repo, outDir, ...rendered] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(npmDir), "package.json"));
const yaml = require("js-yaml");
const MODULES = {
  v1: "kubernetes-models/v1",
  "apps/v1": "kubernetes-models/apps/v1",
  "policy/v1": "kubernetes-models/policy/v1",
  "networking.k8s.io/v1": "kubernetes-models/networking.k8s.io/v1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};

let passed = 0, failed = 0;
const check = (cond, msg, detail = "") => {
  if (cond) { passed++; console.log(`PASS: ${msg}`); }
  else { failed++; console.log(`FAIL: ${msg}${detail ? ": " + detail : ""}`); }
  return cond;
};
const subset = (sel, labels) => !!sel && Object.keys(sel).length > 0
  && Object.entries(sel).every(([k, v]) => labels?.[k] === v);
const read = (p) => fs.readFileSync(path.join(repo, p), "utf8");

function validate(obj) {
  const mod = MODULES[obj.apiVersion];
  const Model = mod && require(mod)[obj.kind];
  if (!Model) return `no model for ${obj.apiVersion} ${obj.kind}`;
  try { new Model(obj).validate(); return null; } catch (e) { return e.message.slice(0, 600); }
}

// Quantities as Kubernetes writes them: 4Gi, 500M, 2, 500m.
function quantity(q) {
  const m = String(q).match(/^([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T|m)?$/);
  if (!m) return NaN;
  const mult = { Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, k: 1e3, M: 1e6, G: 1e9, T: 1e12, m: 1e-3 };
  return parseFloat(m[1]) * (m[2] ? mult[m[2]] : 1);
}
const seconds = (d) => { const m = String(d).match(/^(\d+)(ms|s|m)$/); return m ? +m[1] * { ms: 1e-3, s: 1, m: 60 }[m[2]] : NaN; };
const portOf = (addr) => +String(addr).split(":").pop();
// Snapshot directory rates measured by snapshot_bench on a local ext4 disk
// (tests/bench/RESULTS.md section 10): SnapshotDir::Write 0.19 GB/s (bound by fsync),
// SnapshotDir::Restore 0.44 GB/s. The manifests size the shutdown write allowance and the
// startup probe's window from the byte budget at these rates.
const SNAPSHOT_WRITE_BYTES_PER_S = 0.19e9;
const SNAPSHOT_RESTORE_BYTES_PER_S = 0.44e9;
const ALLOWANCE_ANNOTATION = "sparsekv/snapshot-write-allowance-seconds";

const rules = yaml.load(read("deploy/prometheus/sparsekv.rules.yml"));
const dockerUids = ["cpu", "cuda"].map((f) => +(read(`deploy/docker/Dockerfile.${f}`).match(/^USER (\d+)/m) ?? [])[1]);
const dockerPorts = (read("deploy/docker/Dockerfile.cpu").match(/^EXPOSE (.*)$/m) ?? ["", ""])[1].split(/\s+/).map(Number);
const prestopInstalled = /\/usr\/local\/bin\/sparsekv-prestop"/.test(read("deploy/docker/build.sh"));
const proto = read("proto/sparsekv/v1/kv_cache.proto");
const protoPackage = proto.match(/^package\s+([\w.]+);/m)?.[1];
const protoServices = [...proto.matchAll(/^service\s+(\w+)/gm)].map((m) => `${protoPackage}.${m[1]}`);

const TS_TYPES = {
  "v1/Namespace": ["kubernetes-models/v1/Namespace", "INamespace"],
  "v1/ConfigMap": ["kubernetes-models/v1/ConfigMap", "IConfigMap"],
  "v1/Service": ["kubernetes-models/v1/Service", "IService"],
  "apps/v1/StatefulSet": ["kubernetes-models/apps/v1/StatefulSet", "IStatefulSet"],
  "policy/v1/PodDisruptionBudget": ["kubernetes-models/policy/v1/PodDisruptionBudget", "IPodDisruptionBudget"],
  "networking.k8s.io/v1/Ingress": ["kubernetes-models/networking.k8s.io/v1/Ingress", "IIngress"],
  "monitoring.coreos.com/v1/ServiceMonitor": ["@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor", "IServiceMonitor"],
  "monitoring.coreos.com/v1/PrometheusRule": ["@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule", "IPrometheusRule"],
};
const tsFiles = {};
function tsSource(objs) {
  const imports = new Set(), lines = [];
  objs.forEach((o, i) => {
    const t = TS_TYPES[`${o.apiVersion}/${o.kind}`];
    if (!t) { lines.push(`export const o${i}: "no TypeScript type for ${o.apiVersion} ${o.kind}" = 0;`); return; }
    imports.add(`import type { ${t[1]} } from "${t[0]}";`);
    lines.push(`export const o${i} = (${JSON.stringify(o)}) satisfies ${t[1]};`);
  });
  return [...imports, ...lines].join("\n") + "\n";
}

fs.mkdirSync(outDir, { recursive: true });
for (const arg of rendered) {
  const [overlay, file] = arg.split("=");
  const objs = yaml.loadAll(fs.readFileSync(file, "utf8")).filter(Boolean);
  const P = `${overlay}:`;
  const of = (kind) => objs.filter((o) => o.kind === kind);
  const one = (kind, name) => objs.find((o) => o.kind === kind && (!name || o.metadata.name === name));
  check(objs.length >= 9, `${P} rendered ${objs.length} objects (${[...new Set(objs.map((o) => o.kind))].join(", ")})`);

  // -- schemas and types
  const invalid = objs.map((o) => [o, validate(o)]).filter(([, e]) => e);
  check(invalid.length === 0, `${P} every object validates against its JSON schema`,
    invalid.map(([o, e]) => `${o.kind}/${o.metadata?.name}: ${e}`).join("\n"));
  tsFiles[`${overlay}.ts`] = tsSource(objs);

  // -- namespaces and names
  const nsObj = of("Namespace");
  const ns = nsObj[0]?.metadata.name;
  check(nsObj.length === 1, `${P} ships its Namespace (${ns})`);
  const wrongNs = objs.filter((o) => o.kind !== "Namespace" && o.metadata.namespace !== ns);
  check(wrongNs.length === 0, `${P} every object is in namespace ${ns}`, wrongNs.map((o) => `${o.kind}/${o.metadata.name}`).join(", "));
  const keys = objs.map((o) => `${o.kind}/${o.metadata.name}`);
  check(new Set(keys).size === keys.length, `${P} no two objects of a kind share a name`);

  // -- StatefulSet, pods, Services
  const sts = one("StatefulSet");
  const pod = sts?.spec.template;
  const podLabels = pod?.metadata.labels;
  const c = pod?.spec.containers.find((x) => x.name === "sparsekv");
  if (!check(sts && c, `${P} StatefulSet with container sparsekv`)) continue;
  check(subset(sts.spec.selector.matchLabels, podLabels), `${P} StatefulSet selector matches its template labels`);
  check(sts.spec.replicas >= 2, `${P} at least 2 replicas (${sts.spec.replicas})`);
  const ports = Object.fromEntries((c.ports ?? []).map((p) => [p.name, p.containerPort]));
  check(isDeepStrictEqual(Object.values(ports).sort(), [...dockerPorts].sort()),
    `${P} container ports ${JSON.stringify(ports)} are the images' EXPOSE ports`);
  const headless = one("Service", sts.spec.serviceName);
  check(headless?.spec.clusterIP === "None" && subset(headless.spec.selector, podLabels),
    `${P} serviceName ${sts.spec.serviceName} is a headless Service selecting the pods`);
  for (const svc of of("Service")) {
    check(subset(svc.spec.selector, podLabels), `${P} Service ${svc.metadata.name} selects the pods`);
    const badPorts = svc.spec.ports.filter((p) => typeof p.targetPort === "string" ? !(p.targetPort in ports)
      : !Object.values(ports).includes(p.targetPort ?? p.port));
    check(badPorts.length === 0, `${P} Service ${svc.metadata.name} target ports exist on the container`,
      badPorts.map((p) => p.name).join(", "));
  }
  for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
    const pr = c[probe];
    check(pr?.grpc && pr.grpc.port === ports.grpc && !pr.grpc.service,
      `${P} ${probe} is a gRPC health probe on the grpc container port ${ports.grpc}`, JSON.stringify(pr));
  }
  const pdb = one("PodDisruptionBudget");
  check(pdb && subset(pdb.spec.selector.matchLabels, podLabels) && (pdb.spec.maxUnavailable ?? 0) >= 1
    && (pdb.spec.maxUnavailable ?? sts.spec.replicas) < sts.spec.replicas,
    `${P} PodDisruptionBudget selects the pods and lets one of ${sts.spec.replicas} go at a time`);

  // -- security: the image's user
  const sc = pod.spec.securityContext ?? {};
  check(sc.runAsNonRoot === true && dockerUids.every((u) => u === sc.runAsUser),
    `${P} pods run as non-root uid ${sc.runAsUser}, the Dockerfiles' USER (${dockerUids})`);
  check(c.securityContext?.allowPrivilegeEscalation === false && c.securityContext?.readOnlyRootFilesystem === true
    && c.securityContext?.capabilities?.drop?.includes("ALL"), `${P} container drops privileges, read-only root`);
  // Volumes are owned by root unless fsGroup hands them to the server's group.
  check(sc.fsGroup === sc.runAsGroup && sc.runAsGroup !== undefined && sc.runAsGroup !== 0,
    `${P} fsGroup ${sc.fsGroup} is the server's group (${sc.runAsGroup}): it can write its volume`);

  // -- volumes: ConfigMaps shipped, Secrets optional
  const volumes = Object.fromEntries(pod.spec.volumes.map((v) => [v.name, v]));
  const claims = Object.fromEntries((sts.spec.volumeClaimTemplates ?? []).map((v) => [v.metadata.name, v]));
  for (const v of pod.spec.volumes) {
    if (v.configMap) check(one("ConfigMap", v.configMap.name), `${P} volume ${v.name}: ConfigMap ${v.configMap.name} is shipped`);
    // The token Secret is the operator's to create (never shipped) and required: without it
    // the pod waits with a clear event instead of starting a server that refuses everyone.
    if (v.secret) check(one("Secret", v.secret.secretName) || v.secret.optional === true || v.name === "tokens",
      `${P} volume ${v.name}: Secret ${v.secret.secretName} is shipped, optional, or the operator's token Secret`);
  }
  const mounts = c.volumeMounts.filter((m) => !volumes[m.name] && !claims[m.name]);
  check(mounts.length === 0, `${P} every volumeMount names a volume or a volumeClaimTemplate`);
  check(["tokens", "tls"].every((n) => volumes[n]?.secret),
    `${P} token and TLS Secrets are referenced`);

  // -- server flags from the mounted ConfigMap
  const flagfileArg = (c.args ?? []).find((a) => a.startsWith("--flagfile="));
  const flagfile = flagfileArg?.slice("--flagfile=".length);
  const mount = flagfile && c.volumeMounts.find((m) => flagfile.startsWith(m.mountPath + "/"));
  const cm = mount && one("ConfigMap", volumes[mount.name]?.configMap?.name);
  const flagsText = cm?.data?.[flagfile.slice(mount.mountPath.length + 1)];
  if (!check(typeof flagsText === "string", `${P} --flagfile=${flagfile} is a key of the mounted ConfigMap`)) continue;
  fs.writeFileSync(path.join(outDir, `${overlay}.flags`), flagsText);
  const flags = Object.fromEntries(flagsText.split("\n").filter((l) => l.startsWith("--"))
    .map((l) => l.slice(2).split("=")));
  check(portOf(flags.listen) === ports.grpc && portOf(flags.metrics_listen) === ports.metrics,
    `${P} --listen and --metrics_listen use the container ports`);
  const tokenMount = c.volumeMounts.find((m) => m.name === "tokens");
  check(flags.auth === "token" && tokenMount?.readOnly &&
        flags.auth_token_file?.startsWith(tokenMount.mountPath + "/") &&
        volumes.tokens?.secret && volumes.tokens.secret.optional !== true,
    `${P} --auth=token with --auth_token_file=${flags.auth_token_file} in the required token Secret's read-only mount`);
  const env = Object.fromEntries((c.env ?? []).map((e) => [e.name, e.value]));
  check(+env.SPARSEKV_METRICS_PORT === ports.metrics, `${P} preStop hook reads /metrics on the metrics port`);
  const memLimit = quantity(c.resources?.limits?.memory);
  const budget = +flags.host_budget_bytes;
  check(budget > 0 && budget <= 0.85 * memLimit,
    `${P} --host_budget_bytes ${(budget / 2 ** 30).toFixed(1)} GiB leaves >= 15% of the ${c.resources?.limits?.memory} memory limit`);
  check(c.resources?.requests?.memory === c.resources?.limits?.memory,
    `${P} memory request = limit (the budget is sized against it)`);
  const cpus = quantity(c.resources?.requests?.cpu);
  check(+flags.decode_threads >= 1 && +flags.decode_threads + 1 <= cpus,
    `${P} --decode_threads=${flags.decode_threads} fits the ${cpus}-CPU request with a CPU to spare`);

  // -- snapshots: --snapshot_dir on the pod's own writable volume, sized for the budget
  const snapMount = c.volumeMounts.find((m) => m.mountPath === flags.snapshot_dir);
  const claim = snapMount && claims[snapMount.name];
  check(claim && !snapMount.readOnly && !volumes[snapMount.name],
    `${P} --snapshot_dir=${flags.snapshot_dir} is a writable mount of volumeClaimTemplate ${snapMount?.name} (one volume per pod)`);
  const storage = quantity(claim?.spec.resources?.requests?.storage);
  check(isDeepStrictEqual(claim?.spec.accessModes, ["ReadWriteOnce"]) && storage >= budget,
    `${P} snapshot volume ReadWriteOnce, ${claim?.spec.resources?.requests?.storage} >= the ${(budget / 2 ** 30).toFixed(1)} GiB budget it may have to hold`);
  check(seconds(flags.checkpoint_interval) > 0,
    `${P} --checkpoint_interval=${flags.checkpoint_interval}: a crash loses at most one interval of changes`);
  check(sts.spec.persistentVolumeClaimRetentionPolicy?.whenScaled === "Delete",
    `${P} a replica scaled away deletes its volume (no stale sessions on a later scale-up)`);
  const startup = c.startupProbe ?? {};
  const startupWindow = (startup.periodSeconds ?? 10) * (startup.failureThreshold ?? 3);
  const restoreS = budget / SNAPSHOT_RESTORE_BYTES_PER_S;
  check(startupWindow >= 1.5 * restoreS,
    `${P} startup probe window ${startupWindow} s >= 1.5 x restoring the whole budget at 0.44 GB/s (${restoreS.toFixed(0)} s)`);

  // -- termination: preStop drain + shutdown grace + the shutdown snapshot write
  const pre = c.lifecycle?.preStop?.exec?.command ?? [];
  check(pre[0] === "/usr/local/bin/sparsekv-prestop" && prestopInstalled,
    `${P} preStop runs the hook deploy/docker/build.sh installs`, pre.join(" "));
  const allowance = +(pod.metadata.annotations?.[ALLOWANCE_ANNOTATION] ?? NaN);
  const writeS = budget / SNAPSHOT_WRITE_BYTES_PER_S;
  check(allowance >= writeS,
    `${P} ${ALLOWANCE_ANNOTATION} ${allowance} >= writing the whole budget at 0.19 GB/s (${writeS.toFixed(0)} s)`);
  const needed = +env.SPARSEKV_DRAIN_PROPAGATION_S + +env.SPARSEKV_DRAIN_MAX_S + seconds(flags.shutdown_grace) + allowance;
  check(pod.spec.terminationGracePeriodSeconds > needed,
    `${P} terminationGracePeriodSeconds ${pod.spec.terminationGracePeriodSeconds} > drain propagation + max wait + --shutdown_grace + snapshot write allowance (${needed})`);

  // -- monitoring
  const sm = one("ServiceMonitor");
  const selected = of("Service").filter((s) => subset(sm?.spec.selector.matchLabels, s.metadata.labels));
  check(selected.length === 1, `${P} ServiceMonitor selects exactly one Service (each pod scraped once)`,
    selected.map((s) => s.metadata.name).join(", "));
  const smSvc = selected[0];
  check(smSvc && sm.spec.endpoints.every((e) => smSvc.spec.ports.some((p) => p.name === e.port)),
    `${P} ServiceMonitor endpoint ports exist on Service ${smSvc?.metadata.name}`);
  check(smSvc?.metadata.labels?.[sm.spec.jobLabel] === "sparsekv",
    `${P} ServiceMonitor job label is "sparsekv", as the alert rules select`);
  const pr = one("PrometheusRule");
  check(pr && isDeepStrictEqual(pr.spec.groups, rules.groups),
    `${P} PrometheusRule groups equal deploy/prometheus/sparsekv.rules.yml`);

  // -- ingress and client-side routing
  const ing = one("Ingress");
  const ann = ing?.metadata.annotations ?? {};
  check(ann["nginx.ingress.kubernetes.io/backend-protocol"] === "GRPC" && ing.spec.ingressClassName === "nginx",
    `${P} Ingress: ingress-nginx with a gRPC backend`);
  const hashBy = ann["nginx.ingress.kubernetes.io/upstream-hash-by"];
  check(hashBy === "$http_x_session_id", `${P} Ingress hashes on the x-session-id header`, hashBy);
  const backends = ing.spec.rules.flatMap((r) => r.http.paths.map((p) => p.backend.service));
  check(backends.every((b) => one("Service", b.name)?.spec.ports.some((p) => p.name === b.port.name)),
    `${P} Ingress backends are shipped Services and ports`);
  check(ing.spec.tls?.[0]?.secretName && ing.spec.rules.every((r) => ing.spec.tls[0].hosts.includes(r.host)),
    `${P} Ingress serves its host over TLS (gRPC needs HTTP/2 through ingress-nginx)`);
  const paths = ing.spec.rules.flatMap((r) => r.http.paths.map((p) => p.path.slice(1)));
  check(paths.every((p) => protoServices.includes(p) || p === "grpc.health.v1.Health"),
    `${P} Ingress paths are the proto's services and gRPC health`, paths.join(", "));
  const clientCm = objs.find((o) => o.kind === "ConfigMap" && o.data?.["grpc-service-config.json"]);
  let sc2 = null;
  try { sc2 = JSON.parse(clientCm.data["grpc-service-config.json"]); } catch { /* reported below */ }
  const ring = sc2?.loadBalancingConfig?.[0]?.ring_hash_experimental;
  check(ring && ring.requestHashHeader === hashBy.replace(/^\$http_/, "").replace(/_/g, "-")
    && ring.minRingSize <= ring.maxRingSize,
    `${P} gRPC service config: ring_hash on ${ring?.requestHashHeader}, the ingress's header`);
  const svcNames = (sc2?.methodConfig ?? []).flatMap((m) => m.name.map((n) => n.service));
  check(svcNames.length > 0 && svcNames.every((s) => protoServices.includes(s)),
    `${P} gRPC service config names services of the proto (${protoServices})`, svcNames.join(", "));

  // -- flavour
  const gpus = +(c.resources?.limits?.["nvidia.com/gpu"] ?? 0);
  if (overlay === "gpu") {
    check(gpus >= 1 && /^sparsekv-cuda:/.test(c.image), `${P} one GPU per pod and the CUDA image (${c.image})`);
    check((pod.spec.tolerations ?? []).some((t) => t.key === "nvidia.com/gpu"), `${P} tolerates the GPU nodes' taint`);
  } else {
    check(gpus === 0 && /^sparsekv-cpu:/.test(c.image), `${P} no GPU, the CPU image (${c.image})`);
  }
}

// ---- TypeScript: one program for every overlay plus a canary that must fail
const canary = [
  { apiVersion: "apps/v1", kind: "StatefulSet", metadata: { name: "x" },
    spec: { replica: 3, selector: {}, serviceName: "x", template: { spec: { containers: [
      { name: "x", readinessProbe: { grcp: { port: 1 } } }] } } } },
];
tsFiles["canary.ts"] = tsSource(canary);
const gen = path.join(path.resolve(npmDir), "gen-k8s");
fs.rmSync(gen, { recursive: true, force: true });
fs.mkdirSync(gen);
for (const [f, src] of Object.entries(tsFiles)) fs.writeFileSync(path.join(gen, f), src);
fs.writeFileSync(path.join(gen, "tsconfig.json"), JSON.stringify({
  compilerOptions: { strict: true, noEmit: true, target: "es2022", module: "esnext",
    moduleResolution: "bundler", skipLibCheck: true, types: [] },
  files: Object.keys(tsFiles),
}));
let out = "";
try {
  execFileSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", gen], { encoding: "utf8", cwd: gen });
} catch (e) { out = (e.stdout ?? "") + (e.stderr ?? ""); }
const errs = out.split("\n").filter((l) => /error TS\d+/.test(l));
for (const f of Object.keys(tsFiles).filter((f) => f !== "canary.ts")) {
  const mine = errs.filter((l) => l.startsWith(f + "("));
  check(mine.length === 0, `${f.replace(".ts", "")}: every object type-checks (no unknown fields)`, mine.slice(0, 6).join("\n"));
}
check(/replica\b/.test(out) || /grcp/.test(out), "the type check rejects unknown fields (canary: replica, grcp)",
  out.slice(0, 800));
check(validate({ ...canary[0], spec: { ...canary[0].spec, replicas: "three" } }) !== null,
  "the schema check rejects a wrong type (canary: replicas: \"three\")");

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
