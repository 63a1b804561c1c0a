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
}
