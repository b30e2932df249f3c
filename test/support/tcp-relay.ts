/**
 * A TCP relay the tests put between a client and a real server, to make the network fail in the
 * ways a mock cannot: the server's answers held back while the connection stays open (a stalled
 * server, a congested link), or everything sent into the void (a host gone with its sockets
 * half-open).
 */
import net from "node:net";

export interface TcpRelay {
  /** `target` with the relay's host and port. */
  url: string;
  /** What the server sends waits (in the kernel's buffers) until `resume()`; the client's goes on. */
  holdAnswers(): void;
  resume(): void;
  /** Nothing passes any more either way, and is lost; new connections are refused. */
  stallAndRefuse(): void;
  /** Bytes that arrived since `stallAndRefuse()` and went nowhere. */
  held(): number;
  destroy(): void;
}

/** Starts a relay on 127.0.0.1 to `target` (any URL with a host and a port). */
export async function startTcpRelay(target: URL, defaultPort?: number): Promise<TcpRelay> {
  const sockets = new Set<net.Socket>();
  const upstreams = new Set<net.Socket>();
  let stalled = false;
  let holding = false;
  let held = 0;
  const port = Number(target.port || defaultPort);
  if (!Number.isInteger(port) || port <= 0) throw new Error(`startTcpRelay: no port in ${target}`);
  const server = net.createServer((client) => {
    const upstream = net.connect(port, target.hostname);
    upstreams.add(upstream);
    if (holding) upstream.pause();
    for (const [from, to] of [
      [client, upstream],
      [upstream, client],
    ] as const) {
      sockets.add(from);
      from.on("data", (chunk: Buffer) => {
        if (stalled) held += chunk.length;
        else to.write(chunk);
      });
      from.on("error", () => to.destroy());
      from.on("close", () => {
        sockets.delete(from);
        upstreams.delete(from);
        to.destroy();
      });
    }
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const url = new URL(target);
  url.hostname = "127.0.0.1";
  url.port = String((server.address() as net.AddressInfo).port);
  return {
    url: url.toString(),
    holdAnswers(): void {
      holding = true;
      for (const upstream of upstreams) upstream.pause();
    },
    resume(): void {
      holding = false;
      for (const upstream of upstreams) upstream.resume();
    },
    stallAndRefuse(): void {
      stalled = true;
      // Stops listening at once; its callback would wait for the open connections to end.
      server.close();
    },
    held: () => held,
    destroy(): void {
      for (const socket of sockets) socket.destroy();
      server.close();
    },
  };
}
