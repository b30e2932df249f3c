import { describe, expect, it } from "vitest";
import { integerSetting, readConfig, stringSetting } from "./config.ts";
import { describeServers, natsServersAndAuth } from "./nats.ts";

describe("readConfig", () => {
  it("reads NATS credentials from one of three forms", () => {
    expect(readConfig({}).natsAuth).toBeUndefined();
    expect(readConfig({ NATS_CREDS: "/run/secrets/nats.creds" }).natsAuth).toEqual({
      kind: "creds",
      file: "/run/secrets/nats.creds",
    });
    expect(readConfig({ NATS_USER: "u", NATS_PASSWORD: "p" }).natsAuth).toEqual({
      kind: "userPassword",
      user: "u",
      password: "p",
    });
    expect(readConfig({ NATS_TOKEN: "t" }).natsAuth).toEqual({ kind: "token", token: "t" });
    // Empty values count as unset (compose passes `${VAR:-}` through as "").
    expect(readConfig({ NATS_TOKEN: "", NATS_USER: "" }).natsAuth).toBeUndefined();
  });

  it("refuses half a user/password pair and more than one form, naming the variables", () => {
    for (const env of [{ NATS_USER: "u" }, { NATS_PASSWORD: "p" }]) {
      expect(() => readConfig(env)).toThrow(/NATS_USER and NATS_PASSWORD/);
    }
    for (const env of [
      { NATS_CREDS: "/c", NATS_TOKEN: "t" },
      { NATS_USER: "u", NATS_PASSWORD: "p", NATS_TOKEN: "t" },
      { NATS_CREDS: "/c", NATS_PASSWORD: "p" },
    ]) {
      expect(() => readConfig(env)).toThrow(/only one of NATS_CREDS/);
    }
    // The message names the variables, never their values.
    let message = "";
    try {
      readConfig({ NATS_TOKEN: "secret-value", NATS_CREDS: "/c" });
    } catch (error) {
      message = (error as Error).message;
    }
    expect(message).toMatch(/only one of/);
    expect(message).not.toContain("secret-value");
  });

  it("reads the shutdown timeout in seconds, 25 by default", () => {
    expect(readConfig({}).shutdownTimeoutMs).toBe(25_000);
    expect(readConfig({ JETSAGA_SHUTDOWN_TIMEOUT_SECONDS: "5" }).shutdownTimeoutMs).toBe(5_000);
    expect(() => readConfig({ JETSAGA_SHUTDOWN_TIMEOUT_SECONDS: "0" })).toThrow(
      /JETSAGA_SHUTDOWN_TIMEOUT_SECONDS must be a whole number from 1 to 3600/,
    );
  });

  it("reads the database pool size, 4 by default", () => {
    expect(readConfig({}).databasePoolSize).toBe(4);
    expect(readConfig({ DATABASE_POOL_SIZE: "12" }).databasePoolSize).toBe(12);
    expect(() => readConfig({ DATABASE_POOL_SIZE: "0" })).toThrow(
      /DATABASE_POOL_SIZE must be a whole number from 1 to 1000/,
    );
  });

  it("takes an empty or blank string setting as unset", () => {
    // Compose passes `${PROBE_HOST:-}` through as "": probes on every interface, a namespace "".
    const empty = readConfig({ PROBE_HOST: "", NATS_URL: "", JETSAGA_NS: " ", DATABASE_URL: "" });
    expect(empty.probeHost).toBe("127.0.0.1");
    expect(empty.natsUrl).toBe("nats://127.0.0.1:4222");
    expect(empty.ns).toBe("jetsaga");
    expect(empty.databaseUrl).toBeUndefined();
    const given = readConfig({ PROBE_HOST: "0.0.0.0", NATS_URL: "nats://n:4222", JETSAGA_NS: "prod" });
    expect([given.probeHost, given.natsUrl, given.ns]).toEqual(["0.0.0.0", "nats://n:4222", "prod"]);
    expect(stringSetting({ X: " v " }, "X")).toBe("v");
    expect(stringSetting({}, "X")).toBeUndefined();
  });

  it("refuses a replica count outside 1–5", () => {
    expect(readConfig({ JETSAGA_STREAM_REPLICAS: "3" }).streamReplicas).toBe(3);
    expect(() => readConfig({ JETSAGA_STREAM_REPLICAS: "9" })).toThrow(/JETSAGA_STREAM_REPLICAS/);
  });
});

