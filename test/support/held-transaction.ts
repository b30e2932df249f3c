import type { Sql, TransactionSql } from "../../common/postgres.ts";

/** A transaction kept open by {@link holdTransaction}. */
export interface HeldTransaction {
  /** Lets the transaction commit. */
  release(): void;
  /** Settles once the transaction has ended (after {@link release}). */
  readonly ended: Promise<void>;
}

/**
 * Runs `hold` (taking a lock, writing a row not yet committed) in a transaction on `sql`, and
 * resolves once it has run, with the transaction kept open (and what `hold` took, held) until
 * `release()`: for tests of what others do while they wait on it.
 */
export async function holdTransaction(
  sql: Sql,
  hold: (tx: TransactionSql) => Promise<unknown>,
): Promise<HeldTransaction> {
  let release = (): void => {};
  const released = new Promise<void>((resolve) => {
    release = resolve;
  });
  let held = (): void => {};
  const holding = new Promise<void>((resolve) => {
    held = resolve;
  });
  const ended = sql.begin(async (tx) => {
    await hold(tx);
    held();
    await released;
  });
  // A `hold` that fails ends the transaction before it was held: fail here rather than wait.
  await Promise.race([holding, ended.then(() => {})]);
  return { release, ended: ended.then(() => {}) };
}
