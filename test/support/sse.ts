/** Reading a Server-Sent Events response in tests, as EventSource would parse it. */

/** A parsed Server-Sent Event. */
export interface SseEvent {
  id?: string;
  event: string;
  data: string;
}

/** Reads SSE events from a fetch response, one at a time. */
export function sseReader(response: Response): { next(timeoutMs?: number): Promise<SseEvent | undefined> } {
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  const parse = (block: string): SseEvent | undefined => {
    const event: SseEvent = { event: "message", data: "" };
    let hasData = false;
    for (const line of block.split("\n")) {
      if (line.startsWith(":") || line === "") continue;
      const [field = "", ...rest] = line.split(":");
      const value = rest.join(":").replace(/^ /, "");
      if (field === "id") event.id = value;
      if (field === "event") event.event = value;
      if (field === "data") {
        event.data += (hasData ? "\n" : "") + value;
        hasData = true;
      }
    }
    return hasData ? event : undefined;
  };
  return {
    async next(timeoutMs = 10_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const cut = buffer.indexOf("\n\n");
        if (cut >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const event = parse(block);
          if (event) return event;
          continue;
        }
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`no SSE event within ${timeoutMs} ms`);
        let timer: ReturnType<typeof setTimeout> | undefined;
        const chunk = await Promise.race([
          reader.read(),
          new Promise<never>((_, reject) => {
            timer = setTimeout(() => reject(new Error(`no SSE event within ${timeoutMs} ms`)), left);
          }),
        ]).finally(() => clearTimeout(timer));
        if (chunk.done) return undefined;
        buffer += chunk.value;
      }
    },
  };
}
