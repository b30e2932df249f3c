/**
 * `npm run proto:check`: the gate for API changes. Fails (exit 1) when
 * 1. `buf lint` finds a style problem,
 * 2. the committed generated code in proto/gen/ differs from what the .proto files generate now,
 * 3. `buf breaking` finds a wire- or source-incompatible change against proto/baseline.binpb.
 *
 * The baseline is refreshed only deliberately (`npm run proto:baseline`), so a breaking change shows
 * up in review as a change of that file. Runs under Node 24 and Deno (`deno run -A proto/check.ts`).
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
const buf = join(root, "node_modules", ".bin", "buf");
const genDir = join(root, "proto", "gen");
const baseline = join(root, "proto", "baseline.binpb");

/** Runs buf in the repository root with inherited output; returns whether it succeeded. */
function runBuf(args: string[]): boolean {
  const r = spawnSync(buf, args, { cwd: root, stdio: "inherit" });
  if (r.error) {
    console.error(`cannot run ${buf}: ${r.error.message}`);
    return false;
  }
  return r.status === 0;
}

/** All files below dir, as paths relative to dir, sorted. */
function listFiles(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath, e.name)))
    .sort();
}

/** Paths that exist in only one of the two trees or whose bytes differ. */
function diffTrees(expected: string, actual: string): string[] {
  const a = listFiles(expected);
  const b = listFiles(actual);
  const all = [...new Set([...a, ...b])].sort();
  return all.filter((f) => {
    const pa = join(expected, f);
    const pb = join(actual, f);
    if (!existsSync(pa) || !existsSync(pb)) return true;
    return !readFileSync(pa).equals(readFileSync(pb));
  });
}

let ok = true;

console.log("proto:check: buf lint");
ok = runBuf(["lint"]) && ok;

console.log("proto:check: generated code is up to date");
const tmp = mkdtempSync(join(tmpdir(), "jetsaga-proto-gen-"));
try {
  // -o prefixes the template's `out` (proto/gen), so the fresh output lands in <tmp>/proto/gen.
  if (!runBuf(["generate", "-o", tmp])) {
    ok = false;
  } else {
    const stale = diffTrees(join(tmp, "proto", "gen"), genDir);
    if (stale.length > 0) {
      console.error("generated code is stale: run npm run proto:gen");
      for (const f of stale) console.error(`  proto/gen/${f}`);
      ok = false;
    }
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}

console.log("proto:check: buf breaking against proto/baseline.binpb");
if (!existsSync(baseline)) {
  console.error("proto/baseline.binpb is missing: run npm run proto:baseline");
  ok = false;
} else {
  ok = runBuf(["breaking", "--against", baseline]) && ok;
}

if (!ok) process.exit(1);
console.log("proto:check: ok");
