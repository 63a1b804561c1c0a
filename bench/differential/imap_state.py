#!/usr/bin/env python3
"""Differential IMAP state semantics: the same command sequences, over two sessions on a
fresh folder, sent to Dovecot and to Mailroom; the answers compared line by line after
normalising what may differ (tags, status texts, UIDVALIDITY, timestamps, capability
lists). Scenarios: expunge announcements across sessions (UID FETCH, UID STORE, NOOP,
CHECK), COPY with flags, keywords and \\Recent, SEARCH by every flag, CONTEXT=SEARCH
updates and PARTIAL, CONDSTORE, QRESYNC resync and VANISHED.

    imap_state.py DOVECOT_PORT MAILROOM_PORT USER PASSWORD

Prints every difference; docs/imap.md explains the ones that remain.
"""
import imaplib
import re
import sys
import time


def connect(port, user, password):
    c = imaplib.IMAP4("127.0.0.1", port)
    c.login(user, password)
    return c


def raw(c, cmd):
    tag = c._new_tag().decode()
    c.send(f"{tag} {cmd}\r\n".encode())
    out = []
    while True:
        line = c.readline().decode(errors="replace").rstrip("\r\n")
        if line.startswith(tag + " "):
            out.append("TAG " + " ".join(line.split(" ")[1:2]))
            return out
        out.append(line)


def normalise(lines):
    out = []
    for line in lines:
        line = re.sub(r'\(TAG "[^"]*"\)', '(TAG "t")', line)
        line = re.sub(r"UIDVALIDITY \d+", "UIDVALIDITY v", line)
        line = re.sub(r"COPYUID \d+", "COPYUID v", line)
        line = re.sub(r'INTERNALDATE "[^"]*"', 'INTERNALDATE "d"', line)
        if line.startswith("* OK [") or line.startswith("* CAPABILITY") or line.startswith("* LIST"):
            # Response codes compared, their human text not.
            line = line.split("]")[0] + "]" if "]" in line else line
        if line.startswith("* OK [PERMANENTFLAGS") or line.startswith("* OK [CAPABILITY"):
            continue
        # Flags are a set: compared in one order.
        line = re.sub(r"FLAGS \(([^)]*)\)",
                      lambda m: "FLAGS (" + " ".join(sorted(m.group(1).split())) + ")", line)
        out.append(line)
    return out


MESSAGES = [
    f"From: a@remote.test\r\nSubject: s2{i}\r\nMessage-ID: <{i}@diff.test>\r\n"
    f"Date: Thu, 05 Mar 2026 1{i}:00:00 +0000\r\n\r\nbody {i}\r\n"
    for i in range(6)
]

