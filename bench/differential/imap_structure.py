#!/usr/bin/env python3
"""APPENDs the same MIME messages to Dovecot and to Mailroom and prints every FETCH of
structure and sections whose answers differ ("!!"), or "same". What a strict client
reads byte by byte: ENVELOPE, BODYSTRUCTURE, BODY[n], BODY[n.MIME], BODY[n.HEADER],
parts inside message/rfc822. bench/differential/run starts both servers."""
import imaplib, sys

dc_port, mr_port, user, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

NESTED = (
    b"From: =?utf-8?q?Zo=C3=AB?= <zoe@remote.test>\r\n"
    b"To: Ann <ann@example.test>, group: a@x.test, b@x.test;\r\n"
    b"Cc: \"Quoted, Name\" <q@x.test>\r\n"
    b"Subject: nested report\r\n"
    b"Message-ID: <n1@remote.test>\r\n"
    b"In-Reply-To: <p0@remote.test>\r\n"
    b"Date: Thu, 05 Mar 2026 10:00:00 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"o\"\r\n\r\n"
    b"preamble\r\n--o\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"caf=C3=A9 numbers\r\n--o\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Disposition: attachment; filename=\"inner.eml\"\r\n\r\n"
    b"From: inner@remote.test\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative; boundary=\"i\"\r\n\r\n"
    b"--i\r\nContent-Type: text/plain\r\n\r\ninner text\r\n"
    b"--i\r\nContent-Type: text/html; charset=us-ascii\r\nContent-Language: en\r\n\r\n<p>inner</p>\r\n--i--\r\n\r\n"
    b"--o\r\n"
    b"Content-Type: application/octet-stream; name=\"a.bin\"\r\n"
    b"Content-Transfer-Encoding: base64\r\nContent-ID: <c1@x>\r\nContent-Description: data\r\n\r\n"
    b"AAECAw==\r\n--o--\r\nepilogue\r\n"
)
PLAIN = b"Subject: plain\r\nFrom: a@b.test\r\n\r\nline one\r\nline two\r\n"
NO_HEADERS = b"\r\njust a body\r\n"

# ENVELOPE edge cases (RFC 3501 7.4.2 / RFC 9051 7.5.2): Sender and Reply-To absent or
# empty (both default to From), a name in a comment, groups (one empty), a source route,
# a quoted local part, an encoded subject, several From addresses, no From, no Date.
ENVELOPES = [
    b"Date: Sat, 01 Feb 2007 01:02:03 +0200\r\nFrom: user@domain.test\r\n\r\nbody\r\n",
    b"Date: Sat, 01 Feb 2007 01:02:03 +0200\r\nFrom: user@domain.test (Real Name)\r\n"
    b"Sender: \r\nReply-To: \r\n\r\nbody\r\n",
    b"From: a@b.test\r\nTo: group: g1@d1.test, g2@d2.test;, empty:;, g3@d3.test\r\n\r\nbody\r\n",
    b"From: <@route.test:user@domain.test>\r\n\r\nbody\r\n",
    b"From: \"odd local\"@domain.test\r\nSubject: =?utf-8?q?caf=C3=A9?= ok\r\n\r\nbody\r\n",
    b"From: One <one@x.test>, Two <two@x.test>\r\nSender: S <s@x.test>\r\n\r\nbody\r\n",
    b"Subject: no from\r\nTo: undisclosed-recipients:;\r\n\r\nbody\r\n",
    b"From: a@b.test\r\nSubject:\r\nIn-Reply-To: <x@y> <z@w>\r\nMessage-ID: no-brackets\r\n\r\nbody\r\n",
]

FETCHES = [
    "ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822.SIZE",
    "BODY.PEEK[1]", "BODY.PEEK[1.MIME]", "BODY.PEEK[2]", "BODY.PEEK[2.MIME]",
    "BODY.PEEK[2.HEADER]", "BODY.PEEK[2.TEXT]", "BODY.PEEK[2.1]", "BODY.PEEK[2.1.MIME]",
    "BODY.PEEK[2.2]", "BODY.PEEK[2.2.MIME]", "BODY.PEEK[2.1.1]", "BODY.PEEK[3]",
    "BODY.PEEK[3.MIME]", "BODY.PEEK[4]", "BODY.PEEK[HEADER.FIELDS (Subject To)]",
    "BODY.PEEK[HEADER.FIELDS.NOT (Subject To Cc From Date)]", "BODY.PEEK[TEXT]<0.20>",
    "BODY.PEEK[2.HEADER.FIELDS (SUBJECT)]", "BINARY.PEEK[1]", "BINARY.PEEK[3]",
    "BINARY.SIZE[1]", "BODY.PEEK[1]<2.5>", "BODY.PEEK[MIME]",
]

def run(port):
    c = imaplib.IMAP4("127.0.0.1", port)
    c.login(user, password)
    c.delete("Diff")
    c.create("Diff")
    c.select("Diff")
    for m in [NESTED, PLAIN, NO_HEADERS] + ENVELOPES:
        c.append("Diff", None, None, m)
    out = {}
    for n in (1, 2, 3):
        for item in FETCHES:
            try:
                typ, data = c.fetch(str(n), f"({item})")
                text = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in data if x)
                out[(n, item)] = f"{typ} {text!r}"
            except Exception as e:
                out[(n, item)] = f"ERROR {e}"
    for n in range(4, 4 + len(ENVELOPES)):
        typ, data = c.fetch(str(n), "(ENVELOPE)")
        text = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in data if x)
        out[(n, "ENVELOPE")] = f"{typ} {text!r}"
    c.logout()
    return out

dc, mr = run(dc_port), run(mr_port)
same = 0
for key in dc:
    if dc[key] == mr[key]:
        same += 1
        continue
    print(f"!! message {key[0]} {key[1]}\n   dovecot:  {dc[key]}\n   mailroom: {mr[key]}")
print(f"{same} of {len(dc)} the same")
