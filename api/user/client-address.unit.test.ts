/** What counts as a client address, and which budget an address spends (Node and Deno). */
import { describe, expect, it } from "vitest";
import {
  addressBucket,
  checkClientAddress,
  MAX_CLIENT_ADDRESS_LENGTH,
  parseClientAddress,
} from "./client-address.ts";

describe("checkClientAddress", () => {
  it("accepts visible ASCII up to the limit, trimmed; anything else is no address", () => {
    expect(checkClientAddress(" 192.0.2.1 ")).toBe("192.0.2.1");
    expect(checkClientAddress("fe80::1%eth0")).toBe("fe80::1%eth0");
    expect(checkClientAddress("a".repeat(MAX_CLIENT_ADDRESS_LENGTH))).toBe(
      "a".repeat(MAX_CLIENT_ADDRESS_LENGTH),
    );
    for (const bad of [
      null,
      undefined,
      "",
      "  ",
      "a".repeat(MAX_CLIENT_ADDRESS_LENGTH + 1),
      "10.0.0.1|x",
      "a b",
      "1.2.3.4\u0000x",
      "é",
    ]) {
      expect(checkClientAddress(bad)).toBeUndefined();
    }
  });
});

describe("addressBucket", () => {
  it("keeps IPv4 addresses and names, maps IPv4-mapped IPv6 to IPv4, and cuts IPv6 to its /48", () => {
    expect(addressBucket("192.0.2.1")).toBe("192.0.2.1");
    expect(addressBucket("unknown")).toBe("unknown");
    expect(addressBucket("::ffff:192.0.2.1")).toBe("192.0.2.1");
    expect(addressBucket("::FFFF:192.0.2.1")).toBe("192.0.2.1");
    expect(addressBucket("::ffff:c000:201")).toBe("192.0.2.1");
    expect(addressBucket("0:0:0:0:0:FFFF:C633:6414")).toBe("198.51.100.20");
    expect(addressBucket("0:0:0:0:0:ffff:198.51.100.20")).toBe("198.51.100.20");
    expect(addressBucket("::ffff:198.51.100.20%eth0")).toBe("198.51.100.20");
    const prefix = "2001:db8:1::/48";
    for (const address of [
      "2001:db8:1:2::1",
      "2001:0db8:0001:0002:ffff:ffff:ffff:ffff",
      "2001:DB8:1:2:a::",
      "2001:db8:1:2::1.2.3.4",
      "2001:db8:1:2::9%eth0",
    ]) {
      expect(addressBucket(address)).toBe(prefix);
    }
    expect(addressBucket("2001:db8:1:ff::1")).toBe(prefix);
    expect(addressBucket("2001:db8:2:3::1")).toBe("2001:db8:2::/48");
    expect(addressBucket("::1")).toBe("0:0:0::/48");
    expect(addressBucket("2001:db8::")).toBe("2001:db8:0::/48");
  });

  it("cuts IPv6 to its /64 when asked, leaving IPv4 as it is", () => {
    expect(addressBucket("2001:db8:1:aa::1", { ipv6PrefixBits: 64 })).toBe("2001:db8:1:aa::/64");
    expect(addressBucket("[2001:db8::7]:443", { ipv6PrefixBits: 64 })).toBe("2001:db8:0:0::/64");
    expect(addressBucket("192.0.2.1", { ipv6PrefixBits: 64 })).toBe("192.0.2.1");
  });

  it("drops a port a proxy wrote with the address: every source port is one budget", () => {
    expect(addressBucket("192.0.2.1:51234")).toBe("192.0.2.1");
    expect(addressBucket("[2001:db8:1:2::1]:443")).toBe("2001:db8:1::/48");
    expect(addressBucket("[2001:db8:1:2::1]")).toBe("2001:db8:1::/48");
    expect(addressBucket("[::ffff:192.0.2.1]:80")).toBe("192.0.2.1");
    // Not an address with a port: kept as written.
    expect(addressBucket("999.0.2.1:80")).toBe("999.0.2.1:80");
    expect(addressBucket("host.example:80")).toBe("host.example:80");
  });
});

describe("parseClientAddress", () => {
  it("spells each IPv4 and IPv6 address one way, whatever the port, brackets, case, zeros, zone or spaces", () => {
    const spellings: Record<string, string[]> = {
      "192.0.2.1": [
        "192.0.2.1",
        " 192.0.2.1\t",
        "192.0.2.1:51234",
        "::ffff:192.0.2.1",
        "[::FFFF:c000:201]:80",
      ],
      "2001:db8:1:2::1": [
        "2001:db8:1:2::1",
        "2001:DB8:1:2:0:0:0:1",
        "2001:0db8:0001:0002:0000:0000:0000:0001",
        "[2001:db8:1:2::1]:443",
        "[2001:db8:1:2::1]",
        "2001:db8:1:2::1%eth0",
        " 2001:db8:1:2::0.0.0.1 ",
      ],
      // RFC 5952: the longest run of zeros is the one shortened, the first of two as long…
      "2001:0:0:1::1": ["2001:0:0:1:0:0:0:1"],
      "2001:db8::1:0:0:1": ["2001:db8:0:0:1:0:0:1"],
      // …and never a single zero group.
      "2001:db8:0:1:1:1:1:1": ["2001:db8::1:1:1:1:1"],
      "::": ["0:0:0:0:0:0:0:0"],
      "::1": ["0:0:0:0:0:0:0:1"],
      "fe80::": ["FE80:0:0:0:0:0:0:0"],
    };
    for (const [address, written] of Object.entries(spellings)) {
      for (const w of written) expect(parseClientAddress(w), w).toBe(address);
    }
  });

  it("reads the for= of an RFC 7239 Forwarded element", () => {
    expect(parseClientAddress("for=192.0.2.60;proto=http;by=203.0.113.43")).toBe("192.0.2.60");
    expect(parseClientAddress('proto=https; For="[2001:db8:cafe::17]:4711"')).toBe("2001:db8:cafe::17");
    expect(parseClientAddress("for=unknown")).toBeUndefined();
    expect(parseClientAddress("for=_hidden")).toBeUndefined();
    expect(parseClientAddress("proto=https")).toBeUndefined();
  });

  it("is undefined for anything that is not an IP address", () => {
    for (const bad of [
      null,
      undefined,
      "",
      " ",
      "unknown",
      "host.example",
      "host.example:80",
      "01.2.3.4",
      "999.0.2.1",
      "192.0.2.1:99999",
      "1.2.3.4.5",
      "2001:db8::1::2",
      "[192.0.2.1]:80",
      "192.0.2.1|x",
    ]) {
      expect(parseClientAddress(bad), String(bad)).toBeUndefined();
    }
  });
});
