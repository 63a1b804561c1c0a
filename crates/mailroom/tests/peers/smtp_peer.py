"""A next-hop SMTP server for Mailroom's outbound tests, on aiosmtpd (not our code).

Usage: smtp_peer.py PORT OUT_DIR [CERT KEY]   (with CERT and KEY it offers STARTTLS)

Recipients choose their fate by local part: perm* -> 550 5.1.1 for good; temp* -> 451
4.3.0 the first time it is seen, accepted after; always* -> 451 4.3.0 every time;
slow* is accepted, but the reply to its data waits 3 s; anything else is accepted. Every accepted message is written to OUT_DIR as N.json
(envelope and data). Prints READY once listening.
"""
import asyncio
import json
import os
import sys
import time

from aiosmtpd.controller import Controller


class Peer:
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.seen = {}
        self.count = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        self.seen[address] = self.seen.get(address, 0) + 1
        if local.startswith("perm"):
            return "550 5.1.1 <%s>: no such user here" % address
        if local.startswith("always") or (local.startswith("temp") and self.seen[address] == 1):
            return "451 4.3.0 <%s>: try again later" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if any(r.lower().startswith("slow") for r in envelope.rcpt_tos):
            # Hold the final reply, so the sender can be stopped mid-attempt.
            await asyncio.sleep(3)
        self.count += 1
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "data": envelope.content.decode("utf-8", "replace"),
            "tls": session.ssl is not None,
        }
        path = os.path.join(self.out_dir, "%d.json" % self.count)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)
        return "250 2.0.0 queued as %d" % self.count


def main():
    port = int(sys.argv[1])
    kwargs = {}
    if len(sys.argv) > 4:
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[3], sys.argv[4])
        kwargs["tls_context"] = context
    controller = Controller(Peer(sys.argv[2]), hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    print("READY", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
