/**
 * The client address the gateway's RPC server records for a call (what it sends the user service
 * for the per-address sign-in budget), read from a proxy's header over real HTTP/1.1 and HTTP/2
 * connections. Needs no NATS or Postgres: the UserService here answers with the address it got.
 */
import { create } from "@bufbuild/protobuf";
import { type Client, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuthenticateResponseSchema, UserService } from "../proto/gen/jetsaga/user/v1/user_pb.ts";
import { clientAddressKey, clientAddressValues } from "./gateway.ts";
import { type RpcServer, startRpcServer } from "./rpc/index.ts";

/** A server recording addresses from `header`, whose Authenticate answers with the address as its token. */
function startAddressEcho(header: string): Promise<RpcServer> {
  return startRpcServer({
    contextValues: clientAddressValues(header),
    routes: (router) =>
      router.service(UserService, {
        authenticate: (_req, ctx) =>
          create(AuthenticateResponseSchema, { token: ctx.values.get(clientAddressKey) ?? "(none)" }),
      }),
  });
}

describe("client address from a proxy's header", () => {
  let xff: RpcServer;
  let forwarded: RpcServer;
  beforeAll(async () => {
    [xff, forwarded] = await Promise.all([
      startAddressEcho("x-forwarded-for"),
      startAddressEcho("forwarded"),
    ]);
  });
  afterAll(async () => {
    await xff?.close();
    await forwarded?.close();
  });

  const clients = (server: RpcServer): Client<typeof UserService>[] =>
    (["1.1", "2"] as const).map((httpVersion) =>
      createClient(UserService, createConnectTransport({ baseUrl: server.url, httpVersion })),
    );
  /** The address each protocol's call from behind a proxy writing `value` in `header` is recorded as. */
  const recorded = async (server: RpcServer, header: string, value: string): Promise<string[]> =>
    Promise.all(
      clients(server).map(
        async (client) => (await client.authenticate({}, { headers: { [header]: value } })).token,
      ),
    );

  it("records one address however the proxy writes it, so it spends one budget", async () => {
    const spellings: [written: string, address: string][] = [
      ["2001:DB8:1:2:0:0:0:1", "2001:db8:1:2::1"],
      ["198.51.100.9, [2001:db8:1:2::1]:443", "2001:db8:1:2::1"],
      ["198.51.100.9,   ::ffff:192.0.2.1", "192.0.2.1"],
      ["192.0.2.1:51234", "192.0.2.1"],
    ];
    for (const [value, address] of spellings) {
      expect(await recorded(xff, "x-forwarded-for", value), value).toEqual([address, address]);
    }
    expect(
      await recorded(forwarded, "forwarded", 'for=198.51.100.9, for="[2001:db8:cafe::17]:4711";proto=https'),
    ).toEqual(["2001:db8:cafe::17", "2001:db8:cafe::17"]);
  });

  it("records the TCP peer (the proxy) for a last entry that is not an IP address: made-up text is no budget of its own", async () => {
    for (const value of ["unknown", "made-up-1", "198.51.100.9, made-up-2", "01.2.3.4", "192.0.2.1:99999"]) {
      expect(await recorded(xff, "x-forwarded-for", value), value).toEqual(["127.0.0.1", "127.0.0.1"]);
    }
    expect(await recorded(forwarded, "forwarded", "for=_hidden;proto=https")).toEqual([
      "127.0.0.1",
      "127.0.0.1",
    ]);
  });
});
