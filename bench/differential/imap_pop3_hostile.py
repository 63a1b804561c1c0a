#!/usr/bin/env python3
"""Sends the same hostile IMAP and POP3 input to Dovecot and to Mailroom and prints the
answers side by side; "!!" marks a sequence whose result words differ (IMAP: the tagged
OK/NO/BAD or an untagged BYE; POP3: +OK/-ERR). bench/differential/run starts both.
Every difference is explained in docs/security.md ("Compared with Dovecot")."""
import re, socket, sys

def connect(port):
    s = socket.create_connection(("127.0.0.1", port)); s.settimeout(5)
    return s

def read_until(s, buf, pred):
    while True:
        if pred(buf):
            return buf
        try:
            d = s.recv(1 << 20)
        except socket.timeout:
            return buf + b"<timeout>"
        except OSError:
            return buf + b"<reset>"
        if not d:
            return buf + b"<closed>"
        buf += d

def imap(port, user, password, steps, login):
    """steps: (bytes to send, tag to wait for or None)."""
    s = connect(port)
    buf = read_until(s, b"", lambda b: b"\r\n" in b)
    out = []
    if login:
        s.sendall(b"L LOGIN %s %s\r\nS SELECT INBOX\r\n" % (user, password))
        read_until(s, b"", lambda b: re.search(rb"(^|\n)S (OK|NO|BAD)", b) is not None)
    for send, tag in steps:
        try:
            s.sendall(send)
        except OSError:
            out.append("<send failed>"); break
        if tag is None:
            continue
        pat = re.compile(rb"(^|\n)(" + re.escape(tag) + rb"|\*) (OK|NO|BAD|BYE)[^\r\n]*") if tag != b"*" else re.compile(rb"(^|\n)\* (BYE|BAD|NO)[^\r\n]*")
        got = read_until(s, b"", lambda b: (tag == b"*" and pat.search(b)) or re.search(rb"(^|\n)" + re.escape(tag) + rb" (OK|NO|BAD)[^\r\n]*\r\n", b) or b"* BYE" in b)
        m = re.search(rb"(^|\n)" + re.escape(tag) + rb" (OK|NO|BAD)([^\r\n]*)", got) or re.search(rb"\* (BYE)([^\r\n]*)", got)
        if m:
            word = m.group(2).decode() if m.re.pattern.startswith(rb"(^|\n)") else "BYE"
            out.append((word + " " + m.group(m.lastindex).decode("latin1").strip())[:70])
        else:
            out.append(got[-60:].decode("latin1"))
    s.close()
    return out

def pop3(port, user, password, lines, login):
    s = connect(port)
    read_until(s, b"", lambda b: b"\r\n" in b)
    if login:
        s.sendall(b"USER %s\r\nPASS %s\r\n" % (user, password))
        read_until(s, b"", lambda b: b.count(b"\r\n") >= 2)
    out = []
    buf = b""
    for line in lines:
        try:
            s.sendall(line)
        except OSError:
            out.append("<send failed>"); break
        buf = read_until(s, buf, lambda b: b"\r\n" in b)
        first, _, buf = buf.partition(b"\r\n")
        out.append(first[:60].decode("latin1"))
        verb = line.split(b" ")[0].strip().upper()
        has_arg = len(line.strip().split(b" ")) > 1
        multi = verb in (b"TOP", b"RETR", b"CAPA") or (verb in (b"LIST", b"UIDL") and not has_arg)
        if first.startswith(b"+OK") and multi:
            buf = read_until(s, buf, lambda b: b.startswith(b".\r\n") or b"\r\n.\r\n" in b)
            i = 0 if buf.startswith(b".\r\n") else buf.find(b"\r\n.\r\n") + 2
            buf = buf[i + 3:]
        if first.startswith(b"<"):
            break
    s.close()
    return out

