/**
 * Services authenticate to NATS with what `readConfig()` found in the environment. Against real
 * nats-servers that require a user and password, or a token.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type NatsServerHandle, startNatsServer } from "../test/support/servers.ts";
import { readConfig } from "./config.ts";
import { connectNats, connectNatsFromConfig } from "./nats.ts";

describe("NATS credentials", () => {
  let withPassword: NatsServerHandle;
  let withToken: NatsServerHandle;

  beforeAll(async () => {
    [withPassword, withToken] = await Promise.all([
      startNatsServer({ args: ["--user", "jetsaga", "--pass", "s3cret-pass"] }),
      startNatsServer({ args: ["--auth", "t0ken-value"] }),
    ]);
  });
  afterAll(async () => {
    await Promise.all([withPassword?.stop(), withToken?.stop()]);
  });

  it("connects with NATS_USER/NATS_PASSWORD and with NATS_TOKEN, and is refused without them", async () => {
    const user = readConfig({ NATS_USER: "jetsaga", NATS_PASSWORD: "s3cret-pass" });
    const nc = await connectNats({ servers: withPassword.url, auth: user.natsAuth });
    await nc.close();
    const token = readConfig({ NATS_TOKEN: "t0ken-value" });
    const tc = await connectNats({ servers: withToken.url, auth: token.natsAuth });
    await tc.close();

    await expect(connectNats({ servers: withPassword.url })).rejects.toMatchObject({ code: "UNAVAILABLE" });
    const wrong = readConfig({ NATS_TOKEN: "not-the-token" });
    await expect(connectNats({ servers: withToken.url, auth: wrong.natsAuth })).rejects.toMatchObject({
      code: "UNAVAILABLE",
    });
  });

  it("connects with the user:password@ or token@ of NATS_URL, which nats.js itself ignores", async () => {
    const withUser = withPassword.url.replace("nats://", "nats://jetsaga:s3cret-pass@");
    const nc = await connectNatsFromConfig(readConfig({ NATS_URL: withUser }), "url-credentials");
    await nc.flush();
    await nc.close();
    // Without a scheme, as `host:port` servers are often written.
    const withTokenUrl = withToken.url.replace("nats://", "t0ken-value@");
    const tc = await connectNatsFromConfig(readConfig({ NATS_URL: withTokenUrl }), "url-token");
    await tc.flush();
    await tc.close();
  });

  it("names an unreadable credentials file instead of trying to connect", async () => {
    const config = readConfig({ NATS_CREDS: "/nonexistent/jetsaga.creds" });
    await expect(connectNats({ servers: withPassword.url, auth: config.natsAuth })).rejects.toMatchObject({
      code: "INVALID_ARGUMENT",
      message: expect.stringContaining("/nonexistent/jetsaga.creds"),
    });
  });
});
