/**
 * Operator commands on the dead-letter stream (`<NS>_DLQ`): `npm run dead-letters -- <command>`
 * with the services' NATS settings (NATS_URL, NATS_CREDS…, JETSAGA_NS).
 *
 *   list [--source S] [--code C] [--limit N]   one line per dead letter, oldest first (N: 1000)
 *   show <seq>                                 one dead letter in full (JSON)
 *   redrive <seq>… | --all [--source S] [--code C] [--force]
 *                                              publish again to the subject it came from, then delete
 *                                              (--force: also commands whose instance was told they
 *                                              failed; see redriveDeadLetter)
 *   drop <seq>…                                delete without sending again
 *
 * Exit code 0 when every named letter was handled, 1 when any failed (each failure is printed
 * with its reason), 2 for a usage error.
 */
import { parseArgs } from "node:util";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { readConfig } from "../../common/config.ts";
import { connectNatsFromConfig } from "../../common/nats.ts";
import {
  dropDeadLetter,
  readDeadLetter,
  redriveDeadLetter,
  type StoredDeadLetter,
  visitDeadLetters,
} from "../../workers/runtime/dead-letters.ts";
import { type Topology, topology } from "../runtime/topology.ts";

const USAGE = `usage: npm run dead-letters -- list [--source S] [--code C] [--limit N]
       npm run dead-letters -- show <seq>
       npm run dead-letters -- redrive <seq>… | --all [--source S] [--code C] [--force]
       npm run dead-letters -- drop <seq>…`;

/** Whether a command did all it was asked (a failure on one letter does not stop the others). */
interface Outcome {
  ok: boolean;
}

/** What the commands write to: stdout for results, stderr for progress and failures. */
export interface Output {
  out(line: string): void;
  err(line: string): void;
}

class UsageError extends Error {}

/** At most this many letters are listed or redriven with --all in one run. */
const MAX_LETTERS = 100_000;

/** A command line, checked. */
export interface DeadLetterCommand {
  command: "list" | "show" | "redrive" | "drop";
  /** Sequence numbers named (show, redrive, drop without --all). */
  seqs: number[];
  all: boolean;
  source?: string;
  code?: string;
  limit: number;
  /** redrive only: {@link RedriveOptions.force}. */
  force: boolean;
}

/** Checks a command line (`argv` without node and the script); throws a usage error. */
export function parseDeadLetterCommand(argv: readonly string[]): DeadLetterCommand {
  const { values, positionals } = parseArgs({
    args: [...argv],
    allowPositionals: true,
    strict: true,
    options: {
      source: { type: "string" },
      code: { type: "string" },
      limit: { type: "string" },
      all: { type: "boolean" },
      force: { type: "boolean" },
    },
  });
  const [command, ...rest] = positionals;
  const all = values.all === true;
  const force = values.force === true;
  if (force && command !== "redrive") throw new UsageError("--force goes with redrive");
  const limit =
    values.limit === undefined ? 1000 : Math.min(positiveInteger(values.limit, "--limit"), MAX_LETTERS);
  const filters = {
    ...(values.source !== undefined ? { source: values.source } : {}),
    ...(values.code !== undefined ? { code: values.code } : {}),
  };
  switch (command) {
    case "list":
      if (rest.length) throw new UsageError("list takes no sequence numbers");
      if (all) throw new UsageError("--all goes with redrive");
      return { command, seqs: [], all, limit, force, ...filters };
    case "show":
      if (all || values.limit !== undefined || values.source !== undefined || values.code !== undefined)
        throw new UsageError("show takes one sequence number and no options");
      return { command, seqs: sequences(rest, 1), all, limit, force, ...filters };
    case "redrive":
    case "drop":
      if (values.limit !== undefined) throw new UsageError("--limit goes with list");
      if (all) {
        if (command === "drop" || rest.length)
          throw new UsageError("--all goes with redrive, without sequence numbers");
        // Forcing sends commands whose sagas may have moved on: one by one, named, after a look.
        if (force) throw new UsageError("--force takes named sequence numbers, not --all");
        return { command, seqs: [], all, limit: MAX_LETTERS, force, ...filters };
      }
      if (values.source !== undefined || values.code !== undefined)
        throw new UsageError("--source and --code select letters for list and redrive --all");
      return { command, seqs: sequences(rest), all, limit, force, ...filters };
    default:
      throw new UsageError(command === undefined ? "no command" : `unknown command "${command}"`);
  }
}

/**
 * Runs a checked command against `nc`. Exported for the tests; `main` adds the connection and the
 * exit code.
 */