IMAP = [
    ("pre-login: 20 MB synchronising literal", False, [(b"a LOGIN {20000000}\r\n", b"a")]),
    ("pre-login: SEARCH with 60,000 (", False, [(b"a SEARCH " + b"(" * 60000 + b"\r\n", b"a")]),
    ("pre-login: FETCH", False, [(b"a FETCH 1 FLAGS\r\n", b"a")]),
    ("pre-login: garbage tag with literal", False, [(b"b{4444444444444}\r\n", b"*"), (b"c NOOP\r\n", b"c")]),
    ("pre-login: tag with +", False, [(b"+x NOOP\r\n", b"*"), (b"c NOOP\r\n", b"c")]),
    ("pre-login: LOGIN without arguments", False, [(b"a LOGIN\r\n", b"a")]),
    ("pre-login: AUTHENTICATE cancelled", False, [(b"a AUTHENTICATE PLAIN\r\n", None), (b"*\r\n", b"a")]),
    ("pre-login: NUL in a command", False, [(b"a NO\x00OP\r\n", b"a"), (b"b NOOP\r\n", b"b")]),
    ("LIST with 60,000 %", True, [(b"a LIST \"\" \"" + b"%" * 60000 + b"\"\r\n", b"a")]),
    ("LIST with 55 *a", True, [(b"a LIST \"\" \"" + b"*a" * 55 + b"\"\r\n", b"a")]),
    ("SELECT of NUL and invalid UTF-8", True, [(b"a SELECT \"\xff\x00\"\r\n", b"a")]),
    ("FETCH a deep part", True, [(b"a FETCH 1 BODY.PEEK[1.2.3.4.5.6.7.8.9.10]\r\n", b"a")]),
    ("FETCH partial at 2^32-1", True, [(b"a FETCH 1 BODY.PEEK[]<4294967295.4294967295>\r\n", b"a")]),
    ("FETCH partial beyond 2^32", True, [(b"a FETCH 1 BODY.PEEK[]<4294967296>\r\n", b"a")]),
    ("SEARCH with a year of ten digits", True, [(b"a SEARCH SINCE 30-Nov-2222222026\r\n", b"a")]),
    ("SEARCH OR without operands", True, [(b"a SEARCH OR\r\n", b"a")]),
    ("SEARCH nested 70 deep", True, [(b"a SEARCH " + b"(" * 70 + b"ALL" + b")" * 70 + b"\r\n", b"a")]),
    ("UID SEARCH UID 1:4294967295", True, [(b"a UID SEARCH UID 1:4294967295\r\n", b"a")]),
    ("sequence number 0", True, [(b"a FETCH 0 FLAGS\r\n", b"a")]),
    ("sequence beyond 2^32", True, [(b"a FETCH 4294967296 FLAGS\r\n", b"a")]),
    ("STORE \\Recent", True, [(b"a STORE 1 +FLAGS (\\Recent)\r\n", b"a")]),
    ("APPEND literal over APPENDLIMIT", True, [(b"a APPEND INBOX {999999999}\r\n", b"a")]),
    ("APPEND with a bad date", True, [(b"a APPEND INBOX \"30-Nov-2222222026 10:00:00 +0000\" {3}\r\n", None), (b"abc\r\n", b"a")]),
    ("COPY to a folder with NUL", True, [(b"a COPY 1 \"x\x00y\"\r\n", b"a")]),
    ("CREATE a 2,000-byte name", True, [(b"a CREATE " + b"n" * 2000 + b"\r\n", b"a")]),
    ("EXPUNGE on EXAMINE", True, [(b"e EXAMINE INBOX\r\n", b"e"), (b"a EXPUNGE\r\n", b"a")]),
    ("IDLE then garbage", True, [(b"a IDLE\r\n", None), (b"GARBAGE\r\n", b"a")]),
]
POP3 = [
    ("NUL and invalid UTF-8 in USER", False, [b"USER \x00\xff\r\n", b"PASS \xc3\x28\r\n"]),
    ("RETR before login", False, [b"RETR 1\r\n"]),
    ("a 5,000-byte line", False, [b"NOOP " + b"x" * 5000 + b"\r\n"]),
    ("AUTH with an unknown mechanism", False, [b"AUTH X-UNKNOWN\r\n"]),
    ("TOP with a negative count", True, [b"TOP 1 -1\r\n"]),
    ("TOP with a huge count", True, [b"TOP 1 99999999999999999999\r\n"]),
    ("LIST 0", True, [b"LIST 0\r\n"]),
    ("LIST of a huge number", True, [b"LIST 99999999999999999999\r\n"]),
    ("DELE twice", True, [b"DELE 1\r\n", b"DELE 1\r\n", b"RSET\r\n"]),
    ("USER after login", True, [b"USER x\r\n"]),
]

dc, dc_pop3, mr, mr_pop3 = (int(a) for a in sys.argv[1:5])
user, password = sys.argv[5].encode(), sys.argv[6].encode()
print("IMAP")
for name, login, steps in IMAP:
    a = imap(dc, user, password, steps, login); b = imap(mr, user, password, steps, login)
    same = [x.split(" ")[0] for x in a] == [x.split(" ")[0] for x in b]
    print(f"{'  ' if same else '!!'} {name}\n     dovecot : {a}\n     mailroom: {b}")
print("POP3")
for name, login, lines in POP3:
    a = pop3(dc_pop3, user, password, lines, login); b = pop3(mr_pop3, user, password, lines, login)
    same = [x[:3] for x in a] == [x[:3] for x in b]
    print(f"{'  ' if same else '!!'} {name}\n     dovecot : {a}\n     mailroom: {b}")
