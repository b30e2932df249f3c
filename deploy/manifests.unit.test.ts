/**
 * Checks the deployment artifacts against the code, without Docker or a cluster:
 *
 * - every YAML file under deploy/k8s and deploy/compose parses;
 * - every Kubernetes object validates against its kubernetes-models schema, and the kustomization
 *   lists every manifest (and only manifests);
 * - every service command (k8s args, compose command, Dockerfile CMD) names an entry file that
 *   exists, and the entry's whole import closure is copied into the image and not dockerignored;
 * - every environment variable the entry's code reads is set (env, envFrom, secret files, image
 *   ENV) unless listed as optional below, and every variable a deployment sets is read by its code;
 * - secret/config references resolve; probes, Services and health checks point at declared ports
 *   that the service is told to listen on; selectors of Services and PDBs match Deployments;
 * - security and sizing rules (non-root, read-only root fs, memory limits), the user service's port
 *   closed to all but the gateway, and NATS >= 2.12.
 */
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Deployment, StatefulSet } from "kubernetes-models/apps/v1";
import { NetworkPolicy } from "kubernetes-models/networking.k8s.io/v1";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1";
import { ConfigMap, type IContainer, Namespace, Secret, Service, ServiceAccount } from "kubernetes-models/v1";
import { describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { MIN_SECRET_BYTES } from "../common/auth-token.ts";
import { OrderService } from "../proto/gen/jetsaga/order/v1/order_pb.ts";
import { UserService } from "../proto/gen/jetsaga/user/v1/user_pb.ts";
import { SERVICE_ENV, SERVICE_V8_FLAGS } from "./local/service-process.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const K8S = join(ROOT, "deploy/k8s");
const COMPOSE = join(ROOT, "deploy/compose");
const DOCKERFILE = join(ROOT, "deploy/docker/Dockerfile");
/** JETSAGA_SHUTDOWN_TIMEOUT_SECONDS' default (common/config.ts): a stop must end before SIGKILL. */
const SHUTDOWN_TIMEOUT_SECONDS = 25;

/** Variables the code reads that a deployment may leave unset, with the reason ("*": any entry). */
const OPTIONAL_ENV: Readonly<Record<string, Readonly<Record<string, string>>>> = {
  "*": {
    JETSAGA_WORKFLOW_MODULES: "extra workflow modules; the image ships the built-in workflows only",
    NOTIFY_WEBHOOK_URL: "unset = notifications are logged; a webhook URL may hold a token (use a Secret)",
    PROBE_HOST: "readConfig() reads it for every service; only services with a probe port need it",
    JETSAGA_STREAM_REPLICAS: "unset = streams keep their replicas; set where the cluster is R3",
    NATS_CREDS: "one of three ways to authenticate to NATS; the sample cluster's NATS has no auth",
    NATS_USER: "one of three ways to authenticate to NATS; the sample cluster's NATS has no auth",
    NATS_PASSWORD: "one of three ways to authenticate to NATS; the sample cluster's NATS has no auth",
    NATS_TOKEN: "one of three ways to authenticate to NATS; the sample cluster's NATS has no auth",
    JETSAGA_SHUTDOWN_TIMEOUT_SECONDS: "unset = 25 s, under the manifests' 30 s termination grace period",
    DATABASE_POOL_SIZE: "unset = 4 connections per service with a database; raise with the database's cores",
  },
  "api/main.ts": {
    API_STREAM_RESET_LIMIT:
      "unset = Node's HTTP/2 defaults: 1,000 cancelled streams, then 33 per second per connection",
    API_MAX_STREAMS_PER_CONNECTION: "unset = 256 calls open at once per HTTP/2 connection",
    API_CLIENT_ADDRESS_HEADER:
      "unset = the TCP peer is the client; set (e.g. x-forwarded-for) only behind a proxy that appends to it",
    API_SIGNUP_MAX_CREDIT_CENTS:
      "unset = a public sign-up chooses its own credit limit, as the walkthrough does; api.yaml has it commented out",
    API_OPERATOR_TOKEN: "only with API_SIGNUP_MAX_CREDIT_CENTS (a Secret key, commented out in api.yaml)",
  },
  "orchestrator/service/main.ts": {
    DATABASE_URL: "readConfig() reads it for every service; the orchestrator keeps no database",
    JETSAGA_VERSION_SKEW_DELIVERIES:
      "unset = 8 deliveries (about a minute) for a message only a newer version knows, during a rolling update",
  },
  "workers/user/main.ts": {
    JETSAGA_RETENTION_DAYS:
      "default 14 days of processed-command replies and published outbox rows (1-7 is taken as 8)",
  },
  "workers/notification/main.ts": {
    JETSAGA_RETENTION_DAYS: "default 14 days of delivered and failed notifications (1-7 is taken as 8)",
  },
};

function isOptional(entry: string, name: string): boolean {
  return name in (OPTIONAL_ENV["*"] ?? {}) || name in (OPTIONAL_ENV[entry] ?? {});
}
/**
 * Variables read by Node itself, or by the tracing preload (`--import=/app/common/tracing-sdk.ts`
 * in NODE_OPTIONS) and the OpenTelemetry exporter it starts, rather than by the service's own code.
 * Named one by one: a misspelt OTEL_ variable is ignored by the SDK as silently as any other.
 * A test below checks each is still read by tracing-sdk.ts or the installed OTLP exporter (Node's
 * own NODE_ variables aside).
 */
const RUNTIME_ENV: ReadonlySet<string> = new Set([
  "NODE_OPTIONS",
  // Node itself, at start-up: a private CA for sslmode=verify-full (docs/DEPLOYMENT.md, "Secrets").
  "NODE_EXTRA_CA_CERTS",
  // common/tracing-sdk.ts
  "JETSAGA_TRACING",
  "OTEL_SDK_DISABLED",
  "OTEL_SERVICE_NAME",
  "OTEL_LOG_LEVEL",
  "OTEL_TRACES_SAMPLER",
  "OTEL_TRACES_SAMPLER_ARG",
  "OTEL_BSP_SCHEDULE_DELAY",
  // @opentelemetry/otlp-exporter-base (OTLPTraceExporter: the generic name and its TRACES_ variant)
  ...[
    "ENDPOINT",
    "HEADERS",
    "TIMEOUT",
    "COMPRESSION",
    "CERTIFICATE",
    "CLIENT_CERTIFICATE",
    "CLIENT_KEY",
  ].flatMap((setting) => [`OTEL_EXPORTER_OTLP_${setting}`, `OTEL_EXPORTER_OTLP_TRACES_${setting}`]),
]);

/**
 * How each service entry listens: the variables naming its port and its address, and the code's
 * default port (every address defaults to 127.0.0.1, unreachable from outside the container):
 * PROBE_PORT/PROBE_HOST (common/config.ts `probeHost`, the entry's `integerSetting(env, "PROBE_PORT")`),
 * API_PORT/API_HOST (api/main.ts), USER_GRPC_PORT/USER_GRPC_HOST (api/user/config.ts),
 * VISUALISER_PORT/VISUALISER_HOST (visualiser/main.ts). A test checks the code still reads them.
 */
const LISTENERS: Readonly<Record<string, { port: string; host: string; defaultPort: number }>> = {
  "orchestrator/service/main.ts": { port: "PROBE_PORT", host: "PROBE_HOST", defaultPort: 9464 },
  "workers/notification/main.ts": { port: "PROBE_PORT", host: "PROBE_HOST", defaultPort: 9464 },
  "workers/user/main.ts": { port: "USER_GRPC_PORT", host: "USER_GRPC_HOST", defaultPort: 50061 },
  "api/main.ts": { port: "API_PORT", host: "API_HOST", defaultPort: 8080 },
  "visualiser/main.ts": { port: "VISUALISER_PORT", host: "VISUALISER_HOST", defaultPort: 8090 },
};
/** Addresses that accept connections to the pod's (or compose container's) own IP. */
const ALL_INTERFACES = new Set(["0.0.0.0", "::", "[::]"]);
/** Upper bound on any container's memory limit, in MiB (the user service's scrypt needs the most). */
const MAX_MEMORY_LIMIT_MIB = 512;
/**
 * Room a container's memory limit leaves beside V8's heap limit, in MiB: code, stacks, buffers and
 * the native heap (~60 MiB of a service's RSS is outside the JS heap). With less, a process whose
 * live data grows is OOM-killed by the kubelet before V8's own heap-out-of-memory error says why.
 */
const OFF_HEAP_MIB = 64;
const MIN_NATS: readonly [number, number] = [2, 12];

type Doc = Record<string, unknown>;

// ---------------------------------------------------------------------------------- small helpers

function isDoc(value: unknown): value is Doc {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
function docOf(value: unknown): Doc {
  return isDoc(value) ? value : {};
}
function listOf(value: unknown): unknown[] {
  return Array.isArray(value) ? value : [];
}
function rel(path: string): string {
  return relative(ROOT, path);
}

function yamlFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...yamlFiles(path));
    else if (/\.ya?ml$/.test(name)) out.push(path);
  }
  return out.sort();
}

