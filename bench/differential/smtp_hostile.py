#!/usr/bin/env python3
"""Sends the same hostile SMTP command sequences to two servers and prints their answers
side by side; "!!" marks a sequence whose reply codes differ. bench/differential/run
starts a private Postfix and Mailroom and calls this with their ports. Every
difference is explained in docs/smtp.md ("Compared with Postfix")."""
import socket, sys, time
def session(port, steps):
    s = socket.create_connection(("127.0.0.1", port)); s.settimeout(3)
    buf = b""
    def read_reply():
        nonlocal buf
        lines = []
        while True:
            while b"\n" not in buf:
                try: d = s.recv(65536)
                except socket.timeout: return lines + ["<timeout>"]
                except OSError: return lines + ["<reset>"]
                if not d: return lines + ["<closed>"]
                buf += d
            line, buf = buf.split(b"\n", 1)
            lines.append(line.rstrip(b"\r").decode("latin1"))
            if len(line) >= 4 and line[3:4] == b" ": return lines
            if len(line) < 4: return lines
    out = [read_reply()[-1][:3]]
    for send, n in steps:
        try: s.sendall(send)
        except Exception as e: out.append("<send failed>"); break
        for _ in range(n):
            r = read_reply()
            out.append(r[-1][:60] if r else "")
            if r and r[-1].startswith("<"): break
    s.close()
    return out
C = [
 ("DATA before MAIL", [(b"EHLO c\r\n",1),(b"DATA\r\n",1)]),
 ("RCPT before MAIL", [(b"EHLO c\r\n",1),(b"RCPT TO:<u@example.test>\r\n",1)]),
 ("BDAT without MAIL", [(b"EHLO c\r\n",1),(b"BDAT 3 LAST\r\nabc",1),(b"NOOP\r\n",1)]),
 ("NUL in MAIL", [(b"EHLO c\r\n",1),(b"MAIL FROM:<\x00@remote.test>\r\n",1)]),
 ("NUL in EHLO", [(b"EHLO \x00\xff\r\n",1)]),
 ("invalid UTF-8 in RCPT", [(b"EHLO c\r\n",1),(b"MAIL FROM:<a@remote.test>\r\n",1),(b"RCPT TO:<\xc3\x28@example.test>\r\n",1)]),
 ("BDAT 2^64", [(b"EHLO c\r\n",1),(b"MAIL FROM:<a@remote.test>\r\n",1),(b"RCPT TO:<u@example.test>\r\n",1),(b"BDAT 18446744073709551616\r\n",1),(b"NOOP\r\n",1)]),
 ("nested MAIL", [(b"EHLO c\r\n",1),(b"MAIL FROM:<a@remote.test>\r\n",1),(b"MAIL FROM:<b@remote.test>\r\n",1)]),
 ("line of 3000 bytes", [(b"EHLO c\r\n",1),(b"NOOP " + b"x"*3000 + b"\r\n",1),(b"NOOP\r\n",1)]),
 ("SIZE too big", [(b"EHLO c\r\n",1),(b"MAIL FROM:<a@remote.test> SIZE=99999999999999\r\n",1)]),
 ("HELO without arg", [(b"HELO\r\n",1),(b"EHLO\r\n",1)]),
 ("STARTTLS not offered", [(b"EHLO c\r\n",1),(b"STARTTLS\r\n",1)]),
 ("AUTH not offered", [(b"EHLO c\r\n",1),(b"AUTH PLAIN AGEAYg==\r\n",1)]),
 ("VRFY/EXPN", [(b"EHLO c\r\n",1),(b"VRFY u@example.test\r\n",1),(b"EXPN list\r\n",1)]),
 ("smuggle CR CR LF", [(b"EHLO c\r\n",1),(b"MAIL FROM:<a@remote.test>\r\n",1),(b"RCPT TO:<u@example.test>\r\n",1),(b"DATA\r\n",1),(b"x\r\n.\r\r\nMAIL FROM:<b@remote.test>\r\n.\r\n",1)]),
 ("bare LF in data", [(b"EHLO c\r\n",1),(b"MAIL FROM:<a@remote.test>\r\n",1),(b"RCPT TO:<u@example.test>\r\n",1),(b"DATA\r\n",1),(b"Subject: x\n\nbody\n\r\n.\r\n",1)]),
 ("unknown x25", [(b"EHLO c\r\n",1)] + [(b"FOO\r\n",1)]*25),
 ("RCPT null", [(b"EHLO c\r\n",1),(b"MAIL FROM:<a@remote.test>\r\n",1),(b"RCPT TO:<>\r\n",1)]),
 ("MAIL no brackets", [(b"EHLO c\r\n",1),(b"MAIL FROM: a@remote.test\r\n",1)]),
 ("QUIT with data pipelined", [(b"EHLO c\r\n",1),(b"QUIT\r\nNOOP\r\n",2)]),
]
pf, mr = int(sys.argv[1]), int(sys.argv[2])
for name, steps in C:
    a = session(pf, steps); b = session(mr, steps)
    codes_a = [x[:3] for x in a]; codes_b = [x[:3] for x in b]
    mark = "  " if codes_a == codes_b else "!!"
    print(f"{mark} {name}\n     postfix : {a}\n     mailroom: {b}")
