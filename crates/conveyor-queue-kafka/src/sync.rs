//! Taking a lock of the queue's state, poisoned or not.

use std::sync::{Mutex, MutexGuard};

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state stays consistent between statements; a panic elsewhere must not
    // stop the queue.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