export async function runDeadLetterCommand(
  nc: NatsConnection,
  ns: string,
  cmd: DeadLetterCommand,
  output: Output,
): Promise<Outcome> {
  const topo = topology(ns);
  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  /** Hands `take` each letter that matches --source and --code, up to `limit` of them, one at a time. */
  const select = async (limit: number, take: (stored: StoredDeadLetter) => void): Promise<number> => {
    let taken = 0;
    await visitDeadLetters(js, topo, cmd.source, (stored) => {
      if (cmd.code !== undefined && stored.letter.code !== cmd.code) return true;
      take(stored);
      return ++taken < limit;
    });
    return taken;
  };
  switch (cmd.command) {
    case "list": {
      // Printed as read: a large stream is never held in memory.
      const listed = await select(cmd.limit, ({ seq, letter }) =>
        output.out(
          [
            seq,
            timestamp(letter.at),
            letter.code,
            oneLine(letter.subject),
            `deliveries ${letter.deliveries}`,
            oneLine(letter.reason),
          ].join("  "),
        ),
      );
      output.err(`${listed} dead letter(s) in ${topo.streams.deadLetters}`);
      return { ok: true };
    }
    case "show": {
      const seq = cmd.seqs[0] ?? 0;
      // JSON escapes C0 control characters but not C1 ones (U+0080–U+009F, CSI among them).
      const json = JSON.stringify({ seq, ...(await readDeadLetter(jsm, topo, seq)) }, null, 2);
      output.out(
        json.replace(/[\u0080-\u009f]/g, (char) => `\\u${char.charCodeAt(0).toString(16).padStart(4, "0")}`),
      );
      return { ok: true };
    }
    case "redrive":
    case "drop": {
      let seqs = cmd.seqs;
      if (cmd.all) {
        seqs = [];
        await select(cmd.limit, (stored) => seqs.push(stored.seq));
        if (seqs.length >= cmd.limit)
          output.err(`${cmd.command}: the first ${cmd.limit} matching letters; run it again for the rest`);
      }
      return each(seqs, cmd.command, topo, output, (seq) =>
        cmd.command === "drop"
          ? dropDeadLetter(jsm, topo, seq).then(() => `dropped dead letter ${seq}`)
          : redriveDeadLetter(js, jsm, topo, seq, { force: cmd.force }).then(
              (sent) =>
                `redrove dead letter ${seq} to ${sent.subject} (${sent.stream} #${sent.streamSeq}${sent.duplicate ? ", already there" : ""})`,
            ),
      );
    }
  }
}

/** Handles each sequence in turn; a failure is printed and the rest still handled. */
async function each(
  seqs: readonly number[],
  verb: string,
  topo: Topology,
  output: Output,
  handle: (seq: number) => Promise<string>,
): Promise<Outcome> {
  let failed = 0;
  for (const [i, seq] of seqs.entries()) {
    // Messages name what a letter holds (subjects, ids), which whoever wrote it chose.
    try {
      output.out(oneLine(await handle(seq), Number.POSITIVE_INFINITY));
    } catch (error) {
      failed++;
      output.err(
        oneLine(
          `${verb} ${seq} failed: ${error instanceof Error ? error.message : String(error)}`,
          Number.POSITIVE_INFINITY,
        ),
      );
    }
    if (seqs.length > 100 && (i + 1) % 100 === 0) output.err(`${verb}: ${i + 1} of ${seqs.length}…`);
  }
  output.err(
    `${verb}: ${seqs.length - failed} of ${seqs.length} dead letter(s) of ${topo.streams.deadLetters}${failed ? `, ${failed} failed` : ""}`,
  );
  return { ok: failed === 0 };
}

function sequences(args: readonly string[], exactly?: number): number[] {
  if (args.length === 0) throw new UsageError("name the dead letters by sequence number (see list)");
  if (exactly !== undefined && args.length !== exactly)
    throw new UsageError(`takes ${exactly} sequence number`);
  return args.map((arg) => positiveInteger(arg, "a sequence number"));
}

function positiveInteger(text: string, what: string): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value) || value < 1)
    throw new UsageError(`${what} must be a positive integer (got "${text}")`);
  return value;
}

/** C0 and C1 control characters (ESC starts a terminal escape sequence). */
function isControl(code: number): boolean {
  return code < 0x20 || (code >= 0x7f && code <= 0x9f);
}

/** `at` as an ISO time; as the bare number when outside what a Date holds (the schema takes any integer). */
function timestamp(at: number): string {
  const date = new Date(at);
  return Number.isNaN(date.getTime()) ? String(at) : date.toISOString();
}

/** One line of plain text: a reason may carry a handler's error text, escape sequences included. */
function oneLine(text: string, maxLength = 160): string {
  const flat = [...text.replace(/\s+/g, " ")]
    .map((char) => (isControl(char.codePointAt(0) ?? 0) ? "?" : char))
    .join("");
  return flat.length > maxLength ? `${flat.slice(0, maxLength - 1)}…` : flat;
}

async function main(): Promise<void> {
  const output: Output = { out: (line) => console.log(line), err: (line) => console.error(line) };
  let cmd: DeadLetterCommand;
  try {
    cmd = parseDeadLetterCommand(process.argv.slice(2));
  } catch (error) {
    // parseArgs's own errors (unknown option, missing value) are usage errors too.
    console.error(`dead-letters: ${error instanceof Error ? error.message : String(error)}\n${USAGE}`);
    process.exitCode = 2;
    return;
  }
  let nc: NatsConnection | undefined;
  try {
    const config = readConfig();
    nc = await connectNatsFromConfig(config, "jetsaga-dead-letters");
    const outcome = await runDeadLetterCommand(nc, config.ns, cmd, output);
    process.exitCode = outcome.ok ? 0 : 1;
  } catch (error) {
    console.error(`dead-letters: ${error instanceof Error ? error.message : String(error)}`);
    process.exitCode = 1;
  } finally {
    await nc?.close().catch(() => {});
  }
}

if (import.meta.main) await main();