/** All documents of a YAML file; throws with the file name on a syntax error. */
function parseYaml(path: string): unknown[] {
  return parseAllDocuments(readFileSync(path, "utf8"), { merge: true }).map((doc) => {
    if (doc.errors.length > 0)
      throw new Error(`${rel(path)}: ${doc.errors.map((e) => e.message).join("; ")}`);
    return doc.toJS({ maxAliasCount: 100 }) as unknown;
  });
}

/** "128Mi" → 128; "1Gi" → 1024; plain bytes too. */
function mebibytes(quantity: string | number | undefined): number {
  if (quantity === undefined) return Number.NaN;
  const match = /^(\d+(?:\.\d+)?)(Ki|Mi|Gi|K|M|G)?$/.exec(String(quantity));
  if (!match) return Number.NaN;
  const factor: Record<string, number> = {
    Ki: 1 / 1024,
    Mi: 1,
    Gi: 1024,
    K: 1e3 / 2 ** 20,
    M: 1e6 / 2 ** 20,
    G: 1e9 / 2 ** 20,
  };
  return Number(match[1]) * (match[2] ? (factor[match[2]] ?? Number.NaN) : 1 / 2 ** 20);
}

/**
 * V8's heap limit, in MiB, under the flags of `nodeOptions`: the old space plus the young
 * generation, 3 semi-spaces (two and the new large-object space). NaN without both flags: V8 then
 * sizes the heap for the host's memory, not the container's.
 */
function v8HeapCapMib(nodeOptions: string | undefined): number {
  const flag = (name: string): number => {
    const match = new RegExp(`(?:^|\\s)--${name}=(\\d+)(?=\\s|$)`).exec(nodeOptions ?? "");
    return match ? Number(match[1]) : Number.NaN;
  };
  return flag("max-old-space-size") + 3 * flag("max-semi-space-size");
}

/**
 * Deployments whose containers' memory limits do not hold V8's heap limit (from the NODE_OPTIONS
 * the container starts with) plus {@link OFF_HEAP_MIB}.
 */
function heapProblems(objects: readonly K8sObject[], imageEnv: ReadonlyMap<string, string>): string[] {
  const problems: string[] = [];
  for (const { o, d } of deployments(objects)) {
    for (const c of d.spec?.template.spec?.containers ?? []) {
      const options = containerEnv(c, objects, imageEnv).get("NODE_OPTIONS")?.value;
      const cap = v8HeapCapMib(options);
      const limit = mebibytes(c.resources?.limits?.memory);
      if (!(limit >= cap + OFF_HEAP_MIB)) {
        problems.push(
          `${o.name}: memory limit ${String(c.resources?.limits?.memory)} is below V8's heap limit ${cap} MiB ` +
            `(NODE_OPTIONS ${JSON.stringify(options)}) + ${OFF_HEAP_MIB} MiB outside the heap`,
        );
      }
    }
  }
  return problems;
}

function versionAtLeast(tag: string, [major, minor]: readonly [number, number]): boolean {
  const match = /^(\d+)\.(\d+)/.exec(tag);
  if (!match) return false;
  const [maj, min] = [Number(match[1]), Number(match[2])];
  return maj > major || (maj === major && min >= minor);
}

// ------------------------------------------------------------------------- code: imports and env

const closureCache = new Map<string, string[]>();

