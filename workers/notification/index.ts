/** The notification service: turns the order saga's domain events into customer notifications. */
export {
  type ChannelLogger,
  type DeliverOptions,
  logChannel,
  type Notification,
  type NotificationChannel,
  type NotificationKind,
  type WebhookChannelOptions,
  webhookChannel,
} from "./channels.ts";
export {
  DEFAULT_RETENTION_DAYS,
  DEFAULT_RETENTION_MS,
  MIN_RETENTION_DAYS,
  MIN_RETENTION_MS,
  type NotificationPruneResult,
  type NotificationPruner,
  type NotificationPrunerOptions,
  startNotificationPruner,
} from "./pruner.ts";
export {
  type Claim,
  createNotificationStore,
  type NotificationStatus,
  type NotificationStore,
  type StoredNotification,
} from "./store.ts";
export {
  DEFAULT_CLAIM_LEASE_MS,
  NOTIFICATION_SERVICE,
  type NotificationWorkerOptions,
  notificationEventHandlers,
  startNotificationWorker,
} from "./worker.ts";

/** Directory of the notification service's SQL migrations, for `migrate(sql, { name: "notification", dir })`. */
export const notificationMigrationsDir: URL = new URL("./migrations/", import.meta.url);
