/**
 * grpc.health.v1.Health (Check, List, Watch) with a control handle to set per-service status.
 *
 * Semantics follow https://github.com/grpc/grpc/blob/master/doc/health-checking.md: the empty service
 * name "" is the whole server; Check of an unknown service fails with NOT_FOUND; Watch of an unknown
 * service reports SERVICE_UNKNOWN and keeps the stream open until the service becomes known.
 */
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, type HandlerContext } from "@connectrpc/connect";
import {
  Health,
  type HealthCheckRequest,
  type HealthCheckResponse,
  HealthCheckResponse_ServingStatus,
  HealthCheckResponseSchema,
  type HealthListResponse,
  HealthListResponseSchema,
} from "../../proto/gen/grpc/health/v1/health_pb.ts";

/** Status a service can be set to. "" (the whole server) is a service name like any other. */
export type ServingStatus = "SERVING" | "NOT_SERVING";

/** Changes what grpc.health.v1.Health reports. Load balancers and orchestrators read it. */
export interface HealthControl {
  /** Sets the status of one service ("" = the whole server); watchers see the change at once. Ignored after shutdown(). */
  setStatus(service: string, status: ServingStatus): void;
  /** The current status of a service, or undefined when the service is unknown to the health service. */
  getStatus(service: string): ServingStatus | undefined;
  /** Forgets a service: Check then answers NOT_FOUND and watchers see SERVICE_UNKNOWN. */
  clearStatus(service: string): void;
  /** Names of all known services (including ""), sorted. */
  services(): string[];
  /**
   * Marks every service NOT_SERVING and ignores later setStatus calls, so a draining server cannot be
   * marked healthy again by a late readiness probe.
   */
  shutdown(): void;
}

/**
 * The health entry every RPC server reports SERVING until it closes, whatever its readiness: for
 * liveness probes (Kubernetes' `grpc: { service: liveness }`), which restart the process when it
 * fails. "" follows readiness when the server has a readiness check.
 */
export const LIVENESS_SERVICE = "liveness";

/** Upper bound on List's answer size, from the health-checking spec. */
const LIST_MAX_SERVICES = 100;

type Listener = (status: HealthCheckResponse_ServingStatus) => void;

const toProto = (s: ServingStatus | undefined): HealthCheckResponse_ServingStatus =>
  s === undefined
    ? HealthCheckResponse_ServingStatus.SERVICE_UNKNOWN
    : s === "SERVING"
      ? HealthCheckResponse_ServingStatus.SERVING
      : HealthCheckResponse_ServingStatus.NOT_SERVING;

/** The health service: a control handle and the route registration that serves it. */
export interface HealthService {
  /** Control handle for the application. */
  readonly control: HealthControl;
  /** Registers grpc.health.v1.Health on a Connect router. */
  register(router: ConnectRouter): void;
}

/**
 * Creates the health service with the given initial statuses (service name → status).
 * Include "" to report the server as a whole (clients that check without a name ask for it).
 */
export function createHealthService(initial: Readonly<Record<string, ServingStatus>>): HealthService {
  const statuses = new Map<string, ServingStatus>(Object.entries(initial));
  const listeners = new Map<string, Set<Listener>>();
  let terminal = false;

  const notify = (service: string): void => {
    const status = toProto(statuses.get(service));
    for (const l of listeners.get(service) ?? []) l(status);
  };

  const control: HealthControl = {
    setStatus(service, status) {
      if (terminal || statuses.get(service) === status) return;
      statuses.set(service, status);
      notify(service);
    },
    getStatus: (service) => statuses.get(service),
    clearStatus(service) {
      if (terminal || !statuses.delete(service)) return;
      notify(service);
    },
    services: () => [...statuses.keys()].sort(),
    shutdown() {
      if (terminal) return;
      for (const service of statuses.keys()) {
        if (statuses.get(service) === "NOT_SERVING") continue;
        statuses.set(service, "NOT_SERVING");
        notify(service);
      }
      terminal = true;
    },
  };

  const check = (req: HealthCheckRequest): HealthCheckResponse => {
    const status = statuses.get(req.service);
    if (status === undefined) throw new ConnectError(`unknown service "${req.service}"`, Code.NotFound);
    return create(HealthCheckResponseSchema, { status: toProto(status) });
  };

  const list = (): HealthListResponse => {
    if (statuses.size > LIST_MAX_SERVICES) {
      throw new ConnectError(`more than ${LIST_MAX_SERVICES} services`, Code.ResourceExhausted);
    }
    const out: Record<string, HealthCheckResponse> = {};
    for (const [name, s] of statuses) out[name] = create(HealthCheckResponseSchema, { status: toProto(s) });
    return create(HealthListResponseSchema, { statuses: out });
  };

  async function* watch(req: HealthCheckRequest, ctx: HandlerContext): AsyncGenerator<HealthCheckResponse> {
    // Changes are queued by the listener and drained by this generator; `wake` resolves the wait
    // when a change arrives or the call ends (client cancel, deadline, server shutdown).
    const queue: HealthCheckResponse_ServingStatus[] = [toProto(statuses.get(req.service))];
    let wake: (() => void) | undefined;
    const listener: Listener = (s) => {
      queue.push(s);
      wake?.();
    };
    const onAbort = (): void => wake?.();
    const set = listeners.get(req.service) ?? new Set<Listener>();
    listeners.set(req.service, set);
    set.add(listener);
    ctx.signal.addEventListener("abort", onAbort);
    try {
      let last: HealthCheckResponse_ServingStatus | undefined;
      while (!ctx.signal.aborted) {
        const next = queue.shift();
        if (next === undefined) {
          await new Promise<void>((resolve) => {
            wake = resolve;
          });
          wake = undefined;
          continue;
        }
        // Only transitions are reported; repeated identical statuses carry no information.
        if (next === last) continue;
        last = next;
        yield create(HealthCheckResponseSchema, { status: next });
      }
    } finally {
      set.delete(listener);
      if (set.size === 0) listeners.delete(req.service);
      ctx.signal.removeEventListener("abort", onAbort);
    }
  }

  return {
    control,
    register(router) {
      router.service(Health, { check, list, watch });
    },
  };
}
