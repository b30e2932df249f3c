/**
 * The dead-letter commands against a real nats-server and orchestrator: a message dead-lettered
 * because its workflow was not deployed yet runs once redriven; a letter that kept only part of its
 * payload is refused and can be dropped; bad command lines are refused before connecting.
 */
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { Registry } from "prom-client";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { counterWorkflow, reminderWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { countDeadLetters, instanceDeadLetters } from "../../workers/runtime/dead-letters.ts";
import {
  createWorkflowClient,
  type RunningOrchestrator,
  readStoredDeadLetters,
  startOrchestrator,
  topology,
  type WorkflowClient,
} from "../index.ts";
import { type Output, parseDeadLetterCommand, runDeadLetterCommand } from "./dead-letters.ts";
import { registerOrchestratorMetrics } from "./metrics.ts";

function captured(): Output & { outLines: string[]; errLines: string[] } {
  const outLines: string[] = [];
  const errLines: string[] = [];
  return { outLines, errLines, out: (line) => outLines.push(line), err: (line) => errLines.push(line) };
}

describe("dead-letter commands", () => {
  const ns = uniqueNamespace("dlq-cmd");
  const topo = topology(ns);
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator | undefined;
  let client: WorkflowClient;
  let jsm: JetStreamManager;
  const run = (argv: string[], output: Output) =>
    runDeadLetterCommand(nc, ns, parseDeadLetterCommand(argv), output);
  const stored = () => readStoredDeadLetters(jetstream(nc), topo);

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    // Deployed without the counter workflow, which a client already starts instances of (and
    // dead-lettering what it does not know at once, not after the rolling-update grace).
    orchestrator = await startOrchestrator({
      nc,
      ns,
      workflows: [reminderWorkflow],
      maxMessageBytes: 2048,
      versionSkew: { maxDeliveries: 1 },
    });
    client = await createWorkflowClient({ nc, ns });
    jsm = await jetstreamManager(nc);
  });

  afterAll(async () => {
    await client?.close();
    await orchestrator?.stop();
    await nc?.close();
  });

  it("redrives a start dead-lettered before its workflow was deployed: the instance then runs", async () => {
    await client.start("counter", "late-1", { expected: 1 });
    await expect.poll(async () => (await stored()).length, { timeout: 10_000 }).toBe(1);
    const [letter] = await stored();
    expect(letter?.letter).toMatchObject({
      code: "UNKNOWN_TYPE",
      subject: topo.inboxSubject("counter", "late-1"),
    });
    const seq = letter?.seq ?? 0;

    // The fix: a deployment that knows the workflow.
    await orchestrator?.stop();
    orchestrator = await startOrchestrator({
      nc,
      ns,
      workflows: [counterWorkflow, reminderWorkflow],
      maxMessageBytes: 2048,
      versionSkew: { maxDeliveries: 1 },
    });

    const listed = captured();
    expect(await run(["list", "--code", "UNKNOWN_TYPE"], listed)).toEqual({ ok: true });
    expect(listed.outLines).toHaveLength(1);
    expect(listed.outLines[0]).toMatch(
      new RegExp(
        `^${seq}  \\S+  UNKNOWN_TYPE  ${topo.inboxSubject("counter", "late-1").replaceAll(".", "\\.")}  deliveries 1  unknown workflow counter$`,
      ),
    );

    const redriven = captured();
    expect(await run(["redrive", String(seq)], redriven)).toEqual({ ok: true });
    expect(redriven.outLines[0]).toMatch(
      new RegExp(
        `^redrove dead letter ${seq} to ${topo.inboxSubject("counter", "late-1").replaceAll(".", "\\.")} \\(`,
      ),
    );
    // Within the inbox's de-duplication window of the original start: it must still be taken.
    await client.signal("counter", "late-1", { type: "bump", by: 2 });
    expect(await client.awaitCompletion("counter", "late-1", { timeoutMs: 10_000 })).toMatchObject({
      status: "completed",
      output: { seen: 1, total: 2 },
    });
    expect(await stored()).toEqual([]);
  });

  it("redrives a timer firing dead-lettered while its workflow was not deployed: the instance takes it", async () => {
    const deploy = async (workflows: Parameters<typeof startOrchestrator>[0]["workflows"]) => {
      await orchestrator?.stop();
      orchestrator = await startOrchestrator({
        nc,
        ns,
        workflows,
        maxMessageBytes: 2048,
        versionSkew: { maxDeliveries: 1 },
      });
    };
    await deploy([counterWorkflow, reminderWorkflow]);
    await client.start("reminder", "rem-1", { delayMs: 3_000 });
    await expect
      .poll(async () => Object.keys((await client.getState("reminder", "rem-1"))?.timers ?? {}))
      .toHaveLength(1);
    // When the timer fires, the deployment does not know the workflow.
    await deploy([counterWorkflow]);
    await expect.poll(async () => (await stored()).length, { timeout: 10_000 }).toBe(1);
    const [letter] = await stored();
    expect(letter?.letter).toMatchObject({
      code: "UNKNOWN_TYPE",
      subject: topo.inboxSubject("reminder", "rem-1"),
    });
    expect(await client.getState("reminder", "rem-1")).toMatchObject({ status: "running" });

    await deploy([counterWorkflow, reminderWorkflow]);
    expect(await run(["redrive", String(letter?.seq)], captured())).toEqual({ ok: true });
    expect(await client.awaitCompletion("reminder", "rem-1", { timeoutMs: 10_000 })).toMatchObject({
      status: "completed",
    });
    expect(await stored()).toEqual([]);
  });

  it("refuses to redrive a timer firing stored under another instance's inbox subject", async () => {
    await client.start("reminder", "rem-2", { delayMs: 3_600_000 });
    await expect
      .poll(async () => Object.keys((await client.getState("reminder", "rem-2"))?.timers ?? {}))
      .toHaveLength(1);
    const state = await client.getState("reminder", "rem-2");
    const [key = "", { token } = { token: "" }] = Object.entries(state?.timers ?? {})[0] ?? [];
    const schedule = topo.timerSubject("reminder", "rem-2", key, token);
    const scheduled = await jsm.streams.getMessage(topo.streams.inbox, { last_by_subj: schedule });
    const firing = {
      id: `timer.reminder.rem-2.${key}.${token}`,
      workflow: "reminder",
      instanceId: "rem-2",
      event: { type: `timer.${key}` },
      timer: { key, token },
      at: 1,
    };
    const seq = await forge(
      {
        stream: topo.streams.inbox,
        subject: topo.inboxSubject("reminder", "rem-other"),
        data: JSON.stringify(firing),
      },
      topo.streams.inbox,
    );
    const output = captured();
    const redriven = await run(["redrive", String(seq)], output);
    await run(["drop", String(seq)], captured());
    expect(redriven).toEqual({ ok: false });
    expect(output.errLines[0]).toContain("is a timer firing of reminder/rem-2 stored under subject");
    // rem-2's own schedule is still the one its arming made.
    expect((await jsm.streams.getMessage(topo.streams.inbox, { last_by_subj: schedule }))?.seq).toBe(
      scheduled?.seq,
    );
  });

  it("keeps a too-large message whole when it fits the letter, refuses to redrive a letter that kept only part, and drops it", async () => {
    const subject = topo.inboxSubject("reminder", "big-1");
    const big = JSON.stringify({
      id: "big",
      workflow: "reminder",
      instanceId: "big-1",
      at: 1,
      event: { type: "x" },
      pad: "y".repeat(4000),
    });
    await jetstream(nc).publish(subject, big);
    await expect.poll(async () => (await stored()).length, { timeout: 10_000 }).toBe(1);
    const [kept] = await stored();
    // Over the orchestrator's 2 KiB limit, but the letter keeps it all: once the limit is raised,
    // a redrive sends it back as it came.
    expect(kept?.letter).toMatchObject({ code: "TOO_LARGE", data: big, encoding: "utf8" });
    expect(kept?.letter.truncated).toBeUndefined();
    expect(await run(["drop", String(kept?.seq)], captured())).toEqual({ ok: true });

    // A letter that kept only part of its payload (too large for the server's max payload).
    const seq = String(
      await forge(
        {
          code: "TOO_LARGE",
          reason: "too large (data truncated to 10 bytes to fit the max payload)",
          stream: topo.streams.inbox,
          subject,
          data: big.slice(0, 10),
          truncated: true,
        },
        topo.streams.inbox,
      ),
    );
    await expect.poll(async () => (await stored()).length, { timeout: 10_000 }).toBe(1);
    const refused = captured();
    expect(await run(["redrive", seq], refused)).toEqual({ ok: false });
    expect(refused.errLines[0]).toMatch(
      /^redrive \d+ failed: dead letter \d+ kept only part of its payload \(TOO_LARGE\)/,
    );
    expect(await stored()).toHaveLength(1);

    const shown = captured();
    await run(["show", seq], shown);
    expect(JSON.parse(shown.outLines.join("\n"))).toMatchObject({
      seq: Number(seq),
      code: "TOO_LARGE",
      subject,
    });

    const dropped = captured();
    expect(await run(["drop", seq], dropped)).toEqual({ ok: true });
    expect(dropped.outLines).toEqual([`dropped dead letter ${seq}`]);
    expect(await stored()).toEqual([]);
  });

  /** Writes a dead letter as any service allowed to could; returns its sequence in the stream. */
  async function forge(record: Record<string, unknown>, source = "forged"): Promise<number> {
    const letter = {
      reason: "forged",
      code: "MAX_DELIVERIES",
      consumer: "someone",
      sequence: 1,
      deliveries: 5,
      encoding: "utf8",
      headers: {},
      at: Date.now(),
      ...record,
    };
    return (await jetstream(nc).publish(topo.deadLetterSubject(source), JSON.stringify(letter))).seq;
  }

  it("sends a letter back only into its own stream of this namespace, and a command only when forced", async () => {
    const refused = [
      // The JetStream API, with the operator's credentials.
      await forge({
        stream: topo.streams.history,
        subject: `$JS.API.STREAM.DELETE.${topo.streams.history}`,
        data: "",
      }),
      // The inbox stream, but another namespace's subject.
      await forge({ stream: topo.streams.inbox, subject: "other.inbox.counter.x1", data: "{}" }),
      // A namespace this one is a prefix of.
      await forge(
        { stream: topo.streams.inbox, subject: `${ns}x.inbox.counter.x1`, data: "{}" },
        topo.streams.inbox,
      ),
      // A subject of another of this namespace's streams.
      await forge(
        { stream: topo.streams.inbox, subject: topo.eventSubject("counter", "x"), data: "{}" },
        topo.streams.inbox,
      ),
      // An inbox message the orchestrator did not dead-letter.
      await forge({ stream: topo.streams.inbox, subject: topo.inboxSubject("counter", "x1"), data: "{}" }),
      // Another service's command.
      await forge(
        { stream: topo.streams.commands, subject: topo.commandSubject("user.verify"), data: "{}" },
        "notification",
      ),
      // A wildcard.
      await forge(
        { stream: topo.streams.commands, subject: topo.commandSubject("user.*"), data: "{}" },
        "user",
      ),
    ];
    const command = {
      commandId: "cmd-1",
      command: "user.verify",
      input: { userId: "u1" },
      replyTo: { workflow: "counter", instanceId: "c-9" },
      at: 1,
    };
    const commandLetter = await forge(
      {
        stream: topo.streams.commands,
        subject: topo.commandSubject("user.verify"),
        data: JSON.stringify(command),
      },
      "user",
    );
    const output = captured();
    expect(await run(["redrive", ...[...refused, commandLetter].map(String)], output)).toEqual({ ok: false });
    expect(output.outLines).toEqual([]);
    expect(output.errLines.slice(0, refused.length)).toEqual(
      refused.map((seq) =>
        expect.stringMatching(
          new RegExp(
            `^redrive ${seq} failed: dead letter ${seq} came from .*: only messages of the inbox \\(dead-lettered by the orchestrator\\), commands \\(by their service's worker\\) and events streams of namespace "${ns}" are sent again$`,
          ),
        ),
      ),
    );
    expect(output.errLines[refused.length]).toMatch(
      /is command cmd-1 of instance counter\/c-9: a worker that dead-letters a command it can read tells the instance it failed \(command\.failed\)/,
    );
    expect((await stored()).map((s) => s.seq)).toEqual([...refused, commandLetter]);

    const forced = captured();
    expect(await run(["redrive", "--force", String(commandLetter)], forced)).toEqual({ ok: true });
    expect(forced.outLines[0]).toMatch(
      new RegExp(
        `to ${topo.commandSubject("user.verify").replaceAll(".", "\\.")} \\(${topo.streams.commands} #`,
      ),
    );
    await run(["drop", ...refused.map(String)], captured());
    expect(await stored()).toEqual([]);
  });

  it("lists a letter on one line, its control characters shown as '?'", async () => {
    const seq = await forge({
      stream: topo.streams.inbox,
      subject: topo.inboxSubject("counter", "esc-1"),
      reason: "handler said \u001b[2J\u009bcleared\nand more",
      data: "{}",
    });
    const output = captured();
    await run(["list", "--source", "forged"], output);
    expect(output.outLines).toHaveLength(1);
    expect(output.outLines[0]).toMatch(new RegExp(`^${seq}  .*  handler said \\?\\[2J\\?cleared and more$`));
    await run(["drop", String(seq)], captured());
  });

  it("lists a letter whose time is outside the Date range as its number, and the letters after it", async () => {
    const letter = { stream: topo.streams.inbox, subject: topo.inboxSubject("counter", "far-1"), data: "{}" };
    const far = await forge({ ...letter, at: 9e15 });
    const next = await forge(letter);
    try {
      const output = captured();
      expect(await run(["list", "--source", "forged"], output)).toEqual({ ok: true });
      expect(output.outLines).toHaveLength(2);
      expect(output.outLines[0]).toMatch(new RegExp(`^${far}  9000000000000000  MAX_DELIVERIES  `));
      expect(output.outLines[1]).toMatch(new RegExp(`^${next}  \\d{4}-\\d{2}-\\d{2}T`));
    } finally {
      await run(["drop", String(far), String(next)], captured());
    }
  });

  it("sends an event back only while the events stream still holds it, byte for byte", async () => {
    const subject = topo.eventSubject("order", "paid");
    const event = JSON.stringify({ eventId: "e-1", event: "order.paid", payload: {}, at: 1 });
    const original = await jetstream(nc).publish(subject, event);
    const letter = { stream: topo.streams.events, subject, sequence: original.seq, data: event };
    const genuine = await forge(letter, "notification");
    const altered = await forge({ ...letter, data: event.replace("e-1", "e-2") }, "notification");
    const invented = await forge({ ...letter, sequence: original.seq + 1000 }, "notification");
    const output = captured();
    expect(await run(["redrive", String(genuine), String(altered), String(invented)], output)).toEqual({
      ok: false,
    });
    expect(output.outLines).toEqual([
      `redrove dead letter ${genuine} to ${subject} (${topo.streams.events} #${original.seq + 1})`,
    ]);
    expect(output.errLines.slice(0, 2)).toEqual(
      [altered, invented].map((seq) =>
        expect.stringMatching(
          new RegExp(
            `^redrive ${seq} failed: dead letter ${seq} names event \\d+ of ${topo.streams.events}, which is not there`,
          ),
        ),
      ),
    );
    await run(["drop", String(altered), String(invented)], captured());
    expect(await stored()).toEqual([]);
  });

  it("sends the payload's bytes and headers back, without the server's own headers", async () => {
    const bytes = new Uint8Array([0xff, 0xfe, 0x00, 0x7b]);
    const seq = await forge(
      {
        stream: topo.streams.inbox,
        subject: topo.inboxSubject("counter", "bin-1"),
        code: "MALFORMED_JSON",
        data: btoa(String.fromCharCode(...bytes)),
        encoding: "base64",
        headers: {
          traceparent: ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
          // Kept, it would make the publish fail: the inbox's last sequence is not 1.
          "Nats-Expected-Last-Sequence": ["1"],
        },
      },
      topo.streams.inbox,
    );
    expect(await run(["redrive", String(seq)], captured())).toEqual({ ok: true });
    // Not JSON: the orchestrator dead-letters it again, with what it received.
    await expect.poll(async () => (await stored()).length, { timeout: 10_000 }).toBe(1);
    const [again] = await stored();
    expect(again?.letter).toMatchObject({
      code: "MALFORMED_JSON",
      encoding: "base64",
      data: btoa(String.fromCharCode(...bytes)),
    });
    expect(again?.letter.headers.traceparent).toEqual([
      "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ]);
    expect(Object.keys(again?.letter.headers ?? {})).not.toContain("Nats-Expected-Last-Sequence");
    await run(["drop", String(again?.seq)], captured());
  });

  it("reports a sequence with no dead letter and still handles the others", async () => {
    await client.start("nowhere", "n-1", {});
    await expect.poll(async () => (await stored()).length, { timeout: 10_000 }).toBe(1);
    const [letter] = await stored();
    const output = captured();
    expect(await run(["drop", "999999", String(letter?.seq)], output)).toEqual({ ok: false });
    expect(output.errLines[0]).toBe(
      `drop 999999 failed: no dead letter 999999 in ${topo.streams.deadLetters}`,
    );
    expect(output.outLines).toEqual([`dropped dead letter ${letter?.seq}`]);
    expect(await stored()).toEqual([]);
  });

  it("counts the dead letters waiting, by source, in jetsaga_dead_letters on each scrape", async () => {
    const registry = new Registry();
    registerOrchestratorMetrics(
      registry,
      () => undefined,
      () => countDeadLetters(jsm, topo),
    );
    const gauge = async () => (await registry.getSingleMetric("jetsaga_dead_letters")?.get())?.values;
    expect(await gauge()).toEqual([]);
    await client.start("nowhere", "m-1", {});
    await client.start("nowhere", "m-2", {});
    await expect.poll(async () => (await stored()).length, { timeout: 10_000 }).toBe(2);
    expect(await gauge()).toEqual([{ labels: { source: topo.streams.inbox }, value: 2 }]);
    const [first] = await stored();
    await run(["drop", String(first?.seq)], captured());
    expect(await gauge()).toEqual([{ labels: { source: topo.streams.inbox }, value: 1 }]);
    await run(["drop", String((await stored())[0]?.seq)], captured());
    // Seen before: reads 0 rather than vanishing.
    expect(await gauge()).toEqual([{ labels: { source: topo.streams.inbox }, value: 0 }]);
  });

  it("finds an instance's letters: its inbox messages and the commands it dispatched", async () => {
    const command = {
      commandId: "cmd-7",
      command: "user.verify",
      input: {},
      replyTo: { workflow: "counter", instanceId: "c-7" },
      at: 1,
    };
    const seqs = [
      await forge(
        { stream: topo.streams.inbox, subject: topo.inboxSubject("counter", "c-7"), data: "{}" },
        topo.streams.inbox,
      ),
      await forge(
        {
          stream: topo.streams.commands,
          subject: topo.commandSubject("user.verify"),
          data: JSON.stringify(command),
        },
        "user",
      ),
    ];
    const other = await forge(
      { stream: topo.streams.inbox, subject: topo.inboxSubject("counter", "c-8"), data: "{}" },
      topo.streams.inbox,
    );
    const found = await instanceDeadLetters(jetstream(nc), topo, "counter", "c-7");
    expect(found.complete).toBe(true);
    expect(found.deadLetters.map((letter) => letter.seq)).toEqual(seqs);
    expect(found.deadLetters[1]).toMatchObject({ stream: topo.streams.commands, code: "MAX_DELIVERIES" });
    // A scan cut short says so.
    expect(await instanceDeadLetters(jetstream(nc), topo, "counter", "c-8", { scanLimit: 2 })).toEqual({
      deadLetters: [],
      complete: false,
    });
    await run(["drop", ...[...seqs, other].map(String)], captured());
  });

  it("refuses bad command lines with the reason", () => {
    expect(() => parseDeadLetterCommand([])).toThrow(/no command/);
    expect(() => parseDeadLetterCommand(["purge"])).toThrow(/unknown command "purge"/);
    expect(() => parseDeadLetterCommand(["redrive"])).toThrow(/by sequence number/);
    expect(() => parseDeadLetterCommand(["redrive", "7x"])).toThrow(/positive integer \(got "7x"\)/);
    expect(() => parseDeadLetterCommand(["drop", "--all"])).toThrow(/--all goes with redrive/);
    expect(() => parseDeadLetterCommand(["redrive", "3", "--code", "X"])).toThrow(/--source and --code/);
    expect(() => parseDeadLetterCommand(["show", "1", "2"])).toThrow(/takes 1 sequence number/);
    expect(() => parseDeadLetterCommand(["redrive", "--all", "--force"])).toThrow(
      /--force takes named sequence numbers/,
    );
    expect(() => parseDeadLetterCommand(["drop", "3", "--force"])).toThrow(/--force goes with redrive/);
    expect(() => parseDeadLetterCommand(["list", "--bogus"])).toThrow(/bogus/);
    expect(parseDeadLetterCommand(["redrive", "--all", "--code", "UNKNOWN_TYPE"])).toMatchObject({
      command: "redrive",
      all: true,
      code: "UNKNOWN_TYPE",
    });
  });

  it("exits 2 with the usage for a bad command line, before connecting", async () => {
    const entry = fileURLToPath(new URL("./dead-letters.ts", import.meta.url));
    const failed = await promisify(execFile)(process.execPath, [entry, "purge"], {
      env: { ...process.env, NATS_URL: "nats://127.0.0.1:1" },
    }).catch((error: { code?: number; stderr?: string }) => error);
    expect(failed).toMatchObject({ code: 2 });
    expect((failed as { stderr?: string }).stderr).toMatch(
      /unknown command "purge"\nusage: npm run dead-letters/,
    );
  });
});
