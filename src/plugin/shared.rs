//! State every instance of a plugin shares, whichever worker runs it (the
//! `shared` interface): windowed counters, token buckets and a bounded
//! key-value store with TTL, one namespace per plugin name, kept across hot
//! swaps of that plugin.
//!
//! [`SharedStore`] is the seam: the request path calls it synchronously and
//! it answers from memory. [`LocalStore`] is the one implementation today. A
//! replicated one (Redis, a peer mesh) would keep the same local answers and
//! exchange deltas in the background, so no request waits on a network round
//! trip; that is why the trait has no async method and no error.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Longest key kept; longer keys are cut here (at a character boundary).
pub const MAX_KEY: usize = 256;
/// Largest value `set` stores.
pub const MAX_VALUE: usize = 64 * 1024;
/// Entries a plugin's key-value store holds by default (`[plugins] shared_entries`).
pub const DEFAULT_ENTRIES: usize = 10_000;

/// A plugin's shared state. Times are nanoseconds on [`crate::backend::now_ns`]'s clock,
/// passed in so tests can drive them.
pub trait SharedStore: Send + Sync {
    /// Adds `delta` to counter `key` and returns its total over the last
    /// `window` (none: since it was created).
    fn count(&self, key: &str, delta: u64, window: Option<Duration>, now: u64) -> u64;
    /// Takes a token from bucket `key` (`rate` a second, `burst` at most):
    /// `Ok` or the wait until the next token.
    fn take(&self, key: &str, rate: f64, burst: u32, now: u64) -> Result<(), Duration>;
    fn get(&self, key: &str, now: u64) -> Option<Vec<u8>>;
    /// False when the value is over [`MAX_VALUE`].
    fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>, now: u64) -> bool;
    fn remove(&self, key: &str) -> bool;
    /// Entries evicted to make room, ever.
    fn evictions(&self) -> u64;
    /// Entries held now.
    fn entries(&self) -> usize;
}

/// Every plugin's store, by plugin name.
fn registry() -> &'static Mutex<HashMap<String, Arc<dyn SharedStore>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn SharedStore>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// The shared store of the plugin called `plugin`, made on first use and kept
/// for the life of the process (so a hot swap finds it again).
pub fn store_of(plugin: &str) -> Arc<dyn SharedStore> {
    lock(registry())
        .entry(plugin.to_string())
        .or_insert_with(|| Arc::new(LocalStore::new(entries_limit())))
        .clone()
}

/// Every plugin's store, by name, for the metrics.
pub fn stores() -> Vec<(String, Arc<dyn SharedStore>)> {
    let mut stores: Vec<_> = lock(registry()).iter().map(|(n, s)| (n.clone(), s.clone())).collect();
    stores.sort_by(|a, b| a.0.cmp(&b.0));
    stores
}

static ENTRIES_LIMIT: AtomicU64 = AtomicU64::new(DEFAULT_ENTRIES as u64);

/// Sets the bound of stores made from now on (`[plugins] shared_entries`).
pub fn set_entries_limit(entries: usize) {
    ENTRIES_LIMIT.store(entries as u64, Ordering::Relaxed);
}

fn entries_limit() -> usize {
    ENTRIES_LIMIT.load(Ordering::Relaxed) as usize
}

/// Cuts `key` to [`MAX_KEY`] bytes at a character boundary.
fn bounded(key: &str) -> &str {
    if key.len() <= MAX_KEY {
        return key;
    }
    let mut end = MAX_KEY;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    &key[..end]
}

/// Shards: keys spread over this many locks, so workers rarely contend.
const SHARDS: usize = 16;

/// Shared state in this process's memory.
pub struct LocalStore {
    counters: [Mutex<HashMap<Box<str>, Counter>>; SHARDS],
    buckets: [Mutex<HashMap<Box<str>, Bucket>>; SHARDS],
    /// Most counters, and most buckets, in one shard: keys may come from
    /// clients (an address, an API key), so neither map may grow unbounded.
    per_shard: usize,
    /// One lock: eviction needs the oldest entry of the whole store.
    values: Mutex<Values>,
    evictions: AtomicU64,
}

struct Counter {
    /// 0: no window.
    window: u64,
    /// Start of the current window.
    start: u64,
    current: u64,
    previous: u64,
}

struct Bucket {
    /// Tokens a nanosecond.
    rate: f64,
    burst: f64,
    tokens: f64,
    stamp: u64,
}

#[derive(Default)]
struct Values {
    map: HashMap<Box<str>, Value>,
    /// Keys by when they were last set (a sequence number), oldest first.
    order: BTreeMap<u64, Box<str>>,
    sequence: u64,
    limit: usize,
}

struct Value {
    bytes: Vec<u8>,
    /// 0: no expiry.
    expires: u64,
    sequence: u64,
}

