/**
 * The order API: OrderService (commands to the order saga, queries on the read model), its edge
 * validation and auth, and the resilient user service client it calls.
 */
export { type EntryWait, HistoryFollower, type SequencedEntry } from "./history-follower.ts";
export {
  type Caller,
  callerKey,
  createAuthInterceptor,
  createErrorInterceptor,
  createOrderService,
  type OrderServiceHandle,
  type OrderServiceOptions,
  orderFromState,
  orderFromView,
} from "./service.ts";
export {
  type CallOptions,
  createResilientUserClient,
  type ResilientUserClient,
  type ResilientUserClientOptions,
} from "./user-client.ts";
export { deriveOrderId, encodePosition } from "./validation.ts";
