/**
 * The order read model (CQRS read side): PostgreSQL tables projected from the order sagas'
 * histories, the projector that keeps them current, queries for the API, and a rebuild.
 */
export {
  adoptCheckpointStream,
  applyBatch,
  type BatchRows,
  CHECKPOINT_CHANNEL,
  type Checkpoint,
  COMPENSATION_STATES,
  cancelReasonOf,
  checkpointNotice,
  itemsOf,
  MAPPED_STATES,
  type OrderFacts,
  type OrderStatusName,
  orderFactsOf,
  orderStatusOf,
  type PositionedEntry,
  parseCheckpointNotice,
  reachesStatus,
  readCheckpoint,
  rowsOf,
  type SkippedEntry,
  sagaStateString,
  topState,
} from "./projection.ts";
export {
  type OrderProjector,
  type OrderProjectorOptions,
  type OrderProjectorStats,
  type ProjectionPosition,
  type ProjectorLogger,
  startOrderProjector,
} from "./projector.ts";
export {
  getOrder,
  type ListOrdersQuery,
  listOrders,
  type OrderView,
  type PageCursor,
} from "./queries.ts";
export {
  orderReadModelMigrations,
  type RebuildOptions,
  type RebuildResult,
  rebuildOrderReadModel,
} from "./rebuild.ts";
export {
  identityOf,
  type StreamIdentity,
  type StreamIdentityWatch,
  type StreamMark,
  sameIncarnation,
  streamIdentity,
  watchStream,
  watchStreamIdentity,
} from "./stream-identity.ts";
