/** The user service: its data (users, credit reservations) and its command worker. */
export { isUserStoreError, UserStoreError, type UserStoreErrorCode } from "./errors.ts";
export {
  createUserStore,
  type NewUser,
  type ReleaseReply,
  type ReserveReply,
  type User,
  type UserStore,
  type VerifyReply,
} from "./store.ts";
export { startUserWorker, USER_SERVICE, type UserWorkerOptions, userCommandHandlers } from "./worker.ts";

/** Directory of the user service's SQL migrations, for `migrate(sql, { name: "user", dir })`. */
export const userMigrationsDir: URL = new URL("./migrations/", import.meta.url);
