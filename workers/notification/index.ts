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
  createNotificationStore,
  type NotificationStatus,
  type NotificationStore,
  type StoredNotification,
} from "./store.ts";
export {
  NOTIFICATION_SERVICE,
  type NotificationWorkerOptions,
  notificationEventHandlers,
  startNotificationWorker,
} from "./worker.ts";

/** Directory of the notification service's SQL migrations, for `migrate(sql, { name: "notification", dir })`. */
export const notificationMigrationsDir: URL = new URL("./migrations/", import.meta.url);
