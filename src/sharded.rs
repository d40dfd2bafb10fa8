//! What the sharded maps share (the gateway's decision cache, the in-process usage maps): the
//! shard a key goes to, and a lock that outlives a panic.

use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Which of `shards` (a power of two) `key` goes to. Not the hash's low bits (the shard's table
/// indexes by them) nor its top 7 (its tags): the top bits of the hash times an odd constant,
/// which depend on all of it.
pub(crate) fn shard_of<Q: Hash + ?Sized>(
    hasher: &impl BuildHasher,
    key: &Q,
    shards: usize,
) -> usize {
    debug_assert!(shards.is_power_of_two());
    let mixed = hasher.hash_one(key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> (64 - shards.trailing_zeros())) as usize
}

/// Locks `m`, poisoned or not: for state whose holder can leave counters behind a panic, but
/// no broken invariant, so the next caller keeps using it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
