//! Thread priorities: mail first, directory work in what mail leaves.
//!
//! Why: mail's write turn is busy most of the time under load, and a mail transaction
//! that loses its CPU to an import's parsing or a regeneration's scan holds the turn
//! longer, which every other mail transaction then waits for. Pacing the directory's
//! background lane bounds its writer time, but not the CPU its job threads and writer
//! use around it; the kernel's scheduler can, if those threads run at a lower priority
//! (a higher nice value). They still get all the CPU mail leaves idle.

/// Nice value of threads doing background directory work (imports, regenerations).
pub const BACKGROUND_NICE: i32 = 10;
/// Nice value of the directory writer: it applies administrators' single changes
/// too, which must still publish promptly, so it is lowered less than the jobs.
pub const DIRECTORY_WRITER_NICE: i32 = 5;

/// Lowers the calling thread's priority to `nice` (Linux: a thread's nice value is its
/// own). Never raises it; a failure is logged and ignored (the thread runs as before).
pub fn lower_thread_priority(nice: i32) {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only
    // changes this thread's scheduling weight.
    let result = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if result != 0 {
        tracing::debug!(
            nice,
            error = %std::io::Error::last_os_error(),
            "cannot lower this thread's priority"
        );
    }
}

/// Puts the calling thread in Linux's idle scheduling class (`SCHED_IDLE`), or back in
/// the normal one (`SCHED_OTHER`, its nice value kept). An idle-class thread runs when a
/// CPU would otherwise idle, and a normal thread that wakes up preempts it at once,
/// where a niced thread still takes its weighted share of a busy CPU.
///
/// Why: mail on a small machine is bound by its write turn and fsyncs as much as by
/// CPU, and leaves gaps (13 % idle in the churn replay's profile); background directory
/// work (an import's parsing and chunks, a regeneration's scans) in those gaps costs
/// mail nothing, where at nice 10 it still took CPU from mail's threads when they
/// woke. Only for work nobody is waiting on: a thread in the idle class holding
/// something a normal thread needs would hold it up (priority inversion), which is why
/// the directory writer enters it for a background batch only, and an administrator's
/// change waits at most that one batch. A failure is logged and ignored.
pub fn set_idle_class(idle: bool) {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; the parameter is a valid, initialised
    // sched_param, and priority 0 is the only one these two policies take.
    let result = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if result != 0 {
        tracing::debug!(
            idle,
            error = %std::io::Error::last_os_error(),
            "cannot change this thread's scheduling class"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_only_the_calling_thread() {
        let read = || unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        };
        let before = read();
        let inside = std::thread::spawn(move || {
            lower_thread_priority(before + 3);
            read()
        })
        .join()
        .unwrap();
        assert_eq!(inside, before + 3);
        assert_eq!(read(), before, "the spawning thread keeps its priority");
    }

    #[test]
    fn the_idle_class_is_entered_and_left_with_the_nice_value_kept() {
        let (policy, nice) = std::thread::spawn(|| {
            let read = || unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            };
            let nice = read() + 2;
            lower_thread_priority(nice);
            set_idle_class(true);
            let idle = unsafe { libc::sched_getscheduler(0) };
            set_idle_class(false);
            let normal = unsafe { libc::sched_getscheduler(0) };
            ((idle, normal), (nice, read()))
        })
        .join()
        .unwrap();
        assert_eq!(policy, (libc::SCHED_IDLE, libc::SCHED_OTHER));
        assert_eq!(nice.0, nice.1, "the nice value survives the idle class");
        assert_eq!(
            unsafe { libc::sched_getscheduler(0) },
            libc::SCHED_OTHER,
            "only the calling thread changed"
        );
    }
}
