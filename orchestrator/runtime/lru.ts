/**
 * A bounded map that forgets the least recently used entry first. Keeps the hot instances' states
 * in memory without holding every instance ever seen. Bounded by entry count and, optionally, by
 * the entries' total weight (e.g. bytes), so a few large values cannot outgrow the heap either.
 */
export class LruCache<K, V> {
  readonly #maxEntries: number;
  readonly #maxWeight: number;
  readonly #map = new Map<K, { value: V; weight: number }>();
  #weight = 0;

  /** `maxEntries` entries at most (0 disables caching), and `maxWeight` in total (default: no limit). */
  constructor(maxEntries: number, maxWeight = Number.POSITIVE_INFINITY) {
    this.#maxEntries = Math.max(0, maxEntries);
    this.#maxWeight = Math.max(0, maxWeight);
  }

  get size(): number {
    return this.#map.size;
  }

  /** Total weight of the entries held. */
  get weight(): number {
    return this.#weight;
  }

  get(key: K): V | undefined {
    const held = this.#map.get(key);
    if (held === undefined) return undefined;
    // Map keeps insertion order: re-inserting marks the entry most recently used.
    this.#map.delete(key);
    this.#map.set(key, held);
    return held.value;
  }

  /** Holds `value` under `key` with `weight` (default 1); one heavier than the limit is not held. */
  set(key: K, value: V, weight = 1): void {
    this.delete(key);
    if (this.#maxEntries === 0 || weight > this.#maxWeight) return;
    this.#map.set(key, { value, weight });
    this.#weight += weight;
    while (this.#map.size > this.#maxEntries || this.#weight > this.#maxWeight) {
      const oldest = this.#map.keys().next();
      if (oldest.done) break;
      this.delete(oldest.value);
    }
  }

  delete(key: K): void {
    const held = this.#map.get(key);
    if (held === undefined) return;
    this.#map.delete(key);
    this.#weight -= held.weight;
  }
}