fn shard(key: &str) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    (BuildHasherDefault::<DefaultHasher>::default().hash_one(key) as usize) % SHARDS
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalStore {
    pub fn new(limit: usize) -> LocalStore {
        LocalStore {
            counters: std::array::from_fn(|_| Mutex::default()),
            buckets: std::array::from_fn(|_| Mutex::default()),
            per_shard: (limit / SHARDS).max(16),
            values: Mutex::new(Values {
                limit: limit.max(1),
                ..Values::default()
            }),
            evictions: AtomicU64::new(0),
        }
    }
}

/// Makes room for one more entry in a full shard: first drops the entries
/// that hold nothing (`idle`), else the one that `age` says is oldest.
/// Returns how many were dropped.
fn make_room<T>(
    map: &mut HashMap<Box<str>, T>,
    limit: usize,
    idle: impl Fn(&T) -> bool,
    age: impl Fn(&T) -> u64,
) -> u64 {
    if map.len() < limit {
        return 0;
    }
    let before = map.len();
    map.retain(|_, entry| !idle(entry));
    if map.len() >= limit
        && let Some(oldest) = map
            .iter()
            .min_by_key(|(_, entry)| age(entry))
            .map(|(key, _)| key.clone())
    {
        map.remove(&oldest);
    }
    (before - map.len()) as u64
}

impl Values {
    fn remove(&mut self, key: &str) -> Option<Value> {
        let value = self.map.remove(key)?;
        self.order.remove(&value.sequence);
        Some(value)
    }
}

impl SharedStore for LocalStore {
    fn count(&self, key: &str, delta: u64, window: Option<Duration>, now: u64) -> u64 {
        let key = bounded(key);
        let mut counters = lock(&self.counters[shard(key)]);
        if !counters.contains_key(key) {
            // Idle: a windowed counter two windows old counts nothing.
            let idle = |c: &Counter| c.window > 0 && now.saturating_sub(c.start) >= 2 * c.window;
            let dropped = make_room(&mut counters, self.per_shard, idle, |c| c.start);
            self.evictions.fetch_add(dropped, Ordering::Relaxed);
        }
        let counter = match counters.get_mut(key) {
            Some(counter) => counter,
            None => counters.entry(key.into()).or_insert(Counter {
                window: window.map_or(0, |w| (w.as_nanos() as u64).max(1)),
                start: now,
                current: 0,
                previous: 0,
            }),
        };
        if counter.window == 0 {
            counter.current = counter.current.saturating_add(delta);
            return counter.current;
        }
        let window = counter.window;
        let elapsed = now.saturating_sub(counter.start);
        if elapsed >= window {
            // One window on: the current becomes the previous; more: both empty.
            counter.previous = if elapsed < 2 * window { counter.current } else { 0 };
            counter.current = 0;
            counter.start += elapsed / window * window;
        }
        counter.current = counter.current.saturating_add(delta);
        // The sliding window's estimate: the previous window weighted by how
        // much of it the sliding window still covers.
        let into = now.saturating_sub(counter.start) as f64 / window as f64;
        counter
            .current
            .saturating_add((counter.previous as f64 * (1.0 - into)).round() as u64)
    }

    fn take(&self, key: &str, rate: f64, burst: u32, now: u64) -> Result<(), Duration> {
        let key = bounded(key);
        let mut buckets = lock(&self.buckets[shard(key)]);
        if !buckets.contains_key(key) {
            // Idle: a bucket refilled to its burst is what a new one would be.
            let idle = |b: &Bucket| b.tokens + now.saturating_sub(b.stamp) as f64 * b.rate >= b.burst;
            let dropped = make_room(&mut buckets, self.per_shard, idle, |b| b.stamp);
            self.evictions.fetch_add(dropped, Ordering::Relaxed);
        }
        let bucket = match buckets.get_mut(key) {
            Some(bucket) => bucket,
            None => buckets.entry(key.into()).or_insert(Bucket {
                rate: rate.max(0.0) / 1e9,
                burst: f64::from(burst.max(1)),
                tokens: f64::from(burst.max(1)),
                stamp: now,
            }),
        };
        let elapsed = now.saturating_sub(bucket.stamp) as f64;
        bucket.tokens = (bucket.tokens + elapsed * bucket.rate).min(bucket.burst);
        bucket.stamp = bucket.stamp.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        if bucket.rate <= 0.0 {
            return Err(Duration::MAX);
        }
        Err(Duration::from_nanos(((1.0 - bucket.tokens) / bucket.rate).ceil() as u64))
    }

    fn get(&self, key: &str, now: u64) -> Option<Vec<u8>> {
        let key = bounded(key);
        let mut values = lock(&self.values);
        let expired = {
            let value = values.map.get(key)?;
            if value.expires == 0 || value.expires > now {
                return Some(value.bytes.clone());
            }
            true
        };
        if expired {
            values.remove(key);
        }
        None
    }

    fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>, now: u64) -> bool {
        if value.len() > MAX_VALUE {
            return false;
        }
        let key = bounded(key);
        let mut values = lock(&self.values);
        values.remove(key);
        while values.map.len() >= values.limit {
            let Some((_, oldest)) = values.order.pop_first() else {
                break;
            };
            values.map.remove(&oldest);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        values.sequence += 1;
        let sequence = values.sequence;
        let key: Box<str> = key.into();
        values.order.insert(sequence, key.clone());
        let expires = ttl.map_or(0, |ttl| now.saturating_add(ttl.as_nanos() as u64).max(1));
        values.map.insert(
            key,
            Value {
                bytes: value,
                expires,
                sequence,
            },
        );
        true
    }

    fn remove(&self, key: &str) -> bool {
        lock(&self.values).remove(bounded(key)).is_some()
    }

    fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn entries(&self) -> usize {
        lock(&self.values).map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_window_counts_the_last_window_only() {
        let store = LocalStore::new(10);
        let window = Some(Duration::from_secs(1));
        for _ in 0..10 {
            store.count("k", 1, window, 0);
        }
        assert_eq!(store.count("k", 0, window, SECOND / 2), 10);
        // Half-way through the next window: half of the previous one still counts.
        assert_eq!(store.count("k", 2, window, SECOND + SECOND / 2), 2 + 5);
        assert_eq!(
            store.count("k", 0, window, 5 * SECOND),
            0,
            "two windows on, both forgotten"
        );
        assert_eq!(store.count("total", 3, None, 0), 3);
        assert_eq!(
            store.count("total", 4, None, 100 * SECOND),
            7,
            "no window: it only grows"
        );
    }

    #[test]
    fn a_bucket_starts_full_refills_at_its_rate_and_says_how_long_to_wait() {
        let store = LocalStore::new(10);
        for _ in 0..20 {
            assert_eq!(store.take("c", 100.0, 20, 0), Ok(()));
        }
        let wait = store.take("c", 100.0, 20, 0).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(10));
        assert_eq!(store.take("c", 100.0, 20, 10_000_000), Ok(()), "one token after 10 ms");
        assert!(store.take("c", 100.0, 20, 10_000_000).is_err());
        // Never more than the burst, however long it was idle.
        let admitted = (0..100)
            .filter(|_| store.take("c", 100.0, 20, 3600 * SECOND).is_ok())
            .count();
        assert_eq!(admitted, 20);
    }

    #[test]
    fn values_expire_and_the_oldest_is_evicted_when_full() {
        let store = LocalStore::new(3);
        assert!(store.set("a", b"1".to_vec(), None, 0));
        assert!(store.set("b", b"2".to_vec(), Some(Duration::from_secs(1)), 0));
        assert!(store.set("c", b"3".to_vec(), None, 0));
        assert!(
            store.set("a", b"1'".to_vec(), None, 1),
            "setting again makes it the newest"
        );
        assert!(store.set("d", b"4".to_vec(), None, 2));
        assert_eq!(store.get("b", 3), None, "b was the oldest set");
        assert_eq!(store.evictions(), 1);
        assert_eq!(store.entries(), 3);
        assert_eq!(store.get("a", 3).as_deref(), Some(&b"1'"[..]));
        assert!(store.set("e", b"5".to_vec(), Some(Duration::from_secs(1)), 3));
        assert_eq!(store.get("e", 3 + SECOND), None, "expired");
        assert!(!store.set("big", vec![0; MAX_VALUE + 1], None, 0));
        assert!(store.remove("a"));
        assert!(!store.remove("a"));
    }

    #[test]
    fn counters_and_buckets_stay_bounded_whatever_keys_clients_send() {
        let store = LocalStore::new(16 * SHARDS);
        let per_shard = 16;
        // Buckets that stay empty (rate 0): nothing is idle, the oldest go.
        for i in 0..10_000u64 {
            let _ = store.take(&format!("client-{i}"), 0.0, 1, i);
            let _ = store.count(&format!("key-{i}"), 1, None, i);
        }
        let buckets: usize = store.buckets.iter().map(|s| lock(s).len()).sum();
        let counters: usize = store.counters.iter().map(|s| lock(s).len()).sum();
        assert!(buckets <= per_shard * SHARDS, "{buckets}");
        assert!(counters <= per_shard * SHARDS, "{counters}");
        assert!(store.evictions() >= 2 * (10_000 - per_shard * SHARDS) as u64);
        // A recent bucket is kept: its client is still limited.
        let _ = store.take("recent", 0.0, 1, 20_000);
        assert!(store.take("recent", 0.0, 1, 20_001).is_err());
    }

    #[test]
    fn tokens_are_exact_under_threads() {
        let store = Arc::new(LocalStore::new(10));
        let admitted = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        if store.take("k", 0.0, 500, 0).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        store.count("n", 1, None, 0);
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 500);
        assert_eq!(store.count("n", 0, None, 0), 8000);
    }
}
