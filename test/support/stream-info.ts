/** Test double of a NATS connection whose JetStream stream info replies say something else. */
import type { Msg, NatsConnection } from "@nats-io/transport-node";

/**
 * `nc`, except that the replies of the JetStream API to stream info requests for `stream` are
 * what `rewrite` makes of them (undefined: unchanged): a server that reports otherwise.
 */
export function rewritingStreamInfo(
  nc: NatsConnection,
  stream: string,
  rewrite: (reply: Record<string, unknown>) => Record<string, unknown> | undefined,
): NatsConnection {
  const subject = `$JS.API.STREAM.INFO.${stream}`;
  const request = async (...args: Parameters<NatsConnection["request"]>): Promise<Msg> => {
    const reply = await nc.request(...args);
    const rewritten = args[0] === subject ? rewrite(reply.json<Record<string, unknown>>()) : undefined;
    if (rewritten === undefined) return reply;
    const data = new TextEncoder().encode(JSON.stringify(rewritten));
    return new Proxy(reply, {
      get(target, prop) {
        if (prop === "data") return data;
        if (prop === "json") return () => JSON.parse(new TextDecoder().decode(data));
        if (prop === "string") return () => new TextDecoder().decode(data);
        const value: unknown = Reflect.get(target, prop, target);
        return typeof value === "function" ? value.bind(target) : value;
      },
    });
  };
  return new Proxy(nc, {
    get(target, prop) {
      if (prop === "request") return request;
      const value: unknown = Reflect.get(target, prop, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}