# Each scenario: (name, list of (session, command)); "$box" is the fresh folder.
SCENARIOS = [
    ("expunge seen by another session", [
        ("b", "SELECT $box"),
        ("b", "FETCH 2,4 UID"),
        ("a", "STORE 1,3 +FLAGS \\Deleted"),
        ("a", "EXPUNGE"),
        ("b", "UID FETCH 2,4 UID"),
        ("b", "NOOP"),
        ("a", "STORE 1 +FLAGS \\Deleted"),
        ("a", "EXPUNGE"),
        ("b", "UID STORE 4 FLAGS \\Seen"),
        ("b", "NOOP"),
        ("a", "STORE 1 +FLAGS.SILENT \\Deleted"),
        ("a", "EXPUNGE"),
        ("b", "FETCH 1:* (FLAGS)"),
        ("b", "CHECK"),
    ]),
    ("search by flags", [
        ("a", "STORE 1 FLAGS ($hello)"),
        ("a", "STORE 2 FLAGS (\\Seen \\Flagged)"),
        ("a", "STORE 3 FLAGS (\\Answered $hello)"),
        ("a", "STORE 4 FLAGS (\\Flagged \\Draft)"),
        ("a", "STORE 5 FLAGS (\\Deleted \\Answered)"),
    ] + [("a", "SEARCH " + k) for k in [
        "ANSWERED", "UNANSWERED", "DELETED", "UNDELETED", "DRAFT", "UNDRAFT", "FLAGGED",
        "UNFLAGGED", "SEEN", "UNSEEN", "KEYWORD $hello", "UNKEYWORD $hello", "NEW", "OLD",
        "RECENT", "NOT RECENT", "OR SEEN FLAGGED", "1:3 NOT SEEN", "UID 2:* LARGER 10"]]),
    ("copy keeps flags and keywords", [
        ("b", "CREATE $box.2"),
        ("b", "SELECT $box.2"),
        ("a", "STORE 1 FLAGS (\\Seen)"),
        ("a", "STORE 2 FLAGS (\\Draft \\Flagged)"),
        ("a", "STORE 5 FLAGS (\\Flagged $kw1 $kw2)"),
        ("a", "COPY 1:2,4 $box.2"),
        ("b", "NOOP"),
        ("b", "FETCH 1:3 (FLAGS)"),
        ("a", "COPY 5 $box.2"),
        ("b", "NOOP"),
        ("b", "FETCH 4 (FLAGS)"),
        ("a", "UID COPY 99 $box.2"),
        ("a", "COPY 1 nonexistent"),
        ("b", "CLOSE"),
        ("b", "DELETE $box.2"),
    ]),
    ("CONTEXT=SEARCH", [
        ("a", "SEARCH RETURN (UPDATE) BODY body SEEN"),
        ("a", "STORE 1,2,5 +FLAGS \\Seen"),
        ("a", "STORE 1,2 -FLAGS \\Seen"),
        ("a", "UID SEARCH RETURN (UPDATE ALL) OR SEEN SUBJECT s21"),
        ("a", "STORE 3:6 +FLAGS \\Deleted"),
        ("a", "EXPUNGE"),
        ("a", "STORE 1:2 +FLAGS \\Seen"),
        ("a", "SEARCH RETURN (PARTIAL 1:1) ALL"),
        ("a", "SEARCH RETURN (PARTIAL 2:1) ALL"),
        ("a", "SEARCH RETURN (PARTIAL 1:6) ALL"),
        ("a", "SEARCH RETURN (PARTIAL 5:6) ALL"),
        ("a", "SEARCH RETURN (PARTIAL 1) ALL"),
        ("a", "SEARCH RETURN (MIN MAX COUNT) ALL"),
    ]),
    ("CONDSTORE", [
        ("a", "ENABLE CONDSTORE"),
        ("a", "FETCH 1 (MODSEQ)"),
        ("a", "STORE 1 (UNCHANGEDSINCE 1) +FLAGS \\Seen"),
        ("a", "SEARCH MODSEQ 1"),
        ("a", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1)"),
    ]),
    ("QRESYNC", [
        ("a", "ENABLE QRESYNC"),
        ("b", "ENABLE QRESYNC"),
        ("b", "SELECT $box"),
        ("a", "STORE 2 +FLAGS \\Deleted"),
        ("a", "EXPUNGE"),
        ("b", "NOOP"),
        ("b", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)"),
        ("b", "FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)"),
        ("b", "SELECT $box"),
        ("b", "CLOSE"),
    ]),
    ("LIST, STATUS and SEARCH variants", [
        ("a", "CREATE $box/child"),
        ("a", "LIST \"\" $box*"),
        ("a", "LIST \"\" $box/%"),
        ("a", "LIST (SUBSCRIBED) \"\" $box*"),
        ("a", "LSUB \"\" $box*"),
        ("a", "UNSUBSCRIBE $box/child"),
        ("a", "LSUB \"\" $box*"),
        ("a", "STATUS $box (MESSAGES UIDNEXT UNSEEN RECENT)"),
        ("a", "SEARCH 2:4,6"),
        ("a", "SEARCH 4:2 NOT 3"),
        ("a", "SEARCH *"),
        ("a", "SEARCH UID 1:2,5"),
        ("a", "SEARCH LARGER 100 SMALLER 200"),
        ("a", "SEARCH SENTBEFORE 5-Mar-2026"),
        ("a", "SEARCH SENTON 5-Mar-2026"),
        ("a", "SEARCH SENTSINCE 6-Mar-2026"),
        ("a", "SEARCH FROM remote.test"),
        ("a", "SEARCH FROM a@remote"),
        ("a", "SEARCH HEADER Message-ID <3@diff.test>"),
        ("a", "SEARCH HEADER X-Missing \"\""),
        ("a", "SEARCH SUBJECT S2"),
        ("a", "SEARCH OR SUBJECT s21 SUBJECT s24"),
        ("a", "SEARCH BODY \"body 3\""),
        ("a", "SEARCH TEXT diff.test"),
        ("a", "SEARCH CHARSET UTF-8 SUBJECT s2"),
        ("a", "SEARCH CHARSET KOI8-R SUBJECT s2"),
        ("a", "SORT (REVERSE DATE) UTF-8 ALL"),
        ("a", "SORT (SUBJECT) UTF-8 ALL"),
        ("a", "SORT (SIZE REVERSE ARRIVAL) UTF-8 ALL"),
        ("a", "THREAD ORDEREDSUBJECT UTF-8 ALL"),
        ("a", "THREAD REFERENCES UTF-8 ALL"),
        ("a", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] RFC822.SIZE)"),
        ("a", "FETCH 1 (BODY[TEXT]<0.3>)"),
        ("a", "FETCH 1 FLAGS"),
        ("a", "DELETE $box/child"),
    ]),
]


def run(port, user, password, name, steps):
    box = "diff%d" % int(time.time() * 1000 % 10_000_000)
    a = connect(port, user, password)
    b = connect(port, user, password)
    raw(a, f"CREATE {box}")
    for m in MESSAGES:
        a.append(box, None, None, m.encode())
    raw(a, f"SELECT {box}")
    answers = []
    for who, cmd in steps:
        c = a if who == "a" else b
        answers.append((who, cmd, normalise(raw(c, cmd.replace("$box", box)))))
    for c in (a, b):
        try:
            raw(c, "LOGOUT")
        except Exception:
            pass
    cleanup = connect(port, user, password)
    raw(cleanup, f"DELETE {box}")
    raw(cleanup, f"DELETE {box}.2")
    return answers


def main():
    dc, mr, user, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    differences = 0
    for name, steps in SCENARIOS:
        d = run(dc, user, password, name, steps)
        m = run(mr, user, password, name, steps)
        print(f"-- {name}")
        for (who, cmd, dl), (_, _, ml) in zip(d, m):
            if dl != ml:
                differences += 1
                print(f"   {who}: {cmd}")
                print(f"      Dovecot : {dl}")
                print(f"      Mailroom: {ml}")
    print(f"{differences} difference(s)")


if __name__ == "__main__":
    main()
