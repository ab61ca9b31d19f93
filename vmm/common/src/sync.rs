//! Locking that survives a panicked holder.
//!
//! Every mutex in beaconbox guards plain data that is consistent at each unlock,
//! and the VMM and vminitd must keep running (or at least tear down cleanly) after
//! a thread panicked: so a poisoned lock is taken over, never propagated as a
//! second panic.

use std::sync::{Mutex, MutexGuard};

/// Lock `m`, taking over the guard if a previous holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_lock_is_taken_over() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let joined = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("holder dies");
        })
        .join();
        assert!(joined.is_err());
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