describe("integerSetting", () => {
  const range = { min: 1, max: 100, fallback: 7 };
  it("takes the fallback when unset or empty, and whole numbers in range", () => {
    expect(integerSetting({}, "N", range)).toBe(7);
    expect(integerSetting({ N: "" }, "N", range)).toBe(7);
    expect(integerSetting({ N: " 42 " }, "N", range)).toBe(42);
    expect(integerSetting({ N: "100" }, "N", range)).toBe(100);
  });

  it("refuses anything else with a CONFIG error naming the setting", () => {
    for (const value of ["0", "101", "-1", "1.5", "1e2", "0x10", "ten", "NaN"]) {
      expect(() => integerSetting({ N: value }, "N", range), value).toThrow(
        expect.objectContaining({
          code: "CONFIG",
          message: `N must be a whole number from 1 to 100, got "${value}"`,
        }),
      );
    }
  });
});

describe("describeServers", () => {
  it("drops user, password and token from NATS URLs, keeping the rest", () => {
    expect(describeServers("nats://user:pw@a:4222,nats://tok3n@b:4222, c:4222")).toBe(
      "nats://a:4222,nats://b:4222,c:4222",
    );
    expect(describeServers(["tls://x:y@host"])).toBe("tls://host");
  });

  it("reads a server without a scheme as nats://, so its password is dropped too", () => {
    expect(describeServers("jetsaga:s3cret@host:4222")).toBe("nats://host:4222");
    expect(describeServers("tok3n@host:4222,other:4222")).toBe("nats://host:4222,other:4222");
    expect(describeServers("nats://a:4222,host:4222")).toBe("nats://a:4222,host:4222");
  });
});

describe("natsServersAndAuth", () => {
  it("takes a URL's user:password@ or token@ out of the servers and into the credentials", () => {
    expect(
      natsServersAndAuth({
        natsUrl: "nats://jetsaga:s3cret@a:4222, nats://jetsaga:s3cret@b:4222",
        natsAuth: undefined,
      }),
    ).toEqual({
      servers: ["nats://a:4222", "nats://b:4222"],
      auth: { kind: "userPassword", user: "jetsaga", password: "s3cret" },
    });
    expect(natsServersAndAuth({ natsUrl: "tok3n@host:4222", natsAuth: undefined })).toEqual({
      servers: ["nats://host:4222"],
      auth: { kind: "token", token: "tok3n" },
    });
    // Percent-encoded as URLs need them; a server without credentials gets the same ones.
    expect(natsServersAndAuth({ natsUrl: "nats://u%40x:p%3Aw@a:4222,b:4222", natsAuth: undefined })).toEqual({
      servers: ["nats://a:4222", "b:4222"],
      auth: { kind: "userPassword", user: "u@x", password: "p:w" },
    });
  });

  it("keeps servers and configured credentials as they are when the URLs carry none", () => {
    const natsAuth = { kind: "token", token: "t" } as const;
    expect(natsServersAndAuth({ natsUrl: "nats://a:4222,b:4222", natsAuth })).toEqual({
      servers: ["nats://a:4222", "b:4222"],
      auth: natsAuth,
    });
  });

  it("refuses credentials in the URLs beside other settings, or differing between URLs", () => {
    for (const config of [
      { natsUrl: "nats://u:p@a:4222", natsAuth: { kind: "token", token: "t" } as const },
      { natsUrl: "nats://u:p@a:4222,nats://u:other@b:4222", natsAuth: undefined },
      { natsUrl: "nats://u:p@a:4222,nats://tok@b:4222", natsAuth: undefined },
      { natsUrl: "nats://u:p%zz@a:4222", natsAuth: undefined },
    ]) {
      let error: unknown;
      try {
        natsServersAndAuth(config);
      } catch (caught) {
        error = caught;
      }
      expect(error, config.natsUrl).toMatchObject({ code: "CONFIG" });
      // Never the values.
      expect((error as Error).message).not.toMatch(/:p@|other|tok\b/);
    }
  });
});
