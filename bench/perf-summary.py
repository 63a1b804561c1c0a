#!/usr/bin/env python3
"""Where the time goes: summarises `perf script` output (call graphs) as Markdown.

Each sample is charged to one component: walking its stack from the innermost frame
outwards, the first frame that names a component decides (so malloc called by SQLite is
"allocator", SQLite's own static helpers count as SQLite through their caller
`sqlite3VdbeExec`). Prints the components' shares, the threads' shares and the
functions with the most samples of their own.

    perf script -i perf.data | bench/perf-summary.py "title" [thread-regex]
"""
import collections
import re
import sys

# (component, pattern on a frame's symbol), tried in this order for each frame.
COMPONENTS = [
    ("fsync (durability)", r"fdatasync|\bfsync|unixSync|file_write_and_wait|jbd2"),
    ("allocator (malloc/free)", r"__x64_sys_munmap|__do_munmap|__x64_sys_mmap|^(malloc|free|cfree|realloc|calloc|_int_malloc|_int_free|_int_realloc|malloc_consolidate|unlink_chunk|tcache|__libc_malloc|__libc_free|__GI___libc_free|__GI___libc_malloc|alloc::raw_vec::finish_grow)"),
    ("thread start/stop", r"pthread_create|std::thread::Builder::spawn|clone3$|__clone|do_exit|exit_mm"),
    ("Argon2 (password checks)", r"argon2"),
    ("blake3 (body hashes)", r"blake3"),
    ("mail-parser", r"^mail_parser::"),
    ("mail-builder", r"^mail_builder::"),
    ("SQLite", r"^(sqlite3|pcache|btree|vdbe|pager|wal[A-Z]|unix[A-Z]|balance|insertCell|dropCell|fillInCell|accessPayload|getAndInitPage|instrFunc|rusqlite::)"),
    ("kernel: network", r"^(tcp_|sock_|inet_|__sys_sendto|__sys_recvfrom|__x64_sys_sendto|__x64_sys_recvfrom|__x64_sys_write$|__x64_sys_read$|ip_|__netif|net_rx|loopback|skb_|__dev_queue)"),
    ("kernel: file I/O", r"^(vfs_|ext4_|filemap_|__x64_sys_pwrite|__x64_sys_pread|generic_perform_write|copy_page|_copy_to_iter|_copy_from_iter|iomap_|xfs_|overlay|ovl_)"),
    ("kernel: futex/scheduling", r"futex|^schedule|finish_task_switch|__schedule|try_to_wake_up|_raw_spin_unlock_irq|epoll"),
    ("IMAP/POP3/SMTP protocol code", r"^(mailroom_imap|mailroom_pop3|mailroom_smtp|smtp_proto)::"),
    ("tokio runtime", r"^tokio::"),
    ("Mailroom (other)", r"^mailroom"),
]
COMPILED = [(name, re.compile(p)) for name, p in COMPONENTS]
GROUPS = [
    ("SMTP/IMAP/POP3 sessions (tokio workers)", r"^tokio-rt"),
    ("conversion workers", r"^conversion"),
    ("parse helper threads", r"^parse-"),
    ("directory writer", r"^directory"),
    ("outbound", r"^outbound"),
    ("watchdog and sampler", r"^watch"),
]


def clean(sym):
    sym = re.sub(r"\+0x[0-9a-f]+$", "", sym.strip())
    return re.sub(r" \(inlined\)$", "", sym)


def main():
    title = sys.argv[1] if len(sys.argv) > 1 else "profile"
    only = re.compile(sys.argv[2]) if len(sys.argv) > 2 else None
    comp = collections.Counter()
    where = collections.defaultdict(collections.Counter)
    thread = collections.Counter()
    own = collections.Counter()
    total = 0
    header, frames = None, []

    def flush():
        nonlocal total
        if header is None:
            return
        comm = header.split()[0] if header.split() else "?"
        if only and not only.search(comm):
            return
        total += 1
        group = next((g for g, p in GROUPS if re.search(p, comm)), None)
        group = group or "thread " + re.sub(r"[-_]?\d+$", "", comm)
        thread[group] += 1
        syms = [clean(f) for f in frames]
        if syms:
            own[syms[0]] += 1
        for s in syms:
            hit = next((name for name, p in COMPILED if p.search(s)), None)
            if hit:
                comp[hit] += 1
                where[hit][re.sub(r"<.*?>|\(.*", "", s)[:70]] += 1
                return
        comp["other"] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            header, frames = None, []
        elif line[0] not in " \t":
            header = line
        else:
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                sym = parts[1].rsplit(" (", 1)[0]
                frames.append(sym)
    flush()
    if total == 0:
        print(f"#### {title}\n\nno samples\n")
        return
    pct = lambda n: f"{100 * n / total:.1f} %"
    print(f"#### {title}\n")
    print(f"{total} samples.\n")
    print("| component | share of samples | mostly in |")
    print("|---|---:|---|")
    for name, n in comp.most_common():
        top = ", ".join(f"`{f.replace('|', '/')}`" for f, _ in where[name].most_common(2))
        print(f"| {name} | {pct(n)} | {top} |")
    print()
    print("| threads | share |")
    print("|---|---:|")
    for name, n in thread.most_common():
        print(f"| {name} | {pct(n)} |")
    print()
    print("| function (own samples) | share |")
    print("|---|---:|")
    for name, n in own.most_common(12):
        short = name if len(name) <= 110 else name[:107] + "..."
        print(f"| `{short.replace('|', '/')}` | {pct(n)} |")
    print()


if __name__ == "__main__":
    main()
