/**
 * RPC plumbing shared by every service: one server port for gRPC, Connect and gRPC-Web, with
 * grpc.health.v1 and gRPC server reflection built in. Runs under Node 24 and Deno 2.
 */
export type { HealthControl, HealthService, ServingStatus } from "./health.ts";
export { createHealthService, LIVENESS_SERVICE } from "./health.ts";
export type { ReadinessCheck } from "./readiness.ts";
export { natsAnswers, postgresAnswers, postgresReadiness } from "./readiness.ts";
export type { ReflectionIndex } from "./reflection.ts";
export { createReflectionIndex, reflectionServices, registerReflection } from "./reflection.ts";
export type { FallbackHandler, NodeServerRequest, RpcServer, RpcServerOptions } from "./server.ts";
export { startRpcServer } from "./server.ts";
