/**
 * Per-process CPU time and memory from Linux /proc, so every benchmark part (nats-server,
 * orchestrator, worker, load generator) is measured as its own process. On a 2-core machine they
 * all compete for the same cores: per-process CPU per saga is what shows which one bounds the rate.
 */
import { execFileSync } from "node:child_process";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";

let ticksPerSecond: number | undefined;

/** USER_HZ, the unit of /proc/<pid>/stat and /proc/stat times (100 on every common Linux build). */
function clockTicks(): number {
  if (ticksPerSecond === undefined) {
    try {
      ticksPerSecond = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
    } catch {
      ticksPerSecond = 100;
    }
  }
  return ticksPerSecond;
}

/** CPU time (user + system) a process has used so far, ms; NaN when it is gone. */
export function processCpuMs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The command name (field 2) may contain spaces and parentheses: split after its closing ")".
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // Fields 14 and 15 (utime, stime) are at index 11 and 12 once pid and comm are dropped.
    const ticks = Number(fields[11]) + Number(fields[12]);
    return (ticks * 1000) / clockTicks();
  } catch {
    return Number.NaN;
  }
}

/** Parsed fields of /proc/<pid>/stat after the command name: index 1 = ppid, 11/12 = utime/stime, 13/14 = cutime/cstime. */
function statFields(pid: number): string[] | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  } catch {
    return undefined;
  }
}

/**
 * CPU time of a process and its children, ms: the live children's own time plus what the process
 * has collected from children that exited (cutime/cstime). For multi-process servers (Postgres:
 * a postmaster and one backend per connection); NaN when the process is gone.
 */
export function processTreeCpuMs(pid: number): number {
  const root = statFields(pid);
  if (!root) return Number.NaN;
  let ticks = Number(root[11]) + Number(root[12]) + Number(root[13]) + Number(root[14]);
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const fields = statFields(Number(entry));
    if (fields && Number(fields[1]) === pid) ticks += Number(fields[11]) + Number(fields[12]);
  }
  return (ticks * 1000) / clockTicks();
}

/**
 * Write-family system calls (write, writev, sendmsg…) a process has made so far, from
 * `/proc/<pid>/io` `syscw`; NaN when unavailable. For the Node services nearly all are socket
 * writes: each one that wakes another process is costly on small VMs (docs/BENCHMARKS.md, fix 13).
 * nats-server's also count its file-store writes.
 */
export function writeSyscalls(pid: number | "self"): number {
  try {
    const io = readFileSync(`/proc/${pid}/io`, "utf8");
    const match = /^syscw:\s*(\d+)$/m.exec(io);
    return match ? Number(match[1]) : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`) in KiB; NaN when unavailable. */
function statusKiB(pid: number, field: "VmRSS" | "VmHWM"): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status);
    return match ? Number(match[1]) : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** Resident set size now, MiB. */
export function rssMiB(pid: number): number {
  return statusKiB(pid, "VmRSS") / 1024;
}

/** Peak resident set size (since start or the last {@link resetPeakRss}), MiB. */
export function peakRssMiB(pid: number): number {
  return statusKiB(pid, "VmHWM") / 1024;
}

/**
 * Resets a process's peak RSS to its current RSS (`echo 5 > /proc/<pid>/clear_refs`), so the
 * peak of one measurement window is not the peak of an earlier one. Best effort: returns false
 * when not permitted (the peak then covers the process's whole life).
 */
export function resetPeakRss(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, "5");
    return true;
  } catch {
    return false;
  }
}

/**
 * Busy CPU time of the whole machine (all cores), ms, from the first line of /proc/stat: user, nice,
 * system, irq and softirq. Idle and iowait are not busy; nor is steal, time the hypervisor gave
 * our vCPUs to another guest, in which no process here ran. Guest times are already in user/nice.
 */
export function machineBusyMs(stat?: string): number {
  try {
    const line = (stat ?? readFileSync("/proc/stat", "utf8")).split("\n", 1)[0] ?? "";
    const values = line.trim().split(/\s+/).slice(1).map(Number);
    // Fields: user nice system idle iowait irq softirq steal guest guest_nice.
    const busy = [0, 1, 2, 5, 6].reduce((sum, field) => sum + (values[field] ?? 0), 0);
    return (busy * 1000) / clockTicks();
  } catch {
    return Number.NaN;
  }
}

/** Number of CPUs the machine has. */
export function coreCount(): number {
  return cpus().length;
}

/** CPU of a set of named processes and of the machine at one instant; see {@link cpuDelta}. */
export interface CpuSnapshot {
  at: number;
  processes: Record<string, number>;
  self: number;
  machine: number;
  /** Write syscalls so far per named pid (not trees) and `client` (this process). */
  writes: Record<string, number>;
}

/**
 * Takes a {@link CpuSnapshot}: each named pid, each named process tree (pid and children, e.g.
 * Postgres), this process, and the whole machine.
 */
export function cpuSnapshot(pids: Record<string, number>, trees: Record<string, number> = {}): CpuSnapshot {
  const usage = process.resourceUsage();
  const processes: Record<string, number> = {};
  for (const [name, pid] of Object.entries(pids)) processes[name] = processCpuMs(pid);
  for (const [name, pid] of Object.entries(trees)) processes[name] = processTreeCpuMs(pid);
  const writes: Record<string, number> = { client: writeSyscalls("self") };
  for (const [name, pid] of Object.entries(pids)) writes[name] = writeSyscalls(pid);
  return {
    at: performance.now(),
    processes,
    self: (usage.userCPUTime + usage.systemCPUTime) / 1000,
    machine: machineBusyMs(),
    writes,
  };
}

/** CPU used between two snapshots: per named process, by this process, and by everything else. */
export interface CpuUsed {
  wallMs: number;
  /** ms of CPU per named process. */
  processes: Record<string, number>;
  /** ms of CPU of this (the measuring) process. */
  self: number;
  /**
   * ms of CPU used on the machine by processes not named and not this one (other sessions' tests,
   * the shell…): the noise the figures were measured under. Not clamped: it can come out below 0,
   * as the machine's times are sampled once per clock tick while the processes' are measured, so
   * over a short window they differ by a few ticks either way.
   */
  other: number;
  /** Write syscalls per named process and `client` (this process). */
  writes: Record<string, number>;
}

/** The CPU used between `before` and `after`. */
export function cpuDelta(before: CpuSnapshot, after: CpuSnapshot): CpuUsed {
  const processes: Record<string, number> = {};
  let ours = after.self - before.self;
  for (const [name, end] of Object.entries(after.processes)) {
    const used = end - (before.processes[name] ?? Number.NaN);
    processes[name] = used;
    if (Number.isFinite(used)) ours += used;
  }
  const writes: Record<string, number> = {};
  for (const [name, end] of Object.entries(after.writes)) {
    writes[name] = end - (before.writes[name] ?? Number.NaN);
  }
  return {
    wallMs: after.at - before.at,
    processes,
    self: after.self - before.self,
    other: after.machine - before.machine - ours,
    writes,
  };
}