/** Source without comments, so doc comments naming variables do not count as reads. */
function codeOf(file: string): string {
  return readFileSync(file, "utf8")
    .replace(/\/\*[\s\S]*?\*\//g, "")
    .split("\n")
    .filter((line) => !line.trimStart().startsWith("//"))
    .join("\n");
}

/**
 * The files an entry loads at run time: relative static and dynamic imports, transitively
 * (type-only imports are erased, so they do not count). Throws for an import of a missing file.
 */
function importClosure(entry: string): string[] {
  const cached = closureCache.get(entry);
  if (cached) return cached;
  const seen = new Set<string>();
  const queue = [resolve(ROOT, entry)];
  while (queue.length > 0) {
    const file = queue.pop()!;
    if (seen.has(file)) continue;
    if (!existsSync(file)) throw new Error(`${rel(file)} is imported but does not exist`);
    seen.add(file);
    const code = codeOf(file);
    const specifiers = [
      ...code.matchAll(/\b(?:import|export)\s+(?!type\b)[^;]*?\bfrom\s*["'](\.{1,2}\/[^"']+)["']/g),
      ...code.matchAll(/\bimport\s*\(?\s*["'](\.{1,2}\/[^"']+)["']/g),
    ].map((m) => m[1]!);
    for (const spec of specifiers) queue.push(resolve(dirname(file), spec));
  }
  const files = [...seen].sort();
  closureCache.set(entry, files);
  return files;
}

/** Environment variables read by the files: `env.X`, `process.env.X`, `env["X"]`, `(env, "X"` or `(process.env, "X"`, `env.get("X")`. */
function envReads(files: readonly string[]): Set<string> {
  const names = new Set<string>();
  const patterns = [
    /\benv\.([A-Z][A-Z0-9_]*)\b/g,
    /\benv\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]/g,
    /\(\s*(?:process\.)?env\s*,\s*["']([A-Z][A-Z0-9_]*)["']/g,
    /\benv\.get\(\s*["']([A-Z][A-Z0-9_]*)["']/g,
  ];
  for (const file of files) {
    const code = codeOf(file);
    for (const pattern of patterns) for (const m of code.matchAll(pattern)) names.add(m[1]!);
  }
  return names;
}

/** The `.ts` entry among node's arguments (flags such as --env-file come first). */
function entryOf(args: readonly unknown[]): string | undefined {
  const entry = args.find((a) => typeof a === "string" && !a.startsWith("-") && a.endsWith(".ts"));
  return typeof entry === "string" ? entry : undefined;
}

/** Checks one service's environment against its code; returns problems as sentences. */
function envProblems(
  where: string,
  entry: string,
  set: ReadonlySet<string>,
  explicit: readonly string[],
): string[] {
  const reads = envReads(importClosure(entry));
  const problems: string[] = [];
  for (const name of reads) {
    if (!set.has(name) && !isOptional(entry, name)) {
      problems.push(`${where}: ${entry} reads ${name}, which is not set (set it, or add it to OPTIONAL_ENV)`);
    }
  }
  for (const name of explicit) {
    if (!reads.has(name) && !RUNTIME_ENV.has(name)) {
      problems.push(
        `${where}: sets ${name}, but nothing ${entry} loads reads it (typo, or code not wired yet)`,
      );
    }
  }
  return problems;
}

/** Ports (as strings) that a URL-ish value or a list of env values names. */
function urlPort(value: string): string | undefined {
  try {
    return new URL(value).port || undefined;
  } catch {
    return undefined;
  }
}

// ------------------------------------------------------------------------------------ Dockerfile

interface DockerfileInfo {
  baseImages: string[];
  copied: string[];
  env: Map<string, string>;
  user: string | undefined;
  /** RUN commands of the last stage, with the USER in effect for each. */
  runs: Array<{ user: string | undefined; command: string }>;
  entrypoint: unknown;
  cmd: unknown;
  healthcheck: boolean;
}

function readDockerfile(): DockerfileInfo {
  // Join continuation lines, drop comments.
  const lines = readFileSync(DOCKERFILE, "utf8")
    .replace(/\\\n/g, " ")
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith("#"));
  const args = new Map<string, string>();
  const info: DockerfileInfo = {
    baseImages: [],
    copied: [],
    env: new Map(),
    user: undefined,
    runs: [],
    entrypoint: undefined,
    cmd: undefined,
    healthcheck: false,
  };
  for (const line of lines) {
    const [instr = "", ...rest] = line.split(/\s+/);
    const text = line.slice(instr.length).trim();
    switch (instr.toUpperCase()) {
      case "ARG": {
        const [name, value] = text.split("=");
        if (name && value !== undefined) args.set(name, value);
        break;
      }
      case "FROM":
        info.baseImages.push((rest[0] ?? "").replace(/\$\{(\w+)\}/g, (_, n: string) => args.get(n) ?? ""));
        info.runs = [];
        info.user = undefined;
        break;
      case "RUN":
        info.runs.push({ user: info.user, command: text });
        break;
      case "COPY":
        if (!rest.some((r) => r.startsWith("--from"))) {
          const paths = rest.filter((r) => !r.startsWith("--"));
          info.copied.push(...paths.slice(0, -1));
        }
        break;
      case "ENV":
        for (const m of text.matchAll(/(\w+)=("[^"]*"|\S+)/g)) info.env.set(m[1]!, m[2]!.replace(/"/g, ""));
        break;
      case "USER":
        info.user = text;
        break;
      case "ENTRYPOINT":
        info.entrypoint = JSON.parse(text);
        break;
      case "CMD":
        info.cmd = JSON.parse(text);
        break;
      case "HEALTHCHECK":
        info.healthcheck = true;
        break;
    }
  }
  return info;
}

/** A .dockerignore as a predicate on repository-relative paths (last matching pattern wins). */
function dockerignore(): (path: string) => boolean {
  const rules = readFileSync(join(ROOT, ".dockerignore"), "utf8")
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith("#"))
    .map((pattern) => {
      const negate = pattern.startsWith("!");
      const body = (negate ? pattern.slice(1) : pattern).replace(/^\/+|\/+$/g, "");
      const source = body
        .split("/")
        .map((part) =>
          part === "**"
            ? "(?:.*)"
            : part
                .replace(/[.+^${}()|[\]\\]/g, "\\$&")
                .replace(/\*/g, "[^/]*")
                .replace(/\?/g, "[^/]"),
        )
        .join("/")
        .replace(/\(\?:\.\*\)\//g, "(?:.*/)?");
      // A pattern matching a directory excludes everything below it.
      return { negate, regex: new RegExp(`^${source}(?:/.*)?$`) };
    });
  return (path) => {
    let ignored = false;
    for (const rule of rules) if (rule.regex.test(path)) ignored = !rule.negate;
    return ignored;
  };
}

// ------------------------------------------------------------------------------------ Kubernetes

type Validatable = { validate(): void };
const MODELS: Readonly<Record<string, (doc: Doc) => Validatable>> = {
  "v1/Namespace": (d) => new Namespace(d as ConstructorParameters<typeof Namespace>[0]),
  "v1/ServiceAccount": (d) => new ServiceAccount(d as ConstructorParameters<typeof ServiceAccount>[0]),
  "v1/ConfigMap": (d) => new ConfigMap(d as ConstructorParameters<typeof ConfigMap>[0]),
  "v1/Secret": (d) => new Secret(d as ConstructorParameters<typeof Secret>[0]),
  "v1/Service": (d) => new Service(d as ConstructorParameters<typeof Service>[0]),
  "apps/v1/Deployment": (d) => new Deployment(d as ConstructorParameters<typeof Deployment>[0]),
  "apps/v1/StatefulSet": (d) => new StatefulSet(d as ConstructorParameters<typeof StatefulSet>[0]),
  "networking.k8s.io/v1/NetworkPolicy": (d) =>
    new NetworkPolicy(d as ConstructorParameters<typeof NetworkPolicy>[0]),
  "policy/v1/PodDisruptionBudget": (d) =>
    new PodDisruptionBudget(d as ConstructorParameters<typeof PodDisruptionBudget>[0]),
};

/** Keys a container may have (a misspelt `readinesProbe` passes schema validation silently). */
const CONTAINER_KEYS = new Set([
  "name",
  "image",
  "imagePullPolicy",
  "command",
  "args",
  "workingDir",
  "ports",
  "env",
  "envFrom",
  "resources",
  "resizePolicy",
  "restartPolicy",
  "volumeMounts",
  "volumeDevices",
  "livenessProbe",
  "readinessProbe",
  "startupProbe",
  "lifecycle",
  "terminationMessagePath",
  "terminationMessagePolicy",
  "securityContext",
  "stdin",
  "stdinOnce",
  "tty",
]);

interface K8sObject {
  file: string;
  doc: Doc;
  kind: string;
  name: string;
}

function loadKustomization(): { resources: string[]; images: Doc[] } {
  const [doc] = parseYaml(join(K8S, "kustomization.yaml"));
  const k = docOf(doc);
  return { resources: listOf(k.resources).map(String), images: listOf(k.images).map(docOf) };
}

function loadK8sObjects(): K8sObject[] {
  const objects: K8sObject[] = [];
  for (const resource of loadKustomization().resources) {
    const file = join(K8S, resource);
    for (const raw of parseYaml(file)) {
      if (raw === null || raw === undefined) continue;
      const doc = docOf(raw);
      objects.push({
        file: rel(file),
        doc,
        kind: String(doc.kind),
        name: String(docOf(doc.metadata).name),
      });
    }
  }
  return objects;
}

const deployments = (objects: readonly K8sObject[]) =>
  objects
    .filter((o) => o.kind === "Deployment")
    .map((o) => ({ o, d: new Deployment(o.doc as ConstructorParameters<typeof Deployment>[0]) }));

function labelsMatch(
  selector: Record<string, string> | undefined,
  labels: Record<string, string> | undefined,
) {
  if (!selector || Object.keys(selector).length === 0) return false;
  return Object.entries(selector).every(([k, v]) => labels?.[k] === v);
}

/** A variable as a container sees it: a plain value, or a field of the pod (`fieldRef`). */
interface EnvValue {
  value?: string;
  fieldPath?: string;
}

/** ConfigMaps' and Secrets' keys by object name (Secret values as written: stringData, or base64 data). */
function k8sStores(objects: readonly K8sObject[]) {
  const configMaps = new Map(
    objects.filter((o) => o.kind === "ConfigMap").map((o) => [o.name, docOf(o.doc.data)] as const),
  );
  const secrets = new Map(
    objects
      .filter((o) => o.kind === "Secret")
      .map((o) => [o.name, { ...docOf(o.doc.data), ...docOf(o.doc.stringData) }] as const),
  );
  return { configMaps, secrets };
}

/**
 * The environment a container's process starts with: the image's ENV, then envFrom sources in
 * order (a later source wins), then `env` entries (which win over envFrom).
 */
function containerEnv(
  c: IContainer,
  objects: readonly K8sObject[],
  imageEnv: ReadonlyMap<string, string>,
): Map<string, EnvValue> {
  const { configMaps, secrets } = k8sStores(objects);
  const env = new Map<string, EnvValue>([...imageEnv].map(([k, v]) => [k, { value: v }]));
  for (const from of c.envFrom ?? []) {
    const cm = from.configMapRef?.name;
    const source = cm !== undefined ? configMaps.get(cm) : secrets.get(from.secretRef?.name ?? "");
    for (const [key, value] of Object.entries(source ?? {})) {
      env.set(`${from.prefix ?? ""}${key}`, { value: String(value) });
    }
  }
  for (const e of c.env ?? []) {
    const cmRef = e.valueFrom?.configMapKeyRef;
    const secretRef = e.valueFrom?.secretKeyRef;
    const fromStore = cmRef
      ? configMaps.get(cmRef.name ?? "")?.[cmRef.key]
      : secretRef
        ? secrets.get(secretRef.name ?? "")?.[secretRef.key]
        : undefined;
    if (e.valueFrom?.fieldRef) env.set(e.name, { fieldPath: e.valueFrom.fieldRef.fieldPath });
    else if (fromStore !== undefined) env.set(e.name, { value: String(fromStore) });
    else env.set(e.name, { value: e.value ?? "" });
  }
  return env;
}

/** The port a listener binds, from its variable or the code's default; NaN when not a port number. */
function listenPort(listener: { port: string; defaultPort: number }, value: string | undefined): number {
  if (value === undefined) return listener.defaultPort;
  return /^\d{1,5}$/.test(value.trim()) && Number(value) <= 65_535 ? Number(value) : Number.NaN;
}

/** Whether a listen address accepts connections to the pod's IP (the default 127.0.0.1 does not). */
function reachable(host: EnvValue | undefined): boolean {
  if (host?.fieldPath !== undefined) return host.fieldPath === "status.podIP";
  return host?.value !== undefined && ALL_INTERFACES.has(host.value.trim());
}

/**
 * Each Deployment container that declares a port or has probes listens where the kubelet, the
 * Services and Prometheus reach it: every declared port (which probes, Services and the
 * prometheus.io/port annotation must name) is the one the entry's port variable (or the code's
 * default) makes it bind, and the entry's address variable is not loopback.
 */
function listenProblems(objects: readonly K8sObject[], imageEnv: ReadonlyMap<string, string>): string[] {
  const problems: string[] = [];
  for (const { o, d } of deployments(objects)) {
    const containers = d.spec?.template.spec?.containers ?? [];
    for (const c of containers) {
      const ports = c.ports ?? [];
      const probes = [c.startupProbe, c.readinessProbe, c.livenessProbe].filter((p) => p !== undefined);
      if (ports.length === 0 && probes.length === 0) continue;
      const entry = entryOf(c.args ?? []) ?? "";
      const listener = LISTENERS[entry];
      if (!listener) {
        problems.push(
          `${o.name}: ${entry} has ports or probes, but is not in LISTENERS (add how it listens)`,
        );
        continue;
      }
      const env = containerEnv(c, objects, imageEnv);
      const portValue = env.get(listener.port);
      const port = portValue?.fieldPath !== undefined ? Number.NaN : listenPort(listener, portValue?.value);
      const setting = portValue
        ? `${listener.port}=${portValue.value ?? portValue.fieldPath}`
        : `${listener.port} unset (default ${listener.defaultPort})`;
      for (const p of ports) {
        if (p.containerPort !== port) {
          problems.push(`${o.name}: port ${p.containerPort} is declared, but ${entry} listens on ${setting}`);
        }
      }
      if (!reachable(env.get(listener.host))) {
        const host = env.get(listener.host);
        problems.push(
          `${o.name}: ${entry} listens on ${listener.host}=${host?.value ?? host?.fieldPath ?? "127.0.0.1 (unset)"}, ` +
            "which the kubelet's probes and other pods cannot reach (set it to 0.0.0.0)",
        );
      }
    }
    const scraped = d.spec?.template.metadata?.annotations?.["prometheus.io/port"];
    const declared = containers.flatMap((c) => c.ports ?? []).map((p) => String(p.containerPort));
    if (scraped !== undefined && !declared.includes(scraped)) {
      problems.push(`${o.name}: prometheus.io/port ${scraped} is not a declared container port`);
    }
  }
  return problems;
}

/**
 * Each container's stop ends within the pod's grace period: its preStop sleep plus its own
 * JETSAGA_SHUTDOWN_TIMEOUT_SECONDS (as the container sees it; default 25) stay under
 * terminationGracePeriodSeconds (default 30), or the kubelet's SIGKILL cuts the stop short.
 */
function graceProblems(objects: readonly K8sObject[], imageEnv: ReadonlyMap<string, string>): string[] {
  const problems: string[] = [];
  for (const { o, d } of deployments(objects)) {
    const pod = d.spec?.template.spec;
    const grace = pod?.terminationGracePeriodSeconds ?? 30;
    for (const c of pod?.containers ?? []) {
      const pause = c.lifecycle?.preStop?.sleep?.seconds ?? 0;
      const own = containerEnv(c, objects, imageEnv).get("JETSAGA_SHUTDOWN_TIMEOUT_SECONDS");
      const timeout = own === undefined ? SHUTDOWN_TIMEOUT_SECONDS : Number(own.value ?? Number.NaN);
      if (!Number.isInteger(timeout)) {
        problems.push(
          `${o.name}: JETSAGA_SHUTDOWN_TIMEOUT_SECONDS=${own?.value ?? own?.fieldPath} is not a number`,
        );
      } else if (!(grace > pause + timeout)) {
        problems.push(
          `${o.name}: terminationGracePeriodSeconds ${grace} is not above preStop ${pause} s + shutdown timeout ${timeout} s`,
        );
      }
    }
  }
  return problems;
}

/** A deep copy of the objects with one Deployment's first container changed (for the checks' own tests). */
function withContainer(
  objects: readonly K8sObject[],
  deployment: string,
  change: (container: Doc, pod: Doc) => void,
): K8sObject[] {
  return objects.map((o) => {
    if (o.kind !== "Deployment" || o.name !== deployment) return o;
    const doc = structuredClone(o.doc);
    const pod = docOf(docOf(docOf(doc.spec).template).spec);
    change(docOf(listOf(pod.containers)[0]), pod);
    return { ...o, doc };
  });
}

// ------------------------------------------------------------------------------------------ tests

describe("YAML files", () => {
  it("parse, everywhere under deploy/k8s and deploy/compose", () => {
    const files = [...yamlFiles(K8S), ...yamlFiles(COMPOSE)];
    expect(files.length).toBeGreaterThan(5);
    for (const file of files) expect(() => parseYaml(file), rel(file)).not.toThrow();
  });
});

describe("Dockerfile and .dockerignore", () => {
  const info = readDockerfile();
  const ignored = dockerignore();

  it("builds on node:24-slim, runs `node <entry>` as a numeric non-root user", () => {
    expect(info.baseImages.length).toBeGreaterThan(0);
    for (const image of info.baseImages) expect(image).toBe("node:24-slim");
    expect(info.user).toMatch(/^[1-9]\d*(:\d+)?$/);
    expect(info.entrypoint).toEqual(["node"]);
    const entry = entryOf(listOf(info.cmd));
    expect(entry && existsSync(join(ROOT, entry)), `CMD ${JSON.stringify(info.cmd)}`).toBe(true);
    expect(info.healthcheck).toBe(true);
    expect(existsSync(join(ROOT, "deploy/docker/healthcheck.ts"))).toBe(true);
  });

  it("copies every file each service entry loads, and .dockerignore keeps none of them out", () => {
    const entries = new Set<string>([
      entryOf(listOf(info.cmd)) ?? "",
      ...deployments(loadK8sObjects()).flatMap(({ d }) =>
        (d.spec?.template.spec?.containers ?? []).map((c) => entryOf(c.args ?? []) ?? ""),
      ),
    ]);
    const problems: string[] = [];
    for (const entry of entries) {
      if (!entry) continue;
      for (const file of importClosure(entry)) {
        const path = rel(file);
        if (!info.copied.some((src) => path === src || path.startsWith(`${src.replace(/\/$/, "")}/`))) {
          problems.push(`${path} (loaded by ${entry}) is not COPYed into the image`);
        }
        if (ignored(path)) problems.push(`${path} (loaded by ${entry}) is excluded by .dockerignore`);
      }
    }
    expect(problems).toEqual([]);
  });

  it("starts services with the V8 heap flags that npm start, the tests and the benchmark use", () => {
    expect(info.env.get("NODE_OPTIONS")).toBe(SERVICE_V8_FLAGS);
  });

  it("fills Node's compile cache at build time, as the service user, where NODE_COMPILE_CACHE says", () => {
    // Node keys the cache by user id: filled by another user, the services would not find it.
    const cache = info.env.get("NODE_COMPILE_CACHE");
    expect(cache).toMatch(/^\/app\//);
    const fill = info.runs.find((r) => /\bnode deploy\/compile-cache\.ts\b/.test(r.command));
    expect(fill, "RUN node deploy/compile-cache.ts").toBeDefined();
    expect(fill?.user).toBe(info.user);
    for (const file of importClosure("deploy/compile-cache.ts")) {
      const path = rel(file);
      expect(
        info.copied.some((src) => path === src || path.startsWith(`${src.replace(/\/$/, "")}/`)),
        `${path} is COPYed`,
      ).toBe(true);
    }
  });

  it("sets the environment that npm start, the tests and the benchmark start services with", () => {
    for (const [name, value] of Object.entries(SERVICE_ENV)) expect(info.env.get(name), name).toBe(value);
  });

  it(".dockerignore keeps secrets, dependencies and local data out of the build context", () => {
    for (const path of [
      ".git/HEAD",
      "node_modules/x",
      ".data/x",
      "deploy/compose/secrets/token.env",
      "a/b.test.ts",
    ]) {
      expect(ignored(path), path).toBe(true);
    }
  });
});

describe("Kubernetes manifests", () => {
  const objects = loadK8sObjects();
  const imageEnv = readDockerfile().env;
  const { configMaps, secrets } = k8sStores(objects);

  it("lists every manifest in kustomization.yaml, and only manifests", () => {
    const listed = new Set(loadKustomization().resources.map((r) => join(K8S, r)));
    for (const file of listed) expect(existsSync(file), rel(file)).toBe(true);
    for (const file of yamlFiles(K8S)) {
      if (file.endsWith("kustomization.yaml")) continue;
      const isManifest = parseYaml(file).some((d) => isDoc(d) && "apiVersion" in d && "kind" in d);
      expect(
        listed.has(file),
        `${rel(file)} ${isManifest ? "is a manifest not listed" : "is listed but not a manifest"}`,
      ).toBe(isManifest);
    }
  });

  it("validates each object with its kubernetes-models class", () => {
    expect(objects.length).toBeGreaterThan(10);
    for (const o of objects) {
      const model = MODELS[`${String(o.doc.apiVersion)}/${o.kind}`];
      expect(
        model,
        `${o.file}: no model for ${String(o.doc.apiVersion)} ${o.kind} (add it to MODELS)`,
      ).toBeDefined();
      expect(() => model!(o.doc).validate(), `${o.file}: ${o.kind} ${o.name}`).not.toThrow();
    }
  });

  it("runs an existing entry file from the jetsaga image in every Deployment", () => {
    const images = new Set(loadKustomization().images.map((i) => String(i.name)));
    const ds = deployments(objects);
    expect(ds.map(({ o }) => o.name).sort()).toEqual(["api", "notification", "orchestrator", "user"]);
    for (const { o, d } of ds) {
      for (const c of d.spec?.template.spec?.containers ?? []) {
        expect(images.has(c.image ?? ""), `${o.name}: image ${c.image} is not in kustomization images`).toBe(
          true,
        );
        expect(c.command, `${o.name}: the image's ENTRYPOINT is node; set args only`).toBeUndefined();
        const entry = entryOf(c.args ?? []);
        expect(entry, `${o.name}: args ${JSON.stringify(c.args)} name no .ts entry`).toBeDefined();
        expect(existsSync(join(ROOT, entry!)), `${o.name}: entry ${entry} does not exist`).toBe(true);
        expect(() => importClosure(entry!)).not.toThrow();
        const unknown = Object.keys(c).filter((k) => !CONTAINER_KEYS.has(k));
        expect(unknown, `${o.name}: unknown container keys`).toEqual([]);
      }
    }
  });

  it("sets every variable the code reads, reads every variable it sets, and resolves references", () => {
    const problems: string[] = [];
    const configKeysRead = new Map<string, Set<string>>();
    for (const { o, d } of deployments(objects)) {
      for (const c of d.spec?.template.spec?.containers ?? []) {
        const set = new Set<string>(imageEnv.keys());
        for (const from of c.envFrom ?? []) {
          const cm = from.configMapRef?.name;
          const sec = from.secretRef?.name;
          const source =
            cm !== undefined ? configMaps.get(cm) : sec !== undefined ? secrets.get(sec) : undefined;
          if (!source) {
            problems.push(`${o.name}: envFrom ${cm ?? sec} does not exist`);
            continue;
          }
          for (const key of Object.keys(source)) set.add(key);
        }
        for (const e of c.env ?? []) {
          set.add(e.name);
          const ref = e.valueFrom?.secretKeyRef ?? e.valueFrom?.configMapKeyRef;
          const store = e.valueFrom?.secretKeyRef ? secrets : configMaps;
          if (ref && !(ref.key in (store.get(ref.name ?? "") ?? {}))) {
            problems.push(`${o.name}: ${e.name} refers to ${ref.name}/${ref.key}, which does not exist`);
          }
        }
        const entry = entryOf(c.args ?? []) ?? "";
        problems.push(
          ...envProblems(
            `Deployment ${o.name}`,
            entry,
            set,
            (c.env ?? []).map((e) => e.name),
          ),
        );
        const reads = envReads(importClosure(entry));
        for (const from of c.envFrom ?? []) {
          const name = from.configMapRef?.name;
          if (name === undefined) continue;
          const read = configKeysRead.get(name) ?? new Set<string>();
          for (const key of reads) read.add(key);
          configKeysRead.set(name, read);
        }
      }
    }
    for (const [name, data] of configMaps) {
      for (const key of Object.keys(data)) {
        if (!configKeysRead.get(name)?.has(key) && !RUNTIME_ENV.has(key)) {
          problems.push(`ConfigMap ${name}: ${key} is read by none of the services using it`);
        }
      }
    }
    expect(problems).toEqual([]);
  });

  it("probes and Services point at declared ports that the service is told to listen on", () => {
    const problems: string[] = [];
    const ds = deployments(objects);
    for (const { o, d } of ds) {
      for (const c of d.spec?.template.spec?.containers ?? []) {
        const ports = c.ports ?? [];
        const probes = {
          startupProbe: c.startupProbe,
          readinessProbe: c.readinessProbe,
          livenessProbe: c.livenessProbe,
        };
        for (const [kind, probe] of Object.entries(probes)) {
          if (!probe) continue;
          const port = probe.httpGet?.port ?? probe.tcpSocket?.port ?? probe.grpc?.port;
          const ok =
            typeof port === "string"
              ? ports.some((p) => p.name === port)
              : ports.some((p) => p.containerPort === port);
          if (!ok)
            problems.push(
              `${o.name}: ${kind} uses port ${String(port)}, which the container does not declare`,
            );
        }
        const noProbes = d.metadata?.annotations?.["jetsaga.dev/no-probes"];
        if ((!c.readinessProbe || !c.livenessProbe) && !noProbes) {
          problems.push(
            `${o.name}: readiness and liveness probes missing (or annotate jetsaga.dev/no-probes with why)`,
          );
        }
        if (ports.length > 0 && (!c.readinessProbe || !c.livenessProbe)) {
          problems.push(`${o.name}: has a port, so it must have readiness and liveness probes`);
        }
      }
    }
    const services = objects.filter((o) => o.kind === "Service").map((o) => new Service(o.doc as never));
    for (const s of services) {
      if (s.spec?.type === "ExternalName") continue;
      const target = ds.find(({ d }) => labelsMatch(s.spec?.selector, d.spec?.template.metadata?.labels));
      if (!target) {
        problems.push(`Service ${s.metadata?.name}: selector matches no Deployment`);
        continue;
      }
      const containerPorts = (target.d.spec?.template.spec?.containers ?? []).flatMap((c) => c.ports ?? []);
      for (const p of s.spec?.ports ?? []) {
        const t = p.targetPort ?? p.port;
        const ok =
          typeof t === "string"
            ? containerPorts.some((cp) => cp.name === t)
            : containerPorts.some((cp) => cp.containerPort === t);
        if (!ok)
          problems.push(
            `Service ${s.metadata?.name}: targetPort ${String(t)} is not a port of ${target.o.name}`,
          );
      }
    }
    // URLs in env that name an in-cluster Service must use one of its ports.
    for (const { o, d } of ds) {
      for (const e of (d.spec?.template.spec?.containers ?? []).flatMap((c) => c.env ?? [])) {
        if (!e.value?.includes("://")) continue;
        const url = new URL(e.value);
        const svc = services.find((s) => s.metadata?.name === url.hostname);
        if (svc && !(svc.spec?.ports ?? []).some((p) => String(p.port) === urlPort(e.value!))) {
          problems.push(
            `${o.name}: ${e.name}=${e.value} uses a port Service ${url.hostname} does not expose`,
          );
        }
      }
    }
    problems.push(...listenProblems(objects, imageEnv));
    expect(problems).toEqual([]);
  });

  it("catches a service told to listen on loopback, or on another port than its probes and Services use", () => {
    // The probe server's address (default 127.0.0.1): the kubelet's probes fail, liveness restarts the pod.
    const noProbeHost = withContainer(objects, "orchestrator", (c) => {
      c.env = listOf(c.env).filter((e) => docOf(e).name !== "PROBE_HOST");
    });
    expect(listenProblems(noProbeHost, imageEnv)).toEqual([
      expect.stringMatching(/^orchestrator: .*PROBE_HOST=127\.0\.0\.1 \(unset\)/),
    ]);
    const loopbackGrpc = withContainer(objects, "user", (c) => {
      c.env = listOf(c.env).map((e) =>
        docOf(e).name === "USER_GRPC_HOST" ? { name: "USER_GRPC_HOST", value: "127.0.0.1" } : e,
      );
    });
    expect(listenProblems(loopbackGrpc, imageEnv)).toEqual([
      expect.stringMatching(/^user: .*USER_GRPC_HOST=127/),
    ]);
    // Another variable holding the port number does not make the service listen on it.
    const portElsewhere = withContainer(objects, "orchestrator", (c) => {
      c.env = listOf(c.env)
        .filter((e) => docOf(e).name !== "PROBE_PORT")
        .concat({ name: "JETSAGA_CONCURRENCY", value: "9464" }, { name: "PROBE_PORT", value: "9465" });
    });
    expect(listenProblems(portElsewhere, imageEnv)).toEqual([
      "orchestrator: port 9464 is declared, but orchestrator/service/main.ts listens on PROBE_PORT=9465",
    ]);
    // Unset, the code's default counts: the API's 8080 matches, a declared 9090 does not.
    const apiDefault = withContainer(objects, "api", (c) => {
      c.env = listOf(c.env).filter((e) => docOf(e).name !== "API_PORT");
    });
    expect(listenProblems(apiDefault, imageEnv)).toEqual([]);
    const apiOtherPort = withContainer(apiDefault, "api", (c) => {
      c.ports = [{ name: "grpc", containerPort: 9090 }];
    });
    expect(listenProblems(apiOtherPort, imageEnv)).toEqual([
      "api: port 9090 is declared, but api/main.ts listens on API_PORT unset (default 8080)",
      "api: prometheus.io/port 8080 is not a declared container port",
    ]);
    // A host from the ConfigMap counts like one of the container's own.
    const hostFromConfigMap = withContainer(
      objects.map((o) =>
        o.kind === "ConfigMap"
          ? { ...o, doc: { ...o.doc, data: { ...docOf(o.doc.data), PROBE_HOST: "::" } } }
          : o,
      ),
      "notification",
      (c) => {
        c.env = listOf(c.env).filter((e) => docOf(e).name !== "PROBE_HOST");
      },
    );
    expect(listenProblems(hostFromConfigMap, imageEnv)).toEqual([]);
  });

  it("matches selectors: Deployment to its pods, every PodDisruptionBudget to a Deployment it can spare", () => {
    const ds = deployments(objects);
    for (const { o, d } of ds) {
      expect(labelsMatch(d.spec?.selector.matchLabels, d.spec?.template.metadata?.labels), o.name).toBe(true);
    }
    const pdbs = objects.filter((o) => o.kind === "PodDisruptionBudget");
    for (const o of pdbs) {
      const pdb = new PodDisruptionBudget(o.doc as never);
      const target = ds.find(({ d }) =>
        labelsMatch(pdb.spec?.selector?.matchLabels, d.spec?.template.metadata?.labels),
      );
      expect(target, `PDB ${o.name} matches no Deployment`).toBeDefined();
      const min = pdb.spec?.minAvailable;
      // minAvailable equal to replicas blocks every node drain.
      if (typeof min === "number") expect(min, `PDB ${o.name}`).toBeLessThan(target?.d.spec?.replicas ?? 1);
    }
    expect(pdbs.length).toBe(ds.length);
    expect(ds.find(({ o }) => o.name === "orchestrator")?.d.spec?.replicas).toBeGreaterThanOrEqual(2);
  });

  it("admits only the API gateway's pods (and the scraper's namespace) to the user service's port", () => {
    const ds = deployments(objects);
    const podLabels = (name: string) =>
      ds.find(({ o }) => o.name === name)?.d.spec?.template.metadata?.labels;
    const user = ds.find(({ o }) => o.name === "user");
    const policies = objects
      .filter((o) => o.kind === "NetworkPolicy")
      .map((o) => new NetworkPolicy(o.doc as never))
      .filter((p) => labelsMatch(p.spec?.podSelector?.matchLabels, podLabels("user")));
    // Without one, any pod could call Authenticate with a made-up client address.
    expect(policies.length).toBe(1);
    const [policy] = policies;
    expect(policy?.spec?.policyTypes).toContain("Ingress");
    const userPorts = (user?.d.spec?.template.spec?.containers ?? []).flatMap((c) => c.ports ?? []);
    const rules = policy?.spec?.ingress ?? [];
    expect(rules.length).toBeGreaterThan(0);
    for (const rule of rules) {
      // A rule without `from` admits every source.
      expect(rule.from?.length).toBeGreaterThan(0);
      for (const peer of rule.from ?? []) {
        expect(peer.ipBlock).toBeUndefined();
        if (peer.podSelector) {
          expect(peer.namespaceSelector).toBeUndefined();
          const admitted = ds.filter(({ d }) =>
            labelsMatch(peer.podSelector?.matchLabels, d.spec?.template.metadata?.labels),
          );
          expect(admitted.map(({ o }) => o.name)).toEqual(["api"]);
        } else {
          // Only a namespace named outright (Prometheus's), never "every namespace".
          expect(Object.keys(peer.namespaceSelector?.matchLabels ?? {})).toEqual([
            "kubernetes.io/metadata.name",
          ]);
        }
      }
      for (const port of rule.ports ?? []) {
        expect(userPorts.some((p) => p.name === port.port || p.containerPort === port.port)).toBe(true);
      }
      expect(rule.ports?.length).toBeGreaterThan(0);
    }
  });

  it("runs non-root with a read-only root file system and bounded memory", () => {
    for (const { o, d } of deployments(objects)) {
      const pod = d.spec?.template.spec;
      expect(pod?.securityContext?.runAsNonRoot, o.name).toBe(true);
      expect(pod?.automountServiceAccountToken, o.name).toBe(false);
      for (const c of pod?.containers ?? []) {
        expect(c.securityContext?.readOnlyRootFilesystem, o.name).toBe(true);
        expect(c.securityContext?.allowPrivilegeEscalation, o.name).toBe(false);
        const limit = mebibytes(c.resources?.limits?.memory);
        const request = mebibytes(c.resources?.requests?.memory);
        expect(limit, `${o.name}: memory limit`).toBeLessThanOrEqual(MAX_MEMORY_LIMIT_MIB);
        expect(request, `${o.name}: memory request`).toBeLessThanOrEqual(limit);
        expect(c.resources?.requests?.cpu, `${o.name}: cpu request`).toBeDefined();
      }
    }
  });

  it("gives each container a memory limit above V8's heap limit plus room outside the heap", () => {
    expect(v8HeapCapMib(SERVICE_V8_FLAGS)).toBe(256 + 3 * 8);
    expect(heapProblems(objects, imageEnv)).toEqual([]);
  });

  it("catches a memory limit below the heap limit, and a container without heap flags", () => {
    const small = withContainer(objects, "orchestrator", (c) => {
      c.resources = {
        ...docOf(c.resources),
        limits: { ...docOf(docOf(c.resources).limits), memory: "320Mi" },
      };
    });
    expect(heapProblems(small, imageEnv)).toEqual([
      `orchestrator: memory limit 320Mi is below V8's heap limit 280 MiB (NODE_OPTIONS "${SERVICE_V8_FLAGS}") + 64 MiB outside the heap`,
    ]);
    const unsized = withContainer(objects, "api", (c) => {
      c.env = [...listOf(c.env), { name: "NODE_OPTIONS", value: "--enable-source-maps" }];
    });
    expect(heapProblems(unsized, imageEnv)).toEqual([
      `api: memory limit 448Mi is below V8's heap limit NaN MiB (NODE_OPTIONS "--enable-source-maps") + 64 MiB outside the heap`,
    ]);
  });

  it("ships a placeholder token secret the services refuse (shorter than the minimum)", () => {
    const placeholder = String(secrets.get("jetsaga-secrets")?.["token-secret"] ?? "");
    expect(placeholder).not.toBe("");
    expect(Buffer.byteLength(placeholder)).toBeLessThan(MIN_SECRET_BYTES);
  });

  it("lets each service stop within its grace period; RPC services keep taking connections a moment first", () => {
    for (const { o, d } of deployments(objects)) {
      const pod = d.spec?.template.spec;
      const pause = (pod?.containers ?? [])[0]?.lifecycle?.preStop?.sleep?.seconds ?? 0;
      if (o.name === "api" || o.name === "user")
        expect(pause, `${o.name}: preStop sleep`).toBeGreaterThanOrEqual(3);
    }
    expect(graceProblems(objects, imageEnv)).toEqual([]);
  });

  it("takes the shutdown timeout the container is given, not the default, against its grace period", () => {
    const longStop = withContainer(objects, "orchestrator", (c) => {
      c.env = [...listOf(c.env), { name: "JETSAGA_SHUTDOWN_TIMEOUT_SECONDS", value: "60" }];
    });
    expect(graceProblems(longStop, imageEnv)).toEqual([
      "orchestrator: terminationGracePeriodSeconds 30 is not above preStop 0 s + shutdown timeout 60 s",
    ]);
    const raised = withContainer(longStop, "orchestrator", (_c, pod) => {
      pod.terminationGracePeriodSeconds = 65;
    });
    expect(graceProblems(raised, imageEnv)).toEqual([]);
    // From the ConfigMap: every service gets it, the preStop pauses count on top.
    const shared = objects.map((o) =>
      o.kind === "ConfigMap"
        ? { ...o, doc: { ...o.doc, data: { ...docOf(o.doc.data), JETSAGA_SHUTDOWN_TIMEOUT_SECONDS: "31" } } }
        : o,
    );
    expect(graceProblems(shared, imageEnv).sort()).toEqual([
      "api: terminationGracePeriodSeconds 35 is not above preStop 5 s + shutdown timeout 31 s",
      "notification: terminationGracePeriodSeconds 30 is not above preStop 0 s + shutdown timeout 31 s",
      "orchestrator: terminationGracePeriodSeconds 30 is not above preStop 0 s + shutdown timeout 31 s",
      "user: terminationGracePeriodSeconds 35 is not above preStop 5 s + shutdown timeout 31 s",
    ]);
  });

  it("starts services with the V8 heap flags of the image (the ConfigMap's NODE_OPTIONS replaces the image's)", () => {
    expect(configMaps.get("jetsaga-config")?.NODE_OPTIONS).toBe(SERVICE_V8_FLAGS);
  });

  it("gives each service the V8 heap flags npm start, the tests and the benchmark give it", () => {
    const configMapFlags = configMaps.get("jetsaga-config")?.NODE_OPTIONS;
    for (const { o, d } of deployments(objects)) {
      for (const c of d.spec?.template.spec?.containers ?? []) {
        // A container's own env entry wins over its envFrom ConfigMap.
        const own = (c.env ?? []).find((e) => e.name === "NODE_OPTIONS")?.value;
        expect(own ?? configMapFlags, `${o.name}: NODE_OPTIONS`).toBe(SERVICE_V8_FLAGS);
      }
    }
  });

  it("leaves the image's service environment (MALLOC_ARENA_MAX) as it is", () => {
    for (const name of Object.keys(SERVICE_ENV)) {
      expect(configMaps.get("jetsaga-config")?.[name], name).toBeUndefined();
    }
  });

  it("routes only the gateway's public RPC services in docs/DEPLOYMENT.md's HTTPRoute, to the api Service", () => {
    // /metrics, /readyz, health and reflection share the port: the example must not route them.
    const doc = readFileSync(join(ROOT, "docs/DEPLOYMENT.md"), "utf8");
    const routes = [...doc.matchAll(/```yaml\n([\s\S]*?)```/g)]
      .flatMap((m) => parseAllDocuments(m[1] ?? "").map((d) => docOf(d.toJS())))
      .filter((d) => d.kind === "HTTPRoute");
    expect(routes.length).toBe(1);
    const rules = listOf(docOf(routes[0]?.spec).rules).map(docOf);
    const paths = rules.flatMap((r) => listOf(r.matches).map((m) => docOf(docOf(m).path)));
    expect(paths.map((p) => p.type)).toEqual(["PathPrefix", "PathPrefix"]);
    expect(paths.map((p) => p.value)).toEqual([`/${OrderService.typeName}/`, `/${UserService.typeName}/`]);
    const api = objects.find((o) => o.kind === "Service" && o.name === "api");
    const apiPorts = listOf(docOf(api?.doc.spec).ports).map((p) => docOf(p).port);
    for (const ref of rules.flatMap((r) => listOf(r.backendRefs).map(docOf))) {
      expect(ref.name).toBe("api");
      expect(apiPorts).toContain(ref.port);
    }
  });

  it("documents a NATS >= 2.12 cluster of 3 with JetStream (Helm values)", () => {
    const [values] = parseYaml(join(K8S, "nats/values.yaml"));
    const v = docOf(values);
    const config = docOf(v.config);
    expect(docOf(config.cluster).enabled).toBe(true);
    expect(Number(docOf(config.cluster).replicas)).toBeGreaterThanOrEqual(3);
    expect(docOf(config.jetstream).enabled).toBe(true);
    const tag = String(docOf(docOf(v.container).image).tag);
    expect(versionAtLeast(tag, MIN_NATS), `nats image tag ${tag}`).toBe(true);
    const replicas = Number(configMaps.get("jetsaga-config")?.JETSAGA_STREAM_REPLICAS);
    expect(replicas).toBeLessThanOrEqual(Number(docOf(config.cluster).replicas));
  });
});

/** A compose duration ("30s", "1m30s", "1500ms") in seconds; NaN for anything else. */
function composeSeconds(value: unknown): number {
  const text = String(value);
  const units: Record<string, number> = { h: 3600, m: 60, s: 1, ms: 0.001, us: 1e-6 };
  const parts = [...text.matchAll(/(\d+(?:\.\d+)?)(h|ms|us|m|s)/g)];
  if (parts.length === 0 || parts.map((p) => p[0]).join("") !== text) return Number.NaN;
  return parts.reduce((sum, [, n, unit]) => sum + Number(n) * (units[unit ?? ""] ?? Number.NaN), 0);
}

/**
 * Each compose jetsaga service listens where it is reached: its health check asks the port its port
 * variable (or the code's default) makes it bind; a published port, or another service's URL
 * naming it (USER_SERVICE_URL=http://user:50061), is that port on an address other containers and
 * Docker's port forwarding reach (not the default 127.0.0.1).
 */
function composeListenProblems(services: Doc): string[] {
  const problems: string[] = [];
  const urls = Object.entries(services).flatMap(([from, raw]) =>
    Object.entries(docOf(docOf(raw).environment)).flatMap(([name, value]) => {
      try {
        return [{ from, name, url: new URL(String(value)) }];
      } catch {
        return [];
      }
    }),
  );
  for (const [name, raw] of Object.entries(services)) {
    const s = docOf(raw);
    if (!("build" in s)) continue;
    const entry = entryOf(listOf(s.command)) ?? "";
    const listener = LISTENERS[entry];
    const env = docOf(s.environment);
    const test = listOf(docOf(s.healthcheck).test).map(String);
    const published = listOf(s.ports).map((p) =>
      isDoc(p) ? String(p.target) : (String(p).split(":").at(-1)?.split("/")[0] ?? ""),
    );
    const callers = urls.filter(({ url }) => url.hostname === name);
    if (!listener) {
      if (test.length > 0 || published.length > 0 || callers.length > 0) {
        problems.push(`compose ${name}: ${entry} is reached on a port, but is not in LISTENERS`);
      }
      continue;
    }
    const value = env[listener.port];
    const port = String(listenPort(listener, value === undefined ? undefined : String(value)));
    const setting =
      value === undefined
        ? `${listener.port} unset (default ${listener.defaultPort})`
        : `${listener.port}=${String(value)}`;
    const healthPort = test.length > 0 ? urlPort(test[3] ?? "") : port;
    if (healthPort !== port) {
      problems.push(
        `compose ${name}: health check asks port ${healthPort}, but ${entry} listens on ${setting}`,
      );
    }
    for (const target of published) {
      if (target !== port)
        problems.push(`compose ${name}: publishes ${target}, but ${entry} listens on ${setting}`);
    }
    for (const { from, name: variable, url } of callers) {
      if (url.port !== port)
        problems.push(
          `compose ${from}: ${variable} calls ${name} on ${url.port}, but it listens on ${setting}`,
        );
    }
    const host = env[listener.host];
    if (
      (published.length > 0 || callers.length > 0) &&
      !reachable(host === undefined ? undefined : { value: String(host) })
    ) {
      problems.push(
        `compose ${name}: reached from outside its container, but listens on ${listener.host}=${host === undefined ? "127.0.0.1 (unset)" : String(host)}`,
      );
    }
  }
  return problems;
}

describe("docker compose", () => {
  const [composeDoc] = parseYaml(join(COMPOSE, "compose.yaml"));
  const compose = docOf(composeDoc);
  const services = docOf(compose.services);
  const topSecrets = docOf(compose.secrets);
  const imageEnv = readDockerfile().env;
  const jetsaga = Object.entries(services).filter(([, s]) => "build" in docOf(s));

  /** Keys of a secret env file, read from its committed `.example` twin. */
  function secretEnvKeys(secret: string): string[] {
    const file = String(docOf(topSecrets[secret]).file);
    const example = join(COMPOSE, `${file}.example`);
    if (!existsSync(example)) throw new Error(`secret ${secret}: ${rel(example)} is missing`);
    return readFileSync(example, "utf8")
      .split("\n")
      .map((l) => /^([A-Z][A-Z0-9_]*)=/.exec(l.trim())?.[1])
      .filter((k): k is string => k !== undefined);
  }

  it("ships a placeholder token secret the services refuse (shorter than the minimum)", () => {
    const example = readFileSync(
      join(COMPOSE, `${String(docOf(topSecrets.token_env).file)}.example`),
      "utf8",
    );
    const values = example
      .split("\n")
      .map((l) => /^JETSAGA_TOKEN_SECRET=(.*)$/.exec(l.trim())?.[1])
      .filter((v): v is string => v !== undefined);
    expect(values.length).toBe(1);
    // A value that passed would be a publicly known HMAC key, used as is by whoever copies the file.
    expect(Buffer.byteLength(values[0] ?? "")).toBeLessThan(MIN_SECRET_BYTES);
    expect(values[0]).not.toBe("");
  });

  it("checks Postgres's health over TCP, which listens only once the first-boot initialisation is done", () => {
    // pg_isready without -h asks the Unix socket, which the image's entrypoint opens for its
    // temporary init server too: the check could pass before the database and role exist.
    const test = listOf(docOf(docOf(services.postgres).healthcheck).test).map(String);
    expect(test.slice(0, 2)).toEqual(["CMD", "pg_isready"]);
    const host = test[test.indexOf("-h") + 1];
    expect(test.includes("-h") && host !== undefined && !host.startsWith("/"), JSON.stringify(test)).toBe(
      true,
    );
  });

  it("publishes no port of the user service: only the gateway may call it", () => {
    expect(docOf(services.user).ports).toBeUndefined();
  });

  it("runs the four services from the one image, each with an existing entry", () => {
    expect(jetsaga.map(([name]) => name).sort()).toEqual(["api", "notification", "orchestrator", "user"]);
    for (const [name, raw] of jetsaga) {
      const s = docOf(raw);
      expect(docOf(s.build).dockerfile).toBe("deploy/docker/Dockerfile");
      expect(existsSync(resolve(COMPOSE, String(docOf(s.build).context), "deploy/docker/Dockerfile"))).toBe(
        true,
      );
      const entry = entryOf(listOf(s.command));
      expect(entry, `${name}: command ${JSON.stringify(s.command)}`).toBeDefined();
      expect(existsSync(join(ROOT, entry!)), `${name}: entry ${entry} does not exist`).toBe(true);
      expect(s.read_only, name).toBe(true);
    }
  });

  it("sets every variable each service reads, from environment, secret env files or the image", () => {
    const problems: string[] = [];
    for (const [name, raw] of jetsaga) {
      const s = docOf(raw);
      const command = listOf(s.command).map(String);
      const set = new Set<string>([...imageEnv.keys(), ...Object.keys(docOf(s.environment))]);
      const mounted = listOf(s.secrets).map((x) => (isDoc(x) ? String(x.source) : String(x)));
      for (const flag of command.filter((a) => a.startsWith("--env-file="))) {
        const secret = flag.slice("--env-file=/run/secrets/".length);
        if (
          !flag.startsWith("--env-file=/run/secrets/") ||
          !(secret in topSecrets) ||
          !mounted.includes(secret)
        ) {
          problems.push(`${name}: ${flag} is not a secret mounted into the service`);
          continue;
        }
        for (const key of secretEnvKeys(secret)) set.add(key);
      }
      problems.push(
        ...envProblems(`compose ${name}`, entryOf(command) ?? "", set, Object.keys(docOf(s.environment))),
      );
    }
    expect(problems).toEqual([]);
  });

  it("leaves the image's service environment (MALLOC_ARENA_MAX) as it is", () => {
    for (const [name, raw] of jetsaga) {
      for (const variable of Object.keys(SERVICE_ENV)) {
        expect(docOf(docOf(raw).environment)[variable], `${name}: ${variable}`).toBeUndefined();
      }
    }
  });

  it("starts services with the V8 heap flags npm start gives them, then any JETSAGA_NODE_OPTIONS", () => {
    for (const [name, raw] of jetsaga) {
      const s = docOf(raw);
      const options = String(docOf(s.environment).NODE_OPTIONS);
      expect(options, `${name}: NODE_OPTIONS`).toBe(`${SERVICE_V8_FLAGS} \${JETSAGA_NODE_OPTIONS:-}`);
    }
  });

  it("lets each service stop within its stop_grace_period (compose's default is 10 s)", () => {
    for (const [name, raw] of jetsaga) {
      const s = docOf(raw);
      const own = docOf(s.environment).JETSAGA_SHUTDOWN_TIMEOUT_SECONDS;
      const timeout = own === undefined ? SHUTDOWN_TIMEOUT_SECONDS : Number(own);
      expect(composeSeconds(s.stop_grace_period ?? "10s"), `${name}: stop_grace_period`).toBeGreaterThan(
        timeout,
      );
    }
  });

  it("orders start-up on health: depends_on targets exist and have health checks", () => {
    for (const [name, raw] of Object.entries(services)) {
      for (const [dep, cond] of Object.entries(docOf(docOf(raw).depends_on))) {
        expect(dep in services, `${name} depends on unknown ${dep}`).toBe(true);
        if (docOf(cond).condition === "service_healthy") {
          expect(docOf(services[dep]).healthcheck, `${name} waits for ${dep} to be healthy`).toBeDefined();
        }
      }
      for (const secret of listOf(docOf(raw).secrets)) {
        expect(
          String(isDoc(secret) ? secret.source : secret) in topSecrets,
          `${name}: secret ${String(secret)}`,
        ).toBe(true);
      }
    }
  });

  it("health checks, published ports and other services' URLs reach the port and address each service listens on", () => {
    for (const [name, raw] of jetsaga) {
      const test = listOf(docOf(docOf(raw).healthcheck).test).map(String);
      if (test.length > 0) {
        expect(test.slice(0, 3), name).toEqual(["CMD", "node", "deploy/docker/healthcheck.ts"]);
      }
    }
    expect(composeListenProblems(services)).toEqual([]);
  });

  it("catches a health check or a caller on another port than the service's variable, and a loopback listener", () => {
    const changed = (service: string, change: (s: Doc) => void): Doc => {
      const copy = structuredClone(services);
      change(docOf(copy[service]));
      return copy;
    };
    const env = (s: Doc) => docOf(s.environment);
    // Another variable holding the port number does not make the service listen on it.
    const portElsewhere = changed("orchestrator", (s) => {
      env(s).PROBE_PORT = "9465";
      env(s).JETSAGA_CONCURRENCY = "9464";
    });
    expect(composeListenProblems(portElsewhere)).toEqual([
      "compose orchestrator: health check asks port 9464, but orchestrator/service/main.ts listens on PROBE_PORT=9465",
    ]);
    const userOnLoopback = changed("user", (s) => {
      delete env(s).USER_GRPC_HOST;
    });
    expect(composeListenProblems(userOnLoopback)).toEqual([
      "compose user: reached from outside its container, but listens on USER_GRPC_HOST=127.0.0.1 (unset)",
    ]);
    const apiPort = changed("api", (s) => {
      env(s).API_PORT = "8081";
    });
    expect(composeListenProblems(apiPort)).toEqual([
      "compose api: health check asks port 8080, but api/main.ts listens on API_PORT=8081",
      "compose api: publishes 8080, but api/main.ts listens on API_PORT=8081",
    ]);
  });

  it("runs NATS >= 2.12 with JetStream and a config that documents sync_interval", () => {
    const nats = docOf(services.nats);
    const tag = String(nats.image).split(":")[1] ?? "";
    expect(String(nats.image)).toMatch(/^nats:/);
    expect(versionAtLeast(tag, MIN_NATS), `nats image ${String(nats.image)}`).toBe(true);
    expect(listOf(nats.command)).toContain("-js");
    const mount = listOf(nats.volumes)
      .map(String)
      .find((v) => v.includes("nats.conf"));
    const conf = resolve(COMPOSE, (mount ?? "").split(":")[0] ?? "");
    expect(existsSync(conf), "nats.conf mounted from the repository").toBe(true);
    expect(readFileSync(conf, "utf8")).toMatch(/^\s*#\s*sync_interval:/m);
    expect(String(docOf(services.postgres).image)).toBe("postgres:15");
  });
});

describe("variables the checks above take as known", () => {
  it("RUNTIME_ENV names only variables tracing-sdk.ts or the installed OTLP exporter reads", () => {
    const preload = envReads(importClosure("common/tracing-sdk.ts"));
    const exporterDir = join(ROOT, "node_modules/@opentelemetry/otlp-exporter-base/dist");
    const exporterCode = (function read(dir: string): string {
      return readdirSync(dir)
        .map((name) => {
          const path = join(dir, name);
          if (statSync(path).isDirectory()) return read(path);
          return name.endsWith(".mjs") ? readFileSync(path, "utf8") : "";
        })
        .join("\n");
    })(exporterDir);
    // OTLPTraceExporter reads the generic name and its signal's ("TRACES") variant.
    const exporterReads = (name: string) =>
      exporterCode.includes(`"${name}"`) ||
      (name.startsWith("OTEL_EXPORTER_OTLP_TRACES_") &&
        exporterCode.includes(
          `\`OTEL_EXPORTER_OTLP_\${signalIdentifier}_${name.slice("OTEL_EXPORTER_OTLP_TRACES_".length)}\``,
        ));
    const unread = [...RUNTIME_ENV].filter(
      (name) => !name.startsWith("NODE_") && !preload.has(name) && !exporterReads(name),
    );
    expect(unread).toEqual([]);
    // And every variable the preload reads is known, so a manifest may set it.
    expect([...preload].filter((name) => !RUNTIME_ENV.has(name))).toEqual([]);
  });

  it("flags a misspelt OTEL_ variable as set but read by nothing", () => {
    const set = new Set([...envReads(importClosure("orchestrator/service/main.ts")), "OTEL_SERVICE_NAM"]);
    expect(
      envProblems("test", "orchestrator/service/main.ts", set, ["OTEL_SERVICE_NAM", "OTEL_SERVICE_NAME"]),
    ).toEqual([
      "test: sets OTEL_SERVICE_NAM, but nothing orchestrator/service/main.ts loads reads it (typo, or code not wired yet)",
    ]);
  });

  it("LISTENERS names variables each entry reads, and its default port appears where the port is read", () => {
    for (const [entry, listener] of Object.entries(LISTENERS)) {
      const files = importClosure(entry);
      const reads = envReads(files);
      expect(reads.has(listener.port), `${entry} reads ${listener.port}`).toBe(true);
      expect(reads.has(listener.host), `${entry} reads ${listener.host}`).toBe(true);
      const portFile = files.filter((f) => envReads([f]).has(listener.port));
      expect(
        portFile.some((f) => new RegExp(`\\b${listener.defaultPort}\\b`).test(codeOf(f))),
        `${entry}: default ${listener.port} ${listener.defaultPort}`,
      ).toBe(true);
    }
  });
});
