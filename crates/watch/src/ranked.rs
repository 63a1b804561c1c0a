//! Ranked mutexes: a lock order that is checked, not just documented.
//!
//! Every lock has a rank (declared in `docs/locking.md`). A thread may only take a lock
//! whose rank is higher than every lock it already holds. In debug builds (and so in
//! every test) a violation panics at once with both locks' names, on the first run that
//! takes the locks in the wrong order, whether or not the other order ever happens at the
//! same time. Release builds skip the bookkeeping.

use parking_lot::{Mutex, MutexGuard};
use std::ops::{Deref, DerefMut};

#[cfg(debug_assertions)]
thread_local! {
    /// The ranks (and names) of the ranked locks this thread holds, in acquisition order.
    static HELD: std::cell::RefCell<Vec<(u32, &'static str)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A `parking_lot` mutex with a rank and a name.
pub struct RankedMutex<T> {
    /// Only debug builds check it; release builds keep it for debuggers.
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    rank: u32,
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    name: &'static str,
    inner: Mutex<T>,
}

/// The guard of a [`RankedMutex`]; releases the lock (and its rank) when dropped.
pub struct RankedGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    #[cfg(debug_assertions)]
    rank: u32,
}

impl<T> RankedMutex<T> {
    /// A mutex of `rank`, called `name` in violation reports.
    pub const fn new(rank: u32, name: &'static str, value: T) -> RankedMutex<T> {
        RankedMutex {
            rank,
            name,
            inner: Mutex::new(value),
        }
    }

    /// Takes the lock. Panics in debug builds when the calling thread holds a ranked lock
    /// of equal or higher rank.
    pub fn lock(&self) -> RankedGuard<'_, T> {
        check_rank(self.rank, self.name);
        let guard = self.inner.lock();
        entered_rank(self.rank, self.name);
        RankedGuard {
            guard,
            #[cfg(debug_assertions)]
            rank: self.rank,
        }
    }
}

impl<T> Deref for RankedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for RankedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(debug_assertions)]
impl<T> Drop for RankedGuard<'_, T> {
    fn drop(&mut self) {
        left_rank(self.rank);
    }
}

/// Panics (debug builds) when the calling thread holds a ranked lock of rank `rank` or
/// higher: taking `name` now would break the lock order.
#[cfg_attr(not(debug_assertions), allow(unused_variables))]
pub(crate) fn check_rank(rank: u32, name: &'static str) {
    #[cfg(debug_assertions)]
    HELD.with(|held| {
        let held = held.borrow();
        if let Some(&(held_rank, held_name)) = held.iter().max_by_key(|(rank, _)| *rank)
            && held_rank >= rank
        {
            panic!(
                "lock order violation: taking {name} (rank {rank}) while holding {held_name} (rank {held_rank}); see docs/locking.md"
            );
        }
    });
}

/// Records (debug builds) that the calling thread now holds `name`.
#[cfg_attr(not(debug_assertions), allow(unused_variables))]
pub(crate) fn entered_rank(rank: u32, name: &'static str) {
    #[cfg(debug_assertions)]
    HELD.with(|held| held.borrow_mut().push((rank, name)));
}

/// Records (debug builds) that the calling thread released its lock of `rank`.
#[cfg_attr(not(debug_assertions), allow(unused_variables))]
pub(crate) fn left_rank(rank: u32) {
    #[cfg(debug_assertions)]
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if let Some(position) = held.iter().rposition(|(r, _)| *r == rank) {
            held.remove(position);
        }
    });
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn locks_in_rank_order_are_fine_and_released_ranks_are_forgotten() {
        let low = RankedMutex::new(10, "low", 1);
        let high = RankedMutex::new(20, "high", 2);
        {
            let a = low.lock();
            let b = high.lock();
            assert_eq!(*a + *b, 3);
        }
        // Both released: taking the high one alone, then the low one, is not nested.
        drop(high.lock());
        drop(low.lock());
    }

    #[test]
    #[should_panic(
        expected = "lock order violation: taking low (rank 10) while holding high (rank 20)"
    )]
    fn taking_a_lower_rank_while_holding_a_higher_one_panics() {
        let low = RankedMutex::new(10, "low", ());
        let high = RankedMutex::new(20, "high", ());
        let _h = high.lock();
        let _l = low.lock();
    }

    #[test]
    #[should_panic(expected = "lock order violation")]
    fn two_locks_of_one_rank_cannot_nest() {
        let a = RankedMutex::new(10, "a", ());
        let b = RankedMutex::new(10, "b", ());
        let _a = a.lock();
        let _b = b.lock();
    }
}
