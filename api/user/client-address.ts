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
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(address);
  if (mapped?.[1] && isIPv4(mapped[1])) return mapped[1];
  const bare = address.split("%")[0] ?? address;
  if (!isIPv6(bare)) return address;
  // Expand `::` to the zero groups it stands for; an IPv4 tail (`::1.2.3.4`) is two groups.
  const groups = (part: string): string[] =>
    part === "" ? [] : part.split(":").flatMap((g) => (g.includes(".") ? ipv4Groups(g) : [g]));
  const [head = "", tail] = bare.split("::");
  const front = groups(head);
  const back = tail === undefined ? [] : groups(tail);
  const full = [...front, ...Array<string>(8 - front.length - back.length).fill("0"), ...back];
  const value = full.map((g) => Number.parseInt(g, 16));
  // An IPv4-mapped address however written (`::ffff:c000:201`, `0:0:0:0:0:ffff:1.2.3.4`).
  if (value.slice(0, 5).every((g) => g === 0) && value[5] === 0xffff) {
    const [high = 0, low = 0] = value.slice(6);
    return [high >> 8, high & 0xff, low >> 8, low & 0xff].join(".");
  }
  const bits = options.ipv6PrefixBits ?? 48;
  const prefix = full.slice(0, bits / 16).map((g) => Number.parseInt(g, 16).toString(16));
  return `${prefix.join(":")}::/${bits}`;
}

/** `address` without the port written after it (`a.b.c.d:port`, `[ipv6]:port`) or the brackets. */
function withoutPort(address: string): string {
  const v4 = /^(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}$/.exec(address);
  if (v4?.[1] && isIPv4(v4[1])) return v4[1];
  const bracketed = /^\[([^\]]+)\](?::\d{1,5})?$/.exec(address);
  if (bracketed?.[1] && isIPv6(bracketed[1].split("%")[0] ?? "")) return bracketed[1];
  return address;
}

/** A dotted IPv4 address as the two 16-bit hex groups it is in an IPv6 address. */
function ipv4Groups(dotted: string): string[] {
  const [a = 0, b = 0, c = 0, d = 0] = dotted.split(".").map(Number);
  return [((a << 8) | b).toString(16), ((c << 8) | d).toString(16)];
}
