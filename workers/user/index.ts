/** The user service: its data (users, credit reservations) and its command worker. */
export { isUserStoreError, UserStoreError, type UserStoreErrorCode } from "./errors.ts";
export {
  type OutboxRelay,
  type OutboxRelayOptions,
  type RelayLogger,
  startOutboxRelay,
} from "./outbox-relay.ts";
export {
  DEFAULT_RETENTION_MS,
  type PruneResult,
  type Pruner,
  type PrunerLogger,
  type PrunerOptions,
  startPruner,
} from "./pruner.ts";
export {
  type CreateUserOptions,
  createUserStore,
  type NewUser,
  OUTBOX_CHANNEL,
  type OutboxMessage,
  type ReleaseReply,
  type ReserveReply,
  type User,
  type UserStore,
  type VerifyReply,
} from "./store.ts";
export { startUserWorker, USER_SERVICE, type UserWorkerOptions, userCommandHandlers } from "./worker.ts";

/** Directory of the user service's SQL migrations, for `migrate(sql, { name: "user", dir })`. */
export const userMigrationsDir: URL = new URL("./migrations/", import.meta.url);
