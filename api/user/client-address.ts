/**
 * The client's network address as the API gateway reports it to the user service, which keys
 * Authenticate's per-address sign-in budget on it. Kept apart from `service.ts` so the gateway can
 * import the header name and the checks without the password hashing and the store.
 */
import { isIPv4, isIPv6 } from "node:net";

/**
 * Request header in which the gateway tells the user service the caller's address. The gateway
 * always sets it itself (a client's own value never passes); the user service believes it because
 * only the gateway reaches it inside the deployment.
 */
export const CLIENT_ADDRESS_HEADER = "x-jetsaga-client-address";

/** Longest address accepted, characters: an IPv6 address with a zone id fits with room to spare. */
export const MAX_CLIENT_ADDRESS_LENGTH = 100;

/**
 * Visible ASCII except `|` (0x21-0x7b, 0x7d, 0x7e): no spaces or control characters, and never
 * the `|` that ends the address in a rate-limit key (`addr:<address>|<email>`), so no address and
 * email can be read as another pair.
 */
const ADDRESS = /^[!-{}~]+$/;

/**
 * `raw` trimmed when it can be a client address (1-{@link MAX_CLIENT_ADDRESS_LENGTH} visible ASCII
 * characters without `|`), else undefined: the caller treats it as no address at all.
 */
export function checkClientAddress(raw: string | null | undefined): string | undefined {
  const value = raw?.trim() ?? "";
  if (value.length === 0 || value.length > MAX_CLIENT_ADDRESS_LENGTH || !ADDRESS.test(value))
    return undefined;
  return value;
}

/**
 * `raw` as an IP address in one spelling per address, else undefined. What the gateway reports,
 * so one client cannot be several budgets by writing its address several ways. Accepted, around
 * optional whitespace: an IPv4 address; an IPv6 address (any case, with or without zero groups
 * or a zone id, which is dropped); either with a port (`192.0.2.1:51234`, `[2001:db8::1]:443`)
 * or in brackets; and a `for=` parameter of an RFC 7239 `Forwarded` element
 * (`for="[2001:db8::1]:4711";proto=https`). Given as: an IPv4 address (an IPv4-mapped IPv6
 * address too, as dual-stack listeners report IPv4 peers) in dotted decimal, an IPv6 address as
 * RFC 5952 writes it (lowercase, `::` for the longest run of zero groups).
 */
export function parseClientAddress(raw: string | null | undefined): string | undefined {
  // No length bound needed: every step is linear, and request headers are bounded (16 KiB).
  let value = raw?.trim() ?? "";
  if (value.includes("=")) {
    const pair = value
      .split(";")
      .map((p) => p.trim())
      .find((p) => p.slice(0, 4).toLowerCase() === "for=");
    if (!pair) return undefined;
    value = pair.slice(4).replace(/^"(.*)"$/, "$1");
  }
  const address = withoutPort(value);
  if (isIPv4(address)) return address;
  const groups = ipv6Groups(address);
  if (!groups) return undefined;
  return mappedIPv4(groups) ?? formatIPv6(groups);
}

/**
 * The part of a client address a sign-in budget is kept for: an IPv4-mapped IPv6 address as the
 * IPv4 address (a dual-stack listener reports `::ffff:192.0.2.1` for 192.0.2.1), and an IPv6
 * address as its /48 prefix (or /64 with `ipv6PrefixBits`, for a budget not per email). A subscriber is commonly given a /56 or a /48, not one /64, and would
 * otherwise spend a fresh budget from each of its 256 to 65,536 /64s; a /48 shared by many people
 * (a company) costs little, because the budget is per address block AND email, so only sign-ins to
 * one account from that block share it. Anything else (an IPv4 address, a name a proxy put in) as
 * it is. A port some proxies write with the address (`192.0.2.1:51234`, `[2001:db8::1]:443`) is
 * dropped: each source port would otherwise have a budget of its own.
 */
export function addressBucket(written: string, options: { ipv6PrefixBits?: 48 | 64 } = {}): string {
  const address = withoutPort(written);
  if (isIPv4(address)) return address;
  const groups = ipv6Groups(address);
  if (!groups) return address;
  const mapped = mappedIPv4(groups);
  if (mapped) return mapped;
  const bits = options.ipv6PrefixBits ?? 48;
  const prefix = groups.slice(0, bits / 16).map((g) => g.toString(16));
  return `${prefix.join(":")}::/${bits}`;
}

/** `address` without the port written after it (`a.b.c.d:port`, `[ipv6]:port`) or the brackets. */
function withoutPort(address: string): string {
  const port = (digits: string | undefined): boolean => digits === undefined || Number(digits) <= 65535;
  const v4 = /^(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})$/.exec(address);
  if (v4?.[1] && isIPv4(v4[1]) && port(v4[2])) return v4[1];
  const bracketed = /^\[([^\]]+)\](?::(\d{1,5}))?$/.exec(address);
  if (bracketed?.[1] && isIPv6(bracketed[1].split("%")[0] ?? "") && port(bracketed[2])) return bracketed[1];
  return address;
}

/** The eight 16-bit groups of an IPv6 address (its zone id ignored), or undefined for anything else. */
function ipv6Groups(address: string): number[] | undefined {
  const bare = address.split("%")[0] ?? address;
  if (!isIPv6(bare)) return undefined;
  // Expand `::` to the zero groups it stands for; an IPv4 tail (`::1.2.3.4`) is two groups.
  const groups = (part: string): number[] =>
    part === ""
      ? []
      : part.split(":").flatMap((g) => (g.includes(".") ? ipv4Groups(g) : [Number.parseInt(g, 16)]));
  const [head = "", tail] = bare.split("::");
  const front = groups(head);
  const back = tail === undefined ? [] : groups(tail);
  return [...front, ...Array<number>(8 - front.length - back.length).fill(0), ...back];
}

/** The IPv4 address an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) stands for; undefined for others. */
function mappedIPv4(groups: readonly number[]): string | undefined {
  if (!groups.slice(0, 5).every((g) => g === 0) || groups[5] !== 0xffff) return undefined;
  const [high = 0, low = 0] = groups.slice(6);
  return [high >> 8, high & 0xff, low >> 8, low & 0xff].join(".");
}

/** Eight groups as RFC 5952 §4 writes them: the longest run of two or more zeros (the first of equals) as `::`. */
function formatIPv6(groups: readonly number[]): string {
  let best = { at: -1, length: 1 };
  for (let at = 0; at < groups.length; ) {
    let end = at;
    while (groups[end] === 0) end++;
    if (end - at > best.length) best = { at, length: end - at };
    at = end + 1;
  }
  const hex = (part: readonly number[]): string => part.map((g) => g.toString(16)).join(":");
  if (best.at < 0) return hex(groups);
  return `${hex(groups.slice(0, best.at))}::${hex(groups.slice(best.at + best.length))}`;
}

/** A dotted IPv4 address as the two 16-bit groups it is in an IPv6 address. */
function ipv4Groups(dotted: string): number[] {
  const [a = 0, b = 0, c = 0, d = 0] = dotted.split(".").map(Number);
  return [(a << 8) | b, (c << 8) | d];
}
