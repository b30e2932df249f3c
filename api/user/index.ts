/**
 * The user API: the `jetsaga.user.v1.UserService` handlers (accounts, sign-in with rate limit,
 * bearer tokens), password hashing, and the user service's environment settings.
 */
export {
  addressBucket,
  CLIENT_ADDRESS_HEADER,
  checkClientAddress,
  MAX_CLIENT_ADDRESS_LENGTH,
  parseClientAddress,
} from "./client-address.ts";
export { DEFAULT_USER_GRPC_PORT, readUserServiceConfig, type UserServiceConfig } from "./config.ts";
export {
  createPasswordHasher,
  DEFAULT_SCRYPT_COST,
  hashPassword,
  type PasswordHasher,
  PasswordHasherBusyError,
  type PasswordHasherOptions,
  phcCost,
  type ScryptCost,
  verifyPassword,
} from "./password.ts";
export {
  createPostgresRateLimiter,
  IDLE_BUCKET_MS,
  type RateDecision,
  type RateLimiterOptions,
  type SharedRateLimiter,
} from "./rate-limit.ts";
export {
  AUTH_FAILED_MESSAGE,
  createUserService,
  DEFAULT_AUTH_EMAIL_RATE_LIMIT,
  DEFAULT_TOKEN_TTL_SECONDS,
  USER_LIMITS,
  type UserServiceLogger,
  type UserServiceOptions,
} from "./service.ts";
